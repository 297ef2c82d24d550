"""The news.raw contract: every kind of bad input gets its reason; valid input parses exactly."""

import base64
import json
from datetime import UTC, datetime

import pytest

from finpulse.replay import malformed_values
from stream.messages import Invalid, NewsItem, Reason, dead_letter, news_value, parse_news, parse_timestamp

LIMIT = 100
OK_TIME = "2024-03-01T12:00:00Z"


def _json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.EMPTY),
        (b"\xff\xfe\x00", Reason.NOT_UTF8),
        (b"{nope", Reason.INVALID_JSON),
        (b'"just a string"', Reason.NOT_OBJECT),
        (b"[1]", Reason.NOT_OBJECT),
        (_json(text="t", published_at=OK_TIME), Reason.MISSING_FIELD),
        (_json(id="a", published_at=OK_TIME), Reason.MISSING_FIELD),
        (_json(id="a", text="t"), Reason.MISSING_FIELD),
        (_json(id="a", text=None, published_at=OK_TIME), Reason.MISSING_FIELD),
        (_json(id=1, text="t", published_at=OK_TIME), Reason.WRONG_TYPE),
        (_json(id="a", text=["t"], published_at=OK_TIME), Reason.WRONG_TYPE),
        (_json(id="a", text="t", published_at=OK_TIME, source=3), Reason.WRONG_TYPE),
        (_json(id="a", text="t", published_at=OK_TIME, tickers="AAPL"), Reason.WRONG_TYPE),
        (_json(id="a", text="t", published_at=OK_TIME, tickers=[1]), Reason.WRONG_TYPE),
        (_json(id=" ", text="t", published_at=OK_TIME), Reason.EMPTY),
        (_json(id="a", text=" \n ", published_at=OK_TIME), Reason.EMPTY),
        (_json(id="a", text="é" * 51, published_at=OK_TIME), Reason.OVERSIZED),  # 102 bytes, 51 characters
        (_json(id="a" * 300, text="t", published_at=OK_TIME), Reason.OVERSIZED),
        (_json(id="a", text="t", published_at="2024-03-01 12:00"), Reason.BAD_TIMESTAMP),  # no offset
        (_json(id="a", text="t", published_at="yesterday"), Reason.BAD_TIMESTAMP),
    ],
)
def test_bad_input_gets_its_reason(value: bytes | None, reason: Reason) -> None:
    parsed = parse_news(value, LIMIT)
    assert isinstance(parsed, Invalid)
    assert parsed.reason is reason
    assert parsed.detail


def test_valid_message_parses_with_normalised_fields() -> None:
    value = _json(
        id=" n-1 ",
        text="$aapl beats",
        published_at="2024-03-01T13:00:00+01:00",
        source="wire",
        tickers=["$aapl", "MSFT "],
    )
    parsed = parse_news(value, LIMIT)
    assert parsed == NewsItem("n-1", "$aapl beats", datetime(2024, 3, 1, 12, tzinfo=UTC), "wire", ("AAPL", "MSFT"))


def test_text_at_the_limit_is_accepted() -> None:
    parsed = parse_news(_json(id="a", text="x" * LIMIT, published_at=OK_TIME), LIMIT)
    assert isinstance(parsed, NewsItem)


def test_news_value_round_trips() -> None:
    item = NewsItem("id-1", "Fed holds rates", datetime(2020, 4, 9, tzinfo=UTC), None, ("SPY",))
    assert parse_news(news_value(item), LIMIT) == item


def test_dead_letter_keeps_original_bytes_and_origin() -> None:
    raw = b"\x80\x81 not utf-8"
    invalid = parse_news(raw, LIMIT)
    assert isinstance(invalid, Invalid)
    record = json.loads(dead_letter(raw, invalid, "news.raw", 2, 41))
    assert record["reason"] == "not_utf8"
    assert record["error"].startswith("not_utf8: ")
    assert base64.b64decode(record["raw"]) == raw and record["raw_encoding"] == "base64"
    assert (record["topic"], record["partition"], record["offset"]) == ("news.raw", 2, 41)


