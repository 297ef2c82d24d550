"""The learner keeps its place in the consumer group, and one bad label never stops the labels stream.

On the real broker with real DuckDB files: a training that outlasts `max.poll.interval.ms` while labels keep
arriving; a label whose handling raises, and real inputs that used to raise; a label store that is locked; a
training that fails and is retried. Training is stood in for by `copy_champion` (the champion's files as the
next version, scored the same, so the gate rejects it): what is under test is the threading, not the model.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from finpulse.config import AppConfig
from finpulse.learn import Learner, Outcome
from learner.adapters import AdapterStore
from learner.config import ContinualConfig, ModelConfig
from learner.gate import SliceScore
from learner.labels import Task
from learner.trainer import Candidate, ExperienceSlices
from storage import History, StorageConfig
from storage.labels import LabelRow, LabelStore
from stream.admin import ensure_topics
from stream.config import TopicNames
from stream.labels import LabelConsumer, label_value, parse_label
from stream.messages import Invalid, Reason

AT = "2026-11-30T09:00:00Z"
SENTIMENTS = ("negative", "neutral", "positive")
# Small enough that a training outlasts it by far in a short test; the broker's minimum session is 6 s.
MAX_POLL_MS = 6000


# --- the label contract: inputs that used to raise are refused with a reason ---------------------------------


def _escaped(label_id: str, text: str, labelled_at: str = AT, **extra: str) -> bytes:
    """Encode a label with every non-ASCII character escaped, as `\\ud800` for a lone surrogate."""
    return json.dumps(
        {"id": label_id, "text": text, "labelled_at": labelled_at, "sentiment": "neutral", **extra}
    ).encode()


@pytest.mark.parametrize(
    ("value", "reason", "fragment"),
    [
        (_escaped("a\ud800", "t"), Reason.BAD_CHARACTERS, "'id' holds a lone UTF-16 surrogate"),
        (_escaped("a", "Oil \udfff slides"), Reason.BAD_CHARACTERS, "'text' holds a lone UTF-16 surrogate"),
        (_escaped("a", "t", labeller="ana\ud800"), Reason.BAD_CHARACTERS, "'labeller' holds a lone UTF-16 surrogate"),
        (_escaped("a\x00b", "t"), Reason.BAD_CHARACTERS, "'id' holds the control character U+0000"),
        (_escaped("a", "t", labeller="ana\x00"), Reason.BAD_CHARACTERS, "'labeller' holds the control character"),
        (_escaped("a", "Oil\x00slides"), Reason.BAD_CHARACTERS, "'text' holds the control character U+0000"),
        (b"[" * 100_000 + b"]" * 100_000, Reason.INVALID_JSON, "nested too deeply"),
        (_escaped("a", "t", "2026-11-30T09:00:00\ud800"), Reason.BAD_TIMESTAMP, "\\ud800"),
        (_escaped("a", "t", "0001-01-01T00:00:00+05:00"), Reason.BAD_TIMESTAMP, "0001"),
    ],
)
def test_labels_that_used_to_raise_are_refused_with_a_reason(value: bytes, reason: Reason, fragment: str) -> None:
    parsed = parse_label(value, 8192)
    assert isinstance(parsed, Invalid)
    assert parsed.reason == reason
    assert fragment in parsed.detail
    parsed.detail.encode("utf-8")  # the dead letter carries it as UTF-8


def test_tabs_and_line_breaks_in_a_text_are_kept() -> None:
    parsed = parse_label(label_value("a", "Oil slides\n\tagain\r\n", AT, sentiment="negative"), 8192)
    assert isinstance(parsed, LabelRow) and parsed.text == "Oil slides\n\tagain\r\n"


# --- helpers on the real broker -------------------------------------------------------------------------------


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicNames:
    tag = uuid.uuid4().hex[:8]
    names = TopicNames(
        raw=f"p-{tag}.raw",
        scored=f"p-{tag}.scored",
        labels=f"p-{tag}.labels",
        dlq=f"p-{tag}.dlq",
        updates=f"p-{tag}.up",
    )
    # One partition: the order of records, and so of dead letters, is the order they were sent in.
    ensure_topics(kafka_bootstrap, [names.labels, names.dlq, names.updates], 1)
    return names


@pytest.fixture
def adapters(adapters_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapters"
    shutil.copytree(adapters_dir, copy)
    return copy


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    actions: list[Callable[[], None]] = []
    yield actions
    for action in reversed(actions):  # a failed test must not leave threads or members behind
        action()


def _config(kafka_bootstrap: str, topics: TopicNames, adapters: Path, tmp_path: Path, **learner: Any) -> AppConfig:
    return AppConfig.model_validate(
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap, "topics": topics.model_dump()},
            "model": {"adapters_dir": str(adapters)},
            "storage": {"duckdb_path": str(tmp_path / "finpulse.duckdb")},
            # An experience of ten labels; experience 0 small, so its DuckDB rows cost nothing.
            "learner": {"min_labels": 10, "trigger_labels": 10, "replay_size": 30, "poll_s": 0.2, **learner},
        }
    )


def _labels(prefix: str, n: int) -> list[bytes]:
    return [label_value(f"{prefix}-{i}", f"headline {prefix} {i}", AT, sentiment=SENTIMENTS[i % 3]) for i in range(n)]


def _send(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2**20 + 1024)
    for i, value in enumerate(values):
        producer.send(topic, key=f"k-{i}".encode(), value=value)
    producer.flush()
    producer.close()


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Committed:
    """Read a group's committed offset on partition 0 of a topic, without joining the group."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        self.tp = TopicPartition(topic, 0)

    def __call__(self) -> int:
        return int(self.consumer.committed(self.tp) or 0)

    def close(self) -> None:
        self.consumer.close()


