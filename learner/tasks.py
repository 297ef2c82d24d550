"""The task registry: every classification task finpulse serves, as data.

A task is one frozen `TaskSpec`: its name, its labels in the order of the classifier outputs, what it predicts
and the data its first adapter is trained on. The history's column names, the scored message's fields, metric
label values, the CLI's `--task` choices and the learner's per-task loops are derived from the registered specs.
The history's stored schema is the exception: its migrations are written out once and never change, so a new
task's columns arrive with a migration of their own (`storage.schema.task_columns` says which).

The shipped tasks are registered at import; `registered` adds a task for the duration of a `with` block.
Imports nothing beyond the standard library, so storage may name columns from it without loading torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from learner.errors import TaskError

__all__ = [
    "SENTIMENT",
    "TOPIC",
    "Dataset",
    "Task",
    "TaskSpec",
    "check_task",
    "labels_of",
    "register",
    "registered",
    "spec_of",
    "specs",
    "task_names",
    "version_number",
    "version_task",
]

# A task name becomes a directory, a version name (`<name>-vN`), a metric label value and the stem of column
# names spliced into SQL: a lower-case identifier, without '-' (it separates the version number).
_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_VERSION: Final = re.compile(r"^([a-z][a-z0-9_]{0,31})-v(\d+)$")
# A label with a probability column of its own is the suffix of that column's name.
_COLUMN_SUFFIX: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# A plain str, checked against the registry where a name enters (CLI choices, model cards, version names, the
# label store): tasks are registered at run time, which a Literal cannot follow, and a Literal would repeat
# every name the registry holds.
Task = str


@dataclass(frozen=True)
class Dataset:
    """The labelled corpus a task's first adapter is trained and validated on, as shipped under `data/`."""

    hub_id: str  # where it comes from on the Hugging Face hub
    folder: str  # its directory under data/
    prefix: str  # its files: <prefix>_train.csv and <prefix>_valid.csv, with columns `text` and integer `label`
    label_ids: tuple[str, ...]  # the task label each integer label of the files stands for, in id order
    via: str  # how the copy was obtained (data/README.md)
    license: str
    labels_note: str  # how the files' labels map to the task's, for the model card


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: what its columns, fields, metric labels and CLI choices are derived from."""

    name: str
    labels: tuple[str, ...]  # in the order of the classifier outputs
    description: str  # what it predicts, as the model card completes "... a LoRA adapter that predicts <it>"
    data: Dataset
    # Keep every label's probability (history columns `<name>_<label>`, the scored message's `<name>_scores`),
    # not only the chosen label's confidence: worth it for a few labels that analysts filter on.
    probability_columns: bool = False
    example: str = ""  # a text the model card's loading snippet scores
    hub_tag: str = ""  # the hub tag of its kind of task, beside finpulse's own tags

    def __post_init__(self) -> None:
        """Refuse names and labels that cannot become directories, column names and metric label values."""
        if not _NAME.match(self.name):
            raise TaskError(
                f"task name {self.name[:40]!r} must be 1-32 characters of a-z, 0-9 and '_', starting with a letter"
            )
        if not self.labels or len(set(self.labels)) != len(self.labels) or not all(self.labels):
            raise TaskError(f"task {self.name}: labels must be non-empty and distinct, got {list(self.labels)[:8]}")
        if self.probability_columns:
            bad = [label for label in self.labels if not _COLUMN_SUFFIX.match(label)]
            if bad:
                raise TaskError(
                    f"task {self.name}: labels {bad[:4]} cannot name probability columns; use a-z, 0-9 and '_' "
                    "or set probability_columns=False"
                )
        unknown = [label for label in self.data.label_ids if label not in self.labels]
        if unknown:
            raise TaskError(f"task {self.name}: its data maps ids to {unknown[:4]}, which are not among its labels")

    @property
    def confidence_column(self) -> str:
        """Return the name of the chosen label's probability (history column, scored-message field)."""
        return f"{self.name}_confidence"

    @property
    def version_column(self) -> str:
        """Return the name of the adapter version that answered (history column)."""
        return f"{self.name}_version"

    @property
    def scores_field(self) -> str:
        """Return the scored-message field holding every label's probability, when the spec keeps them."""
        return f"{self.name}_scores"

    @property
    def probability_column_names(self) -> tuple[str, ...]:
        """Return the history columns of every label's probability, in label order (none unless kept)."""
        return tuple(f"{self.name}_{label}" for label in self.labels) if self.probability_columns else ()


