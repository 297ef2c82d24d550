"""The alert dispatcher: receives Alertmanager's webhook, records each alert in DuckDB, delivers it to subscribers.

Flow of one `POST /alertmanager` (Alertmanager webhook JSON, version "4"):

0. Authenticate: the request must carry `Authorization: Bearer <dispatcher.token>` (401 otherwise, compared
   in constant time), and a body of at most `dispatcher.max_body_bytes` (413) nested at most
   `MAX_JSON_DEPTH` levels (400). The token is checked before the body is read.
1. Parse and validate the payload. Alerts that break the label contract are recorded with the
   reason and not delivered; the others go on. Any refusal answers 400 with the reasons, because
   Alertmanager does not retry a 4xx, and resending the same bytes would fail the same way.
2. In one DuckDB transaction: record the notification and its alerts, route the valid alerts to the
   matching subscriptions and claim each (fingerprint, status, startsAt, subscription) delivery not
   claimed before. A repeated notification of the same firing alert therefore claims nothing.
3. Answer 200 only then: a crash before the commit leaves Alertmanager without an answer, so it
   retries. A failed commit answers 500 for the same reason.
4. Hand each claim to its subscriber's queue. Every subscriber has its own worker thread, so a slow
   or failing subscriber delays only its own deliveries. Its queue has two lanes, critical alerts and the
   rest, each in arrival order (a resolved alert never overtakes its firing one, which has the same
   severity); the worker takes the critical lane first, and a delivery waiting out a retry's backoff
   (exponential, with jitter) holds up only its own lane. The queue holds `dispatcher.queue_size`
   deliveries: past it a new one is given up at once with the reason, never blocking the webhook, and a
   critical one makes room by giving up the newest non-critical one. Every attempt is recorded.
5. Before every attempt, check the URL again (a row stored under an older, looser check) and resolve its
   host: if any address is refused (monitor.subscriptions.address_refusal), give the delivery up without
   sending anything. Otherwise connect to those vetted addresses themselves, so a DNS answer that changes
   in between (rebinding) cannot redirect the request. Proxy variables (HTTP_PROXY…) are not used: a proxy
   would resolve the name itself.

Delivery is at least once: a claim stays open until delivered or given up, and `start()` resumes the
open ones. Each POST is signed per the Standard Webhooks spec (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed by the subscription's
secret) and carries `Idempotency-Key` (= `webhook-id`), so a subscriber can check who sent it and drop a
retry it already got. Run one dispatcher per DuckDB file: two would both resume the same open claims.

`GET /metrics` on the same server exposes the dispatcher's registry (`DeliveryMetrics`): every attempt and
every final outcome per subscriber, and each subscriber's queue depth, read at scrape time.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import hmac
import http.client
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from learner.tasks import TOPIC
from monitor.config import TOKEN_HINT, DispatcherConfig, check_token
from monitor.errors import DispatchError, SubscriptionError
from monitor.subscriptions import (
    SECRET_PREFIX,
    SEVERITIES,
    check_target_url,
    is_allowed_host,
    new_secret,
    normalize_ticker,
    resolve_target,
    route,
    severity_rank,
)
from storage.alerts import (
    AlertRecord,
    AlertStore,
    AttemptRecord,
    Claim,
    NotificationRecord,
    RecordResult,
    SubscriptionRow,
)
from storage.errors import StorageError

__all__ = [
    "ATTEMPT_OUTCOMES",
    "DELIVERY_OUTCOMES",
    "HEALTH_PATH",
    "METRICS_PATH",
    "WEBHOOK_PATH",
    "DeliveryEvent",
    "DeliveryMetrics",
    "Dispatcher",
    "alert_text",
    "parse_alert",
    "sign",
]

log = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/alertmanager"
HEALTH_PATH: Final = "/healthz"
METRICS_PATH: Final = "/metrics"
# An Alertmanager notification nests 4 levels (body, alerts, alert, labels); past 32 is no notification, and
# json.loads of 100,000 levels raises RecursionError. Checked before parsing.
MAX_JSON_DEPTH: Final = 32
_USER_AGENT: Final = "finpulse-dispatcher/0.1"
# A JSON string (escapes included) and the brackets outside strings, for the depth check.
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET: Final = re.compile(rb"[\[\]{}]")
# What a refused request may still send after its answer, read and dropped: a 1.2 MB notification reads its
# 413 instead of a broken pipe.
_DRAIN_BYTES: Final = 8 * 1024 * 1024
# What a subscriber may answer before the rest is discarded; only the status code matters.
_RESPONSE_READ_BYTES: Final = 64 * 1024
# 408/425/429 say "try later"; any other 4xx (and 3xx: redirects are not followed) will not change.
_RETRYABLE_4XX: Final[frozenset[int]] = frozenset({408, 425, 429})
# What one HTTP attempt got: a 2xx; an answer that says try later (5xx, 408/425/429); an answer a retry cannot
# change (3xx, any other 4xx); no answer at all (cannot connect, timeout, broken connection).
ATTEMPT_OUTCOMES: Final = ("delivered", "retryable", "refused", "error")
# How a delivery ended; one interrupted by a stop has not ended and resumes at the next start.
DELIVERY_OUTCOMES: Final = ("delivered", "given_up")


@dataclass(frozen=True, kw_only=True)
class DeliveryEvent:
    """One delivery attempt, as handed to the `on_delivery` callback."""

    subscription_id: int
    subscription: str
    target_url: str
    fingerprint: str
    status: str  # firing | resolved
    alertname: str | None
    attempt: int
    outcome: str  # delivered | failed (will retry) | gave_up
    http_status: int | None
    error: str | None
    latency_ms: float
    attempted_at: dt.datetime
    retry_in_s: float | None  # the backoff before the next attempt when outcome is "failed"


class DeliveryMetrics:
    """What a dispatcher exposes: attempts and final outcomes per subscriber, and each subscriber's queue depth.

    The subscriber label is the subscription name: operators create subscriptions, so the label stays bounded.
    """

    def __init__(self, registry: CollectorRegistry, depths: Callable[[], Mapping[str, int]]) -> None:
        """Register the counters and the queue-depth collector, which calls `depths` at every scrape."""
        self.registry = registry
        self.attempts = Counter(
            "finpulse_dispatcher_delivery_attempts",
            "HTTP attempts to deliver an alert, by subscriber and outcome (delivered, retryable, refused, error).",
            ["subscriber", "outcome"],
            registry=registry,
        )
        self.deliveries = Counter(
            "finpulse_dispatcher_deliveries",
            "Deliveries that ended, by subscriber and outcome (delivered, given_up).",
            ["subscriber", "outcome"],
            registry=registry,
        )
        registry.register(_QueueDepthCollector(depths))

    def declare(self, subscriber: str) -> None:
        """Export every outcome of `subscriber` at 0, so that `increase()` sees each event after the first scrape.

        An event before that (a refusal on the very first attempt) creates its series at 1; DeliveriesGivingUp
        catches it with an `unless … offset` branch.
        """
        for outcome in ATTEMPT_OUTCOMES:
            self.attempts.labels(subscriber=subscriber, outcome=outcome)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(subscriber=subscriber, outcome=outcome)


class _QueueDepthCollector(Collector):
    """Exports `finpulse_dispatcher_queue_depth{subscriber}`, read from the workers at scrape time."""

    def __init__(self, depths: Callable[[], Mapping[str, int]]) -> None:
        """Take the function returning the deliveries waiting per subscriber name."""
        self._depths = depths

    def describe(self) -> Iterator[Metric]:
        """Name the family without reading the workers."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """Export the depth of every subscriber that has a worker."""
        family = self._family()
        for subscriber, depth in sorted(self._depths().items()):
            family.add_metric([subscriber], depth)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        """Return the family, empty."""
        return GaugeMetricFamily(
            "finpulse_dispatcher_queue_depth",
            "Deliveries queued or in progress (retries and their backoff included), by subscriber.",
            labels=["subscriber"],
        )


class Dispatcher:
    """Alertmanager webhook receiver and per-subscriber delivery workers over one AlertStore."""

    def __init__(
        self,
        config: DispatcherConfig,
        store: AlertStore,
        *,
        on_delivery: Callable[[DeliveryEvent], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Prepare a dispatcher; nothing listens until `start()`. Metrics go to `registry` (a fresh one if None)."""
        self._config = config
        self._store = store
        self._on_delivery = on_delivery
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DeliveryMetrics(self.registry, self._queue_depths)
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._workers: dict[int, _SubscriberWorker] = {}
        self._workers_lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Condition()
        self._token_digest: bytes | None = None
        # Secrets given at first delivery to subscriptions stored before schema v5, by subscription id.
        self._secrets: dict[int, str] = {}
        self._prometheus_url = config.prometheus_url.rstrip("/") if config.prometheus_url else None

    def use_prometheus(self, url: str | None) -> None:
        """Read the current share of resolved alerts from this Prometheus (a local stack knows it only once
        Prometheus started, after the dispatcher)."""
        self._prometheus_url = url.rstrip("/") if url else None
        self._tls = ssl.create_default_context()

    @property
    def url(self) -> str:
        """Return the base URL the dispatcher listens on, e.g. http://127.0.0.1:9466."""
        if self._server is None:
            raise DispatchError("the dispatcher is not started; call start() first")
        return f"http://{self._config.host}:{self._server.server_port}"

    @property
    def webhook_url(self) -> str:
        """Return the URL to give Alertmanager as the webhook receiver."""
        return self.url + WEBHOOK_PATH

    @property
    def max_body_bytes(self) -> int:
        """Return the largest webhook body accepted."""
        return self._config.max_body_bytes

    @property
    def pending(self) -> int:
        """Return how many deliveries are queued or in progress."""
        with self._idle:
            return self._outstanding

    def start(self) -> Dispatcher:
        """Read the token, create the tables, listen, and resume the deliveries a previous run left open."""
        if self._server is not None:
            raise DispatchError("the dispatcher is already started")
        self._token_digest = hashlib.sha256(_load_token(self._config).encode("utf-8")).digest()
        self._store.ensure_schema()
        try:
            server = _Server((self._config.host, self._config.port), self)
        except OSError as e:
            raise DispatchError(
                f"cannot listen on {self._config.host}:{self._config.port}: {e.strerror or e}; "
                "set dispatcher.port to a free port (0 picks one)"
            ) from e
        self._stopping.clear()
        self._server = server
        try:
            resumed = self._store.pending_claims()
        except StorageError:
            server.server_close()
            self._server = None
            raise
        self._enqueue_all(resumed)
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="finpulse-dispatcher", daemon=True
        )
        self._serve_thread.start()
        log.info(_kv(event="dispatcher_started", url=self.webhook_url, resumed=len(resumed)))
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening and stop the workers; deliveries not made stay open and resume at the next start."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._stopping.set()
        with self._workers_lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.close()
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        with self._idle:
            self._outstanding = 0
            self._idle.notify_all()
        log.info(_kv(event="dispatcher_stopped"))

    def __enter__(self) -> Dispatcher:
        """Start the dispatcher."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the dispatcher."""
        self.stop()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no delivery is queued or in progress; return False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout=timeout_s)

    def authorized(self, authorization: str | None) -> bool:
        """Return whether an Authorization header carries the dispatcher's bearer token."""
        if self._token_digest is None or not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        # Digests of equal length: compare_digest then takes the same time whatever the length sent.
        offered = hashlib.sha256(credentials.strip().encode("utf-8", errors="replace")).digest()
        return hmac.compare_digest(offered, self._token_digest) and scheme.lower() == "bearer"

    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Handle one webhook body: record, claim, enqueue; return the HTTP status and the JSON answer."""
        received_at = dt.datetime.now(dt.UTC)
        envelope, alerts, error = _parse_notification(body)
        alerts = restate_resolved(alerts, self._prometheus_url)
        rejected = [
            {"index": index, "reason": alert.error} for index, alert in enumerate(alerts) if alert.error is not None
        ]
        summary = error
        if summary is None and rejected:
            summary = f"{len(rejected)} of {len(alerts)} alerts refused"
        notification = NotificationRecord(
            received_at=received_at,
            receiver=_string(envelope.get("receiver")),
            group_key=_string(envelope.get("groupKey")),
            status=_string(envelope.get("status")),
            error=summary,
            # Nothing is lost: a refused payload is kept verbatim for whoever fixes the rule or the sender.
            body=body.decode("utf-8", errors="replace") if summary is not None else None,
        )
        try:
            result = self._store.record_notification(notification, alerts, route)
        except StorageError as e:
            log.error(_kv(event="notification_not_recorded", error=str(e)))
            if error is not None:
                # Retrying an unparseable body cannot succeed, whether or not it was recorded.
                return 400, {"status": "rejected", "error": error}
            return 500, {"status": "error", "error": f"could not record the alerts: {e}"}
        given_up = self._enqueue_all(result.claims)
        log.info(
            _kv(
                event="notification_received",
                notification=result.notification_id,
                receiver=notification.receiver,
                alerts=len(alerts),
                refused=len(rejected),
                deliveries=len(result.claims),
                duplicates=result.duplicates,
                given_up=given_up or None,
                error=error,
            )
        )
        return _answer(result, alerts, rejected, error)

    def _enqueue_all(self, claims: Sequence[Claim]) -> int:
        """Queue deliveries on their subscribers' workers; give up, in one write, those no queue has room for."""
        given_up: list[tuple[Claim, str]] = []
        for claim in claims:
            dropped = self._enqueue(claim)
            if dropped is not None:
                given_up.append(dropped)
        self._give_up(given_up)
        return len(given_up)

    def _enqueue(self, claim: Claim) -> tuple[Claim, str] | None:
        """Queue a delivery, starting its subscriber's worker on first use; return the one given up, if any."""
        with self._workers_lock:
            if self._stopping.is_set():
                return None  # the claim stays open in DuckDB and resumes at the next start
            worker = self._workers.get(claim.subscription.id)
            if worker is None:
                self.metrics.declare(claim.subscription.name)
                worker = _SubscriberWorker(
                    claim.subscription, self._attempt, self._finished, self._stopping, self._config.queue_size
                )
                self._workers[claim.subscription.id] = worker
            with self._idle:
                self._outstanding += 1
            dropped = worker.put(claim)
        if dropped is not None:
            self._finished()  # one in, one out: the new one or the one it displaced
        return dropped

    def _queue_depths(self) -> dict[str, int]:
        """Return the deliveries queued or in progress per subscriber name."""
        depths: dict[str, int] = {}
        with self._workers_lock:
            for worker in self._workers.values():
                # A removed name may be reused by a new subscription while the old one's claims still drain.
                depths[worker.name] = depths.get(worker.name, 0) + worker.depth
        return depths

    def _finished(self) -> None:
        """Count one queued delivery as done."""
        with self._idle:
            self._outstanding = max(0, self._outstanding - 1)
            if self._outstanding == 0:
                self._idle.notify_all()

    def _give_up(self, dropped: Sequence[tuple[Claim, str]]) -> None:
        """Record deliveries given up before any attempt (a full queue), in one transaction, and report them."""
        if not dropped:
            return
        now = dt.datetime.now(dt.UTC)
        records = [
            AttemptRecord(
                key=claim.key,
                attempt=claim.attempts_made + 1,
                attempted_at=now,
                outcome="gave_up",
                http_status=None,
                error=reason,
                latency_ms=0.0,
            )
            for claim, reason in dropped
        ]
        try:
            self._store.record_attempts(records)
        except StorageError as e:
            # Left open, they resume (or are given up again) at the next start.
            log.error(_kv(event="attempts_not_recorded", deliveries=len(records), error=str(e)))
        counts = collections.Counter(claim.subscription.name for claim, _ in dropped)
        reasons = {claim.subscription.name: reason for claim, reason in reversed(dropped)}  # the first of each
        for name, count in counts.items():
            self.metrics.deliveries.labels(subscriber=name, outcome="given_up").inc(count)
            # One line per subscriber, not per delivery: a flood gives up thousands at once.
            log.warning(_kv(event="deliveries_given_up", subscription=name, deliveries=count, reason=reasons[name]))
        if self._on_delivery is not None:
            for (claim, _), record in zip(dropped, records, strict=True):
                self._notify(_event(claim, record, retry_in_s=None))

    def _attempt(self, job: _Job) -> float | None:
        """Make one attempt of a delivery; return the backoff before the next, or None when it has ended."""
        claim = job.claim
        subscription, key = claim.subscription, claim.key
        # A resumed delivery gets at least one more try, even if attempts was lowered meanwhile.
        budget = max(self._config.attempts, claim.attempts_made + 1)
        job.attempts += 1
        attempt = job.attempts
        if job.body is None:
            job.body = json.dumps(subscriber_payload(claim), ensure_ascii=False).encode("utf-8")
        attempted_at = dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        answer = self._post(subscription, _message_id(claim), job.body)
        latency_ms = (time.perf_counter() - started) * 1000.0
        if answer.sent:
            self.metrics.attempts.labels(subscriber=subscription.name, outcome=answer.outcome).inc()
        if answer.error is None:
            outcome = "delivered"
        elif answer.retryable and attempt < budget:
            outcome = "failed"
        else:
            outcome = "gave_up"
        if outcome != "failed":
            final = "delivered" if outcome == "delivered" else "given_up"
            self.metrics.deliveries.labels(subscriber=subscription.name, outcome=final).inc()
        retry_in_s = self._backoff(attempt) if outcome == "failed" else None
        record = AttemptRecord(
            key=key,
            attempt=attempt,
            attempted_at=attempted_at,
            outcome=outcome,
            http_status=answer.http_status,
            error=answer.error,
            latency_ms=latency_ms,
        )
        try:
            self._store.record_attempt(record)
        except StorageError as e:
            # The subscriber has its answer either way; losing the audit row beats stalling deliveries.
            log.error(_kv(event="attempt_not_recorded", subscription=subscription.name, error=str(e)))
        self._report(_event(claim, record, retry_in_s=retry_in_s))
        return retry_in_s

    def _post(self, subscription: SubscriptionRow, message_id: str, body: bytes) -> _Answer:
        """Vet the target, then POST the signed body once to a vetted address of its host."""
        url = subscription.target_url
        try:
            # Again at every attempt: the row may predate today's checks or allowed hosts.
            check_target_url(url, self._config.allowed_hosts)
        except SubscriptionError as e:
            return _Answer(error=f"not sent: {e}", sent=False)
        parts = urllib.parse.urlsplit(url)
        # The ASCII (IDNA) form: it goes into the Host header, SNI and the certificate check.
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            addresses = resolve_target(host, port, allowed=is_allowed_host(host, self._config.allowed_hosts))
        except SubscriptionError as e:
            return _Answer(error=f"not sent: {e}", sent=False)
        except OSError as e:
            return _Answer(error=f"cannot resolve {host}: {e.strerror or e}", retryable=True)
        try:
            secret = self._secret(subscription)
        except StorageError as e:
            return _Answer(error=f"not sent: no signing secret ({e})", retryable=True, sent=False)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": _USER_AGENT,
            "Idempotency-Key": message_id,
            # A fresh timestamp per attempt: a subscriber refusing old timestamps (replays) still takes retries.
            **sign(secret, message_id, int(time.time()), body),
        }
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = self._connect(parts.scheme.lower(), host, port, addresses)
        if isinstance(connection, str):
            return _Answer(error=connection, retryable=True)
        try:
            connection.request("POST", target, body=body, headers=headers)
            with connection.getresponse() as response:
                response.read(_RESPONSE_READ_BYTES)
                status, reason = int(response.status), str(response.reason)
        except (TimeoutError, http.client.HTTPException, OSError) as e:
            return _Answer(error=f"{type(e).__name__} talking to {_origin(url)}: {e}", retryable=True)
        finally:
            connection.close()
        if 200 <= status < 300:
            return _Answer(http_status=status)
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed; subscribe the final URL"
            return _Answer(http_status=status, error=error)
        return _Answer(
            http_status=status,
            error=f"HTTP {status} {reason}",
            retryable=status >= 500 or status in _RETRYABLE_4XX,
        )

    def _connect(self, scheme: str, host: str, port: int, addresses: Sequence[str]) -> http.client.HTTPConnection | str:
        """Return a connection to the first vetted address that accepts one, or why none did."""
        problem = "no address"
        for address in addresses:
            connection: http.client.HTTPConnection
            if scheme == "https":
                connection = _PinnedHTTPSConnection(host, port, address, self._config.timeout_s, self._tls)
            else:
                connection = _PinnedHTTPConnection(host, port, address, self._config.timeout_s)
            try:
                # Only connecting falls through to the next address: a request sent is never sent twice.
                connection.connect()
                return connection
            except (TimeoutError, OSError) as e:
                connection.close()
                problem = f"{type(e).__name__}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        return f"cannot reach {scheme}://{host}:{port}: {problem}"

    def _secret(self, subscription: SubscriptionRow) -> str:
        """Return the subscription's signing secret, giving one to a subscription stored without."""
        if subscription.secret is not None:
            return subscription.secret
        found = self._secrets.get(subscription.id)
        if found is None:
            found = self._store.ensure_secret(subscription.id, new_secret())
            self._secrets[subscription.id] = found
            log.warning(_kv(event="secret_created", subscription=subscription.name))
        return found

    def _backoff(self, attempt: int) -> float:
        """Return the wait after a failed `attempt`: exponential, capped, with jitter."""
        ceiling = min(self._config.max_backoff_s, self._config.initial_backoff_s * 2 ** (attempt - 1))
        # "Equal jitter": at least half the ceiling, so retries are spread out but never immediate.
        return random.uniform(ceiling / 2, ceiling)

    def _report(self, event: DeliveryEvent) -> None:
        """Log an attempt and hand it to the callback."""
        fields = _kv(
            event="delivery",
            outcome=event.outcome,
            subscription=event.subscription,
            alertname=event.alertname,
            status=event.status,
            fingerprint=event.fingerprint,
            attempt=event.attempt,
            http_status=event.http_status,
            latency_ms=f"{event.latency_ms:.1f}",
            retry_in_s=None if event.retry_in_s is None else f"{event.retry_in_s:.2f}",
            error=event.error,
        )
        if event.outcome == "delivered":
            log.info(fields)
        else:
            log.warning(fields)
        self._notify(event)

    def _notify(self, event: DeliveryEvent) -> None:
        """Hand an event to the callback."""
        if self._on_delivery is not None:
            try:
                self._on_delivery(event)
            except Exception:
                # A broken display callback must not stop deliveries.
                log.exception(_kv(event="on_delivery_failed", subscription=event.subscription))


