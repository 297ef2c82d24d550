"""Continual training of one task's adapter with avalanche: replay, online EWC, a time budget, a progress bar.

Why the encoder is split in two: on a 2-core CPU a full forward/backward pass of MiniLM costs ~1 s per batch of
32. Only the top `trainable_layers` layers (their LoRA matrices), the pooler and the head are trained; the layers
below are frozen, so their output for a text never changes during a run. A `FeatureBank` computes that output
once per text and the trainable `TopModel` starts from it: each step then runs 2 of 6 layers, and evaluation of
the accuracy matrix costs almost nothing. Saved adapters still hold every layer's LoRA weights (the frozen ones
unchanged), so they load with `PeftModel.from_pretrained` like any other version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from learner.config import ContinualConfig
from learner.errors import LearnerError
from learner.tasks import Task, labels_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

ProgressFactory = Callable[[int, str], Any]


def _import_avalanche() -> None:
    # avalanche warns at import about optional solvers (quadprog, ...) that no strategy used here needs, and
    # at run time about its own internals (a deprecated call inside ReplayPlugin, no metric loggers: the
    # accuracy matrices are computed here). None of it is actionable for a finpulse user.
    import warnings

    warnings.filterwarnings("ignore", module=r"avalanche(\.|$)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import avalanche.training  # noqa: F401


class FeatureBank:
    """Hidden states of texts after the frozen lower layers, stored once and looked up by index."""

    def __init__(self, peft_model: Any, tokenizer: PreTrainedTokenizerFast, frozen_layers: int, max_length: int):
        self._bert = _bert_of(peft_model)
        self._tokenizer = tokenizer
        self.frozen_layers = frozen_layers
        self.max_length = max_length
        hidden = self._bert.config.hidden_size
        # bf16 halves the bank (12k texts x 64 tokens x 384 = 590 MB in bf16); it is upcast per batch.
        self.features = torch.empty(0, max_length, hidden, dtype=torch.bfloat16)
        self.lengths = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @torch.no_grad()
    def add(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Encode `texts` through the frozen layers; return their indices in the bank."""
        start = len(self)
        if not texts:
            return torch.empty(0, dtype=torch.long)
        ids = self._tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        feats = torch.zeros(len(texts), self.max_length, self.features.shape[-1], dtype=torch.bfloat16)
        sizes = [len(x) for x in ids]
        lengths = torch.tensor(sizes, dtype=torch.long)
        order = sorted(range(len(texts)), key=lambda i: sizes[i])
        was_training = self._bert.training
        self._bert.eval()
        pad = self._tokenizer.pad_token_id or 0
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            width = max(sizes[i] for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : sizes[i]] = torch.tensor(ids[i])
                mask[row, : sizes[i]] = 1
            device = next(self._bert.parameters()).device
            hidden = self._bert.embeddings(input_ids=input_ids.to(device))
            extended = _extended_mask(mask.to(device), hidden.dtype)
            for layer in self._bert.encoder.layer[: self.frozen_layers]:
                hidden = layer(hidden, attention_mask=extended)[0]
            feats[torch.tensor(chunk), :width] = hidden.to("cpu", torch.bfloat16)
        self._bert.train(was_training)
        self.features = torch.cat([self.features, feats])
        self.lengths = torch.cat([self.lengths, lengths])
        return torch.arange(start, start + len(texts), dtype=torch.long)


class TopModel(nn.Module):
    """The trainable top of a peft classifier: last layers, pooler, head; input = indices into a FeatureBank."""

    def __init__(self, peft_model: Any, bank: FeatureBank) -> None:
        super().__init__()
        bert = _bert_of(peft_model)
        classifier_model = peft_model.base_model.model
        self.layers = nn.ModuleList(list(bert.encoder.layer[bank.frozen_layers :]))
        self.pooler = bert.pooler
        self.dropout = classifier_model.dropout
        self.classifier = classifier_model.classifier
        self.bank = bank  # a plain attribute: the bank is data, not parameters or state to save

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Return the logits of the texts at `index` in the bank."""
        index = index.cpu()
        lengths = self.bank.lengths[index]
        width = int(lengths.max())
        device = self.classifier_device()
        hidden = self.bank.features[index, :width].to(device, torch.float32)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device)
        extended = _extended_mask(mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=extended)[0]
        pooled = self.pooler(hidden)
        return self.classifier(self.dropout(pooled))

    def frozen_copy(self) -> TopModel:
        """Return a copy with its own (frozen) weights that reads the same bank: a distillation teacher."""
        import copy

        bank, self.bank = self.bank, None  # type: ignore[assignment]
        try:
            teacher = copy.deepcopy(self)
        finally:
            self.bank = bank
        teacher.bank = bank
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    def classifier_device(self) -> torch.device:
        """Return the device the trainable weights live on."""
        return next(self.classifier.parameters()).device

    def trainable(self) -> dict[str, nn.Parameter]:
        """Return the parameters that training changes, by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}


def _bert_of(peft_model: Any) -> Any:
    return peft_model.base_model.model.bert


