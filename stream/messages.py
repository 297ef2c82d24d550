"""The `news.raw` contract: parse and validate one message, or say exactly why it is refused."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a message was dead-lettered; a closed set, so it can label a metric."""

    NOT_UTF8 = "not_utf8"
    INVALID_JSON = "invalid_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY = "empty"
    OVERSIZED = "oversized"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_LABEL = "unknown_label"


@dataclass(frozen=True)
class NewsItem:
    """A valid incoming headline or post."""

    id: str
    text: str
    published_at: datetime
    source: str | None
    tickers: tuple[str, ...]


@dataclass(frozen=True)
class Invalid:
    """A refused message: the reason code and a sentence for the person reading the dead-letter topic."""

    reason: Reason
    detail: str


# Ids are keys and primary keys: a bound keeps one bad producer from bloating indexes.
MAX_ID_CHARS = 256
MAX_TICKERS = 64


def decode_object(value: bytes | None) -> dict[str, Any] | Invalid:
    """Decode a Kafka value that must be a UTF-8 JSON object (the envelope of every finpulse topic)."""
    if value is None:
        return Invalid(Reason.EMPTY, "message has no value (tombstone)")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Invalid(Reason.NOT_UTF8, f"value is not UTF-8: {e.reason} at byte {e.start}")
    try:
        payload = json.loads(decoded)
    except json.JSONDecodeError as e:
        return Invalid(Reason.INVALID_JSON, f"value is not JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(payload, dict):
        return Invalid(Reason.NOT_OBJECT, f"value must be a JSON object, got {type(payload).__name__}")
    return payload


def parse_news(value: bytes | None, max_text_bytes: int) -> NewsItem | Invalid:
    """Validate one `news.raw` value against the contract."""
    payload = decode_object(value)
    return payload if isinstance(payload, Invalid) else _validate(payload, max_text_bytes)


def _validate(payload: dict[str, Any], max_text_bytes: int) -> NewsItem | Invalid:
    for name in ("id", "text", "published_at"):
        if name not in payload or payload[name] is None:
            return Invalid(Reason.MISSING_FIELD, f"required field {name!r} is missing")
    for name in ("id", "text", "published_at"):
        if not isinstance(payload[name], str):
            return Invalid(Reason.WRONG_TYPE, f"{name!r} must be a string, got {type(payload[name]).__name__}")
    item_id, text = payload["id"].strip(), payload["text"]
    if not item_id:
        return Invalid(Reason.EMPTY, "'id' is empty")
    if len(item_id) > MAX_ID_CHARS:
        return Invalid(Reason.OVERSIZED, f"'id' has {len(item_id)} characters, the limit is {MAX_ID_CHARS}")
    if not text.strip():
        return Invalid(Reason.EMPTY, "'text' is empty")
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return Invalid(Reason.OVERSIZED, f"'text' has {size} bytes, the limit is {max_text_bytes}")
    published = parse_timestamp(payload["published_at"])
    if published is None:
        return Invalid(Reason.BAD_TIMESTAMP, f"'published_at' is not RFC 3339: {payload['published_at'][:64]!r}")
    source = payload.get("source")
    if source is not None and not isinstance(source, str):
        return Invalid(Reason.WRONG_TYPE, f"'source' must be a string, got {type(source).__name__}")
    tickers = payload.get("tickers")
    if tickers is None:
        tickers = []
    if not isinstance(tickers, list) or not all(isinstance(t, str) for t in tickers):
        return Invalid(Reason.WRONG_TYPE, "'tickers' must be a list of strings")
    if len(tickers) > MAX_TICKERS:
        return Invalid(Reason.OVERSIZED, f"'tickers' has {len(tickers)} entries, the limit is {MAX_TICKERS}")
    return NewsItem(item_id, text, published, source, tuple(t.strip().upper().lstrip("$") for t in tickers))


def parse_timestamp(value: str) -> datetime | None:
    """Parse RFC 3339 with an offset into UTC; None when it is not."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    # RFC 3339 requires an offset; a naive time would be guessed, so it is refused.
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def dead_letter(value: bytes | None, invalid: Invalid, topic: str, partition: int, offset: int) -> bytes:
    """Build the `news.dlq` record: the reason, where it came from, and the original bytes."""
    raw: str | None
    encoding = "utf-8"
    if value is None:
        raw = None
    else:
        try:
            raw = value.decode("utf-8")
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(value).decode("ascii"), "base64"
    record = {
        "error": f"{invalid.reason.value}: {invalid.detail}",
        "reason": invalid.reason.value,
        "raw": raw,
        "raw_encoding": encoding,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "dead_lettered_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def news_value(item: NewsItem) -> bytes:
    """Encode a news item as a `news.raw` value (used by producers, the demo and tests)."""
    payload: dict[str, Any] = {
        "id": item.id,
        "text": item.text,
        "published_at": item.published_at.isoformat(),
    }
    if item.source is not None:
        payload["source"] = item.source
    if item.tickers:
        payload["tickers"] = list(item.tickers)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")
