"""The scorer against the real broker: exact rows, dead letters with reasons, committed offsets, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import fresh_postgres_database
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from finpulse.replay import ReplayProducer, labelled_stream, malformed_values, news_messages
from learner.config import ModelConfig
from learner.model import Classifier
from monitor.config import MetricsConfig
from monitor.metrics import MetricsServer, ScorerMetrics
from storage import History, LakeConfig, StorageConfig
from stream.admin import ensure_topics
from stream.config import ScorerConfig, TopicNames
from stream.scorer import Scorer

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier(adapters_dir: Path, request: pytest.FixtureRequest) -> Classifier:
    # The torch engine unless a test asks for each engine (indirect parametrisation: "torch", "onnx").
    engine = getattr(request, "param", "torch")
    return Classifier.from_store(ModelConfig(adapters_dir=adapters_dir, engine=engine), "cpu")


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicNames:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    names = TopicNames(
        raw=prefix + "raw",
        scored=prefix + "scored",
        labels=prefix + "labels",
        dlq=prefix + "dlq",
        updates=prefix + "updates",
    )
    ensure_topics(kafka_bootstrap, [names.raw, names.scored, names.dlq], partitions=3)
    return names


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=3000,
    )
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(partitions)
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            values.extend(r.value for r in batch)
    consumer.close()
    return values


def committed_equals_end(bootstrap: str, topic: str, group: str) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    ends = consumer.end_offsets(partitions)
    ok = all((consumer.committed(tp) or 0) == ends[tp] for tp in partitions)
    consumer.close()
    return ok


@pytest.mark.parametrize("classifier", ["torch", "onnx"], indirect=True)
def test_real_messages_and_malformed_ones(
    kafka_bootstrap: str, topics: TopicNames, classifier: Classifier, tmp_path: Path
) -> None:
    config = ScorerConfig(
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        max_batch=32,
        max_wait_ms=100,
        max_text_bytes=2048,
        watchlist=("SPY", "TSLA", "AAPL"),
    )
    items = labelled_stream(80)
    good = news_messages(items)
    bad = malformed_values(config.max_text_bytes)
    duplicates = good[:3]
    produce(kafka_bootstrap, topics.raw, good + [(f"bad-{n}".encode(), v) for n, (_, v) in enumerate(bad)] + duplicates)
    total = len(good) + len(bad) + len(duplicates)

    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    metrics = ScorerMetrics()
    server = MetricsServer(metrics.registry, MetricsConfig(port=0))
    scorer = Scorer(kafka_bootstrap, topics, config, classifier, history, metrics)
    try:
        stats = scorer.run(threading.Event(), until=lambda s: s.consumed >= total)
    finally:
        scorer.close()

    # Every consumed offset is accounted for exactly once.
    assert (stats.consumed, stats.scored, stats.dead_lettered, stats.duplicates) == (total, 80, len(bad), 3)
    assert history.count() == 80
    ids = {row[0] for row in history.query("SELECT id FROM news").rows}
    assert ids == {li.item.id for li in items}
    versions = history.query("SELECT DISTINCT sentiment_version, topic_version FROM news").rows
    assert versions == [(classifier.versions["sentiment"], classifier.versions["topic"])]

    dlq = [json.loads(v) for v in read_all(kafka_bootstrap, topics.dlq)]
    assert sorted(d["reason"] for d in dlq) == sorted(reason for reason, _ in bad)
    assert all(d["topic"] == topics.raw and d["error"] for d in dlq)
    scored = [json.loads(v) for v in read_all(kafka_bootstrap, topics.scored)]
    assert sorted(s["id"] for s in scored) == sorted(ids)
    assert all(s["versions"] == classifier.versions for s in scored)
    assert committed_equals_end(kafka_bootstrap, topics.raw, config.group_id)

    import urllib.request

    with urllib.request.urlopen(server.url, timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    server.close()
    scored_total = sum(s.value for s in families["finpulse_messages_scored"].samples if s.name.endswith("_total"))
    assert scored_total == 80
    reasons = {s.labels["reason"] for s in families["finpulse_dead_letters"].samples if s.name.endswith("_total")}
    assert reasons == {reason for reason, _ in bad}
    info = {(s.labels["task"], s.labels["version"]) for s in families["finpulse_model_version_info"].samples}
    assert info == set(classifier.versions.items())
    assert any(s.value > 0 for s in families["finpulse_batch_seconds"].samples if s.name.endswith("_count"))
    assert "finpulse_consumer_lag" in families and "finpulse_end_to_end_lag_seconds" in families
    per_ticker: dict[str, float] = {}
    for sample in families["finpulse_ticker_messages_scored"].samples:
        if sample.name.endswith("_total"):
            per_ticker[sample.labels["ticker"]] = per_ticker.get(sample.labels["ticker"], 0) + sample.value
    expected = {t: sum(t in li.item.tickers for li in items) for t in config.watchlist}
    assert per_ticker == expected  # watched tickers are exported from the start, at 0 until mentioned
    assert sum(expected.values()) > 0, "the sample stream mentions watched tickers"


# Chinese market headlines (the use case this product comes from), and one mixed Japanese one.
FOREIGN = [
    ("zh-1", "沪深两市成交额突破万亿元，券商板块大涨"),
    ("zh-2", "央行宣布降准0.5个百分点，释放长期资金约1万亿元"),
    ("ja-1", "日経平均株価が大幅続落、半導体関連株に売り"),
]


def test_text_the_encoder_cannot_read_is_flagged_not_scored_neutral(
    kafka_bootstrap: str, topics: TopicNames, classifier: Classifier, tmp_path: Path
) -> None:
    config = ScorerConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=32, max_wait_ms=100)
    english = news_messages(labelled_stream(20))
    foreign = [
        (news_id.encode(), json.dumps({"id": news_id, "text": text, "published_at": "2026-12-01T09:00:00Z"}).encode())
        for news_id, text in FOREIGN
    ]
    produce(kafka_bootstrap, topics.raw, english + foreign)
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    metrics = ScorerMetrics()
    scorer = Scorer(kafka_bootstrap, topics, config, classifier, history, metrics)
    try:
        stats = scorer.run(threading.Event(), until=lambda s: s.consumed >= len(english) + len(foreign))
    finally:
        scorer.close()

    assert (stats.scored, stats.unread, stats.dead_lettered) == (23, 3, 0)  # stored, not lost, not scored
    rows = {
        str(r[0]): r[1:]
        for r in history.query("SELECT id, language, outcome, sentiment_confidence, topic_confidence FROM news").rows
    }
    for news_id, _ in FOREIGN:
        language, outcome, s_conf, t_conf = rows[news_id]
        assert outcome == "unsupported_language" and language == news_id[:2]
        assert abs(float(str(s_conf)) - 1 / 3) < 1e-6 and abs(float(str(t_conf)) - 1 / 20) < 1e-6  # no answer
    assert {rows[k][1] for k in rows if not k.startswith(("zh", "ja"))} == {"scored"}
    # Out of the sentiment series the spike rules read; counted apart.
    r = metrics.registry
    total = sum(
        s.value
        for f in r.collect()
        if f.name == "finpulse_messages_scored"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert total == 20
    assert (
        r.get_sample_value("finpulse_messages_unread_total", {"outcome": "unsupported_language", "language": "zh"}) == 2
    )
    scored = {json.loads(v)["id"]: json.loads(v) for v in read_all(kafka_bootstrap, topics.scored)}
    assert scored["ja-1"]["outcome"] == "unsupported_language" and scored["ja-1"]["language"] == "ja"


def _scorer_process(
    bootstrap: str,
    topics: TopicNames,
    group: str,
    db: Path,
    log: Path,
    adapters: Path,
    lake_env: dict[str, str] | None = None,
    launcher: Sequence[str] = ("-m", "finpulse.cli"),
    extra: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        *launcher,
        "score",
        "--bootstrap-servers",
        bootstrap,
        "--duckdb-path",
        str(db),
        "--adapters-dir",
        str(adapters),
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--set",
        f"kafka.topics.raw={topics.raw}",
        "--set",
        f"kafka.topics.scored={topics.scored}",
        "--set",
        f"kafka.topics.dlq={topics.dlq}",
        "--set",
        f"scorer.group_id={group}",
        "--set",
        "scorer.max_batch=16",
        "--set",
        "scorer.max_wait_ms=50",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(lake_env or {})}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return {tp.partition: consumer.committed(tp) or 0 for tp in partitions}
    finally:
        consumer.close()


def ends_of(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return {tp.partition: end for tp, end in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def group_members(bootstrap: str, group: str) -> int:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return len(admin.describe_groups([group])[group].get("members") or [])
    except KafkaError:  # no coordinator for the group yet: nobody joined
        return 0
    finally:
        admin.close()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _lake(catalog: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[LakeConfig, dict[str, str]]:
    """Return the lake config of a test and the environment that gives scorer processes the same one."""
    env = {"FINPULSE_STORAGE__LAKE__DATA_DIR": str(tmp_path / "lake")}
    fields: dict[str, object] = {"data_dir": tmp_path / "lake"}
    if catalog == "postgres":
        dsn = fresh_postgres_database(request.getfixturevalue("postgres_dsn"), f"e2e_{uuid.uuid4().hex[:8]}")
        env |= {"FINPULSE_STORAGE__LAKE__CATALOG": "postgres", "FINPULSE_STORAGE__LAKE__POSTGRES_DSN": dsn}
        fields |= {"catalog": "postgres", "postgres_dsn": dsn}
    return LakeConfig.model_validate(fields), env


def _analyst_holding(history: History) -> subprocess.Popen[str]:
    """A stock `duckdb` process that opens the lake as an analyst would and keeps one read transaction open."""
    code = (
        "import duckdb, json, sys\n"
        "con = duckdb.connect()\n"
        f"for statement in json.loads({json.dumps(json.dumps(history.lake.analyst_statements()))}):\n"
        "    con.execute(statement)\n"
        "con.execute('BEGIN TRANSACTION')\n"
        "print(con.execute('SELECT count(*) FROM news').fetchone()[0], flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip().isdigit()
    return holder


# `finpulse score` with what the onnx engine does not need made absent, as in an image that never installed them:
# importing any of them fails as a missing package does.
WITHOUT_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'transformers', 'peft', 'avalanche', 'matplotlib'):\n"
    "    sys.modules[name] = None\n"
    "from finpulse.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_an_onnx_scorer_scores_the_stream_without_torch_transformers_peft_or_avalanche(
    kafka_bootstrap: str,
    topics: TopicNames,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    adapters_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    items = labelled_stream(120)
    group, db, log = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "h.duckdb", tmp_path / "slim.log"
    lake, lake_env = _lake("sqlite", tmp_path, request)
    history = History(StorageConfig(duckdb_path=db, lock_timeout_s=60, lake=lake))
    history.ensure_schema()
    scorer = _scorer_process(
        kafka_bootstrap, topics, group, db, log, adapters_dir, lake_env,
        launcher=("-c", WITHOUT_TORCH), extra=("--set", "model.engine=onnx"),
    )  # fmt: skip
    processes.append(scorer)
    produce(kafka_bootstrap, topics.raw, news_messages(items))

    def all_committed() -> bool:
        assert scorer.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-3000:]
        return committed_equals_end(kafka_bootstrap, topics.raw, group)

    _wait(all_committed, 300, "the torch-free scorer to commit the whole stream")
    rows = history.fetch([li.item.id for li in items])
    assert len(rows) == len(items) and not read_all(kafka_bootstrap, topics.dlq)
    champion = (adapters_dir / "sentiment" / "CHAMPION").read_text(encoding="utf-8").strip()
    assert {r.sentiment_version for r in rows} == {champion}
    # It scored, rather than wrote placeholders: most of the labelled tweets' sentiments agree with their labels.
    gold = {li.item.id: li.sentiment for li in items}
    assert sum(r.sentiment == gold[r.id] for r in rows) / len(rows) > 0.4


@pytest.mark.slow
@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_scorers_share_partitions_and_a_killed_one_loses_nothing(
    kafka_bootstrap: str,
    topics: TopicNames,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    adapters_dir: Path,
    catalog: str,
    request: pytest.FixtureRequest,
) -> None:
    items = labelled_stream(600)
    group, db = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "h.duckdb"
    lake, lake_env = _lake(catalog, tmp_path, request)
    history = History(StorageConfig(duckdb_path=db, lock_timeout_s=60, lake=lake))
    history.ensure_schema()
    first = _scorer_process(kafka_bootstrap, topics, group, db, tmp_path / "a.log", adapters_dir, lake_env)
    second = _scorer_process(kafka_bootstrap, topics, group, db, tmp_path / "b.log", adapters_dir, lake_env)
    processes.extend([first, second])
    # An analyst's stock duckdb session holds a read transaction on the lake for the whole run: nothing waits on it.
    analyst = _analyst_holding(history)
    # Both members join before the first message, so the stream is shared from its start.
    _wait(lambda: group_members(kafka_bootstrap, group) == 2, 180, "both scorers to join the group")
    producer = ReplayProducer(kafka_bootstrap, topics.raw, news_messages(items), rate=100)
    producer.start()

    # Analysts query while both scorers write: every query answers, and the count only grows.
    seen: list[int] = []

    def some_written() -> bool:
        seen.append(history.count())
        return seen[-1] >= 150

    _wait(some_written, 240, "the scorers to write rows")
    at_kill = committed_offsets(kafka_bootstrap, topics.raw, group)
    first.send_signal(signal.SIGKILL)  # mid-stream, mid-batch if it is in one
    killed_at = time.monotonic()
    first.wait(timeout=10)
    # Failover: the survivor takes over the dead member's partitions once its 6 s session times out. The old
    # 45 s default session stalled them for 45 s or more; 30 s leaves 5x slack for a loaded machine.
    ends = ends_of(kafka_bootstrap, topics.raw)
    at_kill = {p: at_kill.get(p, 0) for p in ends}
    pending = {p for p, end in ends.items() if end > at_kill[p]}
    _wait(
        lambda: all(
            committed_offsets(kafka_bootstrap, topics.raw, group).get(p, 0) > at_kill.get(p, 0) for p in pending
        ),
        30,
        "the survivor to commit on every partition that had work left",
    )
    print(f"failover after SIGKILL: {time.monotonic() - killed_at:.1f} s")
    # A replacement joins while the survivor carries on: the three share what is left of the stream.
    processes.append(_scorer_process(kafka_bootstrap, topics, group, db, tmp_path / "c.log", adapters_dir, lake_env))
    _wait(lambda: seen.append(history.count()) or seen[-1] >= len(items), 240, "the survivor to finish")
    time.sleep(2)  # a late duplicate write would show up here
    producer.join(timeout=30)
    assert producer.error is None and producer.sent == len(items)

    assert analyst.poll() is None, "the analyst's session was open all along"
    assert analyst.stdin is not None
    analyst.stdin.close()
    analyst.wait(timeout=30)
    assert seen == sorted(seen)
    assert history.count() == len(items)
    assert history.query("SELECT count(DISTINCT id) FROM news").rows[0][0] == len(items)
    assert {r[0] for r in history.query("SELECT id FROM news").rows} == {li.item.id for li in items}
    _wait(lambda: committed_equals_end(kafka_bootstrap, topics.raw, group), 30, "offsets to be committed")
    scored_ids = [json.loads(v)["id"] for v in read_all(kafka_bootstrap, topics.scored)]
    assert set(scored_ids) == {li.item.id for li in items}
    # news.scored is at-least-once: the killed member's last batch may appear twice, never more than a batch.
    assert len(scored_ids) - len(items) <= 16
