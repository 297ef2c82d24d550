"""A replay of hours-old news through the real Prometheus, once with processing-time rules and once with event time.

The test plays a scorer catching up a backlog: it scores 5½ minutes of news published three hours ago within a
moment, counting each post as the scorer does (the processing-time counter, and `count_published` by its
publication time), and serves those metrics. Two Prometheus servers scrape that one endpoint, one evaluating the
processing-time rules, the other the event-time ones (the fast preset with a 1m window, 2 s scrapes, 10s `for`).

Published over the backlog, in event time (seconds after its start):

    Energy / Oil         0–243 calm (90 of 540 negative), then 270–329 a spike (20 of 40 negative, 50%)
    Fed / Central Banks  30–90 a sell-off (90 of 100 negative), then 90–329 calm (25 of 150 negative)

In processing time all of it lands in one window: the oil spike drowns in the calm minutes before it (20%) and
the Fed sell-off, long over, looks current (46%), so the wrong topic alerts. In event time the window is the
last minute of the backlog: oil is at 50% over a 17% baseline and alerts, the Fed at 16% and does not.
"""

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import AlertRulesConfig, MetricsConfig, PrometheusConfig
from monitor.errors import PrometheusError
from monitor.metrics import MetricsServer, ScorerMetrics
from monitor.prometheus import LocalPrometheus

pytestmark = pytest.mark.slow

OIL, FED = "Energy / Oil", "Fed / Central Banks"
SENTIMENTS = ("negative", "neutral", "positive")
# A 1m window: the spike's last minute of publication time stays in it while the alert's `for` runs, and the
# 5m baseline before it reaches back over the calm start of the backlog.
RULES = AlertRulesConfig.fast(window="1m")
LATE = 5  # oil posts a day older still, from a lagging partition: too late for any event-time window
WAIT_S = 90.0

Post = tuple[float, str, str]  # (seconds after the backlog's start, topic, sentiment)


def backlog() -> list[Post]:
    """Return the backlog's posts, in publication order."""
    posts: list[Post] = []
    posts += [(0.45 * i, OIL, "negative" if i % 6 == 0 else "neutral") for i in range(540)]
    posts += [(270 + 1.5 * i, OIL, "negative" if i % 2 == 0 else "positive") for i in range(40)]
    posts += [(30 + 0.6 * i, FED, "neutral" if i % 10 == 0 else "negative") for i in range(100)]
    posts += [(90 + 1.6 * i, FED, "negative" if i % 6 == 0 else "neutral") for i in range(150)]
    return sorted(posts)


def score(metrics: ScorerMetrics, published_at: datetime, topic: str, sentiment: str) -> None:
    """Count one scored post the way the scorer does: by the time it is scored, and by its publication time."""
    metrics.scored.labels(topic=topic, sentiment=sentiment).inc()
    metrics.count_published(published_at, topic, sentiment)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, LocalPrometheus]]:
    """Yield two unstarted Prometheus servers, one per time base, in temporary dirs; stop both after."""
    pair = {base: LocalPrometheus(PrometheusConfig.fast(data_dir=tmp_path / base)) for base in ("processing", "event")}
    try:
        pair["processing"].binary()
    except PrometheusError as e:
        pytest.skip(str(e))
    try:
        yield pair
    finally:
        for prometheus in pair.values():
            prometheus.stop()


def _value(prometheus: LocalPrometheus, expr: str) -> float | None:
    """Return the single value of an instant query, or None when it is empty."""
    result = prometheus.query(expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def _held(prometheus: LocalPrometheus, record: str, topic: str, since: float) -> tuple[float | None, float | None]:
    """Return the lowest and highest value of `record` (e.g. `negative_share:window`) for `topic` since `since`."""
    series = f'finpulse:topic_{record}{{topic="{topic}"}}[{int(time.time() - since)}s]'
    return _value(prometheus, f"min_over_time({series})"), _value(prometheus, f"max_over_time({series})")


def _firing(prometheus: LocalPrometheus, topic: str) -> Callable[[], dict[str, Any] | None]:
    """Return a probe of the firing NegativeSentimentSpike alert on `topic`."""

    def probe() -> dict[str, Any] | None:
        for alert in prometheus.alerts():
            labels = alert["labels"]
            spike = labels.get("alertname") == "NegativeSentimentSpike" and labels.get("topic") == topic
            if spike and alert["state"] == "firing":
                return alert
        return None

    return probe


def _wait_for(probe: Callable[[], Any], what: str, prometheus: LocalPrometheus) -> Any:
    """Poll `probe` until it returns something; fail after WAIT_S with what Prometheus holds."""
    deadline = time.monotonic() + WAIT_S
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S:.0f} s; alerts: {prometheus.alerts()}"
        time.sleep(0.5)
    return found


