"""`finpulse plot sentiment`: the negative share per bucket, its trailing baseline and alert firings, as a PNG."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from finpulse.cli import main
from finpulse.plot import BASELINE_BUCKETS, sentiment_series
from storage import History, StorageConfig
from storage.history import NewsRow

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


def _row(n: int, at: dt.datetime, sentiment: str, topic: str = "Energy / Oil", outcome: str = "scored") -> NewsRow:
    return NewsRow(
        id=f"n-{n}",
        published_at=at,
        source="wire",
        text=f"headline {n}",
        tickers=(),
        topic=topic,
        topic_confidence=0.9,
        sentiment=sentiment,
        sentiment_confidence=0.9,
        sentiment_negative=0.9 if sentiment == "negative" else 0.05,
        sentiment_neutral=0.05,
        sentiment_positive=0.05 if sentiment == "negative" else 0.9,
        topic_version="topic-v1",
        sentiment_version="sentiment-v1",
        scored_at=at,
        outcome=outcome,
        language="en",
    )


@pytest.fixture
def history(tmp_path: Path) -> History:
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    history.ensure_schema()
    rows = []
    # An hour of 1-in-5 negative news, then ten minutes where four in five are negative.
    for minute in range(70):
        for k in range(5):
            negative = k == 0 or (minute >= 60 and k < 4)
            rows.append(_row(minute * 5 + k, T0 + dt.timedelta(minutes=minute), "negative" if negative else "positive"))
    rows.append(_row(9999, T0 + dt.timedelta(minutes=65), "negative", outcome="unsupported_language"))
    history.write_batch(rows)
    with history.transaction("an alert") as con:
        con.execute(
            "INSERT INTO alerts (id, notification_id, status, alertname, topic, starts_at, received_at) "
            "VALUES ('a1', 'n1', 'firing', 'NegativeSentimentSpike', 'Energy / Oil', ?::TIMESTAMPTZ, now())",
            [(T0 + dt.timedelta(minutes=62)).isoformat()],
        )
    return history


def test_series_follows_the_rows_and_leaves_unread_text_out(history: History) -> None:
    series = sentiment_series(history, topic="Energy / Oil")
    assert series.bucket_s == 120 and sum(series.volume) == 350  # the unreadable row is not counted
    assert series.share[0] == pytest.approx(0.2) and series.share[-1] == pytest.approx(0.8)
    before = slice(-1 - BASELINE_BUCKETS, -1)
    negative = sum(n * share for n, share in zip(series.volume[before], series.share[before], strict=True))
    assert series.baseline[0] is None
    assert series.baseline[-1] == pytest.approx(negative / sum(series.volume[before]))
    assert [about for _, about in series.alerts] == ["Energy / Oil"]


def test_plot_writes_a_png(history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.png"
    argv = ["plot", "sentiment", "--topic", "Energy / Oil", "--out", str(out), "--duckdb-path", str(history.path)]
    assert main(argv) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 20_000
    assert main([*argv[:-2], "--since", "yesterday", "--duckdb-path", str(history.path)]) == 2
    assert "not RFC 3339" in capsys.readouterr().err
