"""Schema of the news history and the ordered migrations that create and evolve it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import duckdb

from learner.tasks import SENTIMENT, TOPIC, TaskSpec, specs
from storage.errors import StorageError


def answer_columns(spec: TaskSpec) -> tuple[tuple[str, str], ...]:
    """Return the `news` columns of one task's answer: its label, its confidence, then any per-label probability."""
    probabilities = tuple((name, "DOUBLE") for name in spec.probability_column_names)
    return ((spec.name, "VARCHAR"), (spec.confidence_column, "DOUBLE"), *probabilities)


def task_columns(tasks: Sequence[TaskSpec] | None = None) -> tuple[tuple[str, str], ...]:
    """Return the `news` columns the tasks' scores take (default: every registered task's), task by task.

    A task registered after schema v1 has none of them in a history yet: its migration adds these.
    """
    return tuple(
        column
        for spec in (specs() if tasks is None else tasks)
        for column in (*answer_columns(spec), (spec.version_column, "VARCHAR"))
    )


# The tasks whose answers `news` stores, in the order of their columns in the v1 DDL: the answers of both, then
# the versions of both. That DDL shipped and is never edited, so a task added later is not among these.
NEWS_TASKS: Final[tuple[TaskSpec, ...]] = (TOPIC, SENTIMENT)

# One place for the columns: the DDL, the JSON structure used to bulk-insert a batch and the
# SELECT that reads rows back are all derived from it, so they cannot drift apart.
# The three sentiment probabilities are plain DOUBLE columns rather than one STRUCT: analysts
# filter and aggregate them directly (`WHERE sentiment_negative > 0.9`), CSV exports stay flat,
# and each column gets its own min/max zone map.
NEWS_COLUMNS_V1: Final[tuple[tuple[str, str], ...]] = (
    ("id", "VARCHAR"),
    ("published_at", "TIMESTAMPTZ"),
    ("source", "VARCHAR"),
    ("text", "VARCHAR"),
    ("tickers", "VARCHAR[]"),
    *(column for spec in NEWS_TASKS for column in answer_columns(spec)),
    *((spec.version_column, "VARCHAR") for spec in NEWS_TASKS),
    ("scored_at", "TIMESTAMPTZ"),
    ("kafka_topic", "VARCHAR"),
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
)
# Added later (state schema v7, lake schema v2), NULL on the rows written before: the language the guard saw
# (BCP 47) and whether the model scored the text (scored | unsupported_language | unreadable).
NEWS_COLUMNS_ADDED: Final[tuple[tuple[str, str], ...]] = (("language", "VARCHAR"), ("outcome", "VARCHAR"))
NEWS_COLUMNS: Final[tuple[tuple[str, str], ...]] = NEWS_COLUMNS_V1 + NEWS_COLUMNS_ADDED

# The domain of rows whose domain column is NULL (written before domains existed, or of no named domain).
DEFAULT_DOMAIN: Final = "default"

NEWS_COLUMN_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in NEWS_COLUMNS)
# Confidences and per-label probabilities: a NewsRow refuses values outside [0, 1] in them.
PROBABILITY_COLUMNS: Final[tuple[str, ...]] = tuple(
    name for spec in NEWS_TASKS for name in (spec.confidence_column, *spec.probability_column_names)
)
TIMESTAMP_COLUMNS: Final[frozenset[str]] = frozenset(
    name for name, sql_type in NEWS_COLUMNS if sql_type == "TIMESTAMPTZ"
)
# `source` is optional in the news.raw contract (stream.messages.OPTIONAL_FIELDS; a test keeps the two in step);
# `tickers` is optional too but stored as an empty list. The Kafka coordinates are absent for rows written by tools.
NULLABLE_NEWS_COLUMNS: Final[frozenset[str]] = frozenset(
    {"source", "kafka_topic", "kafka_partition", "kafka_offset", *(name for name, _ in NEWS_COLUMNS_ADDED)}
)
# Schema v1 shipped `source` as NOT NULL; its DDL stays as shipped and migration v4 relaxes it.
_NULLABLE_V1: Final[frozenset[str]] = frozenset({"kafka_topic", "kafka_partition", "kafka_offset"})


