"""The scoring model: one encoder per task with its LoRA adapter merged in, sharing one tokenizer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from learner.adapters import AdapterStore
from learner.config import ModelConfig
from learner.encoder import load_classifier_base, load_tokenizer
from learner.errors import ModelLoadError
from learner.labels import TASKS, Task, labels_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Topic and sentiment of one text, with the adapter versions that produced them."""

    sentiment: str
    sentiment_confidence: float
    sentiment_scores: dict[str, float]
    topic: str
    topic_confidence: float
    sentiment_version: str
    topic_version: str


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device setting into a torch device; `auto` picks CUDA when present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"scorer.device is {spec!r} but no CUDA device is available; use auto or cpu")
    return torch.device(spec)


def cpu_has_bf16() -> bool:
    """Return True when the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False  # not Linux: stay with float32, which is correct everywhere
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """Return the weight dtype for inference.

    bf16 halves memory traffic and uses tensor cores on CUDA and AMX units on recent Xeons; on CPUs
    without bf16 instructions it is emulated and slower than float32.
    """
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class TaskModel:
    """One immutable adapter version of one task, merged into a private copy of the encoder."""

    def __init__(self, task: Task, version: str, module: PreTrainedModel, device: torch.device) -> None:
        self.task = task
        self.version = version
        self.labels = labels_of(task)
        self.module = module
        self.device = device

    @classmethod
    def load(
        cls, store: AdapterStore, task: Task, version: str, config: ModelConfig, device: torch.device
    ) -> TaskModel:
        """Load an adapter version in peft format and merge it, so inference pays nothing for LoRA."""
        from peft import PeftModel

        path = store.version_dir(task, version)
        base = load_classifier_base(len(labels_of(task)), config.base_model)
        try:
            peft_model = PeftModel.from_pretrained(base, str(path))
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load adapter {version} from {path}: {e}") from e
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged.to(device=device, dtype=inference_dtype(device, config.inference_dtype))
        return cls(task, version, merged, device)

    @torch.inference_mode()
    def probabilities(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return class probabilities (float32, on the CPU) for one padded batch."""
        logits = self.module(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.softmax(logits.float(), dim=-1).cpu()


class Classifier:
    """Score texts for sentiment and topic; a task's model can be swapped between batches."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        models: dict[Task, TaskModel],
        max_length: int,
        device: torch.device,
    ) -> None:
        missing = [task for task in TASKS if task not in models]
        if missing:
            raise ModelLoadError(f"a classifier needs a model for every task; missing {missing}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self._models = dict(models)
        # Swaps happen on another thread (update listener); a batch must see one consistent pair.
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, config: ModelConfig, device_spec: str = "auto") -> Classifier:
        """Load the champion adapter of every task."""
        device = resolve_device(device_spec)
        store = AdapterStore(config.adapters_dir)
        champions = store.champions()
        models = {task: TaskModel.load(store, task, champions[task], config, device) for task in TASKS}
        return cls(load_tokenizer(config.base_model), models, config.max_length, device)

    @property
    def versions(self) -> dict[str, str]:
        """Return the adapter version serving each task."""
        with self._lock:
            return {task: model.version for task, model in self._models.items()}

    @property
    def models(self) -> dict[Task, TaskModel]:
        """Return the model serving each task."""
        with self._lock:
            return dict(self._models)

    def swap(self, model: TaskModel) -> str:
        """Replace the model of one task; the next batch uses it. Return the version replaced."""
        with self._lock:
            previous = self._models[model.task].version
            self._models[model.task] = model
        return previous

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction]:
        """Score texts; batches are length-sorted and padded only to their own longest text."""
        if not texts:
            return []
        with self._lock:
            models = dict(self._models)
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )["input_ids"]
        # Sorting by length keeps similar lengths together, so padding (wasted compute) stays small.
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        sentiment_probs = torch.empty(len(texts), len(models["sentiment"].labels))
        topic_probs = torch.empty(len(texts), len(models["topic"].labels))
        pad_id = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            ids = ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            index = torch.tensor(chunk, dtype=torch.long)
            sentiment_probs[index] = models["sentiment"].probabilities(ids, mask)
            topic_probs[index] = models["topic"].probabilities(ids, mask)
        return self._predictions(sentiment_probs, topic_probs, models)

    @staticmethod
    def _predictions(
        sentiment_probs: torch.Tensor, topic_probs: torch.Tensor, models: dict[Task, TaskModel]
    ) -> list[Prediction]:
        s_conf, s_idx = sentiment_probs.max(dim=-1)
        t_conf, t_idx = topic_probs.max(dim=-1)
        s_labels, t_labels = models["sentiment"].labels, models["topic"].labels
        s_version, t_version = models["sentiment"].version, models["topic"].version
        rows = sentiment_probs.tolist()
        return [
            Prediction(
                sentiment=s_labels[int(s_idx[i])],
                sentiment_confidence=float(s_conf[i]),
                sentiment_scores=dict(zip(s_labels, rows[i], strict=True)),
                topic=t_labels[int(t_idx[i])],
                topic_confidence=float(t_conf[i]),
                sentiment_version=s_version,
                topic_version=t_version,
            )
            for i in range(len(rows))
        ]
