"""End to end through the real Prometheus and Alertmanager: a negative spike on one topic reaches a webhook.

The test plays the scorer (a prometheus_client registry it increments and serves) and the subscriber (an HTTP
server receiving Alertmanager's webhook), and runs both servers with the fast preset (2 s scrape, 30 s window,
5 m baseline, 10 s `for`). About 90 s: 35 s until the baseline exists, then the spike and its resolution.
"""

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from monitor.config import AlertRulesConfig, PrometheusConfig
from monitor.errors import PrometheusError
from monitor.prometheus import LocalAlertmanager, LocalPrometheus

TOPIC = "Fed / Central Banks"
QUIET_TOPIC = "Earnings"  # steady traffic all along: must never alert
TICK_S = 0.25
# Posts per tick and topic: 1 of 6 negative normally (17%), 5 of 10 during the spike (50%, a warning).
BASELINE = {"negative": 1, "neutral": 4, "positive": 1}
SPIKE = {"negative": 5, "neutral": 4, "positive": 1}
DELIVERY_LIMIT_S = 60.0


@dataclass(frozen=True)
class Notification:
    """One webhook POST from Alertmanager and when it arrived (time.monotonic)."""

    received: float
    payload: dict[str, Any]


class Webhook:
    """A real HTTP server in a thread that records every Alertmanager notification."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}/alertmanager"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """Return a request handler class bound to this webhook."""
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                notification = Notification(time.monotonic(), json.loads(body))
                with webhook._changed:
                    webhook.notifications.append(notification)
                    webhook._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest's output for failures

        return Handler

    def wait_for(self, match: Callable[[dict[str, Any]], bool], deadline: float) -> tuple[float, dict[str, Any]]:
        """Return (arrival, alert) of the first alert in any notification that `match`es; fail at `deadline`."""
        with self._changed:
            while True:
                for notification in self.notifications:
                    for alert in notification.payload.get("alerts", []):
                        if match(alert):
                            return notification.received, alert
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [
                        (a["status"], a["labels"].get("alertname"), a["labels"].get("topic"))
                        for n in self.notifications
                        for a in n.payload.get("alerts", [])
                    ]
                    pytest.fail(f"no matching notification in time; received {seen}")
                self._changed.wait(remaining)

    def alerts(self) -> list[dict[str, Any]]:
        """Return every alert of every notification so far."""
        with self._changed:
            return [alert for n in self.notifications for alert in n.payload.get("alerts", [])]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class Traffic:
    """A stand-in scorer: increments `finpulse_messages_scored_total` every tick, with or without a spike."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.scored = Counter(
            "finpulse_messages_scored", "Messages scored, by predicted topic and sentiment.", ["topic", "sentiment"],
            registry=registry,
        )  # fmt: skip
        # Export every series at 0 before the first post, as a scorer should: a counter first seen above 0
        # loses its first increments to rate().
        for topic in (TOPIC, QUIET_TOPIC):
            for sentiment in BASELINE:
                self.scored.labels(topic=topic, sentiment=sentiment)
        self.spike_started: float | None = None
        self._spiking = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def spike(self) -> None:
        """Switch TOPIC to the negative mix from the next tick on."""
        self._spiking.set()

    def calm(self) -> None:
        """Switch TOPIC back to the usual mix."""
        self._spiking.clear()

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        """Post one tick of messages per TICK_S."""
        while not self._stop.wait(TICK_S):
            spiking = self._spiking.is_set()
            if spiking and self.spike_started is None:
                self.spike_started = time.monotonic()
            for sentiment, n in (SPIKE if spiking else BASELINE).items():
                self.scored.labels(topic=TOPIC, sentiment=sentiment).inc(n)
            for sentiment, n in BASELINE.items():
                self.scored.labels(topic=QUIET_TOPIC, sentiment=sentiment).inc(n)


@pytest.fixture
def scorer() -> Iterator[tuple[str, Traffic]]:
    """Serve a registry with scorer-like traffic; yield its scrape target and the traffic control."""
    registry = CollectorRegistry()
    traffic = Traffic(registry)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}", traffic
    finally:
        traffic.close()
        server.shutdown()
        server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """Yield a running webhook receiver."""
    receiver = Webhook()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[LocalPrometheus, LocalAlertmanager]]:
    """Yield an unstarted Prometheus and Alertmanager with the fast preset in a temporary dir; stop both after."""
    config = PrometheusConfig.fast(data_dir=tmp_path / "prometheus")
    prometheus, alertmanager = LocalPrometheus(config), LocalAlertmanager(config)
    try:
        prometheus.binary()
        alertmanager.binary()
    except PrometheusError as e:
        pytest.skip(str(e))
    try:
        yield prometheus, alertmanager
    finally:
        prometheus.stop()
        alertmanager.stop()