@dataclass(frozen=True, kw_only=True)
class _Answer:
    """What one attempt got; `sent` is False when nothing went out (the target was refused)."""

    http_status: int | None = None
    error: str | None = None  # None: delivered
    retryable: bool = False
    sent: bool = True

    @property
    def outcome(self) -> str:
        """Return what the attempt got, one of ATTEMPT_OUTCOMES."""
        if self.error is None:
            return "delivered"
        if self.http_status is None:
            return "error"
        return "retryable" if self.retryable else "refused"


@dataclass(eq=False)
class _Job:
    """One queued delivery: its claim, the attempts made, and when the next may start (after a backoff)."""

    claim: Claim
    critical: bool
    attempts: int
    ready_at: float = 0.0  # time.monotonic()
    body: bytes | None = field(default=None, repr=False)


class _SubscriberWorker:
    """One subscriber's bounded queue, drained by its own thread: critical lane first, each lane in order."""

    def __init__(
        self,
        subscription: SubscriptionRow,
        attempt: Callable[[_Job], float | None],
        finished: Callable[[], None],
        stopping: threading.Event,
        capacity: int,
    ) -> None:
        """Start the worker thread."""
        self.name = subscription.name
        self._attempt = attempt
        self._finished = finished
        self._stopping = stopping
        self._capacity = capacity
        self._critical: collections.deque[_Job] = collections.deque()
        self._other: collections.deque[_Job] = collections.deque()
        self._active: _Job | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"finpulse-deliver-{subscription.id}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Return how many deliveries are queued or in progress (backoffs included)."""
        with self._changed:
            return len(self._critical) + len(self._other)

    def put(self, claim: Claim) -> tuple[Claim, str] | None:
        """Queue a delivery without blocking; when the queue is full, return the one given up and why."""
        job = _Job(claim=claim, critical=claim.alert.severity == "critical", attempts=claim.attempts_made)
        with self._changed:
            if len(self._critical) + len(self._other) >= self._capacity:
                newest = self._other[-1] if self._other else None
                if not job.critical or newest is None or newest is self._active:
                    return claim, f"queue full: {self._capacity} deliveries already wait for this subscriber; not sent"
                self._other.pop()
                self._critical.append(job)
                self._changed.notify()
                return newest.claim, "queue full: given up to make room for a critical alert; not sent"
            (self._critical if job.critical else self._other).append(job)
            self._changed.notify()
        return None

    def close(self) -> None:
        """Ask the thread to finish after its current attempt; what is queued stays open in DuckDB."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to finish."""
        self._thread.join(timeout_s)

    def _next(self) -> _Job | None:
        """Wait for the next job ready to go, critical lane first; None once closed or stopping."""
        with self._changed:
            while not (self._closed or self._stopping.is_set()):
                now = time.monotonic()
                heads = [lane[0] for lane in (self._critical, self._other) if lane]
                for head in heads:
                    if head.ready_at <= now:
                        self._active = head
                        return head
                # Every head waits out a backoff: sleep until the first is due, or until something arrives.
                self._changed.wait(min(head.ready_at for head in heads) - now if heads else None)
            return None

    def _run(self) -> None:
        """Attempt ready jobs until closed; a job stays at the head of its lane until it ends."""
        while (job := self._next()) is not None:
            try:
                retry_in_s = self._attempt(job)
            except Exception:
                # Keep the worker alive for the next alert; the claim stays open and resumes on restart.
                log.exception(_kv(event="delivery_crashed", subscription=job.claim.subscription.name))
                retry_in_s = None
            with self._changed:
                self._active = None
                if retry_in_s is not None:
                    job.ready_at = time.monotonic() + retry_in_s
                    continue
                (self._critical if job.critical else self._other).remove(job)
            self._finished()


