"""Tests of alert subscriptions and delivery: real DuckDB files, real local HTTP servers, no mocks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import inspect
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from monitor.config import DispatcherConfig
from monitor.dispatcher import MAX_JSON_DEPTH, DeliveryEvent, Dispatcher
from monitor.errors import DispatchError, SubscriptionError
from monitor.subscriptions import (
    Subscription,
    add_subscription,
    check_target_url,
    list_subscriptions,
    remove_subscription,
)
from storage import AlertStore, History, StorageConfig

REPO = Path(__file__).resolve().parents[1]

FED = "Fed / Central Banks"
OIL = "Energy / Oil"
STARTS_AT = "2024-05-01T09:30:00.123456789Z"
TOKEN = "test-token-0123456789abcdef"


@dataclass(frozen=True)
class Received:
    """One request a subscriber got."""

    at: float  # time.monotonic() on arrival
    body: dict[str, Any]
    headers: dict[str, str]  # as sent
    raw: bytes  # the body's bytes, as signed
    message: Message  # the headers, looked up case-insensitively


class Subscriber:
    """A webhook receiver on a free loopback port that answers from a script of (status, delay_s).

    With `hold`, every answer waits until the event is set: the dispatcher's request stays in progress.
    """

    def __init__(self, script: list[tuple[int, float]] | None = None, hold: threading.Event | None = None) -> None:
        self.requests: list[Received] = []
        self.script = list(script or [])
        self.hold = hold
        self.got = threading.Condition()
        subscriber = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with subscriber.got:
                    received = Received(time.monotonic(), json.loads(body), dict(self.headers), body, self.headers)
                    subscriber.requests.append(received)
                    status, delay_s = subscriber.script.pop(0) if subscriber.script else (200, 0.0)
                    subscriber.got.notify_all()
                time.sleep(delay_s)
                if subscriber.hold is not None:
                    subscriber.hold.wait(60)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait_for(self, count: int, timeout_s: float = 10.0) -> bool:
        """Wait until `count` requests arrived."""
        with self.got:
            return self.got.wait_for(lambda: len(self.requests) >= count, timeout=timeout_s)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def store(tmp_path: Path) -> AlertStore:
    """Return an AlertStore on a fresh history file under tmp_path."""
    return AlertStore(StorageConfig(duckdb_path=tmp_path / "history" / "finpulse.duckdb", lock_timeout_s=20))


@pytest.fixture()
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    """Return a factory of Subscriber servers, all closed at teardown."""
    made: list[Subscriber] = []

    def make(script: list[tuple[int, float]] | None = None, hold: threading.Event | None = None) -> Subscriber:
        made.append(Subscriber(script, hold))
        return made[-1]

    yield make
    for server in made:
        server.close()


def alert(status: str = "firing", **labels: str) -> dict[str, Any]:
    """Return one Alertmanager alert with the contract's labels."""
    merged = {"alertname": "NegativeSentimentSpike", "severity": "critical", "topic": FED, **labels}
    return {
        "status": status,
        "labels": merged,
        "annotations": {"summary": "negative news spike", "description": "3x the usual share of negatives"},
        "startsAt": STARTS_AT,
        "endsAt": "2024-05-01T10:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "fp-" + merged["alertname"].lower(),
    }