def _is_spike(status: str) -> Callable[[dict[str, Any]], bool]:
    """Return a matcher of the spike alert on TOPIC with the given status (firing, resolved)."""

    def match(alert: dict[str, Any]) -> bool:
        labels = alert["labels"]
        is_spike = labels.get("alertname") == "NegativeSentimentSpike" and labels.get("topic") == TOPIC
        return is_spike and alert["status"] == status

    return match


@pytest.mark.slow
def test_negative_spike_reaches_the_webhook_and_resolves(
    scorer: tuple[str, Traffic], webhook: Webhook, stack: tuple[LocalPrometheus, LocalAlertmanager]
) -> None:
    target, traffic = scorer
    prometheus, alertmanager = stack
    started = time.monotonic()
    alertmanager_url = alertmanager.start(webhook.url)
    url = prometheus.start([target], alertmanager_url=alertmanager_url, rules=AlertRulesConfig.fast())
    # A second start finds both running and reloads their rewritten configs instead of starting others.
    assert prometheus.start([target], alertmanager_url=alertmanager_url, rules=AlertRulesConfig.fast()) == url
    assert alertmanager.start(webhook.url) == alertmanager_url
    assert prometheus.status().running and alertmanager.status().running

    # The baseline (5m ending 30s ago) exists once two scrapes lie beyond the 30 s offset: ~35 s after start.
    baseline = f'finpulse:topic_negative_share:baseline{{topic="{TOPIC}"}}'
    deadline = time.monotonic() + 60
    while not prometheus.query(baseline):
        assert time.monotonic() < deadline, f"no baseline within 60 s; Prometheus alerts: {prometheus.alerts()}"
        time.sleep(1)
    assert webhook.alerts() == [], "steady traffic must not notify anyone"

    traffic.spike()
    _wait_until(lambda: traffic.spike_started is not None)
    spike_started = traffic.spike_started
    assert spike_started is not None
    fired_at, fired = webhook.wait_for(_is_spike("firing"), deadline=spike_started + DELIVERY_LIMIT_S)
    delivery_s = fired_at - spike_started

    assert fired["labels"] == {
        "alertname": "NegativeSentimentSpike",
        "category": "sentiment",
        "severity": "warning",
        "topic": TOPIC,
    }
    summary = fired["annotations"]["summary"]
    found = re.fullmatch(
        rf"Negative sentiment on {re.escape(TOPIC)}: (\d+)% of (\d+) posts in the last 30s vs (\d+)% baseline", summary
    )
    assert found is not None, summary
    share, posts, base = map(int, found.groups())
    assert 40 <= share <= 50 and posts >= 20 and 15 <= base <= 20, summary  # 50% spike over a 17% baseline
    assert f"WHERE topic = '{TOPIC}' AND scored_at >= TIMESTAMPTZ '" in fired["annotations"]["evidence"]

    traffic.calm()
    calmed = time.monotonic()
    resolved_at, _resolved = webhook.wait_for(_is_spike("resolved"), deadline=calmed + DELIVERY_LIMIT_S)

    others = [a["labels"] for a in webhook.alerts() if a["labels"].get("topic") != TOPIC]
    assert others == [], "only the spiking topic may alert"
    print(
        f"\nspike → webhook {delivery_s:.1f} s, calm → resolved {resolved_at - calmed:.1f} s, "
        f"test {time.monotonic() - started:.0f} s; summary: {summary}"
    )


def test_missing_binary_names_the_packages(tmp_path: Path) -> None:
    config = PrometheusConfig(prometheus_binary="/nonexistent/prometheus", data_dir=tmp_path)
    with pytest.raises(
        PrometheusError, match=r"prometheus not found .*apt-get install prometheus prometheus-alertmanager"
    ):
        LocalPrometheus(config).start([])
    assert not (tmp_path / "prometheus.yml").exists()


def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    prometheus = LocalPrometheus(PrometheusConfig(data_dir=tmp_path))  # 15 s scrapes
    with pytest.raises(PrometheusError, match=r"window \(30s\) must span at least 4 scrapes of 15s"):
        prometheus.start([], rules=AlertRulesConfig.fast())
    with pytest.raises(PrometheusError, match="host:port"):
        prometheus.start(["http://127.0.0.1:9464/metrics"])
    with pytest.raises(PrometheusError, match="webhook_url must be an http"):
        LocalAlertmanager(PrometheusConfig(data_dir=tmp_path)).start("127.0.0.1:9466")
    assert not prometheus.status().running


def test_a_server_that_cannot_start_says_why(stack: tuple[LocalPrometheus, LocalAlertmanager]) -> None:
    prometheus, _alertmanager = stack
    prometheus.data_dir.mkdir(parents=True)
    prometheus.tsdb_dir.write_text("a file where Prometheus wants its storage dir")
    with pytest.raises(PrometheusError, match=r"prometheus exited with code \d+ while starting on .*level=error"):
        prometheus.start([])
    assert not prometheus.status().running


def _wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `condition` until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
