"""The local alerting stack: Prometheus scrapes the scorer, Alertmanager posts to the dispatcher, subscribers get it.

Used by the demo (with a subscriber that prints what it receives) and by the end-to-end alert test.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from monitor.config import AlertRulesConfig, DispatcherConfig, PrometheusConfig
from monitor.dispatcher import DeliveryEvent, Dispatcher
from monitor.prometheus import LocalAlertmanager, LocalPrometheus, find_binary
from monitor.subscriptions import add_subscription
from storage import AlertStore, StorageConfig

log = logging.getLogger(__name__)

SPIKE_TOPIC = "Energy / Oil"  # the topic the oil sell-off (finpulse.replay.oil_selloff) turns negative


def alerting_available() -> str | None:
    """Return None when Prometheus and Alertmanager are installed, else how to install them."""
    from monitor.errors import MonitorError

    try:
        find_binary("", LocalPrometheus.binary_names)
        find_binary("", LocalAlertmanager.binary_names)
    except MonitorError:
        return "apt-get install prometheus prometheus-alertmanager"
    return None


@dataclass
class Received:
    """One notification a subscriber's webhook received."""

    subscriber: str
    at: float
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    raw: bytes = b""  # the body as sent, which the signature covers


@dataclass
class Subscribers:
    """Local webhook servers standing in for subscribers' endpoints (real HTTP, real sockets)."""

    received: list[Received] = field(default_factory=list)
    failures_left: dict[str, int] = field(default_factory=dict)
    on_receive: Callable[[Received], None] | None = None
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, name: str, fail_first: int = 0) -> str:
        """Start a webhook for `name`; it answers 500 to its first `fail_first` requests. Return its URL."""
        owner = self
        self.failures_left[name] = fail_first

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner._lock:
                    failing = owner.failures_left[name] > 0
                    if failing:
                        owner.failures_left[name] -= 1
                    else:
                        headers = {key.lower(): value for key, value in self.headers.items()}
                        event = Received(name, time.monotonic(), json.loads(body or b"{}"), headers, body)
                        owner.received.append(event)
                self.send_response(500 if failing else 200)
                self.end_headers()
                if not failing and owner.on_receive is not None:
                    owner.on_receive(event)

            def log_message(self, format: str, *args: Any) -> None:
                """Keep the demo's terminal for the demo."""

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, name=f"subscriber-{name}", daemon=True).start()
        self._servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/hook"

    def of(self, name: str, status: str | None = None) -> list[Received]:
        """Return what `name` received, optionally only notifications of one status."""
        with self._lock:
            return [
                r for r in self.received if r.subscriber == name and (status is None or r.body.get("status") == status)
            ]

    def close(self) -> None:
        """Stop every webhook server."""
        for server in self._servers:
            server.shutdown()
            server.server_close()


class AlertStack:
    """Prometheus + Alertmanager + dispatcher on loopback ports, with the compressed-time presets.

    Alertmanager authenticates to the dispatcher with the dispatcher's token: the configured one (token or
    token_file), else a random one made here and handed to Alertmanager in a 0600 file, never in its YAML.
    """

    def __init__(
        self,
        data_dir: Path,
        storage: StorageConfig,
        *,
        rules: AlertRulesConfig | None = None,
        dispatcher: DispatcherConfig | None = None,
        on_delivery: Callable[[DeliveryEvent], None] | None = None,
    ) -> None:
        self.rules = rules if rules is not None else AlertRulesConfig.fast()
        prometheus_config = PrometheusConfig.fast(data_dir=data_dir)
        self.prometheus = LocalPrometheus(prometheus_config)
        self.alertmanager = LocalAlertmanager(prometheus_config)
        self.store = AlertStore(storage)
        settings = dispatcher if dispatcher is not None else DispatcherConfig(port=0, initial_backoff_s=0.5)
        if settings.token is None and settings.token_file is None:
            settings = settings.model_copy(update={"token": SecretStr(secrets.token_urlsafe(32))})
        self._settings = settings
        self.dispatcher = Dispatcher(settings, self.store, on_delivery=on_delivery)
        self._targets: list[str] = []

    def subscribe(self, name: str, url: str, topics: tuple[str, ...] = (), min_severity: str = "info") -> str:
        """Add a subscription; return its signing secret."""
        added = add_subscription(
            self.store,
            name=name,
            target_url=url,
            topics=topics,
            min_severity=min_severity,
            allowed_hosts=self._settings.allowed_hosts,
        )
        if added.secret is None:
            raise RuntimeError("add_subscription returned a subscription without its secret")
        return added.secret

    def start(self, scrape_targets: list[str]) -> AlertStack:
        """Start the dispatcher, then Alertmanager pointing at it, then Prometheus scraping the scorers."""
        self._targets = list(scrape_targets)
        self.dispatcher.start()
        alertmanager_url = self.alertmanager.start(
            self.dispatcher.webhook_url, bearer_token=self._settings.token, bearer_token_file=self._settings.token_file
        )
        self.prometheus.start(scrape_targets, alertmanager_url=alertmanager_url, rules=self.rules)
        self.dispatcher.use_prometheus(self.prometheus.url)
        return self

    def wait_scraped(self, timeout_s: float = 30.0) -> bool:
        """Wait until Prometheus has scraped a scorer; return False on timeout.

        `rate()` needs a sample from before a burst: a burst scored before the first scrape is invisible.
        """
        deadline = time.monotonic() + timeout_s
        # Per instance: an earlier run's series of the same job stay visible for Prometheus' 5-minute lookback.
        selectors = [f'up{{job="{self.rules.job}", instance="{target}"}} == 1' for target in self._targets]
        while time.monotonic() < deadline:
            if all(self.prometheus.query(selector) for selector in selectors):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        """Stop all three; safe to call twice."""
        for stop in (self.prometheus.stop, self.alertmanager.stop, self.dispatcher.stop):
            try:
                stop()
            except Exception as e:  # one failure must not leave the others running
                log.warning("event=alert_stack_stop_failed error=%r", str(e))
