"""Prometheus metrics of the scorer, each set in its own registry so tests and processes stay apart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from learner.labels import TASKS
from monitor.config import MetricsConfig
from monitor.errors import MonitorError

# Batches on a CPU take 0.05–2 s, on a GPU 1–50 ms: buckets cover both.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Published → scored spans sub-second (live) to days (replays of history).
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
SIZE_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 4096)


class ScorerMetrics:
    """What a scorer exposes: throughput by topic and sentiment, dead letters, latency, lag, model versions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.scored = Counter(
            "finpulse_messages_scored",
            "Messages scored, by predicted topic and sentiment.",
            ["topic", "sentiment"],
            registry=r,
        )
        self.dead_letters = Counter(
            "finpulse_dead_letters",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter("finpulse_duplicates", "Messages whose id was already stored.", registry=r)
        self.ticker_scored = Counter(
            "finpulse_ticker_messages_scored",
            "Messages scored that mention a watchlist ticker, by ticker and sentiment.",
            ["ticker", "sentiment"],
            registry=r,
        )
        self.consumed = Counter("finpulse_messages_consumed", "Messages read from the raw topic.", registry=r)
        # Kept apart from finpulse_messages_scored, so the sentiment rules never count a text the model could
        # not read.
        self.unread = Counter(
            "finpulse_messages_unread",
            "Messages stored without a model answer because the encoder cannot read them, by outcome "
            "(unsupported_language, unreadable) and language.",
            ["outcome", "language"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "finpulse_batch_seconds",
            "Wall time to handle one batch, by stage.",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "finpulse_batch_size", "Messages per scored batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.e2e_lag = Histogram(
            "finpulse_end_to_end_lag_seconds",
            "Time from published_at to scored.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.pipeline_lag = Histogram(
            "finpulse_pipeline_lag_seconds",
            "Time from the Kafka record timestamp (produced) to scored.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "finpulse_consumer_lag",
            "Messages behind the end of each assigned partition.",
            ["partition"],
            registry=r,
        )
        self.model_info = Gauge(
            "finpulse_model_version_info",
            "Adapter version serving each task (value 1).",
            ["task", "version"],
            registry=r,
        )
        self.last_batch = Gauge(
            "finpulse_last_batch_timestamp_seconds", "Unix time the last batch was handled.", registry=r
        )
        # Starts at the process's start, so that ScorerStalled measures "no commit for N s" from there.
        self.last_commit = Gauge(
            "finpulse_last_commit_timestamp_seconds",
            "Unix time this scorer last committed offsets (its start time until the first commit).",
            registry=r,
        )
        self.last_commit.set_to_current_time()
        self.retries = Counter(
            "finpulse_stage_retries", "Batch stages retried after a failure, by stage.", ["stage"], registry=r
        )
        self.paused = Gauge(
            "finpulse_scorer_paused",
            "1 while consumption is paused because a stage's server is down, by stage.",
            ["stage"],
            registry=r,
        )
        self.paused_seconds = Counter(
            "finpulse_scorer_paused_seconds", "Seconds spent paused for an outage, by stage.", ["stage"], registry=r
        )
        self.broker_up = Gauge(
            "finpulse_broker_up", "1 while the Kafka cluster answers this scorer's lag checks.", registry=r
        )
        self._versions: dict[str, str] = {}

    def declare(self, topics: Iterable[str], sentiments: Iterable[str], tickers: Iterable[str] = ()) -> None:
        """Export every topic × sentiment (and ticker × sentiment) series at 0 before the first message.

        `rate()` needs two samples of a series: one that first appears at 5 would hide those first 5.
        """
        sentiments = tuple(sentiments)
        for topic in topics:
            for sentiment in sentiments:
                self.scored.labels(topic=topic, sentiment=sentiment)
        for ticker in tickers:
            for sentiment in sentiments:
                self.ticker_scored.labels(ticker=ticker, sentiment=sentiment)

    def declare_stages(self, stages: Iterable[str]) -> None:
        """Export the retry and pause series of every stage at 0, so that `increase()` sees the first one."""
        for stage in stages:
            self.retries.labels(stage=stage)
            self.paused.labels(stage=stage).set(0)
            self.paused_seconds.labels(stage=stage)

    def set_versions(self, versions: dict[str, str]) -> None:
        """Expose the serving versions, dropping the series of versions no longer served."""
        for task, version in versions.items():
            old = self._versions.get(task)
            if old == version:
                continue
            if old is not None:
                self.model_info.remove(task, old)
            self.model_info.labels(task=task, version=version).set(1)
            self._versions[task] = version

    def set_consumer_lag(self, lags: dict[int, int]) -> None:
        """Set the lag of every assigned partition; partitions no longer assigned are dropped."""
        self.consumer_lag.clear()
        for partition, lag in lags.items():
            self.consumer_lag.labels(partition=str(partition)).set(lag)


# Outcomes of model_events; the ModelVersionRejected / ModelRolledBack alert rules select on them.
MODEL_OUTCOMES = ("promoted", "rejected", "rolled_back")
_log = logging.getLogger(__name__)


class ModelVersionCollector(Collector):
    """Exports the model registry's event counts and champions, read from DuckDB at every scrape.

    Read at scrape time instead of counted in memory so that CLI promotions and rollbacks count too and a
    restart does not reset the counter: `finpulse_model_versions_total{task,outcome}` is the number of
    logged events, which never goes down. Every task x outcome is exported from 0, so the first event is
    an increase that `increase()` sees. Register it with `registry.register(ModelVersionCollector(...))`.
    """

    def __init__(
        self,
        counts: Callable[[], dict[tuple[str, str], int]],
        champions: Callable[[], dict[str, str]] | None = None,
        tasks: Iterable[str] = TASKS,
    ) -> None:
        """Take the functions that read event counts per (task, outcome) and, optionally, the champions."""
        self._counts = counts
        self._champions = champions
        self._tasks = tuple(tasks)
        self._last_counts: dict[tuple[str, str], int] = {}
        self._last_champions: dict[str, str] = {}

    def describe(self) -> Iterator[Metric]:
        """Name the families without reading DuckDB, so that registering the collector costs nothing."""
        versions, champion = self._families()
        yield versions
        if self._champions is not None:
            yield champion

    def collect(self) -> Iterator[Metric]:
        """Read the counts (and champions) and export them; on a read error, the last values read."""
        try:
            self._last_counts = dict(self._counts())
            if self._champions is not None:
                self._last_champions = dict(self._champions())
        except Exception as e:  # a locked or unreadable file must not fail the whole scrape
            _log.warning("model version metrics not refreshed: %s", e)
        versions, champion = self._families()
        counts = {(task, outcome): 0 for task in self._tasks for outcome in MODEL_OUTCOMES}
        counts.update(self._last_counts)
        for (task, outcome), count in sorted(counts.items()):
            versions.add_metric([task, outcome], count)
        yield versions
        if self._champions is not None:
            for task, version in sorted(self._last_champions.items()):
                champion.add_metric([task, version], 1)
            yield champion

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        """Return the two families, empty."""
        return (
            CounterMetricFamily(
                "finpulse_model_versions",
                "Adapter versions promoted, rejected or rolled back, by task and outcome (from DuckDB).",
                labels=["task", "outcome"],
            ),
            GaugeMetricFamily(
                "finpulse_model_champion_info",
                "Champion adapter version of each task as the registry records it (value 1).",
                labels=["task", "version"],
            ),
        )


class MetricsServer:
    """The HTTP endpoint serving one registry at /metrics."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig) -> None:
        try:
            server, thread = start_http_server(config.port, addr=config.host, registry=registry)
        except OSError as e:
            raise MonitorError(
                f"cannot serve /metrics on {config.host}:{config.port}: {e.strerror}; "
                "set metrics.port to a free port (0 picks one)"
            ) from e
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.host = config.host
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        """Return the address of the metrics page."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
