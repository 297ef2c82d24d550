"""The DuckDB file (FileHistory): schema, idempotent writes, read-only queries, locks between processes and threads.

The state tables live in it, and so did the news before the lake: `finpulse migrate` reads that file, and
`finpulse bench history` measures it as the baseline.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest
from rich.console import Console

from storage import FileHistory, NewsRow, QueryError, StorageConfig, StorageError, StoreLockedError
from storage.schema import NEWS_COLUMNS, SCHEMA_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = dt.datetime(2024, 5, 1, 9, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))


def make_row(news_id: str, **overrides: Any) -> NewsRow:
    """Return a plausible scored row with `overrides` applied."""
    values: dict[str, Any] = {
        "id": news_id,
        "published_at": PUBLISHED,
        "source": "twitter-financial-news",
        "text": f"$AAPL beats estimates ({news_id})",
        "tickers": ("AAPL", "MSFT"),
        "topic": "Earnings",
        "topic_confidence": 0.91,
        "sentiment": "positive",
        "sentiment_confidence": 0.82,
        "sentiment_negative": 0.05,
        "sentiment_neutral": 0.13,
        "sentiment_positive": 0.82,
        "topic_version": "topic-v1",
        "sentiment_version": "sentiment-v1",
        "scored_at": dt.datetime(2024, 5, 1, 4, 0, 1, tzinfo=dt.UTC),
        "kafka_topic": "news.raw",
        "kafka_partition": 0,
        "kafka_offset": 7,
    }
    values.update(overrides)
    return NewsRow(**values)


@pytest.fixture()
def history(tmp_path: Path) -> FileHistory:
    """Return a FileHistory on a fresh file under tmp_path (not created yet)."""
    return FileHistory(StorageConfig(duckdb_path=tmp_path / "history" / "finpulse.duckdb", lock_timeout_s=20))


@pytest.fixture()
def filled(history: FileHistory) -> FileHistory:
    """Return a FileHistory holding three rows n0, n1, n2."""
    history.write_batch([make_row(f"n{i}", kafka_offset=i) for i in range(3)])
    return history


def test_schema_creation_is_idempotent(history: FileHistory) -> None:
    history.ensure_schema()
    history.ensure_schema()
    history.write_batch([make_row("a")])  # migrates again inside the write
    versions = history.query("SELECT version FROM schema_version ORDER BY version").rows
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    described = history.query("DESCRIBE news").rows
    assert [(name, sql_type) for name, sql_type, *_ in described] == [
        (name, "TIMESTAMP WITH TIME ZONE" if sql_type == "TIMESTAMPTZ" else sql_type) for name, sql_type in NEWS_COLUMNS
    ]
    assert history.count() == 1


def test_file_from_a_newer_finpulse_is_refused(history: FileHistory) -> None:
    history.ensure_schema()
    with duckdb.connect(str(history.path)) as con:
        con.execute("INSERT INTO schema_version VALUES (?, 'future', now())", [SCHEMA_VERSION + 1])
    with pytest.raises(StorageError, match="newer finpulse"):
        history.write_batch([make_row("a")])


def test_write_batch_is_idempotent_on_replay(history: FileHistory) -> None:
    batch = [make_row(f"n{i}", kafka_offset=i) for i in range(128)]
    first = history.write_batch(batch)
    assert first.inserted == [row.id for row in batch]
    assert first.duplicates == []
    replay = history.write_batch(batch)
    assert replay.inserted == []
    assert replay.duplicates == [row.id for row in batch]
    assert history.count() == 128
    assert history.existing_ids(["n0", "n127", "unknown"]) == {"n0", "n127"}


def test_duplicates_within_a_batch_keep_the_first_occurrence(history: FileHistory) -> None:
    history.write_batch([make_row("old")])
    result = history.write_batch(
        [make_row("x", text="first"), make_row("old"), make_row("x", text="second"), make_row("y")]
    )
    assert result.inserted == ["x", "y"]
    assert result.duplicates == ["old", "x"]
    assert history.count() == 3
    assert [row.text for row in history.fetch(["x"])] == ["first"]


def test_empty_batch_touches_nothing(history: FileHistory) -> None:
    assert history.write_batch([]).inserted == []
    assert not history.path.exists()


def test_rows_round_trip_with_timezones(history: FileHistory) -> None:
    new_york = dt.datetime(2024, 3, 10, 1, 59, 59, 999999, tzinfo=ZoneInfo("America/New_York"))
    pacific = dt.datetime(2023, 12, 31, 23, 0, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    rows = [
        make_row("india", published_at=PUBLISHED),
        make_row("new-york", published_at=new_york, kafka_topic=None, kafka_partition=None, kafka_offset=None),
        make_row("pacific", published_at=pacific, tickers=()),
    ]
    history.write_batch(rows)

    fetched = history.fetch(["pacific", "india", "new-york", "missing"])
    assert [row.id for row in fetched] == ["pacific", "india", "new-york"]
    for got in fetched:
        want = next(row for row in rows if row.id == got.id)
        assert got == want  # NewsRow normalised both to UTC
        assert got.published_at.tzinfo is dt.UTC
        assert got.scored_at.tzinfo is dt.UTC
    assert fetched[0].published_at == dt.datetime(2024, 1, 1, 7, 0, tzinfo=dt.UTC)

    result = history.query(
        "SELECT id, published_at, epoch_us(published_at) FROM news WHERE published_at >= ? ORDER BY id",
        ["2024-01-01T07:00:00+00:00"],
    )
    assert [row[0] for row in result.rows] == ["india", "new-york", "pacific"]
    for news_id, published_at, epoch_us in result.rows:
        want = next(row for row in rows if row.id == news_id).published_at
        assert published_at == want
        assert isinstance(published_at, dt.datetime)
        assert published_at.tzinfo is dt.UTC
        assert epoch_us == round(want.timestamp() * 1_000_000)


def test_news_row_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_row("a", published_at=dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="probability"):
        make_row("a", sentiment_positive=float("nan"))
    with pytest.raises(ValueError, match="probability"):
        make_row("a", topic_confidence=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        make_row("")
    row = make_row("a", tickers=["TSLA"], published_at=PUBLISHED)
    assert row.tickers == ("TSLA",)
    assert row.published_at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("INSERT INTO news SELECT * FROM news", "INSERT"),
        ("DELETE FROM news", "DELETE"),
        ("DROP TABLE news", "DROP"),
        ("COPY news TO 'leak.csv'", "COPY"),
        ("ATTACH 'other.duckdb' AS other", "ATTACH"),
        ("UPDATE news SET topic = 'x'", "UPDATE"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("SET threads = 1", "SET"),
        ("SELECT 1; DELETE FROM news", "DELETE"),
        ("EXPLAIN ANALYZE DELETE FROM news", "DELETE inside EXPLAIN"),
        ("EXPLAIN (ANALYZE, FORMAT json) UPDATE news SET topic = 'x'", "UPDATE inside EXPLAIN"),
    ],
)
def test_query_refuses_writes(filled: FileHistory, sql: str, kind: str) -> None:
    with pytest.raises(QueryError, match=rf"^only read queries are allowed \(got {kind}\)$"):
        filled.query(sql)
    assert filled.count() == 3


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM news",
        "WITH t AS (SELECT topic FROM news) SELECT topic, count(*) FROM t GROUP BY topic",
        "FROM news SELECT id",
        "SHOW TABLES",
        "DESCRIBE news",
        "EXPLAIN SELECT * FROM news",
        "EXPLAIN ANALYZE SELECT count(*) FROM news",
        "EXPLAIN (FORMAT json) SELECT * FROM news",
        "EXPLAIN (SELECT id FROM news)",
        "PRAGMA table_info('news')",
        "SUMMARIZE news",
    ],
)
def test_query_allows_reads(filled: FileHistory, sql: str) -> None:
    result = filled.query(sql)
    assert result.columns
    assert result.rows


def test_query_takes_parameters_and_limits_rows(filled: FileHistory) -> None:
    result = filled.query("SELECT id FROM news WHERE kafka_offset >= ? ORDER BY id", [1])
    assert result.rows == [("n1",), ("n2",)]
    limited = filled.query("SELECT id FROM news ORDER BY id", max_rows=2)
    assert limited.rows == [("n0",), ("n1",)]
    assert limited.truncated


def test_bad_sql_carries_duckdbs_message(filled: FileHistory) -> None:
    with pytest.raises(QueryError, match='syntax error at or near "SELEC"') as parse_error:
        filled.query("SELEC 1")
    assert isinstance(parse_error.value.__cause__, duckdb.ParserException)
    with pytest.raises(QueryError, match="Table with name nope does not exist") as missing:
        filled.query("SELECT * FROM nope")
    assert isinstance(missing.value.__cause__, duckdb.CatalogException)
    with pytest.raises(QueryError, match="one statement at a time"):
        filled.query("SELECT 1; SELECT 2")
    with pytest.raises(QueryError, match="empty query"):
        filled.query("  ")


def test_missing_file_says_to_run_the_scorer_first(history: FileHistory) -> None:
    with pytest.raises(QueryError, match="no history yet at .*finpulse.duckdb: run the scorer or the demo"):
        history.query("SELECT 1")
    assert history.count() == 0
    assert history.existing_ids(["a"]) == set()
    assert history.fetch(["a"]) == []
    assert not history.path.parent.exists()  # reading created neither the file nor its folder


def test_results_render_as_csv_json_and_table(filled: FileHistory) -> None:
    filled.write_batch([make_row("odd", text='[bold]not markup[/bold], "quoted"', kafka_partition=None)])
    result = filled.query(
        "SELECT id, published_at, tickers, sentiment_positive, kafka_partition, text " "FROM news ORDER BY id DESC"
    )

    buffer = io.StringIO()
    result.to_csv(buffer)
    records = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [record["id"] for record in records] == ["odd", "n2", "n1", "n0"]
    assert records[0]["text"] == '[bold]not markup[/bold], "quoted"'
    assert records[0]["kafka_partition"] == ""
    assert json.loads(records[0]["tickers"]) == ["AAPL", "MSFT"]
    assert dt.datetime.fromisoformat(records[0]["published_at"]) == PUBLISHED
    assert float(records[0]["sentiment_positive"]) == 0.82

    objects = json.loads(result.to_json())
    assert objects[0] == {
        "id": "odd",
        "published_at": "2024-05-01T04:00:00.123456+00:00",
        "tickers": ["AAPL", "MSFT"],
        "sentiment_positive": 0.82,
        "kafka_partition": None,
        "text": '[bold]not markup[/bold], "quoted"',
    }
    lines = io.StringIO()
    result.to_json_lines(lines)
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == objects

    console = Console(record=True, width=200, color_system=None)
    console.print(result.to_table(max_rows=2, title="latest"))
    text = console.export_text()
    assert "sentiment_positive" in text
    assert "[bold]not markup[/bold]" in text  # printed literally, not as rich markup
    assert "AAPL, MSFT" in text
    assert "2024-05-01 04:00:00.123456+00:00" in text
    assert "2 of 4 rows" in text
    assert "n1" not in text


def test_query_reports_a_store_held_too_long(tmp_path: Path) -> None:
    path = tmp_path / "held.duckdb"
    FileHistory(StorageConfig(duckdb_path=path)).ensure_schema()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time\n"
            "con = duckdb.connect(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",  # hold the file until the test closes our stdin
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        impatient = FileHistory(StorageConfig(duckdb_path=path, lock_timeout_s=0.3))
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match="stayed locked for longer than 0.3 s"):
            impatient.query("SELECT count(*) FROM news")
        with pytest.raises(StoreLockedError, match="Conflicting lock"):
            impatient.write_batch([make_row("a")])
        assert time.monotonic() - started < 10
    finally:
        holder.communicate(input="", timeout=30)
    assert FileHistory(StorageConfig(duckdb_path=path)).write_batch([make_row("a")]).inserted == ["a"]


def test_threads_of_one_process_share_the_file(history: FileHistory) -> None:
    errors: list[BaseException] = []

    def write(prefix: str) -> None:
        try:
            for batch in range(10):
                history.write_batch([make_row(f"{prefix}-{batch}-{i}") for i in range(20)])
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    def read() -> None:
        try:
            for _ in range(20):
                history.count()
                if history.path.exists():
                    history.query("SELECT count(*) FROM news")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in "ab"] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert history.count() == 2 * 10 * 20


_WRITER = """
import datetime as dt
import sys

