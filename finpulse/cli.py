"""The `finpulse` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console

from finpulse.config import AppConfig, load_config
from finpulse.errors import ConfigError, FinpulseError
from learner.errors import LearnerError
from learner.tasks import SENTIMENT, task_names
from monitor.errors import MonitorError
from storage.errors import StorageError
from storage.preflight import require_catalog
from stream import clientlog
from stream.errors import StreamError

KNOWN_ERRORS = (FinpulseError, LearnerError, MonitorError, StorageError, StreamError)
if TYPE_CHECKING:
    from learner.registry import Change, Registry
    from monitor.dispatcher import DeliveryEvent
    from monitor.subscriptions import Subscription
    from storage.models import VersionRow
log = logging.getLogger("finpulse")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that says what to fix."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the bad argument, then exit 2."""
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """Parse an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def _share(text: str) -> float:
    """Parse a share between 0 and 1."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parse a number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _domain(text: str) -> str:
    """Parse a domain name."""
    from learner.domains import check_domain

    try:
        return check_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _strategies(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of continual-learning strategies, kept in the benchmark's own order."""
    from learner.benchmark import STRATEGIES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(STRATEGIES)}, got {text!r}")
    # The documented order (baseline first, upper bound last) whatever order they were given in.
    return tuple(name for name in STRATEGIES if name in names)


