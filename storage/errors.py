"""Exceptions of the storage package; every DuckDB error is wrapped into one of these."""


class StorageError(Exception):
    """Root of every error raised by `storage`."""


class StoreLockedError(StorageError):
    """Another process kept the DuckDB file for longer than the configured lock timeout."""


class QueryError(StorageError):
    """An analyst query was refused or failed; the message says why."""