def _dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning()
    end = consumer.end_offsets([tp])[tp]
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while consumer.position(tp) < end and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            found.extend(json.loads(r.value) for r in batch)
    consumer.close()
    return found


def copy_champion(
    task: Task,
    adapters: AdapterStore,
    champion: str,
    new: ExperienceSlices,
    earlier: Sequence[ExperienceSlices],
    config: ContinualConfig,
    model_config: ModelConfig,
    seed_memory: Sequence[tuple[str, str]] = (),
    show_progress: bool = False,
) -> Candidate:
    """Stand in for training: the champion's files become the next version, scored the same as the champion."""
    version = adapters.next_version(task)
    staging = adapters.staging_dir(task, version)
    shutil.copytree(adapters.version_dir(task, champion), staging, dirs_exist_ok=True)
    path = adapters.commit_staged(task, version)
    return Candidate(
        version=version,
        parent=champion,
        path=path,
        new=SliceScore(new.id, len(new.holdout), 0.5, 0.5),
        earlier=[SliceScore(s.id, len(s.holdout), 0.9, 0.9) for s in earlier],
        train_s=0.0,
        steps=0,
        out_of_time=False,
    )


def _messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


# --- the learner polls while it trains ------------------------------------------------------------------------


@pytest.mark.kafka
def test_a_training_longer_than_the_poll_interval_keeps_the_member_and_stores_labels_meanwhile(
    kafka_bootstrap: str,
    topics: TopicNames,
    adapters: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger="kafka")
    group = f"learner-{uuid.uuid4().hex[:8]}"
    config = _config(kafka_bootstrap, topics, adapters, tmp_path)
    training, release, trained = threading.Event(), threading.Event(), threading.Event()
    spans: list[float] = []

    def slow_training(*args: Any, **kwargs: Any) -> Candidate:
        training.set()
        started = time.monotonic()
        release.wait(120)  # the test looks at the stream while this "trains"
        # However quick the checks were, the training outlasts max.poll.interval twice over.
        time.sleep(max(0.0, started + 2.5 * MAX_POLL_MS / 1000 - time.monotonic()))
        spans.append(time.monotonic() - started)
        trained.set()
        return copy_champion(*args, **kwargs)

    learner = Learner(
        config,
        kafka_bootstrap,
        CollectorRegistry(),
        tasks=("sentiment",),
        group_id=group,
        max_poll_interval_ms=MAX_POLL_MS,
        train=slow_training,
    )
    cleanup.append(learner.close)
    committed = Committed(kafka_bootstrap, group, topics.labels)
    cleanup.append(committed.close)
    _send(kafka_bootstrap, topics.labels, _labels("first", 12))
    stop = threading.Event()
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            learner.run(stop, on_outcome=outcomes.append)
        except BaseException as e:  # reported below
            errors.append(e)

    runner = threading.Thread(target=run, name="learner-run", daemon=True)
    cleanup.append(lambda: (release.set(), stop.set(), runner.join(60)))
    runner.start()
    _wait(training.is_set, 120, "the learner to form an experience and start training")
    labels = LabelStore(History(config.storage))
    assert labels.pending_count("sentiment") == 0  # the experience took all twelve

    # Labels that arrive while it trains are stored and committed while it trains.
    _send(kafka_bootstrap, topics.labels, _labels("late", 3))
    _wait(lambda: labels.pending_count("sentiment") == 3 and committed() == 15, 60, "the late labels stored")
    assert not trained.is_set()
    release.set()
    _wait(lambda: bool(outcomes), 120, "the training to decide")
    stop.set()
    runner.join(60)
    assert not runner.is_alive() and errors == []

    assert spans and spans[0] > 2 * MAX_POLL_MS / 1000
    assert len(outcomes) == 1 and not outcomes[0].promoted and outcomes[0].version == "sentiment-v2"
    assert labels.pending_count("sentiment") == 3  # the next experience's
    assert _messages(caplog, "Consumer poll timeout has expired") == []
    assert len(_messages(caplog, f"Successfully joined group {group}")) == 1  # once, at the start
    assert _messages(caplog, f"Group {group} is rebalancing") == []
    assert committed() == 15


