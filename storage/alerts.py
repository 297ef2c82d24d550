"""Alert subscriptions, received alerts and delivery attempts, in the same DuckDB file as the news history.

The tables (schema migration 2) sit next to `news` so that analysts can query alerts beside the
headlines behind them. Every unit of work is one short session taken through `History.session`, so
a dispatcher recording alerts, scorers writing batches and analysts' queries take turns on one file
under the same locks.

Deduplication: `delivery_claims` holds one row per (fingerprint, status, starts_at, subscription_id)
ever routed. A notification is recorded and its deliveries are claimed in one transaction, so a
repeated Alertmanager notification of the same firing alert claims nothing new, and the resolved
notification is claimed once. A claim stays open (`outcome` NULL) until the delivery is delivered or
given up, so a dispatcher that stopped mid-way resumes it at the next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import duckdb

from storage.config import StorageConfig
from storage.errors import StorageError
from storage.history import History
from storage.schema import from_epoch_us, from_epoch_us_required

__all__ = [
    "AlertRecord",
    "AlertStore",
    "AttemptRecord",
    "Claim",
    "DeliveryKey",
    "NotificationRecord",
    "RecordResult",
    "Route",
    "SubscriptionNameTakenError",
    "SubscriptionNotFoundError",
    "SubscriptionRow",
]

ATTEMPT_OUTCOMES: Final[frozenset[str]] = frozenset({"delivered", "failed", "gave_up"})
# Outcomes that close a claim; "cancelled" closes the open claims of a removed subscription.
_FINAL_OUTCOMES: Final[frozenset[str]] = frozenset({"delivered", "gave_up"})
_ALERT_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("id", "VARCHAR"),
    ("notification_id", "VARCHAR"),
    ("fingerprint", "VARCHAR"),
    ("status", "VARCHAR"),
    ("alertname", "VARCHAR"),
    ("severity", "VARCHAR"),
    ("topic", "VARCHAR"),
    ("ticker", "VARCHAR"),
    ("summary", "VARCHAR"),
    ("description", "VARCHAR"),
    ("evidence", "VARCHAR"),
    ("labels", "JSON"),
    ("annotations", "JSON"),
    ("starts_at", "TIMESTAMPTZ"),
    ("ends_at", "TIMESTAMPTZ"),
    ("generator_url", "VARCHAR"),
    ("received_at", "TIMESTAMPTZ"),
    ("error", "VARCHAR"),
)
_CLAIM_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("fingerprint", "VARCHAR"),
    ("status", "VARCHAR"),
    ("starts_at", "TIMESTAMPTZ"),
    ("subscription_id", "INTEGER"),
    ("alert_id", "VARCHAR"),
    ("claimed_at", "TIMESTAMPTZ"),
)
_DELIVERY_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("fingerprint", "VARCHAR"),
    ("status", "VARCHAR"),
    ("starts_at", "TIMESTAMPTZ"),
    ("subscription_id", "INTEGER"),
    ("attempt", "INTEGER"),
    ("attempted_at", "TIMESTAMPTZ"),
    ("outcome", "VARCHAR"),
    ("http_status", "INTEGER"),
    ("error", "VARCHAR"),
    ("latency_ms", "DOUBLE"),
)
_SUBSCRIPTION_SELECT: Final = (
    "SELECT id, name, target_url, topics, tickers, min_severity, epoch_us(created_at), active, secret "
    "FROM subscriptions"
)


class SubscriptionNameTakenError(StorageError):
    """An active subscription already has this name."""


class SubscriptionNotFoundError(StorageError):
    """No active subscription has this id or name."""


@dataclass(frozen=True, kw_only=True)
class SubscriptionRow:
    """One stored subscription, as validated by monitor.subscriptions before it was added."""

    id: int
    name: str
    target_url: str
    topics: tuple[str, ...]
    tickers: tuple[str, ...]
    min_severity: str
    created_at: dt.datetime
    active: bool = True
    # The Standard Webhooks signing secret (`whsec_…`); None for a subscription stored before schema v5 until
    # its first delivery gives it one. Out of repr so that logging a row does not print it.
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class AlertRecord:
    """One alert of a notification as received; `error` says why it is not dispatched (None when valid)."""

    fingerprint: str | None
    status: str | None
    alertname: str | None = None
    severity: str | None = None
    topic: str | None = None
    ticker: str | None = None
    summary: str | None = None
    description: str | None = None
    evidence: str | None = None
    labels: Mapping[str, object] = field(default_factory=dict)
    annotations: Mapping[str, object] = field(default_factory=dict)
    starts_at: dt.datetime | None = None
    ends_at: dt.datetime | None = None
    generator_url: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        """Normalise datetimes to UTC; refuse a dispatchable alert that lacks its delivery key."""
        for name in ("starts_at", "ends_at"):
            value: dt.datetime | None = getattr(self, name)
            if value is None:
                continue
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"AlertRecord.{name} must be timezone-aware, got naive {value!r}")
            object.__setattr__(self, name, value.astimezone(dt.UTC))
        if self.error is None and (not self.fingerprint or not self.status or self.starts_at is None):
            raise ValueError("a dispatchable AlertRecord needs fingerprint, status and starts_at")

    @property
    def routable(self) -> bool:
        """Return whether the alert passed validation and may be delivered."""
        return self.error is None

    def key(self, subscription_id: int) -> DeliveryKey:
        """Return the dedupe key of delivering this alert to one subscription."""
        if self.fingerprint is None or self.status is None or self.starts_at is None:
            raise ValueError("an alert without fingerprint, status or starts_at has no delivery key")
        return DeliveryKey(self.fingerprint, self.status, self.starts_at, subscription_id)


@dataclass(frozen=True)
class DeliveryKey:
    """What makes a delivery unique: one alert occurrence in one state, to one subscriber."""

    fingerprint: str
    status: str
    starts_at: dt.datetime
    subscription_id: int


@dataclass(frozen=True, kw_only=True)
class NotificationRecord:
    """One webhook POST; `body` is the raw request, kept when part of it was refused."""

    received_at: dt.datetime
    receiver: str | None = None
    group_key: str | None = None
    status: str | None = None
    error: str | None = None
    body: str | None = None


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One delivery to make: a stored alert for one subscriber, with the attempts already made."""

    alert_id: str
    alert: AlertRecord
    subscription: SubscriptionRow
    attempts_made: int = 0

    @property
    def key(self) -> DeliveryKey:
        """Return the dedupe key of this delivery."""
        return self.alert.key(self.subscription.id)