from storage import FileHistory, NewsRow, StorageConfig

path, batches, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
history = FileHistory(StorageConfig(duckdb_path=path, lock_timeout_s=60))
now = dt.datetime.now(dt.UTC)
inserted = 0
for batch in range(batches):
    rows = [
        NewsRow(
            id=f"w{batch}-{i}", published_at=now, source="writer", text=f"news {batch} {i}",
            tickers=("AAPL",), topic="Earnings", topic_confidence=0.9, sentiment="neutral",
            sentiment_confidence=0.7, sentiment_negative=0.1, sentiment_neutral=0.7,
            sentiment_positive=0.2, topic_version="t", sentiment_version="s", scored_at=now,
            kafka_topic="news.raw", kafka_partition=0, kafka_offset=batch * size + i,
        )
        for i in range(size)
    ]
    inserted += len(history.write_batch(rows).inserted)
    if batch % 20 == 0:  # a crash replay under contention must insert nothing
        if history.write_batch(rows).inserted:
            sys.exit("replayed batch inserted rows")
print(inserted)
"""


def test_concurrent_writer_process_and_queries(tmp_path: Path) -> None:
    batches, size = 200, 50
    path = tmp_path / "shared.duckdb"
    history = FileHistory(StorageConfig(duckdb_path=path, lock_timeout_s=30))
    history.ensure_schema()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(batches), str(size)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    counts: list[int] = []
    latencies: list[float] = []
    try:
        while writer.poll() is None:
            started = time.perf_counter()
            result = history.query("SELECT count(*) FROM news")
            latencies.append(time.perf_counter() - started)
            counts.append(int(str(result.rows[0][0])))
        stdout, stderr = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, stderr
    assert int(stdout) == batches * size
    assert counts == sorted(counts), "a query saw the history shrink"
    # The turnstile lets queries in between batches instead of only after the writer is done.
    assert len(set(counts)) >= 3, counts
    assert history.count() == batches * size
    latencies.sort()
    print(
        f"{len(latencies)} queries during {batches} writes: median {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
        f"max {latencies[-1] * 1e3:.1f} ms"
    )
