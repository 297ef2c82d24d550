"""Analyst tooling: send labels from a file or a history query, and find the messages most worth labelling.

`finpulse label send` validates every label with the `news.labels` contract before anything is sent (a file with
one bad row sends nothing, and each bad row is reported with the reason the dead-letter topic would give), then
produces them and waits for every acknowledgement. `finpulse label suggest` lists the recent scored messages the
model is least sure of (calibrated confidence), which no analyst has labelled yet: labels there teach the most.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaProducer

from finpulse.errors import FinpulseError
from learner.config import ModelConfig
from learner.tasks import Task, spec_of
from storage import History
from storage.labels import LABEL_TASKS
from stream.connection import Target, client_kwargs
from stream.labels import parse_label
from stream.messages import Invalid

LABEL_FIELDS = ("id", "text", *LABEL_TASKS, "labelled_at", "labeller", "domain")
MAX_REPORTED = 20


class LabelFileError(FinpulseError):
    """A label file or query cannot be sent; the message lists what to fix."""


@dataclass(frozen=True)
class Refused:
    """One label the contract refuses: where it came from, the dead-letter reason and the detail."""

    where: str
    reason: str
    detail: str


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Read labels from a CSV file (a header row) or JSON Lines (.jsonl / .ndjson); return (where, row) pairs."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileError(f"cannot read {path}: {e}") from e
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows: list[tuple[str, dict[str, Any]]] = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelFileError(f"{path}:{n}: not JSON ({e.msg}); one label object per line") from e
            if not isinstance(value, dict):
                raise LabelFileError(f"{path}:{n}: a label is a JSON object, got {type(value).__name__}")
            rows.append((f"{path.name}:{n}", value))
        return rows
    reader = csv.DictReader(text.splitlines())
    missing = {"id", "text"} - set(reader.fieldnames or ())
    if missing:
        raise LabelFileError(f"{path}: the header lacks {sorted(missing)}; columns are {', '.join(LABEL_FIELDS)}")
    # Line numbers count the header: the first label is on line 2, as an editor shows it.
    return [(f"{path.name}:{n}", dict(row)) for n, row in enumerate(reader, start=2)]


def to_values(
    rows: Iterable[tuple[str, dict[str, Any]]], labeller: str | None, max_text_bytes: int
) -> tuple[list[tuple[bytes, bytes]], list[Refused]]:
    """Turn rows into validated `news.labels` (key, value) pairs; return them and the refused rows."""
    now = datetime.now(UTC).isoformat()
    values: list[tuple[bytes, bytes]] = []
    refused: list[Refused] = []
    for where, row in rows:
        payload = {k: v for k, v in row.items() if k in LABEL_FIELDS and v not in (None, "")}
        unknown = sorted(set(row) - set(LABEL_FIELDS))
        if unknown:
            refused.append(Refused(where, "unknown_field", f"unknown column(s) {unknown}; use {list(LABEL_FIELDS)}"))
            continue
        payload.setdefault("labelled_at", now)
        if labeller is not None:
            payload.setdefault("labeller", labeller)
        value = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        parsed = parse_label(value, max_text_bytes)
        if isinstance(parsed, Invalid):
            refused.append(Refused(where, parsed.reason.value, parsed.detail))
            continue
        values.append((parsed.id.encode("utf-8"), value))
    return values, refused


def query_rows(history: History, sql: str) -> list[tuple[str, dict[str, Any]]]:
    """Run a read-only history query whose columns are label fields (at least id and text)."""
    result = history.query(sql)
    missing = {"id", "text"} - set(result.columns)
    if missing:
        raise LabelFileError(f"the query returns no {sorted(missing)} column: select id, text and the labels")
    return [
        (f"query row {n}", {c: (None if v is None else str(v)) for c, v in zip(result.columns, row, strict=True)})
        for n, row in enumerate(result.rows, start=1)
    ]


def send(bootstrap: Target, topic: str, values: Sequence[tuple[bytes, bytes]]) -> int:
    """Produce labels and wait until the broker acknowledged every one; return how many."""
    producer = KafkaProducer(**client_kwargs(bootstrap), acks="all", enable_idempotence=True, linger_ms=5)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in values]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close(timeout=10)
    return len(values)


# Ranking of `suggestions`: by calibrated confidence (cheap: the history has it), by distance to the training
# data (loads the encoder), or by both ranks together.
Ranking = Literal["confidence", "novelty", "both"]
# Recent candidates scored for novelty: the embedding costs a few milliseconds each on a CPU.
NOVELTY_POOL = 500


def suggestions(
    history: History,
    task: Task,
    n: int,
    since_hours: float = 24.0,
    by: Ranking = "confidence",
    model: ModelConfig | None = None,
) -> list[dict[str, Any]]:
    """Return `n` scored messages of the last `since_hours` that no label covers yet, the most worth labelling
    first: the least confident, the most unlike the training data (`novelty`), or the best of both ranks."""
    spec = spec_of(task)  # its names are spliced into the SQL below
    confidence, predicted = spec.confidence_column, spec.name
    has_labels = _has_labels(history)
    labelled = history.query("SELECT DISTINCT id FROM labels").rows if has_labels else []
    taken = {str(r[0]) for r in labelled}
    # Read a margin beyond n: some of the least confident may be labelled already.
    window_us = int(since_hours * 3600e6)
    order, limit = (confidence + ", scored_at DESC", n) if by == "confidence" else ("scored_at DESC", NOVELTY_POOL)
    sql = (
        f"SELECT id, round({confidence}, 4) AS confidence, {predicted} AS predicted, source, text FROM news_latest "
        f"WHERE coalesce(outcome, 'scored') = 'scored' AND scored_at >= now() - to_microseconds({window_us}) "
        f"ORDER BY {order} LIMIT {int(limit) + len(taken)}"
    )
    result = history.query(sql)
    out = [dict(zip(result.columns, row, strict=True)) for row in result.rows if str(row[0]) not in taken]
    if by == "confidence" or not out:
        return out[:n]
    from learner.novelty import Novelty

    learnt = history.query("SELECT text FROM labels ORDER BY labelled_at DESC LIMIT 2000").rows if has_labels else []
    novelty = Novelty(model or ModelConfig(), [str(r[0]) for r in learnt])
    for row, score in zip(out, novelty.scores([str(r["text"]) for r in out]), strict=True):
        row["novelty"] = score
    if by == "novelty":
        return sorted(out, key=lambda r: -float(str(r["novelty"])))[:n]
    # Both: the sum of each message's rank by confidence (lowest first) and by novelty (highest first).
    by_conf = {id(r): i for i, r in enumerate(sorted(out, key=lambda r: float(str(r["confidence"]))))}
    by_new = {id(r): i for i, r in enumerate(sorted(out, key=lambda r: -float(str(r["novelty"]))))}
    return sorted(out, key=lambda r: (by_conf[id(r)] + by_new[id(r)], float(str(r["confidence"]))))[:n]


def _has_labels(history: History) -> bool:
    found = history.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'labels'").rows
    return bool(found and int(str(found[0][0])) > 0)
