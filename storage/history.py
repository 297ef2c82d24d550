"""DuckDB history of scored news: short locked sessions, idempotent batch writes, read-only analyst queries.

DuckDB lets one process open a file read-write, or several open it read-only, never both. Scorer
processes and analysts' `finpulse query` share one file, so every unit of work here is a short
session: take the file, do the work in one transaction, close it. A process that finds the file
taken retries with jittered backoff until `lock_timeout_s`, then raises `StoreLockedError`.

Around DuckDB's own lock sit three cheaper ones, because a failed `duckdb.connect` costs
milliseconds of CPU (it builds a database instance before it tries the lock):

* a session lock (`<file>.lock`): a `flock`, shared for readers and exclusive for writers, held for
  the whole session, so waiting is a cheap poll and DuckDB's lock is free once it is taken;
* a turnstile (`<file>.turnstile`): an exclusive `flock` held only while waiting for the session
  lock. A waiter keeps it, so whoever holds the file cannot start its next session before the
  waiter got in: a scorer writing back-to-back batches would otherwise starve queries, since its
  gap between two sessions is shorter than any retry interval;
* an in-process lock per file: DuckDB refuses a read-only and a read-write connection to the same
  file inside one process, and two write transactions would conflict, so the sessions of one
  process run one at a time.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import fcntl
import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import duckdb
from rich.table import Table
from rich.text import Text

from storage.config import StorageConfig
from storage.errors import QueryError, StorageError, StoreLockedError
from storage.lake_config import LakeConfig
from storage.schema import (
    NEWS_COLUMN_NAMES,
    PROBABILITY_COLUMNS,
    TIMESTAMP_COLUMNS,
    from_epoch_us,
    json_structure,
    migrate,
)

if TYPE_CHECKING:
    from storage.lake import Lake

__all__ = ["FileHistory", "History", "NewsRow", "QueryResult", "WriteResult", "fetch_result", "row_payload"]

_LOCK_MARKERS: Final = ("Could not set lock", "Conflicting lock")
# A failed duckdb.connect costs several milliseconds of CPU (it builds a whole database instance
# before it tries the lock), so its retries back off further than the cheap flock polls.
_CONNECT_RETRY_FIRST_S: Final = 0.002
_CONNECT_RETRY_MAX_S: Final = 0.025
_FLOCK_RETRY_FIRST_S: Final = 0.0005
_FLOCK_RETRY_MAX_S: Final = 0.005
# Closing a DuckDB file checkpoints it by default: tens of milliseconds of fsyncs per batch on a
# small VM. Writers skip that and checkpoint when the WAL passes this size instead; everyone who
# opens the file replays at most this much WAL (~25 KB per 128-row batch).
_CHECKPOINT_THRESHOLD: Final = "256KiB"
_TIMESTAMPTZ: Final = "TIMESTAMP WITH TIME ZONE"
_NUMERIC_TYPE_PREFIXES: Final = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "UHUGEINT",
    "FLOAT",
    "DOUBLE",
    "DECIMAL",
)


@dataclass(frozen=True, kw_only=True)
class NewsRow:
    """One scored news item as stored in the `news` table; datetimes are normalised to UTC."""

    id: str
    published_at: dt.datetime
    source: str | None
    text: str
    tickers: tuple[str, ...]
    topic: str
    topic_confidence: float
    sentiment: str
    sentiment_confidence: float
    sentiment_negative: float
    sentiment_neutral: float
    sentiment_positive: float
    topic_version: str
    sentiment_version: str
    scored_at: dt.datetime
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    language: str | None = None  # BCP 47, as the language guard read it
    outcome: str | None = None  # scored | unsupported_language | unreadable (None: written before the guard)

    def __post_init__(self) -> None:
        """Reject naive datetimes and impossible probabilities; coerce numpy scalars to Python ones."""
        if not self.id:
            raise ValueError("NewsRow.id must be a non-empty string")
        for name in ("published_at", "scored_at"):
            value: dt.datetime = getattr(self, name)
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"NewsRow.{name} must be timezone-aware, got naive {value!r}")
            object.__setattr__(self, name, value.astimezone(dt.UTC))
        object.__setattr__(self, "tickers", tuple(str(ticker) for ticker in self.tickers))
        for name in PROBABILITY_COLUMNS:
            # float() turns numpy/torch scalars into floats that json can encode.
            probability = float(getattr(self, name))
            if not 0.0 <= probability <= 1.0:  # also false for NaN
                raise ValueError(f"NewsRow.{name} must be a probability in [0, 1], got {probability!r}")
            object.__setattr__(self, name, probability)
        for name in ("kafka_partition", "kafka_offset"):
            number = getattr(self, name)
            if number is not None:
                object.__setattr__(self, name, int(number))


@dataclass(frozen=True)
class WriteResult:
    """Ids a batch added and ids it skipped, in batch order; together they account for every row."""

    inserted: list[str]
    duplicates: list[str]


@dataclass(frozen=True)
class QueryResult:
    """Rows of an analyst query with their column names and DuckDB type names."""

    columns: list[str]
    rows: list[tuple[object, ...]]
    types: list[str] = field(default_factory=list)
    truncated: bool = False

    def to_records(self) -> list[dict[str, object]]:
        """Return one JSON-ready dict per row (datetimes as ISO 8601 strings)."""
        return [
            {column: _jsonable(value) for column, value in zip(self.columns, row, strict=True)} for row in self.rows
        ]

    def to_json(self, indent: int | None = None) -> str:
        """Return the rows as a JSON array of objects."""
        return json.dumps(self.to_records(), ensure_ascii=False, indent=indent, allow_nan=False)

    def to_json_lines(self, stream: TextIO) -> None:
        """Write one JSON object per line to `stream`."""
        for record in self.to_records():
            stream.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
            stream.write("\n")

    def to_csv(self, stream: TextIO) -> None:
        """Write a header and the rows as CSV to `stream` (lists and structs as JSON, NULL as empty)."""
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_plain(value) for value in row])

    def to_table(self, max_rows: int = 50, title: str | None = None, max_width: int = 60) -> Table:
        """Build a rich table of at most `max_rows` rows, long text cut to `max_width` characters."""
        shown = self.rows[:max_rows]
        if len(shown) < len(self.rows) or self.truncated:
            # "+" says the query itself was cut by max_rows, so the true total is unknown.
            caption = f"{len(shown)} of {len(self.rows)}{'+' if self.truncated else ''} rows"
        else:
            caption = f"{len(shown)} row{'' if len(shown) == 1 else 's'}"
        table = Table(title=title, caption=caption, header_style="bold", show_lines=False)
        types = self.types if len(self.types) == len(self.columns) else [""] * len(self.columns)
        for column, type_name in zip(self.columns, types, strict=True):
            numeric = type_name.startswith(_NUMERIC_TYPE_PREFIXES)
            table.add_column(
                column,
                justify="right" if numeric else "left",
                # One line per row keeps wide results scannable; the full text is in CSV/JSON.
                no_wrap=True,
                overflow="ellipsis",
                # Without a floor rich squeezes narrow numeric columns of wide results to nothing.
                min_width=min(len(column), 12),
                max_width=None if numeric else max_width,
            )
        for row in shown:
            table.add_row(*(_cell(value) for value in row))
        return table


class FileHistory:
    """One DuckDB file: the state tables (alerts, labels, models) and the news table of schemas v1–v4.

    Its news methods are the history of finpulse before the lake: `finpulse migrate` reads them, and
    `finpulse bench history` measures them as the baseline. `History` keeps the news in the lake instead.
    """

    def __init__(self, config: StorageConfig) -> None:
        """Remember where the file lives; nothing is opened until a method needs it."""
        self._config = config
        # Resolved so that two spellings of one file share the in-process lock.
        self._path = Path(config.duckdb_path).expanduser().resolve()
        self._session_path = self._path.with_name(self._path.name + ".lock")
        self._turnstile_path = self._path.with_name(self._path.name + ".turnstile")
        columns = ", ".join(NEWS_COLUMN_NAMES)
        selected = ", ".join(
            f"CAST(r.{name} AS TIMESTAMPTZ)" if name in TIMESTAMP_COLUMNS else f"r.{name}" for name in NEWS_COLUMN_NAMES
        )
        structure = json_structure().replace("'", "''")
        # The whole batch is bound as one JSON string: duckdb 1.4's Python client spends ~40 µs per
        # bound value (it retries `import pandas` for each), ~200 ms for a 128-row batch.
        self._insert_sql = (
            f"INSERT INTO news ({columns}) SELECT {selected} "
            f"FROM (SELECT unnest(from_json(?, '{structure}')) AS r) "
            "WHERE NOT EXISTS (SELECT 1 FROM news WHERE news.id = r.id) RETURNING id"
        )
        self._select_sql = "SELECT " + ", ".join(
            f"epoch_us({name})" if name in TIMESTAMP_COLUMNS else name for name in NEWS_COLUMN_NAMES
        )

    @property
    def path(self) -> Path:
        """Return the absolute path of the DuckDB file."""
        return self._path

    def session(self, *, read_only: bool) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """Open the file for one unit of work under this history's locks (raw: no migration, no error wrapping)."""
        # Stores of other tables use `transaction` and `reading`; this is for work that needs neither.
        return self._session(read_only=read_only)

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run one write transaction on a migrated file; leaving by an exception rolls it back.

        For the stores of other tables in this file; `what` names the work in the one-line error.
        """
        with self._session(read_only=False) as con:
            try:
                con.begin()
                migrate(con)
                yield con
                con.commit()
            except duckdb.Error as e:
                # Closing the connection without a commit rolls the transaction back.
                raise StorageError(f"{what} in {self._path} failed: {e}") from e

    @contextlib.contextmanager
    def reading(self, what: str, tables: Sequence[str]) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """Open a read-only session, or yield None while the file or any of `tables` does not exist yet.

        A file written only by an older finpulse lacks the newer tables; readers see "nothing yet", not an error.
        """
        if not self._path.exists():
            yield None
            return
        with self._session(read_only=True) as con:
            try:
                found = con.execute(
                    "SELECT count(DISTINCT table_name) FROM duckdb_tables() WHERE list_contains(?, table_name)",
                    [list(tables)],
                ).fetchone()
                yield con if found is not None and found[0] == len(set(tables)) else None
            except duckdb.Error as e:
                raise StorageError(f"{what} in {self._path} failed: {e}") from e

    def ensure_schema(self) -> None:
        """Create the file and its tables, or migrate them, so that readers find them."""
        with self._session(read_only=False) as con:
            try:
                con.begin()
                migrate(con)
                con.commit()
            except duckdb.Error as e:
                raise StorageError(f"cannot create the schema in {self._path}: {e}") from e

    def write_batch(self, rows: Sequence[NewsRow]) -> WriteResult:
        """Insert rows whose id is new, in one transaction; repeats and known ids are duplicates."""
        first_seen: dict[str, NewsRow] = {}
        for row in rows:
            first_seen.setdefault(row.id, row)  # first occurrence wins
        if not first_seen:
            return WriteResult(inserted=[], duplicates=[])
        payload = json.dumps([row_payload(row) for row in first_seen.values()], ensure_ascii=False, allow_nan=False)
        with self._session(read_only=False) as con:
            try:
                con.begin()
                migrate(con)
                # The anti-join decides which ids are new. It cannot race: DuckDB admits one
                # read-write process per file and this process runs one session at a time, so a
                # batch replayed after a crash, or by another scorer, inserts nothing twice.
                returned = {str(found[0]) for found in con.execute(self._insert_sql, [payload]).fetchall()}
                con.commit()
            except duckdb.Error as e:
                # Closing the connection without a commit rolls the transaction back.
                raise StorageError(f"writing {len(first_seen)} rows to {self._path} failed: {e}") from e
        inserted: list[str] = []
        duplicates: list[str] = []
        for row in rows:
            if row.id in returned:
                inserted.append(row.id)
                returned.discard(row.id)  # later repeats of this id are duplicates
            else:
                duplicates.append(row.id)
        return WriteResult(inserted=inserted, duplicates=duplicates)

    def count(self) -> int:
        """Return how many news rows the history holds (0 before the first write)."""
        if not self._path.exists():
            return 0
        with self._session(read_only=True) as con:
            try:
                found = con.execute("SELECT count(*) FROM news").fetchone()
            except duckdb.Error as e:
                raise StorageError(f"cannot count news in {self._path}: {e}") from e
        return int(found[0]) if found is not None else 0

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Return those of `ids` that are already stored."""
        wanted = sorted(set(ids))
        if not wanted or not self._path.exists():
            return set()
        with self._session(read_only=True) as con:
            try:
                found = con.execute(
                    "SELECT id FROM news WHERE id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                    [json.dumps(wanted, ensure_ascii=False)],
                ).fetchall()
            except duckdb.Error as e:
                raise StorageError(f"cannot look up ids in {self._path}: {e}") from e
        return {str(record[0]) for record in found}

    def fetch(self, ids: Iterable[str]) -> list[NewsRow]:
        """Return the stored rows for `ids`, in the order asked, skipping unknown ids."""
        wanted = list(dict.fromkeys(ids))
        if not wanted or not self._path.exists():
            return []
        with self._session(read_only=True) as con:
            try:
                records = con.execute(
                    f"{self._select_sql} FROM news WHERE id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                    [json.dumps(wanted, ensure_ascii=False)],
                ).fetchall()
            except duckdb.Error as e:
                raise StorageError(f"cannot read rows from {self._path}: {e}") from e
        by_id = {row.id: row for row in map(_news_row, records)}
        return [by_id[news_id] for news_id in wanted if news_id in by_id]

    def query(self, sql: str, params: Sequence[object] = (), *, max_rows: int | None = None) -> QueryResult:
        """Run one read-only statement for an analyst; at most `max_rows` rows are fetched."""
        _refuse_writes(sql)
        if not self._path.exists():
            raise QueryError(f"no history yet at {self._path}: run the scorer or the demo first")
        with self._session(read_only=True) as con:
            return self._run_read(con, sql, params, max_rows)

    def _run_read(
        self, con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object], max_rows: int | None
    ) -> QueryResult:
        """Run a checked read statement on `con` and fetch at most `max_rows` rows."""
        try:
            relation = con.sql(sql, params=list(params) if params else None)
            if relation is None:
                return QueryResult(columns=[], rows=[])
            return fetch_result(relation, max_rows)
        except duckdb.InterruptException:
            raise
        except duckdb.Error as e:
            raise QueryError(str(e)) from e

    @contextlib.contextmanager
    def _session(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file for one unit of work and close it afterwards, waiting out other holders."""
        deadline = time.monotonic() + self._config.lock_timeout_s
        lock = _process_lock(self._path)
        if not lock.acquire(timeout=self._config.lock_timeout_s):
            raise StoreLockedError(self._locked_message("another thread of this process holds it"))
        try:
            if not read_only:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._sidecar_locks(exclusive=not read_only, deadline=deadline):
                con = self._connect(read_only=read_only, deadline=deadline)
                try:
                    self._prepare(con, read_only=read_only)
                    yield con
                finally:
                    con.close()
        finally:
            lock.release()

    @contextlib.contextmanager
    def _sidecar_locks(self, *, exclusive: bool, deadline: float) -> Iterator[None]:
        """Hold the session lock for the whole session, taken through the turnstile."""
        turnstile = _open_lock_file(self._turnstile_path)
        session = _open_lock_file(self._session_path)
        try:
            if turnstile is not None and session is not None:
                # Keep the turnstile while waiting: whoever holds the session cannot start its
                # next one until this waiter got in, so readers and writers take turns.
                self._flock(turnstile, fcntl.LOCK_EX, deadline, self._turnstile_path)
                try:
                    self._flock(session, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, deadline, self._session_path)
                finally:
                    fcntl.flock(turnstile, fcntl.LOCK_UN)
            # Unlocking is left to os.close below, which also covers an exception in the session.
            yield
        finally:
            for fd in (session, turnstile):
                if fd is not None:
                    os.close(fd)

    def _flock(self, fd: int, operation: int, deadline: float, path: Path) -> None:
        """Take a flock, polling with jittered backoff until the deadline."""
        # Polling a flock costs one system call, so waiters can poll often and notice a release
        # within milliseconds without burning the CPU that the holder needs.
        delay = _FLOCK_RETRY_FIRST_S
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(self._locked_message(f"{path} is held by another process")) from None
                time.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
                delay = min(delay * 2, _FLOCK_RETRY_MAX_S)

    def _connect(self, *, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        """Connect to the file, retrying with jittered backoff while another process holds it."""
        # Conflicts here come only from processes that bypass the sidecar locks (the duckdb CLI,
        # a notebook) or from a folder where the lock files could not be created.
        # Never an extension from the network: the lake's are loaded by path from their wheels.
        config: dict[str, str | bool | int | float | list[str]] = {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
        if not read_only:
            config["checkpoint_threshold"] = _CHECKPOINT_THRESHOLD
        delay = _CONNECT_RETRY_FIRST_S
        while True:
            try:
                return duckdb.connect(str(self._path), read_only=read_only, config=config)
            except duckdb.IOException as e:
                if not any(marker in str(e) for marker in _LOCK_MARKERS):
                    raise StorageError(f"cannot open {self._path}: {e}") from e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(self._locked_message(str(e))) from e
                time.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
                delay = min(delay * 2, _CONNECT_RETRY_MAX_S)
            except duckdb.Error as e:
                raise StorageError(f"cannot open {self._path}: {e}") from e

    def _prepare(self, con: duckdb.DuckDBPyConnection, *, read_only: bool) -> None:
        """Set the session options every unit of work relies on."""
        try:
            # Timestamps reach Python as UTC wall-clock values, whatever the machine's zone.
            con.execute("SET TimeZone = 'UTC'")
            if not read_only:
                con.execute("PRAGMA disable_checkpoint_on_shutdown")
        except duckdb.Error as e:
            raise StorageError(f"cannot prepare a session on {self._path}: {e}") from e

    def _locked_message(self, detail: str) -> str:
        """Say which file stayed locked for how long and why."""
        return (
            f"{self._path} stayed locked for longer than {self._config.lock_timeout_s:g} s "
            f"(lock_timeout_s): {detail}"
        )


# What lives in the lake; a query naming only these runs on the lake alone, taking no lock anyone waits on.
_LAKE_TABLES: Final = frozenset({"news", "news_latest", "news_tokens", "consumed_offsets"})
# Lake tables shadowed into a mixed query's session, so that `news` joins `alerts` as it always did.
_SHADOWED: Final = ("news", "news_latest")


class History(FileHistory):
    """The news history in the lake (storage.lake: Parquet files and a catalog), the state tables in the file.

    Scorers touch only the lake, so nothing an analyst holds open makes them wait. Analysts' queries on the news
    run on the lake's sandboxed read-only connection; a query that also names a state table (alerts, labels,
    models) runs in a short read-only session of the file with the lake attached and `news` shadowed into it.
    """

    def __init__(self, config: StorageConfig) -> None:
        """Remember where the file and the lake live; nothing is opened until a method needs it."""
        super().__init__(config)
        self._lake_config = config.lake if config.lake is not None else LakeConfig(data_dir=lake_dir_of(self.path))
        self._lake: Lake | None = None
        self._lake_guard = threading.Lock()

    @property
    def lake(self) -> Lake:
        """Return this history's lake (one per History: create one History per process)."""
        with self._lake_guard:
            if self._lake is None:
                from storage.lake import Lake  # storage.lake builds on this module

                self._lake = Lake(self._lake_config)
            return self._lake

    def ensure_schema(self) -> None:
        """Create or migrate the file's tables and the lake's, so that readers find them."""
        super().ensure_schema()
        self.lake.ensure_schema()

    def write_batch(self, rows: Sequence[NewsRow], offsets: Mapping[tuple[str, int], int] | None = None) -> WriteResult:
        """Insert the rows whose id is new into the lake, with the partitions' next offsets, in one transaction."""
        return self.lake.write_batch(rows, offsets)

    def count(self) -> int:
        """Return how many news rows the lake holds (0 before the first write)."""
        return self.lake.count()

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Return those of `ids` scored within the lake's duplicate window."""
        return self.lake.existing_ids(ids)

    def fetch(self, ids: Iterable[str]) -> list[NewsRow]:
        """Return the newest stored row of each of `ids`, in the order asked, skipping unknown ids."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        try:
            result = self.lake.query(
                f"{self._select_sql} FROM news_latest WHERE id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                [json.dumps(wanted, ensure_ascii=False)],
            )
        except QueryError as e:
            if "no lake yet" in str(e):
                return []
            raise
        by_id = {row.id: row for row in map(_news_row, result.rows)}
        return [by_id[news_id] for news_id in wanted if news_id in by_id]

    def query(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        max_rows: int | None = None,
        timeout_s: float | None = None,
        as_of: int | dt.datetime | None = None,
    ) -> QueryResult:
        """Run one read-only statement for an analyst, on the lake, or on the file with the lake attached."""
        from storage.lake import tables_in

        tables = tables_in(sql)
        if tables is None or tables <= _LAKE_TABLES or as_of is not None:
            return self.lake.query(sql, params, max_rows=max_rows, timeout_s=timeout_s, as_of=as_of)
        return self._mixed_query(sql, params, max_rows, timeout_s)

    def close(self) -> None:
        """Close the lake's connections."""
        with self._lake_guard:
            if self._lake is not None:
                self._lake.close()

    def _mixed_query(
        self, sql: str, params: Sequence[object], max_rows: int | None, timeout_s: float | None
    ) -> QueryResult:
        from storage.lake import refuse_unsafe

        _refuse_writes(sql)
        if not self.path.exists():
            raise QueryError(f"no history yet at {self.path}: run the scorer or the demo first")
        limit = self._lake_config.query_timeout_s if timeout_s is None else timeout_s
        with self._session(read_only=True) as con:
            try:
                # Before the first scored row there is no lake to attach: the file's own tables answer alone.
                statements = (
                    self.lake.analyst_statements()
                    if self.lake.exists()
                    else ["SET enable_external_access = false", "SET lock_configuration = true"]
                )
                for statement in statements:
                    if statement.startswith("SET enable_external_access") and self.lake.exists():
                        # Before the lock-down: the lake's tables take the names analysts always used.
                        for name in _SHADOWED:
                            con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM lake.{name}")
                    if not statement.startswith("USE "):
                        con.execute(statement)
                refuse_unsafe(con, sql)
            except duckdb.Error as e:
                raise QueryError(f"cannot open the history for this query: {e}") from e
            timer = threading.Timer(limit, con.interrupt)
            timer.daemon = True
            timer.start()
            try:
                return self._run_read(con, sql, params, max_rows)
            except duckdb.InterruptException as e:
                raise QueryError(f"the query ran longer than {limit:g} s (timeout_s) and was stopped") from e
            finally:
                timer.cancel()


