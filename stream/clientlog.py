"""Keep kafka-python's log readable: warnings and errors once per message template per interval, nothing below.

kafka-python logs every refused connection, retry and backoff: an unreachable broker printed 22 lines before
finpulse's own error, and a broker that went away under a running scorer ~176. Its messages are %-style
templates with the node id, address and error as arguments, so the template (`record.msg`) names the kind of
event; the first record of each kind passes, repeats within `interval_s` are counted, and the count rides on
the next record of that kind to pass, so nothing is dropped without a trace.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KAFKA_LOGGER = "kafka"
# Long enough that a broker down for minutes costs a handful of lines, short enough that an operator watching
# the log sees within minutes that the problem persists.
DEFAULT_INTERVAL_S = 300.0
# Templates are few (kafka-python's source has a few hundred log calls); the bound only matters for messages
# that kafka-python formats itself (f-strings), whose text may carry varying words.
MAX_TEMPLATES = 1024
_DIGITS = re.compile(r"\d+")


@dataclass
class _Seen:
    passed_at: float
    suppressed: int = 0


def template_of(record: logging.LogRecord) -> tuple[str, str]:
    """Return the key that groups repeats of `record`: its logger and its message template, digits collapsed."""
    # Digits are collapsed for the few messages kafka-python formats before logging (node ids, backoffs in
    # f-strings); in a %-style template they are rare and never what tells two kinds of event apart.
    return record.name, _DIGITS.sub("#", str(record.msg))


class OncePerInterval(logging.Filter):
    """Drop records below WARNING; let each template pass once per `interval_s`, counting the repeats."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._lock = threading.Lock()  # kafka-python logs from its IO thread and from the callers' threads

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether `record` is logged; on a pass after repeats, append how many were suppressed."""
        if record.levelno < logging.WARNING:
            return False
        key = template_of(record)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.passed_at < self.interval_s:
                seen.suppressed += 1
                return False
            suppressed = seen.suppressed if seen is not None else 0
            self._remember(key, now)
        if suppressed:
            # Formatted here, so the note cannot clash with the template's own % placeholders.
            record.msg = f"{record.getMessage()} ({suppressed} more like this suppressed since the last one shown)"
            record.args = None
        return True

    def _remember(self, key: tuple[str, str], now: float) -> None:
        self._seen[key] = _Seen(now)
        if len(self._seen) > MAX_TEMPLATES:
            # Forget the older half: the templates whose window is over go first.
            for old in sorted(self._seen, key=lambda k: self._seen[k].passed_at)[: len(self._seen) // 2]:
                del self._seen[old]


class _Forward(logging.Handler):
    """Hand the records that pass `once` to the root logger's handlers, as propagation would."""

    def __init__(self, once: OncePerInterval) -> None:
        super().__init__()
        self.once = once
        self.addFilter(once)

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        handlers = root.handlers or ([logging.lastResort] if logging.lastResort is not None else [])
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def install(
    logger_name: str = KAFKA_LOGGER, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
) -> OncePerInterval:
    """Filter every record of the `logger_name` hierarchy through one OncePerInterval; return it (idempotent)."""
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if isinstance(handler, _Forward):
            return handler.once
    # A filter on a logger sees only the records logged to that very logger, not its children's; a handler
    # sees the whole hierarchy. The handler forwards to the root's handlers instead of propagating, so the
    # records keep the application's format and destination (and pytest's capture) without passing twice.
    forward = _Forward(OncePerInterval(interval_s, clock))
    logger.addHandler(forward)
    logger.propagate = False
    # Records below WARNING are dropped anyway: not creating them spares kafka-python's per-request debug calls.
    if logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)
    return forward.once


def uninstall(logger_name: str = KAFKA_LOGGER) -> None:
    """Undo `install`: the hierarchy propagates unfiltered again."""
    logger = logging.getLogger(logger_name)
    for handler in [h for h in logger.handlers if isinstance(h, _Forward)]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