SENTIMENT: Final = TaskSpec(
    name="sentiment",
    labels=("negative", "neutral", "positive"),
    description="the market sentiment of a financial news text: bearish (`negative`), `neutral` or bullish "
    "(`positive`)",
    data=Dataset(
        hub_id="zeroshot/twitter-financial-news-sentiment",
        folder="twitter-financial-news-sentiment",
        prefix="sent",
        # twitter-financial-news-sentiment: 0 Bearish, 1 Bullish, 2 Neutral.
        label_ids=("negative", "positive", "neutral"),
        via="GitHub umaima-aman/Twee_Sentiment_Analysis-DeepLearning @0286b19",
        license="MIT (data set card)",
        labels_note="TFNS labels map as 0 Bearish → `negative`, 1 Bullish → `positive`, 2 Neutral → `neutral`.",
    ),
    probability_columns=True,
    example="$AAPL plunges after earnings miss and weak guidance",
    hub_tag="sentiment-analysis",
)

# The 20 topics of twitter-financial-news-topic, in the order of its integer labels 0..19.
_TOPICS: Final = (
    "Analyst Update",
    "Fed / Central Banks",
    "Company / Product News",
    "Treasuries / Corporate Debt",
    "Dividend",
    "Earnings",
    "Energy / Oil",
    "Financials",
    "Currencies",
    "General News / Opinion",
    "Gold / Metals / Materials",
    "IPO",
    "Legal / Regulation",
    "M&A / Investments",
    "Macro",
    "Markets",
    "Politics",
    "Personnel Change",
    "Stock Commentary",
    "Stock Movement",
)

TOPIC: Final = TaskSpec(
    name="topic",
    labels=_TOPICS,
    description="which of 20 financial topics a news text is about (earnings, M&A, the Fed, …)",
    data=Dataset(
        hub_id="zeroshot/twitter-financial-news-topic",
        folder="twitter-financial-news-topic",
        prefix="topic",
        label_ids=_TOPICS,
        via="GitHub Kaifzen/twitter-financial-news:data/new_data_{train,test}.csv @b964a92 (renamed)",
        license="MIT (data set card)",
        labels_note="Output index k is TFNS topic id k.",
    ),
    example="Fed leaves interest rates unchanged, signals patience",
    hub_tag="topic",
)

# In registration order, which is the order of every per-task loop, listing and default.
_REGISTRY: Final[dict[str, TaskSpec]] = {SENTIMENT.name: SENTIMENT, TOPIC.name: TOPIC}


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry; refuse a name that is taken."""
    if spec.name in _REGISTRY:
        raise TaskError(f"task {spec.name} is registered already; give the new task another name")
    _REGISTRY[spec.name] = spec
    return spec


@contextmanager
def registered(spec: TaskSpec) -> Iterator[TaskSpec]:
    """Register `spec` for the duration of a `with` block, and remove it again on the way out."""
    register(spec)
    try:
        yield spec
    finally:
        _REGISTRY.pop(spec.name, None)


def specs() -> tuple[TaskSpec, ...]:
    """Return every registered task's spec, in registration order."""
    return tuple(_REGISTRY.values())


def task_names() -> tuple[str, ...]:
    """Return every registered task's name, in registration order."""
    return tuple(_REGISTRY)


def check_task(name: str) -> str:
    """Return `name` if a task is registered under it, else raise TaskError naming the known tasks."""
    if name not in _REGISTRY:
        raise TaskError(f"task must be one of {', '.join(_REGISTRY)}; got {str(name)[:40]!r}")
    return name


def spec_of(name: str) -> TaskSpec:
    """Return the spec of a registered task."""
    return _REGISTRY[check_task(name)]


def labels_of(task: str) -> tuple[str, ...]:
    """Return the ordered label names of a task."""
    return spec_of(task).labels


def version_task(version: str) -> str | None:
    """Return the task of a `<task>-vN` version name, or None when the name is not one of a registered task."""
    match = _VERSION.match(version)
    return match.group(1) if match is not None and match.group(1) in _REGISTRY else None


def version_number(version: str) -> int:
    """Return N of a `<task>-vN` version name of a registered task, 0 for other names."""
    match = _VERSION.match(version)
    return int(match.group(2)) if match is not None and match.group(1) in _REGISTRY else 0