def key_value(text: str) -> tuple[str, str]:
    """Parse `section.field=value`."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"expected section.field=value, got {text!r}")
    return key.strip().replace("-", "_"), value


def _flag_groups(defaults: AppConfig) -> dict[str, Parser]:
    """Return the shared flags as parent parsers, one per thing they configure.

    A sub-command takes `config` and only the other groups it uses, so its --help lists no flag it would ignore.
    """
    groups = {name: Parser(add_help=False) for name in ("config", "kafka", "history", "adapters", "device", "metrics")}
    g = groups["config"].add_argument_group("configuration (flags override env, env overrides the file)")
    g.add_argument("--config", type=Path, help="TOML config file (default: $FINPULSE_CONFIG, then ./finpulse.toml)")
    g.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=key_value,
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any setting, e.g. --set scorer.max_batch=256 (repeatable)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log at debug level (default: warnings and errors)")
    groups["kafka"].add_argument_group("Kafka").add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="Kafka cluster to use, comma-separated for several servers (kafka.bootstrap_servers); "
        "default: the local broker, started if need be",
    )
    groups["history"].add_argument_group("history").add_argument(
        "--duckdb-path",
        type=Path,
        metavar="PATH",
        help="DuckDB state file; the news lake goes beside it "
        f"(storage.duckdb_path; default {defaults.storage.duckdb_path})",
    )
    # The same title: both land in one "model" section of a command's --help.
    groups["adapters"].add_argument_group("model").add_argument(
        "--adapters-dir",
        type=Path,
        metavar="DIR",
        help=f"adapter versions and CHAMPION files (model.adapters_dir; default {defaults.model.adapters_dir})",
    )
    groups["device"].add_argument_group("model").add_argument(
        "--device", help=f"auto, cpu, cuda or cuda:N (scorer.device; default {defaults.scorer.device})"
    )
    groups["metrics"].add_argument_group("metrics").add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"port of /metrics, 0 = any free one (metrics.port; default {defaults.metrics.port})",
    )
    return groups


def build_parser() -> Parser:
    """Build the argument parser of every sub-command."""
    defaults = AppConfig()  # the built-in values, for help texts
    groups = _flag_groups(defaults)

    def flags(*names: str) -> list[Parser]:
        """Return the configuration flags and the named groups, as parents of a sub-command."""
        return [groups["config"], *(groups[name] for name in names)]

    parser = Parser(prog="finpulse", description="Real-time financial news monitor that keeps learning.")
    parser.add_argument("--version", action="version", version=f"finpulse {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser, help="what to do; `finpulse COMMAND --help` for its flags"
    )

    kafka = sub.add_parser("kafka", parents=flags(), help="start, stop or inspect the local Kafka broker")
    kafka.add_argument(
        "action", choices=["start", "stop", "status"], help="status exits 3 when the broker is not running"
    )
    kafka.add_argument("--port", type=int, help="listener port for `start` (default: a free one)")
    kafka.add_argument(
        "--data-dir",
        type=Path,
        help=f"where the broker keeps its data (kafka.data_dir; default {defaults.kafka.data_dir})",
    )

    boot = sub.add_parser(
        "bootstrap", parents=flags("adapters"), help="train the first adapter versions from the TFNS splits"
    )
    boot.add_argument(
        "--task", choices=task_names(), action="append", help="only this task (repeatable; default: every task)"
    )
    boot.add_argument("--limit", type=positive_int, help="use only the first N texts of each split (smoke runs)")

    score = sub.add_parser(
        "score",
        parents=flags("kafka", "history", "adapters", "device", "metrics"),
        help="run a scorer: news.raw → news.scored + DuckDB",
    )
    score.add_argument(
        "--max-messages", type=positive_int, help="stop after this many messages (default: run until Ctrl-C)"
    )

    query = sub.add_parser("query", parents=flags("history"), help="run a read-only SQL query on the history")
    query.add_argument("sql", help='e.g. "SELECT topic, count(*) FROM news GROUP BY 1"')
    query.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format (default table)"
    )
    query.add_argument("--max-rows", type=positive_int, default=100, help="rows shown in table format (default 100)")
    query.add_argument(
        "--timeout",
        type=positive_float,
        help="stop the query after this many seconds (storage.lake.query_timeout_s; default 300)",
    )
    query.add_argument(
        "--as-of", help="time travel: a lake snapshot id, or an RFC 3339 time (the history as it was then)"
    )

    search = sub.add_parser(
        "search", parents=flags("history"), help="the newest news whose text holds every word given"
    )
    search.add_argument("words", help='e.g. "oil opec"')
    search.add_argument("--limit", type=positive_int, default=20, help="rows to show, newest first (default 20)")
    search.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format (default table)"
    )

    export = sub.add_parser("export", parents=flags("history"), help="write the news history to a Parquet or CSV file")
    export.add_argument("path", type=Path, help="file to write, e.g. news-2024-03.parquet")
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="file format (default parquet)")
    export.add_argument("--since", type=_utc_time, help="only rows scored at or after this RFC 3339 time")
    export.add_argument("--until", type=_utc_time, help="only rows scored before this RFC 3339 time")
    export.add_argument("--as-of", help="as the history was at this snapshot id or RFC 3339 time")

    migrate = sub.add_parser(
        "migrate",
        parents=flags("history"),
        help="move the news of a DuckDB-file history (finpulse ≤ 0.1) into the lake",
    )
    migrate.add_argument("--from", dest="source", type=Path, help="the old DuckDB file (default: storage.duckdb_path)")

    compact = sub.add_parser(
        "compact", parents=flags("history"), help="merge the lake's small files and expire old snapshots"
    )
    del compact  # no options: everything comes from storage.lake

    # No --metrics-port: the demo serves /metrics on any free port, so that it never collides with a scorer.
    demo = sub.add_parser(
        "demo",
        parents=flags("kafka", "history", "adapters", "device"),
        help="replay a real labelled stream through the pipeline",
    )
    demo.add_argument("--messages", type=positive_int, default=1000, help="labelled messages to replay (default 1000)")
    demo.add_argument(
        "--rate", type=non_negative_float, default=0.0, help="messages per second, 0 = as fast as possible (default 0)"
    )
    demo.add_argument("--json", action="store_true", help="print only the summary, as one JSON line")
    demo.add_argument("--no-alerts", action="store_true", help="skip Prometheus, Alertmanager and the sell-off alert")
    demo.add_argument(
        "--no-learn", action="store_true", help="skip the analysts' labels and the learning round between the parts"
    )

    replay = sub.add_parser(
        "replay",
        parents=flags("kafka"),
        help="feed a cluster the labelled stream the demo replays (then its oil sell-off and, optionally, labels)",
    )
    replay.add_argument("--messages", type=positive_int, default=1000, help="labelled messages to send (default 1000)")
    replay.add_argument(
        "--rate",
        type=non_negative_float,
        default=10.0,
        help="messages per second, 0 = as fast as possible (default 10)",
    )
    replay.add_argument(
        "--labels",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="afterwards, send the analysts' labels of this first share of the stream to news.labels, 0-1 "
        "(default 0: none)",
    )
    replay.add_argument("--no-selloff", action="store_true", help="leave out the oil sell-off after the stream")

    label = sub.add_parser("label", help="send analysts' labels, or list the messages most worth labelling")
    label_sub = label.add_subparsers(
        dest="label_action", required=True, parser_class=Parser, help="send labels, or suggest what to label"
    )
    label_send = label_sub.add_parser(
        "send",
        parents=flags("kafka", "history"),
        help="validate labels from a CSV / JSON Lines file or a query, then send them",
    )
    source = label_send.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, help="CSV with a header, or .jsonl: id, text, sentiment, ...")
    source.add_argument("--query", help="a history query returning id, text and label columns")
    label_send.add_argument("--labeller", help="labeller recorded on labels that name none")
    label_suggest = label_sub.add_parser(
        "suggest", parents=flags("history"), help="the recent messages the model is least sure of, not labelled yet"
    )
    label_suggest.add_argument(
        "--task", choices=task_names(), default=SENTIMENT.name, help=f"which task (default {SENTIMENT.name})"
    )
    label_suggest.add_argument("--n", type=positive_int, default=20, help="how many (default 20)")
    label_suggest.add_argument(
        "--since-hours", type=positive_float, default=24.0, help="scored within this many hours (default 24)"
    )
    label_suggest.add_argument(
        "--by",
        choices=["confidence", "novelty", "both"],
        default="confidence",
        help="rank by calibrated confidence (default), by novelty: distance to the nearest training text in the "
        "encoder's space (loads the model, a few seconds), or by both ranks together",
    )
    label_suggest.add_argument("--json", action="store_true", help="one JSON object per line")

    plot = sub.add_parser("plot", help="pictures of the history (PNG)")
    plot_sub = plot.add_subparsers(dest="plot_what", required=True, parser_class=Parser, help="which picture")
    plot_sentiment = plot_sub.add_parser(
        "sentiment", parents=flags("history"), help="negative share over time vs its baseline, alert firings marked"
    )
    plot_sentiment.add_argument("--topic", help="one topic only (default: all news)")
    plot_sentiment.add_argument("--since", help="from this RFC 3339 time on (default: the whole history)")
    plot_sentiment.add_argument(
        "--by", choices=["scored", "published"], default="scored", help="processing time (default) or publication time"
    )
    plot_sentiment.add_argument(
        "--out", type=Path, default=Path("results/sentiment.png"), help="PNG to write (default results/sentiment.png)"
    )

    bench = sub.add_parser(
        "bench",
        parents=flags("kafka", "history", "adapters", "device"),
        help="benchmarks (baseline and finpulse side by side)",
    )
    bench.add_argument(
        "which",
        choices=["score", "cl", "faults", "history"],
        help="score: scorer vs pipeline; cl: continual learning; faults: bad input, kills, broker restart; "
        "history: the lake vs the DuckDB file at --rows",
    )
    bench.add_argument(
        "--messages", type=positive_int, default=1000, help="score: messages per contender (default 1000)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="cl: small experiences and one seed (a few minutes); faults: fewer messages, 2 kills, no learner",
    )
    bench.add_argument("--rows", type=positive_int, default=5_000_000, help="history: rows to pre-fill (5M)")
    bench.add_argument("--kills", type=positive_int, help="faults: scorer SIGKILLs (default 5, 2 with --quick)")
    bench.add_argument("--seeds", type=positive_int, help="cl: how many seeds (default 3, 1 with --quick)")
    bench.add_argument(
        "--strategies",
        type=_strategies,
        metavar="NAME[,NAME…]",
        help="cl: the strategies to run (default all: naive,replay,ewc,replay_ewc,joint)",
    )
    bench.add_argument(
        "--memory-fraction",
        type=positive_float,
        default=0.1,
        help="cl: replay memory as a share of the examples seen (default 0.1; capped by learner.replay_size)",
    )
    bench.add_argument(
        "--from-champion",
        action="store_true",
        help="cl: start from the shipped champion and learn the other domains, global (replay + EWC) and per domain",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.add_argument("--out", type=Path, help="where to write the JSON result (default results/bench-<which>.json)")

    learn = sub.add_parser(
        "learn",
        parents=flags("kafka", "history", "adapters", "metrics"),
        help="run the learner: news.labels → new adapter versions, gated and promoted",
    )
    learn.add_argument("--now", action="store_true", help="form an experience from the waiting labels right away")
    learn.add_argument("--once", action="store_true", help="read the labels there are, learn once, and exit")
    learn.add_argument(
        "--task", choices=task_names(), action="append", help="only this task (repeatable; default: every task)"
    )
    learn.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    subscribe = sub.add_parser(
        "subscribe", parents=flags("history"), help="add an alert subscription (a webhook + filters)"
    )
    subscribe.add_argument("name", help="a unique name for the subscription, e.g. fx-desk")
    subscribe.add_argument(
        "--url", required=True, help="https webhook that receives the alerts (http only for dispatcher.allowed_hosts)"
    )
    subscribe.add_argument("--topic", action="append", default=[], help="only alerts on this topic (repeatable)")
    subscribe.add_argument("--ticker", action="append", default=[], help="only alerts on this ticker (repeatable)")
    subscribe.add_argument(
        "--min-severity",
        choices=["info", "warning", "critical"],
        default="info",
        help="least severity delivered (default info: every alert)",
    )

    unsubscribe = sub.add_parser("unsubscribe", parents=flags("history"), help="remove a subscription by id or name")
    unsubscribe.add_argument("subscription", help="id or name")

    subs = sub.add_parser("subscriptions", parents=flags("history"), help="list alert subscriptions")
    subs.add_argument("--all", action="store_true", help="include removed subscriptions")

    dispatch = sub.add_parser(
        "dispatch", parents=flags("history"), help="run the dispatcher: Alertmanager webhook → subscribers"
    )
    dispatch.add_argument(
        "--port", type=int, help=f"listen port (dispatcher.port; default {defaults.dispatcher.port}); 0 = any free one"
    )

    models = sub.add_parser("models", help="list, inspect, promote or roll back adapter versions")
    models_sub = models.add_subparsers(
        dest="models_command", required=True, parser_class=Parser, help="what to do with the registry"
    )
    models_list = models_sub.add_parser(
        "list", parents=flags("history", "adapters"), help="list the adapter versions, newest first"
    )
    models_list.add_argument("--task", choices=task_names(), help="only this task (default: every task)")
    models_list.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    models_show = models_sub.add_parser(
        "show", parents=flags("history", "adapters"), help="one version: status, lineage, model card"
    )
    models_show.add_argument("version", help="e.g. sentiment-v2")
    models_show.add_argument("--json", action="store_true", help="print one JSON object")
    # Promote and roll back announce the change on model.updates, hence Kafka.
    models_promote = models_sub.add_parser(
        "promote",
        parents=flags("kafka", "history", "adapters"),
        help="make a version the champion now, skipping the learner's held-out gate",
    )
    models_promote.add_argument("version", help="e.g. sentiment-v2")
    models_promote.add_argument("--reason", help="why, for the model_events log (default: manual promotion)")
    models_promote.add_argument(
        "--domain",
        type=_domain,
        default="default",
        help="serve it to this domain only (model.domains; default: default)",
    )
    models_rollback = models_sub.add_parser(
        "rollback",
        parents=flags("kafka", "history", "adapters"),
        help="serve the champion's parent (or --to VERSION) again",
    )
    models_rollback.add_argument("task", choices=task_names(), help="whose champion to roll back")
    models_rollback.add_argument("--to", metavar="VERSION", help="a version that served before (default: the parent)")
    models_rollback.add_argument("--reason", help="why, for the model_events log")
    models_rollback.add_argument(
        "--domain",
        type=_domain,
        default="default",
        help="roll back this domain's champion (with nothing earlier of its own, it serves the default's again)",
    )

    # Every group: it shows what each flag would set.
    sub.add_parser(
        "config",
        parents=flags("kafka", "history", "adapters", "device", "metrics"),
        help="print the effective configuration",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = dict(args.settings)
    flags = {
        "bootstrap_servers": "kafka.bootstrap_servers",
        "duckdb_path": "storage.duckdb_path",
        "adapters_dir": "model.adapters_dir",
        "device": "scorer.device",
        "metrics_port": "metrics.port",
        "data_dir": "kafka.data_dir",
    }
    for attr, dotted in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
    return overrides


def cmd_replay(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Produce the labelled stream, then the oil sell-off, then a share of the labels; exit once all are acked."""
    from finpulse.analysts import send_labels
    from finpulse.replay import ReplayProducer, labelled_stream, news_messages, selloff
    from finpulse.runtime import connect

    cluster = connect(config)
    items = labelled_stream(args.messages)
    spike = [] if args.no_selloff or not items else selloff(items[-1].item.published_at)
    raw = config.kafka.topics.raw
    pace = f"{args.rate:g}/s" if args.rate else "full speed"
    console.print(f"replaying {len(items)} messages + {len(spike)} of the sell-off to {raw} on {cluster} at {pace}")
    producer = ReplayProducer(cluster.connection, raw, news_messages(items + spike), args.rate)
    producer.start()
    try:
        while producer.is_alive():
            producer.join(0.5)
    except KeyboardInterrupt:
        producer.stop()
        raise
    if producer.error is not None:
        raise FinpulseError(f"the replay stopped after {producer.sent} messages: {producer.error}")
    sent_labels = send_labels(config, cluster.connection, items[: int(len(items) * args.labels)]) if args.labels else 0
    console.print(f"sent {producer.sent} messages to {raw} and {sent_labels} labels to {config.kafka.topics.labels}")
    return 0


