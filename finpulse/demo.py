"""`finpulse demo`: replay a real labelled stream through the whole pipeline and summarise what happened."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from finpulse.config import AppConfig
from finpulse.replay import ReplayProducer, labelled_stream, malformed_values, news_messages
from finpulse.runtime import Cluster, build_scorer, connect
from learner.labels import SENTIMENTS
from learner.metrics import accuracy, macro_f1
from storage import History
from stream.admin import delete_topics, ensure_topics
from stream.config import TopicNames
from stream.scorer import ScorerStats

# How many already-sent messages the demo sends again, to show that duplicates become no new rows.
DUPLICATES = 5


@dataclass(frozen=True)
class DemoSummary:
    """The outcome of one demo run."""

    messages: int
    scored: int
    dead_lettered: int
    duplicates: int
    throughput_per_s: float
    elapsed_s: float
    sentiment_accuracy: float
    sentiment_macro_f1: float
    labelled: int
    versions: dict[str, str]
    duckdb_path: str
    metrics_url: str | None
    sample_query: str
    bootstrap_servers: str


def demo_topics(run_id: str) -> TopicNames:
    """Return the run's own topics, so a demo never mixes with an earlier one."""
    prefix = f"demo.{run_id}."
    return TopicNames(
        raw=prefix + "news.raw",
        scored=prefix + "news.scored",
        labels=prefix + "news.labels",
        dlq=prefix + "news.dlq",
        updates=prefix + "model.updates",
    )


def run_demo(config: AppConfig, messages: int, rate: float, console: Console, quiet: bool = False) -> DemoSummary:
    """Start what is needed, replay `messages` labelled items (+ bad input and duplicates), score, summarise."""
    run_id = uuid.uuid4().hex[:8]
    db_path = demo_db_path(config)
    for stale in (db_path, db_path.with_name(db_path.name + ".wal")):
        stale.unlink(missing_ok=True)
    topics = demo_topics(run_id)
    config = config.model_copy(
        update={
            "storage": config.storage.model_copy(update={"duckdb_path": db_path}),
            "kafka": config.kafka.model_copy(update={"topics": topics}),
            "scorer": config.scorer.model_copy(update={"group_id": f"demo-{run_id}"}),
        }
    )
    console.print(
        f"[bold]finpulse demo[/] run {run_id}: {messages} messages at "
        f"{'full speed' if rate == 0 else f'{rate:g}/s'}"
    )
    cluster: Cluster = connect(config)
    console.print(f"Kafka: {cluster.bootstrap_servers} ({'local broker' if cluster.local else 'configured cluster'})")
    t = topics
    ensure_topics(cluster.bootstrap_servers, [t.raw, t.scored, t.dlq, t.labels, t.updates], config.kafka.partitions)

    items = labelled_stream(messages)
    labels = {li.item.id: li.sentiment for li in items if li.sentiment is not None}
    originals = news_messages(items)
    stream = list(originals)
    # A key on every bad message: a tombstone (no value) needs one to be produced at all.
    bad = [(f"bad-{n}".encode(), value) for n, (_, value) in enumerate(malformed_values(config.scorer.max_text_bytes))]
    # Spread the bad input and the re-sent duplicates through the stream, as they would arrive in life.
    for n, message in enumerate(bad):
        stream.insert((n + 1) * len(stream) // (len(bad) + 1), message)
    stream.extend(originals[i * len(originals) // DUPLICATES] for i in range(min(DUPLICATES, len(originals))))
    expected = len(stream)

    console.print("Loading the model…")
    scorer, server = build_scorer(config, cluster)
    if server is not None:
        console.print(f"Metrics: {server.url}")
    producer = ReplayProducer(cluster.bootstrap_servers, t.raw, stream, rate)
    started = time.perf_counter()
    producer.start()
    stop = threading.Event()

    def done(stats: ScorerStats) -> bool:
        if producer.error is not None:
            raise producer.error
        return stats.consumed >= expected

    try:
        with Live(
            _progress(scorer.stats, producer.sent, expected),
            console=console,
            refresh_per_second=4,
            transient=quiet,
        ) as live:

            def refresh() -> None:
                while not stop.wait(0.25):
                    live.update(_progress(scorer.stats, producer.sent, expected))

            painter = threading.Thread(target=refresh, daemon=True)
            painter.start()
            stats = scorer.run(stop, until=done)
            stop.set()
            painter.join()
            live.update(_progress(stats, producer.sent, expected))
        console.print()
    finally:
        stop.set()
        scorer.close()
        if server is not None:
            server.close()
    elapsed = time.perf_counter() - started
    producer.join(timeout=10)

    history = History(config.storage)
    predicted: dict[str, str] = {str(i): str(s) for i, s in history.query("SELECT id, sentiment FROM news").rows}
    gold_ids = [i for i in labels if i in predicted]
    gold = [labels[i] for i in gold_ids]
    guess = [str(predicted[i]) for i in gold_ids]
    delete_topics(cluster.bootstrap_servers, [t.raw, t.scored, t.dlq, t.labels, t.updates])
    sample = (
        "SELECT sentiment, count(*) AS n, round(avg(sentiment_confidence), 3) AS confidence "
        "FROM news GROUP BY 1 ORDER BY 2 DESC"
    )
    return DemoSummary(
        messages=messages,
        scored=stats.scored,
        dead_lettered=stats.dead_lettered,
        duplicates=stats.duplicates,
        throughput_per_s=round(stats.throughput_per_s, 1),
        elapsed_s=round(elapsed, 2),
        sentiment_accuracy=round(accuracy(gold, guess), 4),
        sentiment_macro_f1=round(macro_f1(gold, guess, SENTIMENTS), 4),
        labelled=len(gold),
        versions=scorer.classifier.versions,
        duckdb_path=str(db_path.resolve()),
        metrics_url=server.url if server is not None else None,
        sample_query=sample,
        bootstrap_servers=cluster.bootstrap_servers,
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
        ("throughput", f"{summary.throughput_per_s} msg/s (first record to last commit; {summary.elapsed_s} s in all)"),
        (
            "sentiment accuracy",
            f"{summary.sentiment_accuracy:.3f} (macro-F1 {summary.sentiment_macro_f1:.3f}, "
            f"{summary.labelled} labelled)",
        ),
        ("adapters", ", ".join(f"{k}={v}" for k, v in summary.versions.items())),
        ("DuckDB", summary.duckdb_path),
        ("Kafka", summary.bootstrap_servers),
    ]
    for what, value in rows:
        table.add_row(what, str(value))
    console.print(table)
    console.print("Try:", style="bold")
    console.print(
        f'  finpulse query --duckdb-path {summary.duckdb_path} "{summary.sample_query}"',
        soft_wrap=True,
        highlight=False,
    )


def summary_json(summary: DemoSummary) -> str:
    """Return the summary as one JSON line."""
    return json.dumps(asdict(summary), sort_keys=True)


def demo_db_path(config: AppConfig) -> Path:
    """Return where the demo keeps its DuckDB file."""
    return config.storage.duckdb_path.with_name("demo.duckdb")
