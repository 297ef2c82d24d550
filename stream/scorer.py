"""The scorer service: consume `news.raw` in micro-batches, score, produce `news.scored`, store, then commit."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from learner.adapters import AdapterStore
from learner.config import ModelConfig
from learner.domains import DomainTable
from learner.model import Classifier, Prediction, ServedModel, auto_inference_batch
from learner.tasks import SENTIMENT, TOPIC, Task
from monitor.metrics import ScorerMetrics
from storage import History
from stream.config import RECONNECT_BACKOFF_MAX_MS, KafkaConfig, ScorerConfig, TopicNames
from stream.connection import Target, client_kwargs
from stream.containment import Contained, Containment, Stopping
from stream.errors import StreamError
from stream.lag import LagMonitor
from stream.messages import Invalid, NewsItem, dead_letter, parse_news, unprocessable
from stream.sinks import HistorySink, Scored, ScoredTopicSink, Sink
from stream.updates import ModelSwapper, SwapMetrics, UpdateListener

log = logging.getLogger(__name__)

# An outage (storage or broker down) is re-probed after 1 s, then less and less often, at most every 5 s: a
# probe is one metadata request or one empty transaction, and a longer gap is time lost after the server is back.
_OUTAGE_FIRST_S = 1.0
_OUTAGE_MAX_S = 5.0

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
    unread: int = 0  # stored with the outcome unsupported_language or unreadable, no model answer

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


@dataclass
class _Prepared:
    """A batch parsed and checked for duplicates, its model running on the inference thread."""

    records: Sequence[Record]
    refused: list[tuple[Record, Invalid]]
    duplicates: int
    inferred: Future[Contained[tuple[Record, NewsItem], Prediction]]
    started: float
    ids: frozenset[str]  # of the messages being scored


class Scorer:
    """One member of the scorer consumer group: consume → parse → infer → sinks → commit.

    Nothing a record does stops it: a record that fails to parse, or makes any later stage raise on its own,
    is dead-lettered with the reason; a stage whose server is down pauses consumption until it is back.
    Given `model_config`, it follows the champion adapters while it runs (model.updates, and the CHAMPION
    files every `champion_check_s`); without it, it serves the classifier's versions until restarted.
    """

    def __init__(
        self,
        bootstrap_servers: Target,
        topics: TopicNames,
        config: ScorerConfig,
        classifier: Classifier,
        history: History,
        metrics: ScorerMetrics,
        model_config: ModelConfig | None = None,
        sinks: Sequence[Sink] | None = None,
    ) -> None:
        self.topics = topics
        self.config = config
        self.classifier = classifier
        self.history = history
        self.metrics = metrics
        self.stats = ScorerStats()
        self.bootstrap_servers = bootstrap_servers
        try:
            self.consumer = KafkaConsumer(
                topics.raw,
                **client_kwargs(bootstrap_servers),
                group_id=config.group_id,
                client_id=f"finpulse-scorer-{threading.get_native_id()}",
                enable_auto_commit=False,  # offsets move only after a batch is in every sink
                auto_offset_reset="earliest",
                max_poll_records=config.max_batch,
                # A slow CPU batch must not get the member evicted mid-batch.
                max_poll_interval_ms=600_000,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                **config.group_settings(),
            )
            self.producer = KafkaProducer(
                **client_kwargs(bootstrap_servers),
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                client_id="finpulse-scorer",
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            )
        except KafkaError as e:
            raise StreamError(f"cannot connect to Kafka at {bootstrap_servers}: {e}") from e
        self.sinks: list[Sink] = (
            list(sinks)
            if sinks is not None
            else [ScoredTopicSink(self.producer, topics.scored, str(bootstrap_servers)), HistorySink(history)]
        )
        self._contain = Containment(self._wait_until_up, on_retry=self._count_retry)
        # One thread runs the model, so batch N+1's inference overlaps batch N's sinks and commit, which stay on
        # this thread with the consumer (kafka-python's consumer is not thread-safe). Torch releases the GIL.
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-inference")
        self.domains = DomainTable(model_config.domains if model_config is not None else None)
        self._stop = threading.Event()
        metrics.set_versions(classifier.serving)
        models = classifier.models
        # The throughput series the sentiment-spike rules read are topic x sentiment (monitor.rules).
        metrics.declare(models[TOPIC.name].labels, models[SENTIMENT.name].labels, config.watchlist)
        metrics.declare_stages([sink.name for sink in self.sinks] + ["dedupe", "model", "dlq", "commit"])
        self.inference_batch = config.inference_batch or auto_inference_batch(
            classifier.trunk.engine, str(classifier.device)
        )
        self.lag = LagMonitor(
            bootstrap_servers, config.group_id, self.consumer.assignment, metrics, config.lag_interval_s
        )
        self.swapper: ModelSwapper | None = None
        if model_config is not None:
            try:
                self.swapper = self._model_swapper(bootstrap_servers, model_config)
            except StreamError:
                self.producer.close(timeout=10)
                self.consumer.close()
                raise
        self.lag.start()

    def _model_swapper(self, bootstrap_servers: Target, model_config: ModelConfig) -> ModelSwapper:
        store = AdapterStore(model_config.adapters_dir)

        def load(task: Task, version: str) -> ServedModel:
            return self.classifier.load(store, task, version, model_config)

        # The listener is created before the swapper first reads the champions: no promotion falls in between.
        listener = UpdateListener(KafkaConfig(topics=self.topics), connection=bootstrap_servers)
        metrics = SwapMetrics(self.metrics.registry)
        return ModelSwapper(self.classifier, store, load, listener, metrics, self.config.champion_check_s)

    def close(self) -> None:
        """Leave the group and flush; uncommitted records go to the next owner."""
        self._stop.set()
        try:
            self.lag.close()
            self.producer.flush(timeout=10)
        finally:
            for sink in self.sinks:
                with contextlib.suppress(Exception):
                    sink.close()
            if self.swapper is not None:
                self.swapper.close()
            self._inference.shutdown(wait=True, cancel_futures=True)
            self.producer.close(timeout=10)
            self.consumer.close()

    def run(self, stop: threading.Event, until: Callable[[ScorerStats], bool] | None = None) -> ScorerStats:
        """Score until `stop` is set or `until(stats)` holds.

        Two batches are in hand at a time: while the model scores the newer one, the older one is written to
        the sinks and committed, in order. A batch in flight when the scorer stops is not committed: the
        partition's next owner scores it again, and the history's duplicate check keeps one row per message.
        """
        self._stop = stop
        failures = 0
        pending: _Prepared | None = None
        while not stop.is_set():
            try:
                # With a batch in flight, take only what has arrived: that batch must not wait for the next.
                records = self._gather(stop, idle_ms=0 if pending is not None else 500)
            except KafkaError as e:
                # The consumer reconnects by itself; a poll that raises (a coordinator moving, say) is retried.
                failures += 1
                log.warning("event=poll_failed error=%s detail=%r", type(e).__name__, str(e)[:200])
                stop.wait(min(_OUTAGE_MAX_S, _OUTAGE_FIRST_S * failures))
                continue
            # Models change only here, between batches; each batch reads one snapshot of them, so its rows are
            # named by the versions that scored them even when a swap lands while it is in flight.
            if self.swapper is not None and self.swapper.between_batches():
                self.metrics.set_versions(self.classifier.serving)
            prepared: _Prepared | None = None
            try:
                if records:
                    prepared = self._prepare(records, pending.ids if pending is not None else frozenset())
                if pending is not None:
                    self._finish(pending)
                    failures = 0
            except Stopping:
                break  # asked to stop during an outage: nothing in hand is committed, the next owner replays it
            except Exception as e:
                # Not about one record (those are dead-lettered inside): rewind what is in hand and try again,
                # backing off, rather than exit and come back in a crash loop.
                failures += 1
                log.error("event=batch_failed error=%s detail=%r", type(e).__name__, str(e)[:300])
                self._rewind([*(pending.records if pending else ()), *(prepared.records if prepared else ())])
                pending = None
                stop.wait(min(_OUTAGE_MAX_S, _OUTAGE_FIRST_S * failures))
                continue
            pending = prepared
            if until is not None and until(self.stats):
                break
        return self.stats

    def _rewind(self, records: Sequence[Record]) -> None:
        """Seek back to the first record of the batch on every partition, so it is consumed again."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        for tp, offset in first.items():
            # A partition that moved to another member in the meantime is no longer ours to seek.
            with contextlib.suppress(KafkaError, AssertionError, ValueError):
                self.consumer.seek(tp, offset)

    def _gather(self, stop: threading.Event, idle_ms: int = 500) -> list[Record]:
        """Collect up to max_batch records, waiting at most max_wait_ms once the first one arrives (and up to
        `idle_ms` for it)."""
        records: list[Record] = []
        deadline: float | None = None
        while len(records) < self.config.max_batch and not stop.is_set():
            if deadline is None:
                timeout_ms = idle_ms  # idle: wake up now and then to notice `stop`
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
        """Score one batch, write it to every sink, dead-letter what cannot be handled, and commit its offsets."""
        return self._finish(self._prepare(records))

    def _prepare(self, records: Sequence[Record], in_flight: frozenset[str] = frozenset()) -> _Prepared:
        """Parse a batch, drop the ids already stored or in the batch in flight (`in_flight`), and start its
        model on the inference thread."""
        started = time.perf_counter()
        refused: list[tuple[Record, Invalid]] = []
        valid: list[tuple[Record, NewsItem]] = []
        duplicates = 0
        # The batch in flight is not stored yet: its ids would pass the history's check.
        seen: set[str] = set(in_flight)
        for record in records:
            parsed = self._parse(record)
            if isinstance(parsed, Invalid):
                refused.append((record, parsed))
            elif parsed.id in seen:
                duplicates += 1
            else:
                seen.add(parsed.id)
                valid.append((record, parsed))

        # Already-stored ids are not scored again: a replay after a crash costs no model time.
        with self._stage("dedupe"):
            known = self._contain.run("dedupe", valid, self._known, self.sinks_probe("history"))
        refused.extend((record, unprocessable(error)) for (record, _), error in known.poison)
        fresh = [pair for pair, stored in known.results if not stored]
        duplicates += sum(1 for _, stored in known.results if stored)
        inferred = self._inference.submit(self._infer, fresh)
        return _Prepared(records, refused, duplicates, inferred, started, frozenset(item.id for _, item in fresh))

    def _infer(self, fresh: list[tuple[Record, NewsItem]]) -> Contained[tuple[Record, NewsItem], Prediction]:
        with self._stage("model"):
            # A model error is not an outage (no probe: this thread never waits on the consumer); bisection
            # also halves a batch that ran out of (GPU) memory.
            return self._contain.run("model", fresh, self._predict, retries=0)

    def _finish(self, prepared: _Prepared) -> BatchOutcome:
        """Take a prepared batch's predictions, write them to every sink, dead-letter, commit, account."""
        records, refused, duplicates = prepared.records, prepared.refused, prepared.duplicates
        inferred = prepared.inferred.result()
        refused.extend((record, unprocessable(error)) for (record, _), error in inferred.poison)
        scored_at = datetime.now(UTC)
        batch = [Scored(record, item, prediction, scored_at) for (record, item), prediction in inferred.results]

        for sink in self.sinks:
            with self._stage(sink.name):
                written = self._contain.run(sink.name, batch, sink.write, sink.probe)
            # A record a sink refuses is dead-lettered and kept from the later sinks.
            refused.extend((s.record, unprocessable(error)) for s, error in written.poison)
            batch = [s for s, _ in written.results]
            raced = {s.item.id for s, duplicate in written.results if duplicate}
            if raced:
                # Stored between our check and our write, by another scorer (a rebalance) or by the batch before
                # this one, still in flight at the check: duplicates.
                duplicates += len(raced)
                batch = [s for s in batch if s.item.id not in raced]

        with self._stage("dlq"):
            self._send_dead_letters(refused)
        for _, invalid in refused:
            self.metrics.dead_letters.labels(reason=invalid.reason.value).inc()

        with self._stage("commit"):
            self._commit(records)
        try:
            self._account(records, batch, len(refused), duplicates, scored_at, prepared.started)
        except Exception as e:  # the batch is committed: a metric must not take the process down with it
            log.error("event=accounting_failed error=%s detail=%r", type(e).__name__, str(e)[:200])
        return BatchOutcome([(s.item, s.prediction) for s in batch], len(refused), duplicates)

    def _parse(self, record: Record) -> NewsItem | Invalid:
        try:
            return parse_news(record.value, self.config.max_text_bytes)
        except Exception as e:  # containment: whatever one value does, it is that value's dead letter
            log.warning("event=parse_raised offset=%s error=%s", record.offset, type(e).__name__)
            return unprocessable(e)

    def _known(self, batch: list[tuple[Record, NewsItem]]) -> list[bool]:
        stored = self.history.existing_ids([item.id for _, item in batch])
        return [item.id in stored for _, item in batch]

    def _predict(self, batch: list[tuple[Record, NewsItem]]) -> list[Prediction]:
        domains = [self.domains.domain_of(item.source) for _, item in batch]
        return self.classifier.predict([item.text for _, item in batch], self.inference_batch, domains)

    def _dead_letter(self, refused: list[tuple[Record, Invalid]]) -> list[None]:
        futures = [
            self.producer.send(
                self.topics.dlq,
                key=record.key,
                value=dead_letter(record.value, invalid, record.topic, record.partition, record.offset),
            )
            for record, invalid in refused
        ]
        self.producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)  # a dead letter not acknowledged must not be committed past
        return [None] * len(refused)

    def _send_dead_letters(self, refused: list[tuple[Record, Invalid]]) -> None:
        """Dead-letter `refused`; while that fails, wait and try again: a dead letter is never dropped."""
        dead = self._contain.run("dlq", refused, self._dead_letter, self.sinks_probe("scored"))
        remaining = [pair for pair, _ in dead.poison]
        if remaining:
            # Dead letters are bounded in size, so a refusal is not about the record: keep trying, paused.
            def resend() -> None:
                self._dead_letter(remaining)

            self._wait_until_up("dlq", resend, dead.poison[0][1])

    def sinks_probe(self, name: str) -> Callable[[], None] | None:
        """Return the probe of the sink called `name`, or None when this scorer has no such sink."""
        for sink in self.sinks:
            if sink.name == name:
                return sink.probe
        return None

    def _count_retry(self, stage: str) -> None:
        self.metrics.retries.labels(stage=stage).inc()

    def _wait_until_up(self, stage: str, probe: Callable[[], None], error: BaseException) -> None:
        """Pause consumption until `probe` passes, keeping the group membership; raise Stopping if asked to stop."""
        since = time.monotonic()
        log.warning("event=paused stage=%s reason=%r detail=%r", stage, type(error).__name__, str(error)[:200])
        self.metrics.paused.labels(stage=stage).set(1)
        delay = _OUTAGE_FIRST_S
        try:
            while True:
                if self._stop.is_set():
                    raise Stopping
                self._idle_poll(delay)
                try:
                    probe()
                except Exception:
                    delay = min(delay * 2, _OUTAGE_MAX_S)
                    continue
                log.warning("event=resumed stage=%s paused_s=%.1f", stage, time.monotonic() - since)
                return
        finally:
            self.metrics.paused.labels(stage=stage).set(0)
            self.metrics.paused_seconds.labels(stage=stage).inc(time.monotonic() - since)

    def _idle_poll(self, seconds: float) -> None:
        """Wait `seconds` inside poll() with every partition paused, so the member stays in the group."""
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.pause(*assigned)
        try:
            polled = self.consumer.poll(timeout_ms=int(seconds * 1000))
        except KafkaError as e:
            log.debug("event=idle_poll_failed error=%r", e)
            self._stop.wait(seconds)
            polled = {}
        # A rebalance during the wait may hand over partitions that are not paused yet: rewind what they gave.
        for tp, batch in polled.items():
            if batch:
                self.consumer.seek(tp, min(record.offset for record in batch))
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

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
        except KafkaError as e:
            # The partitions moved to another member (or the commit could not reach the coordinator): the next
            # owner replays them, and our rows make those duplicates, not second rows.
            self.stats.commit_failures += 1
            log.warning("event=commit_failed error=%s reason=%r", type(e).__name__, str(e))
            return
        self.metrics.last_commit.set(time.time())

    def _account(
        self,
        records: Sequence[Record],
        scored: list[Scored],
        dead_lettered: int,
        duplicates: int,
        scored_at: datetime,
        started: float,
    ) -> None:
        m, s = self.metrics, self.stats
        now = time.time()
        watchlist = set(self.config.watchlist)
        for one in scored:
            item, prediction = one.item, one.prediction
            m.e2e_lag.observe(max(0.0, (scored_at - item.published_at).total_seconds()))
            if not prediction.scored:
                m.unread.labels(outcome=prediction.outcome, language=prediction.language).inc()
                s.unread += 1
                continue
            m.scored.labels(topic=prediction.topic, sentiment=prediction.sentiment).inc()
            for ticker in watchlist.intersection(item.tickers):
                m.ticker_scored.labels(ticker=ticker, sentiment=prediction.sentiment).inc()
            m.count_published(item.published_at, prediction.topic, prediction.sentiment, item.tickers)
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
        s.consumed += len(records)
        s.scored += len(scored)
        s.dead_lettered += dead_lettered
        s.duplicates += duplicates
        s.batches += 1
        s.busy_s += elapsed
        s.last_batch_at = time.perf_counter()


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Return, per partition, the offset to commit once `records` are handled: one past the highest."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        if tp not in offsets or offsets[tp].offset <= record.offset:
            offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
    return offsets
