"""`finpulse demo`: replay a real labelled stream through the whole pipeline and summarise what happened."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from finpulse.alerting import SPIKE_TOPIC, AlertStack, Received, Subscribers, alerting_available
from finpulse.analysts import LearningOutcome, await_swap, label_and_learn
from finpulse.config import AppConfig
from finpulse.replay import ReplayProducer, labelled_stream, malformed_values, news_messages, selloff
from finpulse.runtime import Cluster, build_scorer, connect
from learner.labels import SENTIMENTS
from learner.metrics import accuracy, macro_f1
from monitor.config import AlertRulesConfig
from monitor.metrics import MetricsServer
from storage import History
from storage.history import lake_dir_of
from stream.admin import delete_topics, ensure_topics
from stream.config import TopicNames
from stream.connection import Target
from stream.scorer import ScorerStats

# How many already-sent messages the demo sends again, to show that duplicates become no new rows.
DUPLICATES = 5
ENERGY_DESK = "energy-desk"
FED_DESK = "fed-desk"
# The fast alert preset fires ~15-30 s after a spike and resolves ~30-45 s after it ends.
ALERT_WAIT_S = 90.0
# The replayed tweets' source and the domain the demo maps it to: what the analysts' labels teach.
DEMO_SOURCE = "stock-market-tweets"
DEMO_DOMAIN = "stocktweets"
# The share of the labelled stream the analysts label (the first tweets); the rest measures before and after.
# Measured offline on the stock tweets with the shipped champion (one seed, the learner's default 3 passes): 600
# labels (480 trained on) took the last 400 tweets from 0.508 to 0.668, 700 the last 300 from 0.500 to 0.687.
# More passes overfit these labels: 5 passes gave 0.655 and 0.650 on the same cuts, 10 gave 0.630.
LABELLED_SHARE = 0.6
# The scorer's largest batch in the demo. Its stats (and so the live view) move once per batch; at the default
# 512 the first part is two batches and the view jumps from 0 to 512 to all. On 2 CPU cores a batch of 64 takes
# about 0.5 s, two of the view's 0.25 s refreshes, so the counts climb in 20 steps. Measured on the full demo:
# the same counts, alert and accuracies (one borderline tweet of 1,130 took the other label), the first part
# scored at 96 msg/s instead of 175 (8 s instead of 5, of a two-minute run); `finpulse bench score` measures
# throughput at the service's own batch size.
DEMO_MAX_BATCH = 64


@dataclass(frozen=True)
class DemoSummary:
    """The outcome of one demo run."""

    messages: int
    scored: int
    dead_lettered: int
    duplicates: int
    unread: int  # stored as unsupported_language or unreadable: no model answer, out of the sentiment metrics
    throughput_per_s: float
    elapsed_s: float
    sentiment_accuracy: float
    sentiment_macro_f1: float
    labelled: int
    versions: dict[str, str]
    # The closed loop: accuracy on the tweets after the analysts' slice, served by the default champion (before)
    # and by the domain's new champion (after, as scored live); None when the demo did not learn.
    sentiment_accuracy_before: float | None
    sentiment_accuracy_after: float | None
    # Expected calibration error (15 bins) of the same two, from the calibrated probabilities: the rows' for after.
    sentiment_ece_before: float | None
    sentiment_ece_after: float | None
    promoted: bool
    learning: dict[str, Any] | None
    duckdb_path: str
    metrics_url: str | None
    sample_query: str
    bootstrap_servers: str
    alerts: dict[str, Any] | None
    # Every alert the dispatcher received firing during the run, whoever it was routed to.
    fired: list[dict[str, Any]]


# The stored sentiment probabilities, in SENTIMENTS order.
_PROBABILITIES = tuple(f"sentiment_{label}" for label in SENTIMENTS)


def demo_topics(run_id: str) -> TopicNames:
    """Return the run's own topics, so a demo never mixes with an earlier one."""
    return TopicNames.prefixed(f"demo.{run_id}.")


