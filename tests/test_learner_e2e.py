"""The learner end to end on the real broker: labels in, a gated version out, scorers switching mid-stream.

Real parts throughout: the local Kafka broker, the packaged MiniLM with the shipped adapters, avalanche training,
DuckDB files. Each test trains one or two real candidates on the CPU (~30-90 s each).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from finpulse.config import AppConfig
from finpulse.learn import Learner
from finpulse.replay import ReplayProducer, labelled_stream, news_messages
from learner.adapters import AdapterStore
from learner.datasets import stock_tweets, tfns_sentiment
from learner.labels import SENTIMENTS
from learner.model import Classifier
from learner.registry import Registry
from monitor.metrics import ScorerMetrics
from storage import History, StorageConfig
from storage.labels import LabelStore
from storage.models import ModelVersionStore
from stream.admin import ensure_topics
from stream.config import ScorerConfig, TopicNames
from stream.labels import label_value
from stream.scorer import Scorer, ScorerStats

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(1200)]  # real training, 1-4 min each

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicNames:
    tag = uuid.uuid4().hex[:8]
    names = TopicNames(
        raw=f"l-{tag}.raw",
        scored=f"l-{tag}.scored",
        labels=f"l-{tag}.labels",
        dlq=f"l-{tag}.dlq",
        updates=f"l-{tag}.up",
    )
    ensure_topics(kafka_bootstrap, [names.raw, names.scored, names.labels, names.dlq, names.updates], 3)
    return names


@pytest.fixture
def adapters(adapters_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapters"
    shutil.copytree(adapters_dir, copy)
    return copy


# Learning the 2020 stock-market tweets costs the shipped champion 2.5-5 points on its own domain (TFNS
# tweets, experience 0) whatever the regularisation (measured: replay, EWC up to lambda 1e4, distillation,
# lower learning rates, 1-6 trainable layers; the spread is run-to-run): their labelling conventions differ.
# With the default 1-point margin the gate rejects that trade, as it should; this desk accepts up to 8 points
# on the old domain for the 10-14 it gains on the stream it actually watches.
MARGIN = 0.08


def _config(kafka_bootstrap: str, topics: TopicNames, adapters: Path, tmp_path: Path) -> AppConfig:
    return AppConfig.model_validate(
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap, "topics": topics.model_dump()},
            "model": {"adapters_dir": str(adapters)},
            "storage": {"duckdb_path": str(tmp_path / "finpulse.duckdb")},
            "learner": {"max_forgetting": MARGIN},
        }
    )


def _send_labels(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i, value in enumerate(values):
        producer.send(topic, key=f"label-{i}".encode(), value=value)
    producer.flush()
    producer.close()


def _stock_labels(n: int) -> list[bytes]:
    """The first `n` analyst-labelled stock-market tweets of 2020: a domain the shipped champion knows poorly."""
    tweets = [t for t in stock_tweets(labelled_only=True)][:n]
    return [
        label_value(t.id, t.text, t.published_at.isoformat(), sentiment=t.sentiment, labeller="desk") for t in tweets
    ]


def _noisy_labels(n: int, flipped: float, seed: int = 7) -> tuple[list[bytes], int]:
    """Tweets of the champion's own domain with a share of labels flipped to another class."""
    rng = random.Random(seed)
    examples = tfns_sentiment("train")[-n:]
    values, flips = [], 0
    for i, e in enumerate(examples):
        label = e.label
        if rng.random() < flipped:
            label = rng.choice([s for s in SENTIMENTS if s != e.label])
            flips += 1
        values.append(label_value(f"noisy-{i}", e.text, f"2026-11-30T08:{i // 60:02d}:{i % 60:02d}Z", sentiment=label))
    return values, flips


