"""Labels and experiences on a real DuckDB file: idempotent writes, pending labels with relabels, experiences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from storage import History, StorageConfig, StorageError
from storage.labels import ExperienceNotFoundError, LabelRow, LabelStore

T0 = datetime(2024, 5, 1, 9, tzinfo=UTC)


def _at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _label(
    news_id: str,
    minutes: int,
    sentiment: str | None = "neutral",
    topic: str | None = None,
    labeller: str | None = "ana",
    **kafka: object,
) -> LabelRow:
    return LabelRow(
        id=news_id,
        text=f"headline {news_id}",
        sentiment=sentiment,
        topic=topic,
        labelled_at=_at(minutes),
        labeller=labeller,
        **kafka,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    return LabelStore(History(StorageConfig(duckdb_path=tmp_path / "history.duckdb", lock_timeout_s=5)))


def test_label_rows_refuse_naive_times_and_empty_labels() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        LabelRow(id="a", text="t", sentiment="neutral", topic=None, labelled_at=datetime(2024, 5, 1))
    with pytest.raises(ValueError, match="needs a sentiment, a topic or both"):
        LabelRow(id="a", text="t", sentiment=None, topic=None, labelled_at=T0)
    cest = timezone(timedelta(hours=2))
    shifted = LabelRow(
        id="a", text="t", sentiment="neutral", topic=None, labelled_at=datetime(2024, 5, 1, 11, tzinfo=cest)
    )
    assert shifted.labelled_at == T0 and shifted.labelled_at.tzinfo == UTC


def test_reads_before_any_write_find_nothing(store: LabelStore) -> None:
    assert store.pending("sentiment") == []
    assert store.pending_count("topic") == 0
    assert store.oldest_pending("sentiment") is None
    assert store.experiences("sentiment") == []
    assert not store.path.exists()


def test_writes_are_idempotent(store: LabelStore) -> None:
    batch = [
        _label("a", 1, kafka_topic="news.labels", kafka_partition=2, kafka_offset=40),
        _label("b", 2),
        _label("a", 1, sentiment="positive"),  # same key inside the batch: the first one wins
    ]
    assert store.write(batch) == 2
    assert store.write(batch) == 0  # a replayed Kafka batch
    # Another time or another labeller is another label; no labeller is the same key as no labeller.
    assert store.write([_label("a", 5), _label("a", 1, labeller="bo"), _label("c", 3, labeller=None)]) == 3
    assert store.write([_label("c", 3, labeller=None)]) == 0
    # "a" was labelled again at minute 5: that label is the pending one.
    assert [(r.id, r.labelled_at) for r in store.pending("sentiment")] == [("b", _at(2)), ("c", _at(3)), ("a", _at(5))]
    assert store._history.query("SELECT count(*), count(DISTINCT id) FROM labels").rows == [(5, 3)]
    stored = store._history.query(
        "SELECT kafka_topic, kafka_partition, kafka_offset, sentiment FROM labels "
        "WHERE id = 'a' AND labeller = 'ana' ORDER BY labelled_at LIMIT 1"
    ).rows
    assert stored == [("news.labels", 2, 40, "neutral")]


def test_pending_takes_the_latest_label_of_each_id(store: LabelStore) -> None:
    store.write(
        [
            _label("a", 1, sentiment="negative"),
            _label("b", 2, sentiment="neutral", topic="Markets"),
            _label("a", 7, sentiment="positive", labeller="bo"),  # a correction by someone else
            _label("b", 9, sentiment=None, topic="Macro"),  # relabels the topic only
            _label("c", 4, sentiment=None, topic="Earnings"),
        ]
    )
    sentiment = store.pending("sentiment")
    assert [(r.id, r.sentiment, r.labeller) for r in sentiment] == [("b", "neutral", "ana"), ("a", "positive", "bo")]
    assert [r.labelled_at for r in sentiment] == [_at(2), _at(7)]  # oldest first
    topic = store.pending("topic")
    assert [(r.id, r.topic) for r in topic] == [("c", "Earnings"), ("b", "Macro")]
    assert store.pending_count("sentiment") == 2 and store.pending_count("topic") == 2
    assert store.oldest_pending("sentiment") == _at(2)
    assert store.oldest_pending("topic") == _at(4)
    with pytest.raises(ValueError, match="task must be"):
        store.pending("tone")  # type: ignore[arg-type]


def test_experiences_take_labels_out_of_pending(store: LabelStore) -> None:
    store.write([_label(i, n, sentiment="positive", topic="Markets") for n, i in enumerate("edcba", start=1)])
    pending = store.pending("sentiment")
    train = [(r.id, r.text, r.sentiment or "") for r in pending[:3]]
    holdout = [(r.id, r.text, r.sentiment or "") for r in pending[3:4]]
    now = _at(60)
    first = store.create_experience("sentiment", train, holdout, now=now)
    assert (first.id, first.task, first.status, first.version) == (1, "sentiment", "open", None)
    assert (first.n_train, first.n_holdout, first.created_at) == (3, 1, now)
    assert (first.span_start, first.span_end) == (_at(1), _at(4))
    # Its labels are no longer pending for sentiment, but still are for topic.
    assert [r.id for r in store.pending("sentiment")] == ["a"]
    assert store.pending_count("topic") == 5
    # Examples come back in a stable order, split by split.
    assert store.examples(1, "train") == sorted((text, label) for _, text, label in train)
    assert store.examples(1, "holdout") == [("headline b", "positive")]
    # A label already in a sentiment experience cannot go into another: nothing of the attempt is kept.
    with pytest.raises(StorageError, match="label 'e' is already in sentiment experience 1"):
        store.create_experience("sentiment", [("a", "headline a", "positive"), ("e", "headline e", "positive")], [])
    assert [e.id for e in store.experiences("sentiment")] == [1]
    # Ids are global; the topic task may take the same labels.
    second = store.create_experience("topic", [(r.id, r.text, r.topic or "") for r in store.pending("topic")], [])
    assert second.id == 2 and store.pending_count("topic") == 0
    store.mark_trained(1, "sentiment-v2")
    assert store.experience(1).status == "trained" and store.experience(1).version == "sentiment-v2"
    assert [e.id for e in store.experiences("sentiment", status="open")] == []
    assert [e.id for e in store.experiences("topic", status="open")] == [2]
    # A correction of a label that an experience took stays out of pending: the experience is frozen.
    store.write([_label("e", 90, sentiment="negative")])
    assert [r.id for r in store.pending("sentiment")] == ["a"]
    assert store.examples(1, "train")[0] == ("headline c", "positive")


def test_experience_arguments_are_checked(store: LabelStore) -> None:
    with pytest.raises(ValueError, match="at least one training example"):
        store.create_experience("sentiment", [], [("a", "t", "neutral")])
    with pytest.raises(ValueError, match="lists a label id twice"):
        store.create_experience("sentiment", [("a", "t", "neutral")], [("a", "t", "neutral")])
    with pytest.raises(ExperienceNotFoundError, match="no experience 7"):
        store.mark_trained(7, "sentiment-v2")
    with pytest.raises(ExperienceNotFoundError, match="no experience 7"):
        store.experience(7)


def test_a_file_of_schema_v2_is_migrated_on_the_first_write(store: LabelStore) -> None:
    history = store._history
    history.ensure_schema()
    with history.session(read_only=False) as con:
        for table in ("labels", "experience_examples", "experiences", "model_events", "model_versions"):
            con.execute(f"DROP TABLE {table}")
        con.execute("DELETE FROM schema_version WHERE version >= 3")
    assert store.pending("sentiment") == []  # the tables do not exist yet: nothing pending, no error
    assert store.write([_label("a", 1)]) == 1
    assert store.pending_count("sentiment") == 1
