"""Prometheus metrics of the scorer, each set in its own registry so tests and processes stay apart."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from learner.domains import DEFAULT_DOMAIN
from learner.tasks import task_names
from monitor.config import AlertRulesConfig, MetricsConfig, duration_seconds
from monitor.errors import MonitorError

# Batches on a CPU take 0.05–2 s, on a GPU 1–50 ms: buckets cover both.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Published → scored spans sub-second (live) to days (replays of history).
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
SIZE_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 4096)


class ScorerMetrics:
    """What a scorer exposes: throughput by topic and sentiment, dead letters, latency, lag, model versions.

    Given alert `rules` with `time_base="event"`, it also keeps the event-time windows those rules read
    (`EventWindows`, fed by `count_published`) and exports them at every scrape.
    """

    def __init__(self, registry: CollectorRegistry | None = None, rules: AlertRulesConfig | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.event_windows: EventWindows | None = None
        if rules is not None and rules.time_base == "event":
            self.event_windows = EventWindows(duration_seconds(rules.window), duration_seconds(rules.baseline_window))
            r.register(EventWindowCollector(self.event_windows))
        self._watched: frozenset[str] = frozenset()
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
            "Adapter version serving each task in each domain with its own (value 1); other domains are served "
            'the domain="default" one.',
            ["task", "domain", "version"],
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
        self._versions: set[tuple[str, str, str]] = set()

    def declare(self, topics: Iterable[str], sentiments: Iterable[str], tickers: Iterable[str] = ()) -> None:
        """Export every topic × sentiment (and ticker × sentiment) series at 0 before the first message.

        `rate()` needs two samples of a series: one that first appears at 5 would hide those first 5.
        """
        sentiments = tuple(sentiments)
        tickers = tuple(tickers)
        self._watched = frozenset(tickers)
        for topic in topics:
            for sentiment in sentiments:
                self.scored.labels(topic=topic, sentiment=sentiment)
        for ticker in tickers:
            for sentiment in sentiments:
                self.ticker_scored.labels(ticker=ticker, sentiment=sentiment)

    def count_published(self, published_at: datetime, topic: str, sentiment: str, tickers: Iterable[str] = ()) -> None:
        """Count one scored post in the event-time windows by its publication time; without them, do nothing.

        Of `tickers`, only those of the watchlist given to `declare` count, as in `finpulse_ticker_messages_scored`.
        """
        if self.event_windows is None:
            return
        keys = [("topic", topic, sentiment)]
        keys.extend(("ticker", ticker, sentiment) for ticker in self._watched.intersection(tickers))
        self.event_windows.add(published_at.timestamp(), keys)

    def declare_stages(self, stages: Iterable[str]) -> None:
        """Export the retry and pause series of every stage at 0, so that `increase()` sees the first one."""
        for stage in stages:
            self.retries.labels(stage=stage)
            self.paused.labels(stage=stage).set(0)
            self.paused_seconds.labels(stage=stage)

    def set_versions(self, versions: Mapping[str, Mapping[str, str]]) -> None:
        """Expose the serving versions, task → domain → version, dropping the series of those no longer served."""
        serving = {
            (task, domain, version) for task, by_domain in versions.items() for domain, version in by_domain.items()
        }
        for gone in self._versions - serving:
            self.model_info.remove(*gone)
        for task, domain, version in serving - self._versions:
            self.model_info.labels(task=task, domain=domain, version=version).set(1)
        self._versions = serving

    def set_consumer_lag(self, lags: dict[int, int]) -> None:
        """Set the lag of every assigned partition; partitions no longer assigned are dropped."""
        self.consumer_lag.clear()
        for partition, lag in lags.items():
            self.consumer_lag.labels(partition=str(partition)).set(lag)


# -- event time ---------------------------------------------------------------------------------------------

# The window is 60 buckets, so its edges move in steps of a sixtieth of it (5 s for 5m, 0.5 s for the fast
# preset's 30s): a post is never more than that far outside the window it is counted in.
WINDOW_BUCKETS = 60
Key = tuple[str, str, str]  # (family, subject, sentiment), e.g. ("topic", "Earnings", "negative")


@dataclass(frozen=True)
class WindowCounts:
    """What the event-time windows hold at one moment: posts per key in the window and in its baseline."""

    watermark: float | None  # Unix time the windows end at; None until the first post
    coverage_s: float  # publication time counted since the first post: the watermark's advance since then
    window: dict[Key, int]
    baseline: dict[Key, int]
    late: int  # posts counted in no window: published before the oldest bucket kept


class EventWindows:
    """Counts of posts per key in sliding windows of publication time, ending at the newest post seen.

    The watermark is the latest publication time seen, never past the wall clock: a post stamped in the future
    counts as published now, so that a producer's clock running ahead cannot drag the windows forward (and
    empty them of everything else). The window holds the `WINDOW_BUCKETS` buckets up to the watermark's,
    the baseline the buckets of `baseline_s` before it: the baseline ends where the window starts, as the
    processing-time baseline does with its `offset`. A post may arrive in any order while it falls into a kept
    bucket; one published earlier counts as late and in no window.

    The buckets sit in a ring of exactly the kept span, each slot remembering which bucket it holds: adding a
    post is O(1), memory is bounded whatever timestamps arrive, and a slot is reused only once its bucket has
    left the kept span. The windows keep counting for `window_s` of wall time after the watermark last moved,
    then read as empty: once the news stops, spike alerts resolve as they do in processing time, instead of
    holding the last window forever.

    The counts live in the scorer's memory, so a restarted scorer starts empty; its coverage (how much
    publication time it has counted) tells the rules when its baseline is whole again.
    """

    def __init__(self, window_s: float, baseline_s: float, clock: Callable[[], float] = time.time) -> None:
        """Take the window and baseline lengths in seconds, and the wall clock (Unix seconds)."""
        if window_s <= 0 or baseline_s <= 0:
            raise ValueError(f"window_s ({window_s:g}) and baseline_s ({baseline_s:g}) must be above zero")
        self.window_s = window_s
        self.baseline_s = baseline_s
        self.bucket_s = window_s / WINDOW_BUCKETS
        # Rounded up, so that the baseline is never shorter than asked; round() first absorbs float noise
        # such as 300 / 0.5 = 599.9999….
        self._baseline_n = math.ceil(round(baseline_s / self.bucket_s, 6))
        self._size = WINDOW_BUCKETS + self._baseline_n
        self._clock = clock
        self._held: list[int | None] = [None] * self._size  # the bucket number each slot holds
        self._counts: list[Tally[Key]] = [Tally() for _ in range(self._size)]
        self._watermark: float | None = None
        self._first: float | None = None  # the first watermark, where coverage starts
        self._moved_at = 0.0
        self._late = 0
        # add() runs on the scorer's thread, snapshot() on the /metrics server's.
        self._lock = threading.Lock()

    def add(self, published_at: float, keys: Iterable[Key]) -> bool:
        """Count one post published at `published_at` (Unix seconds) under each key; return False if late."""
        now = self._clock()
        at = min(published_at, now)
        with self._lock:
            if self._watermark is None or at > self._watermark:
                self._watermark = at
                self._moved_at = now
                if self._first is None:
                    self._first = at
            bucket = self._bucket(at)
            if bucket <= self._bucket(self._watermark) - self._size:
                self._late += 1
                return False
            slot = bucket % self._size
            if self._held[slot] != bucket:
                # Whatever the slot held lies a whole ring (or more) back: it has left the kept span.
                self._held[slot] = bucket
                self._counts[slot].clear()
            self._counts[slot].update(keys)
            return True

    def snapshot(self) -> WindowCounts:
        """Return the counts in the window and in the baseline as of now."""
        window: Tally[Key] = Tally()
        baseline: Tally[Key] = Tally()
        with self._lock:
            watermark = self._watermark
            coverage_s = 0.0 if watermark is None or self._first is None else watermark - self._first
            if watermark is not None and self._clock() - self._moved_at <= self.window_s:
                top = self._bucket(watermark)
                for held, counts in zip(self._held, self._counts, strict=True):
                    if held is None:
                        continue
                    # Buckets back from the watermark's (0 is its own); never negative, as every post is
                    # kept at or before the watermark.
                    age = top - held
                    if age < WINDOW_BUCKETS:
                        window.update(counts)
                    elif age < self._size:
                        baseline.update(counts)
            late = self._late
        return WindowCounts(watermark, coverage_s, dict(window), dict(baseline), late)

    def _bucket(self, at: float) -> int:
        return math.floor(at / self.bucket_s)


class EventWindowCollector(Collector):
    """Exports a scorer's event-time windows, computed at every scrape.

    Every scorer owns its own partitions, so each post is counted by one scorer only and the sums over
    instances that the rules take are right. Each scorer's windows end at its own watermark, though: a scorer
    catching up a backlog contributes older posts than one that is live, until it has caught up.
    """

    def __init__(self, windows: EventWindows) -> None:
        """Take the windows to export."""
        self._windows = windows

    def describe(self) -> Iterator[Metric]:
        """Name the families without computing them."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Sum the buckets into the window and baseline counts and export them, with the watermark."""
        counts = self._windows.snapshot()
        topics, tickers, lengths, watermark, coverage, late = self._families()
        by_family = {"topic": topics, "ticker": tickers}
        for which, held in (("window", counts.window), ("baseline", counts.baseline)):
            for (family, subject, sentiment), n in sorted(held.items()):
                by_family[family].add_metric([subject, sentiment, which], n)
        lengths.add_metric(["window"], self._windows.window_s)
        lengths.add_metric(["baseline"], self._windows.baseline_s)
        coverage.add_metric([], counts.coverage_s)
        late.add_metric([], counts.late)
        yield from (topics, tickers, lengths)
        if counts.watermark is not None:
            watermark.add_metric([], counts.watermark)
            yield watermark
        yield from (coverage, late)

    def _families(
        self,
    ) -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
    ]:
        """Return the families, empty."""
        ranges = 'window="window": the window ending at the watermark; "baseline": the span before it'
        return (
            GaugeMetricFamily(
                "finpulse_event_window_messages",
                f"Posts scored per topic and sentiment, by publication time ({ranges}).",
                labels=["topic", "sentiment", "window"],
            ),
            GaugeMetricFamily(
                "finpulse_ticker_event_window_messages",
                f"Posts scored per watched ticker and sentiment, by publication time ({ranges}).",
                labels=["ticker", "sentiment", "window"],
            ),
            GaugeMetricFamily(
                "finpulse_event_window_seconds",
                "Length of the event-time window and of its baseline this scorer keeps.",
                labels=["window"],
            ),
            GaugeMetricFamily(
                "finpulse_event_watermark_timestamp_seconds",
                "Latest publication time this scorer has scored (Unix time, at most its clock): where its "
                "event-time windows end. Each scorer has its own.",
            ),
            GaugeMetricFamily(
                "finpulse_event_window_coverage_seconds",
                "Publication time this scorer has counted since it started (its watermark's advance): below "
                "window + baseline, its baseline is partial, as after a restart.",
            ),
            CounterMetricFamily(
                "finpulse_event_late_messages",
                "Posts scored too late for the event-time windows: published before the oldest span kept "
                "(window + baseline before the watermark), so counted in neither.",
            ),
        )


