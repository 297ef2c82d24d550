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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console

from finpulse.config import AppConfig, load_config
from finpulse.errors import ConfigError, FinpulseError
from learner.errors import LearnerError
from monitor.errors import MonitorError
from storage.errors import StorageError
from stream.errors import StreamError

KNOWN_ERRORS = (FinpulseError, LearnerError, MonitorError, StorageError, StreamError)
if TYPE_CHECKING:
    from monitor.dispatcher import DeliveryEvent
    from monitor.subscriptions import Subscription
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


def key_value(text: str) -> tuple[str, str]:
    """Parse `section.field=value`."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"expected section.field=value, got {text!r}")
    return key.strip().replace("-", "_"), value


def _common() -> Parser:
    common = Parser(add_help=False)
    g = common.add_argument_group("configuration (flags override env, env overrides the file)")
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
    g.add_argument(
        "--bootstrap-servers",
        help="Kafka cluster to use (kafka.bootstrap_servers); default: the local broker",
    )
    g.add_argument("--duckdb-path", type=Path, help="DuckDB history file (storage.duckdb_path)")
    g.add_argument("--adapters-dir", type=Path, help="adapter directory (model.adapters_dir)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (scorer.device)")
    g.add_argument("--metrics-port", type=int, help="port of /metrics, 0 = any free one (metrics.port)")
    g.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return common


def build_parser() -> Parser:
    """Build the argument parser of every sub-command."""
    common = _common()
    parser = Parser(prog="finpulse", description="Real-time financial news monitor that keeps learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    kafka = sub.add_parser("kafka", parents=[common], help="start, stop or inspect the local Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=int, help="listener port for `start` (default: a free one)")
    kafka.add_argument("--data-dir", type=Path, help="where the broker keeps its data (kafka.data_dir)")

    boot = sub.add_parser("bootstrap", parents=[common], help="train the first adapter versions from the TFNS splits")
    boot.add_argument("--task", choices=["sentiment", "topic"], action="append", help="only this task (repeatable)")
    boot.add_argument("--limit", type=positive_int, help="use only the first N texts of each split (smoke runs)")

    score = sub.add_parser("score", parents=[common], help="run a scorer: news.raw → news.scored + DuckDB")
    score.add_argument(
        "--max-messages", type=positive_int, help="stop after this many messages (default: run until Ctrl-C)"
    )

    query = sub.add_parser("query", parents=[common], help="run a read-only SQL query on the history")
    query.add_argument("sql", help='e.g. "SELECT topic, count(*) FROM news GROUP BY 1"')
    query.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    query.add_argument("--max-rows", type=positive_int, default=100, help="rows shown in table format")

    demo = sub.add_parser("demo", parents=[common], help="replay a real labelled stream through the pipeline")
    demo.add_argument("--messages", type=positive_int, default=1000, help="labelled messages to replay (default 1000)")
    demo.add_argument(
        "--rate", type=non_negative_float, default=0.0, help="messages per second, 0 = as fast as possible"
    )
    demo.add_argument("--json", action="store_true", help="print only the summary, as one JSON line")
    demo.add_argument("--no-alerts", action="store_true", help="skip Prometheus, Alertmanager and the sell-off alert")

    bench = sub.add_parser("bench", parents=[common], help="benchmarks (baseline and finpulse side by side)")
    bench.add_argument("which", choices=["score"])
    bench.add_argument("--messages", type=positive_int, default=1000, help="messages per contender (default 1000)")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.add_argument(
        "--out", type=Path, default=Path("results/bench-score.json"), help="where to write the JSON result"
    )

    subscribe = sub.add_parser("subscribe", parents=[common], help="add an alert subscription (a webhook + filters)")
    subscribe.add_argument("name", help="a unique name for the subscription, e.g. fx-desk")
    subscribe.add_argument("--url", required=True, help="http(s) webhook that receives the alerts")
    subscribe.add_argument("--topic", action="append", default=[], help="only alerts on this topic (repeatable)")
    subscribe.add_argument("--ticker", action="append", default=[], help="only alerts on this ticker (repeatable)")
    subscribe.add_argument(
        "--min-severity", choices=["info", "warning", "critical"], default="info", help="least severity delivered"
    )

    unsubscribe = sub.add_parser("unsubscribe", parents=[common], help="remove a subscription by id or name")
    unsubscribe.add_argument("subscription", help="id or name")

    subs = sub.add_parser("subscriptions", parents=[common], help="list alert subscriptions")
    subs.add_argument("--all", action="store_true", help="include removed subscriptions")

    dispatch = sub.add_parser(
        "dispatch", parents=[common], help="run the dispatcher: Alertmanager webhook → subscribers"
    )
    dispatch.add_argument("--port", type=int, help="listen port (dispatcher.port); 0 = any free one")

    sub.add_parser("config", parents=[common], help="print the effective configuration")
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

    tasks = tuple(args.task) if args.task else ("sentiment", "topic")
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
        f"duplicates {stats.duplicates}"
    )
    return 0


def cmd_query(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run a read-only query and print the result."""
    from storage import History

    result = History(config.storage).query(args.sql)
    if args.format == "csv":
        result.to_csv(sys.stdout)
    elif args.format == "json":
        sys.stdout.write(result.to_json() + "\n")
    else:
        Console().print(result.to_table(max_rows=args.max_rows))
    return 0


