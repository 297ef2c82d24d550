"""The `news.labels` contract and its consumer: analysts' labels into DuckDB, bad ones to the dead-letter topic.

A label value is UTF-8 JSON `{"id", "text", "sentiment"?, "topic"?, "labelled_at", "labeller"?}` with at least
one of sentiment and topic. Offsets are committed only after the labels are stored and the dead letters
flushed, and the store is idempotent, so a crash replays a batch without losing or doubling a label.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from learner.labels import SENTIMENTS, TOPICS
from storage.labels import LabelRow, LabelStore
from stream.config import TopicNames
from stream.messages import MAX_ID_CHARS, Invalid, Reason, dead_letter, decode_object, parse_timestamp
from stream.scorer import next_offsets

log = logging.getLogger(__name__)

MAX_LABELLER_CHARS = 128


def parse_label(value: bytes | None, max_text_bytes: int) -> LabelRow | Invalid:
    """Validate one `news.labels` value against the contract."""
    payload = decode_object(value)
    return payload if isinstance(payload, Invalid) else _validate(payload, max_text_bytes)


def _validate(payload: dict[str, Any], max_text_bytes: int) -> LabelRow | Invalid:
    for name in ("id", "text", "labelled_at"):
        if payload.get(name) is None:
            return Invalid(Reason.MISSING_FIELD, f"required field {name!r} is missing")
        if not isinstance(payload[name], str):
            return Invalid(Reason.WRONG_TYPE, f"{name!r} must be a string, got {type(payload[name]).__name__}")
    label_id, text = payload["id"].strip(), payload["text"]
    if not label_id or not text.strip():
        return Invalid(Reason.EMPTY, f"{'id' if not label_id else 'text'!r} is empty")
    if len(label_id) > MAX_ID_CHARS:
        return Invalid(Reason.OVERSIZED, f"'id' has {len(label_id)} characters, the limit is {MAX_ID_CHARS}")
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return Invalid(Reason.OVERSIZED, f"'text' has {size} bytes, the limit is {max_text_bytes}")
    labelled_at = parse_timestamp(payload["labelled_at"])
    if labelled_at is None:
        return Invalid(Reason.BAD_TIMESTAMP, f"'labelled_at' is not RFC 3339: {payload['labelled_at'][:64]!r}")
    labels: dict[str, str | None] = {}
    for name, allowed in (("sentiment", SENTIMENTS), ("topic", TOPICS)):
        given = payload.get(name)
        if given is None:
            labels[name] = None
        elif not isinstance(given, str):
            return Invalid(Reason.WRONG_TYPE, f"{name!r} must be a string, got {type(given).__name__}")
        elif given not in allowed:
            shown = list(allowed) if len(allowed) <= 3 else f"one of the {len(allowed)} topics"
            return Invalid(Reason.UNKNOWN_LABEL, f"{name!r} is {given[:64]!r}; expected {shown}")
        else:
            labels[name] = given
    if labels["sentiment"] is None and labels["topic"] is None:
        return Invalid(Reason.MISSING_FIELD, "a label needs 'sentiment', 'topic' or both")
    labeller = payload.get("labeller")
    if labeller is not None and (not isinstance(labeller, str) or len(labeller) > MAX_LABELLER_CHARS):
        return Invalid(Reason.WRONG_TYPE, f"'labeller' must be a string of at most {MAX_LABELLER_CHARS} characters")
    return LabelRow(
        id=label_id,
        text=text,
        sentiment=labels["sentiment"],
        topic=labels["topic"],
        labelled_at=labelled_at,
        labeller=labeller,
    )


def label_value(
    label_id: str, text: str, labelled_at: str, sentiment: str | None = None, topic: str | None = None, **extra: Any
) -> bytes:
    """Encode a label as a `news.labels` value (used by labelling tools, the demo and tests)."""
    payload: dict[str, Any] = {"id": label_id, "text": text, "labelled_at": labelled_at}
    if sentiment is not None:
        payload["sentiment"] = sentiment
    if topic is not None:
        payload["topic"] = topic
    payload.update(extra)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class LabelBatch:
    """What one poll did."""

    consumed: int
    stored: int
    dead_lettered: int


class LabelConsumer:
    """Consume `news.labels` in a consumer group, store every valid label, dead-letter the rest."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: TopicNames,
        group_id: str,
        store: LabelStore,
        max_text_bytes: int,
        max_batch: int = 1000,
    ) -> None:
        self.topics = topics
        self.store = store
        self.max_text_bytes = max_text_bytes
        self.max_batch = max_batch
        self.consumer = KafkaConsumer(
            topics.labels,
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{group_id}-labels",
        )
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5)

    def poll(self, timeout_s: float) -> LabelBatch:
        """Read one batch (waiting up to `timeout_s`), store it, commit it."""
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=self.max_batch)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            return LabelBatch(0, 0, 0)
        rows: list[LabelRow] = []
        futures = []
        for record in records:
            parsed = parse_label(record.value, self.max_text_bytes)
            if isinstance(parsed, Invalid):
                value = dead_letter(record.value, parsed, record.topic, record.partition, record.offset)
                futures.append(self.producer.send(self.topics.dlq, key=record.key or b"label", value=value))
                log.warning("event=label_dead_lettered offset=%d reason=%s", record.offset, parsed.reason.value)
                continue
            rows.append(
                replace(parsed, kafka_topic=record.topic, kafka_partition=record.partition, kafka_offset=record.offset)
            )
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # a failed dead-letter send must not be committed past
        stored = self.store.write(rows) if rows else 0
        self.consumer.commit(next_offsets(records))
        return LabelBatch(len(records), stored, len(futures))

    def close(self) -> None:
        """Flush and leave the group."""
        try:
            self.producer.flush(timeout=10)
        finally:
            self.producer.close(timeout=10)
            self.consumer.close()