def _dead_letters(bootstrap: str, topic: str) -> list[dict[str, object]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(partitions)
    found: list[dict[str, object]] = []
    deadline = time.monotonic() + 20
    while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            found.extend(json.loads(r.value) for r in batch)
    consumer.close()
    return found


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class ScorerThread(threading.Thread):
    """One scorer, run once until halted; `error` says if it stopped by itself."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__(name="scorer", daemon=True)
        self.scorer = scorer
        self.halt = threading.Event()
        self.stats: ScorerStats | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.stats = self.scorer.run(self.halt)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    actions: list[Callable[[], None]] = []
    yield actions
    for action in reversed(actions):  # a failed test must not leave threads running into the next one
        action()


def test_labels_become_a_promoted_version_that_scorers_switch_to_mid_stream_and_noise_is_rejected(
    kafka_bootstrap: str, topics: TopicNames, adapters: Path, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    config = _config(kafka_bootstrap, topics, adapters, tmp_path)
    # A scorer serving the shipped champions, on its own history file so the learner's DuckDB work and the
    # scorer's writes are checked independently; only model.updates may make it swap (no periodic check).
    scorer_config = ScorerConfig(
        group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=64, max_wait_ms=100, champion_check_s=0
    )
    classifier = Classifier.from_store(config.model, "cpu")
    history = History(StorageConfig(duckdb_path=tmp_path / "scored.duckdb"))
    history.ensure_schema()
    metrics = ScorerMetrics()
    scorer = ScorerThread(
        Scorer(kafka_bootstrap, topics, scorer_config, classifier, history, metrics, model_config=config.model)
    )
    items = labelled_stream(2600)  # ~7 min at 6/s: outlasts two trainings on a busy machine; stopped below
    producer = ReplayProducer(kafka_bootstrap, topics.raw, news_messages(items), rate=6)  # outlasts two trainings
    cleanup.append(lambda: (producer.stop(), scorer.halt.set(), scorer.join(30), scorer.scorer.close()))
    scorer.start()
    producer.start()
    _wait(lambda: history.count() >= 30, 60, "the scorer to start scoring")

    # Analysts label 400 stock-market tweets; two labels are malformed.
    bad = [b"{not json", label_value("x-1", "Oil slides", "2026-11-30T09:00:00Z", sentiment="bearish")]
    _send_labels(kafka_bootstrap, topics.labels, _stock_labels(400) + bad)
    registry = CollectorRegistry()
    learner = Learner(config, kafka_bootstrap, registry, tasks=("sentiment",))
    cleanup.append(learner.close)
    outcomes = learner.run(threading.Event(), now=True, once=True)

    assert len(outcomes) == 1, outcomes
    first = outcomes[0]
    assert first.promoted, first.reason
    assert first.version == "sentiment-v2"
    assert first.candidate.new.delta > 0.05  # the new domain is learnt
    assert all(s.delta >= -MARGIN for s in first.candidate.earlier)  # and the old one kept, within the margin
    store = AdapterStore(adapters)
    assert store.champion("sentiment") == "sentiment-v2"
    versions = ModelVersionStore(History(config.storage))
    champion = versions.champion("sentiment")
    assert champion is not None and champion.version == "sentiment-v2" and champion.parent == "sentiment-v1"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "model_card.json",
        "replay.json",
        "ewc.safetensors",
    ):
        assert (store.version_dir("sentiment", "sentiment-v2") / name).is_file(), name
    labels = LabelStore(History(config.storage))
    assert labels.pending_count("sentiment") == 0
    assert History(config.storage).query("SELECT count(*) FROM labels").rows == [(400,)]
    letters = _dead_letters(kafka_bootstrap, topics.dlq)
    assert sorted(str(d["reason"]) for d in letters) == ["invalid_json", "unknown_label"]
    assert (
        registry.get_sample_value(
            "finpulse_model_versions_total", {"task": "sentiment", "domain": "default", "outcome": "promoted"}
        )
        == 1
    )
    assert registry.get_sample_value("finpulse_learner_labels_total", {"outcome": "dead_lettered"}) == 2

    # The running scorer switches between batches, without a restart.
    swaps = {"task": "sentiment", "domain": "default"}
    _wait(lambda: metrics.registry.get_sample_value("finpulse_model_swaps_total", swaps) == 1, 60, "the swap")
    scored_before = history.count()
    _wait(lambda: history.count() >= scored_before + 30, 60, "rows scored by the new version")

    # A noisy experience (30% of labels flipped) must not be promoted; the champion keeps serving.
    noisy, flips = _noisy_labels(300, 0.3)
    assert 70 <= flips <= 110
    _send_labels(kafka_bootstrap, topics.labels, noisy)
    second = learner.run(threading.Event(), now=True, once=True)
    assert len(second) == 1 and not second[0].promoted, second
    assert store.champion("sentiment") == "sentiment-v2"
    rejected = versions.get(second[0].version)
    assert rejected is not None and rejected.status == "rejected" and rejected.reason == second[0].reason
    assert (
        registry.get_sample_value(
            "finpulse_model_versions_total", {"task": "sentiment", "domain": "default", "outcome": "rejected"}
        )
        == 1
    )

    # Stop the stream and account for every message: one row each, named by the version that scored it.
    producer.stop()
    producer.join(30)
    sent = producer.sent
    _wait(lambda: history.count() >= sent, 90, "every produced message to be scored")
    time.sleep(1)
    scorer.halt.set()
    scorer.join(30)
    assert scorer.error is None
    assert metrics.registry.get_sample_value("finpulse_model_swaps_total", swaps) == 1  # the noise never swapped
    rows = history.query(
        "SELECT sentiment_version, kafka_partition, kafka_offset FROM news ORDER BY kafka_partition, kafka_offset"
    ).rows
    assert len(rows) == sent == len({r[0] for r in history.query("SELECT id FROM news").rows})
    assert {r[0] for r in rows} == {"sentiment-v1", "sentiment-v2"}
    for partition in {r[1] for r in rows}:
        order = [r[0] for r in rows if r[1] == partition]
        # Within a partition, once v2 scored a message, v1 never scores a later one.
        assert order == sorted(order), f"partition {partition} went back to v1"


def test_killing_the_learner_mid_training_leaves_the_registry_consistent_and_the_next_run_finishes(
    kafka_bootstrap: str, topics: TopicNames, adapters: Path, tmp_path: Path
) -> None:
    config = _config(kafka_bootstrap, topics, adapters, tmp_path)
    _send_labels(kafka_bootstrap, topics.labels, _stock_labels(300))
    env = {
        **os.environ,
        "FINPULSE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "FINPULSE_KAFKA__TOPICS__LABELS": topics.labels,
        "FINPULSE_KAFKA__TOPICS__DLQ": topics.dlq,
        "FINPULSE_KAFKA__TOPICS__UPDATES": topics.updates,
        "FINPULSE_KAFKA__TOPICS__RAW": topics.raw,
        "FINPULSE_KAFKA__TOPICS__SCORED": topics.scored,
        "FINPULSE_MODEL__ADAPTERS_DIR": str(adapters),
        "FINPULSE_STORAGE__DUCKDB_PATH": str(config.storage.duckdb_path),
        "FINPULSE_METRICS__PORT": "0",
        "FINPULSE_LEARNER__MAX_FORGETTING": str(MARGIN),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "finpulse.cli", "learn", "--once", "--now", "--task", "sentiment", "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        labels = LabelStore(History(config.storage))

        def training() -> bool:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                return any(e.status == "open" for e in labels.experiences("sentiment"))
            except Exception:  # the file may not exist yet, or be mid-migration
                return False

        _wait(training, 120, "the learner to form an experience and start training")
        time.sleep(6)  # well inside loading the champion + training (~40 s here)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stderr is not None:
            process.stderr.close()

    store = AdapterStore(adapters)
    versions = ModelVersionStore(History(config.storage))
    assert store.champion("sentiment") == "sentiment-v1"  # still serving
    assert store.versions("sentiment") == ["sentiment-v1"]  # nothing half-written counts as a version
    registry = Registry(store, versions)
    assert registry.sync() == []  # DuckDB already agrees with the files
    champion = versions.champion("sentiment")
    assert champion is not None and champion.version == "sentiment-v1"
    open_experiences = labels.experiences("sentiment", status="open")
    assert len(open_experiences) == 1

    # The next run resumes the open experience; labels were committed before the kill, so none is lost.
    learner = Learner(config, kafka_bootstrap, CollectorRegistry(), tasks=("sentiment",))
    try:
        outcomes = learner.run(threading.Event(), once=True)
    finally:
        learner.close()
    assert [o.experience for o in outcomes] == [open_experiences[0].id]
    assert labels.experiences("sentiment", status="open") == []
    assert History(config.storage).query("SELECT count(*) FROM labels").rows == [(300,)]
    assert not [p for p in (adapters / "sentiment").iterdir() if p.name.startswith(".tmp-")]
    row = versions.get(outcomes[0].version)
    assert row is not None and row.status == ("champion" if outcomes[0].promoted else "rejected")
    assert store.champion("sentiment") == (outcomes[0].version if outcomes[0].promoted else "sentiment-v1")