def test_dead_letter_keeps_utf8_text_as_text() -> None:
    invalid = parse_news(b"{oops", LIMIT)
    assert isinstance(invalid, Invalid)
    record = json.loads(dead_letter(b"{oops", invalid, "t", 0, 0))
    assert (record["raw"], record["raw_encoding"]) == ("{oops", "utf-8")


def test_demo_malformed_set_matches_the_validator() -> None:
    for reason, value in malformed_values(LIMIT):
        parsed = parse_news(value, LIMIT)
        assert isinstance(parsed, Invalid), value
        assert parsed.reason.value == reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"id": "a", "id": "b", "text": "t", "published_at": "2024-03-01T12:00:00Z"}', Reason.INVALID_JSON),
        (b'{"id": "a", "text": "t", "published_at": "2024-03-01T12:00:00Z", "x": NaN}', Reason.INVALID_JSON),
        (b'{"id": "a", "text": "t", "published_at": "2024-03-01T12:00:00Z", "x": -Infinity}', Reason.INVALID_JSON),
        (b"[" * 40 + b"]" * 40, Reason.NOT_OBJECT),
        (b'{"n": 1' + b"0" * 5000 + b"}", Reason.INVALID_JSON),
        (_json(id="a", text="t", published_at=OK_TIME, pad="x" * (6 * LIMIT + 40_000)), Reason.OVERSIZED),
        (_json(id="a\x00b", text="t", published_at=OK_TIME), Reason.BAD_CHARACTERS),
        (json.dumps({"id": "a\ud800", "text": "t", "published_at": OK_TIME}).encode(), Reason.BAD_CHARACTERS),
        (_json(id="a", text="\u200b\u200d\ufeff", published_at=OK_TIME), Reason.EMPTY),
        (_json(id="a", text="t", published_at=OK_TIME, tickers=["", "$"]), Reason.BAD_TICKER),
        (_json(id="a", text="t", published_at=OK_TIME, source="wire\u0007"), Reason.BAD_CHARACTERS),
    ],
)
def test_values_that_once_crashed_or_misled_a_scorer(value: bytes, reason: Reason) -> None:
    parsed = parse_news(value, LIMIT)
    assert isinstance(parsed, Invalid) and parsed.reason is reason


@pytest.mark.parametrize(
    ("depth", "reason"), [(12_000, Reason.INVALID_JSON), (100_000, Reason.OVERSIZED)], ids=["12k-deep", "100k-deep"]
)
def test_deep_json_is_refused_before_or_by_the_parser(depth: int, reason: Reason) -> None:
    for value in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        parsed = parse_news(value, 8192)
        assert isinstance(parsed, Invalid) and parsed.reason is reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01T12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01t12:00:00.25z", datetime(2024, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)),
        ("2024-03-01 17:30:00+05:30", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),  # a leap second
        ("2016-12-31T18:59:60-05:00", datetime(2016, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        ("2024-03-01T14:30:60Z", None),  # leap seconds end a UTC day only
        ("2024-03-01T12:00Z", None),  # no seconds
        ("20240301T120000Z", None),  # ISO 8601 basic format
        ("2024-W09-5T12:00:00Z", None),  # week date
        ("2024-03-01T12:00:00+0530", None),  # offset without a colon
        ("2024-03-01T12:00:00,5Z", None),  # comma fraction
        ("2024-03-01T12:00:00", None),  # no offset: the zone would be guessed
        ("0001-01-01T00:00:00+05:00", None),  # before year 1 in UTC
        ("9999-12-31T23:59:59-05:00", None),  # after year 9999 in UTC
        ("2024-02-30T00:00:00Z", None),
    ],
)
def test_published_at_is_rfc3339_exactly(text: str, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


def test_an_absent_or_blank_source_is_none() -> None:
    for extra in ({}, {"source": None}, {"source": "  "}, {"tickers": None}):
        parsed = parse_news(_json(id="a", text="t", published_at=OK_TIME, **extra), LIMIT)
        assert isinstance(parsed, NewsItem) and parsed.source is None and parsed.tickers == ()
