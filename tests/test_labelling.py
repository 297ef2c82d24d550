"""`finpulse label`: labels validated before anything is sent, sent to the real broker, and suggestions."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from finpulse.cli import main
from storage import History, StorageConfig
from storage.history import NewsRow
from storage.labels import LabelRow, LabelStore
from stream.admin import ensure_topics
from stream.labels import parse_label
from stream.messages import Invalid


def _read(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(values) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            values.extend(r.value for r in batch)
    consumer.close()
    return values


def test_a_file_with_a_bad_label_sends_nothing_and_names_each_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "id,text,sentiment,topic\n"
        "n-1,Oil slides as inventories swell,negative,\n"
        "n-2,Fed holds,bearish,\n"  # not a sentiment
        "n-3,,positive,\n"  # no text
        "n-4,Gold up,,Gold / Metals / Materials\n",
        encoding="utf-8",
    )
    # An unreachable broker: nothing may be sent, so nothing may even be tried.
    assert main(["label", "send", str(path), "--bootstrap-servers", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "labels.csv:3: unknown_label: 'sentiment' is 'bearish'" in err
    assert "labels.csv:4: missing_field" in err
    assert "2 of 4 labels refused; nothing was sent" in err


@pytest.mark.kafka
def test_labels_from_csv_and_jsonl_reach_news_labels_as_the_contract_reads_them(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.labels"
    ensure_topics(kafka_bootstrap, [topic], 1)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("id,text,sentiment\nn-1,Oil slides as inventories swell,negative\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        json.dumps({"id": "n-2", "text": "Gold up 2%", "topic": "Gold / Metals / Materials", "domain": "wire"}) + "\n",
        encoding="utf-8",
    )
    common = ["--bootstrap-servers", kafka_bootstrap, "--set", f"kafka.topics.labels={topic}"]
    assert main(["label", "send", str(csv_path), "--labeller", "ana", *common]) == 0
    assert main(["label", "send", str(jsonl), *common]) == 0
    assert "sent 1 labels" in capsys.readouterr().out
    parsed = [parse_label(v, 8192) for v in _read(kafka_bootstrap, topic, 2)]
    assert not any(isinstance(p, Invalid) for p in parsed)
    by_id = {p.id: p for p in parsed if not isinstance(p, Invalid)}
    assert (by_id["n-1"].sentiment, by_id["n-1"].labeller, by_id["n-1"].domain) == ("negative", "ana", None)
    assert (by_id["n-2"].topic, by_id["n-2"].domain) == ("Gold / Metals / Materials", "wire")


def _row(news_id: str, confidence: float, at: dt.datetime, outcome: str = "scored") -> NewsRow:
    rest = (1 - confidence) / 2
    return NewsRow(
        id=news_id,
        published_at=at,
        source="twitter-financial-news",
        text=f"headline {news_id}",
        tickers=(),
        topic="Markets",
        topic_confidence=0.5,
        sentiment="neutral",
        sentiment_confidence=confidence,
        sentiment_negative=rest,
        sentiment_neutral=confidence,
        sentiment_positive=rest,
        topic_version="topic-v1",
        sentiment_version="sentiment-v1",
        scored_at=at,
        outcome=outcome,
        language="en",
    )


def test_suggest_lists_the_least_confident_unlabelled_recent_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "h.duckdb"
    history = History(StorageConfig(duckdb_path=db))
    now = dt.datetime.now(dt.UTC)
    history.write_batch(
        [
            _row("sure", 0.97, now),
            _row("unsure", 0.41, now),
            _row("labelled", 0.35, now),  # the least confident, but an analyst answered it already
            _row("old", 0.34, now - dt.timedelta(days=3)),
            _row("chinese", 1 / 3, now, outcome="unsupported_language"),  # no answer to correct
            _row("middling", 0.6, now),
        ]
    )
    LabelStore(history).write([LabelRow(id="labelled", text="x", sentiment="neutral", topic=None, labelled_at=now)])
    assert main(["label", "suggest", "--n", "2", "--json", "--duckdb-path", str(db)]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["id"] for f in found] == ["unsure", "middling"]
    assert found[0]["confidence"] == 0.41 and found[0]["predicted"] == "neutral"


def test_replay_feeds_the_stream_then_a_share_of_its_labels(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`finpulse replay` (the compose stack's feed): the labelled stream to news.raw, then its labels."""
    from finpulse.replay import labelled_stream

    prefix = f"t{uuid.uuid4().hex[:8]}."
    topics = ["--set", f"kafka.topics.raw={prefix}raw", "--set", f"kafka.topics.labels={prefix}labels"]
    argv = ["replay", "--messages", "20", "--rate", "0", "--labels", "0.5", "--no-selloff"]
    assert main([*argv, "--bootstrap-servers", kafka_bootstrap, *topics]) == 0
    assert "sent 20 messages" in capsys.readouterr().out
    raw = [json.loads(v) for v in _read(kafka_bootstrap, f"{prefix}raw", 20)]
    expected = labelled_stream(20)
    assert sorted(m["id"] for m in raw) == sorted(li.item.id for li in expected)
    labelled = [li for li in expected[:10] if li.sentiment is not None]
    labels = [parse_label(v, 8192) for v in _read(kafka_bootstrap, f"{prefix}labels", len(labelled))]
    assert sorted((p.id, p.sentiment) for p in labels if not isinstance(p, Invalid)) == sorted(
        (li.item.id, li.sentiment) for li in labelled
    )


def test_suggest_by_novelty_puts_what_the_training_data_holds_nothing_like_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TFNS tweets the adapters learnt from sit at distance ~0; a recipe and a sports result are far from all."""
    from learner.datasets import tfns_sentiment

    db = tmp_path / "h.duckdb"
    history = History(StorageConfig(duckdb_path=db))
    now = dt.datetime.now(dt.UTC)
    known = [e.text for e in tfns_sentiment("train")[:6]]
    strangers = {
        "recipe": "Whisk two eggs with flour and a pinch of salt, then bake the dough for twenty minutes.",
        "football": "The home side scored twice in stoppage time to win the cup final in front of their fans.",
    }
    rows = [_row(f"known-{i}", 0.5, now) for i in range(len(known))] + [_row(k, 0.9, now) for k in strangers]
    texts = {**{f"known-{i}": t for i, t in enumerate(known)}, **strangers}
    history.ensure_schema()
    history.write_batch([replace(r, text=texts[r.id]) for r in rows])

    assert main(["label", "suggest", "--by", "novelty", "--n", "3", "--json", "--duckdb-path", str(db)]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {f["id"] for f in found[:2]} == set(strangers)  # confidently scored, yet unlike anything learnt
    assert all(f["novelty"] > found[2]["novelty"] for f in found[:2])
    # Both ranks together: every message gets its novelty, and the list holds what was asked for.
    assert main(["label", "suggest", "--by", "both", "--n", "4", "--json", "--duckdb-path", str(db)]) == 0
    both = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(both) == 4 and all("novelty" in f for f in both)
