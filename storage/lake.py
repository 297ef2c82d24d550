"""The news history as a DuckLake lakehouse: Parquet data files plus a catalog database.

Why a lake: the DuckDB-file history admits one writing process at a time, or readers, never both, and its
idempotent write anti-joins every stored id. Here scorers append Parquet files and commit them to a catalog,
so analysts read while scorers write, several scorers write at once, and a batch checks only recent rows.

**Catalog.** A SQLite file beside the data (`LakeConfig.catalog = "sqlite"`, one host) or a PostgreSQL
server (`"postgres"`, writers on several hosts, sharing the data dir). The SQLite catalog runs in WAL mode,
so a reader, even one that holds a transaction for minutes, never blocks a writer. Its writers take turns
through a file lock beside the catalog: SQLite refuses a commit from a transaction that started before
another writer's commit ("database is locked"), so without turns concurrent writers would mostly redo work.
PostgreSQL writers run concurrently and DuckLake settles their commits; a real conflict is retried here.

**Exactly once.** `consumed_offsets(topic, partition, next_offset)` is updated in the same DuckLake
transaction as the rows, so the rows of a batch and the offsets after it become visible together or not at
all. A replayed batch (rows whose Kafka offset is below the stored next offset of their partition) inserts
nothing. Two writers racing on one partition (a consumer-group rebalance) both update that row (a partition
seen for the first time updates the one row of `offset_registrations`: inserts alone never conflict); DuckLake
refuses the second commit as a conflict, the retry sees the first one's offsets and skips the batch.

**Duplicate window.** Rows without Kafka coordinates, and messages a producer sent twice (same id, new
offset), are caught by id, but only among rows scored within `duplicate_window` (24 h by default) before the
batch: DuckLake skips the other files by their min/max `scored_at`, so a write costs the same at 100k and at
100M rows. An id re-sent after the window gets a second row; the view `news_latest` keeps the newest row of
each id (or write `QUALIFY row_number() OVER (PARTITION BY id ORDER BY scored_at DESC) = 1`).

**Small files.** Inserts under `inlining_row_limit` rows are inlined into the catalog instead of writing a
Parquet file; larger batches write one file each. `compact()` moves inlined rows to Parquet, merges adjacent
small files, expires snapshots older than `snapshot_retention` and deletes replaced files after
`file_grace`. Run it from one process every ~10 minutes, or when `maintenance_due()` says so; it takes the
writers' turn like a batch and costs seconds, not a stop of the stream.

**Text search.** `news_tokens(token, scored_at, docs)` holds each distinct word of each `scored_at` (one
scorer batch shares one `scored_at`) with the number of rows holding it, written in the same transaction as
the rows and kept sorted by token, so a word's newest batches are found from the row-group statistics;
`search` then reads only as many of those batches' rows as the counts say it needs, and checks the words.
DuckDB's fts extension cannot build its index on a DuckLake table (measured: the commit fails, "unsupported
type NULL"), and it indexes a snapshot, rebuilt whole, not a stream.

**Analysts.** `query`, `arrow` and `dataframe` run on a sandboxed read-only connection: `allowed_directories`
is the lake dir, then the lake is attached READ_ONLY, external access is switched off and the configuration
locked; only SELECT (or EXPLAIN of one) passes, without catalog-, file- or maintenance functions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.resources
import json
import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import duckdb

from storage.config import StorageConfig
from storage.errors import QueryError, StorageError, StoreLockedError
from storage.history import FileHistory, NewsRow, QueryResult, WriteResult, fetch_result, row_payload
from storage.lake_config import LakeConfig, parse_dsn
from storage.schema import (
    NEWS_COLUMN_NAMES,
    NEWS_COLUMNS,
    NEWS_COLUMNS_ADDED,
    NEWS_COLUMNS_V1,
    NULLABLE_NEWS_COLUMNS,
    TIMESTAMP_COLUMNS,
    from_epoch_us_required,
    json_structure,
)

__all__ = [
    "CompactionResult",
    "Lake",
    "LakeError",
    "MigrationResult",
    "Snapshot",
    "WriteStats",
    "extension_path",
    "tables_in",
]

AsOf = int | dt.datetime | None

_LAKE: Final = "lake"  # the name the lake is attached under in every connection
# The wheels hold the extensions under their short names; DuckDB derives the entry point from the file name and
# the sqlite and postgres extensions are called sqlite_scanner and postgres_scanner inside.
_EXTENSIONS: Final[dict[str, tuple[str, str]]] = {
    "ducklake": ("duckdb_extension_ducklake", "ducklake"),
    "sqlite": ("duckdb_extension_sqlite", "sqlite_scanner"),
    "postgres": ("duckdb_extension_postgres", "postgres_scanner"),
}
# Words are runs of letters and digits, lower-cased; `$AAPL` is found as `aapl`. SQL and Python share this
# one expression, so the words of a search are cut exactly like the words of the rows.
_TOKEN_PATTERN: Final = r"[^\p{L}\p{N}]+"
_TOKENS_SQL: Final = (
    f"list_distinct(list_filter(regexp_split_to_array(lower(@TEXT@), '{_TOKEN_PATTERN}'), w -> length(w) > 0))"
)


def _tokens_of(expression: str) -> str:
    """Return the SQL that cuts `expression` (a column or ?) into its distinct lower-case words."""
    return _TOKENS_SQL.replace("@TEXT@", expression)


# A block is one scored_at value, in practice one scorer batch; one search looks at the newest this many.
_SEARCH_MAX_BLOCKS: Final = 100_000
_SEARCH_MAX_WORDS: Final = 16
# Errors that a second attempt can cure: a commit raced by another writer, SQLite's turn refused, PostgreSQL's
# serialisation. Anything else (bad data, a full disk) is raised at once.
_RETRYABLE_MARKERS: Final = (
    "conflict",
    "database is locked",
    "could not serialize",
    "deadlock detected",
    "exceeded the maximum retry count",
)
# Functions an analyst's SELECT may not call: ones that read or write files, reach the catalog database beneath
# the lake, run SQL text, or maintain the lake. The sandbox refuses most of them anyway; this says so plainly.
_DENIED_FUNCTION_PREFIXES: Final = ("read_", "parquet_", "sqlite_", "postgres_", "pg_", "ducklake_", "iceberg_")
_DENIED_FUNCTIONS: Final = frozenset({"glob", "query", "query_table", "getenv", "sniff_csv", "delta_scan"})
_ALLOWED_DUCKLAKE_FUNCTIONS: Final = frozenset(
    {
        "ducklake_snapshots",
        "ducklake_table_info",
        "ducklake_table_changes",
        "ducklake_table_insertions",
        "ducklake_table_deletions",
        "ducklake_current_snapshot",
        "ducklake_last_committed_snapshot",
        "ducklake_list_files",
        "ducklake_options",
        "ducklake_settings",
    }
)
_EXPLAIN: Final = re.compile(r"^\s*EXPLAIN(?:\s+ANALY[SZ]E)?\s+", re.IGNORECASE)
_DUCKLAKE_RETRY_WAIT_MS: Final = 5
_DUCKLAKE_MAX_RETRIES: Final = 12  # 5 ms doubling: the last retry waits ~10 s, the sum ~20 s
_LOCK_POLL_FIRST_S: Final = 0.001
_LOCK_POLL_MAX_S: Final = 0.02
# One news row's columns, as `ensure_schema` creates them: NOT NULL where the news.raw contract requires a value.
_NEWS_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS news (\n"
    + ",\n".join(
        f"    {name} {sql_type}{'' if name in NULLABLE_NEWS_COLUMNS else ' NOT NULL'}"
        for name, sql_type in NEWS_COLUMNS_V1
    )
    + "\n)"
)


class LakeError(StorageError):
    """The lake could not be opened, written or maintained; the message says why and what to do."""


@dataclass(frozen=True)
class WriteStats:
    """How the last `write_batch` went: attempts, seconds lost to other writers (turn waits, refused attempts,
    backoff), seconds in all, rows skipped as replays, and the snapshot it committed (None: nothing new)."""

    attempts: int
    waited_s: float
    elapsed_s: float
    replayed: int
    snapshot_id: int | None


@dataclass(frozen=True)
class CompactionResult:
    """What one `compact` did."""

    flushed_inlined: bool
    files_merged: int
    snapshots_expired: int
    files_deleted: int
    elapsed_s: float


@dataclass(frozen=True)
class MigrationResult:
    """What `migrate_from_duckdb` found in the DuckDB file and copied into the lake."""

    source: Path
    source_rows: int
    copied: int
    already_present: int
    source_schema_version: int


@dataclass(frozen=True)
class Snapshot:
    """One DuckLake snapshot: a committed version of the lake that `as_of` can name."""

    snapshot_id: int
    committed_at: dt.datetime
    changes: str


@dataclass(frozen=True)
class _Migration:
    """One forward-only schema step of the lake."""

    version: int
    description: str
    statements: tuple[str, ...]


# Append new steps with the next version; never edit one that has shipped.
_LAKE_MIGRATIONS: Final[tuple[_Migration, ...]] = (
    _Migration(
        1,
        "news, offsets, search words, news_latest",
        (
            _NEWS_DDL,
            "CREATE TABLE IF NOT EXISTS consumed_offsets (topic VARCHAR NOT NULL, partition INTEGER NOT NULL, "
            "next_offset BIGINT NOT NULL)",
            # Inserts never conflict in DuckLake, updates of one table do: two writers registering the same new
            # partition both update this one row, so the second one retries and finds the partition registered.
            "CREATE TABLE IF NOT EXISTS offset_registrations (partitions BIGINT NOT NULL)",
            "INSERT INTO offset_registrations VALUES (0)",
            # docs: how many rows of that scored_at hold the word, so a search knows how many blocks to read.
            "CREATE TABLE IF NOT EXISTS news_tokens (token VARCHAR NOT NULL, scored_at TIMESTAMPTZ NOT NULL, "
            "docs INTEGER NOT NULL)",
            # Sorted when written and when compacted: a word's rows sit together, found by row-group min/max.
            "ALTER TABLE news_tokens SET SORTED BY (token ASC, scored_at ASC)",
            "CREATE VIEW IF NOT EXISTS news_latest AS SELECT * FROM news "
            "QUALIFY row_number() OVER (PARTITION BY id ORDER BY scored_at DESC, kafka_offset DESC NULLS LAST) = 1",
        ),
    ),
    _Migration(
        2,
        "news.language and news.outcome",
        tuple(f"ALTER TABLE news ADD COLUMN {name} {sql_type}" for name, sql_type in NEWS_COLUMNS_ADDED),
    ),
)
LAKE_SCHEMA_VERSION: Final[int] = _LAKE_MIGRATIONS[-1].version


class Lake:
    """The news history as a DuckLake: exactly-once batch writes, sandboxed analyst reads, maintenance."""

    def __init__(self, config: LakeConfig) -> None:
        """Remember the config; nothing is opened until a method needs it (create one Lake per process)."""
        self._config = config
        self._root = config.root
        self._data_path = config.data_files
        self._writer: duckdb.DuckDBPyConnection | None = None
        self._reader: duckdb.DuckDBPyConnection | None = None
        self._analyst: duckdb.DuckDBPyConnection | None = None
        self._schema_ready = False
        self._lock = threading.RLock()  # one DuckDB connection is not safe for two threads at once
        self._analyst_lock = threading.Lock()
        self._last_write: WriteStats | None = None
        self._attempts = 0
        self._waited = 0.0
        self._pid = os.getpid()

    def __repr__(self) -> str:
        """Show the catalog with its password masked."""
        return f"Lake({self._config.catalog_label}, data_path={self._data_path})"

    def __enter__(self) -> Lake:
        """Return self; `close` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close every connection."""
        self.close()

    @property
    def config(self) -> LakeConfig:
        """Return the config this lake was opened with."""
        return self._config

    @property
    def last_write(self) -> WriteStats | None:
        """Return how the last `write_batch` of this object went (None before the first)."""
        return self._last_write

    def close(self) -> None:
        """Close the connections; the next call opens them again."""
        with self._lock:
            for con in (self._writer, self._reader):
                if con is not None:
                    with contextlib.suppress(duckdb.Error):
                        con.close()
            self._writer = self._reader = None
        with self._analyst_lock:
            if self._analyst is not None:
                with contextlib.suppress(duckdb.Error):
                    self._analyst.close()
            self._analyst = None

    # -- writing -------------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the lake (catalog, data dir, tables, view) or migrate it, so that readers find it."""
        with self._lock:
            if self._schema_ready:
                return
            self._retrying("creating the lake schema", self._migrate_schema)
            self._schema_ready = True

    def write_batch(self, rows: Sequence[NewsRow], offsets: Mapping[tuple[str, int], int] | None = None) -> WriteResult:
        """Insert new rows and record the partitions' next offsets, in one transaction.

        `offsets` maps (topic, partition) to the next offset to consume after this batch, as the scorer commits
        it; rows carrying Kafka coordinates imply at least offset + 1. A row is skipped (a duplicate) when its
        offset is below the stored next offset of its partition, when its id repeats one earlier in the batch,
        or when a row with its id was scored within `duplicate_window` before the batch.
        """
        first_seen: dict[str, NewsRow] = {}
        for row in rows:
            first_seen.setdefault(row.id, row)  # first occurrence wins, as in History
        targets = _target_offsets(first_seen.values(), offsets or {})
        if not first_seen and not targets:
            return WriteResult(inserted=[], duplicates=[])
        self.ensure_schema()
        payload = json.dumps([row_payload(row) for row in first_seen.values()], ensure_ascii=False, allow_nan=False)
        cutoff = min((row.scored_at for row in first_seen.values()), default=dt.datetime.now(dt.UTC))
        cutoff -= self._config.duplicate_window
        started = time.perf_counter()
        with self._lock:
            con = self._write_connection()
            try:
                con.execute(_STAGE_SQL, [payload])
            except duckdb.Error as e:
                raise LakeError(f"cannot stage {len(first_seen)} rows for the lake: {e}") from e
            outcome = self._retrying(
                f"writing {len(first_seen)} rows to the lake",
                lambda: self._write_staged(con, first_seen, targets, cutoff),
            )
        fresh, replayed, snapshot_id = outcome
        self._last_write = WriteStats(
            attempts=self._attempts,
            waited_s=self._waited,
            elapsed_s=time.perf_counter() - started,
            replayed=replayed,
            snapshot_id=snapshot_id,
        )
        inserted: list[str] = []
        duplicates: list[str] = []
        for row in rows:
            if row.id in fresh:
                inserted.append(row.id)
                fresh.discard(row.id)  # later repeats of this id are duplicates
            else:
                duplicates.append(row.id)
        return WriteResult(inserted=inserted, duplicates=duplicates)

    def probe(self) -> None:
        """Raise unless a write could run now: the writers' turn, the catalog and the data dir all answer.

        What a scorer asks before it blames a batch on its records: a lake that is down (a catalog server gone,
        another writer holding the turn past lock_timeout_s) fails this too, a refused record does not.
        """
        self.ensure_schema()
        if not os.access(self._data_path, os.W_OK):
            raise LakeError(f"the lake's data dir {self._data_path} is not writable")
        with self._lock:
            con = self._write_connection()
            with self._writers_turn():
                self._fetch(con, "SELECT count(*) FROM consumed_offsets", [], "probing the lake")

    def consumed_offsets(self) -> dict[tuple[str, int], int]:
        """Return the next offset to consume of every (topic, partition) the lake has rows or offsets of."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return {}
            rows = self._fetch(con, "SELECT topic, partition, next_offset FROM consumed_offsets", [], "reading offsets")
        return {(str(topic), int(partition)): int(next_offset) for topic, partition, next_offset in rows}

    # -- reading -------------------------------------------------------------------------------------------

    def count(self, as_of: AsOf = None) -> int:
        """Return how many news rows the lake holds (0 before the first write), now or at `as_of`."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return 0
            clause, params = _at_clause(as_of)
            found = self._fetch(con, f"SELECT count(*) FROM news{clause}", params, "counting news")
        return int(found[0][0])

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Return those of `ids` stored with a `scored_at` within the duplicate window before now."""
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        cutoff = dt.datetime.now(dt.UTC) - self._config.duplicate_window
        with self._lock:
            con = self._read_connection()
            if con is None:
                return set()
            found = self._fetch(
                con,
                "SELECT DISTINCT id FROM news WHERE scored_at >= CAST(? AS TIMESTAMPTZ) "
                "AND id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                [cutoff.isoformat(), json.dumps(wanted, ensure_ascii=False)],
                "looking up ids",
            )
        return {str(record[0]) for record in found}

    def snapshots(self) -> list[Snapshot]:
        """Return the lake's snapshots, oldest first: the versions `as_of` can name."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return []
            found = self._fetch(
                con,
                f"SELECT snapshot_id, epoch_us(snapshot_time), CAST(changes AS VARCHAR) "
                f"FROM ducklake_snapshots('{_LAKE}') ORDER BY snapshot_id",
                [],
                "listing snapshots",
            )
        return [Snapshot(int(sid), from_epoch_us_required(micros), str(changes)) for sid, micros, changes in found]

    def current_snapshot(self) -> int | None:
        """Return the id of the newest snapshot (None before the lake exists)."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return None
            found = self._fetch(con, f"SELECT id FROM ducklake_current_snapshot('{_LAKE}')", [], "reading the snapshot")
        return int(found[0][0]) if found else None

    def search(
        self,
        text: str,
        *,
        limit: int = 100,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> QueryResult:
        """Return the newest `limit` rows whose text holds every word of `text`, newest first."""
        if limit <= 0:
            raise QueryError(f"limit must be positive, got {limit}")
        with self._lock:
            con = self._read_connection()
            if con is None:
                return QueryResult(columns=list(NEWS_COLUMN_NAMES), rows=[], types=[])
            words = self._words(con, text)
            return self._search(con, words, limit, since, until)

    def query(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        max_rows: int | None = None,
        timeout_s: float | None = None,
        as_of: AsOf = None,
    ) -> QueryResult:
        """Run one analyst SELECT on the sandboxed read-only connection; fetch at most `max_rows` rows."""
        with self._analyst_session(as_of) as con:
            relation = self._analyst_relation(con, sql, params, timeout_s)
            if relation is None:
                return QueryResult(columns=[], rows=[])
            return self._guarded(con, timeout_s, lambda: fetch_result(relation, max_rows))

    def arrow(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        timeout_s: float | None = None,
        as_of: AsOf = None,
    ) -> Any:
        """Run one analyst SELECT and return a pyarrow.Table (needs pyarrow)."""
        _require("pyarrow", "arrow()")
        with self._analyst_session(as_of) as con:
            relation = self._analyst_relation(con, sql, params, timeout_s)
            if relation is None:
                raise QueryError("the statement returns no rows to convert")
            # DuckDB 1.5 renamed fetch_arrow_table (now deprecated) to to_arrow_table.
            convert = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table
            return self._guarded(con, timeout_s, convert)

    def dataframe(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        timeout_s: float | None = None,
        as_of: AsOf = None,
    ) -> Any:
        """Run one analyst SELECT and return a pandas.DataFrame (needs pandas and pyarrow)."""
        _require("pandas", "dataframe()")
        return self.arrow(sql, params, timeout_s=timeout_s, as_of=as_of).to_pandas()

    def export(
        self,
        path: Path,
        *,
        format: Literal["parquet", "csv"] = "parquet",
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        as_of: AsOf = None,
    ) -> int:
        """Write the rows scored in [since, until) to one Parquet or CSV file, oldest first; return the count."""
        if format not in ("parquet", "csv"):
            raise LakeError(f"export format must be 'parquet' or 'csv', got {format!r}")
        target = Path(path).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        where, params = _time_filter(since, until)
        clause, at_params = _at_clause(as_of)
        options = "FORMAT parquet, COMPRESSION zstd" if format == "parquet" else "FORMAT csv, HEADER true"
        with self._lock:
            con = self._read_connection()
            if con is None:
                raise LakeError(f"no lake yet at {self._config.catalog_label}: write to it first")
            selection = f"SELECT * FROM news{clause}{where} ORDER BY scored_at, id"
            sql = f"COPY ({selection}) TO {_literal(str(target))} ({options})"
            found = self._fetch(con, sql, [*at_params, *params], f"exporting to {target}")
        return int(found[0][0]) if found else 0

    def analyst_statements(self) -> list[str]:
        """Return the SQL that gives a stock `duckdb` session the sandboxed read-only view analysts get."""
        statements = ["SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false"]
        statements += [f"LOAD {_literal(str(extension_path(name)))}" for name in self._extension_names()]
        statements += ["SET TimeZone = 'UTC'", f"SET allowed_directories = {self._allowed_dirs_sql()}"]
        statements += self._attach_statements(read_only=True, as_of=None, analyst=True)
        statements += [f"USE {_LAKE}", "SET enable_external_access = false", "SET lock_configuration = true"]
        return statements

    # -- maintenance ---------------------------------------------------------------------------------------

    def maintenance_due(self, max_small_files: int = 64, max_inlined_rows: int = 20_000) -> bool:
        """Return True when small files or inlined rows have piled up past the limits: time to `compact`."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return False
            small = self._fetch(
                con,
                f"SELECT count(*) FROM ducklake_list_files('{_LAKE}', 'news') WHERE data_file_size_bytes < ?",
                [self._config.compact_below_bytes],
                "counting files",
            )
            inlined = self._inlined_rows(con)
        return int(small[0][0]) > max_small_files or inlined > max_inlined_rows

    def compact(self) -> CompactionResult:
        """Flush inlined rows to Parquet, merge small files, expire old snapshots, delete replaced files."""
        self.ensure_schema()
        started = time.perf_counter()
        retention = self._maintenance_cutoff(self._config.snapshot_retention)
        grace = self._maintenance_cutoff(self._config.file_grace)

        def run() -> tuple[int, int, int]:
            con = self._write_connection()
            with self._writers_turn():
                con.execute(f"CALL ducklake_flush_inlined_data('{_LAKE}')")
                # Only files below the bound are merged: compaction stays cheap, never rewrites the big files.
                merged = con.execute(
                    f"SELECT coalesce(sum(files_processed), 0) FROM ducklake_merge_adjacent_files('{_LAKE}', "
                    f"max_file_size => {self._config.compact_below_bytes})"
                ).fetchall()
                expired = con.execute(
                    f"SELECT count(*) FROM ducklake_expire_snapshots('{_LAKE}', older_than => CAST(? AS TIMESTAMPTZ))",
                    [retention.isoformat()],
                ).fetchall()
                deleted = con.execute(
                    f"SELECT count(*) FROM ducklake_cleanup_old_files('{_LAKE}', older_than => CAST(? AS TIMESTAMPTZ))",
                    [grace.isoformat()],
                ).fetchall()
            return (_first(merged), _first(expired), _first(deleted))

        with self._lock:
            merged, expired, deleted = self._retrying("compacting the lake", run)
        return CompactionResult(
            flushed_inlined=True,
            files_merged=merged,
            snapshots_expired=expired,
            files_deleted=deleted,
            elapsed_s=time.perf_counter() - started,
        )

    def _maintenance_cutoff(self, span: dt.timedelta) -> dt.datetime:
        """Return the `older_than` that expires or deletes only what is older than `span`.

        DuckLake 1.5.5 compares these cutoffs as text on a SQLite catalog: the stored '2026-01-02 10:00+00'
        against the cutoff '2026-01-02T09:00', where ' ' sorts before 'T', so everything of the cutoff's day
        counts as older (measured: a one-hour grace deleted files replaced a minute before). Passing midnight
        of the day before keeps the promise: what goes is older than midnight of `now - span`'s day.
        """
        cutoff = dt.datetime.now(dt.UTC) - span
        if self._config.catalog != "sqlite":
            return cutoff
        return cutoff.replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=1)

    def stats(self) -> dict[str, int]:
        """Return rows, files and bytes of each table, and the inlined rows waiting for `compact`."""
        with self._lock:
            con = self._read_connection()
            if con is None:
                return {}
            found = self._fetch(
                con, f"SELECT table_name, file_count, file_size_bytes FROM ducklake_table_info('{_LAKE}')", [], "stats"
            )
            out: dict[str, int] = {}
            for table, files, size in found:
                out[f"{table}_files"] = int(files)
                out[f"{table}_bytes"] = int(size)
            out["inlined_rows"] = self._inlined_rows(con)
            out["news_rows"] = int(self._fetch(con, "SELECT count(*) FROM news", [], "stats")[0][0])
        return out

    def migrate_from_duckdb(self, path: Path) -> MigrationResult:
        """Copy the `news` rows of a DuckDB-file history (schema v1-v4) into the lake; a re-run copies nothing.

        Rows whose id the lake already holds are skipped; every other row is copied, with its search words,
        and the partitions' next offsets move past the copied rows' Kafka offsets. The file's other tables
        (alerts, labels, models) stay where they are.
        """
        source = Path(path).expanduser().resolve()
        if not source.is_file():
            raise LakeError(f"no DuckDB history at {source}")
        self.ensure_schema()
        staging = self._root / f".migrate-{uuid.uuid4().hex}.parquet"
        history = FileHistory(StorageConfig(duckdb_path=source, lock_timeout_s=self._config.lock_timeout_s))
        try:
            version, source_rows = self._export_history(history, staging)
            if source_rows == 0:
                return MigrationResult(source, 0, 0, 0, version)

            copied = self.load_parquet(staging, check_ids=True)
        finally:
            staging.unlink(missing_ok=True)
        return MigrationResult(source, source_rows, copied, source_rows - copied, version)

    def load_parquet(self, path: Path, *, check_ids: bool = True) -> int:
        """Bulk-load news rows from Parquet file(s) with the news columns, in one transaction; return the count.

        For exports, other systems and benchmarks. With `check_ids`, rows whose id the lake holds at any age
        are skipped (this reads every stored id, unlike `write_batch`); without it every row is appended. The
        search words are written with the rows and the partitions' next offsets move past their offsets.
        """
        self.ensure_schema()
        pattern = str(Path(path).expanduser().resolve())  # a glob such as dir/*.parquet works too

        def run() -> int:
            con = self._write_connection()
            with self._writers_turn():
                con.execute("BEGIN")
                try:
                    copied = self._copy_staged(con, pattern, check_ids=check_ids)
                    con.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
            return copied

        with self._lock:
            return int(self._retrying(f"loading {pattern}", run))

    # -- internals: connections ------------------------------------------------------------------------------

    def _extension_names(self) -> tuple[str, ...]:
        """Return the extensions this lake's connections load."""
        return ("ducklake", "sqlite" if self._config.catalog == "sqlite" else "postgres")

    def _new_connection(self) -> duckdb.DuckDBPyConnection:
        """Open an in-memory DuckDB with the lake's extensions loaded from the wheels, never downloaded."""
        self._check_process()
        try:
            con = duckdb.connect(
                config={
                    "autoinstall_known_extensions": "false",
                    "autoload_known_extensions": "false",
                    "threads": str(self._config.threads),
                }
            )
        except duckdb.Error as e:
            raise LakeError(f"cannot start DuckDB: {e}") from e
        try:
            for name in self._extension_names():
                con.execute(f"LOAD {_literal(str(extension_path(name)))}")
            # Timestamps reach Python as UTC wall-clock values, whatever the machine's zone.
            con.execute("SET TimeZone = 'UTC'")
        except duckdb.Error as e:
            con.close()
            raise LakeError(f"cannot load the DuckDB extensions: {e}") from e
        return con

    def _write_connection(self) -> duckdb.DuckDBPyConnection:
        """Return the read-write connection, attaching the lake (and creating its dirs) on first use."""
        if self._writer is None:
            self._root.mkdir(parents=True, exist_ok=True)
            self._data_path.mkdir(parents=True, exist_ok=True)
            con = self._new_connection()
            try:
                # DuckLake retries a commit that lost the race for the next snapshot id (no logical conflict)
                # by itself; its default first wait of 100 ms is longer than a whole batch write here.
                con.execute(f"SET ducklake_retry_wait_ms = {_DUCKLAKE_RETRY_WAIT_MS}")
                con.execute("SET ducklake_retry_backoff = 2")
                con.execute(f"SET ducklake_max_retry_count = {_DUCKLAKE_MAX_RETRIES}")
                for statement in self._attach_statements(read_only=False, as_of=None, analyst=False):
                    con.execute(statement)
                con.execute(f"USE {_LAKE}")
            except duckdb.Error as e:
                con.close()
                raise LakeError(f"cannot open the lake {self._config.catalog_label}: {self._masked(e)}") from e
            self._writer = con
        return self._writer

    def _read_connection(self) -> duckdb.DuckDBPyConnection | None:
        """Return the internal read-only connection, or None while the lake does not exist yet."""
        if self._writer is not None:
            return self._writer  # this process writes: reading through its own connection costs nothing more
        if self._reader is None:
            if not self._exists():
                return None
            con = self._new_connection()
            try:
                for statement in self._attach_statements(read_only=True, as_of=None, analyst=False):
                    con.execute(statement)
                con.execute(f"USE {_LAKE}")
            except duckdb.Error as e:
                con.close()
                if "does not exist" in str(e) or "no such table" in str(e):
                    return None
                raise LakeError(f"cannot open the lake {self._config.catalog_label}: {self._masked(e)}") from e
            self._reader = con
        return self._reader

    def exists(self) -> bool:
        """Return False while a SQLite catalog has not been created yet (a PostgreSQL one is taken to exist)."""
        return self._exists()

    def _exists(self) -> bool:
        """Return False when a SQLite catalog file is missing (a PostgreSQL catalog is asked instead)."""
        return self._config.catalog != "sqlite" or self._config.catalog_file.is_file()

    def _attach_statements(self, *, read_only: bool, as_of: AsOf, analyst: bool) -> list[str]:
        """Return the statements that attach the lake as `lake` (a secret first, for PostgreSQL)."""
        options = [f"DATA_PATH {_literal(str(self._data_path) + os.sep)}"]
        statements: list[str] = []
        if read_only:
            options.append("READ_ONLY")
        else:
            options.append(f"DATA_INLINING_ROW_LIMIT {self._config.inlining_row_limit}")
        if isinstance(as_of, int):
            options.append(f"SNAPSHOT_VERSION {as_of}")
        elif isinstance(as_of, dt.datetime):
            options.append(f"SNAPSHOT_TIME {_literal(_aware(as_of, 'as_of').isoformat())}")
        if self._config.catalog == "sqlite":
            # WAL: readers never block the writer, whatever they hold. The busy timeout covers SQLite's short
            # internal locks (WAL checkpoints); turns between this host's writers are taken by _writers_turn.
            options += ["META_JOURNAL_MODE 'WAL'", f"META_BUSY_TIMEOUT {int(self._config.lock_timeout_s * 1000)}"]
            target = f"ducklake:sqlite:{self._config.catalog_file}"
        else:
            secret_dsn = self._config.analyst_postgres_dsn if analyst else None
            secret_dsn = secret_dsn or self._config.postgres_dsn
            pairs = parse_dsn(secret_dsn.get_secret_value() if secret_dsn is not None else "")
            password = pairs.pop("password", None)
            if password is not None:
                # The password travels in a secret, which DuckDB redacts, never in the attach path, which
                # duckdb_databases() shows to anyone on the connection.
                secret = f"finpulse_lake_{uuid.uuid4().hex[:8]}"
                statements.append(f"CREATE TEMPORARY SECRET {secret} (TYPE postgres, PASSWORD {_literal(password)})")
                options.append(f"META_SECRET {_literal(secret)}")
            dsn = " ".join(f"{key}={_dsn_value(value)}" for key, value in pairs.items())
            target = f"ducklake:postgres:{dsn}"
        statements.append(f"ATTACH {_literal(target)} AS {_LAKE} ({', '.join(options)})")
        return statements

    def _allowed_dirs_sql(self) -> str:
        """Return the analysts' allowed_directories: the lake dir and the data dir, as a SQL list."""
        dirs = {str(self._root) + os.sep, str(self._data_path) + os.sep}
        if self._config.catalog == "sqlite":
            dirs.add(str(self._config.catalog_file.parent) + os.sep)
        return "[" + ", ".join(_literal(d) for d in sorted(dirs)) + "]"

    def _open_analyst(self, as_of: AsOf) -> duckdb.DuckDBPyConnection:
        """Open a sandboxed read-only connection: only the lake's dirs, no external access, config locked."""
        if not self._exists():
            raise QueryError(f"no lake yet at {self._config.catalog_label}: run the scorer or the demo first")
        con = self._new_connection()
        try:
            # Spilling would need a writable dir outside the lake; analysts' queries run in memory instead.
            con.execute("SET temp_directory = ''")
            con.execute(f"SET allowed_directories = {self._allowed_dirs_sql()}")
            for statement in self._attach_statements(read_only=True, as_of=as_of, analyst=True):
                con.execute(statement)
            con.execute(f"USE {_LAKE}")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as e:
            con.close()
            raise QueryError(f"cannot open the lake for analysts: {self._masked(e)}") from e
        return con

    @contextlib.contextmanager
    def _analyst_session(self, as_of: AsOf) -> Iterator[duckdb.DuckDBPyConnection]:
        """Yield the shared sandbox, or a one-off one pinned to the snapshot `as_of` names."""
        if as_of is not None:
            con = self._open_analyst(as_of)
            try:
                yield con
            finally:
                con.close()
            return
        with self._analyst_lock:
            if self._analyst is None:
                self._analyst = self._open_analyst(None)
            yield self._analyst

    def _analyst_relation(
        self, con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object], timeout_s: float | None
    ) -> duckdb.DuckDBPyRelation | None:
        """Check `sql`, then bind it on the sandbox connection."""
        refuse_unsafe(con, sql)
        return self._guarded(con, timeout_s, lambda: con.sql(sql, params=list(params) if params else None))

    def _guarded(self, con: duckdb.DuckDBPyConnection, timeout_s: float | None, work: Any) -> Any:
        """Run `work()` on `con`, interrupting it after `timeout_s`; wrap DuckDB's errors."""
        limit = self._config.query_timeout_s if timeout_s is None else timeout_s
        if limit <= 0:
            raise QueryError(f"timeout_s must be positive, got {limit:g}")
        timer = threading.Timer(limit, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            return work()
        except duckdb.InterruptException as e:
            raise QueryError(f"the query ran longer than {limit:g} s (timeout_s) and was stopped") from e
        except duckdb.Error as e:
            raise QueryError(self._masked(e)) from e
        finally:
            timer.cancel()

    def _check_process(self) -> None:
        """Refuse connections inherited through fork: a DuckDB instance cannot be shared across processes."""
        if os.getpid() != self._pid:
            raise LakeError("this Lake was created in another process (fork): create a new Lake in each process")

    # -- internals: writing ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writers_turn(self) -> Iterator[float]:
        """Hold this host's writers' turn on a SQLite catalog (a no-op for PostgreSQL); yield the wait."""
        if self._config.catalog != "sqlite":
            yield 0.0
            return
        lock_path = self._config.catalog_file.with_name(self._config.catalog_file.name + ".writers.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        started = time.perf_counter()
        deadline = time.monotonic() + self._config.lock_timeout_s
        delay = _LOCK_POLL_FIRST_S
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreLockedError(
                            f"another writer held {lock_path} for longer than {self._config.lock_timeout_s:g} s "
                            f"(lock_timeout_s)"
                        ) from None
                    time.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
                    delay = min(delay * 2, _LOCK_POLL_MAX_S)
            waited = time.perf_counter() - started
            self._waited += waited
            yield waited
        finally:
            os.close(fd)  # also releases the flock

    def _retrying(self, what: str, work: Any) -> Any:
        """Run `work()` until it succeeds; retry conflicts with jittered backoff; wrap other errors.

        The attempts and the seconds spent waiting (backoff and writers' turns) land in `self._attempts` and
        `self._waited`, for `last_write`.
        """
        self._attempts = 0
        self._waited = 0.0
        delay = self._config.retry_wait_s
        while True:
            self._attempts += 1
            attempt_started = time.perf_counter()
            try:
                return work()
            except duckdb.Error as e:
                self._rollback()
                message = str(e).lower()
                if not any(marker in message for marker in _RETRYABLE_MARKERS):
                    raise LakeError(f"{what} failed: {self._masked(e)}") from e
                if self._attempts >= self._config.write_attempts:
                    raise LakeError(
                        f"{what} still conflicted with other writers after {self._attempts} attempts "
                        f"(write_attempts): {self._masked(e)}"
                    ) from e
                pause = delay * random.uniform(0.5, 1.0)
                time.sleep(pause)
                # The refused attempt's work was lost to the other writer, like the pause.
                self._waited += time.perf_counter() - attempt_started
                delay = min(delay * 2, self._config.max_retry_wait_s)

    def _rollback(self) -> None:
        """Roll back whatever transaction the writer connection has open."""
        if self._writer is not None:
            with contextlib.suppress(duckdb.Error):
                self._writer.execute("ROLLBACK")

    def _migrate_schema(self) -> None:
        """Apply pending lake migrations in one transaction."""
        con = self._write_connection()
        with self._writers_turn():
            con.execute("BEGIN")
            con.execute(
                "CREATE TABLE IF NOT EXISTS lake_schema_version "
                "(version INTEGER NOT NULL, description VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
            )
            found = con.execute("SELECT coalesce(max(version), 0) FROM lake_schema_version").fetchall()
            current = _first(found)
            if current > LAKE_SCHEMA_VERSION:
                con.execute("ROLLBACK")
                raise LakeError(
                    f"the lake was written by a newer finpulse (lake schema v{current}, this one knows "
                    f"v{LAKE_SCHEMA_VERSION}); upgrade finpulse"
                )
            for migration in _LAKE_MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO lake_schema_version VALUES (?, ?, now())", [migration.version, migration.description]
                )
            con.execute("COMMIT")
        if current < 1:
            # Persisted per table: the offsets (a few rows per batch) always stay in the catalog, whatever a
            # writer's inlining limit, and leave no Parquet file and delete file behind per batch.
            self._set_options(con)

    def _set_options(self, con: duckdb.DuckDBPyConnection) -> None:
        """Persist the lake's file options: zstd Parquet v2 (half the bytes of snappy v1, measured) and inlining."""
        with self._writers_turn():
            con.execute(f"CALL ducklake_set_option('{_LAKE}', 'parquet_compression', 'zstd')")
            con.execute(f"CALL ducklake_set_option('{_LAKE}', 'parquet_version', 2)")
            for table in ("consumed_offsets", "offset_registrations"):
                con.execute(
                    f"CALL ducklake_set_option('{_LAKE}', 'data_inlining_row_limit', 1000, table_name => '{table}')"
                )

    def _write_staged(
        self,
        con: duckdb.DuckDBPyConnection,
        batch: dict[str, NewsRow],
        targets: dict[tuple[str, int], int],
        cutoff: dt.datetime,
    ) -> tuple[set[str], int, int | None]:
        """Run one attempt of a batch write on the staged rows; return (inserted ids, replayed, snapshot)."""
        with self._writers_turn():
            con.execute("BEGIN")
            stored = {
                (str(topic), int(partition)): int(next_offset)
                for topic, partition, next_offset in con.execute(
                    "SELECT topic, partition, next_offset FROM consumed_offsets"
                ).fetchall()
            }
            replayed = {
                row.id
                for row in batch.values()
                if row.kafka_topic is not None
                and row.kafka_partition is not None
                and row.kafka_offset is not None
                and row.kafka_offset < stored.get((row.kafka_topic, row.kafka_partition), 0)
            }
            known = {str(found[0]) for found in con.execute(_KNOWN_SQL, [cutoff.isoformat()]).fetchall()}
            skipped = replayed | known
            fresh = [news_id for news_id in batch if news_id not in skipped]
            if fresh:
                # Lists travel as one JSON string: the Python client binds a 512-item list ~20x slower.
                excluded = json.dumps(sorted(skipped), ensure_ascii=False)
                con.execute(_INSERT_NEWS_SQL, [excluded])
                con.execute(_INSERT_TOKENS_SQL, [excluded])
            self._advance_offsets(con, stored, targets)
            con.execute("COMMIT")
            snapshot = None
            if fresh or any(targets.get(key, 0) > stored.get(key, -1) for key in targets):
                found = con.execute(f"SELECT id FROM ducklake_last_committed_snapshot('{_LAKE}')").fetchall()
                snapshot = _first(found) or None
        return set(fresh), len(replayed), snapshot

    def _advance_offsets(
        self, con: duckdb.DuckDBPyConnection, stored: dict[tuple[str, int], int], targets: dict[tuple[str, int], int]
    ) -> None:
        """Move each partition's next offset forward to its target; never backwards."""
        moved = {key: value for key, value in targets.items() if value > stored.get(key, -1)}
        if not moved:
            return
        known = [key for key in moved if key in stored]
        new = [key for key in moved if key not in stored]
        if known:
            con.execute(
                "UPDATE consumed_offsets SET next_offset = m.next_offset FROM (SELECT unnest(?) AS topic, "
                "unnest(?) AS partition, unnest(?) AS next_offset) m "
                "WHERE consumed_offsets.topic = m.topic AND consumed_offsets.partition = m.partition",
                [[k[0] for k in known], [k[1] for k in known], [moved[k] for k in known]],
            )
        if new:
            con.execute("UPDATE offset_registrations SET partitions = partitions + ?", [len(new)])
            con.execute(
                "INSERT INTO consumed_offsets SELECT unnest(?), unnest(?), unnest(?)",
                [[k[0] for k in new], [k[1] for k in new], [moved[k] for k in new]],
            )

    def _export_history(self, history: FileHistory, staging: Path) -> tuple[int, int]:
        """Copy the DuckDB file's news to a Parquet file under its read lock; return (schema version, rows)."""
        try:
            with history.session(read_only=True) as src:
                tables = {
                    str(found[0])
                    for found in src.execute(
                        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"
                    ).fetchall()
                }
                if "news" not in tables:
                    return 0, 0
                version = 0
                if "schema_version" in tables:
                    found = src.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()
                    version = _first(found)
                present = {str(r[1]) for r in src.execute("PRAGMA table_info('news')").fetchall()}
                # A file of an older schema lacks the columns added since: they are NULL there, as in the lake.
                columns = ", ".join(
                    name if name in present else f"CAST(NULL AS {sql_type}) AS {name}"
                    for name, sql_type in NEWS_COLUMNS
                )
                src.execute(f"COPY (SELECT {columns} FROM news) TO {_literal(str(staging))} (FORMAT parquet)")
                found = src.execute("SELECT count(*) FROM news").fetchall()
                return version, _first(found)
        except duckdb.Error as e:
            raise LakeError(f"cannot read the DuckDB history {history.path}: {e}") from e

    def _copy_staged(self, con: duckdb.DuckDBPyConnection, pattern: str, *, check_ids: bool) -> int:
        """Insert the rows of Parquet `pattern` (those the lake lacks, with `check_ids`), their words, and the
        offsets past them; return the count."""
        columns = ", ".join(NEWS_COLUMN_NAMES)
        source = f"(SELECT {columns} FROM read_parquet({_literal(pattern)}))"
        unknown = f" WHERE NOT EXISTS (SELECT 1 FROM {_LAKE}.news n WHERE n.id = s.id)" if check_ids else ""
        # A temp table keeps the selection fixed while three statements read it (news, words, offsets).
        con.execute(f"CREATE OR REPLACE TEMP TABLE lake_migrating AS SELECT s.* FROM {source} s{unknown}")
        con.execute(f"INSERT INTO news ({columns}) SELECT {columns} FROM temp.lake_migrating ORDER BY scored_at")
        con.execute(_tokens_insert("temp.lake_migrating", ""))
        targets = {
            (str(topic), int(partition)): int(next_offset)
            for topic, partition, next_offset in con.execute(
                "SELECT kafka_topic, kafka_partition, max(kafka_offset) + 1 FROM temp.lake_migrating "
                "WHERE kafka_topic IS NOT NULL AND kafka_partition IS NOT NULL AND kafka_offset IS NOT NULL "
                "GROUP BY ALL"
            ).fetchall()
        }
        stored = {
            (str(t), int(p)): int(n)
            for t, p, n in con.execute("SELECT topic, partition, next_offset FROM consumed_offsets").fetchall()
        }
        self._advance_offsets(con, stored, targets)
        found = con.execute("SELECT count(*) FROM temp.lake_migrating").fetchall()
        con.execute("DROP TABLE temp.lake_migrating")
        return _first(found)

    # -- internals: reading ----------------------------------------------------------------------------------

    def _fetch(self, con: duckdb.DuckDBPyConnection, sql: str, params: list[object], what: str) -> list[Any]:
        """Run one internal statement and fetch its rows; wrap DuckDB's errors."""
        try:
            return con.execute(sql, params or None).fetchall()
        except duckdb.Error as e:
            raise LakeError(f"{what} in {self._config.catalog_label} failed: {self._masked(e)}") from e

    def _inlined_rows(self, con: duckdb.DuckDBPyConnection) -> int:
        """Return how many news rows wait in the catalog for `compact` to write them to Parquet."""
        total = int(self._fetch(con, "SELECT count(*) FROM news", [], "counting news")[0][0])
        in_files = self._fetch(
            con,
            f"SELECT coalesce(sum(f.record_count), 0) FROM {_metadata()}.ducklake_data_file f "
            f"JOIN {_metadata()}.ducklake_table t USING (table_id) "
            "WHERE t.table_name = 'news' AND t.end_snapshot IS NULL AND f.end_snapshot IS NULL",
            [],
            "counting rows in files",
        )
        return max(total - int(in_files[0][0]), 0)

    def _words(self, con: duckdb.DuckDBPyConnection, text: str) -> list[str]:
        """Cut `text` into the words the index holds, with the same expression the writes use."""
        found = self._fetch(con, "SELECT " + _tokens_of("?"), [text], "reading the search words")
        words = [str(word) for word in (found[0][0] or [])]
        if not words:
            raise QueryError(f"nothing to search for in {text!r}: give at least one word")
        if len(words) > _SEARCH_MAX_WORDS:
            raise QueryError(f"search at most {_SEARCH_MAX_WORDS} words at once, got {len(words)}")
        return words

    def _search(
        self,
        con: duckdb.DuckDBPyConnection,
        words: list[str],
        limit: int,
        since: dt.datetime | None,
        until: dt.datetime | None,
    ) -> QueryResult:
        """Walk back through the scored_at blocks that hold every word, newest first, until `limit` rows match.

        The word index says which blocks (scored_at values) hold every word somewhere; the rows of a block are
        then checked one by one. Blocks are read newest first in rounds that grow fourfold, so a frequent word
        touches a few batches and a rare one reads only the batches that hold it.
        """
        where, params = _time_filter(since, until)
        words_json = json.dumps(words, ensure_ascii=False)
        # Per block: the fewest rows holding any one of the words, an upper bound of the rows holding all.
        blocks = [
            (int(found[0]), int(found[1]))
            for found in self._fetch(
                con,
                "SELECT epoch_us(scored_at), min(docs) FROM (SELECT scored_at, token, sum(docs) AS docs "
                "FROM news_tokens WHERE token IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))"
                + where.replace(" WHERE ", " AND ")
                + " GROUP BY scored_at, token) GROUP BY scored_at HAVING count(*) = ? "
                "ORDER BY scored_at DESC LIMIT ?",
                [words_json, *params, len(words), _SEARCH_MAX_BLOCKS],
                "searching the words",
            )
        ]
        # A cheap substring test runs before the exact word test, on every word.
        prefilter = " AND ".join(f"contains(lower(text), {_literal(word)})" for word in words)
        collected: list[tuple[object, ...]] = []
        start, rounds = 0, 0
        while start < len(blocks) and len(collected) < limit:
            # Enough blocks to hold the missing rows if every counted row matched; more in later rounds.
            wanted = (limit - len(collected)) * (4**rounds)
            end, bound = start, 0
            while end < len(blocks) and bound < wanted:
                bound += blocks[end][1]
                end += 1
            chunk = [block for block, _ in blocks[start:end]]
            rows = self._fetch(
                con,
                f"{_SELECT_ROWS_SQL} FROM news WHERE scored_at BETWEEN make_timestamptz(?) AND make_timestamptz(?) "
                "AND epoch_us(scored_at) IN (SELECT unnest(from_json(?, '[\"BIGINT\"]'))) "
                f"AND {prefilter} AND list_has_all({_tokens_of('text')}, from_json(?, '[\"VARCHAR\"]')) "
                "ORDER BY scored_at DESC, id LIMIT ?",
                [min(chunk), max(chunk), json.dumps(chunk), words_json, limit - len(collected)],
                "reading the matching rows",
            )
            collected.extend(_with_utc(row) for row in rows)
            start, rounds = end, rounds + 1
        return QueryResult(
            columns=list(NEWS_COLUMN_NAMES), rows=collected, types=[sql_type for _, sql_type in NEWS_COLUMNS]
        )

    def _masked(self, error: BaseException) -> str:
        """Return the error's text with the catalog password masked."""
        text = str(error)
        for secret in (self._config.postgres_dsn, self._config.analyst_postgres_dsn):
            if secret is None:
                continue
            password = parse_dsn(secret.get_secret_value()).get("password")
            if password:
                text = text.replace(password, "***")
        return text


# -- SQL of the write path ------------------------------------------------------------------------------------

_CASTS: Final = ", ".join(
    f"CAST(r.{name} AS TIMESTAMPTZ) AS {name}" if name in TIMESTAMP_COLUMNS else f"r.{name} AS {name}"
    for name in NEWS_COLUMN_NAMES
)
# The whole batch is bound as one JSON string and decoded once into a temp table (outside the lake
# transaction): binding values one by one costs ~40 µs each in the Python client.
_STAGE_SQL: Final = (
    "CREATE OR REPLACE TEMP TABLE lake_batch AS SELECT "
    + _CASTS
    + " FROM (SELECT unnest(from_json(?, '"
    + json_structure().replace("'", "''")
    + "')) AS r)"
)
# The scored_at bound lets DuckLake skip every file (and Parquet row group) older than the window.
_KNOWN_SQL: Final = (
    "SELECT DISTINCT n.id FROM news n WHERE n.scored_at >= CAST(? AS TIMESTAMPTZ) "
    "AND n.id IN (SELECT id FROM temp.lake_batch)"
)
_NOT_SKIPPED: Final = "WHERE id NOT IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))"
_INSERT_NEWS_SQL: Final = (
    f"INSERT INTO news ({', '.join(NEWS_COLUMN_NAMES)}) SELECT {', '.join(NEWS_COLUMN_NAMES)} FROM temp.lake_batch "
    + _NOT_SKIPPED
)


def _tokens_insert(source: str, where: str) -> str:
    """Return the INSERT of the words of `source`'s rows: one row per word and scored_at, with its row count."""
    # The word lists are distinct per row, so count(*) per (word, scored_at) counts rows holding the word.
    return (
        f"INSERT INTO news_tokens SELECT token, scored_at, CAST(count(*) AS INTEGER) FROM (SELECT unnest("
        f"{_tokens_of('text')}) AS token, scored_at FROM {source} {where}) GROUP BY token, scored_at"
    )


_INSERT_TOKENS_SQL: Final = _tokens_insert("temp.lake_batch", _NOT_SKIPPED)
# Timestamps leave DuckDB as epoch microseconds: handing out TIMESTAMPTZ values needs pytz.
_SELECT_ROWS_SQL: Final = "SELECT " + ", ".join(
    f"epoch_us({name})" if name in TIMESTAMP_COLUMNS else name for name in NEWS_COLUMN_NAMES
)


# -- helpers --------------------------------------------------------------------------------------------------


def extension_path(name: str) -> Path:
    """Return the file to LOAD for extension `name` (ducklake, sqlite, postgres), taken from its PyPI wheel.

    The sqlite and postgres files are linked under the names DuckDB expects (`sqlite_scanner`,
    `postgres_scanner`) in a per-user cache dir, since DuckDB derives the entry point from the file name.
    """
    if name not in _EXTENSIONS:
        raise LakeError(f"unknown DuckDB extension {name!r}; known: {', '.join(sorted(_EXTENSIONS))}")
    package, load_name = _EXTENSIONS[name]
    version = duckdb.__version__
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise LakeError(
            f"the DuckDB {name} extension is not installed: pip install duckdb-extension-{name}=={version}"
        ) from None
    source = Path(str(root / "extensions" / f"v{version}" / f"{name}.duckdb_extension"))
    if not source.is_file():
        raise LakeError(
            f"{package} has no extension for DuckDB {version} (looked for {source}): "
            f"pip install duckdb-extension-{name}=={version}"
        )
    if load_name == name:
        return source
    cache = Path(tempfile.gettempdir()) / f"finpulse-duckdb-extensions-{os.getuid()}" / f"v{version}"
    target = cache / f"{load_name}.duckdb_extension"
    with contextlib.suppress(OSError):
        if target.resolve(strict=True) == source.resolve():
            return target
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    if cache.parent.stat().st_uid != os.getuid():
        raise LakeError(f"{cache.parent} belongs to another user: remove it, or set TMPDIR to a private dir")
    link = cache / f".{load_name}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    link.symlink_to(source)
    link.replace(target)  # atomic: a concurrent process sees the old link or the new one, never none
    return target


def tables_in(sql: str) -> set[str] | None:
    """Return the base tables one read statement names, or None when it cannot be parsed as one SELECT."""
    try:
        statements = duckdb.extract_statements(sql)
        if len(statements) != 1 or statements[0].type.name.removesuffix("_STATEMENT") != "SELECT":
            return None
        with duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}) as con:
            found = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    except duckdb.Error:
        return None
    tree = json.loads(found[0][0]) if found else {}
    if tree.get("error"):
        return None
    return {name.lower() for name in _table_names(tree)}


