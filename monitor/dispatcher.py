"""The alert dispatcher: receives Alertmanager's webhook, records each alert in DuckDB, delivers it to subscribers.

Flow of one `POST /alertmanager` (Alertmanager webhook JSON, version "4"):

1. Parse and validate the payload. Alerts that break the label contract are recorded with the
   reason and not delivered; the others go on. Any refusal answers 400 with the reasons, because
   Alertmanager does not retry a 4xx, and resending the same bytes would fail the same way.
2. In one DuckDB transaction: record the notification and its alerts, route the valid alerts to the
   matching subscriptions and claim each (fingerprint, status, startsAt, subscription) delivery not
   claimed before. A repeated notification of the same firing alert therefore claims nothing.
3. Answer 200 only then: a crash before the commit leaves Alertmanager without an answer, so it
   retries. A failed commit answers 500 for the same reason.
4. Hand each claim to its subscriber's queue. Every subscriber has its own worker thread, so a slow
   or failing subscriber delays only its own deliveries, which stay in order (a resolved alert never
   overtakes its firing one). Retries back off exponentially with jitter; every attempt is recorded.

Delivery is at least once: a claim stays open until delivered or given up, and `start()` resumes the
open ones. Each POST carries an `Idempotency-Key` so a subscriber can drop a retry it already got.
Run one dispatcher per DuckDB file: two would both resume the same open claims.

`GET /metrics` on the same server exposes the dispatcher's registry (`DeliveryMetrics`): every attempt and
every final outcome per subscriber, and each subscriber's queue depth, read at scrape time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import logging
import queue
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from learner.labels import TOPICS
from monitor.config import DispatcherConfig
from monitor.errors import DispatchError
from monitor.subscriptions import SEVERITIES, normalize_ticker, route, severity_rank
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
]

log = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/alertmanager"
HEALTH_PATH: Final = "/healthz"
METRICS_PATH: Final = "/metrics"
# Alertmanager's notifications are a few KB; this only stops a runaway client from filling memory.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
_USER_AGENT: Final = "finpulse-dispatcher/0.1"
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
        # The default opener follows a 30x of a POST as a GET without the body; refuse redirects instead.
        self._opener = urllib.request.build_opener(_NoRedirect())

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
    def pending(self) -> int:
        """Return how many deliveries are queued or in progress."""
        with self._idle:
            return self._outstanding

    def start(self) -> Dispatcher:
        """Create the tables, listen, and resume the deliveries a previous run left open."""
        if self._server is not None:
            raise DispatchError("the dispatcher is already started")
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
        for claim in resumed:
            self._enqueue(claim)
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

    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Handle one webhook body: record, claim, enqueue; return the HTTP status and the JSON answer."""
        received_at = dt.datetime.now(dt.UTC)
        envelope, alerts, error = _parse_notification(body)
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
        for claim in result.claims:
            self._enqueue(claim)
        log.info(
            _kv(
                event="notification_received",
                notification=result.notification_id,
                receiver=notification.receiver,
                alerts=len(alerts),
                refused=len(rejected),
                deliveries=len(result.claims),
                duplicates=result.duplicates,
                error=error,
            )
        )
        return _answer(result, alerts, rejected, error)

    def _enqueue(self, claim: Claim) -> None:
        """Queue a delivery on its subscriber's worker, starting the worker on first use."""
        with self._workers_lock:
            if self._stopping.is_set():
                return  # the claim stays open in DuckDB and resumes at the next start
            worker = self._workers.get(claim.subscription.id)
            if worker is None:
                self.metrics.declare(claim.subscription.name)
                worker = _SubscriberWorker(claim.subscription, self._deliver, self._finished, self._stopping)
                self._workers[claim.subscription.id] = worker
            with self._idle:
                self._outstanding += 1
            worker.put(claim)

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

    def _deliver(self, claim: Claim) -> None:
        """Make one delivery with retries; return when delivered, given up, or stopping."""
        subscription, alert = claim.subscription, claim.alert
        # A resumed delivery gets at least one more try, even if attempts was lowered meanwhile.
        budget = max(self._config.attempts, claim.attempts_made + 1)
        key = claim.key
        body = json.dumps(subscriber_payload(claim), ensure_ascii=False).encode("utf-8")
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": _USER_AGENT,
            "Idempotency-Key": f"{key.fingerprint}:{key.status}:{_rfc3339(key.starts_at)}",
        }
        attempt = claim.attempts_made
        while not self._stopping.is_set():
            attempt += 1
            attempted_at = dt.datetime.now(dt.UTC)
            started = time.perf_counter()
            http_status, error, retryable = self._post(subscription.target_url, body, headers)
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.metrics.attempts.labels(
                subscriber=subscription.name, outcome=_attempt_outcome(http_status, error, retryable)
            ).inc()
            if error is None:
                outcome = "delivered"
            elif retryable and attempt < budget:
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
                http_status=http_status,
                error=error,
                latency_ms=latency_ms,
            )
            try:
                self._store.record_attempt(record)
            except StorageError as e:
                # The subscriber has its answer either way; losing the audit row beats stalling deliveries.
                log.error(_kv(event="attempt_not_recorded", subscription=subscription.name, error=str(e)))
            event = DeliveryEvent(
                subscription_id=subscription.id,
                subscription=subscription.name,
                target_url=subscription.target_url,
                fingerprint=key.fingerprint,
                status=key.status,
                alertname=alert.alertname,
                attempt=attempt,
                outcome=outcome,
                http_status=http_status,
                error=error,
                latency_ms=latency_ms,
                attempted_at=attempted_at,
                retry_in_s=retry_in_s,
            )
            self._report(event)
            if retry_in_s is None or self._stopping.wait(retry_in_s):
                return

    def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int | None, str | None, bool]:
        """POST once; return the HTTP status, the error (None on 2xx) and whether a retry may help."""
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
        try:
            with self._opener.open(request, timeout=self._config.timeout_s) as response:
                response.read(_RESPONSE_READ_BYTES)
                return int(response.status), None, False
        except urllib.error.HTTPError as e:
            e.close()
            status = int(e.code)
            if 300 <= status < 400:
                return status, f"HTTP {status}: redirects are not followed; subscribe the final URL", False
            return status, f"HTTP {status} {e.reason}", status >= 500 or status in _RETRYABLE_4XX
        except urllib.error.URLError as e:
            return None, f"cannot reach {_origin(url)}: {e.reason}", True
        except (TimeoutError, http.client.HTTPException, OSError) as e:
            return None, f"{type(e).__name__} talking to {_origin(url)}: {e}", True

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
        if self._on_delivery is not None:
            try:
                self._on_delivery(event)
            except Exception:
                # A broken display callback must not stop deliveries.
                log.exception(_kv(event="on_delivery_failed", subscription=event.subscription))


