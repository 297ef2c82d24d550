"""The event-time windows of the scorer's metrics: bucketing, watermark, late posts, expiry, the baseline range.

Every case runs on a clock the test sets, with a 60 s window and a 300 s baseline: 1 s buckets, 360 kept.
"""

import re
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.config import AlertRulesConfig
from monitor.metrics import EventWindows, Key, ScorerMetrics

NOW = 1_750_000_000.0
WINDOW_S, BASELINE_S = 60.0, 300.0
NEG: Key = ("topic", "Energy / Oil", "negative")
NEU: Key = ("topic", "Energy / Oil", "neutral")
# An hour old, half-way through its 1 s bucket: the window is the 60 buckets [W - 59.5, W + 0.5).
W = NOW - 3600 + 0.5


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def windows(clock: Clock | None = None) -> EventWindows:
    return EventWindows(WINDOW_S, BASELINE_S, clock=clock or Clock())


@pytest.mark.parametrize(
    ("offset_s", "where"),
    [
        (0.0, "window"),  # the watermark's own post
        (-30.0, "window"),
        (-59.5, "window"),  # the oldest bucket of the window
        (-60.0, "baseline"),  # exactly a window back: (watermark - window, watermark] excludes it
        (-200.0, "baseline"),
        (-359.5, "baseline"),  # the oldest bucket kept: the baseline ends where the window starts
        (-360.0, "late"),  # before window + baseline: counted in neither
        (-86400.0, "late"),
    ],
)
def test_a_post_lands_in_the_window_of_its_publication_time(offset_s: float, where: str) -> None:
    w = windows()
    assert w.add(W, [NEU])
    counted = w.add(W + offset_s, [NEG])
    snap = w.snapshot()
    assert snap.watermark == W
    found = {"window": snap.window.get(NEG, 0), "baseline": snap.baseline.get(NEG, 0), "late": snap.late}
    assert found == {name: int(name == where) for name in found}
    assert counted == (where != "late")


def test_the_buckets_are_a_sixtieth_of_the_window_and_the_baseline_never_shorter() -> None:
    assert windows().bucket_s == 1.0
    odd = EventWindows(30.0, 300.2, clock=Clock())  # 0.5 s buckets: 601 of them, not 600, cover 300.2 s
    assert odd.bucket_s == 0.5
    odd.add(NOW, [NEU])  # the window is the buckets [NOW - 29.5, NOW + 0.5)
    odd.add(NOW - 29.5 - 300.1, [NEG])  # 300.1 s before the window starts: still in the baseline
    assert odd.snapshot().baseline == {NEG: 1}


def test_the_watermark_is_the_newest_post_and_older_ones_arrive_in_any_order() -> None:
    w = windows()
    for offset in (-100.0, 0.0, -10.0, -250.0, -5.0):  # a backlog from several partitions, interleaved
        assert w.add(W + offset, [NEG, NEU])
    snap = w.snapshot()
    assert snap.watermark == W
    assert snap.window == {NEG: 3, NEU: 3} and snap.baseline == {NEG: 2, NEU: 2}
    assert snap.late == 0


def test_a_post_from_the_future_counts_as_published_now() -> None:
    clock = Clock()
    w = windows(clock)
    w.add(NOW - 10, [NEU])
    # A producer's clock a day ahead: the watermark stops at the wall clock, so the posts of the last
    # 10 s stay in the window instead of being pushed a day back.
    assert w.add(NOW + 86400, [NEG])
    snap = w.snapshot()
    assert snap.watermark == NOW
    assert snap.window == {NEU: 1, NEG: 1}
    clock.now += 5
    w.add(NOW + 3, [NEU])  # ahead of the old watermark, behind the clock now: taken as stamped
    assert w.snapshot().watermark == NOW + 3


def test_buckets_expire_as_the_watermark_moves_on() -> None:
    w = windows()
    w.add(W, [NEG])
    w.add(W + 60, [NEU])  # a window on: the first post is baseline now
    assert (w.snapshot().window, w.snapshot().baseline) == ({NEU: 1}, {NEG: 1})
    w.add(W + 360, [NEU])  # past window + baseline: the first post has left everything kept
    snap = w.snapshot()
    assert snap.window == {NEU: 1} and snap.baseline == {NEU: 1}
    assert snap.late == 0, "expiry is not lateness: those posts were counted while they were recent"
    # The slot of the first post's bucket is reused for a bucket one ring later, starting from zero.
    w.add(W + 720, [NEU])
    w.add(W + 720 - 359.5, [NEG])
    assert w.snapshot().baseline == {NEG: 1}


