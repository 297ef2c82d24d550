"""Exceptions of the monitor package."""


class MonitorError(Exception):
    """Root of every error raised by `monitor`."""


class SubscriptionError(MonitorError):
    """A subscription was refused or not found; the message names the field and the fix."""


class DispatchError(MonitorError):
    """The alert dispatcher could not start or serve."""


class PrometheusError(MonitorError):
    """The local Prometheus or Alertmanager cannot be found, started, reloaded, queried or stopped."""
