"""Prometheus metrics of the scorer, each set in its own registry so tests and processes stay apart."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
            "finpulse_last_batch_timestamp_seconds", "Unix time the last batch was committed.", registry=r
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