@pytest.mark.kafka
def test_a_failing_training_is_logged_and_retried_later_while_the_learner_runs_on(
    kafka_bootstrap: str,
    topics: TopicNames,
    adapters: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger="finpulse")
    config = _config(kafka_bootstrap, topics, adapters, tmp_path, retry_s=1.0)
    calls: list[float] = []

    def flaky_training(*args: Any, **kwargs: Any) -> Candidate:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("out of memory in the feature bank")
        return copy_champion(*args, **kwargs)

    group = f"learner-{uuid.uuid4().hex[:8]}"
    learner = Learner(
        config, kafka_bootstrap, CollectorRegistry(), tasks=("sentiment",), group_id=group, train=flaky_training
    )
    cleanup.append(learner.close)
    _send(kafka_bootstrap, topics.labels, _labels("first", 12))
    stop = threading.Event()
    outcomes: list[Outcome] = []
    runner = threading.Thread(
        target=lambda: learner.run(stop, on_outcome=outcomes.append), name="learner-run", daemon=True
    )
    cleanup.append(lambda: (stop.set(), runner.join(60)))
    runner.start()
    _wait(lambda: bool(outcomes), 120, "the retried training to decide")
    stop.set()
    runner.join(60)
    assert not runner.is_alive()

    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0  # retried after the backoff, not in a hot loop
    failed = _messages(caplog, "event=training_failed")
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and failed[0].exc_info is not None
    assert "task=sentiment failures=1 error_type=RuntimeError error='out of memory" in failed[0].getMessage()
    assert len(_messages(caplog, "event=training_recovered task=sentiment failures=1")) == 1
    # The experience the failed try formed is the one trained by the retry.
    experiences = LabelStore(History(config.storage)).experiences("sentiment")
    assert [e.status for e in experiences] == ["trained", "trained"]
    assert outcomes[0].experience == experiences[-1].id and not outcomes[0].promoted


# --- the label consumer contains one record and retries a batch -----------------------------------------------


def _consumer(kafka_bootstrap: str, topics: TopicNames, store: LabelStore, group: str, **kwargs: Any) -> LabelConsumer:
    return LabelConsumer(kafka_bootstrap, topics, group, store, 8192, max_poll_interval_ms=MAX_POLL_MS, **kwargs)


