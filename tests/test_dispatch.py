"""Tests of alert subscriptions and delivery: real DuckDB files, real local HTTP servers, no mocks."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from monitor.config import DispatcherConfig
from monitor.dispatcher import DeliveryEvent, Dispatcher
from monitor.errors import SubscriptionError
from monitor.subscriptions import Subscription, add_subscription, list_subscriptions, remove_subscription
from storage import AlertStore, History, StorageConfig

FED = "Fed / Central Banks"
OIL = "Energy / Oil"
STARTS_AT = "2024-05-01T09:30:00.123456789Z"


@dataclass(frozen=True)
class Received:
    """One request a subscriber got."""

    at: float  # time.monotonic() on arrival
    body: dict[str, Any]
    headers: dict[str, str]


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
                    subscriber.requests.append(Received(time.monotonic(), json.loads(body), dict(self.headers)))
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


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST a body and return the status and JSON answer, also for 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def fast_config(**overrides: Any) -> DispatcherConfig:
    """Return a dispatcher config on a free port with short backoffs."""
    values: dict[str, Any] = {"port": 0, "attempts": 4, "initial_backoff_s": 0.5, "max_backoff_s": 2.0, "timeout_s": 3}
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
        target_url="HTTP://Hooks.example.com:8080/x?token=1",
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
