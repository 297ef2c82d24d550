"""Typed configuration of the DuckLake history: where its catalog and data files live, and how it behaves.

The field descriptions name the environment variables of a `lake` section of the app config
(`FINPULSE_LAKE__<FIELD>`). The PostgreSQL DSN is a secret: `repr`, logs and error messages show it with its
password masked (`LakeConfig.catalog_label`).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["LakeConfig", "mask_dsn", "parse_dsn"]

# libpq's key=value syntax: keys are words, values bare or single-quoted with \' and \\ escapes.
_DSN_PAIR: Final = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)")
_DSN_URI: Final = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)


class LakeConfig(BaseModel):
    """Where the lake's catalog and Parquet files live, and its write, duplicate and maintenance settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(
        Path(".finpulse/lake"),
        description="Dir of the lake: the SQLite catalog (catalog.sqlite), the Parquet files (data/) and the "
        "writers' lock file (env FINPULSE_LAKE__DATA_DIR).",
    )
    catalog: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="Catalog database: 'sqlite', a local file for writers on one host, or 'postgres', a "
        "PostgreSQL server for writers on several hosts (env FINPULSE_LAKE__CATALOG).",
    )
    sqlite_path: Path | None = Field(
        None,
        description="SQLite catalog file; default <data_dir>/catalog.sqlite (env FINPULSE_LAKE__SQLITE_PATH).",
    )
    postgres_dsn: SecretStr | None = Field(
        None,
        description="libpq key=value DSN of the PostgreSQL catalog, e.g. 'host=db port=5432 dbname=finpulse "
        "user=finpulse password=...'; needed when catalog is 'postgres' (env FINPULSE_LAKE__POSTGRES_DSN).",
    )
    analyst_postgres_dsn: SecretStr | None = Field(
        None,
        description="DSN analysts' queries use instead of postgres_dsn; point it at a role that may only SELECT "
        "the catalog (env FINPULSE_LAKE__ANALYST_POSTGRES_DSN).",
    )
    data_path: Path | None = Field(
        None,
        description="Dir of the Parquet data files; default <data_dir>/data. With a PostgreSQL catalog every "
        "host must see the same files here (a shared mount) (env FINPULSE_LAKE__DATA_PATH).",
    )
    inlining_row_limit: int = Field(
        128,
        ge=0,
        le=100_000,
        description="Inserts of fewer rows than this go into the catalog instead of a new Parquet file "
        "(DuckLake data inlining; compact() moves them to Parquet); 0 turns inlining off "
        "(env FINPULSE_LAKE__INLINING_ROW_LIMIT).",
    )
    duplicate_window: dt.timedelta = Field(
        dt.timedelta(hours=24),
        description="An id counts as a duplicate when a row with it was scored within this span before the batch; "
        "an id re-sent later than that gets a second row (see the news_latest view) "
        "(env FINPULSE_LAKE__DUPLICATE_WINDOW, e.g. PT24H).",
    )
    write_attempts: int = Field(
        30,
        ge=1,
        le=1000,
        description="Attempts of one batch write when it conflicts with another writer, the first included "
        "(env FINPULSE_LAKE__WRITE_ATTEMPTS).",
    )
    retry_wait_s: float = Field(
        0.02,
        gt=0,
        le=10,
        description="Wait before the first retry of a conflicting write; doubles each retry, with jitter "
        "(env FINPULSE_LAKE__RETRY_WAIT_S).",
    )
    max_retry_wait_s: float = Field(
        0.5, gt=0, le=60, description="Longest wait between two attempts (env FINPULSE_LAKE__MAX_RETRY_WAIT_S)."
    )
    lock_timeout_s: float = Field(
        60.0,
        gt=0,
        description="SQLite catalog only: seconds a writer waits for another writer of this host to finish "
        "(env FINPULSE_LAKE__LOCK_TIMEOUT_S).",
    )
    query_timeout_s: float = Field(
        300.0, gt=0, description="Default limit of one analyst query, in seconds (env FINPULSE_LAKE__QUERY_TIMEOUT_S)."
    )
    snapshot_retention: dt.timedelta = Field(
        dt.timedelta(days=7),
        description="How far back time travel (as_of) reaches: compact() expires older snapshots "
        "(env FINPULSE_LAKE__SNAPSHOT_RETENTION, e.g. P7D).",
    )
    file_grace: dt.timedelta = Field(
        dt.timedelta(hours=1),
        description="compact() deletes replaced Parquet files only this long after they were replaced, so a "
        "query still reading them finishes first (env FINPULSE_LAKE__FILE_GRACE).",
    )
    compact_below_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="compact() merges only Parquet files smaller than this, so it never rewrites the big ones "
        "(env FINPULSE_LAKE__COMPACT_BELOW_BYTES).",
    )
    threads: int = Field(2, ge=1, le=256, description="DuckDB threads per connection (env FINPULSE_LAKE__THREADS).")

    @field_validator("duplicate_window", "snapshot_retention", "file_grace")
    @classmethod
    def _positive_span(cls, value: dt.timedelta) -> dt.timedelta:
        """Refuse spans of zero or less."""
        if value <= dt.timedelta(0):
            raise ValueError(f"expected a span above zero, got {value}")
        return value

    @field_validator("postgres_dsn", "analyst_postgres_dsn")
    @classmethod
    def _parsable_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse a DSN that is not libpq key=value text (a URI or a typo would reach the server garbled)."""
        if value is not None:
            parse_dsn(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _catalog_fields(self) -> Self:
        """Require the DSN for a PostgreSQL catalog and refuse it for a SQLite one."""
        if self.catalog == "postgres" and self.postgres_dsn is None:
            raise ValueError("catalog 'postgres' needs postgres_dsn (a libpq key=value DSN)")
        if self.catalog == "sqlite" and (self.postgres_dsn is not None or self.analyst_postgres_dsn is not None):
            raise ValueError("postgres_dsn is set but catalog is 'sqlite': set catalog = 'postgres' or drop the DSN")
        if self.catalog == "postgres" and self.sqlite_path is not None:
            raise ValueError("sqlite_path is set but catalog is 'postgres': drop sqlite_path")
        if self.max_retry_wait_s < self.retry_wait_s:
            raise ValueError(
                f"max_retry_wait_s ({self.max_retry_wait_s:g}) must be at least retry_wait_s ({self.retry_wait_s:g})"
            )
        return self

    @property
    def root(self) -> Path:
        """Return the absolute lake dir."""
        return self.data_dir.expanduser().resolve()

    @property
    def catalog_file(self) -> Path:
        """Return the SQLite catalog file (meaningful for catalog 'sqlite' only)."""
        return self.sqlite_path.expanduser().resolve() if self.sqlite_path is not None else self.root / "catalog.sqlite"

    @property
    def data_files(self) -> Path:
        """Return the absolute dir of the Parquet files."""
        return self.data_path.expanduser().resolve() if self.data_path is not None else self.root / "data"

    @property
    def catalog_label(self) -> str:
        """Return a printable name of the catalog, the password masked."""
        if self.catalog == "sqlite":
            return f"sqlite:{self.catalog_file}"
        dsn = self.postgres_dsn.get_secret_value() if self.postgres_dsn is not None else ""
        return "postgres:" + mask_dsn(dsn)


def parse_dsn(dsn: str) -> dict[str, str]:
    """Return the pairs of a libpq key=value DSN; raise ValueError for anything else."""
    if _DSN_URI.match(dsn.strip()):
        raise ValueError("write the PostgreSQL DSN as libpq key=value pairs (host=... dbname=...), not as a URI")
    pairs: dict[str, str] = {}
    position = 0
    text = dsn.rstrip()
    while position < len(text):
        found = _DSN_PAIR.match(text, position)
        if found is None:
            raise ValueError(f"cannot read the PostgreSQL DSN near character {position + 1}: expected key=value")
        key, value = found.group(1).lower(), found.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[key] = value
        position = found.end()
    if not pairs:
        raise ValueError("the PostgreSQL DSN is empty: give at least dbname=...")
    return pairs


def mask_dsn(dsn: str) -> str:
    """Return `dsn` with its password replaced by ***."""
    try:
        pairs = parse_dsn(dsn)
    except ValueError:
        return "<unreadable DSN>"
    return " ".join(f"{key}={'***' if key == 'password' else value}" for key, value in pairs.items())
