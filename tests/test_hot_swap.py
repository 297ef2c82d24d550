"""Hot swap of adapter versions: the model.updates contract, the swapper's rules, and running scorers on the broker."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from finpulse.replay import ReplayProducer, labelled_stream, news_messages
from learner.adapters import CARD_FILE, AdapterStore
from learner.config import ModelConfig
from learner.datasets import stock_tweets
from learner.errors import ModelLoadError
from learner.labels import TASKS, Task
from learner.model import Classifier
from learner.torch_engine import TaskModel
from monitor.metrics import ScorerMetrics
from storage import History, StorageConfig
from stream.admin import ensure_topics
from stream.config import KafkaConfig, ScorerConfig, TopicNames
from stream.errors import StreamError
from stream.scorer import Scorer, ScorerStats
from stream.updates import (
    ModelSwapper,
    ModelUpdate,
    SwapMetrics,
    UpdateError,
    UpdateListener,
    UpdatePublisher,
    parse_update,
    update_value,
)

AT = "2026-12-01T10:00:00+00:00"


# -- the message contract --------------------------------------------------------------------------------------


def test_update_value_round_trips() -> None:
    update = parse_update(update_value("sentiment", "sentiment-v3", "promoted", "sentiment-v2"))
    assert (update.task, update.version, update.event, update.previous) == (
        "sentiment",
        "sentiment-v3",
        "promoted",
        "sentiment-v2",
    )
    assert update.at.tzinfo is not None
    first = parse_update(update_value("topic", "topic-v1", "manual", None))
    assert first.previous is None
    # A newer publisher may add keys; older scorers ignore them.
    extra = {"task": "topic", "version": "topic-v2", "event": "rolled_back", "previous": None, "at": AT, "by": "ci"}
    assert parse_update(json.dumps(extra).encode()).version == "topic-v2"


def _good(**changes: object) -> bytes:
    payload: dict[str, object] = {
        "task": "sentiment",
        "version": "sentiment-v3",
        "event": "promoted",
        "previous": "sentiment-v2",
        "at": AT,
    }
    payload.update(changes)
    return json.dumps({k: v for k, v in payload.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "has no value"),
        (b"\xff\xfe", "is not UTF-8"),
        (b"{not json", "is not JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (_good(task="volatility"), "field 'task'"),
        (_good(version=...), "field 'version': required field is missing"),
        (_good(version="topic-v3"), "field 'version': 'topic-v3' is not a sentiment version; expected sentiment-vN"),
        (_good(version="sentiment-latest"), "field 'version'"),
        (_good(previous="sentiment-2"), "field 'previous'"),
        (_good(previous=...), "field 'previous': required field is missing"),
        (_good(event="deleted"), "field 'event'"),
        (_good(at="yesterday"), "field 'at'"),
        (_good(at="2026-12-01T10:00:00"), "field 'at'"),  # no UTC offset: ambiguous
        (_good(version=3), "field 'version'"),
    ],
)
def test_parse_update_refuses_junk_in_one_line(value: bytes | None, expected: str) -> None:
    with pytest.raises(UpdateError) as caught:
        parse_update(value)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_update_value_refuses_what_parse_update_would() -> None:
    with pytest.raises(UpdateError, match="field 'event'"):
        update_value("sentiment", "sentiment-v2", "promote", None)
    with pytest.raises(UpdateError, match="'topic-v2' is not a sentiment version"):
        update_value("sentiment", "topic-v2", "promoted", None)


# -- the swapper's rules, with a fake loader and no Kafka ---------------------------------------------------------


class FakeListener:
    """Stands in for UpdateListener: hands out the updates queued by the test."""

    def __init__(self) -> None:
        self.queued: list[ModelUpdate] = []
        self.closed = False

    def send(self, task: str, version: str) -> None:
        self.queued.append(parse_update(update_value(task, version, "manual", None)))

    def poll(self) -> list[ModelUpdate]:
        updates, self.queued = self.queued, []
        return updates

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    """Loads instantly, or fails for versions named broken; counts the attempts."""

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, task: Task, version: str) -> TaskModel:
        self.calls.append(version)
        self.gate.wait(10)
        if version in self.broken:
            raise ModelLoadError(f"cannot load adapter {version}: corrupt")
        return _fake_model(task, version)


def _fake_model(task: Task, version: str) -> TaskModel:
    # The swapper only moves models around; it never runs one.
    none = cast(Any, None)
    return TaskModel(task, version, 4, none, none, none, torch.device("cpu"))


def _store(root: Path, versions: dict[Task, list[str]]) -> AdapterStore:
    store = AdapterStore(root)
    for task, names in versions.items():
        for name in names:
            (root / task / name).mkdir(parents=True)
            (root / task / name / "adapter_config.json").write_text("{}")
        store.set_champion(task, names[0])
    return store


def _swapper(
    tmp_path: Path, broken: frozenset[str] = frozenset(), check_s: float = 0
) -> tuple[ModelSwapper, AdapterStore, FakeLoader, FakeListener, CollectorRegistry]:
    store = _store(tmp_path, {"sentiment": ["sentiment-v1", "sentiment-v2", "sentiment-v3"], "topic": ["topic-v1"]})
    models = {task: _fake_model(task, store.champion(task)) for task in TASKS}
    trunk = cast(Any, SimpleNamespace(device=torch.device("cpu"), engine="torch"))
    classifier = Classifier(cast(Any, None), trunk, models, 64)
    loader, listener, registry = FakeLoader(set(broken)), FakeListener(), CollectorRegistry()
    swapper = ModelSwapper(classifier, store, loader, cast(UpdateListener, listener), SwapMetrics(registry), check_s)
    return swapper, store, loader, listener, registry


def _settle(swapper: ModelSwapper, timeout_s: float = 10) -> bool:
    """Call between_batches until the background load finished and was handled; return whether it swapped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if swapper.between_batches():
            return True
        if not swapper._loading:
            return False
        time.sleep(0.01)
    raise AssertionError("the background load did not finish")


