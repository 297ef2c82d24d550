"""`finpulse bench faults` at its smoke-test size: every figure is there, and nothing valid is lost or doubled.

Whether the scorers crash or dead-letter every catalogue kind as expected is what the benchmark measures, not
what this test asserts; the catalogue itself is checked here without a broker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finpulse import faults
from finpulse.badinput import Case, cases, valid_message
from finpulse.config import AppConfig
from stream.messages import parse_news

KEYS = {
    "bad_input_kinds",
    "dead_lettered",
    "scored",
    "mismatched",
    "crashes",
    "lost",
    "duplicated_rows",
    "kill_failover_s",
    "kill_failover_each_s",
    "broker_restart_recovery_s",
    "learner_kills",
    "registry_consistent",
    "wall_s",
}


def _ids(catalogue: list[Case]) -> Iterator[str]:
    """Yield the non-blank string ids of the cases whose value parses."""
    for case in catalogue:
        try:
            payload = json.loads(case.value) if case.value else None
        except (ValueError, RecursionError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("id"), str) and payload["id"].strip():
            yield payload["id"]


def test_the_catalogue_has_distinct_kinds_unique_ids_and_both_outcomes() -> None:
    catalogue = cases("r1")
    assert len(catalogue) >= 70
    assert len({c.kind for c in catalogue}) == len(catalogue)
    assert all(isinstance(c, Case) and c.expect in ("dead_letter", "scored") for c in catalogue)
    assert sum(c.expect == "scored" for c in catalogue) >= 15
    # Every id embeds the run id and is unique in its run, so no two cases or runs share a row.
    ids = list(_ids(catalogue))
    assert len(ids) > 100 and len(set(ids)) == len(ids)
    assert all("r1" in i for i in ids)
    assert set(_ids(cases("r2"))).isdisjoint(ids)
    for kind in ("tombstone", "nested_arrays_100k", "surrogate_d800_in_text", "published_at_year_1_overflow"):
        assert kind in {c.kind for c in catalogue}


def test_every_case_fits_in_one_kafka_message() -> None:
    # The broker's default message.max.bytes is 1 MiB; the dead letter wraps the value in a small envelope.
    assert max(len(c.value or b"") for c in cases("r1")) < 1_040_000


def test_valid_messages_are_valid() -> None:
    item = parse_news(valid_message("v-1", "Oil slides"), 8192)
    assert not hasattr(item, "reason"), item
    assert json.loads(valid_message("v-2", "Öl fällt"))["id"] == "v-2"


def test_the_median_counts_a_timeout_as_the_slowest() -> None:
    assert faults._median([3.0, 1.0, 2.0]) == 2.0
    assert faults._median([1.0, None, 2.0]) == 2.0
    assert faults._median([1.0, None, None]) is None
    assert faults._median([]) is None


def test_a_crash_reason_is_the_last_exception_line(tmp_path: Path) -> None:
    log = tmp_path / "scorer.log"
    log.write_text("scoring x\nTraceback (most recent call last):\n  File ...\nRecursionError: too deep\n")
    assert faults.crash_reason(log, 1) == "RecursionError: too deep"
    log.write_text("nothing useful\n")
    assert faults.crash_reason(log, -9) == "signal 9"


def test_a_process_that_exits_by_itself_is_a_crash_and_is_restarted(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('ValueError: poison'); sys.exit(3)"]
    pool = faults.ScorerPool("t", command, dict(os.environ), tmp_path, faults.Reporter())
    try:
        pool.spawn()
        assert faults.wait_until(lambda: len(pool.crashes) >= 2, 30) is not None  # restarted, crashed again
    finally:
        pool.close()
    assert {(c.returncode, c.reason) for c in pool.crashes} == {(3, "ValueError: poison")}


def test_a_killed_or_stopped_process_is_no_crash(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    pool = faults.ScorerPool("t", command, dict(os.environ), tmp_path, faults.Reporter())
    try:
        pool.kill(pool.spawn())
        pool.spawn()
        time.sleep(1.5)  # three watchdog rounds
    finally:
        pool.close()
    assert pool.crashes == []
    assert pool.oldest() is None


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_run_reports_every_figure_and_loses_nothing(tmp_path: Path, adapters_dir: Path) -> None:
    # Its own broker (the broker restart stops it, which the session broker of other tests must not suffer).
    config = AppConfig.model_validate(
        {
            "kafka": {"bootstrap_servers": "", "data_dir": str(tmp_path / "unused-kafka")},
            "model": {"adapters_dir": str(adapters_dir)},
            "storage": {"duckdb_path": str(tmp_path / "unused.duckdb")},
        }
    )
    result = faults.run_faults(config, faults.FaultSettings.of(quick=True), workdir=tmp_path / "work")

    assert not KEYS - result.keys(), KEYS - result.keys()
    json.dumps(result)  # one JSON line, as printed by `--json`
    assert result["quick"] is True
    assert result["bad_input_kinds"] == sum(c.expect == "dead_letter" for c in cases("x"))
    assert result["kills"] == 2 and len(result["kill_failover_each_s"]) == 2
    assert result["learner_kills"] == 0 and result["registry_consistent"] is None
    assert result["valid_produced"] > 0
    assert result["lost"] == 0, result["lost_sample"]
    assert result["duplicated_rows"] == 0
