"""Consumer lag as the broker sees it, read on a thread of its own so it stays true while the scorer is stuck.

Lag is the end offset of each partition this scorer is assigned minus the group's committed offset there: what
is not yet durably handled. It is read every `interval_s` with clients of its own (the scorer's consumer is not
thread-safe), so a scorer blocked in a batch for minutes still exports a growing lag, and ScorerStalled can fire.
The same reads tell when the cluster is lost and when it is back: one log line each, not kafka-python's hundreds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from monitor.metrics import ScorerMetrics
from stream.config import RECONNECT_BACKOFF_MAX_MS
from stream.connection import Target, client_kwargs

log = logging.getLogger(__name__)

# Often enough for a 1-minute alert window, rare enough to cost nothing (two small requests per read).
DEFAULT_INTERVAL_S = 5.0
_REQUEST_TIMEOUT_MS = 5_000


class LagMonitor:
    """Exports `finpulse_consumer_lag{partition}` and `finpulse_broker_up` from a background thread."""

    def __init__(
        self,
        bootstrap_servers: Target,
        group_id: str,
        assignment: Callable[[], set[TopicPartition]],
        metrics: ScorerMetrics,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._group = group_id
        self._assignment = assignment
        self._metrics = metrics
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finpulse-lag", daemon=True)
        self._admin: KafkaAdminClient | None = None
        self._offsets: KafkaConsumer | None = None
        self._up: bool | None = None  # None until the first read: the first success is not a "back"
        self._lost_at = 0.0

    def start(self) -> None:
        """Start reading in the background."""
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and its clients."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._close_clients()

    def read_once(self) -> dict[int, int] | None:
        """Read and export the lag of the assigned partitions now; None when the cluster did not answer."""
        assigned = sorted(self._assignment(), key=lambda tp: (tp.topic, tp.partition))
        try:
            lags = self._read(assigned) if assigned else {}
        except (KafkaError, OSError, ValueError) as e:
            self._mark(up=False, error=e)
            self._close_clients()  # rebuilt on the next read: a client of a lost cluster can stay wedged
            return None
        self._mark(up=True)
        self._metrics.set_consumer_lag(lags)
        return lags

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.read_once()
            except Exception as e:  # a metric thread must never die: the next read tries again
                log.warning("event=lag_read_failed error=%s detail=%r", type(e).__name__, str(e)[:200])
            self._stop.wait(self._interval_s)

    def _read(self, assigned: list[TopicPartition]) -> dict[int, int]:
        admin, offsets = self._clients()
        committed = admin.list_group_offsets({self._group: assigned}).get(self._group, {})
        ends = offsets.end_offsets(assigned)
        starts: dict[TopicPartition, int] = {}
        lags: dict[int, int] = {}
        for tp in assigned:
            end = ends.get(tp)
            if end is None:
                continue
            found = committed.get(tp)
            position = found.offset if found is not None and found.offset >= 0 else None
            if position is None:
                # Nothing committed yet: everything from the start of the partition is still to do.
                if not starts:
                    starts = offsets.beginning_offsets(assigned)
                position = starts.get(tp, 0)
            lags[tp.partition] = max(0, end - position)
        return lags

    def _clients(self) -> tuple[KafkaAdminClient, KafkaConsumer]:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **client_kwargs(self._bootstrap),
                client_id="finpulse-lag",
                request_timeout_ms=_REQUEST_TIMEOUT_MS,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            )
        if self._offsets is None:
            self._offsets = KafkaConsumer(
                **client_kwargs(self._bootstrap),
                client_id="finpulse-lag",
                enable_auto_commit=False,
                request_timeout_ms=_REQUEST_TIMEOUT_MS + 1_000,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            )
        return self._admin, self._offsets

    def _close_clients(self) -> None:
        for client in (self._admin, self._offsets):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._admin = None
        self._offsets = None

    def _mark(self, *, up: bool, error: BaseException | None = None) -> None:
        self._metrics.broker_up.set(1 if up else 0)
        if up == self._up:
            return
        if not up:
            self._lost_at = time.monotonic()
            log.warning(
                "event=broker_lost bootstrap=%s error=%s detail=%r",
                self._bootstrap,
                type(error).__name__,
                str(error)[:200],
            )
        elif self._up is False:
            log.warning("event=broker_back bootstrap=%s down_s=%.1f", self._bootstrap, time.monotonic() - self._lost_at)
        self._up = up
