"""The torch engine: the shared trunk and each task's merged top layers, pooler and head, on the CPU or CUDA.

Weights are bf16 where the hardware has bf16 instructions (CUDA, AMX, AVX512-BF16), float32 elsewhere. It reads
the classifier's numpy token ids and returns numpy probabilities; its hidden states stay torch tensors on its
device between the trunk and the tops. `learner.onnx_engine` is the other engine, behind the same seam
(`learner.model.Engine`), and needs no torch.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from learner.adapters import ADAPTER_CONFIG_FILE, AdapterStore
from learner.bert import BertEncoder, BertPooler
from learner.config import ModelConfig
from learner.encoder import base_model_path, load_classifier_base
from learner.errors import ModelLoadError
from learner.model import (
    _PEFT_PREFIX,
    _plain_lora,
    configured_threads,
    cpu_has_bf16,
    first_adapted_layer,
    lora_scaling,
    read_temperature,
)
from learner.tasks import Task, labels_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device setting into a torch device; `auto` picks CUDA when present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"scorer.device is {spec!r} but no CUDA device is available; use auto or cpu")
    return torch.device(spec)


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


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return BERT's additive attention mask: 0 where attended, a large negative number on padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _shift_layer(key: str, start: int) -> str:
    """Renumber `encoder.layer.<i>.…` to `encoder.layer.<i - start>.…` (a top holds the layers from `start`)."""
    found = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    return f"encoder.layer.{int(found.group(1)) - start}.{found.group(2)}" if found else key


def load_merged(store: AdapterStore, task: Task, version: str, config: ModelConfig) -> PreTrainedModel:
    """Load an adapter version in peft format onto a fresh base and merge it (float32, on the CPU)."""
    from peft import PeftModel

    path = store.version_dir(task, version)
    base = load_classifier_base(len(labels_of(task)), config.base_model)
    try:
        peft_model = PeftModel.from_pretrained(base, str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load adapter {version} from {path}: {e}") from e
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def merged_top(
    store: AdapterStore, task: Task, version: str, start: int, trunk: Trunk, config: ModelConfig
) -> dict[str, Any]:
    """Return the float32 weights of a version's top: encoder layers from `start`, pooler and head.

    Keys: `encoder.layer.<i>.…`, `pooler.dense.…`, `classifier.…`. A plain LoRA adapter is merged here onto the
    base file's weights of those layers (W + B·A·alpha/r, as peft's merge does), without building a whole base
    model or importing peft; any other adapter kind takes peft's own merge.
    """
    from safetensors import safe_open

    path = store.version_dir(task, version)
    try:
        adapter = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / ADAPTER_CONFIG_FILE}: {e}") from e
    weights_file = path / "adapter_model.safetensors"
    layer_keys = [
        f"encoder.layer.{i}.{name}" for i in range(start, len(trunk.layers)) for name in trunk.layers[i].state_dict()
    ]
    if _plain_lora(adapter) and weights_file.is_file():
        with safe_open(str(weights_file), "pt") as f:
            saved = {key.removeprefix(_PEFT_PREFIX): f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118
        if {"bert.pooler.dense.weight", "classifier.weight"} <= saved.keys():
            scaling = lora_scaling(adapter)
            weights = trunk.encoder.base_tensors(layer_keys, torch.float32, torch.device("cpu"))
            for key in layer_keys:
                module = "bert." + key.removesuffix(".weight")
                if key.endswith(".weight") and f"{module}.lora_A.weight" in saved:
                    lora = saved[f"{module}.lora_B.weight"] @ saved[f"{module}.lora_A.weight"]
                    weights[key] = weights[key] + lora * scaling
            return {
                **weights,
                "pooler.dense.weight": saved["bert.pooler.dense.weight"],
                "pooler.dense.bias": saved["bert.pooler.dense.bias"],
                "classifier.weight": saved["classifier.weight"],
                "classifier.bias": saved["classifier.bias"],
            }
    merged = load_merged(store, task, version, config)
    state = {k.removeprefix("bert."): v.float() for k, v in merged.state_dict().items()}
    return {k: state[k] for k in [*layer_keys, "pooler.dense.weight", "pooler.dense.bias"]} | {
        "classifier.weight": state["classifier.weight"],
        "classifier.bias": state["classifier.bias"],
    }


class Trunk(nn.Module):
    """The base encoder's embeddings and layers, shared by every task: each batch runs them once (the torch
    engine)."""

    engine = "torch"

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        self.torch_device = device
        self.device = str(device)
        self.dtype = inference_dtype(device, config.inference_dtype)
        threads = configured_threads()
        if threads is not None:  # set before torch was loaded (the onnx-free path imports it only here)
            torch.set_num_threads(threads)
        self.encoder = BertEncoder(base_model_path(config.base_model), self.dtype, device)
        self.embeddings = self.encoder.embeddings
        self.layers = self.encoder.layer
        # As peft names them, for matching an adapter's target_modules.
        self.layer_names = [
            [f"bert.encoder.layer.{i}.{name}" for name, _ in layer.named_modules() if name]
            for i, layer in enumerate(self.layers)
        ]

    @torch.inference_mode()
    def hidden_states(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, stops: Sequence[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run the base layers up to the highest of `stops`; return the hidden states at each stop and the
        additive mask, on this engine's device."""
        ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        if self.torch_device.type == "cuda":  # pinned pages copy to the GPU without a staging copy
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids = ids.to(self.torch_device, non_blocking=True)
        mask = mask.to(self.torch_device, non_blocking=True)
        extended = extended_mask(mask, self.dtype)
        hidden = self.embeddings(ids)
        wanted = sorted(set(stops))
        out: dict[int, torch.Tensor] = {}
        for index in range(wanted[-1] + 1):
            if index in wanted:
                out[index] = hidden
            if index < wanted[-1]:
                hidden = self.layers[index](hidden, extended)
        return out, extended

    def select(self, states: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Return these rows of a batch's hidden states or mask."""
        return states[torch.tensor(rows, device=self.torch_device)]

    def load_task(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> TaskModel:
        """Load an adapter version as this engine's top."""
        return TaskModel.load(store, task, version, config, self)

    def start_workers(self, count: int) -> Executor:
        """Start `count` threads that run whole sub-batches side by side, each computing on one thread.

        torch's thread count is per thread once a thread has computed (OpenMP's and MKL's settings are), and a
        new thread starts from the process-wide one. So each worker sets one and computes at once, all of them
        before the process-wide count is put back: the scorer's other threads, and training in the same process,
        keep every compute thread.
        """
        pool = ThreadPoolExecutor(count, thread_name_prefix="finpulse-model")
        threads = torch.get_num_threads()
        # Every worker holds the barrier until all have started: the pool then has `count` threads, each set.
        ready = threading.Barrier(count)

        def one_thread() -> None:
            torch.set_num_threads(1)
            torch.get_num_threads()  # settles this thread's setting now, while the process-wide one is 1
            ready.wait(timeout=60)

        for started in [pool.submit(one_thread) for _ in range(count)]:
            started.result()
        torch.set_num_threads(threads)
        return pool


class TaskModel:
    """One immutable adapter version of one task: its merged top layers, pooler and head, and its temperature."""

    def __init__(
        self,
        task: Task,
        version: str,
        start: int,
        layers: nn.ModuleList,
        pooler: nn.Module,
        classifier: nn.Module,
        device: torch.device,
        temperature: float = 1.0,
    ) -> None:
        self.task = task
        self.version = version
        self.labels = labels_of(task)
        self.start = start  # the first encoder layer this version holds; the trunk supplies its input
        self.layers = layers
        self.pooler = pooler
        self.classifier = classifier
        self.device = device
        self.temperature = temperature

    @classmethod
    def load(cls, store: AdapterStore, task: Task, version: str, config: ModelConfig, trunk: Trunk) -> TaskModel:
        """Load an adapter version, merge it, and keep only what differs from the base (the adapted layers on)."""
        path = store.version_dir(task, version)
        start = first_adapted_layer(path, trunk.layer_names)
        weights = merged_top(store, task, version, start, trunk, config)
        layers = nn.ModuleList(trunk.encoder.new_layer() for _ in range(start, len(trunk.layers)))
        width = trunk.encoder.shape.hidden_size
        with torch.device("meta"):
            pooler = BertPooler(width)
            head = nn.Linear(width, weights["classifier.weight"].shape[0])
        parts = nn.ModuleDict({"encoder": nn.ModuleDict({"layer": layers}), "pooler": pooler, "classifier": head})
        # Layer i of the encoder is entry i - start here.
        renamed = {_shift_layer(k, start): v.to(trunk.torch_device, trunk.dtype) for k, v in weights.items()}
        parts.load_state_dict(renamed, assign=True)
        parts.requires_grad_(False)
        parts.eval()
        return cls(task, version, start, layers, pooler, head, trunk.torch_device, read_temperature(path))

    @property
    def precision(self) -> str:
        """Return what this version computes in: `bfloat16` or `float32`."""
        return str(next(self.classifier.parameters()).dtype).removeprefix("torch.")

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, extended: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch from the hidden states at layer `start`."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # The pooler reads the [CLS] state only: the top layer computes nothing else.
            hidden = layer(hidden, extended, first_only=index == last)
        return self.classifier(self.pooler(hidden))

    def probabilities(self, hidden: torch.Tensor, extended: torch.Tensor) -> np.ndarray:
        """Return calibrated class probabilities (float32, on the CPU)."""
        logits = self.logits(hidden, extended).float()
        return torch.softmax(logits / self.temperature, dim=-1).cpu().numpy()
