"""Faults that once stopped the stream, against the real broker: each now ends scored, dead-lettered or waited out.

Each case here crashed or misled a scorer on the landed main of an earlier release: a valid message without
`source`, lone surrogates, 100,000-deep JSON, timestamps that overflow in UTC, invisible text, empty tickers and
NUL in ids (crash loops or meaningless rows); storage held by an analyst (the scorer exited, lag read 0); a
broker that went away (no finpulse line said so).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from test_scorer_e2e import committed_equals_end, produce, read_all

from finpulse.replay import labelled_stream, news_messages
from learner.config import ModelConfig
from learner.model import Classifier
from monitor.metrics import ScorerMetrics
from storage import History, LakeConfig, StorageConfig
from stream.admin import ensure_topics
from stream.broker import LocalBroker
from stream.config import ScorerConfig, TopicNames
from stream.scorer import Scorer, ScorerStats

pytestmark = pytest.mark.kafka
OK_TIME = "2024-03-01T12:00:00Z"


@pytest.fixture(scope="module")
def classifier(adapters_dir: Path, request: pytest.FixtureRequest) -> Classifier:
    # The torch engine unless a test asks for each engine (indirect parametrisation: "torch", "onnx").
    engine = getattr(request, "param", "torch")
    return Classifier.from_store(ModelConfig(adapters_dir=adapters_dir, engine=engine), "cpu")


def _topics(bootstrap: str) -> TopicNames:
    prefix = f"f{uuid.uuid4().hex[:8]}."
    names = TopicNames(
        raw=prefix + "raw",
        scored=prefix + "scored",
        labels=prefix + "labels",
        dlq=prefix + "dlq",
        updates=prefix + "up",
    )
    ensure_topics(bootstrap, [names.raw, names.scored, names.dlq], partitions=3)
    return names


def _config(**changes: object) -> ScorerConfig:
    return ScorerConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=32, max_wait_ms=100, **changes)  # type: ignore[arg-type]


def _message(**fields: object) -> bytes:
    # ensure_ascii keeps a lone surrogate as the escape \ud800, which is what a producer puts on the wire.
    return json.dumps({"text": "Oil slides", "published_at": OK_TIME, **fields}).encode("utf-8")


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class _Running:
    """A scorer on a thread; `error` keeps whatever escaped its run loop."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.stats: ScorerStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.scorer.run(self.halt)
        except BaseException as e:
            self.error = e

    def __enter__(self) -> _Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.thread.join(timeout=60)
        self.scorer.close()


# (kind, value, expected reason or None for "scored"): each of these crashed a scorer or was stored as meaningful.
CASES: list[tuple[str, bytes, str | None]] = [
    ("no_source", _message(id="ok-no-source"), None),
    ("null_source", _message(id="ok-null-source", source=None, tickers=None), None),
    ("surrogate_text", _message(id="s-text", text="oil \ud800 slides"), "bad_characters"),
    ("surrogate_id", _message(id="s-\ud800"), "bad_characters"),
    ("surrogate_source", _message(id="s-source", source="wire\udfff"), "bad_characters"),
    ("surrogate_ticker", _message(id="s-ticker", tickers=["XOM\ud800"]), "bad_characters"),
    # 100,000 deep is refused by size before parsing (6 x max_text_bytes + 32 KiB); 12,000 reaches the parser.
    ("nested_arrays", b"[" * 100_000 + b"]" * 100_000, "oversized"),
    ("nested_objects", b'{"a":' * 12_000 + b"1" + b"}" * 12_000, "invalid_json"),
    ("year_one_overflow", _message(id="t-early", published_at="0001-01-01T00:00:00+05:00"), "bad_timestamp"),
    ("year_9999_overflow", _message(id="t-late", published_at="9999-12-31T23:59:59-05:00"), "bad_timestamp"),
    ("zero_width_text", _message(id="zw", text="\u200b\u200c\u200d\ufeff\u2060"), "empty"),
    ("empty_tickers", _message(id="tk", tickers=["", "  ", "$"]), "bad_ticker"),
    ("nul_in_id", _message(id="a\u0000b"), "bad_characters"),
]


@pytest.mark.parametrize("classifier", ["torch", "onnx"], indirect=True)
def test_every_kind_that_once_crashed_a_scorer_ends_scored_or_dead_lettered(
    kafka_bootstrap: str, classifier: Classifier, tmp_path: Path
) -> None:
    topics, config = _topics(kafka_bootstrap), _config()
    good = news_messages(labelled_stream(20))
    produce(kafka_bootstrap, topics.raw, [(None, value) for _, value, _ in CASES] + good)
    total = len(CASES) + len(good)
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    scorer = Scorer(kafka_bootstrap, topics, config, classifier, history, ScorerMetrics())
    try:
        stats = scorer.run(threading.Event(), until=lambda s: s.consumed >= total)
    finally:
        scorer.close()

    expected_dead = sorted(reason for _, _, reason in CASES if reason is not None)
    assert (stats.consumed, stats.dead_lettered) == (total, len(expected_dead))
    dlq = [json.loads(v) for v in read_all(kafka_bootstrap, topics.dlq)]
    assert sorted(d["reason"] for d in dlq) == expected_dead
    rows = dict(history.query("SELECT id, source FROM news").rows)
    assert rows["ok-no-source"] is None and rows["ok-null-source"] is None
    assert len(rows) == len(good) + 2
    assert committed_equals_end(kafka_bootstrap, topics.raw, config.group_id)


