"""Containment of batch failures: retries for the transient, waits for the down, bisection for the poison."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stream.containment import Containment, Stopping


class _Stage:
    """A stage over ints that fails for `poison` items, and entirely while `down` holds."""

    def __init__(self, poison: frozenset[int] | set[int] = frozenset(), flaky: int = 0) -> None:
        self.poison = set(poison)
        self.flaky = flaky  # the first N calls fail whatever the items
        self.down = False
        self.calls = 0

    def __call__(self, items: list[int]) -> list[int]:
        self.calls += 1
        if self.down:
            raise ConnectionError("server down")
        if self.flaky > 0:
            self.flaky -= 1
            raise TimeoutError("transient")
        bad = self.poison.intersection(items)
        if bad:
            raise ValueError(f"cannot take {sorted(bad)}")
        return [item * 10 for item in items]

    def probe(self) -> None:
        if self.down:
            raise ConnectionError("server down")


def _containment(waits: list[str], on_wait: Callable[[], None] | None = None) -> Containment:
    def wait(stage: str, probe: Callable[[], None], error: BaseException) -> None:
        waits.append(stage)
        if on_wait is not None:
            on_wait()
        probe()

    return Containment(wait, sleep=lambda _: None)


@pytest.mark.parametrize(
    ("size", "poison"),
    [(1, {0}), (2, {1}), (7, {3}), (512, {0, 255, 511}), (100, set(range(100)))],
)
def test_poison_records_are_isolated_and_every_other_record_passes(size: int, poison: set[int]) -> None:
    stage, waits = _Stage(poison), []
    out = _containment(waits).run("sink", list(range(size)), stage, stage.probe)
    assert sorted(item for item, _ in out.poison) == sorted(poison)
    assert sorted(item for item, _ in out.results) == sorted(set(range(size)) - poison)
    assert all(result == item * 10 for item, result in out.results)
    assert all(isinstance(error, ValueError) for _, error in out.poison)
    assert waits == []  # the stage was up all along: nothing waited


def test_a_transient_failure_is_retried_not_bisected() -> None:
    stage, waits = _Stage(flaky=2), []
    out = _containment(waits).run("sink", list(range(8)), stage, stage.probe)
    assert [item for item, _ in out.results] == list(range(8)) and out.poison == []
    assert stage.calls == 3


def test_a_stage_that_is_down_is_waited_out_and_nothing_is_dead_lettered() -> None:
    stage, waits = _Stage(), []
    stage.down = True

    def recover() -> None:
        stage.down = False

    out = _containment(waits, on_wait=recover).run("history", list(range(5)), stage, stage.probe)
    assert waits == ["history"]
    assert [item for item, _ in out.results] == list(range(5)) and out.poison == []


def test_stopping_during_a_wait_leaves_the_batch_unhandled() -> None:
    stage = _Stage()
    stage.down = True

    def wait(stage_name: str, probe: Callable[[], None], error: BaseException) -> None:
        raise Stopping

    with pytest.raises(Stopping):
        Containment(wait, sleep=lambda _: None).run("history", [1, 2], stage, stage.probe)


def test_without_a_probe_a_failure_is_the_records_own() -> None:
    stage, waits = _Stage(poison={2}), []
    out = _containment(waits).run("model", [1, 2, 3], stage, retries=0)
    assert [item for item, _ in out.poison] == [2] and waits == []
