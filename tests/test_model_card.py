"""Hugging Face files of an adapter version: a real model card and the label names, from the version's files alone."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from finpulse.cli import main
from learner import adapters as adapters_module
from learner import training
from learner.adapters import (
    CARD_FILE,
    HUB_CONFIG_FILE,
    README_FILE,
    AdapterStore,
    ModelCard,
    hub_config,
    write_hub_files,
)
from learner.encoder import base_model_path, load_classifier_base, load_tokenizer
from learner.errors import ModelLoadError
from learner.labels import TASKS, labels_of
from learner.model_card import DATASETS, LICENSE, render

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"sentiment": "sentiment-v1", "topic": "topic-v1"}
SECTIONS = (
    "## What it is",
    "## Intended use",
    "## Labels",
    "## Training data",
    "## Evaluation",
    "## Limitations",
    "## How to load it",
)
TEXTS = ["$AAPL plunges after earnings miss and weak guidance", "Exxon raises dividend by 5%"]


def _shipped_card(task: str) -> dict[str, Any]:
    return json.loads((REPO / "adapters" / task / SHIPPED[task] / CARD_FILE).read_text(encoding="utf-8"))


def _continual_card() -> dict[str, Any]:
    """A card as learner.trainer.train_candidate writes it: held-out slice of an experience, no macro-F1."""
    return {
        **_shipped_card("topic"),
        "version": "topic-v4",
        "parent": "topic-v3",
        "data": {"experience": 3, "n_train": 160, "n_holdout": 40},
        "metrics": {
            "holdout": {"accuracy": 0.85, "champion_accuracy": 0.8, "n": 40},
            "matrix_row": {"0": 0.88, "3": 0.85},
        },
        "hyperparameters": {"replay_size": 500, "ewc_lambda": 100.0},
    }


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match is not None, "the card starts with YAML front matter between --- lines"
    meta = yaml.safe_load(match.group(1))
    assert isinstance(meta, dict)
    return meta


def _scores(meta: dict[str, Any]) -> dict[str, float]:
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "text-classification"
    return {score["name"]: score["value"] for score in result["metrics"]}


# card, the scores its model-index must carry, the dataset split they were measured on
CARDS = [
    pytest.param(
        _shipped_card("sentiment"), {"Accuracy": 0.8681, "Macro F1": 0.8235}, "validation", id="bootstrap-sentiment"
    ),
    pytest.param(_shipped_card("topic"), {"Accuracy": 0.8973, "Macro F1": 0.8833}, "validation", id="bootstrap-topic"),
    pytest.param(_continual_card(), {"Accuracy": 0.85}, "holdout", id="continual-topic"),
]


@pytest.mark.parametrize(("card", "scores", "split"), CARDS)
def test_card_has_hub_metadata_and_every_section(card: dict[str, Any], scores: dict[str, float], split: str) -> None:
    text = render(card)
    meta = _front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (meta["library_name"], meta["pipeline_tag"], meta["license"], meta["language"]) == (
        "peft",
        "text-classification",
        LICENSE,
        ["en"],
    )
    assert meta["datasets"] == [DATASETS[card["task"]].hub_id]
    assert _scores(meta) == scores
    assert meta["metrics"] == (["accuracy", "f1"] if "Macro F1" in scores else ["accuracy"])
    assert meta["model-index"][0]["name"] == card["version"]
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == split
    assert [line for line in text.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert "More Information Needed" not in text and "[optional]" not in text and "<!--" not in text
    for label in card["labels"]:
        assert f"| {label} |" in text
    assert DATASETS[card["task"]].license in text and "English only" in text
    measured = card["metrics"].get("holdout", card["metrics"].get("valid"))
    assert f"Measured accuracy is {measured['accuracy']:.1%}" in text


def test_card_without_metrics_or_hub_base_still_renders() -> None:
    card = {**_shipped_card("sentiment"), "base_model": "/models/my-minilm", "metrics": {}, "hyperparameters": {}}
    text = render(card)
    meta = _front_matter(text)
    assert "base_model" not in meta and "model-index" not in meta and "metrics" not in meta
    assert "`/models/my-minilm`" in text and "records no held-out evaluation" in text
    assert "No held-out accuracy is recorded" in text


def test_a_blended_versions_card_says_how_far_it_was_blended_back_and_why() -> None:
    card = _continual_card()
    reason = "forgets experience 0: 0.799 vs champion 0.846 (-4.7 pts ± 1.0; at most -1.0 pts beyond the noise allowed)"
    tried = [{"weight": 1.0, "promote": False, "reason": reason}, {"weight": 0.25, "promote": True, "reason": "ok"}]
    card["metrics"] = {**card["metrics"], "blend": {"weight": 0.25, "tried": tried}}
    text = render(card)
    assert "parent + 0.25 x (trained - parent)" in text and reason in text and "`topic-v3`'s" in text
    trained = {**card, "metrics": {**card["metrics"], "blend": {"weight": 1.0, "tried": tried[:1]}}}
    assert "blended back" not in render(trained) and "blended back" not in render(_continual_card())


def test_an_unknown_task_is_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="fix the card's `task` field"):
        render({**_shipped_card("sentiment"), "task": "emotion"})


def test_data_sources_and_licenses_agree_with_data_readme() -> None:
    rows = (REPO / "data" / "README.md").read_text(encoding="utf-8").splitlines()
    for dataset in DATASETS.values():
        folder = dataset.folder.removeprefix("data/")
        [row] = [row for row in rows if row.startswith(f"| `{folder}/`")]
        assert dataset.hub_id in row and f"| {dataset.license} |" in row and dataset.via.split()[-1] in row


def test_the_packaged_base_is_named_as_training_records_it() -> None:
    assert adapters_module.PACKAGED_BASE_ID == training.PACKAGED_BASE_ID
    assert training.PACKAGED_BASE.startswith(f"{training.PACKAGED_BASE_ID} (")


@pytest.mark.parametrize("task", TASKS)
def test_shipped_hub_files_equal_a_fresh_render(task: str, adapters_dir: Path, tmp_path: Path) -> None:
    shipped = adapters_dir / task / SHIPPED[task]
    fresh = tmp_path / SHIPPED[task]
    fresh.mkdir()
    for name in ("adapter_config.json", CARD_FILE):
        shutil.copy(shipped / name, fresh)
    write_hub_files(fresh)
    for name in (README_FILE, HUB_CONFIG_FILE):
        assert (shipped / name).read_text(encoding="utf-8") == (fresh / name).read_text(
            encoding="utf-8"
        ), f"{shipped / name} drifted from its model card: run learner.adapters.write_hub_files on {shipped}"


@pytest.mark.parametrize("task", TASKS)
def test_label_names_load_from_the_files_alone(task: str, adapters_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = adapters_dir / task / SHIPPED[task]
    config = AutoConfig.from_pretrained(str(path))
    expected = dict(enumerate(labels_of(task)))
    assert config.id2label == expected and config.num_labels == len(expected)
    assert config.label2id == {label: i for i, label in expected.items()}
    base = AutoModelForSequenceClassification.from_pretrained(str(base_model_path()), config=config)
    model = PeftModel.from_pretrained(base, str(path)).eval()
    assert model.config.id2label == expected
    # The config changes only the labels: the adapter predicts exactly as the scorer loads it.
    scorer_view = PeftModel.from_pretrained(load_classifier_base(len(expected)), str(path)).eval()
    batch = load_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(model(**batch).logits, scorer_view(**batch).logits, atol=1e-5)


def test_the_cards_loading_snippet_runs(adapters_dir: Path) -> None:
    path = adapters_dir / "sentiment" / SHIPPED["sentiment"]
    text = (path / README_FILE).read_text(encoding="utf-8")
    [snippet] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    # Offline: the packaged copy of the base stands in for the hub id, the real path for the relative one.
    snippet = snippet.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(base_model_path())))
    snippet = snippet.replace('"adapters/sentiment/sentiment-v1"', repr(str(path)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    label, confidence = out.getvalue().split()
    assert label == "negative" and 0 < float(confidence) <= 1


def test_a_committed_version_gets_its_hub_files(tmp_path: Path, adapters_dir: Path) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_dir("topic", "topic-v2")
    shutil.copy(adapters_dir / "topic" / "topic-v1" / "adapter_config.json", staging)
    card = {**_continual_card(), "version": "topic-v2", "parent": "topic-v1"}
    (staging / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    path = store.commit_staged("topic", "topic-v2")
    config = json.loads((path / HUB_CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels_of("topic"))}
    assert config["architectures"] == ["BertForSequenceClassification"] and config["hidden_size"] == 384
    assert (path / README_FILE).read_text(encoding="utf-8") == render(card)


def test_a_card_whose_labels_are_not_the_tasks_is_refused() -> None:
    card = ModelCard(**{**_shipped_card("sentiment"), "labels": ["bearish", "neutral", "bullish"]})
    with pytest.raises(ModelLoadError, match="fix the card's `task` or `labels`"):
        hub_config(card, {"model_type": "bert"}, "sentence-transformers/all-MiniLM-L6-v2")


def test_bootstrap_writes_the_hub_files(tmp_path: Path) -> None:
    argv = ["bootstrap", "--task", "sentiment", "--limit", "16", "--adapters-dir", str(tmp_path)]
    settings = ["train.epochs=1", "train.batch_size=16", "train.lora_r=2", "train.lora_alpha=4"]
    assert main(argv + [arg for s in settings for arg in ("--set", s)]) == 0
    path = tmp_path / "sentiment" / "sentiment-v1"
    card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
    assert (path / README_FILE).read_text(encoding="utf-8") == render(card)
    config = json.loads((path / HUB_CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