@pytest.mark.kafka
def test_a_label_whose_handling_raises_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap: str, topics: TopicNames, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    def parse(value: bytes | None, max_text_bytes: int) -> LabelRow | Invalid:
        parsed = parse_label(value, max_text_bytes)
        if isinstance(parsed, LabelRow) and parsed.id == "boom":
            raise ValueError("the row builder broke on 'boom\ud800'")  # a message UTF-8 cannot carry as is
        if isinstance(parsed, LabelRow) and parsed.id == "unstorable":
            return replace(parsed, text="Oil \ud800")  # a row that DuckDB's client refuses (RuntimeError)
        return parsed

    store = LabelStore(History(StorageConfig(duckdb_path=tmp_path / "labels.duckdb")))
    group = f"labels-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(kafka_bootstrap, topics, store, group, parse=parse)
    cleanup.append(consumer.close)
    # Real inputs that raised before, between good labels; the last bad one's dead letter outgrows a message.
    values = [
        label_value("good-1", "Oil slides", AT, sentiment="negative"),
        label_value("boom", "Fed holds", AT, sentiment="neutral"),
        _escaped("a\ud800", "t"),
        label_value("nul\x00id", "t", AT, sentiment="neutral"),
        b"[" * 100_000 + b"]" * 100_000,
        b"\x01" * 300_000,  # not JSON; escaped into its dead letter it would take 1.5 MB
        label_value("unstorable", "Oil slides", AT, sentiment="negative"),
        label_value("good-2", "Chips rally", AT, sentiment="positive"),
    ]
    _send(kafka_bootstrap, topics.labels, values)
    totals = {"consumed": 0, "stored": 0, "dead_lettered": 0}

    def drained() -> bool:
        batch = consumer.poll(0.5)
        for key in totals:
            totals[key] += getattr(batch, key)
        return totals["consumed"] >= len(values)

    _wait(drained, 60, "every label to be handled")
    assert totals == {"consumed": 8, "stored": 2, "dead_lettered": 6}
    assert not consumer.retrying
    assert sorted(r.id for r in store.pending("sentiment")) == ["good-1", "good-2"]
    letters = _dead_letters(kafka_bootstrap, topics.dlq)
    assert [(d["offset"], d["reason"]) for d in letters] == [
        (1, "unprocessable"),
        (2, "bad_characters"),
        (3, "bad_characters"),
        (4, "invalid_json"),
        (5, "invalid_json"),
        (6, "unprocessable"),  # found by storing the batch's rows one by one
    ]
    assert letters[0]["error"] == "unprocessable: ValueError: the row builder broke on 'boom\ud800'"
    assert letters[0]["raw"] == values[1].decode()
    # 300 KB of control bytes would escape to 1.8 MB of JSON: the dead letter keeps the first 256 KiB as base64.
    assert letters[4]["raw_encoding"] == "base64" and letters[4]["raw_truncated"] is True
    assert base64.b64decode(letters[4]["raw"]) == values[5][: 256 * 1024]
    assert letters[5]["error"].startswith("unprocessable: RuntimeError: ")
    committed = Committed(kafka_bootstrap, group, topics.labels)
    cleanup.append(committed.close)
    assert committed() == 8


@pytest.mark.kafka
def test_a_batch_the_store_cannot_take_is_not_committed_and_is_stored_once_the_store_is_back(
    kafka_bootstrap: str,
    topics: TopicNames,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    path = tmp_path / "labels.duckdb"
    store = LabelStore(History(StorageConfig(duckdb_path=path, lock_timeout_s=0.3)))
    group = f"labels-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(kafka_bootstrap, topics, store, group)
    cleanup.append(consumer.close)
    committed = Committed(kafka_bootstrap, group, topics.labels)
    cleanup.append(committed.close)
    # Another unit of work holds the file (an analyst's long query would, from another process).
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with History(StorageConfig(duckdb_path=path)).transaction("holding the file"):
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold, name="holder", daemon=True)
    cleanup.append(lambda: (release.set(), holder.join(30)))
    holder.start()
    assert held.wait(30)
    _send(kafka_bootstrap, topics.labels, _labels("late", 3))
    stored: list[int] = []

    def poll() -> bool:
        stored.append(consumer.poll(0.3).stored)
        return sum(stored) == 3

    _wait(lambda: poll() or consumer.retrying, 60, "the batch to fail")
    assert sum(stored) == 0 and committed() == 0  # not stored, not committed
    for _ in range(5):  # the retries fail too, quietly, and the member polls on
        poll()
    assert consumer.retrying and committed() == 0
    release.set()
    holder.join(30)
    _wait(poll, 60, "the batch to be stored once the file is free")
    assert not consumer.retrying
    assert committed() == 3
    assert sorted(r.id for r in store.pending("sentiment")) == ["late-0", "late-1", "late-2"]
    failing = [r for r in _messages(caplog, "event=label_batch_failing") if r.levelno >= logging.WARNING]
    assert len(failing) == 1 and "error_type=StoreLockedError" in failing[0].getMessage()
    assert len(_messages(caplog, "event=label_batch_recovered")) == 1
