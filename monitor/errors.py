"""Exceptions of the monitor package."""


class MonitorError(Exception):
    """Root of every error raised by `monitor`."""