def cmd_kafka(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Start, stop or report the local broker."""
    from stream.broker import LocalBroker

    broker = LocalBroker(config.kafka.data_dir)
    if args.action == "start":
        bootstrap = broker.start(port=args.port)
        console.print(f"Kafka running at {bootstrap} (data in {config.kafka.data_dir})")
    elif args.action == "stop":
        broker.stop()
        console.print("Kafka stopped")
    else:
        status = broker.status()
        if status.running:
            console.print(f"running: {status.bootstrap} pid {status.pid} data {status.data_dir}")
        else:
            console.print(f"not running (data {status.data_dir})")
            return 3
    return 0


def cmd_bootstrap(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Train and promote the first adapter versions, then print their validation metrics."""
    from rich.table import Table

    from learner.bootstrap import bootstrap

    tasks = tuple(args.task) if args.task else task_names()
    started = time.perf_counter()
    result = bootstrap(config.model, config.train, tasks=tasks, limit=args.limit)
    table = Table(title=f"bootstrap ({time.perf_counter() - started:.0f} s)", title_justify="left")
    for column in ("task", "version", "accuracy", "macro-F1", "valid texts", "train s", "path"):
        table.add_column(column)
    for task, r in result.results.items():
        table.add_row(
            task,
            r.version,
            f"{r.metrics['accuracy']:.4f}",
            f"{r.metrics['macro_f1']:.4f}",
            str(int(r.metrics["n"])),
            f"{r.train_s:.0f}",
            str(r.path),
        )
    console.print(table)
    return 0


def cmd_score(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run one scorer until interrupted."""
    require_catalog(config.storage)  # before torch is imported: a wrong catalog costs a second, not five
    from finpulse.runtime import build_scorer, connect

    cluster = connect(config)
    scorer, server = build_scorer(config, cluster)
    stop = threading.Event()
    _stop_on_signals(stop)
    console.print(
        f"scoring {config.kafka.topics.raw} from {cluster.bootstrap_servers} "
        f"as group {config.scorer.group_id}; versions {scorer.classifier.versions}; "
        f"metrics {server.url if server else 'off'}"
    )
    limit = args.max_messages
    try:
        stats = scorer.run(stop, until=(lambda s: s.consumed >= limit) if limit else None)
    finally:
        scorer.close()
        if server is not None:
            server.close()
    console.print(
        f"consumed {stats.consumed}: scored {stats.scored}, dead-lettered {stats.dead_lettered}, "
        f"duplicates {stats.duplicates}; peak RSS {_peak_rss_mb():.0f} MB"
    )
    return 0


def _peak_rss_mb() -> float:
    """Return this process's peak resident memory in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_query(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run a read-only query and print the result."""
    from storage import History

    require_catalog(config.storage)
    history = History(config.storage)
    result = history.query(args.sql, timeout_s=args.timeout, as_of=_as_of(args.as_of))
    if args.format == "csv":
        result.to_csv(sys.stdout)
    elif args.format == "json":
        sys.stdout.write(result.to_json() + "\n")
    else:
        output_console().print(result.to_table(max_rows=args.max_rows))
    return 0


def cmd_search(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Print the newest rows holding every word (the lake's word table: fast at millions of rows)."""
    from storage import History

    require_catalog(config.storage)
    result = History(config.storage).lake.search(args.words, limit=args.limit)
    if args.format == "csv":
        result.to_csv(sys.stdout)
    elif args.format == "json":
        sys.stdout.write(result.to_json() + "\n")
    else:
        output_console().print(result.to_table(max_rows=args.limit))
    return 0


def cmd_export(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Write the rows scored in [since, until) to one file."""
    from storage import History

    require_catalog(config.storage)
    lake = History(config.storage).lake
    written = lake.export(args.path, format=args.format, since=args.since, until=args.until, as_of=_as_of(args.as_of))
    console.print(f"wrote {written} rows to {args.path} ({args.format})", highlight=False)
    return 0


def cmd_migrate(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Copy the news table of a DuckDB-file history into the lake; running it again copies nothing twice."""
    from storage import History

    require_catalog(config.storage)
    source = args.source or config.storage.duckdb_path
    history = History(config.storage)
    done = history.lake.migrate_from_duckdb(source)
    console.print(
        f"migrated {source} (schema v{done.source_schema_version}): {done.source_rows} rows, {done.copied} copied, "
        f"{done.already_present} already in the lake; the lake holds {history.count()} rows",
        highlight=False,
    )
    return 0


def cmd_compact(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Merge small files, flush inlined rows and expire old snapshots (scorers also do this when it is due)."""
    from storage import History

    require_catalog(config.storage)
    done = History(config.storage).lake.compact()
    console.print(f"compacted: {done}", highlight=False)
    return 0


def _as_of(value: str | None) -> int | datetime | None:
    """Read --as-of: a snapshot id (digits) or an RFC 3339 time."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    return _utc_time(value)


def _utc_time(value: str) -> datetime:
    """Parse an RFC 3339 time for a flag; argparse turns the ValueError into a one-line usage error."""
    from stream.messages import parse_timestamp

    parsed = parse_timestamp(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"expected an RFC 3339 time such as 2024-03-01T00:00:00Z, got {value!r}")
    return parsed


def cmd_label(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Send labels (validated first), or suggest what to label."""
    from rich.table import Table

    from finpulse.labelling import MAX_REPORTED, query_rows, read_rows, send, suggestions, to_values
    from finpulse.runtime import connect
    from storage import History

    if args.label_action == "suggest" or args.query is not None:  # labels from a file need no history
        require_catalog(config.storage)
    history = History(config.storage)
    if args.label_action == "suggest":
        found = suggestions(history, args.task, args.n, args.since_hours, args.by, config.model)
        if args.json:
            for row in found:
                sys.stdout.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return 0
        what = {"confidence": "least confident", "novelty": "most novel", "both": "least confident and most novel"}
        table = Table(title=f"{what[args.by]} {args.task} predictions, not labelled yet", title_justify="left")
        columns = ["id", "confidence", *(["novelty"] if args.by != "confidence" else []), "predicted", "text"]
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in found:
            cells = {**row, "confidence": f"{row['confidence']:.3f}"}
            if "novelty" in row:
                cells["novelty"] = f"{row['novelty']:.3f}"
            table.add_row(*(str(cells[c]) for c in columns))
        console.print(table)
        return 0
    rows = read_rows(args.file) if args.file is not None else query_rows(history, args.query)
    values, refused = to_values(rows, args.labeller, config.scorer.max_text_bytes)
    if refused:
        for bad in refused[:MAX_REPORTED]:
            sys.stderr.write(f"finpulse label: {bad.where}: {bad.reason}: {bad.detail}\n")
        more = f" (and {len(refused) - MAX_REPORTED} more)" if len(refused) > MAX_REPORTED else ""
        sys.stderr.write(f"finpulse label: {len(refused)} of {len(rows)} labels refused{more}; nothing was sent\n")
        return 1
    if not values:
        sys.stderr.write("finpulse label: no labels to send\n")
        return 1
    cluster = connect(config)
    sent = send(cluster.connection, config.kafka.topics.labels, values)
    console.print(f"sent {sent} labels to {config.kafka.topics.labels} on {cluster.bootstrap_servers}")
    return 0


def cmd_plot(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Write the PNG of the sentiment series."""
    from finpulse.plot import draw, sentiment_series
    from storage import History
    from stream.messages import parse_timestamp

    since = None
    if args.since is not None:
        since = parse_timestamp(args.since)
        if since is None:
            sys.stderr.write(f"finpulse plot: --since {args.since[:40]!r} is not RFC 3339 (2026-12-01T09:00:00Z)\n")
            return 2
    require_catalog(config.storage)
    series = sentiment_series(History(config.storage), args.topic, since, args.by)
    alerts = f"{len(series.alerts)} alert{'' if len(series.alerts) == 1 else 's'} fired"
    title = f"negative share, {args.topic or 'all topics'}: {sum(series.volume)} messages, {alerts}"
    path = draw(series, args.out, title, args.by)
    console.print(f"written to {path}")
    return 0


def cmd_demo(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run the demo and print its summary."""
    from finpulse.demo import print_summary, run_demo, summary_json

    summary = run_demo(
        config, args.messages, args.rate, console, quiet=args.json, alerts=not args.no_alerts, learn=not args.no_learn
    )
    if args.json:
        sys.stdout.write(summary_json(summary) + "\n")
    else:
        print_summary(summary, console)
    return 0


def cmd_bench(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run a benchmark, write its JSON and print it."""
    if args.which == "cl":
        return _bench_cl(args, config, console)
    if args.which == "faults":
        return _bench_faults(args, config, console)
    if args.which == "history":
        return _bench_history(args, console)
    from finpulse.bench import run_bench, write_result

    result = run_bench(config, args.messages, config.storage.duckdb_path.parent / "bench", console)
    out = args.out or Path("results/bench-score.json")
    write_result(result, out)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        console.print_json(json.dumps(result))
        console.print(f"written to {out}")
    return 0


def _bench_faults(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run the fault scenarios; the scorers and learners it starts get this command's --config and --set."""
    from finpulse import faults

    forward = [*(["--config", str(args.config)] if args.config else [])]
    forward += [arg for key, value in args.settings for arg in ("--set", f"{key}={value}")]
    settings = faults.FaultSettings.of(args.kills, args.quick)
    result = faults.run_faults(config, settings, forward=forward, report=faults.Reporter(console, to_stderr=True))
    out = args.out or Path("results/bench-faults-quick.json" if args.quick else "results/bench-faults.json")
    faults.write_result(result, out)
    if args.json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        faults.print_result(result, console)
        console.print(f"written to {out}")
    return 0


def _bench_history(args: argparse.Namespace, console: Console) -> int:
    """Pre-fill a lake and a DuckDB file to --rows and measure both; progress on stderr, one JSON line."""
    from finpulse import bench_history

    result = bench_history.run_history_bench(args.rows, log=lambda line: print(line, file=sys.stderr, flush=True))
    out = args.out or Path("results/bench-history.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        console.print_json(json.dumps(result))
        console.print(f"written to {out}")
    return 0


def _bench_cl(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    from rich.table import Table

    from learner import benchmark

    if args.from_champion:
        if args.strategies:
            # Its two strategies (global replay + EWC, domain-scoped) are what it compares: both always run.
            sys.stderr.write("finpulse bench: error: --strategies is for bench cl without --from-champion\n")
            return 2
        return _bench_cl_from_champion(args, config, console)

    seeds = list(range(1, 1 + (args.seeds or (1 if args.quick else 3))))
    result = benchmark.run(
        quick=args.quick,
        seeds=seeds,
        config=config.learner,
        model_config=config.model,
        train_config=config.train,
        show_progress=not args.json and sys.stderr.isatty(),
        memory_fraction=args.memory_fraction,
        strategies=args.strategies or benchmark.STRATEGIES,
    )
    doc = result.to_dict()
    out = args.out or Path("results/bench-cl-quick.json" if args.quick else "results/bench-cl.json")
    paths = benchmark.write(doc, out.parent, out.stem)
    if args.json:
        # Insertion order is the documented strategy order (baseline first, upper bound last).
        sys.stdout.write(json.dumps(doc) + "\n")
        return 0
    table = Table(title=f"continual learning: {' → '.join(doc['experiences'])}; seeds {seeds}")
    for column in ("strategy", "avg accuracy", "± seeds", "forgetting", "BWT", "train s"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, s in doc["strategies"].items():
        joint = name == "joint"
        table.add_row(
            name,
            f"{s['avg_accuracy']:.3f}",
            f"{s['avg_accuracy_std']:.3f}",
            "—" if joint else f"{s['forgetting']:.3f}",
            "—" if joint else f"{s['bwt']:+.3f}",
            f"{s['train_s']:.0f}",
        )
    console.print(table)
    console.print(f"wall {doc['wall_s']:.0f} s; written to {', '.join(str(p) for p in paths.values())}")
    return 0


def _bench_cl_from_champion(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    from rich.table import Table

    from learner.from_champion import run_from_champion

    # Progress lines on stderr whether or not it is a terminal: a run takes minutes.
    doc = run_from_champion(
        config.learner, config.model, quick=args.quick, progress=lambda line: console.print(f"bench cl: {line}")
    )
    out = args.out or Path("results/bench-cl-from-champion.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
        return 0
    table = Table(title=f"from the champion {doc['champion']}: gain per new domain, change on TFNS")
    domains = list(doc["strategies"]["domain_scoped"]["gain"])
    for column in ("strategy", *domains, "TFNS change"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, s in doc["strategies"].items():
        table.add_row(name, *(f"{s['gain'][d]:+.3f}" for d in domains), f"{s['tfns_change']:+.3f}")
        # A strategy's row is what is served, past the gate; each candidate's own row shows what it learnt.
        for domain, c in s.get("candidates", {}).items():
            verdict = "promoted" if c["promote"] else "rejected"
            cells = [f"{c['gain']:+.3f}" if d == domain else "" for d in domains]
            table.add_row(f"  candidate {c['version']} ({verdict})", *cells, f"{c['tfns_change']:+.3f}")
    console.print(table)
    console.print(f"wall {doc['wall_s']:.0f} s; written to {out}")
    return 0


def cmd_learn(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run the learner until interrupted (or once, with --once)."""
    require_catalog(config.storage)  # before torch is imported, as for the scorer
    from prometheus_client import CollectorRegistry

    from finpulse.learn import Learner
    from finpulse.runtime import connect
    from monitor.metrics import MetricsServer

    cluster = connect(config)
    registry = CollectorRegistry()
    server = MetricsServer(registry, config.metrics)
    tasks = tuple(args.task) if args.task else task_names()
    progress = not args.no_progress and sys.stderr.isatty()
    learner = Learner(config, cluster.connection, registry, show_progress=progress, tasks=tasks)
    stop = threading.Event()
    _stop_on_signals(stop)
    console.print(
        f"learning from {config.kafka.topics.labels} on {cluster.bootstrap_servers}; champions "
        f"{learner.adapters.champions()}; metrics {server.url}"
    )
    try:
        outcomes = learner.run(
            stop,
            now=args.now,
            once=args.once,
            on_outcome=lambda o: console.print(
                f"{o.version} ({o.task}, experience {o.experience}): "
                f"{'PROMOTED' if o.promoted else 'rejected'}: {o.reason}"
            ),
        )
    finally:
        learner.close()
        server.close()
    if args.once and not outcomes:
        console.print(
            "no experience was due: "
            + ", ".join(f"{t} {learner.labels.pending_count(t)} labels waiting" for t in tasks)
            + f" (min {config.learner.min_labels}, trigger {config.learner.trigger_labels}; --now forms one)"
        )
    return 0


def cmd_subscribe(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Validate and store a subscription."""
    from monitor.subscriptions import add_subscription
    from storage import AlertStore

    sub = add_subscription(
        AlertStore(config.storage),
        name=args.name,
        target_url=args.url,
        topics=args.topic,
        tickers=args.ticker,
        min_severity=args.min_severity,
        allowed_hosts=config.dispatcher.allowed_hosts,
    )
    console.print(f"subscription {sub.id} {sub.name!r} → {sub.target_url}: {_filters(sub)}", highlight=False)
    # The only time it is shown: `subscriptions` masks it. The subscriber verifies deliveries with it.
    console.print(
        f"signing secret (shown once; give it to the subscriber to verify webhook-signature): {sub.secret}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_unsubscribe(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Remove a subscription."""
    from monitor.subscriptions import remove_subscription
    from storage import AlertStore

    key: int | str = int(args.subscription) if args.subscription.isdigit() else args.subscription
    sub = remove_subscription(AlertStore(config.storage), key)
    console.print(f"removed subscription {sub.id} {sub.name!r}", highlight=False)
    return 0


def cmd_subscriptions(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """List subscriptions as a table; signing secrets are masked."""
    from rich.table import Table
    from rich.text import Text

    from monitor.subscriptions import list_subscriptions, mask_secret
    from storage import AlertStore

    table = Table(title="subscriptions", title_justify="left")
    for column in ("id", "name", "webhook", "filters", "secret", "active"):
        table.add_column(column)
    for sub in list_subscriptions(AlertStore(config.storage), include_inactive=args.all):
        row = (str(sub.id), sub.name, sub.target_url, _filters(sub), mask_secret(sub.secret))
        # Stored rows print as text, never as console markup (a name from an older finpulse may hold "[").
        table.add_row(*(Text(cell) for cell in row), "yes" if sub.active else "no")
    output_console().print(table)
    return 0


def _filters(sub: Subscription) -> str:
    parts = []
    if sub.topics:
        parts.append("topics " + ", ".join(sub.topics))
    if sub.tickers:
        parts.append("tickers " + ", ".join(sub.tickers))
    parts.append(f"severity ≥ {sub.min_severity}")
    return "; ".join(parts)


def cmd_dispatch(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run the dispatcher until interrupted."""
    from monitor.dispatcher import Dispatcher
    from storage import AlertStore

    settings = config.dispatcher if args.port is None else config.dispatcher.model_copy(update={"port": args.port})

    def show(event: DeliveryEvent) -> None:
        console.print(
            f"{event.outcome}: {event.status} {event.alertname} → {event.subscription} "
            f"(attempt {event.attempt}, HTTP {event.http_status or '-'}, {event.latency_ms:.0f} ms)",
            highlight=False,
        )

    dispatcher = Dispatcher(settings, AlertStore(config.storage), on_delivery=show).start()
    stop = threading.Event()
    _stop_on_signals(stop)
    console.print(
        f"dispatching Alertmanager notifications posted to {dispatcher.webhook_url} "
        "(with Authorization: Bearer <dispatcher.token>)",
        highlight=False,
        soft_wrap=True,
    )
    try:
        stop.wait()
    finally:
        dispatcher.stop()
    return 0


def _update_publisher(config: AppConfig) -> Callable[[str, str, str, str | None], None] | None:
    """Connect a model.updates publisher, or return None when no Kafka is configured or running."""
    # Imported here: finpulse.runtime pulls in torch, which listing versions does not need.
    from finpulse.runtime import update_publisher

    return update_publisher(config)


class _LazyPublisher:
    """Connects to Kafka at the first announcement only, so `models list` and `show` never do."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._publish: Callable[[str, str, str, str | None], None] | None = None
        self._unavailable: str | None = None  # why there is no publisher, once connecting was tried

    def __call__(self, task: str, version: str, event: str, previous: str | None) -> None:
        if self._publish is None and self._unavailable is None:
            try:
                self._publish = _update_publisher(self._config)
            except KNOWN_ERRORS as e:
                self._unavailable = str(e)
                raise
            if self._publish is None:
                self._unavailable = "no Kafka configured and the local broker is not running"
        if self._publish is None:
            # Tried once per command: a second change in the same command would only wait for the same failure.
            raise StreamError(self._unavailable)
        self._publish(task, version, event, previous)


def cmd_models(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """List, show, promote or roll back adapter versions, after syncing DuckDB with the adapters directory."""
    from learner.adapters import AdapterStore
    from learner.registry import Registry
    from storage import History
    from storage.models import ModelVersionStore

    registry = Registry(
        AdapterStore(config.model.adapters_dir), ModelVersionStore(History(config.storage)), _LazyPublisher(config)
    )
    for change in registry.sync(source="cli"):
        console.print(
            f"repaired: DuckDB now records {change.version} as the {change.task} champion, as the CHAMPION file "
            f"says (was {change.previous or 'none'})",
            highlight=False,
            soft_wrap=True,
        )
        _note_unannounced(change, config, console)
    action = args.models_command
    if action == "list":
        _models_list(registry, args, console)
    elif action == "show":
        _models_show(registry, args)
    elif action == "promote":
        from learner.registry import task_of

        task = task_of(args.version)
        change = registry.promote(
            task, args.version, args.reason or "manual promotion", source="cli", domain=args.domain
        )
        where = "" if args.domain == "default" else f" of domain {args.domain}"
        console.print(
            f"promoted {change.version}: the {task} champion{where} now (was {change.previous or 'none'})",
            highlight=False,
            soft_wrap=True,
        )
        # After the fact, so that a refused promotion prints its error line only.
        sys.stderr.write(
            f"finpulse models promote: warning: {change.version} went live without the learner's held-out gate\n"
        )
        _note_unannounced(change, config, console)
    else:
        change = registry.rollback(args.task, to=args.to, source="cli", reason=args.reason, domain=args.domain)
        where = "" if args.domain == "default" else f" in domain {args.domain}"
        console.print(
            f"rolled back {args.task}{where}: {change.version} serves again (was {change.previous})",
            highlight=False,
            soft_wrap=True,
        )
        _note_unannounced(change, config, console)
    return 0


def _note_unannounced(change: Change, config: AppConfig, console: Console) -> None:
    """Say in one line that a committed change was not announced, and why that is safe."""
    if not change.published:
        console.print(
            f"note: not announced on {config.kafka.topics.updates} ({change.note}); scorers switch to "
            f"{change.version} at their next check of the CHAMPION file",
            highlight=False,
            soft_wrap=True,
        )


def _models_list(registry: Registry, args: argparse.Namespace, console: Console) -> None:
    """Print the versions as a table or a JSON array."""
    from rich.table import Table

    from learner.registry import held_out_accuracy

    rows = registry.list(args.task)
    if args.json:
        sys.stdout.write(json.dumps([_version_json(row) for row in rows], ensure_ascii=False) + "\n")
        return
    table = Table(title="model versions", title_justify="left", caption=f"{len(rows)} versions")
    # On a narrow terminal rich shortens cells with an ellipsis; the version and status stay whole.
    table.add_column("version", no_wrap=True, min_width=14)
    table.add_column("task", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("domain", no_wrap=True)
    for column in ("parent", "created"):
        table.add_column(column, no_wrap=True)
    table.add_column("held-out acc", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for row in rows:
        accuracy = held_out_accuracy(row.metrics)
        table.add_row(
            row.version,
            row.task,
            row.status,
            row.domain,
            row.parent or "-",
            row.created_at.strftime("%Y-%m-%d %H:%M"),
            "-" if accuracy is None else f"{accuracy:.4f}",
            row.reason or "",
        )
    output_console().print(table)


def _models_show(registry: Registry, args: argparse.Namespace) -> None:
    """Print one version's row, model card and events, as text or one JSON object."""
    from dataclasses import asdict

    info = registry.show(args.version)
    shown = {
        **_version_json(info.row),
        "serving": info.serving,
        "card": asdict(info.card) if info.card is not None else None,
        "events": [{**asdict(event), "at": event.at.isoformat()} for event in info.events],
    }
    if args.json:
        sys.stdout.write(json.dumps(shown, ensure_ascii=False) + "\n")
        return
    out = output_console()
    row = info.row
    out.print(f"[bold]{row.version}[/bold] ({row.task}, {row.status}{', serving' if info.serving else ''})")
    for name in ("parent", "created_at", "experience_id", "span_start", "span_end", "reason", "status_at"):
        value = shown[name]
        out.print(f"  {name}: {'-' if value is None else value}", highlight=False)
    for event in info.events:
        out.print(
            f"  {event.at:%Y-%m-%d %H:%M:%S} {event.outcome} {event.version} (previous {event.previous or '-'}, "
            f"by {event.source}){': ' + event.reason if event.reason else ''}",
            highlight=False,
        )
    out.print("metrics:")
    out.print_json(json.dumps(shown["metrics"] or {}))
    if info.card is None:
        out.print("model card: none on disk", highlight=False)
    else:
        out.print("model card:")
        out.print_json(json.dumps(shown["card"]))


def _version_json(row: VersionRow) -> dict[str, Any]:
    """Return a version row as a JSON-ready dict (times as ISO 8601)."""
    from dataclasses import asdict

    return {key: value.isoformat() if hasattr(value, "isoformat") else value for key, value in asdict(row).items()}


def cmd_config(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Print the effective configuration as JSON."""
    sys.stdout.write(config.model_dump_json(indent=2) + "\n")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, AppConfig, Console], int]] = {
    "kafka": cmd_kafka,
    "bootstrap": cmd_bootstrap,
    "score": cmd_score,
    "query": cmd_query,
    "search": cmd_search,
    "export": cmd_export,
    "migrate": cmd_migrate,
    "compact": cmd_compact,
    "demo": cmd_demo,
    "replay": cmd_replay,
    "label": cmd_label,
    "plot": cmd_plot,
    "bench": cmd_bench,
    "subscribe": cmd_subscribe,
    "unsubscribe": cmd_unsubscribe,
    "subscriptions": cmd_subscriptions,
    "dispatch": cmd_dispatch,
    "models": cmd_models,
    "learn": cmd_learn,
    "config": cmd_config,
}


# Piped or redirected, rich would assume 80 columns and cut table cells ("consum…"); a file has no width.
PIPED_WIDTH = 10_000


def output_console(stderr: bool = False) -> Console:
    """Return a console for command output: the terminal's width on a terminal, never truncating when piped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finpulse")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def one_line(text: str) -> str:
    """Return `text` on one line: a driver's message (libpq's through DuckDB, say) may carry line breaks."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are one line on stderr."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    clientlog.install()  # kafka-python: warnings and errors once per kind per 5 minutes, nothing below
    # With --json, stdout carries only the JSON line; everything for people goes to stderr.
    console = output_console(stderr=bool(getattr(args, "json", False)))
    try:
        config = load_config(args.config, overrides=_overrides(args))
        return COMMANDS[args.command](args, config, console)
    except ConfigError as e:
        sys.stderr.write(f"finpulse: {one_line(str(e))}\n")
        return 2
    except KNOWN_ERRORS as e:
        sys.stderr.write(f"finpulse {args.command}: error: {one_line(str(e))}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