def notification(*alerts: dict[str, Any]) -> bytes:
    """Return an Alertmanager webhook body (version 4) carrying `alerts`."""
    return json.dumps(
        {
            "version": "4",
            "groupKey": '{}:{alertname="NegativeSentimentSpike"}',
            "truncatedAlerts": 0,
            "status": alerts[0]["status"],
            "receiver": "finpulse",
            "groupLabels": {"alertname": "NegativeSentimentSpike"},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093",
            "alerts": list(alerts),
        }
    ).encode()


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    """POST a body as Alertmanager does (with the bearer token) and return the status and JSON answer."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def fast_config(**overrides: Any) -> DispatcherConfig:
    """Return a dispatcher config on a free port with short backoffs."""
    values: dict[str, Any] = {
        "port": 0,
        "token": TOKEN,
        "attempts": 4,
        "initial_backoff_s": 0.5,
        "max_backoff_s": 2.0,
        "timeout_s": 3,
    }
    values.update(overrides)
    return DispatcherConfig(**values)


# --- validation ----------------------------------------------------------------------------------

GOOD: dict[str, Any] = {"name": "desk", "target_url": "https://hooks.example.com/finpulse"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_url": "ftp://hooks.example.com/x"}, "target_url: 'ftp://hooks.example.com/x' has scheme 'ftp', not"),
        ({"target_url": "file:///etc/passwd"}, "has scheme 'file', not http or https"),
        ({"target_url": "javascript:alert(1)"}, "has scheme 'javascript'"),
        ({"target_url": "hooks.example.com/finpulse"}, "has no scheme, not http or https; give a URL like https://"),
        ({"target_url": "http:///finpulse"}, "target_url: 'http:///finpulse' has no host; give a URL like"),
        ({"target_url": "https://"}, "has no host"),
        ({"target_url": "http://hooks.example.com:99999/x"}, "has an invalid port"),
        ({"target_url": "http://hooks example.com/"}, "contains whitespace"),
        ({"target_url": ""}, "target_url: must not be empty"),
        ({"topics": ["Fed"]}, "subscription topics: unknown topic 'Fed' — did you mean 'Fed / Central Banks'?"),
        ({"topics": ["Earning"]}, "unknown topic 'Earning' — did you mean 'Earnings'?"),
        ({"topics": ["oil"]}, "unknown topic 'oil' — did you mean 'Energy / Oil'?"),
        ({"topics": ["Crypto"]}, "unknown topic 'Crypto'; choose from: Analyst Update, Fed / Central Banks"),
        ({"topics": [""]}, "topics: empty topic"),
        ({"tickers": ["AA PL"]}, "tickers: 'AA PL' is not a ticker symbol"),
        ({"tickers": ["$"]}, "tickers: '\\$' is not a ticker symbol"),
        ({"min_severity": "urgent"}, "min_severity: 'urgent' is not a severity; use info, warning or critical"),
        ({"name": "  "}, "name: must not be empty"),
        ({"name": "42"}, "name: '42' is a number"),
    ],
)
def test_bad_subscriptions_are_refused_with_one_line(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionError, match=message) as caught:
        Subscription(**{**GOOD, **fields})
    assert "\n" not in str(caught.value)


def test_subscription_fields_are_normalised() -> None:
    subscription = Subscription(
        name=" desk ",
        target_url="HTTPS://Hooks.example.com:8443/x?token=1",
        topics=("fed/central banks", "Earnings", "EARNINGS"),
        tickers=("$aapl", "brk.b", "AAPL"),
        min_severity="Warning",  # type: ignore[arg-type]
    )
    assert subscription.name == "desk"
    assert subscription.topics == (FED, "Earnings")
    assert subscription.tickers == ("AAPL", "BRK.B")
    assert subscription.min_severity == "warning"


def test_dispatcher_config_refuses_backoff_below_initial() -> None:
    with pytest.raises(ValidationError, match="max_backoff_s"):
        DispatcherConfig(initial_backoff_s=5, max_backoff_s=1)


# --- matching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "labels", "expected"),
    [
        ({}, {"severity": "info"}, True),
        ({}, {"severity": "critical", "topic": OIL, "ticker": "XOM"}, True),
        ({"topics": [FED]}, {"severity": "info", "topic": FED}, True),
        ({"topics": [FED]}, {"severity": "critical", "topic": OIL}, False),
        ({"topics": [FED]}, {"severity": "critical"}, False),  # no topic label: not in the filter
        ({"topics": [FED, OIL]}, {"severity": "warning", "topic": OIL}, True),
        ({"tickers": ["$aapl"]}, {"severity": "info", "ticker": "AAPL"}, True),
        ({"tickers": ["AAPL"]}, {"severity": "info", "ticker": "$aapl"}, True),
        ({"tickers": ["AAPL"]}, {"severity": "info", "ticker": "MSFT"}, False),
        ({"tickers": ["AAPL"]}, {"severity": "info", "topic": FED}, False),
        ({"topics": [FED], "tickers": ["AAPL"]}, {"severity": "info", "topic": FED, "ticker": "AAPL"}, True),
        ({"topics": [FED], "tickers": ["AAPL"]}, {"severity": "info", "topic": FED, "ticker": "MSFT"}, False),
        ({"topics": [FED], "tickers": ["AAPL"]}, {"severity": "info", "topic": OIL, "ticker": "AAPL"}, False),
        ({"min_severity": "warning"}, {"severity": "info"}, False),
        ({"min_severity": "warning"}, {"severity": "warning"}, True),
        ({"min_severity": "warning"}, {"severity": "critical"}, True),
        ({"min_severity": "critical"}, {"severity": "warning", "topic": FED}, False),
        ({"topics": [FED], "min_severity": "critical"}, {"severity": "warning", "topic": FED}, False),
        ({}, {"severity": "page-me"}, False),  # unknown severity never passes the floor
        ({}, {}, False),
    ],
)
def test_matching(filters: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert Subscription(**GOOD, **filters).matches(labels) is expected


# --- the store -----------------------------------------------------------------------------------


def test_subscriptions_are_added_listed_and_removed(store: AlertStore) -> None:
    assert list_subscriptions(store) == []  # no file yet
    first = add_subscription(store, name="fed", target_url="http://127.0.0.1:9/a", topics=[FED])
    second = add_subscription(store, name="oil", target_url="http://127.0.0.1:9/b", topics=["energy / oil"])
    assert (first.id, second.id) == (1, 2)
    assert second.topics == (OIL,)
    with pytest.raises(SubscriptionError, match="name 'fed' is taken by subscription 1"):
        add_subscription(store, name="fed", target_url="http://127.0.0.1:9/c")
    assert [s.name for s in list_subscriptions(store)] == ["fed", "oil"]
    assert remove_subscription(store, "1").active is False
    assert remove_subscription(store, "oil").id == 2
    with pytest.raises(SubscriptionError, match="no active subscription has the id or name 'oil'"):
        remove_subscription(store, "oil")
    assert list_subscriptions(store) == []
    assert [s.id for s in list_subscriptions(store, include_inactive=True)] == [1, 2]
    # A removed name is free again, under a new id: old deliveries keep pointing at the old one.
    assert add_subscription(store, name="fed", target_url="http://127.0.0.1:9/a").id == 3


# --- the dispatcher ------------------------------------------------------------------------------


def test_end_to_end_delivery_dedupe_retries_and_isolation(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    fed, oil, healthy = subscriber(), subscriber(), subscriber()
    # Slow and failing: the first answer takes 0.5 s, then 500 twice, then 200.
    flaky = subscriber([(500, 0.5), (500, 0.0), (200, 0.0)])
    add_subscription(store, name="fed", target_url=fed.url, topics=["Fed / Central Banks"])
    add_subscription(store, name="oil", target_url=oil.url, topics=[OIL])
    add_subscription(store, name="flaky", target_url=flaky.url)
    add_subscription(store, name="healthy", target_url=healthy.url, min_severity="warning")
    events: list[DeliveryEvent] = []
    config = fast_config()
    with Dispatcher(config, store, on_delivery=events.append) as dispatcher:
        firing = notification(alert("firing", ticker="$aapl"))
        status, answer = post(dispatcher.webhook_url, firing)
        assert (status, answer["status"], answer["deliveries"], answer["duplicates"]) == (200, "ok", 3, 0)
        assert dispatcher.wait_idle(20)

        assert len(fed.requests) == 1
        assert oil.requests == []
        assert len(healthy.requests) == 1
        assert len(flaky.requests) == 3  # delivered on the 3rd attempt
        got = fed.requests[0].body
        assert got["status"] == "firing"
        assert got["labels"]["topic"] == FED
        assert got["ticker"] == "AAPL"
        assert got["startsAt"] == "2024-05-01T09:30:00.123456Z"
        assert got["endsAt"] is None
        assert got["fingerprint"] == "fp-negativesentimentspike"
        assert got["annotations"]["summary"] == "negative news spike"
        assert got["text"].startswith("[FIRING] critical NegativeSentimentSpike (Fed / Central Banks, AAPL): negative")
        assert (
            fed.requests[0].headers["Idempotency-Key"] == "fp-negativesentimentspike:firing:2024-05-01T09:30:00.123456Z"
        )
        # The healthy subscriber did not wait for the slow, failing one: it got the alert before the
        # failing one even answered its first attempt, let alone before its first backoff ended.
        first_failure_answered = flaky.requests[0].at + 0.5
        assert healthy.requests[0].at < first_failure_answered
        assert healthy.requests[0].at < flaky.requests[1].at
        assert flaky.requests[1].at - first_failure_answered >= config.initial_backoff_s / 2 - 0.05
        assert flaky.requests[2].at - flaky.requests[1].at >= config.initial_backoff_s - 0.05  # doubled

        # Alertmanager repeats the notification (repeat_interval, or a retry): nothing is re-delivered.
        status, answer = post(dispatcher.webhook_url, firing)
        assert (status, answer["deliveries"], answer["duplicates"]) == (200, 0, 3)
        resolved = notification(alert("resolved", ticker="AAPL"))
        status, answer = post(dispatcher.webhook_url, resolved)
        assert (status, answer["deliveries"]) == (200, 3)
        assert dispatcher.wait_idle(20)
        status, answer = post(dispatcher.webhook_url, resolved)
        assert (status, answer["deliveries"], answer["duplicates"]) == (200, 0, 3)
        assert dispatcher.wait_idle(20)

    assert [r.body["status"] for r in fed.requests] == ["firing", "resolved"]
    assert fed.requests[1].body["endsAt"] == "2024-05-01T10:00:00Z"
    assert [r.body["status"] for r in healthy.requests] == ["firing", "resolved"]
    assert [r.body["status"] for r in flaky.requests] == ["firing"] * 3 + ["resolved"]
    assert oil.requests == []
    assert [(e.subscription, e.attempt, e.outcome) for e in events if e.subscription == "flaky"] == [
        ("flaky", 1, "failed"),
        ("flaky", 2, "failed"),
        ("flaky", 3, "delivered"),
        ("flaky", 1, "delivered"),
    ]

    history = History(StorageConfig(duckdb_path=store.path))
    assert history.query("SELECT status, count(*) FROM alerts GROUP BY ALL ORDER BY ALL").rows == [
        ("firing", 2),
        ("resolved", 2),
    ]
    assert history.query(
        "SELECT s.name, d.status, d.attempt, d.outcome, d.http_status FROM deliveries d "
        "JOIN subscriptions s ON s.id = d.subscription_id ORDER BY s.name, d.status, d.attempt"
    ).rows == [
        ("fed", "firing", 1, "delivered", 200),
        ("fed", "resolved", 1, "delivered", 200),
        ("flaky", "firing", 1, "failed", 500),
        ("flaky", "firing", 2, "failed", 500),
        ("flaky", "firing", 3, "delivered", 200),
        ("flaky", "resolved", 1, "delivered", 200),
        ("healthy", "firing", 1, "delivered", 200),
        ("healthy", "resolved", 1, "delivered", 200),
    ]
    assert history.query("SELECT outcome, count(*) FROM delivery_claims GROUP BY ALL").rows == [("delivered", 6)]
    assert history.query("SELECT min(latency_ms) > 0, max(error) FROM deliveries WHERE outcome = 'failed'").rows == [
        (True, "HTTP 500 Internal Server Error")
    ]


def test_bad_payloads_answer_400_and_keep_what_was_parseable(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    everyone = subscriber()
    add_subscription(store, name="everyone", target_url=everyone.url)
    with Dispatcher(fast_config(), store) as dispatcher:
        status, answer = post(dispatcher.webhook_url, b'{"alerts": [')
        assert status == 400
        assert answer["error"].startswith("body is not JSON:")
        good = alert("firing", alertname="RuleGood")
        bad = alert("firing", alertname="RuleBad", severity="page-me", topic="Crypto")
        status, answer = post(dispatcher.webhook_url, notification(good, bad))
        assert status == 400
        assert (answer["accepted"], answer["deliveries"]) == (1, 1)
        assert answer["rejected"] == [
            {
                "index": 1,
                "reason": "labels.severity: 'page-me' is not one of info, warning, critical; "
                "labels.topic: 'Crypto' is not a finpulse topic",
            }
        ]
        assert dispatcher.wait_idle(10)
        with urllib.request.urlopen(dispatcher.url + "/healthz", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok", "pending_deliveries": 0}
        assert post(dispatcher.url + "/elsewhere", b"{}")[0] == 404
    assert [r.body["alertname"] for r in everyone.requests] == ["RuleGood"]
    history = History(StorageConfig(duckdb_path=store.path))
    notes = history.query("SELECT alerts_total, alerts_rejected, error, body FROM alert_notifications ORDER BY ALL")
    assert [row[:2] for row in notes.rows] == [(0, 0), (2, 1)]
    assert str(notes.rows[0][2]).startswith("body is not JSON: Expecting value")
    assert notes.rows[1][2] == "1 of 2 alerts refused"
    assert notes.rows[0][3] == '{"alerts": ['  # the raw body is kept for whoever fixes the sender
    assert history.query("SELECT alertname, severity, topic, error IS NULL FROM alerts ORDER BY alertname").rows == [
        ("RuleBad", "page-me", "Crypto", False),
        ("RuleGood", "critical", FED, True),
    ]


def test_open_deliveries_resume_after_a_restart(store: AlertStore, subscriber: Callable[..., Subscriber]) -> None:
    down = subscriber([(503, 0.0)])
    add_subscription(store, name="pager", target_url=down.url)
    failed = threading.Event()
    config = fast_config(initial_backoff_s=30, max_backoff_s=60)  # the retry would come long after the stop
    dispatcher = Dispatcher(config, store, on_delivery=lambda event: failed.set()).start()
    assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
    assert failed.wait(10)
    started = time.monotonic()
    dispatcher.stop()
    assert time.monotonic() - started < 2  # the backoff wait does not hold up the stop

    events: list[DeliveryEvent] = []
    with Dispatcher(config, store, on_delivery=events.append) as restarted:
        assert restarted.wait_idle(10)
    assert [(e.attempt, e.outcome) for e in events] == [(2, "delivered")]
    assert [r.body["status"] for r in down.requests] == ["firing", "firing"]
    history = History(StorageConfig(duckdb_path=store.path))
    assert history.query("SELECT attempt, outcome, http_status FROM deliveries ORDER BY attempt").rows == [
        (1, "failed", 503),
        (2, "delivered", 200),
    ]


def test_resolved_is_not_sent_for_a_firing_never_notified(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    desk = subscriber()
    add_subscription(store, name="desk", target_url=desk.url)
    with Dispatcher(fast_config(), store) as dispatcher:
        # The warning was inhibited under its critical while firing: Alertmanager only ever sends it resolved.
        warning = alert("resolved", severity="warning")
        warning["fingerprint"] = "fp-warning"
        critical_firing, critical_resolved = alert("firing"), alert("resolved")
        assert post(dispatcher.webhook_url, notification(critical_firing))[0] == 200
        assert post(dispatcher.webhook_url, notification(critical_resolved, warning))[0] == 200
        assert dispatcher.wait_idle(10)
    assert [(r.body["status"], r.body["fingerprint"]) for r in desk.requests] == [
        ("firing", "fp-negativesentimentspike"),
        ("resolved", "fp-negativesentimentspike"),
    ]


# --- metrics -------------------------------------------------------------------------------------


def test_delivery_metrics_count_every_attempt_and_every_outcome(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    ok = subscriber()
    down = subscriber([(500, 0.0), (503, 0.0)])  # fails both attempts of the budget
    gone = subscriber([(404, 0.0)])  # a 404 will not change: given up at once
    closed = subscriber()
    closed.close()  # nothing listens there any more: no HTTP answer at all
    for name, url in (("ok", ok.url), ("down", down.url), ("gone", gone.url), ("closed", closed.url)):
        add_subscription(store, name=name, target_url=url)
    registry = CollectorRegistry()
    config = fast_config(attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    with Dispatcher(config, store, registry=registry) as dispatcher:
        assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
        assert dispatcher.wait_idle(30)
        # Read while running: the gauge has a series per subscriber worker, and stop() ends the workers.
        depths = {
            name: registry.get_sample_value("finpulse_dispatcher_queue_depth", {"subscriber": name})
            for name in ("ok", "down", "gone", "closed")
        }
        with urllib.request.urlopen(dispatcher.url + "/metrics", timeout=10) as response:
            content_type = response.headers["Content-Type"]
            scraped = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(response.read().decode("utf-8"))
                for sample in family.samples
            }

    def value(name: str, subscriber: str, outcome: str) -> float | None:
        return registry.get_sample_value(name, {"subscriber": subscriber, "outcome": outcome})

    attempts = "finpulse_dispatcher_delivery_attempts_total"
    deliveries = "finpulse_dispatcher_deliveries_total"
    expected_attempts = {
        "ok": {"delivered": 1},
        "down": {"retryable": 2},
        "gone": {"refused": 1},
        "closed": {"error": 2},
    }
    for name, counts in expected_attempts.items():
        for outcome in ("delivered", "retryable", "refused", "error"):
            assert value(attempts, name, outcome) == counts.get(outcome, 0), (name, outcome)
    for name, final in (("ok", "delivered"), ("down", "given_up"), ("gone", "given_up"), ("closed", "given_up")):
        # Every outcome is exported from 0, so the first given-up delivery is an increase Prometheus sees.
        assert value(deliveries, name, final) == 1, name
        assert value(deliveries, name, "given_up" if final == "delivered" else "delivered") == 0, name
        assert depths[name] == 0, name
    assert (len(ok.requests), len(down.requests), len(gone.requests)) == (1, 2, 1)

    # GET /metrics serves the same registry in the text format Prometheus scrapes.
    assert content_type.startswith("text/plain")
    assert scraped[(deliveries, (("outcome", "given_up"), ("subscriber", "down")))] == 1
    assert scraped[(attempts, (("outcome", "retryable"), ("subscriber", "down")))] == 2
    assert scraped[("finpulse_dispatcher_queue_depth", (("subscriber", "ok"),))] == 0


def test_queue_depth_counts_deliveries_queued_and_in_progress(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    hold = threading.Event()
    held = subscriber(hold=hold)
    add_subscription(store, name="held", target_url=held.url)
    registry = CollectorRegistry()

    def depth_and_delivered() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("finpulse_dispatcher_queue_depth", {"subscriber": "held"}),
            registry.get_sample_value(
                "finpulse_dispatcher_deliveries_total", {"subscriber": "held", "outcome": "delivered"}
            ),
        )

    # A long request timeout: the held answer must not time out while the test reads the gauge.
    with Dispatcher(fast_config(timeout_s=60), store, registry=registry) as dispatcher:
        try:
            two = notification(alert(alertname="RuleA"), alert(alertname="RuleB"))
            assert post(dispatcher.webhook_url, two)[0] == 200
            assert held.wait_for(1, timeout_s=30)  # the first is in progress, the second waits behind it
            assert depth_and_delivered() == (2, 0)
        finally:
            hold.set()
        assert dispatcher.wait_idle(30)
        assert depth_and_delivered() == (0, 2)


# --- who may post, and how much ------------------------------------------------------------------


def post_raw(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST exactly these headers (no Content-Type or token added); return status, JSON answer and headers."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("POST", parts.path, body=body, headers={"Content-Length": str(len(body)), **headers})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.headers)
    finally:
        connection.close()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        f"Basic {base64.b64encode(f'alertmanager:{TOKEN}'.encode()).decode()}",
        f"Token {TOKEN}",
        TOKEN,
    ],
)
def test_webhook_refuses_requests_without_the_token(
    store: AlertStore, subscriber: Callable[..., Subscriber], authorization: str | None
) -> None:
    desk = subscriber()
    add_subscription(store, name="desk", target_url=desk.url)
    with Dispatcher(fast_config(), store) as dispatcher:
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        status, answer, response_headers = post_raw(dispatcher.webhook_url, notification(alert()), headers)
        assert status == 401
        assert "Authorization: Bearer" in answer["error"] and TOKEN not in json.dumps(answer)
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        # The right token, with the scheme in any case, gets in.
        right = {"Content-Type": "application/json", "Authorization": f"bearer {TOKEN}"}
        assert post_raw(dispatcher.webhook_url, notification(alert()), right)[0] == 200
        assert dispatcher.wait_idle(10)
    assert len(desk.requests) == 1  # only the authenticated notification was delivered
    history = History(StorageConfig(duckdb_path=store.path))
    assert history.query("SELECT count(*) FROM alert_notifications").rows == [(1,)]  # nothing else was recorded


def test_the_token_comes_from_the_config_or_a_file_and_is_never_shown(tmp_path: Path, store: AlertStore) -> None:
    config = fast_config()
    assert TOKEN not in repr(config) and TOKEN not in config.model_dump_json() and "**" in repr(config)
    with pytest.raises(ValidationError) as caught:
        DispatcherConfig(token="short-secret")
    assert "too short" in str(caught.value) and "short-secret" not in str(caught.value)
    with pytest.raises(ValidationError, match="not both"):
        DispatcherConfig(token=TOKEN, token_file=tmp_path / "token")
    with pytest.raises(DispatchError, match="dispatcher.token is not set.*FINPULSE_DISPATCHER__TOKEN"):
        Dispatcher(DispatcherConfig(port=0), store).start()
    missing = tmp_path / "missing-token"
    with pytest.raises(DispatchError, match="dispatcher.token_file .*missing-token: cannot read it"):
        Dispatcher(DispatcherConfig(port=0, token_file=missing), store).start()
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n", encoding="utf-8")  # surrounding whitespace is not part of it
    with Dispatcher(DispatcherConfig(port=0, token_file=token_file), store) as dispatcher:
        assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
        assert post(dispatcher.webhook_url, notification(alert()), token="x" * 20)[0] == 401


def test_oversized_and_deeply_nested_bodies_answer_413_and_400(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    desk = subscriber()
    add_subscription(store, name="desk", target_url=desk.url)
    with Dispatcher(fast_config(max_body_bytes=64 * 1024), store) as dispatcher:
        big = notification(*(alert(alertname=f"Rule{n}") for n in range(200)))
        assert len(big) > 64 * 1024
        status, answer = post(dispatcher.webhook_url, big)
        assert status == 413 and "dispatcher.max_body_bytes" in answer["error"]

        # On main, deep JSON raised RecursionError and was answered 500, which Alertmanager retries forever.
        status, answer = post(dispatcher.webhook_url, b"[" * 30_000 + b"]" * 30_000)
        assert status == 400 and answer["error"] == (
            f"body nests deeper than {MAX_JSON_DEPTH} levels; an Alertmanager notification nests 4"
        )
        nested = alert()
        value: Any = "deep"
        for _ in range(MAX_JSON_DEPTH):
            value = [value]
        nested["labels"]["x"] = value  # 4 levels down already
        status, answer = post(dispatcher.webhook_url, notification(nested))
        assert status == 400 and "nests deeper" in answer["error"]

        # Brackets inside strings do not count: a summary full of them is a fine notification.
        bracketed = alert()
        bracketed["annotations"]["summary"] = "[" * 500 + '\\"{' * 100
        status, answer = post(dispatcher.webhook_url, notification(bracketed))
        assert (status, answer["deliveries"]) == (200, 1)
        assert dispatcher.wait_idle(10)
        with urllib.request.urlopen(dispatcher.url + "/healthz", timeout=5) as response:
            assert response.status == 200  # still serving
    assert [r.body["annotations"]["summary"][:3] for r in desk.requests] == ["[[["]


def test_the_deep_body_of_main_is_refused_quickly(store: AlertStore) -> None:
    with Dispatcher(fast_config(), store) as dispatcher:
        started = time.monotonic()
        status, answer = post(dispatcher.webhook_url, b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nests deeper" in answer["error"]
        assert time.monotonic() - started < 30  # a hang guard: the depth scan answers in milliseconds


# --- queues: bounded, critical first ---------------------------------------------------------------


def warning(n: int) -> dict[str, Any]:
    """Return a firing warning of its own rule."""
    found = alert(alertname=f"Warn{n}", severity="warning")
    found["fingerprint"] = f"fp-warn-{n}"
    return found


def test_a_critical_alert_overtakes_warnings_queued_before_it(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    hold = threading.Event()
    slow = subscriber(hold=hold)
    add_subscription(store, name="slow", target_url=slow.url)
    with Dispatcher(fast_config(timeout_s=60), store) as dispatcher:
        try:
            status, answer = post(dispatcher.webhook_url, notification(*(warning(n) for n in range(5))))
            assert (status, answer["deliveries"]) == (200, 5)
            assert slow.wait_for(1)  # Warn0 is in progress, Warn1..4 wait
            status, answer = post(dispatcher.webhook_url, notification(alert(alertname="Crash")))
            assert (status, answer["deliveries"]) == (200, 1)
            assert dispatcher.pending == 6
        finally:
            hold.set()
        assert dispatcher.wait_idle(30)
    assert [r.body["alertname"] for r in slow.requests] == ["Warn0", "Crash", "Warn1", "Warn2", "Warn3", "Warn4"]


def test_a_critical_alert_is_not_held_up_by_a_warning_backing_off(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    # The warning's first attempt fails; its retry waits 2-4 s, and the critical goes meanwhile.
    flaky = subscriber([(503, 0.0)])
    add_subscription(store, name="flaky", target_url=flaky.url)
    config = fast_config(initial_backoff_s=4.0, max_backoff_s=8.0)
    with Dispatcher(config, store) as dispatcher:
        assert post(dispatcher.webhook_url, notification(warning(0)))[0] == 200
        assert flaky.wait_for(1)
        assert post(dispatcher.webhook_url, notification(alert(alertname="Crash")))[0] == 200
        assert flaky.wait_for(2, timeout_s=1.5)  # long before the warning's backoff ends
        assert flaky.requests[1].body["alertname"] == "Crash"
        assert dispatcher.wait_idle(20)
    assert [r.body["alertname"] for r in flaky.requests] == ["Warn0", "Crash", "Warn0"]


def test_a_full_queue_gives_up_at_once_without_blocking_the_webhook(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    hold = threading.Event()
    stuck = subscriber(hold=hold)
    add_subscription(store, name="stuck", target_url=stuck.url)
    events: list[DeliveryEvent] = []
    registry = CollectorRegistry()
    config = fast_config(queue_size=3, timeout_s=60)
    with Dispatcher(config, store, on_delivery=events.append, registry=registry) as dispatcher:
        try:
            started = time.monotonic()
            status, answer = post(dispatcher.webhook_url, notification(*(warning(n) for n in range(300))))
            answered_s = time.monotonic() - started
            assert (status, answer["deliveries"]) == (200, 300)
            assert answered_s < 10  # 297 given up in one transaction, not one session each
            assert stuck.wait_for(1)  # Warn0 in progress; Warn1 and Warn2 wait; the other 297 were given up
            assert dispatcher.pending == 3
            # A critical alert makes room: the newest waiting warning (Warn2) is given up instead.
            assert post(dispatcher.webhook_url, notification(alert(alertname="Crash")))[0] == 200
            assert dispatcher.pending == 3
        finally:
            hold.set()
        assert dispatcher.wait_idle(30)
        given_up = registry.get_sample_value(
            "finpulse_dispatcher_deliveries_total", {"subscriber": "stuck", "outcome": "given_up"}
        )
    assert [r.body["alertname"] for r in stuck.requests] == ["Warn0", "Crash", "Warn1"]
    assert given_up == 298
    gave_up = [e for e in events if e.outcome == "gave_up"]
    assert len(gave_up) == 298 and all(e.http_status is None for e in gave_up)
    assert gave_up[0].error == "queue full: 3 deliveries already wait for this subscriber; not sent"
    assert gave_up[-1].alertname == "Warn2"
    assert gave_up[-1].error == "queue full: given up to make room for a critical alert; not sent"
    history = History(StorageConfig(duckdb_path=store.path))
    assert history.query("SELECT outcome, count(*) FROM delivery_claims GROUP BY ALL ORDER BY ALL").rows == [
        ("delivered", 3),
        ("gave_up", 298),
    ]
    assert history.query(
        "SELECT count(*), min(attempt), max(http_status) FROM deliveries WHERE outcome = 'gave_up'"
    ).rows == [(298, 1, None)]


# --- signed deliveries ---------------------------------------------------------------------------


# Copied from README.md (Alerts, "Verifying a delivery"); test_readme_shows_this_verify keeps the two the same.
def verify(secret: str, headers, body: bytes, tolerance_s: int = 300) -> bool:
    """Return True if finpulse signed `body` with `secret` (whsec_…) less than `tolerance_s` ago."""
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance_s:
        return False  # a replay, or a clock far off
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    return any(hmac.compare_digest(expected, sig) for sig in headers["webhook-signature"].split())


def test_readme_shows_this_verify() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    source = inspect.getsource(verify)
    assert source in readme
    assert "import base64, hashlib, hmac, time\n\n" + source in readme


def test_deliveries_are_signed_per_standard_webhooks(store: AlertStore, subscriber: Callable[..., Subscriber]) -> None:
    desk, other = subscriber(), subscriber()
    added = add_subscription(store, name="desk", target_url=desk.url)
    assert added.secret is not None and added.secret.startswith("whsec_")
    assert len(base64.b64decode(added.secret.removeprefix("whsec_"))) == 32
    assert added.secret not in repr(added)
    other_secret = add_subscription(store, name="other", target_url=other.url).secret
    assert other_secret is not None and other_secret != added.secret
    with Dispatcher(fast_config(), store) as dispatcher:
        before = int(time.time())
        assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
        assert dispatcher.wait_idle(10)
    (got,) = desk.requests
    assert verify(added.secret, got.message, got.raw)
    assert (
        got.message["webhook-id"]
        == got.message["Idempotency-Key"]
        == ("fp-negativesentimentspike:firing:2024-05-01T09:30:00.123456Z")
    )
    assert before <= int(got.message["webhook-timestamp"]) <= time.time() + 1
    assert got.message["webhook-signature"].startswith("v1,")
    # Anything changed, and the check fails: the body, the id, the secret, an old timestamp.
    assert not verify(added.secret, got.message, got.raw.replace(b"critical", b"info"))
    assert not verify(other_secret, got.message, got.raw)
    assert verify(other_secret, other.requests[0].message, other.requests[0].raw)
    forged = Message()
    for name in ("webhook-id", "webhook-signature"):
        forged[name] = got.message[name]
    forged["webhook-timestamp"] = str(int(got.message["webhook-timestamp"]) - 3600)
    assert not verify(added.secret, forged, got.raw)


def test_a_subscription_stored_without_a_secret_gets_one_at_its_first_delivery(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    desk = subscriber()
    # As a subscription of schema v4 reads after migration v5: no secret.
    store.ensure_schema()
    store.add_subscription(name="old", target_url=desk.url, topics=(), tickers=(), min_severity="info")
    assert list_subscriptions(store)[0].secret is None
    with Dispatcher(fast_config(), store) as dispatcher:
        assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
        resolved = alert("resolved")
        assert post(dispatcher.webhook_url, notification(resolved))[0] == 200
        assert dispatcher.wait_idle(10)
    secret = list_subscriptions(store)[0].secret
    assert secret is not None and secret.startswith("whsec_")
    assert [verify(secret, r.message, r.raw) for r in desk.requests] == [True, True]


# --- where deliveries may go ---------------------------------------------------------------------


def _name_resolving_to_loopback() -> str | None:
    """Return a host name that is not `localhost` yet resolves to a loopback address here, or None."""
    names = [socket.gethostname(), "ip6-localhost", "ip6-loopback", "localhost.localdomain"]
    try:
        for line in Path("/etc/hosts").read_text(encoding="utf-8").splitlines():
            fields = line.split("#")[0].split()
            names.extend(fields[1:])
    except OSError:
        pass
    for name in dict.fromkeys(names):
        try:
            check_target_url(f"https://{name}/", allowed_hosts=())
            found = {info[4][0] for info in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)}
        except (SubscriptionError, OSError):
            continue
        if any(address.startswith("127.") or address == "::1" for address in found):
            return name
    return None


def test_a_name_resolving_to_a_refused_address_is_given_up_unsent(
    store: AlertStore, subscriber: Callable[..., Subscriber]
) -> None:
    name = _name_resolving_to_loopback()
    if name is None:
        pytest.skip("no host name here resolves to loopback besides localhost")
    listening = subscriber()
    port = listening.server.server_port
    # Valid when subscribed: https to a name. Its DNS answer is what points back at this machine.
    sneaky = add_subscription(store, name="sneaky", target_url=f"https://{name}:{port}/hook", allowed_hosts=())
    # Stored by an older finpulse, before the checks: the dispatcher refuses it too.
    store.add_subscription(
        name="metadata", target_url="http://169.254.169.254/latest", topics=(), tickers=(), min_severity="info"
    )
    events: list[DeliveryEvent] = []
    registry = CollectorRegistry()
    with Dispatcher(fast_config(allowed_hosts=()), store, on_delivery=events.append, registry=registry) as dispatcher:
        assert post(dispatcher.webhook_url, notification(alert()))[0] == 200
        assert dispatcher.wait_idle(10)
    assert listening.requests == []
    by_name = {e.subscription: e for e in events}
    assert set(by_name) == {"sneaky", "metadata"}
    assert all(e.outcome == "gave_up" and e.attempt == 1 and e.http_status is None for e in events)
    assert by_name["sneaky"].error is not None and by_name["sneaky"].error.startswith(
        f"not sent: {name} resolves to a refused address: 127."
    )
    assert by_name["metadata"].error == (
        "not sent: subscription target_url: 'http://169.254.169.254/latest' is refused: "
        "169.254.169.254 is a cloud metadata address"
    )
    for subscription in ("sneaky", "metadata"):
        labels = {"subscriber": subscription}
        given_up = registry.get_sample_value("finpulse_dispatcher_deliveries_total", {**labels, "outcome": "given_up"})
        assert given_up == 1
        for outcome in ("delivered", "retryable", "refused", "error"):  # no HTTP attempt was made
            attempts = "finpulse_dispatcher_delivery_attempts_total"
            assert registry.get_sample_value(attempts, {**labels, "outcome": outcome}) == 0
    assert sneaky.id is not None


def test_a_resolved_alert_does_not_repeat_the_numbers_it_fired_on() -> None:
    import datetime as _dt

    from monitor.dispatcher import restate_resolved
    from storage.alerts import AlertRecord

    fired = "Negative sentiment on Energy / Oil: 91% of 120 posts in the last 5m vs 20% baseline"
    at = _dt.datetime(2026, 12, 1, 9, 0, tzinfo=_dt.UTC)
    record = AlertRecord(
        fingerprint="f",
        status="resolved",
        topic="Energy / Oil",
        summary=fired,
        annotations={"summary": fired},
        starts_at=at,
    )
    still = AlertRecord(fingerprint="g", status="firing", topic="Energy / Oil", summary=fired, starts_at=at)
    # No Prometheus to ask (or it does not answer): the text says plainly which numbers are from the firing.
    [resolved, firing] = restate_resolved([record, still], "http://127.0.0.1:9")
    assert resolved.summary == f"Resolved (when it fired: {fired})"
    assert resolved.annotations["summary"] == resolved.summary and resolved.annotations["fired_summary"] == fired
    assert firing.summary == fired