def _hold_writers_turn(lake_dir: Path) -> subprocess.Popen[str]:
    """Hold the lake's writers' turn from another process (a writer wedged mid-commit) until stdin closes."""
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lake_dir / 'catalog.sqlite.writers.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _hold_analyst_session(history: History) -> subprocess.Popen[str]:
    """Open the lake from stock duckdb in another process, as an analyst's notebook does, and keep it open."""
    statements = history.lake.analyst_statements()
    code = (
        "import duckdb, json, sys\n"
        "con = duckdb.connect()\n"
        f"for statement in json.loads({json.dumps(json.dumps(statements))}):\n"
        "    con.execute(statement)\n"
        "con.execute('BEGIN TRANSACTION')\n"
        "print(con.execute('SELECT count(*) FROM news').fetchone()[0], flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip().isdigit()
    return holder


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=30)


def test_a_wedged_history_pauses_the_scorer_with_true_lag_and_an_analyst_never_does(
    kafka_bootstrap: str, classifier: Classifier, tmp_path: Path
) -> None:
    topics, config = _topics(kafka_bootstrap), _config(lag_interval_s=0.5)
    lake_dir = tmp_path / "lake"
    history = History(
        StorageConfig(duckdb_path=tmp_path / "h.duckdb", lake=LakeConfig(data_dir=lake_dir, lock_timeout_s=1))
    )
    history.ensure_schema()
    metrics = ScorerMetrics()
    stream = news_messages(labelled_stream(60))
    first, second, third = stream[:20], stream[20:40], stream[40:]
    with _Running(Scorer(kafka_bootstrap, topics, config, classifier, history, metrics)) as running:
        # An analyst holding a read transaction open on the lake: the scorer does not wait on it.
        analyst = _hold_analyst_session(history)
        try:
            produce(kafka_bootstrap, topics.raw, first)
            _wait(lambda: history.count() == 20, 120, "rows while an analyst holds the lake open")
        finally:
            _release(analyst)
        holder = _hold_writers_turn(lake_dir)
        try:
            produce(kafka_bootstrap, topics.raw, second)

            def paused_with_lag() -> bool:
                paused = metrics.registry.get_sample_value("finpulse_scorer_paused", {"stage": "history"}) or 0
                samples = [s for f in metrics.consumer_lag.collect() for s in f.samples]
                lag = sum(s.value for s in samples if s.name == "finpulse_consumer_lag")
                return paused >= 1 and lag >= len(second) and running.thread.is_alive()

            # Longer than lock_timeout_s (a scorer used to exit here), and the lag tells the truth meanwhile.
            _wait(paused_with_lag, 60, "the scorer to pause with the backlog as its lag")
        finally:
            _release(holder)
        produce(kafka_bootstrap, topics.raw, third)
        _wait(lambda: history.count() == 60, 120, "the held-back rows after the writer let go")
        _wait(lambda: committed_equals_end(kafka_bootstrap, topics.raw, config.group_id), 60, "the commit")
        assert running.error is None and running.thread.is_alive()
    assert history.query("SELECT count(DISTINCT id) FROM news").rows[0][0] == 60
    assert read_all(kafka_bootstrap, topics.dlq) == []  # an outage is waited out, never blamed on the records


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.slow
def test_a_broker_that_goes_away_and_comes_back_gets_one_line_each_and_loses_nothing(
    own_broker: LocalBroker, classifier: Classifier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = own_broker.status()
    assert status.bootstrap is not None
    bootstrap = status.bootstrap
    topics, config = _topics(bootstrap), _config(lag_interval_s=0.5)
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    items = news_messages(labelled_stream(60))
    caplog.set_level(logging.INFO, logger="stream")
    with _Running(Scorer(bootstrap, topics, config, classifier, history, ScorerMetrics())) as running:
        produce(bootstrap, topics.raw, items[:30])
        _wait(lambda: history.count() == 30, 120, "rows before the outage")
        own_broker.stop()
        _wait(lambda: "event=broker_lost" in caplog.text, 60, "the broker_lost line")
        own_broker.start()
        _wait(lambda: "event=broker_back" in caplog.text, 120, "the broker_back line")
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for key, value in items[30:]:
            producer.send(topics.raw, key=key, value=value)
        producer.flush(timeout=60)
        producer.close()
        _wait(lambda: history.count() == 60, 180, "rows after the outage")
        assert running.error is None and running.thread.is_alive()
    finpulse_lines = [r.getMessage() for r in caplog.records if r.name.startswith("stream")]
    assert sum("event=broker_lost" in line for line in finpulse_lines) == 1
    assert sum("event=broker_back" in line for line in finpulse_lines) == 1
    assert history.query("SELECT count(DISTINCT id) FROM news").rows[0][0] == 60
