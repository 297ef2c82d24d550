"""The `news.raw` contract: parse and validate one message, or say exactly why it is refused."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Final


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
    BAD_CHARACTERS = "bad_characters"
    BAD_TICKER = "bad_ticker"
    # Anything that raised while handling one record: the record is set aside, the stream goes on.
    UNPROCESSABLE = "unprocessable"


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


def unprocessable(error: BaseException) -> Invalid:
    """Describe an unexpected exception raised while handling one record, for its dead letter."""
    message = str(error)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "…"
    return Invalid(Reason.UNPROCESSABLE, f"{type(error).__name__}: {message}")


# A dead letter names the exception, it is not a log: a bound keeps one odd message from bloating the topic.
MAX_ERROR_CHARS = 500
# Ids are keys and primary keys: a bound keeps one bad producer from bloating indexes.
MAX_ID_CHARS = 256
MAX_TICKERS = 64


class _AmbiguousJSON(ValueError):
    """JSON that parsers disagree on: duplicate keys, NaN and Infinity (not JSON at all, RFC 8259)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # `{"id": "a", "id": "b"}` is one message to Python (the last wins) and another to a parser that keeps the
    # first: the same bytes must not mean two things downstream.
    found: dict[str, Any] = {}
    for key, item in pairs:
        if key in found:
            raise _AmbiguousJSON(f"the key {key[:40]!r} appears twice")
        found[key] = item
    return found


def _no_constant(name: str) -> Any:
    raise _AmbiguousJSON(f"{name} is not a JSON value")


