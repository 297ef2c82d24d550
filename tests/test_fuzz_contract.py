"""Property-based fuzzing of the per-record path: bytes → parse → row → history write, on a real DuckDB file.

Whatever a producer sends, nothing escapes: every value ends as a dead letter that encodes, or as a row that
the history stores (or recognises as a duplicate). Mutations of a valid message reach the deep branches that
arbitrary bytes rarely do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learner.model import Prediction
from storage import History
from storage.config import StorageConfig
from storage.schema import NEWS_COLUMNS, NULLABLE_NEWS_COLUMNS
from stream.messages import OPTIONAL_FIELDS, REQUIRED_FIELDS, Invalid, NewsItem, dead_letter, parse_news
from stream.sinks import Scored, news_row, scored_value

LIMIT = 8192
PREDICTION = Prediction(
    "neutral", 0.5, {"negative": 0.2, "neutral": 0.5, "positive": 0.3}, "Markets", 0.5, "sentiment-v1", "topic-v1"
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass(frozen=True)
class _Record:
    """The fields of a Kafka ConsumerRecord that the per-record path reads."""

    value: bytes | None
    topic: str = "news.raw"
    partition: int = 0
    offset: int = 0


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    history = History(StorageConfig(duckdb_path=tmp_path_factory.mktemp("fuzz") / "history.duckdb"))
    history.ensure_schema()
    return history


def _through(history: History, value: bytes | None) -> str:
    """Run one value through the whole per-record path; return how it ended."""
    record = _Record(value)
    parsed = parse_news(value, LIMIT)
    if isinstance(parsed, Invalid):
        letter = json.loads(dead_letter(value, parsed, record.topic, record.partition, record.offset))
        assert letter["reason"] == parsed.reason.value
        return "dead_lettered"
    assert isinstance(parsed, NewsItem)
    scored = Scored(record, parsed, PREDICTION, datetime.now(UTC))
    json.loads(scored_value(scored))  # the news.scored value encodes and decodes
    result = history.write_batch([news_row(scored)])
    return "scored" if result.inserted else "duplicate"


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Strings with what breaks encoders: lone surrogates, NUL, zero-width and bidi characters.
_nasty_text = st.text(
    alphabet=st.characters(codec=None, categories=None)
    | st.sampled_from(["\ud800", "\udfff", "\x00", "\u200b", "\u202e"]),
    max_size=40,
)
_times = st.sampled_from(
    [
        "2024-03-01T12:00:00Z",
        "2024-03-01T12:00:00+05:30",
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
        "2024-13-01T00:00:00Z",
        "2024-03-01 12:00",
        "",
    ]
)


@st.composite
def _mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message with fields dropped, retyped or replaced by nasty strings."""
    message: dict[str, Any] = {
        "id": draw(st.uuids()).hex,
        "text": "Oil slides as inventories build",
        "published_at": "2024-03-01T12:00:00Z",
        "source": "wire",
        "tickers": ["XOM", "$CVX"],
    }
    for name in draw(st.lists(st.sampled_from(sorted(message)), unique=True)):
        action = draw(st.sampled_from(["drop", "null", "nasty", "any", "time"]))
        if action == "drop":
            message.pop(name)
        elif action == "null":
            message[name] = None
        elif action == "nasty":
            message[name] = [draw(_nasty_text)] if name == "tickers" else draw(_nasty_text)
        elif action == "time":
            message[name] = draw(_times)
        else:
            message[name] = draw(_json_values)
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a producer in another language might send them.
    return json.dumps(message, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(value=st.binary(max_size=300) | st.none())
def test_arbitrary_bytes_never_escape(history: History, value: bytes | None) -> None:
    assert _through(history, value) in {"dead_lettered", "scored", "duplicate"}


@FUZZ
@given(payload=_json_values)
def test_arbitrary_json_never_escapes(history: History, payload: object) -> None:
    value = json.dumps(payload, allow_nan=True).encode("utf-8", "surrogatepass")
    assert _through(history, value) in {"dead_lettered", "scored", "duplicate"}


@FUZZ
@given(value=_mutated_messages())
def test_mutated_valid_messages_never_escape(history: History, value: bytes) -> None:
    assert _through(history, value) in {"dead_lettered", "scored", "duplicate"}


def test_deeply_nested_json_is_dead_lettered(history: History) -> None:
    for value in (b"[" * 20_000 + b"]" * 20_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        assert _through(history, value) == "dead_lettered"


def test_contract_and_schema_agree() -> None:
    """An optional field of news.raw is never a NOT NULL column (source once was, and crashed the scorer)."""
    columns = dict(NEWS_COLUMNS)
    for name in REQUIRED_FIELDS:
        assert name in columns and name not in NULLABLE_NEWS_COLUMNS
    for name in OPTIONAL_FIELDS:
        # tickers is stored as an empty list when absent; the others as NULL.
        assert name in columns
        assert name in NULLABLE_NEWS_COLUMNS or columns[name].endswith("[]")


def test_readme_names_the_same_optional_fields() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in OPTIONAL_FIELDS:
        assert f'"{name}"' in readme or f"`{name}`" in readme