def lake_dir_of(duckdb_path: Path) -> Path:
    """Return the lake dir that goes with a DuckDB file by default: `<file stem>.lake` beside it."""
    return duckdb_path.with_name(duckdb_path.stem + ".lake")


_PROCESS_LOCKS: dict[Path, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    """Return the lock that serialises this process's sessions on `path`."""
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(path, threading.Lock())


def _open_lock_file(path: Path) -> int | None:
    """Open a sidecar lock file, or return None where it can be neither created nor read."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        pass
    try:
        # An analyst without write access to the folder can still flock a read-only descriptor
        # of a lock file that a scorer created.
        return os.open(path, os.O_RDONLY)
    except OSError:
        # Without lock files the DuckDB-level retries still work, only without turn-taking.
        return None


def row_payload(row: NewsRow) -> dict[str, object]:
    """Return the JSON object the insert statements (file and lake) decode for `row`."""
    payload: dict[str, object] = {}
    for name in NEWS_COLUMN_NAMES:
        value = getattr(row, name)
        if name in TIMESTAMP_COLUMNS:
            value = value.isoformat()  # always carries +00:00, so the cast is exact
        elif name == "tickers":
            value = list(value)
        payload[name] = value
    return payload


def _news_row(record: tuple[object, ...]) -> NewsRow:
    """Build a NewsRow from a record selected with epoch microseconds for timestamps."""
    values: dict[str, Any] = {}
    for name, value in zip(NEWS_COLUMN_NAMES, record, strict=True):
        if name in TIMESTAMP_COLUMNS and isinstance(value, int):
            values[name] = from_epoch_us(value)
        elif name == "tickers":
            values[name] = tuple(value) if isinstance(value, list) else ()
        else:
            values[name] = value
    return NewsRow(**values)


def _refuse_writes(sql: str) -> None:
    """Raise QueryError unless `sql` is exactly one read statement, as DuckDB's parser sees it."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from e
    if not statements:
        raise QueryError("empty query: nothing to run")
    for statement in statements:
        refused = _refused_kind(statement)
        if refused is not None:
            raise QueryError(f"only read queries are allowed (got {refused})")
    if len(statements) > 1:
        raise QueryError(f"run one statement at a time (got {len(statements)})")


def _refused_kind(statement: duckdb.Statement) -> str | None:
    """Return the name of a statement's write kind, or None for a read."""
    # Compared by name: the type stubs of duckdb 1.4 spell the members differently (SELECT_STATEMENT).
    kind = statement.type.name.removesuffix("_STATEMENT")
    if kind == "SELECT":
        return None
    if kind != "EXPLAIN":
        return kind
    # EXPLAIN ANALYZE runs what it explains, so the explained statement must be a read too.
    for explained in _explained_candidates(statement.query):
        try:
            inner = duckdb.extract_statements(explained)
        except duckdb.Error:
            continue
        if len(inner) == 1:
            refused = _refused_kind(inner[0])
            return None if refused is None else f"{refused} inside EXPLAIN"
    return "EXPLAIN of an unrecognised statement"


def _explained_candidates(sql: str) -> list[str]:
    """Return the texts that may follow `EXPLAIN [ANALYZE] [(options)]`, found with DuckDB's tokenizer."""
    tokens = [position for position, _ in duckdb.tokenize(sql)]

    def after_analyze(index: int) -> int:
        if index < len(tokens) and sql[tokens[index] :].split(maxsplit=1)[0].upper() in {"ANALYZE", "ANALYSE"}:
            return index + 1
        return index

    index = after_analyze(1)  # tokens[0] is EXPLAIN
    candidates: list[str] = []
    if index < len(tokens) and sql[tokens[index]] == "(":
        # Either an option list, `EXPLAIN (FORMAT json) SELECT ...`, or a parenthesised query.
        depth, after = 0, index
        while after < len(tokens):
            char = sql[tokens[after]]
            depth += 1 if char == "(" else -1 if char == ")" else 0
            after += 1
            if depth == 0:
                break
        after = after_analyze(after)
        if after < len(tokens):
            candidates.append(sql[tokens[after] :])
    if index < len(tokens):
        candidates.append(sql[tokens[index] :])
    return candidates


def fetch_result(relation: duckdb.DuckDBPyRelation, max_rows: int | None) -> QueryResult:
    """Fetch at most `max_rows` rows of a relation into a QueryResult, TIMESTAMPTZ values as aware UTC datetimes."""
    columns = list(relation.columns)
    types = [str(sql_type) for sql_type in relation.types]
    relation, utc_positions = _without_timestamptz(relation, types)
    if max_rows is None:
        rows = relation.fetchall()
        truncated = False
    else:
        rows = relation.fetchmany(max_rows + 1)
        truncated = len(rows) > max_rows
        rows = rows[:max_rows]
    if utc_positions:
        rows = [_mark_utc(row, utc_positions) for row in rows]
    return QueryResult(columns=columns, rows=rows, types=types, truncated=truncated)


def _without_timestamptz(
    relation: duckdb.DuckDBPyRelation, types: list[str]
) -> tuple[duckdb.DuckDBPyRelation, list[int]]:
    """Project TIMESTAMPTZ columns to UTC wall-clock TIMESTAMPs; return the relation and their positions."""
    # The Python client needs pytz to hand out TIMESTAMPTZ values; converting in SQL avoids it.
    if not any(_TIMESTAMPTZ in type_name for type_name in types):
        return relation, []
    expressions: list[str] = []
    utc_positions: list[int] = []
    for position, type_name in enumerate(types):
        reference = f"#{position + 1}"
        if type_name == _TIMESTAMPTZ:
            expressions.append(f"{reference} AT TIME ZONE 'UTC'")
            utc_positions.append(position)
        elif _TIMESTAMPTZ in type_name:
            # Nested values (lists or structs of TIMESTAMPTZ) come back as DuckDB's UTC text.
            expressions.append(f"CAST({reference} AS VARCHAR)")
        else:
            expressions.append(reference)
    return relation.project(", ".join(expressions)), utc_positions


def _mark_utc(row: tuple[object, ...], positions: list[int]) -> tuple[object, ...]:
    """Return `row` with the naive UTC datetimes at `positions` made timezone-aware."""
    values = list(row)
    for position in positions:
        value = values[position]
        if isinstance(value, dt.datetime):
            values[position] = value.replace(tzinfo=dt.UTC)
    return tuple(values)


def _jsonable(value: object) -> object:
    """Return `value` as something `json.dumps` encodes (ISO 8601 for times, null for NaN)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | dt.timedelta):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


def _plain(value: object) -> str:
    """Return `value` as one CSV field."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _cell(value: object) -> Text:
    """Return `value` as a rich cell; Text keeps brackets in news from being read as markup."""
    if value is None:
        return Text("NULL", style="dim")
    if isinstance(value, float) and math.isfinite(value):
        return Text(f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}")
    if isinstance(value, dt.datetime):
        return Text(value.isoformat(sep=" "))
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return Text(", ".join(value))  # tickers read better without JSON quotes
    return Text(_plain(value))