def run_demo(
    config: AppConfig,
    messages: int,
    rate: float,
    console: Console,
    quiet: bool = False,
    alerts: bool = True,
    learn: bool = True,
) -> DemoSummary:
    """Start what is needed, replay `messages` labelled items (+ bad input, duplicates and an oil sell-off), score,
    have analysts label the first part and the learner learn it for the stream's domain (with `learn`), score the
    rest with what it learnt, show the spike alert reaching a subscriber, and summarise."""
    run_id = uuid.uuid4().hex[:8]
    db_path = demo_db_path(config)
    for stale in (db_path, db_path.with_name(db_path.name + ".wal")):
        stale.unlink(missing_ok=True)
    # The demo's lake too: the same tweets again would all be duplicates of the last run's rows.
    shutil.rmtree(lake_dir_of(db_path), ignore_errors=True)
    topics = demo_topics(run_id)
    # The demo's own copy of the adapters: what its learner promotes never reaches the real ones.
    adapters = db_path.with_name("demo-adapters")
    shutil.rmtree(adapters, ignore_errors=True)
    shutil.copytree(config.model.adapters_dir, adapters, ignore=shutil.ignore_patterns(".tmp-*", "*.tmp"))
    model = config.model.model_copy(
        update={"adapters_dir": adapters, "domains": {**config.model.domains, DEMO_SOURCE: DEMO_DOMAIN}}
    )
    config = config.model_copy(
        update={
            "model": model,
            # The demo's own lake beside demo.duckdb, whatever lake the config names for real use.
            "storage": config.storage.model_copy(update={"duckdb_path": db_path, "lake": None}),
            "kafka": config.kafka.model_copy(update={"topics": topics}),
            # A smaller scorer.max_batch given to the demo is kept; a larger one would hide the progress again.
            "scorer": config.scorer.model_copy(
                update={"group_id": f"demo-{run_id}", "max_batch": min(config.scorer.max_batch, DEMO_MAX_BATCH)}
            ),
            # Any free port: a second demo, or a scorer already on 9464, must not stop this one.
            "metrics": config.metrics.model_copy(update={"port": 0}),
            # The compressed-time rules (a 30 s window), in the time base the config asks for.
            "alerts": AlertRulesConfig.fast().model_copy(update={"time_base": config.alerts.time_base}),
        }
    )
    pace = "full speed" if rate == 0 else f"{rate:g}/s"
    console.print(f"[bold]finpulse demo[/] run {run_id}: {messages} messages at {pace}")
    cluster: Cluster = connect(config)
    console.print(f"Kafka: {cluster.bootstrap_servers} ({'local broker' if cluster.local else 'configured cluster'})")
    t = topics
    ensure_topics(cluster.connection, [t.raw, t.scored, t.dlq, t.labels, t.updates], config.kafka.partitions)

    items = labelled_stream(messages)
    spike = selloff(items[-1].item.published_at if items else datetime.now(UTC))
    labels = {li.item.id: li.sentiment for li in items + spike if li.sentiment is not None}
    # The analysts label the first tweets of the stream; the later ones show what their labels taught.
    cut = int(len(items) * LABELLED_SHARE) if learn else len(items)
    first, later = items[:cut], items[cut:]
    originals = news_messages(items)
    part_one = news_messages(first)
    # A key on every bad message: a tombstone (no value) needs one to be produced at all.
    bad = [(f"bad-{n}".encode(), value) for n, (_, value) in enumerate(malformed_values(config.scorer.max_text_bytes))]
    # Spread the bad input and the re-sent duplicates through the stream, as they would arrive in life.
    for n, message in enumerate(bad):
        part_one.insert((n + 1) * len(part_one) // (len(bad) + 1), message)
    part_two = news_messages(later)
    part_two.extend(originals[i * len(originals) // DUPLICATES] for i in range(min(DUPLICATES, len(originals))))
    expected = len(part_one) + len(part_two) + len(spike)

    console.print("Loading the model…")
    scorer, server = build_scorer(config, cluster)
    if server is not None:
        console.print(f"Metrics: {server.url}")
    stack, subscribers = _start_alerting(config, server, console) if alerts else (None, None)
    # The sell-off follows the first part: its alert fires and resolves before the learning round, against the
    # baseline of the stream so far (a learning round later in the window would make the stock tweets it teaches
    # part of the sell-off's baseline).
    replay_one = _Replay(cluster.connection, t.raw, part_one, news_messages(spike), rate)
    replay_two = _Replay(cluster.connection, t.raw, part_two, [], rate)
    started = time.perf_counter()
    stop = threading.Event()
    alert: AlertOutcome | None = None
    learning: LearningOutcome | None = None
    learn_s = 0.0
    throughput = 0.0

    def sent() -> int:
        return replay_one.sent + replay_two.sent

    def score_until(target: int, replay: _Replay) -> ScorerStats:
        def done(stats: ScorerStats) -> bool:
            if replay.error is not None:
                raise replay.error
            return stats.consumed >= target

        with Live(
            _progress(scorer.stats, sent(), expected), console=console, refresh_per_second=4, transient=quiet
        ) as live:
            finished = threading.Event()

            def refresh() -> None:
                while not finished.wait(0.25):
                    live.update(_progress(scorer.stats, sent(), expected))

            painter = threading.Thread(target=refresh, daemon=True)
            painter.start()
            try:
                stats = scorer.run(stop, until=done)
            finally:
                finished.set()
                painter.join()
            live.update(_progress(stats, sent(), expected))
        return stats

    try:
        replay_one.start()
        stats = score_until(len(part_one) + len(spike), replay_one)
        # Of the first part, scored at full speed: later waits (the alert, the learning round) are not scoring.
        throughput = stats.throughput_per_s
        if stack is not None and subscribers is not None:
            # Keep scoring (and serving /metrics) while Prometheus evaluates: a scorer that vanished would
            # turn the spike into a ScorerDown.
            pause = threading.Event()
            scoring = threading.Thread(target=scorer.run, args=(pause,), name="demo-scorer", daemon=True)
            scoring.start()
            try:
                alert = _await_alert(subscribers, replay_one, console)
            finally:
                pause.set()
                scoring.join(timeout=30)
        if learn and first:
            learn_started = time.perf_counter()
            learning = label_and_learn(
                config, cluster.connection, first, DEMO_DOMAIN, f"demo-learner-{run_id}", console
            )
            if learning.promoted and learning.version is not None:
                if await_swap(scorer, DEMO_DOMAIN, learning.version):
                    console.print(f"learning: the scorer serves {learning.version} to domain {DEMO_DOMAIN}")
                else:
                    console.print(f"learning: the scorer did not swap in {learning.version} within 120 s")
            learn_s = time.perf_counter() - learn_started
        replay_two.start()
        stats = score_until(expected, replay_two)
        console.print()
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        if stack is not None:
            stack.stop()
        if subscribers is not None:
            subscribers.close()
        scorer.close()
        if server is not None:
            server.close()
        replay_one.join(timeout=10)
        replay_two.join(timeout=10)

    history = History(config.storage)
    history.ensure_schema()  # the state file too, for `finpulse query` on alerts after a run without alerts
    stored = history.query(f"SELECT id, sentiment, {', '.join(_PROBABILITIES)} FROM news").rows
    predicted: dict[str, str] = {str(row[0]): str(row[1]) for row in stored}
    probabilities = {str(row[0]): [float(str(p)) for p in row[2:]] for row in stored}
    gold_ids = [i for i in labels if i in predicted]
    gold = [labels[i] for i in gold_ids]
    guess = [str(predicted[i]) for i in gold_ids]
    before = after = ece_before = ece_after = None
    if learning is not None:
        judged = [li for li in later if li.sentiment is not None and li.item.id in predicted]
        truth = [str(li.sentiment) for li in judged]
        # What the default champion gives these tweets (the scorer's own engine, default domain) against what
        # the stream was served after the promotion.
        default = scorer.classifier.predict([li.item.text for li in judged])
        before = round(accuracy(truth, [p.sentiment for p in default]), 4)
        after = round(accuracy(truth, [str(predicted[li.item.id]) for li in judged]), 4)
        ece_before = calibration_error([[p.sentiment_scores[s] for s in SENTIMENTS] for p in default], truth)
        ece_after = calibration_error([probabilities[li.item.id] for li in judged], truth)
    delete_topics(cluster.connection, [t.raw, t.scored, t.dlq, t.labels, t.updates])
    fired = [
        {"alertname": str(name), "about": str(about), "severity": str(severity), "notifications": int(str(n))}
        for name, about, severity, n in history.query(
            "SELECT alertname, coalesce(topic, ticker, '') AS about, max(severity) AS severity, count(*) AS n "
            "FROM alerts WHERE status = 'firing' GROUP BY ALL ORDER BY min(received_at)"
        ).rows
    ]
    sample = (
        "SELECT sentiment, count(*) AS n, round(avg(sentiment_confidence), 3) AS confidence "
        "FROM news GROUP BY 1 ORDER BY 2 DESC"
    )
    return DemoSummary(
        messages=len(items) + len(spike),
        scored=stats.scored,
        dead_lettered=stats.dead_lettered,
        duplicates=stats.duplicates,
        unread=stats.unread,
        throughput_per_s=round(throughput, 1),
        elapsed_s=round(elapsed, 2),
        sentiment_accuracy=round(accuracy(gold, guess), 4),
        sentiment_macro_f1=round(macro_f1(gold, guess, SENTIMENTS), 4),
        labelled=len(gold),
        versions=scorer.classifier.versions,
        sentiment_accuracy_before=before,
        sentiment_accuracy_after=after,
        sentiment_ece_before=ece_before,
        sentiment_ece_after=ece_after,
        promoted=learning.promoted if learning is not None else False,
        learning=(
            {**asdict(learning), "later_labelled": len(later), "extra_s": round(learn_s, 1)}
            if learning is not None
            else None
        ),
        duckdb_path=str(db_path.resolve()),
        metrics_url=server.url if server is not None else None,
        sample_query=sample,
        bootstrap_servers=cluster.bootstrap_servers,
        alerts=asdict(alert) if alert is not None else None,
        fired=fired,
    )


@dataclass(frozen=True)
class AlertOutcome:
    """What the demo's subscribers saw of the sell-off."""

    topic: str
    subscriber: str
    fired_after_s: float | None  # from the first sell-off message to the subscriber's webhook
    resolved_after_s: float | None
    summary: str | None
    other_subscriber_notifications: int


class _Replay(threading.Thread):
    """Produce the labelled stream, then the sell-off, remembering when the sell-off began."""

    def __init__(
        self,
        bootstrap: Target,
        topic: str,
        stream: list[tuple[bytes | None, bytes | None]],
        spike: list[tuple[bytes | None, bytes | None]],
        rate: float,
    ) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self.parts = [ReplayProducer(bootstrap, topic, stream, rate), ReplayProducer(bootstrap, topic, spike, rate)]
        self.spike_started: float | None = None
        self.error: BaseException | None = None

    @property
    def sent(self) -> int:
        """Return how many messages were sent so far."""
        return sum(p.sent for p in self.parts)

    def run(self) -> None:
        """Send both parts in order."""
        for n, part in enumerate(self.parts):
            if n == 1:
                self.spike_started = time.monotonic()
            part.run()
            if part.error is not None:
                self.error = part.error
                return


def _start_alerting(
    config: AppConfig, server: MetricsServer | None, console: Console
) -> tuple[AlertStack | None, Subscribers | None]:
    missing = alerting_available()
    if missing is not None or server is None:
        console.print(f"Alerts: off — Prometheus and Alertmanager are not installed ({missing}); going on without")
        return None, None

    def show(received: Received) -> None:
        body = received.body
        console.print(
            f"[bold red]▶ {received.subscriber} received[/] {body.get('status', '?').upper()}: "
            f"{body.get('annotations', {}).get('summary', body.get('text', ''))}",
            highlight=False,
        )

    subscribers = Subscribers(on_receive=show)
    data_dir = config.storage.duckdb_path.parent / "demo-prometheus"
    # A fresh TSDB each run: the last demo's counters would otherwise overlap this one's in the rate windows.
    shutil.rmtree(data_dir / "tsdb", ignore_errors=True)
    stack = AlertStack(data_dir, config.storage, rules=config.alerts)
    stack.subscribe(ENERGY_DESK, subscribers.serve(ENERGY_DESK), topics=(SPIKE_TOPIC,))
    stack.subscribe(FED_DESK, subscribers.serve(FED_DESK), topics=("Fed / Central Banks",))
    stack.start([f"{server.host}:{server.port}"])
    if not stack.wait_scraped():
        console.print("Alerts: Prometheus did not scrape the scorer within 30 s; the alert may not fire")
    console.print(
        f"Alerts: Prometheus {stack.prometheus.url}, Alertmanager {stack.alertmanager.url}, "
        f"dispatcher {stack.dispatcher.webhook_url}; subscribers {ENERGY_DESK} ({SPIKE_TOPIC}), {FED_DESK}"
    )
    return stack, subscribers


def _await_alert(subscribers: Subscribers, replay: _Replay, console: Console) -> AlertOutcome:
    """Wait for the sell-off's alert to reach its subscriber, then for the all-clear."""
    deadline = time.monotonic() + ALERT_WAIT_S
    fired = resolved = None
    with console.status(f"waiting for the {SPIKE_TOPIC} alert to reach {ENERGY_DESK}…"):
        while time.monotonic() < deadline and fired is None:
            got = subscribers.of(ENERGY_DESK, "firing")
            fired = got[0] if got else None
            time.sleep(0.2)
    if fired is not None:
        deadline = time.monotonic() + ALERT_WAIT_S
        with console.status("waiting for the all-clear (the alert resolves once the sell-off leaves the window)…"):
            while time.monotonic() < deadline and resolved is None:
                got = subscribers.of(ENERGY_DESK, "resolved")
                resolved = got[0] if got else None
                time.sleep(0.2)
    else:
        console.print(f"No alert reached {ENERGY_DESK} within {ALERT_WAIT_S:.0f} s")
    began = replay.spike_started
    return AlertOutcome(
        topic=SPIKE_TOPIC,
        subscriber=ENERGY_DESK,
        fired_after_s=round(fired.at - began, 1) if fired is not None and began is not None else None,
        resolved_after_s=round(resolved.at - began, 1) if resolved is not None and began is not None else None,
        summary=(fired.body.get("annotations") or {}).get("summary") if fired is not None else None,
        other_subscriber_notifications=len(subscribers.of(FED_DESK)),
    )


def _progress(stats: ScorerStats, sent: int, expected: int) -> Table:
    table = Table(title="live", title_justify="left", show_edge=False)
    for column in (
        "sent",
        "consumed",
        "scored",
        "dead-lettered",
        "duplicates",
        "negative",
        "neutral",
        "positive",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{sent}/{expected}",
        str(stats.consumed),
        str(stats.scored),
        str(stats.dead_lettered),
        str(stats.duplicates),
        *(str(stats.by_sentiment.get(s, 0)) for s in SENTIMENTS),
    )
    return table


def print_summary(summary: DemoSummary, console: Console) -> None:
    """Print the summary as a table with the sample query."""
    table = Table(title="finpulse demo summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows: list[tuple[str, Any]] = [
        ("messages replayed", summary.messages),
        ("scored (rows in DuckDB)", summary.scored),
        ("dead-lettered", summary.dead_lettered),
        ("duplicates", summary.duplicates),
        ("unreadable (language guard)", summary.unread),
        (
            "throughput",
            f"{summary.throughput_per_s} msg/s (first part, first record to last commit; {summary.elapsed_s} s in all)",
        ),
        (
            "sentiment accuracy",
            f"{summary.sentiment_accuracy:.3f} (macro-F1 {summary.sentiment_macro_f1:.3f}, "
            f"{summary.labelled} labelled)",
        ),
        ("adapters", ", ".join(f"{k}={v}" for k, v in summary.versions.items())),
        ("learning", _learning_line(summary)),
        ("history", f"{summary.duckdb_path} (lake: {lake_dir_of(Path(summary.duckdb_path))})"),
        ("Kafka", summary.bootstrap_servers),
    ]
    rows.append(("alert", _alert_line(summary.alerts)))
    if summary.fired:
        rows.append(
            (
                "alerts fired",
                "; ".join(f"{f['alertname']} {f['about']} ({f['severity']})".replace("  ", " ") for f in summary.fired),
            )
        )
    for what, value in rows:
        table.add_row(what, str(value))
    console.print(table)
    console.print("Try:", style="bold")
    console.print(
        f'  finpulse query --duckdb-path {summary.duckdb_path} "{summary.sample_query}"',
        soft_wrap=True,
        highlight=False,
    )


def _learning_line(summary: DemoSummary) -> str:
    learning = summary.learning
    if learning is None:
        return "off (--no-learn)"
    if not learning["promoted"]:
        version = learning["version"] or "no version"
        return f"{learning['labels_sent']} labels; {version} not promoted: {learning['reason']}"
    return (
        f"{learning['labels_sent']} labels → {learning['version']} promoted for domain {learning['domain']} "
        f"(+{learning['extra_s']:.0f} s); accuracy on the {learning['later_labelled']} later tweets "
        f"{summary.sentiment_accuracy_before:.3f} → {summary.sentiment_accuracy_after:.3f}, "
        f"calibration error {summary.sentiment_ece_before:.3f} → {summary.sentiment_ece_after:.3f}"
    )


def calibration_error(probabilities: list[list[float]], truth: list[str]) -> float | None:
    """Return the expected calibration error (15 bins) of sentiment probabilities (in SENTIMENTS order)."""
    if not truth:
        return None
    import torch

    from learner.calibration import expected_calibration_error

    targets = torch.tensor([SENTIMENTS.index(label) for label in truth])
    return round(expected_calibration_error(torch.tensor(probabilities), targets), 4)


def _alert_line(alerts: dict[str, Any] | None) -> str:
    if alerts is None:
        return "off (Prometheus and Alertmanager not installed, or --no-alerts)"
    if alerts["fired_after_s"] is None:
        return f"no {alerts['topic']} alert reached {alerts['subscriber']} in {ALERT_WAIT_S:.0f} s"
    resolved = (
        f"resolved after {alerts['resolved_after_s']} s"
        if alerts["resolved_after_s"] is not None
        else "not resolved yet"
    )
    return (
        f"{alerts['topic']} sell-off → {alerts['subscriber']} {alerts['fired_after_s']} s after it began, {resolved}; "
        f"other subscribers notified: {alerts['other_subscriber_notifications']}"
    )


def summary_json(summary: DemoSummary) -> str:
    """Return the summary as one JSON line."""
    return json.dumps(asdict(summary), sort_keys=True)


def demo_db_path(config: AppConfig) -> Path:
    """Return where the demo keeps its DuckDB file."""
    return config.storage.duckdb_path.with_name("demo.duckdb")