def refuse_unsafe(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless `sql` is one SELECT (or EXPLAIN of one) calling no file, catalog or admin function."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from e
    if not statements:
        raise QueryError("empty query: nothing to run")
    if len(statements) > 1:
        raise QueryError(f"run one statement at a time (got {len(statements)})")
    kind = statements[0].type.name.removesuffix("_STATEMENT")
    text = sql
    if kind == "EXPLAIN":
        text = _EXPLAIN.sub("", sql, count=1)
        inner = duckdb.extract_statements(text) if text != sql else []
        if len(inner) != 1 or inner[0].type.name.removesuffix("_STATEMENT") != "SELECT":
            raise QueryError("only EXPLAIN [ANALYZE] of a SELECT is allowed")
    elif kind != "SELECT":
        raise QueryError(f"only read queries are allowed (got {kind})")
    try:
        found = con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()
    except duckdb.Error as e:
        raise QueryError(str(e)) from e
    tree = json.loads(found[0][0]) if found else {}
    if tree.get("error"):
        # PRAGMA and SHOW parse as SELECTs of table functions but cannot be serialized: refuse what cannot be checked.
        raise QueryError(f"only read queries are allowed ({tree.get('error_message') or 'unreadable statement'})")
    for function in _function_names(tree):
        lowered = function.lower()
        if lowered in _ALLOWED_DUCKLAKE_FUNCTIONS:
            continue
        if lowered in _DENIED_FUNCTIONS or lowered.startswith(_DENIED_FUNCTION_PREFIXES):
            raise QueryError(f"{function}() is not available to analysts: query the lake's tables instead")
    for table in _table_names(tree):
        if "/" in table or ":" in table or "." in table:
            raise QueryError(f"reading files by name ({table!r}) is not available to analysts: query news instead")


def _function_names(node: object) -> Iterator[str]:
    """Yield every function name in a serialized statement tree."""
    if isinstance(node, dict):
        name = node.get("function_name")
        if isinstance(name, str):
            yield name
        for value in node.values():
            yield from _function_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _function_names(value)


def _table_names(node: object) -> Iterator[str]:
    """Yield the name of every base table in a serialized statement tree."""
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            yield str(node["table_name"])
        for value in node.values():
            yield from _table_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _table_names(value)


def _target_offsets(rows: Iterable[NewsRow], offsets: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """Return each partition's next offset: the given one, at least one past the batch's highest offset."""
    targets = {(str(topic), int(partition)): int(value) for (topic, partition), value in offsets.items()}
    for row in rows:
        if row.kafka_topic is not None and row.kafka_partition is not None and row.kafka_offset is not None:
            key = (row.kafka_topic, row.kafka_partition)
            targets[key] = max(targets.get(key, 0), row.kafka_offset + 1)
    for (topic, partition), value in targets.items():
        if value < 0 or partition < 0:
            raise LakeError(f"offset {value} of {topic}[{partition}] is negative: pass Kafka's next offset")
    return targets


def _at_clause(as_of: AsOf) -> tuple[str, list[object]]:
    """Return a DuckLake AT clause for `as_of` and its parameters."""
    if as_of is None:
        return "", []
    if isinstance(as_of, bool) or not isinstance(as_of, int | dt.datetime):
        raise LakeError(f"as_of must be a snapshot id or a timezone-aware datetime, got {as_of!r}")
    if isinstance(as_of, int):
        return " AT (VERSION => ?)", [as_of]
    return " AT (TIMESTAMP => CAST(? AS TIMESTAMPTZ))", [_aware(as_of, "as_of").isoformat()]


def _time_filter(since: dt.datetime | None, until: dt.datetime | None) -> tuple[str, list[object]]:
    """Return a WHERE clause on scored_at for [since, until) and its parameters."""
    clauses: list[str] = []
    params: list[object] = []
    if since is not None:
        clauses.append("scored_at >= CAST(? AS TIMESTAMPTZ)")
        params.append(_aware(since, "since").isoformat())
    if until is not None:
        clauses.append("scored_at < CAST(? AS TIMESTAMPTZ)")
        params.append(_aware(until, "until").isoformat())
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _aware(value: dt.datetime, name: str) -> dt.datetime:
    """Return `value` in UTC; refuse a naive datetime, whose zone would be a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise LakeError(f"{name} must be timezone-aware, got naive {value!r}")
    return value.astimezone(dt.UTC)


def _with_utc(row: tuple[object, ...]) -> tuple[object, ...]:
    """Return a row selected with epoch microseconds, its timestamps as aware UTC datetimes."""
    return tuple(
        from_epoch_us_required(value) if name in TIMESTAMP_COLUMNS and isinstance(value, int) else value
        for name, value in zip(NEWS_COLUMN_NAMES, row, strict=True)
    )


def _first(found: list[tuple[Any, ...]]) -> int:
    """Return the first value of the first fetched row as an int (0 for none).

    Statements with side effects are always read with fetchall: a result left unfinished by fetchone is
    cancelled by the next statement, and DuckDB then rolls back its auto-commit transaction (measured: a
    merge_adjacent_files read with fetchone merged nothing).
    """
    return int(found[0][0]) if found and found[0][0] is not None else 0


def _metadata() -> str:
    """Return the name DuckLake attaches the catalog database under."""
    return f"__ducklake_metadata_{_LAKE}"


def _literal(text: str) -> str:
    """Return `text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _dsn_value(value: str) -> str:
    """Return a libpq DSN value, quoted when it holds spaces or quotes."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _require(module: str, what: str) -> None:
    """Raise LakeError naming the package to install when `module` is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise LakeError(f"{what} needs {module}: pip install {module}") from None
