"""The command line: one-line errors naming what to fix (bad flags and settings, servers it cannot reach), query
output formats, and the demo's JSON summary."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finpulse.cli import main
from learner.model import cpu_has_amx
from storage import History, NewsRow, StorageConfig


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--messages", "-3"], "argument --messages: expected a whole number ≥ 1, got '-3'"),
        (["demo", "--rate", "fast"], "argument --rate: expected a number ≥ 0, got 'fast'"),
        (["query"], "the following arguments are required: sql"),
        (["demo", "--set", "max_batch=3"], "argument --set: expected section.field=value, got 'max_batch=3'"),
        (["kafka", "restart"], "argument action: invalid choice: 'restart'"),
        (["query", "SELECT 1", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (
            ["bench", "cl", "--strategies", "naive,lwf"],
            "argument --strategies: expected some of naive,replay,ewc,replay_ewc,joint, got 'naive,lwf'",
        ),
    ],
)
def test_bad_arguments_get_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "--help" in err


def test_strategies_are_for_the_benchmark_from_scratch_only(capsys: pytest.CaptureFixture[str]) -> None:
    # The from-champion run compares its two strategies; it refuses to drop one before training anything.
    assert main(["bench", "cl", "--from-champion", "--strategies", "naive"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--strategies is for bench cl without --from-champion" in err


def test_bad_config_names_the_field(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FINPULSE_SCORER__MAX_WAIT_MS", "-1")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scorer.max_wait_ms" in err and "FINPULSE_SCORER__MAX_WAIT_MS" in err


def test_bad_setting_from_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "scorer.max_batch=0"]) == 2
    assert "scorer.max_batch" in capsys.readouterr().err


def test_config_prints_the_effective_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "scorer.max_batch=7", "--bootstrap-servers", "b1:9092"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scorer"]["max_batch"] == 7 and printed["kafka"]["bootstrap_servers"] == "b1:9092"


def _history(path: Path) -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    rows = [
        NewsRow(
            id=f"n{i}",
            published_at=now,
            source="wire",
            text=f"text {i}",
            tickers=("AAPL",),
            topic="Markets",
            topic_confidence=0.9,
            sentiment=s,
            sentiment_confidence=0.8,
            sentiment_negative=0.1,
            sentiment_neutral=0.1,
            sentiment_positive=0.8,
            topic_version="topic-v1",
            sentiment_version="sentiment-v1",
            scored_at=now,
        )
        for i, s in enumerate(["positive", "negative", "negative"])
    ]
    History(StorageConfig(duckdb_path=path)).write_batch(rows)


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_formats(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.duckdb"
    _history(db)
    sql = "SELECT sentiment, count(*) AS n FROM news GROUP BY 1 ORDER BY 1"
    assert main(["query", sql, "--duckdb-path", str(db), "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "csv":
        assert list(csv.reader(io.StringIO(out))) == [["sentiment", "n"], ["negative", "2"], ["positive", "1"]]
    elif fmt == "json":
        assert json.loads(out) == [{"sentiment": "negative", "n": 2}, {"sentiment": "positive", "n": 1}]
    else:
        assert "negative" in out and "positive" in out and "sentiment" in out


def test_query_refuses_writes_and_missing_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "SELECT 1", "--duckdb-path", str(tmp_path / "none.duckdb")]) == 1
    assert "run the scorer or the demo first" in capsys.readouterr().err
    db = tmp_path / "h.duckdb"
    _history(db)
    assert main(["query", "DELETE FROM news", "--duckdb-path", str(db)]) == 1
    assert "only read queries are allowed" in capsys.readouterr().err


def test_kafka_status_of_a_stopped_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kafka", "status", "--data-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out


@pytest.mark.kafka
def test_demo_json_summary(
    kafka_bootstrap: str, adapters_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "demo",
        "--messages",
        "60",
        "--json",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--duckdb-path",
        str(tmp_path / "finpulse.duckdb"),
        "--adapters-dir",
        str(adapters_dir),
        "--device",
        "cpu",
        "--no-alerts",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "--json prints exactly one line on stdout"
    summary = json.loads(out[0])
    selloff = summary["messages"] - 60  # the oil sell-off segment follows the 60 labelled messages
    assert selloff > 100
    assert (summary["scored"], summary["dead_lettered"], summary["duplicates"]) == (60 + selloff, 9, 5)
    assert summary["alerts"] is None and summary["fired"] == []
    assert summary["throughput_per_s"] > 0 and 0 <= summary["sentiment_accuracy"] <= 1
    # The analysts labelled the first 60%: 36 labels, fewer than an experience needs (learner.min_labels 50).
    learning = summary["learning"]
    assert learning["labels_sent"] == 36 and learning["later_labelled"] == 24
    assert (learning["promoted"], learning["reason"], summary["promoted"]) == (False, "no experience formed", False)
    assert 0 <= summary["sentiment_accuracy_before"] <= 1 and 0 <= summary["sentiment_accuracy_after"] <= 1
    # Nothing was promoted, so the rows' stored probabilities are the default champion's: the same calibration
    # error as its predictions now (a column read in the wrong order would move it far).
    assert 0 <= summary["sentiment_ece_before"] <= 1
    assert summary["sentiment_ece_after"] == pytest.approx(summary["sentiment_ece_before"], abs=0.02)
    assert Path(summary["duckdb_path"]).is_file()
    assert History(StorageConfig(duckdb_path=Path(summary["duckdb_path"]))).count() == 60 + selloff


@pytest.mark.kafka
def test_bench_score_reports_both_contenders(
    kafka_bootstrap: str, adapters_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "bench.json"
    argv = [
        "bench",
        "score",
        "--messages",
        "24",
        "--json",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--duckdb-path",
        str(tmp_path / "finpulse.duckdb"),
        "--adapters-dir",
        str(adapters_dir),
        "--device",
        "cpu",
        "--out",
        str(out_file),
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result == json.loads(out_file.read_text())
    assert result["rows"] == {"baseline": 24, "finpulse": 24}
    assert result["device"] == "cpu" and result["baseline_per_s"] > 0 and result["finpulse_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["finpulse_per_s"] / result["baseline_per_s"], rel=0.02)
    assert result["batches"] >= 1 and result["model_ceiling_per_s"] > 0
    # The CPU it ran on, read from /proc/cpuinfo: its AMX flag is the one engine auto chose by.
    assert result["cpu"]["model"] != "unknown"
    assert ("amx_bf16" in result["cpu"]["features"]) == cpu_has_amx()


def test_subscription_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--duckdb-path", str(tmp_path / "h.duckdb")]
    assert (
        main(
            [
                "subscribe",
                "fed-desk",
                "--url",
                "https://hooks.example.com/x",
                "--topic",
                "Fed / Central Banks",
                "--min-severity",
                "warning",
                *db,
            ]
        )
        == 0
    )
    assert "subscription 1 'fed-desk'" in capsys.readouterr().out
    assert main(["subscribe", "typo", "--url", "https://hooks.example.com/y", "--topic", "Fed", *db]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'Fed / Central Banks'" in err
    assert main(["subscribe", "bad-url", "--url", "ftp://hooks.example.com", *db]) == 1
    assert "target_url" in capsys.readouterr().err
    assert main(["subscriptions", *db]) == 0
    listed = capsys.readouterr().out
    assert "fed-desk" in listed and "typo" not in listed
    assert main(["unsubscribe", "fed-desk", *db]) == 0
    assert "removed subscription 1 'fed-desk'" in capsys.readouterr().out
    assert main(["subscriptions", *db]) == 0
    assert "fed-desk" not in capsys.readouterr().out
    assert main(["unsubscribe", "fed-desk", *db]) == 1
    assert "finpulse subscriptions" in capsys.readouterr().err


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_shows_the_selloff_alert_reaching_its_subscriber(
    kafka_bootstrap: str, adapters_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finpulse.alerting import alerting_available

    if alerting_available() is not None:
        pytest.skip("Prometheus and Alertmanager are not installed")
    argv = [
        "demo",
        "--messages",
        "100",
        "--json",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--duckdb-path",
        str(tmp_path / "finpulse.duckdb"),
        "--adapters-dir",
        str(adapters_dir),
        "--device",
        "cpu",
        "--no-learn",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip())
    alerts = summary["alerts"]
    # Every alert that fired is in the summary, whoever it was routed to.
    assert ("NegativeSentimentSpike", "Energy / Oil") in {(f["alertname"], f["about"]) for f in summary["fired"]}
    assert alerts["topic"] == "Energy / Oil" and alerts["subscriber"] == "energy-desk"
    assert 0 < alerts["fired_after_s"] <= 60
    assert alerts["resolved_after_s"] is not None and alerts["resolved_after_s"] > alerts["fired_after_s"]
    assert alerts["other_subscriber_notifications"] == 0
    assert "energy-desk received FIRING" in captured.err


def _closed_port() -> str:
    """Return `127.0.0.1:PORT` for a port nothing listens on (bound once by this process, then freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def not_kafka() -> Iterator[str]:
    """Yield `127.0.0.1:PORT` of a listener that answers every connection as a web server would."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("closed port", "connection refused"),
        ("unresolvable name", "host does not resolve"),
        ("not a Kafka broker", "not a Kafka broker"),
    ],
    ids=["closed-port", "unresolvable-name", "not-kafka"],
)
def test_an_unusable_bootstrap_fails_fast_with_one_line(
    kind: str, what: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "closed port":
        bootstrap = _closed_port()
    elif kind == "unresolvable name":
        bootstrap = "no-such-host.invalid:9092"  # .invalid never resolves (RFC 2606)
    else:
        bootstrap = request.getfixturevalue("not_kafka")
    env = {**os.environ, "FINPULSE_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "FINPULSE_KAFKA__DATA_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "finpulse.cli", "score", "--duckdb-path", str(tmp_path / "h.duckdb")]
    started = time.monotonic()
    # The real command in its own process: what an operator sees, kafka-python's threads and logging included.
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    wall_s = time.monotonic() - started
    request.node.user_properties.append(("wall_s", round(wall_s, 2)))  # measured, not asserted (target ≤ 10 s)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("finpulse score: error: cannot reach Kafka at ")
    assert f"{bootstrap} ({what}" in lines[0] and "kafka.bootstrap_servers" in lines[0]
    assert "FINPULSE_KAFKA__BOOTSTRAP_SERVERS" in lines[0]


@pytest.mark.kafka
def test_the_preflight_passes_a_real_broker_even_after_a_dead_server(kafka_bootstrap: str) -> None:
    from stream.admin import require_broker

    require_broker(kafka_bootstrap)
    require_broker(f"{_closed_port()},{kafka_bootstrap}")  # clients bootstrap from any server that answers


# A password no error line may show.
CATALOG_PASSWORD = "pw-never-printed-7"


def _unreachable_catalog(kind: str) -> tuple[str, str]:
    """Return the DSN of a PostgreSQL catalog that cannot be reached, and the `host:port` an error names."""
    if kind == "closed port":
        host, _, port = _closed_port().partition(":")
    else:
        host, port = "no-such-host.invalid", "5432"
    return f"host={host} port={port} dbname=finpulse user=finpulse password={CATALOG_PASSWORD}", f"{host}:{port}"


CATALOG_FAILURES = pytest.mark.parametrize(
    ("kind", "what"),
    [("closed port", "connection refused"), ("unresolvable name", "host does not resolve")],
    ids=["closed-port", "unresolvable-name"],
)


@CATALOG_FAILURES
@pytest.mark.parametrize("argv", [["query", "SELECT 1"], ["score"]], ids=["query", "score"])
def test_an_unreachable_catalog_fails_fast_with_one_line(
    kind: str, what: str, argv: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn, server = _unreachable_catalog(kind)
    env = {
        **os.environ,
        "FINPULSE_STORAGE__LAKE__CATALOG": "postgres",
        "FINPULSE_STORAGE__LAKE__POSTGRES_DSN": dsn,
        "FINPULSE_STORAGE__DUCKDB_PATH": str(tmp_path / "h.duckdb"),
        "FINPULSE_KAFKA__DATA_DIR": str(tmp_path / "kafka"),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "finpulse.cli", *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    request.node.user_properties.append(("wall_s", round(time.monotonic() - started, 2)))  # target ≤ 10 s
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"finpulse {argv[0]}: error: cannot reach PostgreSQL (the lake's catalog) at ")
    assert f"{server} ({what}" in lines[0]
    assert "storage.lake.postgres_dsn" in lines[0] and "FINPULSE_STORAGE__LAKE__POSTGRES_DSN" in lines[0]
    assert CATALOG_PASSWORD not in done.stderr + done.stdout
    assert not (tmp_path / "kafka").exists(), "no broker was started for a command that cannot go on"


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "oil"],
        ["export", "out.parquet"],
        ["migrate"],
        ["compact"],
        ["label", "suggest"],
        ["label", "send", "--query", "SELECT id, text, sentiment FROM news"],
        ["plot", "sentiment"],
        ["learn", "--once"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_every_command_on_the_lake_checks_its_catalog_first(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, server = _unreachable_catalog("closed port")
    monkeypatch.setenv("FINPULSE_STORAGE__LAKE__CATALOG", "postgres")
    monkeypatch.setenv("FINPULSE_STORAGE__LAKE__POSTGRES_DSN", dsn)
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--duckdb-path", str(tmp_path / "h.duckdb")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach PostgreSQL (the lake's catalog) at {server} (connection" in err
    assert CATALOG_PASSWORD not in err


def test_a_catalog_error_of_libpq_is_one_line_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Unix socket is left to libpq, whose message spans two lines.
    socket_dir = tmp_path / "no-server-here"
    dsn = f"host={socket_dir} dbname=finpulse user=finpulse password={CATALOG_PASSWORD}"
    monkeypatch.setenv("FINPULSE_STORAGE__LAKE__CATALOG", "postgres")
    monkeypatch.setenv("FINPULSE_STORAGE__LAKE__POSTGRES_DSN", dsn)
    assert main(["query", "SELECT 1", "--duckdb-path", str(tmp_path / "h.duckdb")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("finpulse query: error: ") and str(socket_dir) in err
    assert CATALOG_PASSWORD not in err


@pytest.mark.parametrize(
    ("dsn", "servers"),
    [
        ("host=db dbname=f", [("db", 5432)]),
        ("host=db port=6432 dbname=f", [("db", 6432)]),
        ("host=a,b port=1,2 dbname=f", [("a", 1), ("b", 2)]),
        ("host=a,b port=7 dbname=f", [("a", 7), ("b", 7)]),
        ("host=db hostaddr=10.0.0.5 port=7 dbname=f", [("10.0.0.5", 7)]),
        ("host=/var/run/postgresql dbname=f", []),  # a Unix socket: libpq's to check
        ("host=/tmp,db dbname=f", [("db", 5432)]),
        ("dbname=f", []),  # libpq's defaults (PGHOST, the local socket)
    ],
)
def test_the_catalog_servers_probed(dsn: str, servers: list[tuple[str, int]]) -> None:
    from storage.lake_config import parse_dsn
    from storage.preflight import _postgres_servers

    assert _postgres_servers(parse_dsn(dsn)) == servers


def test_the_catalog_check_passes_when_any_server_listens(tmp_path: Path) -> None:
    from storage.lake_config import LakeConfig
    from storage.preflight import require_catalog

    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        closed = _closed_port().partition(":")[2]
        dsn = f"host=127.0.0.1,127.0.0.1 port={closed},{port} dbname=finpulse password={CATALOG_PASSWORD}"
        lake = LakeConfig(data_dir=tmp_path, catalog="postgres", postgres_dsn=dsn)
        require_catalog(StorageConfig(duckdb_path=tmp_path / "h.duckdb", lake=lake))  # libpq tries each in turn


def test_a_silent_catalog_server_costs_the_timeout_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.preflight import _probe_tcp

    def dropped(*args: object, **kwargs: object) -> socket.socket:
        time.sleep(2)  # longer than the check waits: a host whose packets a firewall drops
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", dropped)
    started = time.monotonic()
    assert _probe_tcp([("db", 5432)], timeout_s=0.2) == {"db:5432": "no connection within 0.2 s"}
    assert time.monotonic() - started < 1