def cmd_demo(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run the demo and print its summary."""
    from finpulse.demo import print_summary, run_demo, summary_json

    summary = run_demo(config, args.messages, args.rate, console, quiet=args.json, alerts=not args.no_alerts)
    if args.json:
        sys.stdout.write(summary_json(summary) + "\n")
    else:
        print_summary(summary, console)
    return 0


def cmd_bench(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Run a benchmark, write its JSON and print it."""
    from finpulse.bench import run_bench, write_result

    result = run_bench(config, args.messages, config.storage.duckdb_path.parent / "bench", console)
    write_result(result, args.out)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        console.print_json(json.dumps(result))
        console.print(f"written to {args.out}")
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
    )
    console.print(f"subscription {sub.id} {sub.name!r} → {sub.target_url}: {_filters(sub)}", highlight=False)
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
    """List subscriptions as a table."""
    from rich.table import Table

    from monitor.subscriptions import list_subscriptions
    from storage import AlertStore

    table = Table(title="subscriptions", title_justify="left")
    for column in ("id", "name", "webhook", "filters", "active"):
        table.add_column(column)
    for sub in list_subscriptions(AlertStore(config.storage), include_inactive=args.all):
        table.add_row(str(sub.id), sub.name, sub.target_url, _filters(sub), "yes" if sub.active else "no")
    Console().print(table)
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
    console.print(f"dispatching Alertmanager notifications posted to {dispatcher.webhook_url}")
    try:
        stop.wait()
    finally:
        dispatcher.stop()
    return 0


def cmd_config(args: argparse.Namespace, config: AppConfig, console: Console) -> int:
    """Print the effective configuration as JSON."""
    sys.stdout.write(config.model_dump_json(indent=2) + "\n")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, AppConfig, Console], int]] = {
    "kafka": cmd_kafka,
    "bootstrap": cmd_bootstrap,
    "score": cmd_score,
    "query": cmd_query,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "subscribe": cmd_subscribe,
    "unsubscribe": cmd_unsubscribe,
    "subscriptions": cmd_subscriptions,
    "dispatch": cmd_dispatch,
    "config": cmd_config,
}


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are one line on stderr."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # With --json, stdout carries only the JSON line; everything for people goes to stderr.
    console = Console(stderr=bool(getattr(args, "json", False)))
    try:
        config = load_config(args.config, overrides=_overrides(args))
        return COMMANDS[args.command](args, config, console)
    except ConfigError as e:
        sys.stderr.write(f"finpulse: {e}\n")
        return 2
    except KNOWN_ERRORS as e:
        sys.stderr.write(f"finpulse {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
