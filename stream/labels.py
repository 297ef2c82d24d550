"""The `news.labels` contract and its consumer: analysts' labels into DuckDB, bad ones to the dead-letter topic.

A label value is UTF-8 JSON `{"id", "text", "sentiment"?, "topic"?, "labelled_at", "labeller"?, "domain"?}` with at
least one of sentiment and topic; without a domain, a label belongs to the domain of the news it labels. Offsets
are committed only after the labels are stored and the dead letters flushed, and the store is idempotent, so a
crash replays a batch without losing or doubling a label.

One record never stops the stream: whatever raises while it is handled sends it to the dead-letter topic as
`unprocessable`, with the exception. A batch that fails as a whole (the file locked, the broker away) is not
committed; its partitions are rewound and paused, polling goes on (the member stays in its group), and the
batch is read and stored again after a backoff.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError

from learner.domains import check_domain
from learner.tasks import labels_of
from storage import StorageError
from storage.labels import LABEL_TASKS, LabelRow, LabelStore
from stream.config import RECONNECT_BACKOFF_MAX_MS, TopicNames
from stream.connection import Target, client_kwargs
from stream.messages import (
    MAX_ID_CHARS,
    Invalid,
    Reason,
    bad_characters,
    dead_letter,
    decode_object,
    parse_timestamp,
    unprocessable,
)
from stream.scorer import next_offsets

log = logging.getLogger(__name__)

# kafka-python's ConsumerRecord; typed loosely because the library ships no annotations.
Record = Any
# What turns one value into a row or a refusal; `parse_label`, or a stand-in that raises in tests.
Parse = Callable[[bytes | None, int], LabelRow | Invalid]

MAX_LABELLER_CHARS = 128
# kafka-python's default: a member that does not poll for this long is dropped from the group.
DEFAULT_MAX_POLL_INTERVAL_MS: Final = 300_000
# A locked DuckDB file (a long analyst query, another writer) frees within seconds; a broker outage takes
# longer. Polling goes on during the wait, so even the longest one never costs the group membership.
RETRY_FIRST_S: Final = 0.5
RETRY_MAX_S: Final = 30.0


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
    refused = bad_characters("id", label_id) or bad_characters("text", text, text=True)
    if refused is not None:
        return refused
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return Invalid(Reason.OVERSIZED, f"'text' has {size} bytes, the limit is {max_text_bytes}")
    labelled_at = parse_timestamp(payload["labelled_at"])
    if labelled_at is None:
        return Invalid(Reason.BAD_TIMESTAMP, f"'labelled_at' is not RFC 3339: {payload['labelled_at'][:64]!r}")
    labels: dict[str, Any] = {}  # str | None each; Any so that it spreads into LabelRow's keywords
    for name in LABEL_TASKS:
        allowed = labels_of(name)
        given = payload.get(name)
        if given is None:
            labels[name] = None
        elif not isinstance(given, str):
            return Invalid(Reason.WRONG_TYPE, f"{name!r} must be a string, got {type(given).__name__}")
        elif given not in allowed:
            shown = list(allowed) if len(allowed) <= 3 else f"one of the {len(allowed)} {name}s"
            return Invalid(Reason.UNKNOWN_LABEL, f"{name!r} is {given[:64]!r}; expected {shown}")
        else:
            labels[name] = given
    if all(label is None for label in labels.values()):
        named = ", ".join(repr(name) for name in LABEL_TASKS)
        return Invalid(Reason.MISSING_FIELD, f"a label needs {named} or both")
    labeller = payload.get("labeller")
    if labeller is not None and (not isinstance(labeller, str) or len(labeller) > MAX_LABELLER_CHARS):
        return Invalid(Reason.WRONG_TYPE, f"'labeller' must be a string of at most {MAX_LABELLER_CHARS} characters")
    refused = bad_characters("labeller", labeller) if labeller is not None else None
    if refused is not None:
        return refused
    domain = payload.get("domain")
    if domain is not None:
        if not isinstance(domain, str):
            return Invalid(Reason.WRONG_TYPE, f"'domain' must be a string, got {type(domain).__name__}")
        try:
            check_domain(domain)
        except ValueError as e:
            return Invalid(Reason.WRONG_TYPE, f"'domain': {e}")
    return LabelRow(
        id=label_id,
        text=text,
        labelled_at=labelled_at,
        labeller=labeller,
        domain=domain,
        **labels,
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


_NOTHING: Final = LabelBatch(0, 0, 0)


class LabelConsumer:
    """Consume `news.labels` in a consumer group, store every valid label, dead-letter the rest."""

    def __init__(
        self,
        bootstrap_servers: Target,
        topics: TopicNames,
        group_id: str,
        store: LabelStore,
        max_text_bytes: int,
        max_batch: int = 1000,
        max_poll_interval_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS,
        parse: Parse = parse_label,
    ) -> None:
        """Consume as a member of `group_id`, dropped by the group if it does not poll for `max_poll_interval_ms`.

        `parse` turns one value into a row or a refusal: `parse_label`, or a stand-in that raises in tests.
        """
        self.topics = topics
        self.store = store
        self.max_text_bytes = max_text_bytes
        self.max_batch = max_batch
        self.max_poll_interval_ms = max_poll_interval_ms
        self.parse = parse
        self.consumer = KafkaConsumer(
            topics.labels,
            **client_kwargs(bootstrap_servers),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{group_id}-labels",
            max_poll_interval_ms=max_poll_interval_ms,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
        )
        self.producer = KafkaProducer(
            **client_kwargs(bootstrap_servers),
            acks="all",
            linger_ms=5,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
        )
        self._failing_since: float | None = None  # monotonic time of the first failure in a row
        self._failures = 0
        self._retry_at = 0.0

    @property
    def retrying(self) -> bool:
        """Return True while a batch that failed as a whole waits to be read and stored again."""
        return self._failing_since is not None

    def poll(self, timeout_s: float) -> LabelBatch:
        """Read one batch (waiting up to `timeout_s`), store it, commit it; a failed batch is read again later."""
        wait_s = self._retry_at - time.monotonic() if self.retrying else 0.0
        if self.retrying and wait_s <= 0:
            self.consumer.resume(*self.consumer.paused())
        timeout_ms = int(min(timeout_s, wait_s) * 1000) if wait_s > 0 else int(timeout_s * 1000)
        # While the partitions are paused this returns nothing, but it still counts as the member's poll.
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.max_batch)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            return _NOTHING
        if wait_s > 0:
            # Partitions a rebalance assigned during the wait are not paused yet: their records wait too.
            self._rewind(records)
            return _NOTHING
        try:
            batch = self._handle(records)
        except (StorageError, KafkaError) as e:
            self._failed(records, e)
            return _NOTHING
        if self.retrying:
            self._recovered()
        return batch

    def _handle(self, records: Sequence[Record]) -> LabelBatch:
        """Store the batch's labels, dead-letter the rest, then commit; raise if the batch as a whole failed."""
        rows: list[tuple[Record, LabelRow]] = []
        refused: list[tuple[Record, Invalid]] = []
        for record in records:
            handled = self._row(record)
            if isinstance(handled, Invalid):
                refused.append((record, handled))
            else:
                rows.append((record, handled))
        stored, unstorable = self._store(rows)
        refused.extend(unstorable)
        futures = [self._dead_letter(record, invalid) for record, invalid in refused]
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # a failed dead-letter send must not be committed past
        self._commit(records)
        return LabelBatch(len(records), stored, len(refused))

    def _row(self, record: Record) -> LabelRow | Invalid:
        """Return the record's row, or why it is refused; whatever raises sets this record aside, not the batch."""
        try:
            parsed = self.parse(record.value, self.max_text_bytes)
            if isinstance(parsed, Invalid):
                return parsed
            return replace(
                parsed, kafka_topic=record.topic, kafka_partition=record.partition, kafka_offset=record.offset
            )
        except Exception as e:  # contained: the record goes to the dead-letter topic with the exception
            return unprocessable(e)

    def _store(self, rows: list[tuple[Record, LabelRow]]) -> tuple[int, list[tuple[Record, Invalid]]]:
        """Write the rows in one transaction; a row the store cannot take is found and set aside."""
        if not rows:
            return 0, []
        try:
            return self.store.write([row for _, row in rows]), []
        except StorageError:
            raise  # the file failing: the whole batch is retried
        except Exception as e:  # not the file failing: some row in the batch is what the store cannot take
            log.warning(
                "event=label_batch_unstorable records=%d error_type=%s error=%r: storing them one by one",
                len(rows), type(e).__name__, str(e)[:200],
            )  # fmt: skip
        stored, unstorable = 0, []
        for record, row in rows:
            try:
                stored += self.store.write([row])
            except StorageError:
                raise
            except Exception as e:  # contained: this row, not the file, is what the store refuses
                unstorable.append((record, unprocessable(e)))
        return stored, unstorable

    def _dead_letter(self, record: Record, invalid: Invalid) -> Any:
        """Send one refused record to the dead-letter topic; return the send's future."""
        log.warning(
            "event=label_dead_lettered partition=%d offset=%d reason=%s detail=%r",
            record.partition, record.offset, invalid.reason.value, invalid.detail[:200],
        )  # fmt: skip
        key = record.key or b"label"
        value = dead_letter(record.value, invalid, record.topic, record.partition, record.offset)
        try:
            return self.producer.send(self.topics.dlq, key=key, value=value)
        except MessageSizeTooLargeError:
            # The original bytes, escaped into JSON (a control byte takes six), outgrow a Kafka message: say so
            # without them rather than fail the batch over and over.
            size = len(record.value or b"")
            invalid = replace(invalid, detail=f"{invalid.detail} (the {size}-byte value is too large to keep here)")
            value = dead_letter(None, invalid, record.topic, record.partition, record.offset)
            return self.producer.send(self.topics.dlq, key=key, value=value)

    def _commit(self, records: Sequence[Record]) -> None:
        try:
            self.consumer.commit(next_offsets(records))
        except CommitFailedError as e:
            # The partitions moved to another member, which reads them again; the idempotent store adds nothing.
            log.warning("event=label_commit_failed error=%r", str(e))

    def _rewind(self, records: Sequence[Record]) -> None:
        """Seek back to the first of `records` in each partition and pause every partition until the retry."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:  # a partition revoked meanwhile restarts from its committed offset elsewhere
                self.consumer.seek(tp, offset)
        self.consumer.pause(*assigned)

    def _failed(self, records: Sequence[Record], error: Exception) -> None:
        self._rewind(records)
        now = time.monotonic()
        self._failures += 1
        delay = min(RETRY_FIRST_S * 2 ** (self._failures - 1), RETRY_MAX_S)
        self._retry_at = now + delay
        if self._failing_since is None:
            self._failing_since = now
            level = logging.WARNING  # one line when the failing starts; the retries go to debug
        else:
            level = logging.DEBUG
        log.log(
            level,
            "event=label_batch_failing records=%d failures=%d error_type=%s error=%r retry_in_s=%.1f",
            len(records), self._failures, type(error).__name__, str(error), delay,
        )  # fmt: skip

    def _recovered(self) -> None:
        failing_s = time.monotonic() - (self._failing_since or time.monotonic())
        # At the failure's level, so whoever saw it start sees it end.
        log.warning("event=label_batch_recovered failures=%d failing_s=%.1f", self._failures, failing_s)
        self._failing_since, self._failures, self._retry_at = None, 0, 0.0

    def close(self) -> None:
        """Flush and leave the group."""
        try:
            self.producer.flush(timeout=10)
        finally:
            self.producer.close(timeout=10)
            self.consumer.close()
