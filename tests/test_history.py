"""The history as users reach it: `History` over the lake and the state file, the CLI, and `finpulse.history`."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from test_lake import T0, batch

import finpulse
from finpulse.cli import main
from finpulse.config import load_config
from storage import FileHistory, History, QueryError, StorageConfig

ROWS = 30


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "finpulse.duckdb"


@pytest.fixture
def history(db: Path) -> History:
    history = History(StorageConfig(duckdb_path=db))
    history.ensure_schema()
    for number in range(3):
        history.write_batch(batch(0, number * 10, 10, at=T0 + dt.timedelta(hours=number)))
    return history


def _cli(db: Path, *args: str) -> int:
    return main([*args[:1], "--duckdb-path", str(db), *args[1:]])


def test_news_lands_in_the_lake_beside_the_state_file(history: History, db: Path) -> None:
    assert history.count() == ROWS
    assert (db.parent / "finpulse.lake" / "catalog.sqlite").is_file()
    # Ids are known within the duplicate window (24 h before now); these rows were scored long ago.
    assert history.existing_ids(["m-0-0"]) == set()
    history.write_batch(batch(3, 0, 2, prefix="now", at=dt.datetime.now(dt.UTC)))
    assert history.existing_ids(["now-3-0", "nope"]) == {"now-3-0"}
    assert [row.id for row in history.fetch(["m-0-29", "m-0-0", "nope"])] == ["m-0-29", "m-0-0"]
    # A replayed batch (its offsets already recorded) adds nothing.
    assert history.write_batch(batch(0, 0, 10)).inserted == []
    assert history.count() == ROWS + 2


def test_a_query_naming_news_and_a_state_table_sees_both(history: History) -> None:
    joined = history.query("SELECT (SELECT count(*) FROM news), (SELECT count(*) FROM alerts), count(*) FROM labels")
    assert joined.rows == [(ROWS, 0, 0)]
    with pytest.raises(QueryError):
        history.query("SELECT count(*) FROM alerts, read_text('/etc/hostname')")
    with pytest.raises(QueryError):
        history.query("SELECT * FROM news, read_csv('/etc/passwd')")


def test_a_stock_duckdb_session_reads_the_lake_while_it_is_written(history: History) -> None:
    analyst = duckdb.connect()
    for statement in history.lake.analyst_statements():
        analyst.execute(statement)
    analyst.execute("BEGIN TRANSACTION")
    assert analyst.execute("SELECT count(*) FROM news").fetchone() == (ROWS,)
    history.write_batch(batch(1, 0, 5))  # the open read transaction does not hold the writer up
    assert history.count() == ROWS + 5
    with pytest.raises(duckdb.Error):
        analyst.execute("SELECT * FROM read_text('/etc/hostname')")
    analyst.close()


def test_query_export_migrate_and_time_travel_from_the_cli(
    history: History, db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = history.lake.current_snapshot()
    history.write_batch(batch(2, 0, 5, at=T0 + dt.timedelta(hours=5)))
    capsys.readouterr()

    assert _cli(db, "query", "SELECT count(*) AS n FROM news", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == [{"n": ROWS + 5}]
    assert _cli(db, "query", "SELECT count(*) AS n FROM news", "--format", "json", "--as-of", str(snapshot)) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": ROWS}]

    out = tmp_path / "out.parquet"
    since, until = (T0 + dt.timedelta(hours=1)).isoformat(), (T0 + dt.timedelta(hours=2)).isoformat()
    assert _cli(db, "export", str(out), "--since", since, "--until", until) == 0
    assert pq.read_table(out).num_rows == 10
    out_csv = tmp_path / "out.csv"
    assert _cli(db, "export", str(out_csv), "--format", "csv") == 0
    with out_csv.open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == ROWS + 5

    capsys.readouterr()
    assert _cli(db, "search", "oil", "--format", "json", "--limit", "3") == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 3 and all("oil" in row["text"] for row in found)

    old = tmp_path / "old.duckdb"
    FileHistory(StorageConfig(duckdb_path=old)).write_batch(batch(7, 0, 12, prefix="old"))
    assert _cli(db, "migrate", "--from", str(old)) == 0
    assert _cli(db, "migrate", "--from", str(old)) == 0  # again: nothing copied twice
    assert history.count() == ROWS + 5 + 12


def test_finpulse_history_returns_arrow(history: History, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(environ={"FINPULSE_STORAGE__DUCKDB_PATH": str(db)})
    table = finpulse.history("SELECT id FROM news ORDER BY id", config=config)
    assert table.num_rows == ROWS and table.column_names == ["id"]


def test_bad_cli_times_are_one_line(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli(db, "export", "x.parquet", "--since", "yesterday")
    err = capsys.readouterr().err
    assert "RFC 3339" in err and len(err.strip().splitlines()) == 1