class _Server(ThreadingHTTPServer):
    """The webhook's HTTP server; handler threads die with the process."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher) -> None:
        """Bind and listen."""
        super().__init__(address, _Handler)
        self.dispatcher = dispatcher


class _Handler(BaseHTTPRequestHandler):
    """`POST /alertmanager`, `GET /healthz` and `GET /metrics`."""

    server: _Server
    server_version = "finpulse-dispatcher/0.1"
    protocol_version = "HTTP/1.1"  # keep-alive: Alertmanager reuses its connection
    # Socket timeout: a client that stalls mid-body, or an idle keep-alive connection, frees its thread.
    timeout = 30.0

    def do_POST(self) -> None:  # the name http.server dispatches to
        """Receive one Alertmanager notification."""
        path = urllib.parse.urlsplit(self.path).path
        if path != WEBHOOK_PATH:
            self._refuse(404, {"error": f"no such path {path!r}; Alertmanager posts to {WEBHOOK_PATH}"})
            return
        dispatcher = self.server.dispatcher
        if not dispatcher.authorized(self.headers.get("Authorization")):
            log.warning(_kv(event="webhook_unauthorized", client=self.client_address[0]))
            self._refuse(
                401,
                {"error": "send Authorization: Bearer <dispatcher.token> (Alertmanager: http_config.authorization)"},
                {"WWW-Authenticate": 'Bearer realm="finpulse-dispatcher"'},
            )
            return
        length = self._content_length()
        if length is None:
            self._refuse(411, {"error": "send a Content-Length header (chunked bodies are not accepted)"})
            return
        limit = dispatcher.max_body_bytes
        if length < 0 or length > limit:
            error = f"Content-Length must be 0..{limit} (dispatcher.max_body_bytes)"
            self._refuse(413 if length > limit else 400, {"error": error})
            return
        body = self.rfile.read(length)
        try:
            status, answer = self.server.dispatcher.receive(body)
        except Exception as e:
            # Answer 500 so that Alertmanager retries; the cause is in the log.
            log.exception(_kv(event="notification_crashed"))
            status, answer = 500, {"status": "error", "error": f"{type(e).__name__}: {e}"}
        self._reply(status, answer)

    def _content_length(self) -> int | None:
        """Return the declared body length, -1 when it is not a number, None when there is none."""
        header = self.headers.get("Content-Length")
        if header is None:
            return None
        try:
            return int(header)
        except ValueError:
            return -1

    def _refuse(self, status: int, answer: Mapping[str, object], headers: Mapping[str, str] | None = None) -> None:
        """Answer without taking the body, then close; what the client still sends is read and dropped, up to a bound.

        Dropping it lets a client still writing (a large body) finish and read the answer instead of a broken
        pipe; the bound keeps a refused client from making the server read without end.
        """
        self.close_connection = True  # the unread body would otherwise be parsed as the next request
        self._reply(status, answer, headers)
        remaining = min(max(self._content_length() or 0, 0), _DRAIN_BYTES)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 64 * 1024))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client went away or stalled past the socket timeout: nothing more to do for it

    def do_GET(self) -> None:  # the name http.server dispatches to
        """Answer the health check or a scrape."""
        path = urllib.parse.urlsplit(self.path).path
        if path == HEALTH_PATH:
            self._reply(200, {"status": "ok", "pending_deliveries": self.server.dispatcher.pending})
        elif path == METRICS_PATH:
            # The encoder Prometheus asks for (OpenMetrics or the text format), as prometheus_client serves it.
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.server.dispatcher.registry), content_type)
        elif path == WEBHOOK_PATH:
            self._reply(405, {"error": f"{WEBHOOK_PATH} takes POST"}, {"Allow": "POST"})
        else:
            self._reply(404, {"error": f"no such path {path!r}"})

    def _reply(self, status: int, answer: Mapping[str, object], headers: Mapping[str, str] | None = None) -> None:
        """Send a JSON answer."""
        data = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        self._send(status, data, "application/json; charset=utf-8", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        """Send a complete answer."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # the signature http.server calls
        """Send the access log to logging instead of stderr."""
        log.debug(_kv(event="http", client=self.client_address[0], request=format % args))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to one vetted address of `host`, whatever the name resolves to by now; `Host:` names the host."""

    def __init__(self, host: str, port: int, address: str, timeout_s: float) -> None:
        """Prepare the connection; nothing is opened yet."""
        super().__init__(host, port, timeout=timeout_s)
        self._address = address

    def connect(self) -> None:
        """Open the TCP connection to the vetted address."""
        self.sock = _open_socket(self._address, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to one vetted address of `host`; the certificate is still checked against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout_s: float, tls: ssl.SSLContext) -> None:
        """Prepare the connection; nothing is opened yet."""
        super().__init__(host, port, timeout=timeout_s, context=tls)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        """Open the TCP connection to the vetted address, then TLS with SNI and verification for the host."""
        sock = _open_socket(self._address, self.port, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _open_socket(address: str, port: int, timeout_s: float | None) -> socket.socket:
    """Connect TCP to one address, without Nagle's delay (the request is one small write), as http.client does."""
    sock = socket.create_connection((address, port), timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the Standard Webhooks headers of one delivery: id, timestamp and the v1 signature.

    The signature is the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, keyed by the base64-decoded part
    of the `whsec_` secret.
    """
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}


def _message_id(claim: Claim) -> str:
    """Return the id of a delivery, the same at every attempt: fingerprint, status and start of the alert."""
    key = claim.key
    return f"{key.fingerprint}:{key.status}:{_rfc3339(key.starts_at)}"


def _event(claim: Claim, record: AttemptRecord, *, retry_in_s: float | None) -> DeliveryEvent:
    """Return the callback's view of one recorded attempt."""
    return DeliveryEvent(
        subscription_id=claim.subscription.id,
        subscription=claim.subscription.name,
        target_url=claim.subscription.target_url,
        fingerprint=record.key.fingerprint,
        status=record.key.status,
        alertname=claim.alert.alertname,
        attempt=record.attempt,
        outcome=record.outcome,
        http_status=record.http_status,
        error=record.error,
        latency_ms=record.latency_ms,
        attempted_at=record.attempted_at,
        retry_in_s=retry_in_s,
    )


def _load_token(config: DispatcherConfig) -> str:
    """Return the bearer token Alertmanager must send, from dispatcher.token or dispatcher.token_file."""
    if config.token is not None:
        return config.token.get_secret_value()
    if config.token_file is None:
        raise DispatchError(
            "dispatcher.token is not set, and the webhook takes only requests carrying it: set "
            "FINPULSE_DISPATCHER__TOKEN or dispatcher.token_file, and give Alertmanager the same token "
            f"(webhook_configs http_config.authorization.credentials_file); {TOKEN_HINT}"
        )
    path = Path(config.token_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DispatchError(
            f"dispatcher.token_file {path}: cannot read it ({reason}); create it or fix the path"
        ) from e
    try:
        return check_token(text, f"dispatcher.token_file {path}")
    except ValueError as e:
        raise DispatchError(str(e)) from None


def _too_deep(body: bytes, limit: int) -> bool:
    """Return whether JSON text nests arrays and objects deeper than `limit`, without parsing it."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        if bracket.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _parse_notification(body: bytes) -> tuple[dict[str, Any], list[AlertRecord], str | None]:
    """Return the envelope, the alerts (refused ones carry their reason) and the payload's own error."""
    if _too_deep(body, MAX_JSON_DEPTH):
        return {}, [], f"body nests deeper than {MAX_JSON_DEPTH} levels; an Alertmanager notification nests 4"
    try:
        payload = json.loads(body)
    except RecursionError:
        return {}, [], "body nests too deep to parse"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, [], f"body is not JSON: {e}"
    if not isinstance(payload, dict):
        return {}, [], f"body must be a JSON object (Alertmanager webhook), got {type(payload).__name__}"
    raw_alerts = payload.get("alerts")
    if not isinstance(raw_alerts, list):
        return payload, [], "alerts: missing or not a list"
    return payload, [parse_alert(raw) for raw in raw_alerts], None


def parse_alert(raw: object) -> AlertRecord:
    """Validate one alert of a notification against the label contract; a refused one carries the reasons."""
    if not isinstance(raw, dict):
        return AlertRecord(fingerprint=None, status=None, error=f"expected an object, got {type(raw).__name__}")
    problems: list[str] = []
    labels = _string_map(raw, "labels", problems, required=True)
    annotations = _string_map(raw, "annotations", problems, required=False)
    status = raw.get("status")
    if status not in ("firing", "resolved"):
        problems.append(f"status: {status!r} is not 'firing' or 'resolved'")
    alertname = labels.get("alertname")
    if not isinstance(alertname, str) or not alertname:
        problems.append("labels.alertname: missing")
    severity = labels.get("severity")
    if severity_rank(severity) is None:
        problems.append(f"labels.severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    topic = labels.get("topic")
    if topic is not None and topic not in TOPIC.labels:
        problems.append(f"labels.topic: {topic!r} is not a finpulse topic")
    ticker = None
    if labels.get("ticker") is not None:
        ticker = normalize_ticker(labels.get("ticker"))
        if ticker is None:
            problems.append(f"labels.ticker: {labels.get('ticker')!r} is not a ticker symbol")
    starts_at = _timestamp(raw, "startsAt", problems, required=True)
    ends_at = _timestamp(raw, "endsAt", problems, required=False)
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        if "fingerprint" in raw:
            problems.append(f"fingerprint: {fingerprint!r} is not a non-empty string")
        # Alertmanager always sends one; a hand-written payload without it gets one from its labels,
        # which are what identifies an alert, so its repeats still deduplicate.
        fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    generator_url = raw.get("generatorURL")
    return AlertRecord(
        fingerprint=fingerprint,
        status=status if isinstance(status, str) else None,
        alertname=_string(alertname),
        severity=_string(severity),
        topic=_string(topic),
        ticker=ticker,
        summary=_string(annotations.get("summary")),
        description=_string(annotations.get("description")),
        evidence=_string(annotations.get("evidence")),
        labels=labels,
        annotations=annotations,
        starts_at=starts_at,
        ends_at=ends_at,
        generator_url=generator_url if isinstance(generator_url, str) and generator_url else None,
        error="; ".join(problems) if problems else None,
    )


def subscriber_payload(claim: Claim) -> dict[str, Any]:
    """Return the JSON a subscriber receives for one alert."""
    alert = claim.alert
    return {
        "status": alert.status,
        "alertname": alert.alertname,
        "severity": alert.severity,
        "topic": alert.topic,
        "ticker": alert.ticker,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": _rfc3339(alert.starts_at) if alert.starts_at else None,
        "endsAt": _rfc3339(alert.ends_at) if alert.ends_at else None,
        "fingerprint": alert.fingerprint,
        "generatorURL": alert.generator_url,
        "subscription": claim.subscription.name,
        "text": alert_text(alert),
    }


def restate_resolved(alerts: list[AlertRecord], prometheus_url: str | None) -> list[AlertRecord]:
    """Give resolved alerts a summary of now: Alertmanager resends the annotations of the last firing
    evaluation, so a resolved message would repeat the numbers that made it fire."""
    out: list[AlertRecord] = []
    asked = 0
    for alert in alerts:
        if alert.status != "resolved" or alert.error is not None:
            out.append(alert)
            continue
        now: str | None = None
        if asked < _RESTATE_MAX:  # a huge resolved group must not hold the webhook answer up
            asked += 1
            now = current_share(alert, prometheus_url)
        was = alert.summary
        text = now or "Resolved"
        summary = f"{text} (when it fired: {was})" if was else text
        annotations = {**dict(alert.annotations), "summary": summary, "fired_summary": was}
        out.append(replace(alert, summary=summary, annotations=annotations))
    return out


def current_share(alert: AlertRecord, prometheus_url: str | None) -> str | None:
    """Return 'Resolved: ... now X% of N posts ... vs Y% baseline' from Prometheus, or None if unknown."""
    if prometheus_url is None:
        return None
    kind, value = ("topic", alert.topic) if alert.topic else ("ticker", alert.ticker)
    if not value:
        return None
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    selector = f'{{{kind}="{escaped}"}}'
    found: dict[str, float] = {}
    for name, expr in (
        ("share", f"finpulse:{kind}_negative_share:window{selector}"),
        ("baseline", f"finpulse:{kind}_negative_share:baseline{selector}"),
        ("volume", f"finpulse:{kind}_volume:window{selector}"),
    ):
        query = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{query}", timeout=2) as answer:
                result = json.loads(answer.read()).get("data", {}).get("result", [])
            if result:
                found[name] = float(result[0]["value"][1])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            log.debug(_kv(event="resolved_share_unknown", expr=expr, error=str(e)))
            return None
    if "share" not in found:
        return f"Resolved: no {kind} {value} posts in the window any more"
    baseline = f"{found['baseline'] * 100:.0f}% baseline" if "baseline" in found else "no baseline yet"
    volume = f" of {found['volume']:.0f} posts" if "volume" in found else ""
    share = f"{found['share'] * 100:.0f}%"
    return f"Resolved: negative share on {value} now {share}{volume} in the window vs {baseline}"


# Resolved alerts of one notification whose current share is read from Prometheus (2 s per query at most).
_RESTATE_MAX = 20


def alert_text(alert: AlertRecord) -> str:
    """Return a one-glance message, e.g. `[FIRING] critical NegativeSentimentSpike (Energy / Oil, XOM): summary`."""
    head = f"[{(alert.status or 'unknown').upper()}] {alert.severity or 'unknown'} {alert.alertname or 'alert'}"
    scope = ", ".join(part for part in (alert.topic, alert.ticker) if part)
    if scope:
        head += f" ({scope})"
    if alert.summary:
        head += f": {alert.summary}"
    return f"{head}\n{alert.description}" if alert.description else head


def _answer(
    result: RecordResult, alerts: list[AlertRecord], rejected: list[dict[str, Any]], error: str | None
) -> tuple[int, dict[str, Any]]:
    """Return the HTTP status and JSON answer for a recorded notification."""
    answer: dict[str, Any] = {
        "status": "ok" if error is None and not rejected else "rejected",
        "notification": result.notification_id,
        "alerts": len(alerts),
        "accepted": len(alerts) - len(rejected),
        "deliveries": len(result.claims),
        "duplicates": result.duplicates,
    }
    if error is not None:
        answer["error"] = error
    if rejected:
        answer["rejected"] = rejected
        answer.setdefault("error", f"{len(rejected)} of {len(alerts)} alerts refused; the others were accepted")
    return (200 if answer["status"] == "ok" else 400), answer


def _string_map(raw: Mapping[str, Any], name: str, problems: list[str], *, required: bool) -> dict[str, object]:
    """Return `raw[name]` as a dict, noting a missing or ill-typed value or non-string values."""
    value = raw.get(name)
    if value is None:
        if required:
            problems.append(f"{name}: missing")
        return {}
    if not isinstance(value, dict):
        problems.append(f"{name}: expected an object, got {type(value).__name__}")
        return {}
    for key, item in value.items():
        if not isinstance(item, str):
            problems.append(f"{name}.{key}: expected a string, got {type(item).__name__}")
    return dict(value)


def _timestamp(raw: Mapping[str, Any], name: str, problems: list[str], *, required: bool) -> dt.datetime | None:
    """Return an RFC 3339 field as an aware datetime, None for absent or Go's zero time."""
    value = raw.get(name)
    if value is None or value == "":
        if required:
            problems.append(f"{name}: missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{name}: expected an RFC 3339 string, got {type(value).__name__}")
        return None
    try:
        # Python 3.11 reads "Z" and Alertmanager's nanoseconds (truncated to microseconds).
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        problems.append(f"{name}: {value!r} is not an RFC 3339 time")
        return None
    if parsed.tzinfo is None:
        problems.append(f"{name}: {value!r} has no time zone")
        return None
    # Alertmanager sends 0001-01-01T00:00:00Z as endsAt of an alert that has not ended.
    return None if parsed.year == 1 else parsed


def _rfc3339(value: dt.datetime) -> str:
    """Return a UTC time the way Alertmanager writes it."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _string(value: object) -> str | None:
    """Return `value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _origin(url: str) -> str:
    """Return scheme://host:port of a URL, leaving its path (which may hold a token) out of logs."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _kv(**fields: object) -> str:
    """Render a log line as key="value" pairs; None values are left out."""
    return " ".join(
        f"{key}={json.dumps(str(value), ensure_ascii=False)}" for key, value in fields.items() if value is not None
    )
