"""The history of scored news (a DuckLake lake) and the state beside it (a DuckDB file). Imports no torch."""

from storage.alerts import AlertStore
from storage.config import StorageConfig
from storage.errors import QueryError, StorageError, StoreLockedError
from storage.history import FileHistory, History, NewsRow, QueryResult, WriteResult
from storage.lake import Lake, LakeError
from storage.lake_config import LakeConfig

__all__ = [
    "AlertStore",
    "FileHistory",
    "History",
    "Lake",
    "LakeConfig",
    "LakeError",
    "NewsRow",
    "QueryError",
    "QueryResult",
    "StorageConfig",
    "StorageError",
    "StoreLockedError",
    "WriteResult",
]
