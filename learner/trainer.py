"""Train a candidate adapter version from the champion on one experience, and score both on every held-out slice.

A version directory holds, beside the peft adapter and its model card, what the next version continues from:
`replay.json` (the class-balanced replay memory after this version's experience) and `ewc.safetensors`
(online-EWC importances and anchor weights of the trainable parameters). A rejected candidate's memory dies
with it: the next candidate starts again from the champion's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.adapters import CARD_FILE, AdapterStore, ModelCard, now_utc
from learner.blend import WeightBlend, search
from learner.calibration import calibration_report, fit_temperature
from learner.config import ContinualConfig, ModelConfig
from learner.continual import (
    FeatureBank,
    TopModel,
    build_strategy,
    experience_of,
    freeze_lower_layers,
    label_ids,
    load_tensors,
    memory_items,
    predict,
    progress_plugin,
    restore_memory,
    save_tensors,
    seed_everything,
    tensor_dataset,
)
from learner.domains import DEFAULT_DOMAIN
from learner.encoder import load_classifier_base, load_tokenizer
from learner.errors import LearnerError, ModelLoadError
from learner.gate import Decision, SliceScore, decide
from learner.labels import Task, labels_of
from learner.training import PACKAGED_BASE, bank_logits, save_adapter

log = logging.getLogger(__name__)

REPLAY_FILE = "replay.json"
EWC_FILE = "ewc.safetensors"

Pairs = list[tuple[str, str]]  # (text, label)


@dataclass(frozen=True)
class ExperienceSlices:
    """The examples of one experience: what trains and what judges."""

    id: int
    train: Pairs
    holdout: Pairs
    domain: str = DEFAULT_DOMAIN


@dataclass(frozen=True)
class Candidate:
    """A trained, saved candidate version and how it compares with the champion."""

    version: str
    parent: str
    path: Path
    new: SliceScore
    earlier: list[SliceScore]
    train_s: float
    steps: int
    out_of_time: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    # The gate's decision on what was saved (with blending, the search's); None: decide on `new` and `earlier`.
    decision: Decision | None = None


def read_memory(path: Path) -> Pairs:
    """Read a version's replay memory; an absent file is an empty memory."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read the replay memory {path}: {e}") from e
    return [(item["text"], item["label"]) for item in raw["examples"]]