def test_swapper_loads_aside_and_swaps_between_batches(tmp_path: Path) -> None:
    swapper, store, loader, listener, registry = _swapper(tmp_path)
    assert not swapper.between_batches() and loader.calls == []  # serving the champion: nothing to load
    assert registry.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 0

    loader.gate.clear()  # the load is slow: batches go on with the old version meanwhile
    store.set_champion("sentiment", "sentiment-v2")
    listener.send("sentiment", "sentiment-v2")
    assert not swapper.between_batches()
    assert swapper.classifier.versions["sentiment"] == "sentiment-v1"
    assert not swapper.between_batches() and loader.calls == ["sentiment-v2"]  # loading once, not per batch
    loader.gate.set()
    assert _settle(swapper)
    assert swapper.classifier.versions == {"sentiment": "sentiment-v2", "topic": "topic-v1"}
    assert registry.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 1
    assert registry.get_sample_value("finpulse_model_swaps_total", {"task": "topic", "domain": "default"}) == 0
    swapper.close()
    assert listener.closed


def test_swapper_does_not_retry_a_broken_version_in_a_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    swapper, store, loader, listener, registry = _swapper(tmp_path, broken=frozenset({"sentiment-v2"}), check_s=0.01)
    store.set_champion("sentiment", "sentiment-v2")
    listener.send("sentiment", "sentiment-v2")
    with caplog.at_level(logging.ERROR, logger="stream.updates"):
        assert not _settle(swapper)
        for _ in range(20):  # many periodic checks later
            time.sleep(0.01)
            swapper.between_batches()
    assert loader.calls == ["sentiment-v2"]
    assert swapper.classifier.versions["sentiment"] == "sentiment-v1"
    assert (
        registry.get_sample_value("finpulse_model_swap_failures_total", {"task": "sentiment", "domain": "default"}) == 1
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "sentiment-v2" in errors[0] and "\n" not in errors[0]

    # Another update naming the same unchanged files does not try again: they would fail the same way.
    listener.send("sentiment", "sentiment-v2")
    assert not _settle(swapper)
    assert loader.calls == ["sentiment-v2"]
    # Once someone rewrites its files, the next check tries it once more (here it still fails).
    (store.version_dir("sentiment", "sentiment-v2") / "adapter_config.json").write_text('{"fixed": true}')
    time.sleep(0.02)
    assert not _settle(swapper)
    assert loader.calls == ["sentiment-v2", "sentiment-v2"]
    assert (
        registry.get_sample_value("finpulse_model_swap_failures_total", {"task": "sentiment", "domain": "default"}) == 2
    )
    # A good version after the broken one is followed as usual.
    store.set_champion("sentiment", "sentiment-v3")
    listener.send("sentiment", "sentiment-v3")
    assert _settle(swapper)
    assert swapper.classifier.versions["sentiment"] == "sentiment-v3"
    swapper.close()


def test_swapper_drops_a_load_the_champion_moved_away_from(tmp_path: Path) -> None:
    swapper, store, loader, listener, registry = _swapper(tmp_path)
    loader.gate.clear()
    store.set_champion("sentiment", "sentiment-v2")
    listener.send("sentiment", "sentiment-v2")
    swapper.between_batches()
    store.set_champion("sentiment", "sentiment-v1")  # rolled back while v2 was loading
    listener.send("sentiment", "sentiment-v1")
    swapper.between_batches()
    loader.gate.set()
    assert not _settle(swapper)
    assert swapper.classifier.versions["sentiment"] == "sentiment-v1"
    assert registry.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 0
    swapper.close()


def test_periodic_check_finds_a_champion_without_a_message(tmp_path: Path) -> None:
    swapper, store, _, _, _ = _swapper(tmp_path, check_s=0.05)
    swapper.between_batches()
    store.set_champion("sentiment", "sentiment-v3")  # the update message was lost
    time.sleep(0.06)
    assert _settle(swapper)
    assert swapper.classifier.versions["sentiment"] == "sentiment-v3"
    swapper.close()


# -- on the real broker -------------------------------------------------------------------------------------------


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicNames:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    names = TopicNames(
        raw=prefix + "raw",
        scored=prefix + "scored",
        labels=prefix + "labels",
        dlq=prefix + "dlq",
        updates=prefix + "updates",
    )
    ensure_topics(kafka_bootstrap, [names.raw, names.scored, names.dlq, names.updates], partitions=3)
    return names


@pytest.fixture
def adapters(tmp_path: Path, adapters_dir: Path) -> Path:
    """A private copy of the shipped adapters, so that tests can add versions and move CHAMPION."""
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir, root)
    return root


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _new_version(store: AdapterStore, task: Task, source: str, version: str) -> Path:
    """Create `version` as a copy of `source`, with its own name in the model card."""
    target = store.version_dir(task, version)
    shutil.copytree(store.version_dir(task, source), target)
    card = json.loads((target / CARD_FILE).read_text())
    card["version"] = version
    card["parent"] = source
    (target / CARD_FILE).write_text(json.dumps(card, indent=2))
    return target