def _news_ddl() -> str:
    """Return the CREATE TABLE statement of `news` at schema version 1."""
    # `id` is unique but deliberately not a PRIMARY KEY: DuckDB 1.4 backs that with an ART index
    # that every checkpoint re-serialises whole and that leaks file blocks (duckdb/duckdb#19468,
    # #24848). Measured with 128-row batches: a 256 KiB block per checkpoint, 56 MB for 25,600
    # rows against 2.4 MB without it, and slower writes. History.write_batch enforces uniqueness
    # instead, inside a transaction that runs while DuckDB's exclusive write lock is held.
    lines = []
    for name, sql_type in NEWS_COLUMNS_V1:
        constraint = "" if name in _NULLABLE_V1 else " NOT NULL"
        lines.append(f"    {name} {sql_type}{constraint}")
    return "CREATE TABLE news (\n" + ",\n".join(lines) + "\n)"


# The alert tables live next to `news` so analysts can join alerts with the headlines behind them.
# Like `news`, none has a PRIMARY KEY or UNIQUE constraint (each ART index grows the file at every
# checkpoint); storage.alerts.AlertStore keeps ids unique inside its write transactions.
_ALERT_TABLES_DDL: Final[tuple[str, ...]] = (
    """CREATE TABLE subscriptions (
    id INTEGER NOT NULL,
    name VARCHAR NOT NULL,
    target_url VARCHAR NOT NULL,
    topics VARCHAR[] NOT NULL,
    tickers VARCHAR[] NOT NULL,
    min_severity VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    active BOOLEAN NOT NULL,
    removed_at TIMESTAMPTZ
)""",
    # One row per webhook POST; `body` keeps the raw request only when part of it was refused.
    """CREATE TABLE alert_notifications (
    id VARCHAR NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    receiver VARCHAR,
    group_key VARCHAR,
    status VARCHAR,
    alerts_total INTEGER NOT NULL,
    alerts_rejected INTEGER NOT NULL,
    error VARCHAR,
    body VARCHAR
)""",
    # One row per alert per notification: a repeated notification adds rows, not deliveries.
    """CREATE TABLE alerts (
    id VARCHAR NOT NULL,
    notification_id VARCHAR NOT NULL,
    fingerprint VARCHAR,
    status VARCHAR,
    alertname VARCHAR,
    severity VARCHAR,
    topic VARCHAR,
    ticker VARCHAR,
    summary VARCHAR,
    description VARCHAR,
    evidence VARCHAR,
    labels JSON,
    annotations JSON,
    starts_at TIMESTAMPTZ,
    ends_at TIMESTAMPTZ,
    generator_url VARCHAR,
    received_at TIMESTAMPTZ NOT NULL,
    error VARCHAR
)""",
    # The dedupe ledger: one row per (fingerprint, status, starts_at, subscription_id) ever routed.
    # `outcome` stays NULL until the delivery is delivered or given up, so a restart resumes it.
    """CREATE TABLE delivery_claims (
    fingerprint VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    starts_at TIMESTAMPTZ NOT NULL,
    subscription_id INTEGER NOT NULL,
    alert_id VARCHAR NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL,
    outcome VARCHAR,
    finished_at TIMESTAMPTZ
)""",
    # One row per HTTP attempt.
    """CREATE TABLE deliveries (
    fingerprint VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    starts_at TIMESTAMPTZ NOT NULL,
    subscription_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    attempted_at TIMESTAMPTZ NOT NULL,
    outcome VARCHAR NOT NULL,
    http_status INTEGER,
    error VARCHAR,
    latency_ms DOUBLE NOT NULL
)""",
)


# The continual learner's tables (storage.labels, storage.models). No PRIMARY KEY or UNIQUE constraint
# here either: the stores enforce uniqueness inside their write transactions, as AlertStore does.
_LEARNER_TABLES_DDL: Final[tuple[str, ...]] = (
    # One row per label received on news.labels; a replayed Kafka batch inserts nothing twice because
    # (id, labelled_at, coalesce(labeller, '')) is unique.
    """CREATE TABLE labels (
    id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    sentiment VARCHAR,
    topic VARCHAR,
    labelled_at TIMESTAMPTZ NOT NULL,
    labeller VARCHAR,
    received_at TIMESTAMPTZ NOT NULL,
    kafka_topic VARCHAR,
    kafka_partition INTEGER,
    kafka_offset BIGINT
)""",
    # One row per batch of labels set aside to train a task on; `status` is open | trained.
    """CREATE TABLE experiences (
    id INTEGER NOT NULL,
    task VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    span_start TIMESTAMPTZ,
    span_end TIMESTAMPTZ,
    n_train INTEGER NOT NULL,
    n_holdout INTEGER NOT NULL,
    status VARCHAR NOT NULL,
    version VARCHAR
)""",
    # The frozen examples of an experience (text and label copied, so relabels cannot change them); split is
    # train | holdout.
    """CREATE TABLE experience_examples (
    experience_id INTEGER NOT NULL,
    label_id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    label VARCHAR NOT NULL,
    split VARCHAR NOT NULL
)""",
    # One row per adapter version; `status` is champion | rejected | retired | candidate.
    """CREATE TABLE model_versions (
    version VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    parent VARCHAR,
    created_at TIMESTAMPTZ NOT NULL,
    experience_id INTEGER,
    span_start TIMESTAMPTZ,
    span_end TIMESTAMPTZ,
    metrics JSON,
    status VARCHAR NOT NULL,
    reason VARCHAR,
    status_at TIMESTAMPTZ NOT NULL
)""",
    # The audit log behind finpulse_model_versions_total: outcome is promoted | rejected | rolled_back,
    # source is learner | cli.
    """CREATE TABLE model_events (
    event_at TIMESTAMPTZ NOT NULL,
    task VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    outcome VARCHAR NOT NULL,
    previous VARCHAR,
    source VARCHAR NOT NULL,
    reason VARCHAR
)""",
)


