"""Exceptions of the stream package."""


class StreamError(Exception):
    """Root of every error raised by `stream`."""


class BrokerError(StreamError):
    """The local Kafka broker could not be installed, started, reached or stopped."""