class ScorerThread(threading.Thread):
    """Run one scorer, once, until stopped: if it stopped by itself, `runs` or `error` says so."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__(name="scorer", daemon=True)
        self.scorer = scorer
        self.halt = threading.Event()
        self.runs = 0
        self.stats: ScorerStats | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.runs += 1
        try:
            self.stats = self.scorer.run(self.halt)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def running() -> Iterator[list[tuple[ScorerThread, ReplayProducer]]]:
    started: list[tuple[ScorerThread, ReplayProducer]] = []
    yield started
    for scorer, producer in started:  # a failed test must not leave threads scoring into the next one
        producer.stop()
        scorer.halt.set()
        scorer.join(30)
        scorer.scorer.close()


def _read_scored(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(partitions)
    values: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            values.extend(json.loads(r.value) for r in batch)
    consumer.close()
    return values


def _committed_equals_end(bootstrap: str, topic: str, group: str) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    ends = consumer.end_offsets(partitions)
    ok = all((consumer.committed(tp) or 0) == ends[tp] for tp in partitions)
    consumer.close()
    return ok


def _collect(listener: UpdateListener, count: int) -> list[tuple[str, str]]:
    """Poll until `count` updates came, then a little longer to catch any extra one."""
    seen: list[ModelUpdate] = []

    def enough() -> bool:
        seen.extend(listener.poll())
        return len(seen) >= count

    _wait(enough, 15, f"{count} updates")
    time.sleep(0.5)
    seen.extend(listener.poll())
    return sorted((u.task, u.version) for u in seen)


@pytest.mark.kafka
def test_listener_starts_at_the_end_and_every_listener_sees_every_update(
    kafka_bootstrap: str, topics: TopicNames
) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics)
    with UpdatePublisher(config) as publisher:
        publisher.publish("sentiment", "sentiment-v1", "manual", None)  # before the listeners: not theirs
        first, second = UpdateListener(config), UpdateListener(config)
        try:
            publisher.publish("sentiment", "sentiment-v2", "promoted", "sentiment-v1")
            publisher.publish("topic", "topic-v2", "promoted", "topic-v1")
            # Junk on the topic is skipped, not fatal.
            junk = KafkaProducer(bootstrap_servers=kafka_bootstrap)
            junk.send(topics.updates, key=b"sentiment", value=b"{nope").get(timeout=10)
            junk.close()
            expected = [("sentiment", "sentiment-v2"), ("topic", "topic-v2")]
            assert _collect(first, 2) == expected
            assert _collect(second, 2) == expected  # no group: the first listener took nothing from the second
        finally:
            first.close()
            second.close()


@pytest.mark.kafka
def test_listener_names_a_missing_topic(kafka_bootstrap: str) -> None:
    topics = TopicNames(updates=f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StreamError, match="does not exist on .*fix kafka.topics.updates"):
        UpdateListener(KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics), timeout_s=1)


@pytest.mark.kafka
@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_promotion_mid_stream_swaps_between_batches_and_loses_nothing(
    kafka_bootstrap: str,
    topics: TopicNames,
    adapters: Path,
    tmp_path: Path,
    running: list[tuple[ScorerThread, ReplayProducer]],
    engine: str,
) -> None:
    count, rate = 600, 30  # ~20 s of stream
    items = labelled_stream(count)
    group = f"g-{uuid.uuid4().hex[:8]}"
    # champion_check_s=0: only the update message can trigger this swap.
    config = ScorerConfig(group_id=group, max_batch=64, max_wait_ms=100, champion_check_s=0)
    model = ModelConfig(adapters_dir=adapters, engine=engine)
    classifier = Classifier.from_store(model, "cpu")
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    history.ensure_schema()  # the test counts rows while the scorer writes its first batch
    metrics = ScorerMetrics()
    scorer = ScorerThread(Scorer(kafka_bootstrap, topics, config, classifier, history, metrics, model_config=model))
    producer = ReplayProducer(kafka_bootstrap, topics.raw, news_messages(items), rate=rate)
    running.append((scorer, producer))
    scorer.start()
    producer.start()

    _wait(lambda: history.count() >= count // 4, 60, "the first quarter to be scored")
    store = AdapterStore(adapters)
    _new_version(store, "sentiment", "sentiment-v1", "sentiment-v2")
    store.set_champion("sentiment", "sentiment-v2")
    with UpdatePublisher(KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics)) as publisher:
        publisher.publish("sentiment", "sentiment-v2", "promoted", "sentiment-v1")
    _wait(lambda: history.count() >= count, 90, "every message to be scored")
    producer.join(10)
    assert producer.error is None and producer.sent == count
    time.sleep(1)  # a late duplicate write would show here
    assert scorer.is_alive() and scorer.error is None, "the scorer stopped by itself"
    scorer.halt.set()
    scorer.join(30)
    assert scorer.runs == 1 and scorer.error is None and scorer.stats is not None
    assert scorer.stats.consumed == count and scorer.stats.commit_failures == 0

    # Every produced id has exactly one row.
    assert history.count() == count
    assert {r[0] for r in history.query("SELECT id FROM news").rows} == {li.item.id for li in items}
    rows = [
        (str(sentiment), str(topic), int(str(scored_at)), int(str(partition)), int(str(offset)))
        for sentiment, topic, scored_at, partition, offset in history.query(
            "SELECT sentiment_version, topic_version, epoch_us(scored_at), kafka_partition, kafka_offset FROM news"
        ).rows
    ]
    assert {r[1] for r in rows} == {"topic-v1"}
    # A batch is one scored_at: each names one version, and the versions change once, from v1 to v2.
    by_batch: dict[int, set[str]] = {}
    for version, _, scored_at, _, _ in rows:
        by_batch.setdefault(scored_at, set()).add(version)
    assert all(len(versions) == 1 for versions in by_batch.values()), "a batch mixed two versions"
    sequence = [next(iter(by_batch[t])) for t in sorted(by_batch)]
    switch = sequence.index("sentiment-v2")
    assert switch > 0 and set(sequence[:switch]) == {"sentiment-v1"} and set(sequence[switch:]) == {"sentiment-v2"}
    # In Kafka order too: within each partition no v1 row follows a v2 one.
    for partition in {r[3] for r in rows}:
        in_order = [r[0] for r in sorted((r for r in rows if r[3] == partition), key=lambda r: r[4])]
        assert in_order == sorted(in_order), f"partition {partition} went back to v1"

    # news.scored names the same version as the stored row, once per id.
    stored = {str(r[0]): str(r[1]) for r in history.query("SELECT id, sentiment_version FROM news").rows}
    scored = _read_scored(kafka_bootstrap, topics.scored)
    assert sorted(s["id"] for s in scored) == sorted(stored)
    assert all(s["versions"]["sentiment"] == stored[s["id"]] for s in scored)
    _wait(lambda: _committed_equals_end(kafka_bootstrap, topics.raw, group), 15, "offsets to be committed")

    r = metrics.registry
    assert r.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 1
    assert r.get_sample_value("finpulse_model_swaps_total", {"task": "topic", "domain": "default"}) == 0
    assert r.get_sample_value("finpulse_model_swap_failures_total", {"task": "sentiment", "domain": "default"}) == 0
    assert (
        r.get_sample_value(
            "finpulse_model_version_info", {"task": "sentiment", "domain": "default", "version": "sentiment-v2"}
        )
        == 1
    )
    assert (
        r.get_sample_value(
            "finpulse_model_version_info", {"task": "sentiment", "domain": "default", "version": "sentiment-v1"}
        )
        is None
    )


@pytest.mark.kafka
def test_broken_version_keeps_the_old_one_serving(
    kafka_bootstrap: str,
    topics: TopicNames,
    adapters: Path,
    tmp_path: Path,
    running: list[tuple[ScorerThread, ReplayProducer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = 200
    items = labelled_stream(count)
    # A short check period: a broken champion must still not be retried at every check.
    config = ScorerConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=64, max_wait_ms=100, champion_check_s=0.5)
    model = ModelConfig(adapters_dir=adapters)
    classifier = Classifier.from_store(model, "cpu")
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    history.ensure_schema()  # the test counts rows while the scorer writes its first batch
    metrics = ScorerMetrics()
    scorer = ScorerThread(Scorer(kafka_bootstrap, topics, config, classifier, history, metrics, model_config=model))
    producer = ReplayProducer(kafka_bootstrap, topics.raw, news_messages(items), rate=40)
    running.append((scorer, producer))
    caplog.set_level(logging.ERROR, logger="stream.updates")
    scorer.start()
    producer.start()

    _wait(lambda: history.count() >= count // 4, 60, "the first quarter to be scored")
    store = AdapterStore(adapters)
    broken = _new_version(store, "sentiment", "sentiment-v1", "sentiment-v2")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)
    store.set_champion("sentiment", "sentiment-v2")
    with UpdatePublisher(KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics)) as publisher:
        publisher.publish("sentiment", "sentiment-v2", "promoted", "sentiment-v1")
    failures = {"task": "sentiment", "domain": "default"}
    r = metrics.registry
    _wait(lambda: r.get_sample_value("finpulse_model_swap_failures_total", failures) == 1, 30, "the failed load")
    _wait(lambda: history.count() >= count, 60, "every message to be scored")
    time.sleep(2)  # four more periodic checks of the CHAMPION file, which still names the broken version
    assert scorer.is_alive() and scorer.error is None, "the scorer stopped by itself"
    scorer.halt.set()
    scorer.join(30)

    assert history.count() == count
    assert history.query("SELECT DISTINCT sentiment_version FROM news").rows == [("sentiment-v1",)]
    assert classifier.versions["sentiment"] == "sentiment-v1"
    assert r.get_sample_value("finpulse_model_swap_failures_total", failures) == 1
    assert r.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 0
    assert (
        r.get_sample_value(
            "finpulse_model_version_info", {"task": "sentiment", "domain": "default", "version": "sentiment-v1"}
        )
        == 1
    )
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "sentiment-v2" in errors[0] and "\n" not in errors[0]


@pytest.mark.kafka
# The onnx engine in float32 here: its int8 kernels quantise activations per batch, so a row's score moves with
# its batch neighbours (up to 0.57 on one row, measured), and this test compares rows across batch shapes.
@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_a_domain_promotion_changes_nothing_served_to_other_domains(
    kafka_bootstrap: str,
    topics: TopicNames,
    adapters: Path,
    tmp_path: Path,
    running: list[tuple[ScorerThread, ReplayProducer]],
    engine: str,
) -> None:
    count = 400  # half stock-market tweets (domain "stocktweets"), half TFNS tweets (the default domain)
    stock = len(stock_tweets(labelled_only=True))
    everything = labelled_stream(stock + count // 2)  # the TFNS tweets follow the stock tweets
    mixed = everything[stock - count // 2 :]
    items = [x for pair in zip(mixed[: count // 2], mixed[count // 2 :], strict=True) for x in pair]
    config = ScorerConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=64, max_wait_ms=100, champion_check_s=0)
    dtype = "float32" if engine == "onnx" else "auto"
    model = ModelConfig(
        adapters_dir=adapters, domains={"stock-market-tweets": "stocktweets"}, engine=engine, inference_dtype=dtype
    )
    classifier = Classifier.from_store(model, "cpu")
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    history.ensure_schema()
    metrics = ScorerMetrics()
    scorer = ScorerThread(Scorer(kafka_bootstrap, topics, config, classifier, history, metrics, model))
    producer = ReplayProducer(kafka_bootstrap, topics.raw, news_messages(items), rate=40)
    running.append((scorer, producer))
    scorer.start()
    producer.start()

    _wait(lambda: history.count() >= count // 4, 60, "the first quarter to be scored")
    store = AdapterStore(adapters)
    # The domain's version: v1's weights with a far higher temperature, so every probability it gives differs.
    target = _new_version(store, "sentiment", "sentiment-v1", "sentiment-v2")
    card = json.loads((target / CARD_FILE).read_text())
    card["domain"] = "stocktweets"
    card["metrics"]["calibration"]["temperature"] = 8.0
    (target / CARD_FILE).write_text(json.dumps(card, indent=2))
    store.set_champion("sentiment", "sentiment-v2", "stocktweets")
    with UpdatePublisher(KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics)) as publisher:
        publisher.publish("sentiment", "sentiment-v2", "promoted", None)
    _wait(lambda: history.count() >= count, 90, "every message to be scored")
    producer.join(10)
    scorer.halt.set()
    scorer.join(30)
    assert scorer.error is None and producer.error is None

    rows = history.query("SELECT id, source, sentiment_version, sentiment_negative, text FROM news").rows
    by_source: dict[str, set[str]] = {}
    for _, source, version, _, _ in rows:
        by_source.setdefault(str(source), set()).add(str(version))
    assert by_source["twitter-financial-news"] == {"sentiment-v1"}  # the default domain never saw v2
    assert by_source["stock-market-tweets"] == {"sentiment-v1", "sentiment-v2"}  # swapped mid-stream
    # What the default domain was served is what v1 gives now, to the bf16 noise of other batch shapes.
    default = [r for r in rows if r[1] == "twitter-financial-news"]
    again = classifier.predict([str(r[4]) for r in default])
    drift = [abs(float(str(r[3])) - p.sentiment_scores["negative"]) for r, p in zip(default, again, strict=True)]
    assert max(drift) < 0.03
    assert {p.sentiment_version for p in again} == {"sentiment-v1"}
    domain_rows = [r for r in rows if r[2] == "sentiment-v2"]
    served = classifier.predict([str(r[4]) for r in domain_rows], domains=["stocktweets"] * len(domain_rows))
    assert {p.sentiment_version for p in served} == {"sentiment-v2"}
    assert all(p.sentiment_confidence < 0.6 for p in served)  # T = 8 flattens every answer
    assert classifier.domain_versions("sentiment") == {"default": "sentiment-v1", "stocktweets": "sentiment-v2"}
    # The metrics say it per domain too: one swap in stocktweets, none in the default domain.
    r = metrics.registry
    assert r.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "stocktweets"}) == 1
    assert r.get_sample_value("finpulse_model_swaps_total", {"task": "sentiment", "domain": "default"}) == 0
    info = {"task": "sentiment", "domain": "stocktweets", "version": "sentiment-v2"}
    assert r.get_sample_value("finpulse_model_version_info", info) == 1
    assert (
        r.get_sample_value("finpulse_model_version_info", {**info, "domain": "default", "version": "sentiment-v1"}) == 1
    )

    # Withdrawing the domain's champion serves it the default's again, once announced.
    store.clear_champion("sentiment", "stocktweets")
    with UpdatePublisher(KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=topics)) as publisher:
        publisher.publish("sentiment", "sentiment-v1", "rolled_back", "sentiment-v2")
    swapper = scorer.scorer.swapper
    assert swapper is not None

    def withdrawn() -> bool:
        swapper.between_batches()  # the scorer is stopped: the test takes its between-batch step
        return classifier.domain_versions("sentiment") == {"default": "sentiment-v1"}

    _wait(withdrawn, 30, "the domain to be served the default version again")
