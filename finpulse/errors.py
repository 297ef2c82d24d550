"""Exceptions of the composition root."""


class FinpulseError(Exception):
    """Root of every error raised by the `finpulse` package."""


class ConfigError(FinpulseError):
    """The configuration is invalid; the message names the field and the fix."""
