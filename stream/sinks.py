"""Where scored records go: a small base class, and the two sinks every scorer has (news.scored, the history).

The scorer hands each batch to every sink in order and commits the batch's offsets only after all of them have
written it. A sink raises when it cannot write; the scorer then tells a sink that is down (its `probe` raises
too: the scorer pauses until it is back) from a record the sink refuses (the probe passes: the scorer bisects
the batch and dead-letters that record). A new destination (Parquet files, a search index) is one subclass.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from kafka import KafkaProducer

from learner.model import Prediction
from learner.tasks import specs, task_names
from storage import History, NewsRow
from storage.schema import NEWS_TASKS
from stream.admin import broker_answers
from stream.errors import StreamError
from stream.messages import NewsItem

log = logging.getLogger(__name__)

# kafka-python's ConsumerRecord; typed loosely because the library ships no annotations.
Record = Any

# Every this many history writes, a scorer asks the lake whether compaction is due (a cheap catalog read).
COMPACT_CHECK_EVERY = 50
# How long one produced batch may take to be acknowledged before the sink counts as failed.
_SEND_TIMEOUT_S = 30.0


class SinkUnavailable(StreamError):
    """A sink cannot take writes at all (its server is down), whatever the records."""


@dataclass(frozen=True)
class Scored:
    """One scored record on its way to the sinks."""

    record: Record
    item: NewsItem
    prediction: Prediction
    scored_at: datetime


class Sink(ABC):
    """A destination of scored records.

    `add` buffers, `flush` writes what was added; `write` is the one method a subclass must provide. It returns,
    per record and in order, whether the record was already there (a duplicate), and raises when it failed.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._pending: list[Scored] = []

    def add(self, scored: Scored) -> None:
        """Buffer one record for the next `flush`."""
        self._pending.append(scored)

    def flush(self) -> list[bool]:
        """Write every buffered record; they stay buffered if the write raises."""
        written = self.write(self._pending)
        self._pending = []
        return written

    @abstractmethod
    def write(self, batch: Sequence[Scored]) -> list[bool]:
        """Write `batch`; return per record whether it was a duplicate; raise if it was not written."""

    def probe(self) -> None:
        """Raise SinkUnavailable when the sink cannot take any write now (by default it always can)."""
        return None

    def close(self) -> None:
        """Release what the sink holds."""
        return None


class ScoredTopicSink(Sink):
    """Produces `news.scored`, keyed by id; at-least-once (a replayed batch may appear twice)."""

    name = "scored"

    def __init__(self, producer: KafkaProducer, topic: str, bootstrap_servers: str) -> None:
        super().__init__()
        self._producer = producer
        self._topic = topic
        self._bootstrap = bootstrap_servers

    def write(self, batch: Sequence[Scored]) -> list[bool]:
        """Send every record, wait until the broker acknowledged all of them."""
        futures = [
            self._producer.send(self._topic, key=s.item.id.encode("utf-8"), value=scored_value(s)) for s in batch
        ]
        self._producer.flush(timeout=_SEND_TIMEOUT_S)
        for future in futures:
            future.get(timeout=_SEND_TIMEOUT_S)  # raises if a send failed: then nothing is committed
        return [False] * len(batch)

    def probe(self) -> None:
        """Raise unless the cluster answers a metadata request."""
        if not broker_answers(self._bootstrap, timeout_s=3.0):
            raise SinkUnavailable(f"Kafka at {self._bootstrap} does not answer")


class HistorySink(Sink):
    """Writes the lake, exactly once: the rows and their partitions' next offsets commit in one transaction, so a
    replayed or raced record (its offset already recorded, or its id seen within the window) is a duplicate."""

    name = "history"

    def __init__(self, history: History, compact_every: int = COMPACT_CHECK_EVERY) -> None:
        super().__init__()
        self._history = history
        self._compact_every = compact_every
        self._writes = 0

    def write(self, batch: Sequence[Scored]) -> list[bool]:
        """Insert the rows whose id is new; report the others as duplicates."""
        if not batch:
            return []
        # Rows carry their Kafka coordinates: the lake records offset + 1 per partition with them.
        result = self._history.write_batch([news_row(s) for s in batch])
        raced = set(result.duplicates)
        self._writes += 1
        if self._writes % self._compact_every == 0:
            self._maybe_compact()
        # A repeated id inside one batch cannot reach a sink: the scorer drops in-batch repeats first.
        return [s.item.id in raced for s in batch]

    def _maybe_compact(self) -> None:
        # Small files and inlined rows pile up one batch at a time; merging them keeps reads and writes flat.
        # The rows are written already: a compaction that fails is retried at the next check, not the batch.
        try:
            lake = self._history.lake
            if lake.maintenance_due():
                done = lake.compact()
                log.info("event=lake_compacted result=%s", done)
        except Exception as e:
            log.warning("event=lake_compaction_failed error=%s detail=%r", type(e).__name__, str(e)[:200])

    def probe(self) -> None:
        """Raise unless the lake could take a write now (its writers' turn, its catalog, its data dir)."""
        try:
            self._history.lake.probe()
        except Exception as e:
            raise SinkUnavailable(f"the history cannot be written: {e}") from e


def scored_value(scored: Scored) -> bytes:
    """Encode the `news.scored` record of one scored item."""
    item, prediction = scored.item, scored.prediction
    return json.dumps(
        {
            "id": item.id,
            "published_at": item.published_at.isoformat(),
            "source": item.source,
            "tickers": list(item.tickers),
            "text": item.text,
            **_answer_fields(prediction),
            "versions": {task: prediction.answer(task).version for task in task_names()},
            "language": prediction.language,
            "outcome": prediction.outcome,
            "scored_at": scored.scored_at.isoformat(),
        },
        ensure_ascii=False,
    ).encode("utf-8")


def _answer_fields(prediction: Prediction) -> dict[str, Any]:
    """Return the `news.scored` fields of every task's answer: `<task>`, `<task>_confidence` and `<task>_scores`
    where the task keeps every label's probability."""
    fields: dict[str, Any] = {}
    for spec in specs():
        answer = prediction.answer(spec.name)
        fields[spec.name] = answer.label
        fields[spec.confidence_column] = round(answer.confidence, 6)
        if answer.scores is not None:
            fields[spec.scores_field] = {k: round(v, 6) for k, v in answer.scores.items()}
    return fields


def _answer_columns(prediction: Prediction) -> dict[str, Any]:
    """Return the history columns of the answers of the tasks `news` stores."""
    columns: dict[str, Any] = {}
    for spec in NEWS_TASKS:
        answer = prediction.answer(spec.name)
        columns[spec.name] = answer.label
        columns[spec.confidence_column] = answer.confidence
        columns[spec.version_column] = answer.version
        if answer.scores is not None:
            probabilities = (answer.scores[label] for label in spec.labels)
            columns.update(zip(spec.probability_column_names, probabilities, strict=True))
    return columns


def news_row(scored: Scored) -> NewsRow:
    """Build the history row of one scored item."""
    record, item, prediction = scored.record, scored.item, scored.prediction
    return NewsRow(
        id=item.id,
        published_at=item.published_at,
        source=item.source,
        text=item.text,
        tickers=item.tickers,
        scored_at=scored.scored_at,
        kafka_topic=record.topic,
        kafka_partition=record.partition,
        kafka_offset=record.offset,
        language=prediction.language,
        outcome=prediction.outcome,
        **_answer_columns(prediction),
    )
