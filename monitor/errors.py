"""Exceptions of the monitor package."""


class MonitorError(Exception):
    """Root of every error raised by `monitor`."""


class SubscriptionError(MonitorError):
    """A subscription was refused or not found; the message names the field and the fix."""


class DispatchError(MonitorError):
    """The alert dispatcher could not start or serve."""
