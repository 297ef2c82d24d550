"""Loaders of the labelled data sets under `data/` (see data/README.md for sources and licenses)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from learner.errors import DatasetError
from learner.tasks import SENTIMENT, TOPIC, spec_of

# SEntFiN's Decisions column is dict-like but entity names hold unescaped quotes: a regex is robust where
# literal_eval is not.
_SENTFIN_DECISION = re.compile(r"'(.+?)': '(positive|negative|neutral)'")


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass(frozen=True)
class TimedExample:
    """One text with its publication time and, when an analyst labelled it, its sentiment."""

    id: str
    published_at: datetime
    text: str
    sentiment: str | None


def default_data_dir() -> Path:
    """Return the `data/` directory shipped with the project."""
    return Path(__file__).resolve().parents[1] / "data"


def _open_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except FileNotFoundError as e:
        raise DatasetError(f"data file {path} is missing; see data/README.md for where it comes from") from e


def task_data(task: str, split: str, data_dir: Path | None = None) -> list[Example]:
    """Load the `train` or `valid` split of a task's shipped data set, its integer labels named by the task."""
    data = spec_of(task).data
    path = (data_dir or default_data_dir()) / data.folder / f"{data.prefix}_{split}.csv"
    return [Example(row["text"], data.label_ids[int(row["label"])]) for row in _open_csv(path)]


def tfns_sentiment(split: str, data_dir: Path | None = None) -> list[Example]:
    """Load twitter-financial-news-sentiment (`train` or `valid`) with finpulse sentiment labels."""
    return task_data(SENTIMENT.name, split, data_dir)


def tfns_topic(split: str, data_dir: Path | None = None) -> list[Example]:
    """Load twitter-financial-news-topic (`train` or `valid`) with topic names as labels."""
    return task_data(TOPIC.name, split, data_dir)


def sentfin_headlines(data_dir: Path | None = None) -> list[Example]:
    """Load SEntFiN headlines whose entities all agree on one sentiment (mixed ones are left out)."""
    path = (data_dir or default_data_dir()) / "sentfin" / "SEntFiN.csv"
    examples = []
    for row in _open_csv(path):
        labels = {label for _, label in _SENTFIN_DECISION.findall(row["Decisions"])}
        if len(labels) == 1:
            examples.append(Example(row["Title"], labels.pop()))
    return examples


def stock_tweets(data_dir: Path | None = None, labelled_only: bool = False) -> list[TimedExample]:
    """Load the stock-market tweets (Apr–Jul 2020) in time order."""
    path = (data_dir or default_data_dir()) / "stock-market-tweets-labelled" / "tweets_labelled_09042020_16072020.csv"
    tweets = []
    for row in _open_csv(path, delimiter=";"):
        label = (row.get("sentiment") or "").strip() or None
        if labelled_only and label is None:
            continue
        published = datetime.fromisoformat(row["created_at"]).astimezone(UTC)
        tweets.append(TimedExample(f"smt-{row['id']}", published, row["text"], label))
    tweets.sort(key=lambda t: t.published_at)
    return tweets