@dataclass(frozen=True)
class Migration:
    """One forward-only schema step, applied inside the writer's transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


# Append new steps here with the next version number; never edit a step that has shipped,
# because files already at that version will not run it again.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        version=1,
        description="news table",
        statements=(
            _news_ddl(),
            # Time-range scans are the analysts' common case; DuckDB's zone maps on insertion
            # order already help, so no extra ART index (each one costs on every checkpoint).
        ),
    ),
    Migration(
        version=2,
        description="alert subscriptions, received alerts and their deliveries",
        statements=_ALERT_TABLES_DDL,
    ),
    Migration(
        version=3,
        description="labels, experiences and model versions",
        statements=_LEARNER_TABLES_DDL,
    ),
    Migration(
        version=4,
        description="news.source is optional, as the news.raw contract says",
        statements=("ALTER TABLE news ALTER COLUMN source DROP NOT NULL",),
    ),
    Migration(
        version=5,
        description="subscriptions.secret signs deliveries (Standard Webhooks)",
        # NULL for the subscriptions added before: the dispatcher gives each one a secret (from Python's
        # `secrets`, not DuckDB's random()) at its first delivery.
        statements=("ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS secret VARCHAR",),
    ),
    Migration(
        version=6,
        description="domains of labels, experiences, model versions and their events",
        # NULL is the default domain: every row written before domains existed belongs to it.
        statements=tuple(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS domain VARCHAR"
            for table in ("labels", "experiences", "model_versions", "model_events")
        ),
    ),
    Migration(
        version=7,
        description="news.language and news.outcome: what the language guard saw",
        statements=tuple(f"ALTER TABLE news ADD COLUMN IF NOT EXISTS {n} {t}" for n, t in NEWS_COLUMNS_ADDED),
    ),
)

SCHEMA_VERSION: Final[int] = MIGRATIONS[-1].version


def json_structure() -> str:
    """Return the `from_json` structure that decodes a JSON array of news objects."""
    # Timestamps travel as ISO 8601 strings and are cast in SQL: binding tz-aware datetimes
    # through the Python client requires pytz, which this project does not install.
    fields = {name: ("VARCHAR" if name in TIMESTAMP_COLUMNS else sql_type) for name, sql_type in NEWS_COLUMNS}
    return json.dumps([fields], separators=(",", ":"))


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply pending migrations on a read-write connection inside its open transaction; return the version."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        # No PRIMARY KEY here either: any ART index grows the file at each checkpoint.
        "version INTEGER NOT NULL, description VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
    )
    found = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    current = int(found[0]) if found is not None else 0
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"the history was written by a newer finpulse (schema v{current}, this one knows "
            f"v{SCHEMA_VERSION}); upgrade finpulse"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements:
            con.execute(statement)
        con.execute(
            "INSERT INTO schema_version VALUES (?, ?, now())",
            [migration.version, migration.description],
        )
    return SCHEMA_VERSION


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def from_epoch_us(value: object) -> dt.datetime | None:
    """Return a UTC datetime from epoch microseconds, or None for NULL."""
    # Timestamps are selected as epoch microseconds: handing out TIMESTAMPTZ values needs pytz.
    return _EPOCH + dt.timedelta(microseconds=value) if isinstance(value, int) else None


def from_epoch_us_required(value: object) -> dt.datetime:
    """Return a UTC datetime from epoch microseconds of a NOT NULL column."""
    found = from_epoch_us(value)
    if found is None:
        raise StorageError(f"expected a timestamp, got {value!r}")
    return found
