"""Labels received from analysts and the experiences the continual learner trains on, in the history's DuckDB file.

A label is one analyst's answer for one news id: its sentiment, its topic, or both. Labels arrive on Kafka and
are stored as they come; a replayed batch inserts nothing twice because (id, labelled_at, labeller) is unique.

An experience is a batch of labels of one task set aside for one training run: its examples (text and label)
are copied into `experience_examples`, split into train and holdout, so the held-out gate of every later
candidate sees exactly the same examples even when the labels are corrected afterwards. A label id belongs to
at most one experience per task; `pending` returns the labels that none has taken yet.

Every unit of work is one short session through `History.session`, so the learner, the scorers and
analysts' queries take turns on one file under the same locks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import duckdb

from learner.tasks import SENTIMENT, TOPIC, Task, check_task
from storage.errors import StorageError
from storage.history import History
from storage.schema import DEFAULT_DOMAIN, from_epoch_us, from_epoch_us_required

__all__ = ["LABEL_TASKS", "Experience", "ExperienceNotFoundError", "LabelRow", "LabelStore", "LabelTask", "Split"]

# The tasks the `labels` table has a column for, in column order: schema v3 created it and is never edited, so a
# task registered later needs a migration (and a LabelRow field) before its labels can be stored.
LABEL_TASKS: Final[tuple[Task, ...]] = (SENTIMENT.name, TOPIC.name)
LabelTask = Task
Split = Literal["train", "holdout"]

_SPLITS: Final[frozenset[str]] = frozenset({"train", "holdout"})
_LABEL_STRUCTURE: Final = json.dumps(
    [
        {
            "id": "VARCHAR",
            "text": "VARCHAR",
            **dict.fromkeys(LABEL_TASKS, "VARCHAR"),
            "labelled_at": "VARCHAR",
            "labeller": "VARCHAR",
            "received_at": "VARCHAR",
            "kafka_topic": "VARCHAR",
            "kafka_partition": "INTEGER",
            "kafka_offset": "BIGINT",
            "domain": "VARCHAR",
        }
    ],
    separators=(",", ":"),
)
# The whole batch is bound as one JSON string (duckdb 1.4's Python client spends ~40 µs per bound value);
# timestamps travel as ISO 8601 strings and are cast in SQL, which needs no pytz.
_INSERT_LABELS_SQL: Final = (
    f"INSERT INTO labels (id, text, {', '.join(LABEL_TASKS)}, labelled_at, labeller, received_at, kafka_topic, "
    "kafka_partition, kafka_offset, domain) "
    f"SELECT r.id, r.text, {', '.join(f'r.{task}' for task in LABEL_TASKS)}, CAST(r.labelled_at AS TIMESTAMPTZ), "
    "r.labeller, "
    "CAST(r.received_at AS TIMESTAMPTZ), r.kafka_topic, r.kafka_partition, r.kafka_offset, r.domain "
    f"FROM (SELECT unnest(from_json(?, '{_LABEL_STRUCTURE}')) AS r) "
    "WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.id = r.id "
    "AND l.labelled_at = CAST(r.labelled_at AS TIMESTAMPTZ) "
    "AND coalesce(l.labeller, '') = coalesce(r.labeller, '')) RETURNING id"
)
_EXAMPLE_STRUCTURE: Final = json.dumps(
    [{"label_id": "VARCHAR", "text": "VARCHAR", "label": "VARCHAR", "split": "VARCHAR"}], separators=(",", ":")
)
_EXPERIENCE_SELECT: Final = (
    "SELECT id, task, epoch_us(created_at), epoch_us(span_start), epoch_us(span_end), n_train, n_holdout, "
    f"status, version, coalesce(domain, '{DEFAULT_DOMAIN}') FROM experiences"
)


class ExperienceNotFoundError(StorageError):
    """No experience has this id."""


@dataclass(frozen=True, kw_only=True)
class LabelRow:
    """One analyst label of one news id; `labelled_at` is normalised to UTC."""

    id: str
    text: str
    sentiment: str | None
    topic: str | None
    labelled_at: dt.datetime
    labeller: str | None = None
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    domain: str | None = None  # as the label names it; None: the domain of the news it labels

    def __post_init__(self) -> None:
        """Refuse labels that label nothing and naive times; coerce numpy integers to Python ones."""
        if not self.id:
            raise ValueError("LabelRow.id must be a non-empty string")
        if not self.text:
            raise ValueError(f"LabelRow.text of {self.id!r} must be a non-empty string")
        if not self.sentiment and not self.topic:
            raise ValueError(f"LabelRow {self.id!r} needs a sentiment, a topic or both")
        if self.labelled_at.tzinfo is None or self.labelled_at.utcoffset() is None:
            raise ValueError(f"LabelRow.labelled_at must be timezone-aware, got naive {self.labelled_at!r}")
        object.__setattr__(self, "labelled_at", self.labelled_at.astimezone(dt.UTC))
        for name in ("kafka_partition", "kafka_offset"):
            number = getattr(self, name)
            if number is not None:
                object.__setattr__(self, name, int(number))

    def label(self, task: LabelTask) -> str | None:
        """Return this row's label for `task`, or None when it does not label that task."""
        found: str | None = getattr(self, _task_column(task))
        return found


