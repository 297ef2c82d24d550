"""Forming experiences: which labels train, which judge, and the bootstrap experience of the shipped champion."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from learner.config import ContinualConfig
from learner.datasets import Example, task_data
from learner.errors import DatasetError
from learner.tasks import Task

Labelled = tuple[str, str, str]  # (label id, text, label)

# The bootstrap experience's held-out slice: large enough that a 1-point margin is 10 examples, small enough to
# score in a second on the CPU.
BOOTSTRAP_HOLDOUT = 1000


def trigger(
    pending: int, oldest: dt.datetime | None, at: dt.datetime, config: ContinualConfig, manual: bool = False
) -> str | None:
    """Name the trigger that fires for `pending` waiting labels, the oldest from `oldest`: now, count, age or None.

    Below `min_labels` nothing fires, not even `--now`: a held-out slice of a handful of labels cannot tell a
    better candidate from a lucky one.
    """
    if pending < config.min_labels:
        return None
    if manual:
        return "now"
    if pending >= config.trigger_labels:
        return "count"
    interval = config.trigger_interval_s
    if interval > 0 and oldest is not None and (at - oldest).total_seconds() >= interval:
        return "age"
    return None


def split_holdout(rows: Sequence[Labelled], fraction: float, seed: int) -> tuple[list[Labelled], list[Labelled]]:
    """Split into (train, holdout), stratified by label so that every class present is judged.

    Deterministic for a given seed and set of rows, whatever their order: a retried experience splits the same way.
    """
    by_label: dict[str, list[Labelled]] = defaultdict(list)
    for row in sorted(rows):
        by_label[row[2]].append(row)
    rng = random.Random(seed)
    train: list[Labelled] = []
    holdout: list[Labelled] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        # At least one held-out example per class with two or more labels; never the whole class.
        k = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        holdout.extend(group[:k])
        train.extend(group[k:])
    return train, holdout


def bootstrap_slices(
    task: Task, memory_size: int, seed: int, data_dir: Path | None = None
) -> tuple[list[Labelled], list[Labelled]]:
    """Return the shipped champion's experience: a class-balanced sample of its training data (the first replay
    memory) and a sample of its validation split (held out from it) that every later candidate is judged on."""
    try:
        train = task_data(task, "train", data_dir)
        valid = task_data(task, "valid", data_dir)
    except DatasetError:
        return [], []
    rng = random.Random(seed)
    memory = _class_balanced(train, memory_size, rng)
    holdout = rng.sample(range(len(valid)), min(BOOTSTRAP_HOLDOUT, len(valid)))
    return (
        [(f"tfns-{task}-train-{i}", e.text, e.label) for i, e in memory],
        [(f"tfns-{task}-valid-{i}", valid[i].text, valid[i].label) for i in sorted(holdout)],
    )


def _class_balanced(examples: Sequence[Example], size: int, rng: random.Random) -> list[tuple[int, Example]]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    per_class = max(1, size // max(1, len(by_label)))
    chosen = [
        i for label in sorted(by_label) for i in rng.sample(by_label[label], min(per_class, len(by_label[label])))
    ]
    return [(i, examples[i]) for i in sorted(chosen)]
