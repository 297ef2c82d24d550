"""Typed configuration of the history: the lake of news rows and the DuckDB file of state beside it."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from storage.lake_config import LakeConfig


class StorageConfig(BaseModel):
    """Where the history lives and how long a process waits for the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    duckdb_path: Path = Field(
        Path(".finpulse/finpulse.duckdb"),
        description="DuckDB file of the state tables (alerts, labels, models); the news lake goes beside it in "
        "<stem>.lake/ unless `lake` says otherwise (env FINPULSE_STORAGE__DUCKDB_PATH).",
    )
    lake: LakeConfig | None = Field(
        None,
        description="The news lake: catalog (sqlite | postgres), data dir, duplicate window; unset = a SQLite "
        "catalog in <duckdb_path stem>.lake/ (env FINPULSE_STORAGE__LAKE__CATALOG, ...__POSTGRES_DSN, ...).",
    )
    lock_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a writer or a query waits for another process to release the file "
        "(env FINPULSE_STORAGE__LOCK_TIMEOUT_S).",
    )
