"""The task registry: labels, CLI choices, columns, fields and metric label sets are derived from it.

A third task is registered for the duration of a test (the `third` fixture) and every derived place is asked
about it without any other module being edited; the shipped tasks keep every name they had.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from finpulse.cli import build_parser
from learner import tasks
from learner.datasets import task_data
from learner.errors import LearnerError, TaskError
from learner.model import Answer, Prediction
from learner.model_card import DATASETS, render
from learner.registry import task_of
from learner.tasks import SENTIMENT, TOPIC, Dataset, TaskSpec
from monitor.metrics import ModelVersionCollector
from storage import History, StorageConfig
from storage.labels import LabelStore
from storage.schema import NEWS_COLUMN_NAMES, NEWS_COLUMNS, NEWS_TASKS, task_columns
from stream.messages import NewsItem
from stream.sinks import Scored, news_row, scored_value
from stream.updates import SwapMetrics, UpdateError, parse_update, update_value

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _Record:
    """The fields of a Kafka ConsumerRecord that the sinks read."""

    topic: str = "news.raw"
    partition: int = 0
    offset: int = 7


RISK = TaskSpec(
    name="risk",
    labels=("low", "elevated", "high"),
    description="how much market risk a financial news text signals",
    data=Dataset(
        hub_id="example/financial-risk",
        folder="financial-risk",
        prefix="risk",
        label_ids=("high", "low", "elevated"),
        via="a test fixture",
        license="MIT",
        labels_note="0 high, 1 low, 2 elevated.",
    ),
    probability_columns=True,
    example="Bank run fears spread after deposit outflows",
    hub_tag="risk-assessment",
)


@pytest.fixture
def third() -> Iterator[TaskSpec]:
    """Register a third task for one test and remove it again."""
    with tasks.registered(RISK) as spec:
        yield spec
    assert "risk" not in tasks.task_names()


def _task_choices(parser: argparse.ArgumentParser, prog: str = "finpulse") -> dict[str, list[str]]:
    """Return the choices of every `--task` option and `task` positional, by command."""
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if action.dest == "task" and action.choices is not None:
            found[prog] = list(action.choices)
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.update(_task_choices(child, f"{prog} {name}"))
    return found


# -- the shipped tasks keep their names ------------------------------------------------------------------------


def test_the_shipped_tasks_are_registered_in_their_order_with_their_labels() -> None:
    assert tasks.task_names() == ("sentiment", "topic")
    assert tasks.labels_of("sentiment") == ("negative", "neutral", "positive")
    assert len(tasks.labels_of("topic")) == 20 and tasks.labels_of("topic")[5] == "Earnings"


def test_the_history_columns_of_the_shipped_tasks_are_the_ones_stored() -> None:
    derived = [name for name, _ in task_columns(NEWS_TASKS)]
    assert derived == [
        "topic",
        "topic_confidence",
        "topic_version",
        "sentiment",
        "sentiment_confidence",
        "sentiment_negative",
        "sentiment_neutral",
        "sentiment_positive",
        "sentiment_version",
    ]
    assert set(derived) <= set(NEWS_COLUMN_NAMES)


def test_a_prediction_built_from_answers_equals_the_one_built_field_by_field() -> None:
    scores = {"negative": 0.2, "neutral": 0.5, "positive": 0.3}
    legacy = Prediction("neutral", 0.5, scores, "Markets", 0.6, "sentiment-v1", "topic-v2")
    answers = {task: legacy.answer(task) for task in tasks.task_names()}
    assert answers["topic"] == Answer("Markets", 0.6, "topic-v2", None)
    assert answers["sentiment"] == Answer("neutral", 0.5, "sentiment-v1", scores)
    assert Prediction.of(answers) == legacy


def test_the_scored_message_and_the_history_row_keep_their_field_names() -> None:
    prediction = Prediction(
        "neutral", 0.5, {"negative": 0.2, "neutral": 0.5, "positive": 0.3}, "Markets", 0.6, "sentiment-v1", "topic-v2"
    )
    at = datetime(2026, 1, 2, tzinfo=UTC)
    scored = Scored(_Record(), NewsItem("n1", "Oil slides", at, "wire", ("XOM",)), prediction, at)
    message = json.loads(scored_value(scored))
    assert {k: message[k] for k in ("topic", "topic_confidence", "sentiment", "sentiment_confidence")} == {
        "topic": "Markets",
        "topic_confidence": 0.6,
        "sentiment": "neutral",
        "sentiment_confidence": 0.5,
    }
    assert message["sentiment_scores"] == {"negative": 0.2, "neutral": 0.5, "positive": 0.3}
    assert message["versions"] == {"sentiment": "sentiment-v1", "topic": "topic-v2"}
    assert "topic_scores" not in message
    row = news_row(scored)
    assert (row.sentiment_negative, row.sentiment_neutral, row.sentiment_positive) == (0.2, 0.5, 0.3)
    assert (row.topic, row.topic_version, row.sentiment_version) == ("Markets", "topic-v2", "sentiment-v1")


# -- a third task reaches every derived place -------------------------------------------------------------------


def test_a_registered_task_has_its_labels_and_version_names(third: TaskSpec) -> None:
    assert tasks.task_names() == ("sentiment", "topic", "risk")
    assert tasks.labels_of("risk") == ("low", "elevated", "high")
    assert tasks.check_task("risk") == "risk"
    assert tasks.version_task("risk-v12") == "risk" and tasks.version_number("risk-v12") == 12
    assert task_of("risk-v3") == "risk"


def test_an_unregistered_task_has_no_version_names() -> None:
    assert tasks.version_task("risk-v3") is None and tasks.version_number("risk-v3") == 0
    with pytest.raises(LearnerError, match="versions are named sentiment-vN or topic-vN"):
        task_of("risk-v3")


def test_the_cli_offers_a_registered_task_wherever_it_takes_one(third: TaskSpec) -> None:
    choices = _task_choices(build_parser())
    assert set(choices) == {
        "finpulse bootstrap",
        "finpulse learn",
        "finpulse label suggest",
        "finpulse models list",
        "finpulse models rollback",
    }
    assert all(found == ["sentiment", "topic", "risk"] for found in choices.values()), choices
    assert build_parser().parse_args(["bootstrap", "--task", "risk"]).task == ["risk"]


def test_the_cli_refuses_a_task_that_is_not_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bootstrap", "--task", "risk"])
    assert "invalid choice: 'risk'" in capsys.readouterr().err


def test_the_history_columns_of_a_registered_task_are_named_from_its_spec(third: TaskSpec) -> None:
    columns = dict(task_columns())
    assert {name: columns[name] for name in columns if name.startswith("risk")} == {
        "risk": "VARCHAR",
        "risk_confidence": "DOUBLE",
        "risk_low": "DOUBLE",
        "risk_elevated": "DOUBLE",
        "risk_high": "DOUBLE",
        "risk_version": "VARCHAR",
    }
    # The stored schema's steps shipped: the new task's columns come with a migration of their own.
    assert not any(name.startswith("risk") for name, _ in NEWS_COLUMNS)


def test_the_model_version_metrics_export_a_registered_task_from_zero(third: TaskSpec) -> None:
    registry = CollectorRegistry()
    registry.register(ModelVersionCollector(dict))
    for outcome in ("promoted", "rejected", "rolled_back"):
        assert (
            registry.get_sample_value(
                "finpulse_model_versions_total", {"task": "risk", "domain": "default", "outcome": outcome}
            )
            == 0
        )
    SwapMetrics(registry).declare()
    labels = {"task": "risk", "domain": "default"}
    assert registry.get_sample_value("finpulse_model_swaps_total", labels) == 0
    assert registry.get_sample_value("finpulse_model_swap_failures_total", labels) == 0


def test_without_it_the_metrics_have_no_series_of_it() -> None:
    registry = CollectorRegistry()
    registry.register(ModelVersionCollector(dict))
    assert (
        registry.get_sample_value(
            "finpulse_model_versions_total", {"task": "risk", "domain": "default", "outcome": "promoted"}
        )
        is None
    )
    assert (
        registry.get_sample_value(
            "finpulse_model_versions_total", {"task": "topic", "domain": "default", "outcome": "promoted"}
        )
        == 0
    )


def test_a_model_update_of_a_registered_task_is_accepted(third: TaskSpec) -> None:
    update = parse_update(update_value("risk", "risk-v2", "promoted", "risk-v1"))
    assert (update.task, update.version, update.previous) == ("risk", "risk-v2", "risk-v1")
    with pytest.raises(UpdateError, match="'sentiment-v2' is not a risk version; expected risk-vN"):
        parse_update(update_value("risk", "sentiment-v2", "promoted", None))


def test_a_model_update_of_an_unregistered_task_is_refused() -> None:
    payload = {
        "task": "risk",
        "version": "risk-v2",
        "event": "promoted",
        "previous": None,
        "at": "2026-01-02T00:00:00Z",
    }
    with pytest.raises(UpdateError, match="field 'task': task must be one of sentiment, topic; got 'risk'"):
        parse_update(json.dumps(payload).encode())


def test_a_registered_task_loads_its_data_with_its_label_ids(third: TaskSpec, tmp_path: Path) -> None:
    folder = tmp_path / "financial-risk"
    folder.mkdir()
    (folder / "risk_train.csv").write_text("text,label\nCalm markets,1\nBank run,0\nRates jump,2\n", encoding="utf-8")
    assert [(e.text, e.label) for e in task_data("risk", "train", tmp_path)] == [
        ("Calm markets", "low"),
        ("Bank run", "high"),
        ("Rates jump", "elevated"),
    ]


def test_the_model_card_of_a_registered_task_comes_from_its_spec(third: TaskSpec) -> None:
    shipped = (REPO / "adapters" / "sentiment" / "sentiment-v1" / "model_card.json").read_text(encoding="utf-8")
    card: dict[str, Any] = {**json.loads(shipped), "task": "risk", "version": "risk-v1", "labels": list(RISK.labels)}
    text = render(card)
    assert "datasets:\n- example/financial-risk" in text and "- risk-assessment" in text
    assert RISK.description in text and RISK.example in text and "`data/financial-risk/`" in text
    assert DATASETS["risk"] is RISK.data


def test_the_label_store_refuses_a_task_its_table_has_no_column_for(third: TaskSpec, tmp_path: Path) -> None:
    store = LabelStore(History(StorageConfig(duckdb_path=tmp_path / "history.duckdb")))
    with pytest.raises(ValueError, match="no column in the labels table"):
        store.pending("risk")


# -- refusals -----------------------------------------------------------------------------------------------------


def test_an_unknown_task_is_refused_in_one_line_naming_the_known_ones() -> None:
    with pytest.raises(TaskError) as refused:
        tasks.check_task("emotion")
    assert str(refused.value) == "task must be one of sentiment, topic; got 'emotion'"
    assert isinstance(refused.value, LearnerError) and isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Risk"}, "task name 'Risk' must be"),
        ({"name": "risk-level"}, "task name 'risk-level' must be"),
        ({"labels": ()}, "labels must be non-empty and distinct"),
        ({"labels": ("low", "low", "high", "elevated")}, "labels must be non-empty and distinct"),
        ({"labels": ("low", "very high", "high", "elevated")}, "cannot name probability columns"),
        ({"labels": ("low", "high")}, "its data maps ids to \\['elevated'\\]"),
    ],
)
def test_a_spec_that_cannot_become_names_is_refused(change: dict[str, Any], message: str) -> None:
    fields = {**RISK.__dict__, **change}
    with pytest.raises(TaskError, match=message):
        TaskSpec(**fields)


def test_labels_that_are_not_identifiers_are_fine_without_probability_columns() -> None:
    assert TaskSpec(**{**TOPIC.__dict__, "name": "topic2"}).probability_column_names == ()


def test_a_taken_name_is_refused_and_the_registry_is_left_as_it_was() -> None:
    with pytest.raises(TaskError, match="task sentiment is registered already"):
        tasks.register(TaskSpec(**{**SENTIMENT.__dict__}))
    assert tasks.spec_of("sentiment") is SENTIMENT and tasks.task_names() == ("sentiment", "topic")