# Outcomes of model_events; the ModelVersionRejected / ModelRolledBack alert rules select on them.
MODEL_OUTCOMES = ("promoted", "rejected", "rolled_back")
_log = logging.getLogger(__name__)


class ModelVersionCollector(Collector):
    """Exports the model registry's event counts and champions, read from DuckDB at every scrape.

    Read at scrape time instead of counted in memory so that CLI promotions and rollbacks count too and a
    restart does not reset the counter: `finpulse_model_versions_total{task,domain,outcome}` is the number
    of logged events, which never goes down. Every task x outcome of the default domain is exported from 0,
    so the first event is an increase that `increase()` sees; another domain's task is exported from 0 once
    it has an event or a champion, and kept from then on, so its next event is an increase too.
    Register it with `registry.register(ModelVersionCollector(...))`.
    """

    def __init__(
        self,
        counts: Callable[[], dict[tuple[str, str, str], int]],
        champions: Callable[[], dict[tuple[str, str], str]] | None = None,
        tasks: Iterable[str] | None = None,
    ) -> None:
        """Take the functions that read event counts per (task, domain, outcome) and, optionally, the champion
        of each (task, domain); export `tasks` (default: every registered one) from 0 in the default domain."""
        self._counts = counts
        self._champions = champions
        self._tasks = tuple(tasks) if tasks is not None else task_names()
        self._last_counts: dict[tuple[str, str, str], int] = {}
        self._last_champions: dict[tuple[str, str], str] = {}
        # Only grows: a domain's series must not vanish when its champion is withdrawn or a read fails.
        self._exported: set[tuple[str, str]] = {(task, DEFAULT_DOMAIN) for task in self._tasks}

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
        self._exported.update((task, domain) for task, domain, _ in self._last_counts)
        self._exported.update(self._last_champions)
        versions, champion = self._families()
        counts = {(task, domain, outcome): 0 for task, domain in self._exported for outcome in MODEL_OUTCOMES}
        counts.update(self._last_counts)
        for (task, domain, outcome), count in sorted(counts.items()):
            versions.add_metric([task, domain, outcome], count)
        yield versions
        if self._champions is not None:
            for (task, domain), version in sorted(self._last_champions.items()):
                champion.add_metric([task, domain, version], 1)
            yield champion

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        """Return the two families, empty."""
        return (
            CounterMetricFamily(
                "finpulse_model_versions",
                "Adapter versions promoted, rejected or rolled back, by task, domain and outcome (from DuckDB).",
                labels=["task", "domain", "outcome"],
            ),
            GaugeMetricFamily(
                "finpulse_model_champion_info",
                "Champion adapter version of each task in each domain as the registry records it (value 1).",
                labels=["task", "domain", "version"],
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