class _SubscriberWorker:
    """One subscriber's queue, drained in order by its own thread."""

    def __init__(
        self,
        subscription: SubscriptionRow,
        deliver: Callable[[Claim], None],
        finished: Callable[[], None],
        stopping: threading.Event,
    ) -> None:
        """Start the worker thread."""
        self.name = subscription.name
        self._deliver = deliver
        self._finished = finished
        self._stopping = stopping
        self._queue: queue.SimpleQueue[Claim | None] = queue.SimpleQueue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"finpulse-deliver-{subscription.id}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Return how many deliveries are queued or in progress."""
        with self._depth_lock:
            return self._depth

    def put(self, claim: Claim) -> None:
        """Queue a delivery."""
        with self._depth_lock:
            self._depth += 1
        self._queue.put(claim)

    def close(self) -> None:
        """Ask the thread to finish once it reaches the end of the queue."""
        self._queue.put(None)

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to finish."""
        self._thread.join(timeout_s)

    def _run(self) -> None:
        """Deliver queued claims until closed; after stop, skip the rest (they stay open in DuckDB)."""
        while True:
            claim = self._queue.get()
            if claim is None:
                return
            try:
                if not self._stopping.is_set():
                    self._deliver(claim)
            except Exception:
                # Keep the worker alive for the next alert; the claim stays open and resumes on restart.
                log.exception(_kv(event="delivery_crashed", subscription=claim.subscription.name))
            finally:
                with self._depth_lock:
                    self._depth -= 1
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
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            self._reply(404, {"error": f"no such path {path!r}; Alertmanager posts to {WEBHOOK_PATH}"})
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            self._reply(411, {"error": "send a Content-Length header (chunked bodies are not accepted)"})
            return
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(413 if length > 0 else 400, {"error": f"Content-Length must be 0..{MAX_BODY_BYTES}"})
            return
        body = self.rfile.read(length)
        try:
            status, answer = self.server.dispatcher.receive(body)
        except Exception as e:
            # Answer 500 so that Alertmanager retries; the cause is in the log.
            log.exception(_kv(event="notification_crashed"))
            status, answer = 500, {"status": "error", "error": f"{type(e).__name__}: {e}"}
        self._reply(status, answer)

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects, so that a 30x reaches the caller as an HTTPError."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        """Follow nothing."""
        return None


def _attempt_outcome(http_status: int | None, error: str | None, retryable: bool) -> str:
    """Return what one attempt got, one of ATTEMPT_OUTCOMES."""
    if error is None:
        return "delivered"
    if http_status is None:
        return "error"
    return "retryable" if retryable else "refused"


def _parse_notification(body: bytes) -> tuple[dict[str, Any], list[AlertRecord], str | None]:
    """Return the envelope, the alerts (refused ones carry their reason) and the payload's own error."""
    try:
        payload = json.loads(body)
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
    if topic is not None and topic not in TOPICS:
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
