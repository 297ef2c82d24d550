"""Typed configuration of the DuckDB history."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """Where the history lives and how long a process waits for the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    duckdb_path: Path = Field(
        Path(".finpulse/finpulse.duckdb"),
        description="DuckDB file holding the news history (env FINPULSE_STORAGE__DUCKDB_PATH).",
    )
    lock_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a writer or a query waits for another process to release the file "
        "(env FINPULSE_STORAGE__LOCK_TIMEOUT_S).",
    )
