"""DuckDB history of scored news: schema, idempotent writes, analyst queries. Imports no torch."""

from storage.alerts import AlertStore
from storage.config import StorageConfig
from storage.errors import QueryError, StorageError, StoreLockedError
from storage.history import History, NewsRow, QueryResult, WriteResult

__all__ = [
    "AlertStore",
    "History",
    "NewsRow",
    "QueryError",
    "QueryResult",
    "StorageConfig",
    "StorageError",
    "StoreLockedError",
    "WriteResult",
]
