"""kafka-python's log at WARNING-once: below WARNING dropped, each template once per interval, repeats counted."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from stream import clientlog
from stream.clientlog import OncePerInterval


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.WARNING, name: str = "kafka.net.manager") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def once(clock: Clock) -> OncePerInterval:
    return OncePerInterval(interval_s=300.0, clock=clock)


@pytest.mark.parametrize(
    ("level", "passes"),
    [
        (logging.DEBUG, False),
        (logging.INFO, False),
        (logging.WARNING, True),
        (logging.ERROR, True),
        (logging.CRITICAL, True),
    ],
)
def test_only_warnings_and_above_pass(level: int, passes: bool, once: OncePerInterval) -> None:
    assert once.filter(record("Attempting bootstrap to %s", "bootstrap-0", level=level)) is passes


def test_a_template_passes_once_per_interval_whatever_its_arguments(once: OncePerInterval, clock: Clock) -> None:
    template = "Bootstrap connection to %s failed: %s (backoff %.2f secs)"
    assert once.filter(record(template, "bootstrap-0", "ECONNREFUSED", 0.1))
    for n in range(5):
        clock.now += 10
        assert not once.filter(record(template, f"node-{n}", "ECONNREFUSED", 0.2 * n))
    clock.now += 300
    again = record(template, "bootstrap-1", "ECONNREFUSED", 1.5)
    assert once.filter(again)
    assert again.getMessage() == (
        "Bootstrap connection to bootstrap-1 failed: ECONNREFUSED (backoff 1.50 secs) "
        "(5 more like this suppressed since the last one shown)"
    )
    clock.now += 301
    quiet = record(template, "bootstrap-1", "ECONNREFUSED", 1.5)
    assert once.filter(quiet) and "suppressed" not in quiet.getMessage(), "no count when nothing was suppressed"


def test_templates_and_loggers_are_counted_apart(once: OncePerInterval) -> None:
    assert once.filter(record("Connection failed: %s", "ECONNREFUSED"))
    assert once.filter(record("Bootstrap failed: %s", "timeout"))
    assert once.filter(record("Connection failed: %s", "ECONNREFUSED", name="kafka.net.connection"))
    assert not once.filter(record("Connection failed: %s", "DNS Resolution failure"))


def test_preformatted_messages_collapse_on_their_digits(once: OncePerInterval) -> None:
    # kafka-python formats a few messages itself (f-strings): the node id and backoff vary in record.msg.
    assert once.filter(record("Bootstrap attempt to bootstrap-0 failed: timeout (backoff 0.05 secs)"))
    assert not once.filter(record("Bootstrap attempt to bootstrap-1 failed: timeout (backoff 12.80 secs)"))
    assert once.filter(record("Bootstrap attempt to bootstrap-1 failed: no brokers (backoff 0.05 secs)"))


def test_a_count_is_safe_next_to_percent_signs(once: OncePerInterval, clock: Clock) -> None:
    assert once.filter(record("Fetch of %s at 100%% failed", "t-0"))
    assert not once.filter(record("Fetch of %s at 100%% failed", "t-1"))
    clock.now += 300
    passed = record("Fetch of %s at 100%% failed", "t-2")
    assert once.filter(passed)
    assert passed.getMessage() == "Fetch of t-2 at 100% failed (1 more like this suppressed since the last one shown)"


def test_memory_stays_bounded(once: OncePerInterval, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clientlog, "MAX_TEMPLATES", 10)
    for n in range(11):
        assert once.filter(record(f"template {chr(ord('a') + n)} %s", n))
    # The older half was forgotten: the first template passes again; the newest is still remembered.
    assert once.filter(record("template a %s", 0))
    assert not once.filter(record("template k %s", 0))


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        OncePerInterval(interval_s=0)


@pytest.fixture
def hierarchy() -> Iterator[str]:
    """A logger name of this test's own, uninstalled afterwards, so no other test sees the filter."""
    name = f"test-clientlog-{uuid.uuid4().hex[:8]}"
    yield name
    clientlog.uninstall(name)


def test_install_filters_the_whole_hierarchy_into_the_root_handlers(
    hierarchy: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    once = clientlog.install(hierarchy, interval_s=60.0, clock=clock)
    assert clientlog.install(hierarchy) is once, "installing twice keeps the one filter"
    child = logging.getLogger(f"{hierarchy}.net.manager")
    for node in range(3):
        child.warning("Connection to node %s failed", node)
        child.info("Attempting bootstrap to %s", node)
        child.debug("Sending request to %s", node)
    logging.getLogger(f"{hierarchy}-not-a-child").info("untouched")
    clock.now += 60
    child.warning("Connection to node %s failed", 7)
    shown = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert shown == [
        (f"{hierarchy}.net.manager", "WARNING", "Connection to node 0 failed"),
        (f"{hierarchy}-not-a-child", "INFO", "untouched"),
        (
            f"{hierarchy}.net.manager",
            "WARNING",
            "Connection to node 7 failed (2 more like this suppressed since the last one shown)",
        ),
    ]


def test_uninstall_lets_everything_through_again(hierarchy: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clientlog.install(hierarchy)
    clientlog.uninstall(hierarchy)
    child = logging.getLogger(f"{hierarchy}.conn")
    child.warning("Connection to node %s failed", 1)
    child.warning("Connection to node %s failed", 2)
    child.info("Attempting bootstrap")
    assert len(caplog.records) == 3
