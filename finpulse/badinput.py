"""A catalogue of bad and edge `news.raw` inputs, each with what a demanding operator expects the scorer to do.

The rule behind every `expect`: a message is scored only when it is UTF-8 JSON as RFC 8259 defines it, an
object, and every field the contract names that is present is well formed (`id`, `text`, `published_at`
required; `source` and `tickers` optional). Absent or null optional fields are fine (the README calls them
optional); unknown small fields are ignored. Everything else is dead-lettered: garbage never becomes a row,
and nothing a single record holds may stop a scorer. Where that rule leaves room, the choice is in a comment.

`published_at` must be RFC 3339 (section 5.6), which is stricter than Python's `datetime.fromisoformat`:
no ISO 8601 basic or week formats, seconds and a `+HH:MM` offset (or `Z`) required, `.` before fractions.

Every id embeds the run id, so the outcome of each kind is unambiguous within a run; the benchmark matches
dead letters and rows to the produced record by topic, partition and offset, so a mangled id is still found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Expect = Literal["dead_letter", "scored"]

DEFAULT_MAX_TEXT_BYTES = 8192  # scorer.max_text_bytes by default
SOURCE = "faults-bench"
# A fixed, valid publication time for catalogue cases; the steady stream uses the current time.
PUBLISHED_AT = "2026-03-02T14:30:00Z"
TEXT = "Oil slides 4% as OPEC+ signals higher output; energy stocks fall"
# Deep enough to exhaust any recursive parser's stack (CPython's json raises RecursionError near 1,000).
DEPTH = 100_000
# An unknown field this large is abuse, not news; still under the broker's 1 MiB message limit with the
# rest of the message and the dead letter's envelope around it.
EXTRA_BYTES = 1_000_000
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff\u2060"


@dataclass(frozen=True)
class Case:
    """One kind of input: its Kafka value and key, and the outcome a demanding operator expects."""

    kind: str
    value: bytes | None
    key: bytes | None
    expect: Expect


def valid_message(id: str, text: str) -> bytes:
    """Return a valid `news.raw` value with this id and text, published now."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return _dump({"id": id, "text": text, "published_at": now, "source": SOURCE, "tickers": ["SPY"]})


