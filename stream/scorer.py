"""The scorer service: consume `news.raw` in micro-batches, score, produce `news.scored`, store, then commit."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from learner.adapters import AdapterStore
from learner.config import ModelConfig
from learner.labels import Task
from learner.model import Classifier, Prediction, TaskModel
from monitor.metrics import ScorerMetrics
from storage import History, NewsRow
from stream.config import KafkaConfig, ScorerConfig, TopicNames
from stream.errors import StreamError
from stream.messages import Invalid, NewsItem, dead_letter, parse_news
from stream.updates import ModelSwapper, SwapMetrics, UpdateListener

log = logging.getLogger(__name__)

# kafka-python's ConsumerRecord; typed loosely because the library ships no annotations.
Record = Any


@dataclass
class ScorerStats:
    """Running totals of one scorer process: every consumed offset lands in exactly one bucket."""

    consumed: int = 0
    scored: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    batches: int = 0
    commit_failures: int = 0
    busy_s: float = 0.0
    first_record_at: float | None = None  # perf_counter() when the first record arrived
    last_batch_at: float | None = None  # perf_counter() when the last batch was committed
    by_sentiment: dict[str, int] = field(default_factory=dict)

    @property
    def throughput_per_s(self) -> float:
        """Return consumed messages per second, from the first record's arrival to the last commit."""
        if self.first_record_at is None or self.last_batch_at is None or self.last_batch_at <= self.first_record_at:
            return 0.0
        return self.consumed / (self.last_batch_at - self.first_record_at)


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch turned into."""

    scored: list[tuple[NewsItem, Prediction]]
    dead_lettered: int
    duplicates: int


def scored_value(item: NewsItem, prediction: Prediction, scored_at: datetime) -> bytes:
    """Encode the `news.scored` record of one item."""
    return json.dumps(
        {
            "id": item.id,
            "published_at": item.published_at.isoformat(),
            "source": item.source,
            "tickers": list(item.tickers),
            "text": item.text,
            "topic": prediction.topic,
            "topic_confidence": round(prediction.topic_confidence, 6),
            "sentiment": prediction.sentiment,
            "sentiment_confidence": round(prediction.sentiment_confidence, 6),
            "sentiment_scores": {k: round(v, 6) for k, v in prediction.sentiment_scores.items()},
            "versions": {"sentiment": prediction.sentiment_version, "topic": prediction.topic_version},
            "scored_at": scored_at.isoformat(),
        },
        ensure_ascii=False,
    ).encode("utf-8")


class Scorer:
    """One member of the scorer consumer group.

    Given `model_config`, it follows the champion adapters while it runs (model.updates, and the CHAMPION
    files every `champion_check_s`); without it, it serves the classifier's versions until restarted.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: TopicNames,
        config: ScorerConfig,
        classifier: Classifier,
        history: History,
        metrics: ScorerMetrics,
        model_config: ModelConfig | None = None,
    ) -> None:
        self.topics = topics
        self.config = config
        self.classifier = classifier
        self.history = history
        self.metrics = metrics
        self.stats = ScorerStats()
        try:
            self.consumer = KafkaConsumer(
                topics.raw,
                bootstrap_servers=bootstrap_servers,
                group_id=config.group_id,
                client_id=f"finpulse-scorer-{threading.get_native_id()}",
                enable_auto_commit=False,  # offsets move only after a batch is produced and stored
                auto_offset_reset="earliest",
                max_poll_records=config.max_batch,
                # A slow CPU batch must not get the member evicted mid-batch.
                max_poll_interval_ms=600_000,
            )
            self.producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                client_id="finpulse-scorer",
            )
        except KafkaError as e:
            raise StreamError(f"cannot connect to Kafka at {bootstrap_servers}: {e}") from e
        metrics.set_versions(classifier.versions)
        models = classifier.models
        metrics.declare(models["topic"].labels, models["sentiment"].labels, config.watchlist)
        self._inference_batch = config.inference_batch or (512 if classifier.device.type == "cuda" else 32)
        self.swapper: ModelSwapper | None = None
        if model_config is not None:
            try:
                self.swapper = self._model_swapper(bootstrap_servers, model_config)
            except StreamError:
                self.producer.close(timeout=10)
                self.consumer.close()
                raise

    def _model_swapper(self, bootstrap_servers: str, model_config: ModelConfig) -> ModelSwapper:
        store = AdapterStore(model_config.adapters_dir)
        device = self.classifier.device

        def load(task: Task, version: str) -> TaskModel:
            return TaskModel.load(store, task, version, model_config, device)

        # The listener is created before the swapper first reads the champions: no promotion falls in between.
        listener = UpdateListener(KafkaConfig(bootstrap_servers=bootstrap_servers, topics=self.topics))
        metrics = SwapMetrics(self.metrics.registry)
        return ModelSwapper(self.classifier, store, load, listener, metrics, self.config.champion_check_s)

    def close(self) -> None:
        """Leave the group and flush; uncommitted records go to the next owner."""
        try:
            self.producer.flush(timeout=10)
        finally:
            if self.swapper is not None:
                self.swapper.close()
            self.producer.close(timeout=10)
            self.consumer.close()

    def run(self, stop: threading.Event, until: Callable[[ScorerStats], bool] | None = None) -> ScorerStats:
        """Score until `stop` is set or `until(stats)` holds."""
        while not stop.is_set():
            records = self._gather(stop)
            # Models change only here, between batches: every batch is scored, and its rows named, by one version.
            if self.swapper is not None and self.swapper.between_batches():
                self.metrics.set_versions(self.classifier.versions)
            if records:
                self.handle(records)
            if until is not None and until(self.stats):
                break
        return self.stats

    def _gather(self, stop: threading.Event) -> list[Record]:
        """Collect up to max_batch records, waiting at most max_wait_ms once the first one arrives."""
        records: list[Record] = []
        deadline: float | None = None
        while len(records) < self.config.max_batch and not stop.is_set():
            if deadline is None:
                timeout_ms = 500  # idle: wake up now and then to notice `stop`
            else:
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.config.max_batch - len(records))
            for batch in polled.values():
                records.extend(batch)
            if records and deadline is None:
                deadline = time.monotonic() + self.config.max_wait_ms / 1000
                if self.stats.first_record_at is None:
                    self.stats.first_record_at = time.perf_counter()
            if not records and not polled:
                break
        return records

    def handle(self, records: Sequence[Record]) -> BatchOutcome:
        """Score one batch, produce its outputs, store it, and commit its offsets."""
        started = time.perf_counter()
        valid: list[tuple[Record, NewsItem]] = []
        dlq_futures = []
        duplicates = 0
        seen: set[str] = set()
        for record in records:
            parsed = parse_news(record.value, self.config.max_text_bytes)
            if isinstance(parsed, Invalid):
                value = dead_letter(record.value, parsed, record.topic, record.partition, record.offset)
                dlq_futures.append(self.producer.send(self.topics.dlq, key=record.key, value=value))
                self.metrics.dead_letters.labels(reason=parsed.reason.value).inc()
            elif parsed.id in seen:
                duplicates += 1
            else:
                seen.add(parsed.id)
                valid.append((record, parsed))
        # Already-stored ids are not scored again: a replay after a crash costs no model time.
        with self._stage("dedupe"):
            stored = self.history.existing_ids([item.id for _, item in valid]) if valid else set()
        fresh = [(record, item) for record, item in valid if item.id not in stored]
        duplicates += len(valid) - len(fresh)

        with self._stage("model"):
            predictions = self.classifier.predict([item.text for _, item in fresh], batch_size=self._inference_batch)

        scored_at = datetime.now(UTC)
        with self._stage("produce"):
            futures = list(dlq_futures)
            for (_, item), prediction in zip(fresh, predictions, strict=True):
                value = scored_value(item, prediction, scored_at)
                futures.append(self.producer.send(self.topics.scored, key=item.id.encode("utf-8"), value=value))
            self.producer.flush()
            for future in futures:
                future.get(timeout=30)  # raises if a send failed: then nothing is committed

        rows = [
            _row(record, item, prediction, scored_at)
            for (record, item), prediction in zip(fresh, predictions, strict=True)
        ]
        with self._stage("store"):
            result = self.history.write_batch(rows) if rows else None
        # Another scorer may have stored an id between our check and our write (a rebalance); it is a duplicate.
        raced = set(result.duplicates) if result is not None else set()
        duplicates += len(raced)
        scored = [(item, p) for (_, item), p in zip(fresh, predictions, strict=True) if item.id not in raced]

        with self._stage("commit"):
            self._commit(records)
        self._account(records, scored, len(dlq_futures), duplicates, scored_at, started)
        return BatchOutcome(scored, len(dlq_futures), duplicates)

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.batch_seconds.labels(stage=name).observe(time.perf_counter() - started)

    def _commit(self, records: Sequence[Record]) -> None:
        try:
            self.consumer.commit(next_offsets(records))
        except CommitFailedError as e:
            # The partitions moved to another member, which will replay them; our rows make those duplicates.
            self.stats.commit_failures += 1
            log.warning("event=commit_failed reason=%r", str(e))

    def _account(
        self,
        records: Sequence[Record],
        scored: list[tuple[NewsItem, Prediction]],
        dead_lettered: int,
        duplicates: int,
        scored_at: datetime,
        started: float,
    ) -> None:
        m, s = self.metrics, self.stats
        now = time.time()
        watchlist = set(self.config.watchlist)
        for item, prediction in scored:
            m.scored.labels(topic=prediction.topic, sentiment=prediction.sentiment).inc()
            for ticker in watchlist.intersection(item.tickers):
                m.ticker_scored.labels(ticker=ticker, sentiment=prediction.sentiment).inc()
            m.e2e_lag.observe(max(0.0, (scored_at - item.published_at).total_seconds()))
            s.by_sentiment[prediction.sentiment] = s.by_sentiment.get(prediction.sentiment, 0) + 1
        for record in records:
            if record.timestamp is not None and record.timestamp > 0:
                m.pipeline_lag.observe(max(0.0, now - record.timestamp / 1000))
        m.consumed.inc(len(records))
        m.duplicates.inc(duplicates)
        m.batch_size.observe(len(records))
        elapsed = time.perf_counter() - started
        m.batch_seconds.labels(stage="total").observe(elapsed)
        m.last_batch.set(now)
        m.set_consumer_lag(self._lags())
        s.consumed += len(records)
        s.scored += len(scored)
        s.dead_lettered += dead_lettered
        s.duplicates += duplicates
        s.batches += 1
        s.busy_s += elapsed
        s.last_batch_at = time.perf_counter()

    def _lags(self) -> dict[int, int]:
        lags = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if position is not None:
                lags[tp.partition] = max(0, end - position)
        return lags


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Return, per partition, the offset to commit once `records` are handled: one past the highest."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        if tp not in offsets or offsets[tp].offset <= record.offset:
            offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
    return offsets


def _row(record: Record, item: NewsItem, prediction: Prediction, scored_at: datetime) -> NewsRow:
    return NewsRow(
        id=item.id,
        published_at=item.published_at,
        source=item.source,
        text=item.text,
        tickers=item.tickers,
        topic=prediction.topic,
        topic_confidence=prediction.topic_confidence,
        sentiment=prediction.sentiment,
        sentiment_confidence=prediction.sentiment_confidence,
        sentiment_negative=prediction.sentiment_scores["negative"],
        sentiment_neutral=prediction.sentiment_scores["neutral"],
        sentiment_positive=prediction.sentiment_scores["positive"],
        topic_version=prediction.topic_version,
        sentiment_version=prediction.sentiment_version,
        scored_at=scored_at,
        kafka_topic=record.topic,
        kafka_partition=record.partition,
        kafka_offset=record.offset,
    )