def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # BERT's additive attention mask: 0 where attended, a large negative number on padding.
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def freeze_lower_layers(peft_model: Any, trainable_layers: int) -> int:
    """Freeze every parameter below the top `trainable_layers` layers; return how many layers are frozen."""
    layers = _bert_of(peft_model).encoder.layer
    if not 1 <= trainable_layers <= len(layers):
        raise LearnerError(
            f"learner.trainable_layers is {trainable_layers}; the encoder has {len(layers)} layers: "
            f"use 1..{len(layers)}"
        )
    frozen = len(layers) - trainable_layers
    for name, param in peft_model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.requires_grad = not any(f"encoder.layer.{i}." in name for i in range(frozen))
        else:
            param.requires_grad = False
    return frozen


# --------------------------------------------------------------------------------------------------------------
# avalanche plugins


def ewc_plugin_class() -> type:
    """Return the EWC plugin class (built lazily: avalanche takes seconds to import)."""
    _import_avalanche()
    from avalanche.training.plugins import EWCPlugin

    class TrainableEWCPlugin(EWCPlugin):
        """Online EWC over the trainable parameters only, with state that can be saved and restored.

        avalanche's EWCPlugin keeps importances and anchors for every parameter, frozen ones included (22.8M
        here, ~94 ms a step); LoRA + head are 0.1-0.8M and cost ~1 ms. Its penalty also keys on the strategy's
        experience counter, which restarts at 0 in a new process; this one keys on the restored state instead.
        """

        def __init__(self, ewc_lambda: float, decay_factor: float) -> None:
            super().__init__(ewc_lambda, mode="online", decay_factor=decay_factor)
            self.anchors: dict[str, torch.Tensor] = {}
            self.fisher: dict[str, torch.Tensor] = {}
            self.experiences_seen = 0

        def before_backward(self, strategy: Any, **kwargs: Any) -> None:
            if not self.fisher:
                return
            penalty = torch.zeros((), device=strategy.device)
            for name, param in strategy.model.named_parameters():
                if name in self.fisher:
                    penalty = penalty + (self.fisher[name] * (param - self.anchors[name]).pow(2)).sum()
            strategy.loss += self.ewc_lambda * penalty

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.consolidate(strategy.model, strategy.experience.dataset, strategy.device, strategy.train_mb_size)

        def consolidate(self, model: nn.Module, dataset: Any, device: torch.device, batch_size: int) -> None:
            """Fold the importance of the current weights on `dataset` into the penalty and anchor on them."""
            fisher = self._fisher(model, dataset, device, batch_size)
            for name, value in fisher.items():
                old = self.fisher.get(name)
                self.fisher[name] = value if old is None else self.decay_factor * old + value
            self.anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.experiences_seen += 1

        @staticmethod
        def _fisher(model: nn.Module, dataset: Any, device: torch.device, batch_size: int) -> dict[str, torch.Tensor]:
            # Empirical Fisher from minibatch gradients, as avalanche computes it, for trainable weights only.
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            fisher = {n: torch.zeros_like(p) for n, p in params.items()}
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, collate_fn=getattr(dataset, "collate_fn", None)
            )
            was_training = model.training
            model.eval()
            batches = 0
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().pow(2)
                batches += 1
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            return {n: f / max(1, batches) for n, f in fisher.items()}

        def state(self) -> dict[str, torch.Tensor]:
            """Return anchors and importances as a flat tensor dict (for safetensors)."""
            out = {f"anchor.{n}": t.cpu().contiguous() for n, t in self.anchors.items()}
            out.update({f"fisher.{n}": t.cpu().contiguous() for n, t in self.fisher.items()})
            out["experiences_seen"] = torch.tensor(self.experiences_seen)
            return out

        def load(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
            """Restore what `state()` returned."""
            self.anchors = {k[len("anchor.") :]: v.to(device) for k, v in state.items() if k.startswith("anchor.")}
            self.fisher = {k[len("fisher.") :]: v.to(device) for k, v in state.items() if k.startswith("fisher.")}
            self.experiences_seen = int(state.get("experiences_seen", torch.tensor(0)))

    return TrainableEWCPlugin


def progress_plugin(total_steps: int, description: str, budget_s: float | None, show: bool) -> Any:
    """A plugin that draws a progress bar and stops training when the time budget is spent."""
    _import_avalanche()
    from avalanche.core import SupervisedPlugin
    from tqdm import tqdm

    class ProgressAndBudget(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.bar = tqdm(total=total_steps, desc=description, unit="step", disable=not show, leave=False)
            self.started = time.perf_counter()
            self.steps = 0
            self.out_of_time = False

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.steps += 1
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(strategy.loss):.3f}", refresh=False)
            if budget_s is not None and time.perf_counter() - self.started > budget_s:
                self.out_of_time = True
                strategy.stop_training()

        def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
            if self.out_of_time:
                strategy.stop_training()  # also ends the remaining epochs

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.bar.close()

    return ProgressAndBudget()


# --------------------------------------------------------------------------------------------------------------
# data


def tensor_dataset(index: torch.Tensor, targets: Sequence[int]) -> Any:
    """Wrap bank indices and their label ids as an avalanche classification dataset."""
    _import_avalanche()
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    y = torch.tensor(list(targets), dtype=torch.long)
    return _make_taskaware_tensor_classification_dataset(index, y, task_labels=0, targets=y)


def dataset_indices(dataset: Any) -> list[tuple[int, int]]:
    """Return (bank index, label id) of every item of an avalanche dataset."""
    return [(int(dataset[i][0]), int(dataset[i][1])) for i in range(len(dataset))]


@dataclass
class Strategy:
    """An avalanche training template with the plugins of one continual-learning method."""

    template: Any
    replay: Any | None
    ewc: Any | None
    distill: Any | None = None

    def distill_from(self, teacher: TopModel, num_classes: int) -> None:
        """Make `teacher` (the champion) the model whose outputs training is distilled towards."""
        if self.distill is not None:
            self.distill.lwf.prev_model = teacher
            self.distill.lwf.prev_classes_by_task[0] = set(range(num_classes))


def build_strategy(
    model: TopModel,
    config: ContinualConfig,
    *,
    replay: bool,
    ewc: bool,
    distill: bool = False,
    plugins: Sequence[Any] = (),
    epochs: int | None = None,
) -> Strategy:
    """Build the avalanche SupervisedTemplate for `model` with replay and/or EWC."""
    _import_avalanche()
    from avalanche.training.plugins import EvaluationPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer
    from avalanche.training.templates import SupervisedTemplate

    replay_plugin = None
    ewc_plugin = None
    chosen: list[Any] = []
    if replay:
        replay_plugin = ReplayPlugin(
            mem_size=config.replay_size,
            batch_size_mem=config.replay_batch_size,
            storage_policy=ClassBalancedBuffer(max_size=config.replay_size, adaptive_size=True),
        )
        chosen.append(replay_plugin)
    if ewc:
        ewc_plugin = ewc_plugin_class()(config.ewc_lambda, config.ewc_decay)
        chosen.append(ewc_plugin)
    distill_plugin = None
    if distill and config.distill_alpha > 0:
        distill_plugin = LwFPlugin(alpha=config.distill_alpha, temperature=config.distill_temperature)
        chosen.append(distill_plugin)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    template = SupervisedTemplate(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=config.batch_size,
        train_epochs=epochs or config.epochs,
        eval_mb_size=256,
        device=model.classifier_device(),
        plugins=[*chosen, *plugins],
        evaluator=EvaluationPlugin(loggers=[]),  # accuracy matrices are computed by `accuracy_on`
    )
    return Strategy(template, replay_plugin, ewc_plugin, distill_plugin)


def experience_of(dataset: Any, number: int) -> Any:
    """Wrap one dataset as the avalanche experience number `number`."""
    _import_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

    return DatasetExperience(dataset=dataset, current_experience=number)


def restore_memory(strategy: Strategy, dataset: Any) -> None:
    """Put a persisted replay memory back into the strategy's class-balanced buffer."""
    if strategy.replay is None or len(dataset) == 0:
        return
    # The class-balanced buffer splits it by class again; it was balanced when saved, so nothing is dropped.
    strategy.replay.storage_policy.update_from_dataset(dataset)


def memory_items(strategy: Strategy) -> list[tuple[int, int]]:
    """Return (bank index, label id) of the replay memory."""
    if strategy.replay is None:
        return []
    return dataset_indices(strategy.replay.storage_policy.buffer)


@torch.no_grad()
def predict(model: TopModel, index: torch.Tensor, batch_size: int = 256) -> list[int]:
    """Return the predicted label id of every bank index."""
    was_training = model.training
    model.eval()
    out: list[int] = []
    for s in range(0, len(index), batch_size):
        out.extend(model(index[s : s + batch_size]).argmax(-1).tolist())
    model.train(was_training)
    return out


def accuracy_on(model: TopModel, index: torch.Tensor, targets: Sequence[int]) -> float:
    """Return the accuracy of `model` on bank indices with gold label ids."""
    if len(targets) == 0:
        raise LearnerError("cannot evaluate on an empty held-out slice")
    predicted = predict(model, index)
    return sum(int(p == t) for p, t in zip(predicted, targets, strict=True)) / len(targets)


def label_ids(task: Task, labels: Sequence[str]) -> list[int]:
    """Map label names to classifier output indices, refusing unknown labels."""
    names = labels_of(task)
    lookup = {name: k for k, name in enumerate(names)}
    unknown = sorted({label for label in labels if label not in lookup})
    if unknown:
        raise LearnerError(f"unknown {task} labels {unknown}; expected one of {list(names)}")
    return [lookup[label] for label in labels]


def seed_everything(seed: int) -> None:
    """Seed python, torch and avalanche's random sources."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors in safetensors format."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors written by `save_tensors`."""
    from safetensors.torch import load_file

    return load_file(str(path))