def cases(run_id: str, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[Case]:
    """Return every catalogue case for one run; ids embed `run_id` and are unique within it."""
    built = [
        Case(kind, value, _id(run_id, kind).encode() if key is _ID else key, expect)
        for kind, expect, value, key in _build(run_id, max_text_bytes)
    ]
    kinds = [c.kind for c in built]
    if len(kinds) != len(set(kinds)):
        raise ValueError("catalogue kinds must be distinct")
    return built


def _id(run_id: str, kind: str) -> str:
    return f"faults-{run_id}-{kind}"


def _dump(payload: Any, ascii_only: bool = False) -> bytes:
    # ensure_ascii=True writes lone surrogates as `\udXXX` escapes: valid UTF-8 bytes, invalid text.
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8")


# The key every case gets unless it is about keys: its id, as the contract says.
_ID = b"<id>"


def _build(run_id: str, limit: int) -> list[tuple[str, Expect, bytes | None, bytes | None]]:
    """Return (kind, expect, value, key) for every case."""

    def ok(kind: str, **changes: Any) -> dict[str, Any]:
        """A valid payload for `kind`, with fields replaced (a value of `...` removes the field)."""
        payload: dict[str, Any] = {
            "id": _id(run_id, kind),
            "text": TEXT,
            "published_at": PUBLISHED_AT,
            "source": SOURCE,
            "tickers": ["XOM", "CVX"],
        }
        for name, value in changes.items():
            if value is ...:
                payload.pop(name, None)
            else:
                payload[name] = value
        return payload

    def raw_with(kind: str, text_bytes: bytes) -> bytes:
        """A valid payload whose text holds these raw bytes (which may not be UTF-8)."""
        head = _dump(ok(kind, text="PLACEHOLDER"))
        return head.replace(b"PLACEHOLDER", text_bytes)

    def appended(kind: str, member: bytes, replacing: str | None = None) -> bytes:
        """A valid payload (without field `replacing`) with one more member spliced in as raw JSON text."""
        payload = ok(kind, **({replacing: ...} if replacing else {}))
        return _dump(payload)[:-1] + b", " + member + b"}"

    out: list[tuple[str, Expect, bytes | None, bytes | None]] = []

    def dead(kind: str, value: bytes | None) -> None:
        out.append((kind, "dead_letter", value, _ID))

    def scored(kind: str, value: bytes, key: bytes | None = _ID) -> None:
        out.append((kind, "scored", value, key))

    def field(kind: str, expect: Expect, **changes: Any) -> None:
        out.append((kind, expect, _dump(ok(kind, **changes)), _ID))

    def escaped(kind: str, expect: Expect, **changes: Any) -> None:
        """Like `field`, with every non-ASCII character written as a JSON escape (surrogates included)."""
        out.append((kind, expect, _dump(ok(kind, **changes), ascii_only=True), _ID))

    # -- bytes that are not UTF-8 -----------------------------------------------------------------------------
    dead("utf8_lone_continuation_byte", raw_with("utf8_lone_continuation_byte", b"Oil \x80 slides"))
    dead("utf8_overlong_slash", raw_with("utf8_overlong_slash", b"Oil \xc0\xaf slides"))
    # Java's "modified UTF-8" NUL: decoders that accept it let a NUL through every later check.
    dead("utf8_overlong_nul", raw_with("utf8_overlong_nul", b"Oil \xc0\x80 slides"))
    dead("utf8_truncated_sequence", raw_with("utf8_truncated_sequence", b"Oil costs \xe2\x82"))
    # CESU-8: a surrogate encoded as three bytes; lenient decoders produce a lone surrogate from it.
    dead("cesu8_encoded_surrogate", raw_with("cesu8_encoded_surrogate", b"Oil \xed\xa0\x80 slides"))
    dead("utf8_above_max_code_point", raw_with("utf8_above_max_code_point", b"Oil \xf4\x90\x80\x80 slides"))
    dead("latin1_text", raw_with("latin1_text", "Café Zürich: oil slides".encode("latin-1")))
    dead("utf16_with_bom", json.dumps(ok("utf16_with_bom")).encode("utf-16"))
    # UTF-16-BE without a BOM is valid UTF-8 (every byte is < 0x80), just NULs between the characters.
    dead("utf16_be_without_bom", json.dumps(ok("utf16_be_without_bom")).encode("utf-16-be"))
    # Debatable: RFC 8259 §8.1 lets parsers ignore a BOM, but forbids sending one; refused, so the producer hears.
    dead("utf8_bom_prefix", b"\xef\xbb\xbf" + _dump(ok("utf8_bom_prefix")))

    # -- no value, or nothing in it -----------------------------------------------------------------------------
    dead("empty_value", b"")
    dead("tombstone", None)
    dead("whitespace_value", b" \t\r\n ")
    dead("nul_bytes_value", b"\x00\x00\x00\x00")

    # -- not JSON -------------------------------------------------------------------------------------------------
    ident = _id(run_id, "x")
    dead("not_json_garbage", b"{not json")
    dead("not_json_plain_text", TEXT.encode())
    dead("not_json_truncated_object", _dump(ok("not_json_truncated_object"))[:-20])
    dead("not_json_single_quotes", f"{{'id': '{ident}-1', 'text': 'Oil', 'published_at': '{PUBLISHED_AT}'}}".encode())
    dead("not_json_trailing_comma", _dump(ok("not_json_trailing_comma"))[:-1] + b",}")
    dead("not_json_comment", appended("not_json_comment", b'"note": 1 /* a comment */'))
    dead("not_json_trailing_garbage", _dump(ok("not_json_trailing_garbage")) + b" trailing")
    # Two messages glued together: taking the first would silently drop the second.
    dead("not_json_two_objects", _dump(ok("not_json_two_objects")) + _dump(ok("not_json_two_objects_2")))
    dead("nan_literal", b"NaN")
    dead("infinity_literal", b"-Infinity")
    # NaN is not RFC 8259 JSON even where the field is unknown; Python's json accepts it by default.
    dead("nan_in_extra_field", appended("nan_in_extra_field", b'"score": NaN'))
    dead("infinity_as_id", _dump(ok("infinity_as_id", id=float("inf"))))

    # -- JSON, but not an object ----------------------------------------------------------------------------------
    dead("json_array", b"[1, 2, 3]")
    dead("json_string", b'"Oil slides"')
    dead("json_number", b"42")
    dead("json_null", b"null")
    dead("json_true", b"true")
    # A producer that serialised twice: a string holding the object.
    dead("json_double_encoded", json.dumps(_dump(ok("json_double_encoded")).decode()).encode())
    dead("number_1e999_top_level", b"1e999")

    # -- nesting that exhausts recursive parsers (the nastiest: a RecursionError escapes `except ValueError`) -------
    dead("nested_arrays_100k", b"[" * DEPTH + b"]" * DEPTH)
    dead("nested_objects_100k", b'{"a":' * DEPTH + b"1" + b"}" * DEPTH)
    # Debatable: valid JSON in an unknown field, but a denial of service whatever field it sits in.
    dead("nested_100k_in_extra_field", appended("nested_100k_in_extra_field", b'"x": ' + b"[" * DEPTH + b"]" * DEPTH))

    # -- numbers beyond any float or int the code expects ---------------------------------------------------------
    dead("number_1e999_as_id", appended("number_1e999_as_id", b'"id": 1e999', "id"))
    dead("number_neg_1e999_as_text", appended("number_neg_1e999_as_text", b'"text": -1e999', "text"))
    # CPython (3.11+) refuses to parse integers over 4,300 digits with a ValueError that is not a JSONDecodeError.
    huge = b"1" + b"0" * 4999
    dead("integer_5000_digits_as_id", appended("integer_5000_digits_as_id", b'"id": ' + huge, "id"))
    dead(
        "integer_5000_digits_in_tickers",
        appended("integer_5000_digits_in_tickers", b'"tickers": [' + huge + b"]", "tickers"),
    )

    # -- duplicate keys (RFC 8259: names SHOULD be unique; parsers disagree on which one wins) -------------------
    # Debatable: Python keeps the last; refused because another consumer of the same bytes may keep the first.
    first, second = _id(run_id, "duplicate_key_id"), _id(run_id, "duplicate_key_id_2")
    dead(
        "duplicate_key_id",
        f'{{"id": "{first}", "id": "{second}", "text": "{TEXT}", "published_at": "{PUBLISHED_AT}"}}'.encode(),
    )
    dead("duplicate_key_text", appended("duplicate_key_text", b'"text": "Oil jumps 4% as OPEC+ cuts output"'))

    # -- required fields missing, null, or of the wrong type --------------------------------------------------------
    for name in ("id", "text", "published_at"):
        field(f"missing_{name}", "dead_letter", **{name: ...})
        field(f"null_{name}", "dead_letter", **{name: None})
    for name in ("id", "text", "published_at"):
        for kind, wrong in (("number", 12345), ("list", ["a", "b"]), ("object", {"a": 1}), ("bool", True)):
            field(f"{name}_{kind}", "dead_letter", **{name: wrong})

    # -- ids --------------------------------------------------------------------------------------------------------
    field("id_empty", "dead_letter", id="")
    field("id_whitespace", "dead_letter", id=" \t  ")
    field("id_257_chars", "dead_letter", id=(_id(run_id, "id_257_chars") + "-").ljust(257, "x"))
    # NUL ends a C string: logs, Postgres (a DuckLake catalog) and many tools cut the id there or refuse it.
    field("id_with_nul", "dead_letter", id=_id(run_id, "id_with_nul") + "\x00tail")
    field("id_with_control_chars", "dead_letter", id=_id(run_id, "id_with_control_chars") + "\x01\x1f")
    field("id_with_newline", "dead_letter", id=_id(run_id, "id_with_newline") + "\nINFO forged log line")
    field("id_256_chars", "scored", id=(_id(run_id, "id_256_chars") + "-").ljust(256, "x"))
    field("id_non_ascii", "scored", id=_id(run_id, "id_non_ascii") + "-ニュース-é")
    # Stored as given: the history binds values, it never splices them into SQL.
    field("id_sql_injection", "scored", id=_id(run_id, "id_sql_injection") + "'; DROP TABLE news; --")
    # Debatable: stored under the stripped id, as stream/messages.py does; an id is an identifier, not text.
    field("id_padded_with_spaces", "scored", id=f"  {_id(run_id, 'id_padded_with_spaces')}  ")

    # -- unpaired surrogates: valid JSON escapes, but not Unicode text; UTF-8 encoding them raises later ------------
    # (in `text` at the size check, in `id` at the Kafka key, in `source` and tickers at the news.scored encode).
    for tag, bad in (("d800", "\ud800"), ("dfff", "\udfff"), ("reversed_pair", "\ude00\ud83d")):
        escaped(f"surrogate_{tag}_in_text", "dead_letter", text=f"Oil {bad} slides")
        escaped(f"surrogate_{tag}_in_id", "dead_letter", id=_id(run_id, f"surrogate_{tag}_in_id") + bad)
        escaped(f"surrogate_{tag}_in_source", "dead_letter", source=f"Reuters{bad}")
        escaped(f"surrogate_{tag}_in_ticker", "dead_letter", tickers=["XOM", f"C{bad}X"])
    escaped("surrogate_pair_escaped_emoji", "scored", text="Oil to the moon \U0001f600 says desk")

    # -- text ---------------------------------------------------------------------------------------------------------
    field("text_empty", "dead_letter", text="")
    field("text_whitespace", "dead_letter", text=" \t\n\u00a0\u3000 ")
    # str.strip() keeps these: to a reader (and the model) the text is empty all the same.
    field("text_zero_width_only", "dead_letter", text=ZERO_WIDTH * 3)
    field("text_zero_width_and_spaces", "dead_letter", text=f" {ZERO_WIDTH} \u200b ")
    # Debatable: tweets carry no NUL; stripping it silently would change what analysts see, so it is refused.
    field("text_with_nul", "dead_letter", text="Oil \x00 slides")
    filler = (TEXT + " ") * (limit // len(TEXT) + 2)
    field("text_over_limit_ascii", "dead_letter", text=filler[: limit + 1])
    # Fewer characters than the limit, more bytes: a check on len(text) lets it through.
    field("text_over_limit_multibyte", "dead_letter", text="é" * (limit // 2 + 1))
    field("text_at_limit_ascii", "scored", text=filler[:limit])
    field("text_at_limit_multibyte", "scored", text="é" * (limit // 2))
    field("text_emoji_and_cjk", "scored", text="原油价格下跌 🛢️📉 石油輸出国機構が増産へ — $XOM")
    field("text_emoji_only", "scored", text="🚀🚀🚀")
    field("text_with_newlines_and_tabs", "scored", text="Oil slides\n\tEnergy stocks fall\r\nMore at 11")
    field("text_rtl_and_combining", "scored", text="النفط ينخفض — Z\u0335\u0321a\u0336l\u0337go oil")

    # -- published_at -----------------------------------------------------------------------------------------------
    for kind, stamp in (
        ("published_at_empty", ""),
        ("published_at_not_a_date", "yesterday, around noon"),
        ("published_at_naive", "2026-03-02T14:30:00"),
        ("published_at_date_only", "2026-03-02"),
        # Both are RFC 3339-valid, yet one step outside what datetime holds once converted to UTC
        # (OverflowError from astimezone, not ValueError). Refused: the history cannot store them.
        ("published_at_year_1_overflow", "0001-01-01T00:00:00+05:00"),
        ("published_at_year_9999_overflow", "9999-12-31T23:59:59-05:00"),
        ("published_at_month_13", "2026-13-02T14:30:00Z"),
        ("published_at_feb_30", "2026-02-30T14:30:00Z"),
        # Second 60 exists only as a leap second, at 23:59:60.
        ("published_at_second_60_midday", "2026-03-02T14:30:60Z"),
        ("published_at_year_10000", "10000-01-01T00:00:00Z"),
        # What fromisoformat accepts beyond RFC 3339: basic format, week dates, no seconds, comma fractions,
        # offsets without a colon or with seconds.
        ("published_at_iso_basic_format", "20260302T143000Z"),
        ("published_at_iso_week_date", "2026-W10-1T14:30:00Z"),
        ("published_at_no_seconds", "2026-03-02T14:30Z"),
        ("published_at_comma_fraction", "2026-03-02T14:30:00,5Z"),
        ("published_at_offset_without_colon", "2026-03-02T14:30:00+0530"),
        ("published_at_offset_with_seconds", "2026-03-02T14:30:00+05:30:15"),
        ("published_at_offset_24h", "2026-03-02T14:30:00+24:00"),
    ):
        field(kind, "dead_letter", published_at=stamp)
    for kind, stamp in (
        ("published_at_z", "2026-03-02T14:30:00Z"),
        ("published_at_plus_0530", "2026-03-02T20:00:00+05:30"),
        ("published_at_negative_zero_offset", "2026-03-02T14:30:00-00:00"),  # RFC 3339 §4.3: UTC, origin unknown
        ("published_at_lowercase_t_and_z", "2026-03-02t14:30:00z"),  # RFC 3339 §5.6 NOTE allows lower case
        ("published_at_nanoseconds", "2026-03-02T14:30:00.123456789Z"),  # any number of fraction digits
        # Debatable: RFC 3339 §5.6 NOTE lets applications use a space for readability; accepted.
        ("published_at_space_separator", "2026-03-02 14:30:00Z"),
        # Debatable: a real leap second is valid RFC 3339; datetime cannot hold it, so it is clamped, not refused.
        ("published_at_leap_second", "2016-12-31T23:59:60Z"),
        ("published_at_first_utc_instant", "0001-01-01T00:00:00Z"),
    ):
        field(kind, "scored", published_at=stamp)

    # -- tickers ----------------------------------------------------------------------------------------------------
    field("tickers_not_a_list", "dead_letter", tickers="XOM,CVX")
    field("tickers_object", "dead_letter", tickers={"XOM": 1})
    field("tickers_non_strings", "dead_letter", tickers=["XOM", 7, None])
    field("tickers_65_entries", "dead_letter", tickers=[f"T{n}" for n in range(65)])
    # Debatable: nothing is left after normalising ("$" strips to ""); refused rather than stored as "" tickers.
    field("tickers_empty_strings", "dead_letter", tickers=["", "  ", "$"])
    field("ticker_with_nul", "dead_letter", tickers=["XOM", "C\x00VX"])
    field("ticker_10kb", "dead_letter", tickers=["XOM", "C" * 10_240])
    field("tickers_64_entries", "scored", tickers=[f"T{n}" for n in range(64)])
    field("tickers_cashtags_lower_case", "scored", tickers=["$xom", "cvx"])

    # -- source -----------------------------------------------------------------------------------------------------
    field("source_number", "dead_letter", source=7)
    field("source_list", "dead_letter", source=["Reuters"])
    field("source_object", "dead_letter", source={"name": "Reuters"})
    # Debatable, settled by the README: a blank source is stored as NULL, like an absent one.
    field("source_empty_string", "scored", source="")
    # An ANSI escape in a source ends up in every terminal that tails the logs or the history.
    field("source_with_control_chars", "dead_letter", source="Reuters\x07\x1b[31m")

    # -- size -------------------------------------------------------------------------------------------------------
    # Debatable: unknown fields are ignored, but a 1 MB one is abuse; a news message is a few KB at most.
    dead("extra_field_1mb", appended("extra_field_1mb", b'"blob": "' + b"x" * EXTRA_BYTES + b'"'))

    # -- valid edge cases: all scored ---------------------------------------------------------------------------------
    field("valid_full", "scored")
    field("valid_without_source", "scored", source=...)
    field("valid_without_tickers", "scored", tickers=...)
    field("valid_minimal", "scored", source=..., tickers=...)
    field("valid_tickers_empty_list", "scored", tickers=[])
    field("valid_source_null", "scored", source=None)
    field("valid_tickers_null", "scored", tickers=None)
    field("valid_unknown_small_fields", "scored", lang="en", meta={"feed": "wire", "rank": 3}, url="https://x.test/a")
    scored("valid_surrounded_by_whitespace", b" \r\n\t" + _dump(ok("valid_surrounded_by_whitespace")) + b"\n ")
    # `\u0069d` is "id": the same member name, escaped.
    scored("valid_escaped_member_name", _dump(ok("valid_escaped_member_name")).replace(b'"id"', b'"\\u0069d"', 1))
    # The contract's key is the id, but the scorer reads the value only; these differ in the key alone.
    # Debatable: scored, because a wrong key costs per-id ordering across partitions, not correctness.
    scored("key_missing", _dump(ok("key_missing")), key=None)
    scored("key_not_utf8", _dump(ok("key_not_utf8")), key=b"\xff\xfe\x00key")
    scored("key_differs_from_id", _dump(ok("key_differs_from_id")), key=b"some-other-key")
    return out