def test_a_replayed_backlog_alerts_on_its_own_time_not_on_the_time_it_was_scored(
    servers: dict[str, LocalPrometheus],
) -> None:
    metrics = ScorerMetrics(CollectorRegistry(), rules=RULES.model_copy(update={"time_base": "event"}))
    metrics.declare([OIL, FED], SENTIMENTS)
    endpoint = MetricsServer(metrics.registry, MetricsConfig(port=0))
    try:
        target = f"{endpoint.host}:{endpoint.port}"
        for base, prometheus in servers.items():
            prometheus.start([target], rules=RULES.model_copy(update={"time_base": base}))
        # rate() needs a sample from before the backlog: the counters are scraped at 0 first.
        for prometheus in servers.values():
            _wait_for(lambda p=prometheus: p.query(f'up{{instance="{target}"}} == 1') or None, "a scrape", prometheus)

        start = datetime.fromtimestamp(int(time.time()), UTC) - timedelta(hours=3)
        posts = backlog()
        random.Random(7).shuffle(posts)  # partitions interleave: publication order is not arrival order
        for offset_s, topic, sentiment in posts:
            score(metrics, start + timedelta(seconds=offset_s), topic, sentiment)
        for _ in range(LATE):
            score(metrics, start - timedelta(days=1), OIL, "negative")
        # A scrape during those few milliseconds may see part of the backlog; every evaluation from one scrape
        # interval (2 s, plus a second of slack) after it reads all of it.
        settled = time.time() + 3

        processing, event = servers["processing"], servers["event"]
        # Event time: the spike at the end of the backlog fires, with the numbers of its own minute.
        fired = _wait_for(_firing(event, OIL), "event-time spike alert on oil", event)
        assert fired["labels"]["severity"] == "warning"
        assert fired["annotations"]["summary"] == (
            f"Negative sentiment on {OIL}: 50% of 40 posts in the last 1m vs 17% baseline"
        )
        # Processing time: the sell-off of three hours ago fires as if it were news.
        _wait_for(_firing(processing, FED), "processing-time alert on the old Fed sell-off", processing)

        # Both servers have now evaluated the whole backlog for about `for`: each share held one value meanwhile.
        assert time.time() - settled >= 4, "fewer than two evaluations since the backlog was scored"
        assert _held(event, "negative_share:window", OIL, settled) == (0.5, 0.5)
        assert _held(event, "negative_share:baseline", OIL, settled) == (pytest.approx(1 / 6), pytest.approx(1 / 6))
        assert _held(event, "volume:window", OIL, settled) == (40, 40)
        assert _held(event, "negative_share:window", FED, settled) == (pytest.approx(6 / 38), pytest.approx(6 / 38))
        assert _value(event, "max(finpulse_event_late_messages_total)") == LATE
        # The late posts count in processing time: 115 of 585 oil posts negative, 115 of 250 Fed ones.
        assert _held(processing, "negative_share:window", OIL, settled) == (
            pytest.approx(115 / 585),
            pytest.approx(115 / 585),
        )
        assert _held(processing, "negative_share:window", FED, settled) == (
            pytest.approx(115 / 250),
            pytest.approx(115 / 250),
        )

        # Neither server ever held the other topic's alert, not even pending.
        for prometheus, topic in ((event, FED), (processing, OIL)):
            assert prometheus.query(f'ALERTS{{alertname="NegativeSentimentSpike", topic="{topic}"}}[5m]') == []
        # The scorer keeps the windows the event-time rules read.
        assert not [a for a in event.alerts() if a["labels"]["alertname"] == "EventWindowsMismatch"]
    finally:
        endpoint.close()
