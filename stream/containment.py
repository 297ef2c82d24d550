"""Containment of failures in a batch: retry what is transient, wait out what is down, isolate what is poison.

A stage (a model forward, a sink write) runs over a whole batch. When it raises, three things can be true, and
each gets its own answer:

* the failure is transient (a timeout, a lost connection that comes back): retrying with backoff fixes it;
* the thing the stage writes to is down (the probe raises too): nothing is about any record, so the stage
  waits, with the consumer paused, until the probe passes, and then runs the same records again;
* one record makes it fail (the probe passes, retries fail): the batch is bisected until the records that fail
  on their own are found; those are handed back as poison, to be dead-lettered, and the rest goes on.

No record is lost on any path: a record is either in the results or in the poison, and a wait never ends
without the stage having run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Batch failures are retried twice before a bisection: enough for a dropped connection or a lock held for a
# moment, and cheap next to the bisection, which repeats the stage about 2·log2(batch) times.
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.25


class Stopping(Exception):
    """Raised out of a wait when the caller was asked to stop; the batch is not committed and will be replayed."""


@dataclass
class Contained(Generic[T, R]):
    """What a contained stage produced: results for the records that passed, the poison with its errors."""

    results: list[tuple[T, R]] = field(default_factory=list)
    poison: list[tuple[T, BaseException]] = field(default_factory=list)


class Containment:
    """Runs stages over batches with retries, outage waits and bisection.

    `wait` is called with the stage name and its probe when the probe fails; it must return only once the probe
    passes (or raise Stopping). The scorer's wait pauses the Kafka consumer and keeps its group membership.
    """

    def __init__(
        self,
        wait: Callable[[str, Callable[[], None], BaseException], None],
        on_retry: Callable[[str], None] | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._wait = wait
        self._on_retry = on_retry
        self._retries = retries
        self._backoff_s = backoff_s
        self._sleep = sleep

    def run(
        self,
        stage: str,
        items: Sequence[T],
        fn: Callable[[list[T]], Sequence[R]],
        probe: Callable[[], None] | None = None,
        retries: int | None = None,
    ) -> Contained[T, R]:
        """Run `fn` over `items`; `fn` returns one result per item, in order."""
        out: Contained[T, R] = Contained()
        if items:
            self._solve(stage, list(items), fn, probe, self._retries if retries is None else retries, out)
        return out

    def _solve(
        self,
        stage: str,
        items: list[T],
        fn: Callable[[list[T]], Sequence[R]],
        probe: Callable[[], None] | None,
        retries: int,
        out: Contained[T, R],
    ) -> None:
        error = self._attempt(stage, items, fn, probe, retries, out)
        if error is None:
            return
        if len(items) == 1:
            log.warning(
                "event=record_refused stage=%s error=%s detail=%r", stage, type(error).__name__, str(error)[:200]
            )
            out.poison.append((items[0], error))
            return
        # Bisect without retries: the batch as a whole was retried already, and a poison record fails every time.
        middle = len(items) // 2
        self._solve(stage, items[:middle], fn, probe, 0, out)
        self._solve(stage, items[middle:], fn, probe, 0, out)

    def _attempt(
        self,
        stage: str,
        items: list[T],
        fn: Callable[[list[T]], Sequence[R]],
        probe: Callable[[], None] | None,
        retries: int,
        out: Contained[T, R],
    ) -> BaseException | None:
        """Run the stage until it passes (None) or fails with the stage up (the last error)."""
        attempt = 0
        while True:
            try:
                results = fn(items)
            except Exception as e:
                if self._down(stage, probe, e):
                    continue  # the wait returned: the stage is back, run the same records again
                if attempt >= retries:
                    return e
                attempt += 1
                if self._on_retry is not None:
                    self._on_retry(stage)
                self._sleep(self._backoff_s * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2))
                continue
            if len(results) != len(items):
                return RuntimeError(f"stage {stage} returned {len(results)} results for {len(items)} records")
            out.results.extend(zip(items, results, strict=True))
            return None

    def _down(self, stage: str, probe: Callable[[], None] | None, error: BaseException) -> bool:
        """Return True after waiting out an outage; False when the stage is up (the failure is the records')."""
        if probe is None:
            return False
        try:
            probe()
        except Stopping:
            raise
        except Exception:
            self._wait(stage, probe, error)
            return True
        return False