@dataclass(frozen=True)
class RecordResult:
    """What recording a notification stored and which new deliveries it claimed."""

    notification_id: str
    alert_ids: list[str]
    claims: list[Claim]
    duplicates: int  # routed deliveries that an earlier notification had already claimed


@dataclass(frozen=True, kw_only=True)
class AttemptRecord:
    """One HTTP attempt to deliver an alert to a subscriber."""

    key: DeliveryKey
    attempt: int
    attempted_at: dt.datetime
    outcome: str  # delivered | failed (will retry) | gave_up
    http_status: int | None
    error: str | None
    latency_ms: float

    def __post_init__(self) -> None:
        """Refuse unknown outcomes and naive times."""
        if self.outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"AttemptRecord.outcome must be one of {sorted(ATTEMPT_OUTCOMES)}, got {self.outcome!r}")
        if self.attempted_at.tzinfo is None:
            raise ValueError("AttemptRecord.attempted_at must be timezone-aware")


# Given a valid alert and the active subscriptions, return those the alert goes to.
Route = Callable[[AlertRecord, Sequence[SubscriptionRow]], Iterable[SubscriptionRow]]


class AlertStore:
    """Subscriptions, alerts and deliveries in the history's DuckDB file, with the history's locking."""

    def __init__(self, config: StorageConfig) -> None:
        """Remember where the file lives; nothing is opened until a method needs it."""
        self._history = History(config)

    @property
    def path(self) -> Path:
        """Return the absolute path of the DuckDB file."""
        return self._history.path

    def ensure_schema(self) -> None:
        """Create the file and every table, or migrate them."""
        self._history.ensure_schema()

    def add_subscription(
        self,
        *,
        name: str,
        target_url: str,
        topics: Sequence[str],
        tickers: Sequence[str],
        min_severity: str,
        secret: str | None = None,
        now: dt.datetime | None = None,
    ) -> SubscriptionRow:
        """Store a new active subscription under the next id; no active one may have its name in any case."""
        created_at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        with self._write("adding a subscription") as con:
            # Case-insensitive: "Fed-Desk" beside "fed-desk" would be two labels, two rows, one person's guess.
            taken = con.execute(
                "SELECT id, name FROM subscriptions WHERE active AND lower(name) = lower(?)", [name]
            ).fetchone()
            if taken is not None:
                same = "" if taken[1] == name else f" (as {taken[1]!r}; names are unique in any case)"
                raise SubscriptionNameTakenError(
                    f"subscription name {name!r} is taken by subscription {taken[0]}{same}; pick another name "
                    "or remove that one first"
                )
            # Ids of removed subscriptions are never reused: their deliveries keep pointing at them.
            found = con.execute("SELECT coalesce(max(id), 0) + 1 FROM subscriptions").fetchone()
            new_id = int(found[0]) if found is not None else 1
            con.execute(
                "INSERT INTO subscriptions (id, name, target_url, topics, tickers, min_severity, created_at, active, "
                "removed_at, secret) VALUES (?, ?, ?, ?, ?, ?, CAST(? AS TIMESTAMPTZ), true, NULL, ?)",
                [new_id, name, target_url, list(topics), list(tickers), min_severity, created_at.isoformat(), secret],
            )
        return SubscriptionRow(
            id=new_id,
            name=name,
            target_url=target_url,
            topics=tuple(topics),
            tickers=tuple(tickers),
            min_severity=min_severity,
            created_at=created_at,
            secret=secret,
        )

    def ensure_secret(self, subscription_id: int, candidate: str) -> str:
        """Return the subscription's signing secret, storing `candidate` first if it has none."""
        with self._write("storing a subscription secret") as con:
            # One statement decides: a concurrent caller's candidate never replaces a stored secret.
            con.execute(
                "UPDATE subscriptions SET secret = ? WHERE id = ? AND secret IS NULL", [candidate, subscription_id]
            )
            found = con.execute("SELECT secret FROM subscriptions WHERE id = ?", [subscription_id]).fetchone()
        if found is None or found[0] is None:
            raise SubscriptionNotFoundError(f"no subscription has the id {subscription_id}")
        return str(found[0])

    def deactivate_subscription(self, id_or_name: int | str, now: dt.datetime | None = None) -> SubscriptionRow:
        """Mark an active subscription removed (its history stays) and cancel its open deliveries."""
        removed_at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        with self._write("removing a subscription") as con:
            row = None
            # A number is an id first; names that are numbers are refused by monitor.subscriptions.
            if isinstance(id_or_name, int) or id_or_name.strip().isdigit():
                row = con.execute(f"{_SUBSCRIPTION_SELECT} WHERE active AND id = ?", [int(id_or_name)]).fetchone()
            if row is None and isinstance(id_or_name, str):
                row = con.execute(f"{_SUBSCRIPTION_SELECT} WHERE active AND name = ?", [id_or_name]).fetchone()
            if row is None:
                raise SubscriptionNotFoundError(f"no active subscription has the id or name {str(id_or_name)!r}")
            found = _subscription(row)
            con.execute(
                "UPDATE subscriptions SET active = false, removed_at = CAST(? AS TIMESTAMPTZ) WHERE id = ?",
                [removed_at.isoformat(), found.id],
            )
            con.execute(
                "UPDATE delivery_claims SET outcome = 'cancelled', finished_at = CAST(? AS TIMESTAMPTZ) "
                "WHERE subscription_id = ? AND outcome IS NULL",
                [removed_at.isoformat(), found.id],
            )
        return replace(found, active=False)

    def list_subscriptions(self, *, include_inactive: bool = False) -> list[SubscriptionRow]:
        """Return the subscriptions by id; removed ones only when asked."""
        where = "" if include_inactive else " WHERE active"
        with self._read("listing subscriptions") as con:
            if con is None:
                return []
            select = _SUBSCRIPTION_SELECT
            # Read-only on a file not migrated to schema v5 yet: no secrets stored, none to show.
            has_secret = con.execute(
                "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'subscriptions' AND column_name = 'secret'"
            ).fetchone()
            if has_secret is None or not has_secret[0]:
                select = select.replace(", secret ", ", NULL AS secret ")
            rows = con.execute(f"{select}{where} ORDER BY id").fetchall()
        return [_subscription(row) for row in rows]

    def record_notification(
        self, notification: NotificationRecord, alerts: Sequence[AlertRecord], route: Route
    ) -> RecordResult:
        """Store a notification and its alerts, route the valid alerts and claim the deliveries not claimed yet."""
        notification_id = uuid.uuid4().hex
        alert_ids = [uuid.uuid4().hex for _ in alerts]
        rejected = sum(1 for alert in alerts if not alert.routable)
        received = notification.received_at.astimezone(dt.UTC).isoformat()
        with self._write("recording an alert notification") as con:
            con.execute(
                "INSERT INTO alert_notifications VALUES (?, CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?)",
                [
                    notification_id,
                    received,
                    notification.receiver,
                    notification.group_key,
                    notification.status,
                    len(alerts),
                    rejected,
                    notification.error,
                    notification.body,
                ],
            )
            if alerts:
                records = [
                    _alert_payload(alert, alert_id, notification_id, received)
                    for alert, alert_id in zip(alerts, alert_ids, strict=True)
                ]
                con.execute(_bulk_insert_sql("alerts", _ALERT_COLUMNS), [json.dumps(records, ensure_ascii=False)])
            subscriptions = [
                _subscription(row) for row in con.execute(f"{_SUBSCRIPTION_SELECT} WHERE active").fetchall()
            ]
            wanted: list[Claim] = []
            for alert, alert_id in zip(alerts, alert_ids, strict=True):
                if not alert.routable:
                    continue
                for subscription in route(alert, subscriptions):
                    wanted.append(Claim(alert_id=alert_id, alert=alert, subscription=subscription))
            claims = self._claim(con, wanted, received)
        return RecordResult(
            notification_id=notification_id,
            alert_ids=alert_ids,
            claims=claims,
            duplicates=len(wanted) - len(claims),
        )

    def record_attempt(self, attempt: AttemptRecord) -> None:
        """Store one delivery attempt; a final outcome also closes the delivery's claim."""
        self.record_attempts([attempt])

    def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Store delivery attempts in one transaction; final outcomes also close their claims.

        One transaction for many: a full queue gives up thousands of deliveries at once, and one write
        session each would hold up the webhook's answer for seconds.
        """
        if not attempts:
            return
        records = [
            {
                "fingerprint": attempt.key.fingerprint,
                "status": attempt.key.status,
                "starts_at": attempt.key.starts_at.isoformat(),
                "subscription_id": attempt.key.subscription_id,
                "attempt": attempt.attempt,
                "attempted_at": attempt.attempted_at.astimezone(dt.UTC).isoformat(),
                "outcome": attempt.outcome,
                "http_status": attempt.http_status,
                "error": attempt.error,
                "latency_ms": attempt.latency_ms,
            }
            for attempt in attempts
        ]
        finals = [record for record in records if record["outcome"] in _FINAL_OUTCOMES]
        with self._write("recording delivery attempts") as con:
            con.execute(_bulk_insert_sql("deliveries", _DELIVERY_COLUMNS), [json.dumps(records, ensure_ascii=False)])
            if finals:
                con.execute(
                    "UPDATE delivery_claims AS c SET outcome = u.outcome, finished_at = u.attempted_at "
                    f"FROM ({_bulk_select_sql(_DELIVERY_COLUMNS)}) AS u "
                    "WHERE c.fingerprint = u.fingerprint AND c.status = u.status AND c.starts_at = u.starts_at "
                    "AND c.subscription_id = u.subscription_id AND c.outcome IS NULL",
                    [json.dumps(finals, ensure_ascii=False)],
                )

    def pending_claims(self) -> list[Claim]:
        """Return the deliveries claimed but neither delivered nor given up, oldest first, with attempts made."""
        with self._read("reading pending deliveries") as con:
            if con is None:
                return []
            rows = con.execute(
                "SELECT a.fingerprint, a.status, a.alertname, a.severity, a.topic, a.ticker, a.summary, "
                "a.description, a.evidence, CAST(a.labels AS VARCHAR), CAST(a.annotations AS VARCHAR), "
                "epoch_us(c.starts_at), epoch_us(a.ends_at), a.generator_url, c.alert_id, "
                "s.id, s.name, s.target_url, s.topics, s.tickers, s.min_severity, epoch_us(s.created_at), s.active, "
                "s.secret, "
                "(SELECT count(*) FROM deliveries d WHERE d.fingerprint = c.fingerprint AND d.status = c.status "
                " AND d.starts_at = c.starts_at AND d.subscription_id = c.subscription_id) "
                "FROM delivery_claims c JOIN alerts a ON a.id = c.alert_id "
                "JOIN subscriptions s ON s.id = c.subscription_id "
                "WHERE c.outcome IS NULL AND s.active ORDER BY c.claimed_at, c.subscription_id"
            ).fetchall()
        claims: list[Claim] = []
        for row in rows:
            alert = AlertRecord(
                fingerprint=row[0],
                status=row[1],
                alertname=row[2],
                severity=row[3],
                topic=row[4],
                ticker=row[5],
                summary=row[6],
                description=row[7],
                evidence=row[8],
                labels=json.loads(row[9]) if row[9] else {},
                annotations=json.loads(row[10]) if row[10] else {},
                starts_at=from_epoch_us(row[11]),
                ends_at=from_epoch_us(row[12]),
                generator_url=row[13],
            )
            claims.append(
                Claim(alert_id=row[14], alert=alert, subscription=_subscription(row[15:24]), attempts_made=int(row[24]))
            )
        return claims

    def _claim(self, con: duckdb.DuckDBPyConnection, wanted: list[Claim], received: str) -> list[Claim]:
        """Insert the claims whose key is new, inside the caller's transaction; return them in order."""
        if not wanted:
            return []
        fingerprints = sorted({claim.key.fingerprint for claim in wanted})
        existing = {
            DeliveryKey(str(fp), str(status), from_epoch_us_required(starts), int(sub))
            for fp, status, starts, sub in con.execute(
                "SELECT fingerprint, status, epoch_us(starts_at), subscription_id FROM delivery_claims "
                "WHERE fingerprint IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                [json.dumps(fingerprints, ensure_ascii=False)],
            ).fetchall()
        }
        # This cannot race with another dispatcher: the check and the insert run in one transaction
        # while this process holds DuckDB's single-writer lock on the file.
        new: list[Claim] = []
        for claim in wanted:
            if claim.key in existing:
                continue
            # "It is over" only means something to a subscriber who was told it began: an alert that was
            # inhibited (a warning under its critical) or silenced while firing resolves without a message.
            if claim.key.status == "resolved" and replace(claim.key, status="firing") not in existing:
                continue
            existing.add(claim.key)  # one notification listing an alert twice claims it once
            new.append(claim)
        if new:
            records = [
                {
                    "fingerprint": claim.key.fingerprint,
                    "status": claim.key.status,
                    "starts_at": claim.key.starts_at.isoformat(),
                    "subscription_id": claim.key.subscription_id,
                    "alert_id": claim.alert_id,
                    "claimed_at": received,
                }
                for claim in new
            ]
            con.execute(_bulk_insert_sql("delivery_claims", _CLAIM_COLUMNS), [json.dumps(records, ensure_ascii=False)])
        return new

    def _write(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return self._history.transaction(what)

    def _read(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection | None]:
        # None while the file or the alert tables do not exist yet (a file of an older schema).
        return self._history.reading(what, ("subscriptions", "delivery_claims"))


def _bulk_insert_sql(table: str, columns: tuple[tuple[str, str], ...]) -> str:
    """Return an INSERT that decodes a JSON array of row objects bound as one parameter."""
    # One bound JSON string instead of one parameter per value: duckdb 1.4's Python client spends
    # ~40 µs per bound value, which adds up for notifications carrying many alerts.
    names = ", ".join(name for name, _ in columns)
    return f"INSERT INTO {table} ({names}) {_bulk_select_sql(columns)}"


def _bulk_select_sql(columns: tuple[tuple[str, str], ...]) -> str:
    """Return a SELECT of `columns` (typed, named) from a JSON array of row objects bound as one parameter."""
    structure = json.dumps(
        [{name: "VARCHAR" if sql_type == "TIMESTAMPTZ" else sql_type for name, sql_type in columns}],
        separators=(",", ":"),
    ).replace("'", "''")
    selected = ", ".join(
        f"CAST(r.{name} AS TIMESTAMPTZ) AS {name}" if sql_type == "TIMESTAMPTZ" else f"r.{name} AS {name}"
        for name, sql_type in columns
    )
    return f"SELECT {selected} FROM (SELECT unnest(from_json(?, '{structure}')) AS r)"


def _alert_payload(alert: AlertRecord, alert_id: str, notification_id: str, received: str) -> dict[str, Any]:
    """Return the JSON object the bulk insert decodes for one alert."""
    return {
        "id": alert_id,
        "notification_id": notification_id,
        "fingerprint": alert.fingerprint,
        "status": alert.status,
        "alertname": alert.alertname,
        "severity": alert.severity,
        "topic": alert.topic,
        "ticker": alert.ticker,
        "summary": alert.summary,
        "description": alert.description,
        "evidence": alert.evidence,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "starts_at": alert.starts_at.isoformat() if alert.starts_at else None,
        "ends_at": alert.ends_at.isoformat() if alert.ends_at else None,
        "generator_url": alert.generator_url,
        "received_at": received,
        "error": alert.error,
    }


def _subscription(row: Sequence[Any]) -> SubscriptionRow:
    """Build a SubscriptionRow from a record selected like `_SUBSCRIPTION_SELECT`."""
    return SubscriptionRow(
        id=int(row[0]),
        name=str(row[1]),
        target_url=str(row[2]),
        topics=tuple(row[3] or ()),
        tickers=tuple(row[4] or ()),
        min_severity=str(row[5]),
        created_at=from_epoch_us_required(row[6]),
        active=bool(row[7]),
        secret=None if row[8] is None else str(row[8]),
    )