def train_candidate(
    task: Task,
    adapters: AdapterStore,
    champion: str,
    new: ExperienceSlices,
    earlier: Sequence[ExperienceSlices],
    config: ContinualConfig,
    model_config: ModelConfig,
    seed_memory: Sequence[tuple[str, str]] = (),
    show_progress: bool = False,
) -> Candidate:
    """Continue the champion on `new` with replay + online EWC; save the result as the next version."""
    from peft import PeftModel

    if not new.train or not new.holdout:
        raise LearnerError(f"experience {new.id} needs training and held-out labels")
    seed_everything(config.seed + new.id)
    champion_dir = adapters.version_dir(task, champion)
    base = load_classifier_base(len(labels_of(task)), model_config.base_model)
    try:
        peft_model = PeftModel.from_pretrained(base, str(champion_dir), is_trainable=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load the champion {champion} from {champion_dir}: {e}") from e
    frozen = freeze_lower_layers(peft_model, config.trainable_layers)
    bank = FeatureBank(peft_model, load_tokenizer(model_config.base_model), frozen, model_config.max_length)
    model = TopModel(peft_model, bank)
    # Within a domain, learning continues: the champion's replay memory and EWC state carry over. A domain's
    # first version starts from another domain's champion, whose memory and importances describe data this
    # domain labels differently (the stock tweets and TFNS do): it starts from the weights alone.
    inherit = adapters.card(task, champion).domain == new.domain

    memory = (read_memory(champion_dir / REPLAY_FILE) or list(seed_memory)) if inherit else []
    mem_idx = bank.add([t for t, _ in memory])
    train_idx = bank.add([t for t, _ in new.train])
    slices = [*earlier, new]
    holdouts = [(s, bank.add([t for t, _ in s.holdout]), label_ids(task, [y for _, y in s.holdout])) for s in slices]
    before = [predict(model, idx) for _, idx, y in holdouts]

    steps = -(-len(new.train) // config.batch_size) * config.epochs
    bar = progress_plugin(steps, f"{task} experience {new.id}", config.time_budget_s, show_progress)
    strategy = build_strategy(
        model, config, replay=config.replay_size > 0, ewc=config.ewc_lambda > 0, distill=True, plugins=[bar]
    )
    if strategy.distill is not None:
        strategy.distill_from(model.frozen_copy(), len(labels_of(task)))
    memory_data = tensor_dataset(mem_idx, label_ids(task, [y for _, y in memory]))
    restore_memory(strategy, memory_data)
    if strategy.ewc is not None and inherit:
        ewc_path = champion_dir / EWC_FILE
        if ewc_path.is_file():
            strategy.ewc.load(load_tensors(ewc_path), model.classifier_device())
        elif len(memory_data):
            # The first continual step: what the champion knows is measured on the memory it was seeded with.
            strategy.ewc.consolidate(model, memory_data, model.classifier_device(), config.batch_size)

    start = WeightBlend.snapshot(model.trainable())  # the champion's values, for blending back
    ewc_before = strategy.ewc.state() if strategy.ewc is not None else None
    started = time.perf_counter()
    train_data = tensor_dataset(train_idx, label_ids(task, [y for _, y in new.train]))
    strategy.template.train(experience_of(train_data, new.id), eval_streams=[])
    train_s = time.perf_counter() - started

    blend = WeightBlend(start, model.trainable())
    scored: dict[float, list[SliceScore]] = {}

    def judge(weight: float) -> Decision:
        blend.apply(weight)
        after = [predict(model, idx) for _, idx, y in holdouts]
        scored[weight] = [paired_score(s.id, y, b, a) for (s, _, y), b, a in zip(holdouts, before, after, strict=True)]
        new_score, earlier_scores = scored[weight][-1], scored[weight][:-1]
        return decide(new_score, earlier_scores, config.min_gain, config.max_forgetting, prove_kept=weight < 1.0)

    # Only forgetting of an earlier slice makes a blend worth trying; without earlier slices there is none.
    weight, tries = search(config.blend_weights if earlier else (), judge)
    blend.apply(weight)
    scores = scored[weight]
    decision = tries[0].decision
    if weight < 1.0:
        decision = Decision(
            True, f"{tries[-1].decision.reason}; blended back to {weight:g} of the trained step, as trained it "
            f"{decision.reason}", better=True,
        )  # fmt: skip
        log.info(
            "event=blended task=%s experience=%d weight=%s tried=%s",
            task, new.id, weight, [t.weight for t in tries],
        )  # fmt: skip
        if strategy.ewc is not None and ewc_before is not None:
            # The importances and anchors describe the weights this version keeps: measured again on the blend.
            strategy.ewc.load(ewc_before, model.classifier_device())
            strategy.ewc.consolidate(model, train_data, model.classifier_device(), config.batch_size)
    # Calibration of the candidate on every held-out slice (never trained on); it changes no prediction.
    held_idx = torch.cat([idx for _, idx, _ in holdouts])
    held_y = torch.tensor([t for _, _, y in holdouts for t in y])
    model.eval()
    logits = bank_logits(model, held_idx, len(labels_of(task)))
    temperature = fit_temperature(logits, held_y)

    version = adapters.next_version(task)
    staging = adapters.staging_dir(task, version)
    save_adapter(peft_model, staging, model_config)
    kept = [(_text_at(i, memory, new.train), labels_of(task)[y]) for i, y in memory_items(strategy)]
    _write_memory(staging / REPLAY_FILE, kept)
    if strategy.ewc is not None:
        save_tensors(staging / EWC_FILE, strategy.ewc.state())
    metrics = {
        "holdout": {"accuracy": scores[-1].candidate, "champion_accuracy": scores[-1].champion, "n": len(new.holdout)},
        "matrix_row": {str(s.experience_id): s.candidate for s in scores},
        "champion_row": {str(s.experience_id): s.champion for s in scores},
        "train_s": round(train_s, 1),
        "steps": bar.steps,
        "out_of_time": bar.out_of_time,
        "replay_memory": len(kept),
        "calibration": {
            "temperature": round(temperature, 4),
            "fitted_on": f"{len(held_y)} held-out labels of experiences {[s.id for s in slices]}",
            "holdout": calibration_report(logits, held_y, temperature),
        },
        "continued_from_parent_memory": inherit,
        "blend": {
            "weight": weight,
            "tried": [{"weight": t.weight, "promote": t.decision.promote, "reason": t.decision.reason} for t in tries],
        },
    }
    card = ModelCard(
        version=version,
        task=task,
        labels=list(labels_of(task)),
        base_model=model_config.base_model or PACKAGED_BASE,
        parent=champion,
        created_at=now_utc(),
        seed=config.seed + new.id,
        data={"experience": new.id, "n_train": len(new.train), "n_holdout": len(new.holdout)},
        metrics=metrics,
        hyperparameters=config.model_dump(),
        domain=new.domain,
    )
    (staging / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
    path = adapters.commit_staged(task, version)
    return Candidate(
        version=version,
        parent=champion,
        path=path,
        new=scores[-1],
        earlier=scores[:-1],
        train_s=train_s,
        steps=bar.steps,
        out_of_time=bar.out_of_time,
        metrics=metrics,
        decision=decision,
    )


def paired_score(
    experience_id: int, gold: Sequence[int], champion: Sequence[int], candidate: Sequence[int]
) -> SliceScore:
    """Score champion and candidate on the same held-out labels, counting the labels only one of them gets right."""
    n = len(gold)
    if n == 0:
        raise LearnerError(f"cannot evaluate on the empty held-out slice of experience {experience_id}")
    right_before = [p == g for p, g in zip(champion, gold, strict=True)]
    right_after = [p == g for p, g in zip(candidate, gold, strict=True)]
    return SliceScore(
        experience_id,
        n,
        round(sum(right_before) / n, 4),
        round(sum(right_after) / n, 4),
        lost=sum(b and not a for b, a in zip(right_before, right_after, strict=True)),
        gained=sum(a and not b for b, a in zip(right_before, right_after, strict=True)),
    )


def _text_at(index: int, memory: Pairs, train: Pairs) -> str:
    # The bank was filled memory first, then the new training texts: indices map back in that order.
    if index < len(memory):
        return memory[index][0]
    return train[index - len(memory)][0]


def _write_memory(path: Path, items: Pairs) -> None:
    payload = {"examples": [{"text": t, "label": y} for t, y in items]}
    path.write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