@dataclass(frozen=True, kw_only=True)
class Experience:
    """A batch of labels of one task set aside for one training run; `status` is open or trained."""

    id: int
    task: str
    created_at: dt.datetime
    span_start: dt.datetime | None  # labelled_at of its oldest label
    span_end: dt.datetime | None  # labelled_at of its newest label
    n_train: int
    n_holdout: int
    status: str
    version: str | None  # the adapter version trained on it, once trained
    domain: str = DEFAULT_DOMAIN


class LabelStore:
    """Labels and experiences in the history's DuckDB file, with the history's locking."""

    def __init__(self, history: History) -> None:
        """Share `history`'s file and locks; nothing is opened until a method needs it."""
        self._history = history

    @property
    def path(self) -> Path:
        """Return the absolute path of the DuckDB file."""
        return self._history.path

    def write(self, rows: Iterable[LabelRow], now: dt.datetime | None = None) -> int:
        """Insert the labels not stored yet, in one transaction; return how many were new."""
        received = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat()
        unique: dict[tuple[str, dt.datetime, str], LabelRow] = {}
        for row in rows:
            unique.setdefault((row.id, row.labelled_at, row.labeller or ""), row)  # first occurrence wins
        if not unique:
            return 0
        payload = json.dumps(
            [
                {
                    "id": row.id,
                    "text": row.text,
                    **{task: row.label(task) for task in LABEL_TASKS},
                    "labelled_at": row.labelled_at.isoformat(),
                    "labeller": row.labeller,
                    "received_at": received,
                    "kafka_topic": row.kafka_topic,
                    "kafka_partition": row.kafka_partition,
                    "kafka_offset": row.kafka_offset,
                    "domain": row.domain,
                }
                for row in unique.values()
            ],
            ensure_ascii=False,
        )
        with self._write(f"writing {len(unique)} labels") as con:
            # The anti-join cannot race: DuckDB admits one read-write process per file and this process
            # runs one session at a time, so a batch replayed after a crash inserts nothing twice.
            return len(con.execute(_INSERT_LABELS_SQL, [payload]).fetchall())

    def pending(self, task: LabelTask) -> list[LabelRow]:
        """Return the latest label of each id that labels `task` and is in no experience of it, oldest first."""
        _check_task(task)
        with self._read("reading pending labels") as con:
            if con is None:
                return []
            records = con.execute(
                f"{_pending_sql(task)} SELECT id, text, epoch_us(labelled_at), labeller, kafka_topic, kafka_partition, "
                f"kafka_offset, domain, {', '.join(LABEL_TASKS)} FROM pending ORDER BY labelled_at, id",
                [task],
            ).fetchall()
        return [
            LabelRow(
                id=r[0],
                text=r[1],
                labelled_at=from_epoch_us_required(r[2]),
                labeller=r[3],
                kafka_topic=r[4],
                kafka_partition=r[5],
                kafka_offset=r[6],
                domain=r[7],
                **dict(zip(LABEL_TASKS, r[8:], strict=True)),
            )
            for r in records
        ]

    def pending_count(self, task: LabelTask) -> int:
        """Return how many ids have a label of `task` that no experience has taken yet."""
        _check_task(task)
        with self._read("counting pending labels") as con:
            if con is None:
                return 0
            found = con.execute(f"{_pending_sql(task)} SELECT count(*) FROM pending", [task]).fetchone()
        return int(found[0]) if found is not None else 0

    def oldest_pending(self, task: LabelTask) -> dt.datetime | None:
        """Return the labelled_at of the oldest pending label of `task`, or None when none waits."""
        _check_task(task)
        with self._read("reading the oldest pending label") as con:
            if con is None:
                return None
            found = con.execute(
                f"{_pending_sql(task)} SELECT epoch_us(min(labelled_at)) FROM pending", [task]
            ).fetchone()
        return from_epoch_us(found[0]) if found is not None else None

    def create_experience(
        self,
        task: LabelTask,
        train: Sequence[tuple[str, str, str]],
        holdout: Sequence[tuple[str, str, str]],
        now: dt.datetime | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> Experience:
        """Store a new open experience of (label_id, text, label) examples under the next id, in one transaction."""
        _check_task(task)
        if not train:
            raise ValueError(f"a {task} experience needs at least one training example")
        ids = [label_id for label_id, _, _ in (*train, *holdout)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a {task} experience lists a label id twice: each id goes to train or holdout, once")
        created_at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        examples = json.dumps(
            [
                {"label_id": label_id, "text": text, "label": label, "split": split}
                for split, chosen in (("train", train), ("holdout", holdout))
                for label_id, text, label in chosen
            ],
            ensure_ascii=False,
        )
        ids_json = json.dumps(ids, ensure_ascii=False)
        with self._write(f"creating a {task} experience") as con:
            # Checked inside the write transaction, which runs under DuckDB's single-writer lock: two
            # learners racing for the same labels cannot both take them.
            taken = con.execute(
                "SELECT e.label_id, x.id FROM experience_examples e JOIN experiences x ON x.id = e.experience_id "
                "WHERE x.task = ? AND e.label_id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]'))) "
                "ORDER BY e.label_id LIMIT 1",
                [task, ids_json],
            ).fetchone()
            if taken is not None:
                raise StorageError(
                    f"label {taken[0]!r} is already in {task} experience {taken[1]}: build experiences from "
                    "LabelStore.pending()"
                )
            found = con.execute("SELECT coalesce(max(id), 0) + 1 FROM experiences").fetchone()
            new_id = int(found[0]) if found is not None else 1
            con.execute(
                "INSERT INTO experience_examples SELECT ?, r.label_id, r.text, r.label, r.split "
                f"FROM (SELECT unnest(from_json(?, '{_EXAMPLE_STRUCTURE}')) AS r)",
                [new_id, examples],
            )
            # The span covers the labels' own times (of the label of this task), not when they arrived.
            span = con.execute(
                "SELECT epoch_us(min(labelled_at)), epoch_us(max(labelled_at)) FROM labels "
                f"WHERE {_task_column(task)} IS NOT NULL "
                "AND id IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))",
                [ids_json],
            ).fetchone()
            span_start = from_epoch_us(span[0]) if span is not None else None
            span_end = from_epoch_us(span[1]) if span is not None else None
            con.execute(
                "INSERT INTO experiences (id, task, created_at, span_start, span_end, n_train, n_holdout, status, "
                "version, domain) VALUES (?, ?, CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), "
                "CAST(? AS TIMESTAMPTZ), ?, ?, 'open', NULL, ?)",
                [
                    new_id,
                    task,
                    created_at.isoformat(),
                    span_start.isoformat() if span_start else None,
                    span_end.isoformat() if span_end else None,
                    len(train),
                    len(holdout),
                    None if domain == DEFAULT_DOMAIN else domain,
                ],
            )
        return Experience(
            id=new_id,
            task=task,
            created_at=created_at,
            span_start=span_start,
            span_end=span_end,
            n_train=len(train),
            n_holdout=len(holdout),
            status="open",
            version=None,
            domain=domain,
        )

    def experiences(self, task: LabelTask, status: str | None = None) -> list[Experience]:
        """Return the experiences of `task`, oldest first; only those with `status` when given."""
        _check_task(task)
        where = " WHERE task = ?"
        params: list[str] = [task]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        with self._read("listing experiences") as con:
            if con is None:
                return []
            records = con.execute(f"{_EXPERIENCE_SELECT}{where} ORDER BY id", params).fetchall()
        return [_experience(record) for record in records]

    def experience(self, experience_id: int) -> Experience:
        """Return one experience, or raise ExperienceNotFoundError."""
        with self._read("reading an experience") as con:
            record = (
                None if con is None else con.execute(f"{_EXPERIENCE_SELECT} WHERE id = ?", [experience_id]).fetchone()
            )
        if record is None:
            raise ExperienceNotFoundError(f"no experience {experience_id}: see LabelStore.experiences()")
        return _experience(record)

    def examples(self, experience_id: int, split: Split) -> list[tuple[str, str]]:
        """Return the (text, label) examples of one split of an experience, in label-id order."""
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        with self._read("reading experience examples") as con:
            if con is None:
                return []
            # Ordered by label id so that every read gives the same sequence (seeded shuffles stay reproducible).
            records = con.execute(
                "SELECT text, label FROM experience_examples WHERE experience_id = ? AND split = ? ORDER BY label_id",
                [experience_id, split],
            ).fetchall()
        return [(str(text), str(label)) for text, label in records]

    def mark_trained(self, experience_id: int, version: str) -> None:
        """Record that `version` was trained on the experience (whether or not it was promoted)."""
        with self._write(f"marking experience {experience_id} trained") as con:
            found = con.execute("SELECT 1 FROM experiences WHERE id = ?", [experience_id]).fetchone()
            if found is None:
                raise ExperienceNotFoundError(f"no experience {experience_id}: see LabelStore.experiences()")
            con.execute("UPDATE experiences SET status = 'trained', version = ? WHERE id = ?", [version, experience_id])

    def _write(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return self._history.transaction(what)

    def _read(self, what: str) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection | None]:
        # None while the file or the label tables do not exist yet (a file of an older schema).
        return self._history.reading(what, ("labels", "experiences", "experience_examples"))


def _check_task(task: str) -> None:
    """Refuse a task name that is not a column of `labels`: it is spliced into SQL."""
    if check_task(task) not in LABEL_TASKS:
        raise ValueError(f"task {task} has no column in the labels table; a migration must add it first")


def _task_column(task: str) -> str:
    """Return the `labels` column holding the labels of `task`."""
    _check_task(task)
    return task


def _pending_sql(task: str) -> str:
    """Return a WITH clause defining `pending`: the newest label of `task` per id not in any experience of it.

    The statement takes the task name as its one parameter.
    """
    column = _task_column(task)
    # Among several labels of one id the newest wins (a correction replaces the first answer); ties go to
    # the one received last. Labels of the other task only (column NULL) neither count nor hide one.
    return (
        "WITH pending AS (SELECT * FROM labels l "
        f"WHERE l.{column} IS NOT NULL AND NOT EXISTS ("
        "SELECT 1 FROM experience_examples e JOIN experiences x ON x.id = e.experience_id "
        "WHERE x.task = ? AND e.label_id = l.id) "
        "QUALIFY row_number() OVER (PARTITION BY l.id ORDER BY l.labelled_at DESC, l.received_at DESC, "
        "l.labeller DESC NULLS LAST) = 1)"
    )


def _experience(record: Sequence[Any]) -> Experience:
    """Build an Experience from a record selected like `_EXPERIENCE_SELECT`."""
    return Experience(
        id=int(record[0]),
        task=str(record[1]),
        created_at=from_epoch_us_required(record[2]),
        span_start=from_epoch_us(record[3]),
        span_end=from_epoch_us(record[4]),
        n_train=int(record[5]),
        n_holdout=int(record[6]),
        status=str(record[7]),
        version=None if record[8] is None else str(record[8]),
        domain=str(record[9]),
    )
