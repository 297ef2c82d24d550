"""Alerts end to end: real Kafka, scorer, Prometheus, Alertmanager and dispatcher; subscribers are local webhooks."""

from __future__ import annotations

import stat
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finpulse.alerting import SPIKE_TOPIC, AlertStack, Subscribers, alerting_available
from finpulse.replay import ReplayProducer, labelled_stream, news_messages, oil_selloff
from learner.config import ModelConfig
from learner.model import Classifier
from monitor.config import MetricsConfig
from monitor.dispatcher import sign
from monitor.metrics import MetricsServer, ScorerMetrics
from storage import History, StorageConfig
from stream.admin import ensure_topics
from stream.config import ScorerConfig, TopicNames
from stream.messages import NewsItem, news_value
from stream.scorer import Scorer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

missing = alerting_available()
if missing:
    pytest.skip(f"Prometheus and Alertmanager are needed: {missing}", allow_module_level=True)


@pytest.fixture
def subscribers() -> Iterator[Subscribers]:
    subs = Subscribers()
    yield subs
    subs.close()


def _wait(predicate: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_negative_spike_reaches_its_subscribers_once_and_resolves(
    kafka_bootstrap: str, adapters_dir: Path, tmp_path: Path, subscribers: Subscribers
) -> None:
    classifier = Classifier.from_store(ModelConfig(adapters_dir=adapters_dir), "cpu")
    # The spike: real bearish oil tweets that the serving model scores negative on the spike topic.
    candidates = oil_selloff()
    scored = classifier.predict([e.text for e in candidates])
    spike_texts = [
        e.text for e, p in zip(candidates, scored, strict=True) if (p.topic, p.sentiment) == (SPIKE_TOPIC, "negative")
    ]
    assert len(spike_texts) >= 30, "the shipped adapters must recognise a real oil sell-off"

    prefix = f"a{uuid.uuid4().hex[:8]}."
    topics = TopicNames(
        raw=prefix + "raw",
        scored=prefix + "scored",
        labels=prefix + "labels",
        dlq=prefix + "dlq",
        updates=prefix + "updates",
    )
    ensure_topics(kafka_bootstrap, [topics.raw, topics.scored, topics.dlq], partitions=3)
    storage = StorageConfig(duckdb_path=tmp_path / "h.duckdb")
    metrics = ScorerMetrics()
    server = MetricsServer(metrics.registry, MetricsConfig(port=0))
    scorer = Scorer(
        kafka_bootstrap,
        topics,
        ScorerConfig(group_id=prefix + "g", max_wait_ms=100),
        classifier,
        History(storage),
        metrics,
    )
    stop = threading.Event()
    scoring = threading.Thread(target=scorer.run, args=(stop,), daemon=True)
    scoring.start()

    stack = AlertStack(tmp_path / "prometheus", storage)
    energy_secret = stack.subscribe("energy-desk", subscribers.serve("energy-desk"), topics=(SPIKE_TOPIC,))
    stack.subscribe("fed-desk", subscribers.serve("fed-desk"), topics=("Fed / Central Banks",))
    stack.subscribe("flaky-desk", subscribers.serve("flaky-desk", fail_first=2), topics=(SPIKE_TOPIC,))
    # A calm lead-in gives Prometheus a baseline, then the sell-off, then calm again until it resolves.
    calm = news_messages(labelled_stream(300))
    tail = ReplayProducer(kafka_bootstrap, topics.raw, calm[150:], rate=3)
    try:
        stack.start([f"127.0.0.1:{server.port}"])
        # Alertmanager reads the dispatcher's generated token from a 0600 file its config names, not from the YAML;
        # anyone else posting to the webhook is refused.
        token_file = stack.alertmanager.token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        config_text = stack.alertmanager.config_file.read_text(encoding="utf-8")
        assert f"credentials_file: {token_file}" in config_text
        assert token_file.read_text(encoding="utf-8").strip() not in config_text
        forged = urllib.request.Request(stack.dispatcher.webhook_url, data=b'{"alerts": []}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=5)
        assert refused.value.code == 401
        assert stack.wait_scraped(), "Prometheus never scraped the scorer"
        ReplayProducer(kafka_bootstrap, topics.raw, calm[:150], rate=15).run()
        spike = [
            (f"spike-{n}".encode(), news_value(NewsItem(f"spike-{n}", text, datetime.now(UTC), "wire", ())))
            for n, text in enumerate(spike_texts[:40])
        ]
        spike_started = time.monotonic()
        ReplayProducer(kafka_bootstrap, topics.raw, spike, rate=8).run()
        tail.start()

        fired = _wait(lambda: subscribers.of("energy-desk", "firing"), 60 + 5, "the firing notification")
        print(f"spike → delivery: {fired - spike_started:.1f} s")
        assert fired - spike_started <= 60
        # The failing subscriber is retried and still gets it; the healthy one was not held up by it.
        flaky_at = _wait(lambda: subscribers.of("flaky-desk", "firing"), 30, "the retried delivery")
        assert subscribers.of("energy-desk", "firing")[0].at < flaky_at
        _wait(lambda: subscribers.of("energy-desk", "resolved"), 150, "the resolved notification")
        time.sleep(3)  # a duplicate would arrive here
    finally:
        stack.stop()  # first: external processes must not outlive a failed test
        tail.stop()
        stop.set()
        scoring.join(timeout=30)
        scorer.close()
        server.close()

    firing = subscribers.of("energy-desk", "firing")
    assert len(firing) == 1, [r.body for r in firing]
    alert = firing[0].body
    # Signed per Standard Webhooks with the secret `subscribe` returned.
    headers = firing[0].headers
    expected = sign(energy_secret, headers["webhook-id"], int(headers["webhook-timestamp"]), firing[0].raw)
    assert headers["webhook-signature"] == expected["webhook-signature"]
    assert headers["idempotency-key"] == headers["webhook-id"]
    assert alert["labels"]["alertname"] == "NegativeSentimentSpike" and alert["labels"]["topic"] == SPIKE_TOPIC
    assert SPIKE_TOPIC in alert["annotations"]["summary"] and "SELECT" in alert["annotations"]["evidence"]
    assert len(subscribers.of("energy-desk", "resolved")) == 1
    # The all-clear states the share now, read from Prometheus, not the numbers it fired on.
    resolved = subscribers.of("energy-desk", "resolved")[0].body["annotations"]
    assert resolved["summary"].startswith(f"Resolved: negative share on {SPIKE_TOPIC} now "), resolved["summary"]
    assert "(when it fired: Negative sentiment on" in resolved["summary"]
    # The last firing evaluation's text (its numbers may have moved on since the first notification).
    assert resolved["fired_summary"].startswith(f"Negative sentiment on {SPIKE_TOPIC}: ")
    assert subscribers.of("fed-desk") == []
    assert len(subscribers.of("flaky-desk", "firing")) == 1

    history = History(storage)
    alerts = history.query("SELECT DISTINCT alertname, topic FROM alerts WHERE alertname = 'NegativeSentimentSpike'")
    assert alerts.rows == [("NegativeSentimentSpike", SPIKE_TOPIC)]
    attempts = dict(
        history.query(
            "SELECT s.name, count(*) FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id "
            "WHERE d.status = 'firing' GROUP BY 1"
        ).rows
    )
    assert attempts.get("flaky-desk") == 3 and attempts.get("energy-desk") == 1 and "fed-desk" not in attempts