def test_a_jump_of_days_leaves_nothing_of_the_old_windows() -> None:
    w = windows()
    for offset in range(0, 300, 7):
        w.add(W - 86400 * 3 + offset, [NEG])
    w.add(W, [NEU])
    snap = w.snapshot()
    assert snap.window == {NEU: 1} and snap.baseline == {}


def test_the_windows_read_empty_once_the_watermark_has_stood_still_for_a_window() -> None:
    clock = Clock()
    w = windows(clock)
    w.add(W, [NEG])
    clock.now += WINDOW_S
    assert w.snapshot().window == {NEG: 1}
    clock.now += 1
    idle = w.snapshot()
    assert idle.window == {} and idle.baseline == {} and idle.watermark == W
    w.add(W - 1, [NEU])  # an older post does not move the watermark: still idle
    assert w.snapshot().window == {}
    w.add(W + 1, [NEU])  # the news is back: the counts kept all along count again
    assert w.snapshot().window == {NEG: 1, NEU: 2}


def test_coverage_is_the_publication_time_counted_since_the_first_post() -> None:
    w = windows()
    assert w.snapshot().coverage_s == 0.0 and w.snapshot().watermark is None
    w.add(W, [NEG])
    w.add(W - 50, [NEG])  # older than the first: inside the windows, but coverage starts at the first watermark
    w.add(W + 120, [NEG])
    assert w.snapshot().coverage_s == 120.0


def test_lengths_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be above zero"):
        EventWindows(0.0, 300.0)


# -- ScorerMetrics -----------------------------------------------------------------------------------------


def _metrics(time_base: str | None) -> ScorerMetrics:
    rules = None if time_base is None else AlertRulesConfig.fast(window="1m", time_base=time_base)
    metrics = ScorerMetrics(CollectorRegistry(), rules=rules)
    metrics.declare(["Energy / Oil", "Earnings"], ["negative", "neutral", "positive"], ["TSLA", "AAPL"])
    return metrics


@pytest.mark.parametrize("time_base", [None, "processing"])
def test_without_event_time_rules_nothing_is_kept_or_exported(time_base: str | None) -> None:
    metrics = _metrics(time_base)
    metrics.count_published(datetime.now(UTC), "Earnings", "negative", ["TSLA"])
    assert metrics.event_windows is None
    assert b"finpulse_event_" not in generate_latest(metrics.registry)


def test_scorer_metrics_export_the_windows_at_scrape_time() -> None:
    metrics = _metrics("event")
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    metrics.count_published(old, "Energy / Oil", "negative", ["TSLA", "GME"])  # GME is not watched
    metrics.count_published(old - timedelta(seconds=90), "Energy / Oil", "neutral", ["TSLA"])
    metrics.count_published(old - timedelta(hours=1), "Earnings", "negative", [])  # late
    r = metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, labels)

    assert sample("finpulse_event_window_messages", topic="Energy / Oil", sentiment="negative", window="window") == 1
    assert sample("finpulse_event_window_messages", topic="Energy / Oil", sentiment="neutral", window="baseline") == 1
    assert sample("finpulse_ticker_event_window_messages", ticker="TSLA", sentiment="negative", window="window") == 1
    assert sample("finpulse_ticker_event_window_messages", ticker="GME", sentiment="negative", window="window") is None
    assert sample("finpulse_event_window_messages", topic="Earnings", sentiment="negative", window="window") is None
    assert sample("finpulse_event_late_messages_total") == 1
    assert sample("finpulse_event_window_seconds", window="window") == 60
    assert sample("finpulse_event_window_seconds", window="baseline") == 300
    assert sample("finpulse_event_watermark_timestamp_seconds") == pytest.approx(old.timestamp())
    assert sample("finpulse_event_window_coverage_seconds") == 0
    # The processing-time counters are the scorer's to count, not count_published's.
    assert sample("finpulse_messages_scored_total", topic="Energy / Oil", sentiment="negative") == 0
    text = generate_latest(r).decode()
    assert "# TYPE finpulse_event_window_messages gauge" in text
    assert re.search(r"^# TYPE finpulse_event_late_messages(_total)? counter$", text, re.MULTILINE)


def test_a_fresh_scorer_exports_lengths_and_no_watermark() -> None:
    r = _metrics("event").registry
    assert r.get_sample_value("finpulse_event_window_seconds", {"window": "window"}) == 60
    assert r.get_sample_value("finpulse_event_watermark_timestamp_seconds") is None
    assert r.get_sample_value("finpulse_event_late_messages_total") == 0