def decode_object(value: bytes | None) -> dict[str, Any] | Invalid:
    """Decode a Kafka value that must be a UTF-8 JSON object (the envelope of every finpulse topic)."""
    if value is None:
        return Invalid(Reason.EMPTY, "message has no value (tombstone)")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Invalid(Reason.NOT_UTF8, f"value is not UTF-8: {e.reason} at byte {e.start}")
    try:
        payload = json.loads(decoded, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _AmbiguousJSON as e:
        return Invalid(Reason.INVALID_JSON, f"value is not strict JSON: {e}")
    except json.JSONDecodeError as e:
        return Invalid(Reason.INVALID_JSON, f"value is not JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except RecursionError:
        # The stdlib parser recurses per nesting level; a 100,000-deep value would otherwise escape as an error.
        return Invalid(Reason.INVALID_JSON, "value is nested too deeply to be a news object")
    except ValueError as e:
        # e.g. an integer past Python's 4,300-digit conversion limit.
        return Invalid(Reason.INVALID_JSON, f"value is not acceptable JSON: {str(e)[:120]}")
    if not isinstance(payload, dict):
        return Invalid(Reason.NOT_OBJECT, f"value must be a JSON object, got {type(payload).__name__}")
    return payload


def parse_news(value: bytes | None, max_text_bytes: int) -> NewsItem | Invalid:
    """Validate one `news.raw` value against the contract."""
    limit = max_value_bytes(max_text_bytes)
    if value is not None and len(value) > limit:
        return Invalid(Reason.OVERSIZED, f"the value has {len(value)} bytes, the limit is {limit}")
    payload = decode_object(value)
    return payload if isinstance(payload, Invalid) else _validate(payload, max_text_bytes)


def max_value_bytes(max_text_bytes: int) -> int:
    """Return the largest `news.raw` value accepted: room for a text at its limit, escaped, and the other fields."""
    # JSON may escape every character of a text as \uXXXX (6 bytes); ids, source and tickers are bounded too.
    return 6 * max_text_bytes + 32 * 1024


# The contract, once: which fields a `news.raw` value may carry and which are required. The history's schema
# takes its NULL-ability from here (storage must not contradict it), and tests check both against the README.
REQUIRED_FIELDS: Final = ("id", "text", "published_at")
OPTIONAL_FIELDS: Final = ("source", "tickers")

# Characters that show nothing: a text made only of these (zero-width spaces, BOMs, controls) says nothing.
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# In identifiers (id, source, tickers) no control or format character is meaningful: NUL, newlines, bidi marks.
_CONTROL_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs"})
# Texts are scraped tweets and headlines: stray controls (mojibake leaves U+009D in real tweets) are noise the
# model ignores, but NUL is no text at all and breaks C-string tools downstream.
_TEXT_REFUSED: Final = frozenset("\x00")
# A ticker is a symbol: letters, digits and the separators exchanges use (BRK.B, BTC-USD, ES=F, ^GSPC, 600519.SS).
_TICKER: Final = re.compile(r"^[^\W_][\w.\-=^/:&]{0,31}$")
MAX_SOURCE_CHARS = 256


def _encodable(value: str) -> bool:
    """Return False for strings that UTF-8 cannot carry (lone surrogates from `\\ud800` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bad_characters(name: str, value: str, *, text: bool = False) -> Invalid | None:
    """Refuse lone surrogates everywhere, and control characters where they cannot mean anything (every contract)."""
    if not _encodable(value):
        return Invalid(Reason.BAD_CHARACTERS, f"{name!r} holds a lone UTF-16 surrogate, which UTF-8 cannot carry")
    for char in value:
        category = unicodedata.category(char)
        if text:
            if char in _TEXT_REFUSED:
                return Invalid(Reason.BAD_CHARACTERS, f"{name!r} holds the control character U+{ord(char):04X}")
        elif category in _CONTROL_CATEGORIES:
            return Invalid(Reason.BAD_CHARACTERS, f"{name!r} holds the control character U+{ord(char):04X}")
    return None


def _visible(text: str) -> bool:
    """Return True when `text` has at least one character that shows."""
    return any(not char.isspace() and unicodedata.category(char) not in _INVISIBLE_CATEGORIES for char in text)


def _validate(payload: dict[str, Any], max_text_bytes: int) -> NewsItem | Invalid:
    for name in REQUIRED_FIELDS:
        if name not in payload or payload[name] is None:
            return Invalid(Reason.MISSING_FIELD, f"required field {name!r} is missing")
    for name in REQUIRED_FIELDS:
        if not isinstance(payload[name], str):
            return Invalid(Reason.WRONG_TYPE, f"{name!r} must be a string, got {type(payload[name]).__name__}")
    item_id, text = payload["id"].strip(), payload["text"]
    if not item_id:
        return Invalid(Reason.EMPTY, "'id' is empty")
    if len(item_id) > MAX_ID_CHARS:
        return Invalid(Reason.OVERSIZED, f"'id' has {len(item_id)} characters, the limit is {MAX_ID_CHARS}")
    refused = bad_characters("id", item_id) or bad_characters("text", text, text=True)
    if refused is not None:
        return refused
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return Invalid(Reason.OVERSIZED, f"'text' has {size} bytes, the limit is {max_text_bytes}")
    if not _visible(text):
        return Invalid(Reason.EMPTY, "'text' is empty (nothing but spaces, controls or zero-width characters)")
    published = parse_timestamp(payload["published_at"])
    if published is None:
        shown = payload["published_at"][:64].encode("utf-8", "backslashreplace").decode("utf-8")
        return Invalid(Reason.BAD_TIMESTAMP, f"'published_at' is not an RFC 3339 time in range: {shown!r}")
    source = _source(payload.get("source"))
    if isinstance(source, Invalid):
        return source
    tickers = _tickers(payload.get("tickers"))
    if isinstance(tickers, Invalid):
        return tickers
    return NewsItem(item_id, text, published, source, tickers)


def _source(source: object) -> str | None | Invalid:
    """Validate the optional `source`: absent, null and blank all mean "no source"."""
    if source is None:
        return None
    if not isinstance(source, str):
        return Invalid(Reason.WRONG_TYPE, f"'source' must be a string, got {type(source).__name__}")
    source = source.strip()
    if len(source) > MAX_SOURCE_CHARS:
        return Invalid(Reason.OVERSIZED, f"'source' has {len(source)} characters, the limit is {MAX_SOURCE_CHARS}")
    refused = bad_characters("source", source)
    if refused is not None:
        return refused
    return source or None


def _tickers(tickers: object) -> tuple[str, ...] | Invalid:
    """Validate the optional `tickers`: absent and null mean none; each entry must be a symbol."""
    if tickers is None:
        return ()
    if not isinstance(tickers, list) or not all(isinstance(t, str) for t in tickers):
        return Invalid(Reason.WRONG_TYPE, "'tickers' must be a list of strings")
    if len(tickers) > MAX_TICKERS:
        return Invalid(Reason.OVERSIZED, f"'tickers' has {len(tickers)} entries, the limit is {MAX_TICKERS}")
    normalised: list[str] = []
    for raw in tickers:
        refused = bad_characters("tickers", raw)
        if refused is not None:
            return refused
        ticker = raw.strip().upper().lstrip("$")
        if not _TICKER.match(ticker):
            shown = raw[:40]
            return Invalid(Reason.BAD_TICKER, f"'tickers' entry {shown!r} is not a symbol (letters, digits, .-=^/:&)")
        if ticker not in normalised:
            normalised.append(ticker)
    return tuple(normalised)


# RFC 3339's date-time (section 5.6): full date, `T` (or, as its note allows, a space), full time with optional
# fraction, and `Z` or a ±hh:mm offset. Python's fromisoformat takes far more (week dates, basic format, no
# seconds, ±hhmm, commas), which other consumers of news.scored would not.
_RFC3339: Final = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


def parse_timestamp(value: str) -> datetime | None:
    """Parse RFC 3339 with an offset into UTC; None when it is not, or falls outside what UTC can hold."""
    match = _RFC3339.match(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, offset = match.group(7) or "", match.group(8)
    # A leap second (23:59:60) is valid RFC 3339 that Python cannot hold: it is read as the last microsecond
    # before it, which keeps its order among the other posts of that second.
    leap = second == 60
    microsecond = 999_999 if leap else int((fraction[1:] + "000000")[:6] or 0)
    try:
        parsed = datetime(year, month, day, hour, minute, 59 if leap else second, microsecond, tzinfo=_offset(offset))
        # 0001-01-01T00:00:00+05:00 is a valid string whose UTC instant falls before year 1.
        utc = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    # Leap seconds are inserted at the end of a UTC day only: 14:30:60 is no time at all.
    if leap and (utc.hour, utc.minute) != (23, 59):
        return None
    return utc


def _offset(text: str) -> timezone:
    """Return the tzinfo of an RFC 3339 offset (`Z` or ±hh:mm)."""
    if text in ("Z", "z"):
        return UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {text} is out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


# A dead letter must fit the broker's default message limit (1 MB) even for a raw value near that limit, which
# base64 would grow by a third: past this many bytes the raw value is cut, and `raw_bytes` keeps its size.
MAX_DEAD_LETTER_RAW_BYTES = 256 * 1024
MAX_DEAD_LETTER_BYTES = 900 * 1024


def dead_letter(value: bytes | None, invalid: Invalid, topic: str, partition: int, offset: int) -> bytes:
    """Build the `news.dlq` record: the reason, where it came from, and the original bytes (cut past 256 KiB)."""
    raw: str | None
    encoding = "utf-8"
    kept = value[:MAX_DEAD_LETTER_RAW_BYTES] if value is not None else None
    if kept is None:
        raw = None
    else:
        try:
            raw = kept.decode("utf-8")
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    record = {
        "error": f"{invalid.reason.value}: {invalid.detail}",
        "reason": invalid.reason.value,
        "raw": raw,
        "raw_encoding": encoding,
        "raw_bytes": None if value is None else len(value),
        "raw_truncated": value is not None and len(value) > MAX_DEAD_LETTER_RAW_BYTES,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "dead_lettered_at": datetime.now(UTC).isoformat(),
    }
    # backslashreplace: a detail quoting a lone surrogate must still encode.
    encoded = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
    if len(encoded) > MAX_DEAD_LETTER_BYTES and kept is not None:
        # Control characters escape to six bytes each in JSON; base64 grows by a third whatever the bytes.
        record["raw"], record["raw_encoding"] = base64.b64encode(kept).decode("ascii"), "base64"
        encoded = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
    return encoded


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
