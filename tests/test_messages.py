"""The news.raw contract: every kind of bad input gets its reason; valid input parses exactly."""

import base64
import json
from datetime import UTC, datetime

import pytest

from finpulse.replay import malformed_values
from stream.messages import Invalid, NewsItem, Reason, dead_letter, news_value, parse_news

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
