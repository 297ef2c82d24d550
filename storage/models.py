"""The adapter versions of each task, their status and the log of promotions, rejections and rollbacks.

`model_versions` holds one row per adapter version with its lineage, metrics and status (candidate,
champion, rejected or retired); `model_events` is the append-only log of every champion change and
rejection, from which `finpulse_model_versions_total` is exported. The files under the adapters directory
stay the truth of what serves (the CHAMPION pointer is the commit point of a promotion): learner.registry
keeps these tables in step with them.

Every unit of work is one short session through `History.session`; a champion change updates both
versions and appends its event in one transaction.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb

from storage.errors import StorageError
from storage.history import History
from storage.schema import DEFAULT_DOMAIN, from_epoch_us, from_epoch_us_required

__all__ = [
    "EVENT_OUTCOMES",
    "EVENT_SOURCES",
    "VERSION_STATUSES",
    "ModelEvent",
    "ModelVersionStore",
    "VersionNotFoundError",
    "VersionRow",
]

VERSION_STATUSES: Final[frozenset[str]] = frozenset({"candidate", "champion", "rejected", "retired"})
EVENT_OUTCOMES: Final[tuple[str, ...]] = ("promoted", "rejected", "rolled_back")
EVENT_SOURCES: Final[frozenset[str]] = frozenset({"learner", "cli"})

_NUMBER: Final = re.compile(r"-v(\d+)$")
_VERSION_SELECT: Final = (
    "SELECT version, task, parent, epoch_us(created_at), experience_id, epoch_us(span_start), epoch_us(span_end), "
    f"CAST(metrics AS VARCHAR), status, reason, epoch_us(status_at), coalesce(domain, '{DEFAULT_DOMAIN}') "
    "FROM model_versions"
)
# AT is a keyword in DuckDB, so the column is quoted wherever it is named.
_EVENT_SELECT: Final = (
    "SELECT epoch_us(event_at), task, version, outcome, previous, source, reason, "
    f"coalesce(domain, '{DEFAULT_DOMAIN}') FROM model_events"
)
# A version's domain as a comparable value: NULL (rows written before domains) is the default domain.
_DOMAIN_SQL: Final = f"coalesce(domain, '{DEFAULT_DOMAIN}')"


class VersionNotFoundError(StorageError):
    """No stored adapter version has this name."""


@dataclass(frozen=True, kw_only=True)
class VersionRow:
    """One adapter version as registered; datetimes are UTC."""

    version: str
    task: str
    parent: str | None
    created_at: dt.datetime
    experience_id: int | None = None
    span_start: dt.datetime | None = None  # labelled_at of the oldest label it was trained on
    span_end: dt.datetime | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "candidate"
    reason: str | None = None
    status_at: dt.datetime | None = None  # when `status` was set; None = created_at
    domain: str = DEFAULT_DOMAIN  # the domain it was trained for; champion there when status is champion

    def __post_init__(self) -> None:
        """Refuse unknown statuses and naive times; normalise times to UTC."""
        if not self.version or not self.task:
            raise ValueError("VersionRow.version and VersionRow.task must be non-empty strings")
        if self.status not in VERSION_STATUSES:
            raise ValueError(f"VersionRow.status must be one of {sorted(VERSION_STATUSES)}, got {self.status!r}")
        for name in ("created_at", "span_start", "span_end", "status_at"):
            value: dt.datetime | None = getattr(self, name)
            if value is None:
                continue
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"VersionRow.{name} must be timezone-aware, got naive {value!r}")
            object.__setattr__(self, name, value.astimezone(dt.UTC))
        if self.status_at is None:
            object.__setattr__(self, "status_at", self.created_at)


@dataclass(frozen=True, kw_only=True)
class ModelEvent:
    """One champion change or rejection, as logged in `model_events`."""

    at: dt.datetime
    task: str
    version: str
    outcome: str  # promoted | rejected | rolled_back
    previous: str | None  # the champion before the event (for a rejection: the one that stays)
    source: str  # learner | cli
    reason: str | None
    domain: str = DEFAULT_DOMAIN


class ModelVersionStore:
    """Adapter versions and their events in the history's DuckDB file, with the history's locking."""

    def __init__(self, history: History) -> None:
        """Share `history`'s file and locks; nothing is opened until a method needs it."""
        self._history = history

    @property
    def path(self) -> Path:
        """Return the absolute path of the DuckDB file."""
        return self._history.path

    def add(self, row: VersionRow) -> bool:
        """Store a version unless one of that name is stored already; return whether it was added."""
        with self._write(f"adding version {row.version}") as con:
            # Checked inside the write transaction (DuckDB's single-writer lock): no PRIMARY KEY needed.
            if con.execute("SELECT 1 FROM model_versions WHERE version = ?", [row.version]).fetchone() is not None:
                return False
            con.execute(
                "INSERT INTO model_versions (version, task, parent, created_at, experience_id, span_start, span_end, "
                "metrics, status, reason, status_at, domain) VALUES (?, ?, ?, CAST(? AS TIMESTAMPTZ), ?, "
                "CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), ?, ?, ?, CAST(? AS TIMESTAMPTZ), ?)",
                [
                    row.version,
                    row.task,
                    row.parent,
                    row.created_at.isoformat(),
                    row.experience_id,
                    _iso(row.span_start),
                    _iso(row.span_end),
                    json.dumps(row.metrics, ensure_ascii=False, sort_keys=True),
                    row.status,
                    row.reason,
                    _iso(row.status_at),
                    None if row.domain == DEFAULT_DOMAIN else row.domain,
                ],
            )
        return True

    def get(self, version: str) -> VersionRow | None:
        """Return one version, or None when it is not stored."""
        with self._read("reading a model version") as con:
            if con is None:
                return None
            record = con.execute(f"{_VERSION_SELECT} WHERE version = ?", [version]).fetchone()
        return None if record is None else _version_row(record)

    def list(self, task: str | None = None) -> builtins.list[VersionRow]:
        """Return the versions (of `task` when given), newest first."""
        where, params = ("", []) if task is None else (" WHERE task = ?", [task])
        with self._read("listing model versions") as con:
            if con is None:
                return []
            records = con.execute(f"{_VERSION_SELECT}{where}", params).fetchall()
        rows = [_version_row(record) for record in records]
        # By version number within a task: two versions made within one second still list in order.
        return sorted(rows, key=lambda r: (r.created_at, r.task, _number(r.version)), reverse=True)

    def champion(self, task: str, domain: str = DEFAULT_DOMAIN) -> VersionRow | None:
        """Return the champion of `task` in `domain` as recorded here, or None when there is none."""
        with self._read("reading the champion") as con:
            if con is None:
                return None
            record = con.execute(
                f"{_VERSION_SELECT} WHERE task = ? AND status = 'champion' AND {_DOMAIN_SQL} = ?", [task, domain]
            ).fetchone()
        return None if record is None else _version_row(record)

    def champions(self) -> dict[str, str]:
        """Return the recorded champion version of every task that has one, in the default domain."""
        with self._read("reading the champions") as con:
            if con is None:
                return {}
            records = con.execute(
                f"SELECT task, version FROM model_versions WHERE status = 'champion' AND {_DOMAIN_SQL} = ?",
                [DEFAULT_DOMAIN],
            ).fetchall()
        return {str(task): str(version) for task, version in records}

    def champions_by_domain(self) -> dict[tuple[str, str], str]:
        """Return the recorded champion version of every (task, domain) that has one."""
        with self._read("reading the champions") as con:
            if con is None:
                return {}
            records = con.execute(
                f"SELECT task, {_DOMAIN_SQL}, version FROM model_versions WHERE status = 'champion'"
            ).fetchall()
        return {(str(task), str(domain)): str(version) for task, domain, version in records}

    def set_champion(
        self,
        task: str,
        version: str,
        outcome: str,
        source: str,
        reason: str | None,
        now: dt.datetime | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> str | None:
        """Make `version` the champion of `task` in `domain` and log the change, in one transaction; return the
        previous one there.

        The previous champion becomes retired. Nothing is written when `version` is the champion already,
        so a promotion that sync() has completed is not logged twice.
        """
        _check_event(outcome, source)
        at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat()
        with self._write(f"making {version} the {task} champion of domain {domain}") as con:
            found = con.execute("SELECT task FROM model_versions WHERE version = ?", [version]).fetchone()
            if found is None:
                raise VersionNotFoundError(f"no version {version}: see `finpulse models list`")
            if found[0] != task:
                raise StorageError(f"{version} is a {found[0]} version, not a {task} one: pick a {task} version")
            champions = [
                str(name)
                for (name,) in con.execute(
                    f"SELECT version FROM model_versions WHERE task = ? AND status = 'champion' AND {_DOMAIN_SQL} = ? "
                    "ORDER BY status_at",
                    [task, domain],
                ).fetchall()
            ]
            if champions == [version]:
                return version
            previous = next((name for name in reversed(champions) if name != version), None)
            con.execute(
                "UPDATE model_versions SET status = 'retired', reason = ?, status_at = CAST(? AS TIMESTAMPTZ) "
                f"WHERE task = ? AND status = 'champion' AND version <> ? AND {_DOMAIN_SQL} = ?",
                [_retired_reason(version, outcome), at, task, version, domain],
            )
            # A version serves the domain it is promoted for (a default-domain version can be promoted for
            # another domain by hand): the row says where it is champion.
            con.execute(
                "UPDATE model_versions SET status = 'champion', reason = ?, status_at = CAST(? AS TIMESTAMPTZ), "
                "domain = ? WHERE version = ?",
                [reason, at, None if domain == DEFAULT_DOMAIN else domain, version],
            )
            _log_event(con, at, task, version, outcome, previous, source, reason, domain)
        return previous

    def withdraw(
        self,
        task: str,
        version: str,
        default: str,
        source: str,
        reason: str | None,
        domain: str,
        now: dt.datetime | None = None,
    ) -> None:
        """Record that `domain` no longer has its own champion `version` (it serves the default domain's
        `default` again): the version retires and the change is logged as a rollback, in one transaction."""
        _check_event("rolled_back", source)
        at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat()
        with self._write(f"withdrawing {version} from domain {domain}") as con:
            con.execute(
                "UPDATE model_versions SET status = 'retired', reason = ?, status_at = CAST(? AS TIMESTAMPTZ) "
                f"WHERE task = ? AND version = ? AND status = 'champion' AND {_DOMAIN_SQL} = ?",
                [reason, at, task, version, domain],
            )
            _log_event(con, at, task, default, "rolled_back", version, source, reason, domain)

    def reject(self, version: str, reason: str | None, source: str, now: dt.datetime | None = None) -> VersionRow:
        """Mark a version rejected and log the rejection, in one transaction; return the updated row."""
        _check_event("rejected", source)
        at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat()
        with self._write(f"rejecting {version}") as con:
            record = con.execute(f"{_VERSION_SELECT} WHERE version = ?", [version]).fetchone()
            if record is None:
                raise VersionNotFoundError(f"no version {version}: see `finpulse models list`")
            row = _version_row(record)
            if row.status == "champion":
                raise StorageError(f"{version} is the {row.task} champion: roll it back before rejecting it")
            champion = con.execute(
                f"SELECT version FROM model_versions WHERE task = ? AND status = 'champion' AND {_DOMAIN_SQL} = ?",
                [row.task, row.domain],
            ).fetchone()
            con.execute(
                "UPDATE model_versions SET status = 'rejected', reason = ?, status_at = CAST(? AS TIMESTAMPTZ) "
                "WHERE version = ?",
                [reason, at, version],
            )
            previous = None if champion is None else champion[0]
            _log_event(con, at, row.task, version, "rejected", previous, source, reason, row.domain)
            updated = con.execute(f"{_VERSION_SELECT} WHERE version = ?", [version]).fetchone()
        return _version_row(updated if updated is not None else record)

    def events(self, task: str | None = None, version: str | None = None) -> builtins.list[ModelEvent]:
        """Return the logged events, oldest first; only those of `task` and/or about `version` when given."""
        conditions: builtins.list[str] = []
        params: builtins.list[str] = []
        if task is not None:
            conditions.append("task = ?")
            params.append(task)
        if version is not None:
            conditions.append("(version = ? OR previous = ?)")
            params.extend([version, version])
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        with self._read("reading model events") as con:
            if con is None:
                return []
            records = con.execute(f"{_EVENT_SELECT}{where} ORDER BY event_at, rowid", params).fetchall()
        return [
            ModelEvent(
                at=from_epoch_us_required(r[0]),
                task=str(r[1]),
                version=str(r[2]),
                outcome=str(r[3]),
                previous=None if r[4] is None else str(r[4]),
                source=str(r[5]),
                reason=None if r[6] is None else str(r[6]),
                domain=str(r[7]),
            )
            for r in records
        ]

    def event_counts(self) -> dict[tuple[str, str], int]:
        """Return how many events of each (task, outcome) were ever logged."""
        with self._read("counting model events") as con:
            if con is None:
                return {}
            records = con.execute("SELECT task, outcome, count(*) FROM model_events GROUP BY ALL").fetchall()
        return {(str(task), str(outcome)): int(count) for task, outcome, count in records}

    def event_counts_by_domain(self) -> dict[tuple[str, str, str], int]:
        """Return how many events of each (task, domain, outcome) were ever logged."""
        with self._read("counting model events") as con:
            if con is None:
                return {}
            records = con.execute(
                f"SELECT task, {_DOMAIN_SQL}, outcome, count(*) FROM model_events GROUP BY ALL"
            ).fetchall()
        return {(str(task), str(domain), str(outcome)): int(count) for task, domain, outcome, count in records}

    def _write(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return self._history.transaction(what)

    def _read(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection | None]:
        # None while the file or the model tables do not exist yet (a file of an older schema).
        return self._history.reading(what, ("model_versions", "model_events"))


def _check_event(outcome: str, source: str) -> None:
    """Refuse outcomes and sources that the metrics and alert rules do not know."""
    if outcome not in EVENT_OUTCOMES:
        raise ValueError(f"outcome must be one of {list(EVENT_OUTCOMES)}, got {outcome!r}")
    if source not in EVENT_SOURCES:
        raise ValueError(f"source must be one of {sorted(EVENT_SOURCES)}, got {source!r}")


def _retired_reason(successor: str, outcome: str) -> str:
    """Say why a champion was retired."""
    return f"rolled back to {successor}" if outcome == "rolled_back" else f"replaced by {successor}"


def _log_event(
    con: duckdb.DuckDBPyConnection,
    at: str,
    task: str,
    version: str,
    outcome: str,
    previous: str | None,
    source: str,
    reason: str | None,
    domain: str = DEFAULT_DOMAIN,
) -> None:
    """Append one row to `model_events` inside the caller's transaction."""
    con.execute(
        "INSERT INTO model_events (event_at, task, version, outcome, previous, source, reason, domain) "
        "VALUES (CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?)",
        [at, task, version, outcome, previous, source, reason, None if domain == DEFAULT_DOMAIN else domain],
    )


def _version_row(record: Sequence[Any]) -> VersionRow:
    """Build a VersionRow from a record selected like `_VERSION_SELECT`."""
    metrics = json.loads(record[7]) if record[7] else {}
    return VersionRow(
        version=str(record[0]),
        task=str(record[1]),
        parent=None if record[2] is None else str(record[2]),
        created_at=from_epoch_us_required(record[3]),
        experience_id=None if record[4] is None else int(record[4]),
        span_start=from_epoch_us(record[5]),
        span_end=from_epoch_us(record[6]),
        metrics=metrics if isinstance(metrics, dict) else {},
        status=str(record[8]),
        reason=None if record[9] is None else str(record[9]),
        status_at=from_epoch_us_required(record[10]),
        domain=str(record[11]),
    )


def _number(version: str) -> int:
    """Return the number of a `<task>-vN` version, 0 for other names."""
    match = _NUMBER.search(version)
    return int(match.group(1)) if match else 0


def _iso(value: dt.datetime | None) -> str | None:
    """Return an ISO 8601 string for SQL to cast, or None."""
    return None if value is None else value.isoformat()
