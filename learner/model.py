"""The scoring model: one pass of the shared lower layers, then each task's adapted top layers and head.

Adapters carry LoRA weights only in the top layers of the encoder (`shared_layers` below them stay the base
model's), so every task reads the same lower-layer hidden states: the `Trunk` runs the embeddings and those
layers once per batch, and each `TaskModel` holds only its own merged top layers, pooler and head. On this
2-core CPU the two tasks then cost 4 + 2 + 2 layer passes where two whole encoders cost 12. An adapter with
LoRA in lower layers too (the first shipped versions) still serves correctly: it starts at its first adapted
layer and runs the base layers between the trunk's stop and there itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from learner.adapters import ADAPTER_CONFIG_FILE, CARD_FILE, AdapterStore
from learner.bert import BertEncoder, BertPooler
from learner.config import ModelConfig
from learner.domains import DEFAULT_DOMAIN
from learner.encoder import base_model_path, load_classifier_base
from learner.errors import ModelLoadError
from learner.language import Outcome, read
from learner.tasks import Task, labels_of, spec_of, task_names
from learner.tokenizer import ScoringTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """One task's answer for one text: the chosen label, its probability and the adapter version behind it."""

    label: str
    confidence: float
    version: str
    scores: dict[str, float] | None = None  # every label's probability, for a task whose spec keeps them


@dataclass(frozen=True)
class Prediction:
    """Topic and sentiment of one text, with the adapter versions that produced them.

    Its per-task fields carry the names the task registry gives them (`<task>`, `<task>_confidence`,
    `<task>_version`, `<task>_scores`), so `answer` and `of` reach any task's without naming it.
    """

    sentiment: str
    sentiment_confidence: float
    sentiment_scores: dict[str, float]
    topic: str
    topic_confidence: float
    sentiment_version: str
    topic_version: str
    language: str = "en"  # BCP 47, as the language guard read the text
    # scored, or why the model's answer is not one (unsupported_language, unreadable): such a prediction carries
    # the uniform distribution, never a confident label, and is kept out of the sentiment metrics.
    outcome: Outcome = "scored"

    @property
    def scored(self) -> bool:
        """Return True when the model could read the text and its answer counts."""
        return self.outcome == "scored"

    def answer(self, task: Task) -> Answer:
        """Return this prediction's answer for `task`."""
        spec = spec_of(task)
        scores = getattr(self, spec.scores_field) if spec.probability_columns else None
        return Answer(
            getattr(self, spec.name), getattr(self, spec.confidence_column), getattr(self, spec.version_column), scores
        )

    @classmethod
    def of(cls, answers: Mapping[Task, Answer], language: str = "en", outcome: Outcome = "scored") -> Prediction:
        """Build a prediction from every task's answer."""
        fields: dict[str, Any] = {}
        for task, answer in answers.items():
            spec = spec_of(task)
            fields[spec.name] = answer.label
            fields[spec.confidence_column] = answer.confidence
            fields[spec.version_column] = answer.version
            if spec.probability_columns:
                fields[spec.scores_field] = answer.scores
        return cls(**fields, language=language, outcome=outcome)


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


def set_compute_threads(setting: int = 0) -> int:
    """Set torch's compute threads: `setting`, or with 0 the cores this process may run on. Return the count."""
    if setting <= 0:
        try:
            setting = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            setting = os.cpu_count() or 1
    torch.set_num_threads(setting)
    return setting


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return BERT's additive attention mask: 0 where attended, a large negative number on padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def first_adapted_layer(adapter_dir: Path, layer_names: Sequence[Sequence[str]]) -> int:
    """Return the lowest encoder layer an adapter changes (its LoRA targets), reading its adapter_config.json.

    `layer_names[i]` lists the module names of layer i as peft sees them (`bert.encoder.layer.i.…`). peft
    matches a string target as a regex over the whole name, a list of targets by suffix, optionally only in
    `layers_to_transform`.
    """
    try:
        raw = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {adapter_dir / ADAPTER_CONFIG_FILE}: {e}") from e
    targets = raw.get("target_modules")
    only = raw.get("layers_to_transform")
    for index, names in enumerate(layer_names):
        if only is not None and index not in ([only] if isinstance(only, int) else only):
            continue
        if isinstance(targets, str):
            pattern = re.compile(targets)
            if any(pattern.fullmatch(name) for name in names):
                return index
        elif targets and any(name == t or name.endswith(f".{t}") for name in names for t in targets):
            return index
    return len(layer_names)


def _shift_layer(key: str, start: int) -> str:
    """Renumber `encoder.layer.<i>.…` to `encoder.layer.<i - start>.…` (a top holds the layers from `start`)."""
    found = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    return f"encoder.layer.{int(found.group(1)) - start}.{found.group(2)}" if found else key


def read_temperature(adapter_dir: Path) -> float:
    """Return the calibration temperature recorded in a version's model card (1.0 when it has none)."""
    try:
        card = json.loads((adapter_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 1.0
    value = (card.get("metrics") or {}).get("calibration", {}).get("temperature", 1.0)
    return float(value) if isinstance(value, int | float) and value > 0 else 1.0


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


_PEFT_PREFIX = "base_model.model."


def _plain_lora(adapter: dict[str, Any]) -> bool:
    """Return True for the LoRA adapters `merged_top` merges itself (the kind finpulse trains)."""
    return (
        adapter.get("peft_type") == "LORA"
        and not adapter.get("use_dora")
        and not adapter.get("rank_pattern")
        and not adapter.get("alpha_pattern")
        and not adapter.get("fan_in_fan_out")
        and adapter.get("bias", "none") == "none"
    )


def lora_scaling(adapter: dict[str, Any]) -> float:
    """Return the factor peft's merge applies to B·A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter.get("use_rslora") else alpha / rank


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
        self.device = device
        self.dtype = inference_dtype(device, config.inference_dtype)
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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stops: Sequence[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run the base layers up to the highest of `stops`; return the hidden states at each stop and the mask."""
        extended = extended_mask(attention_mask, self.dtype)
        hidden = self.embeddings(input_ids)
        wanted = sorted(set(stops))
        out: dict[int, torch.Tensor] = {}
        for index in range(wanted[-1] + 1):
            if index in wanted:
                out[index] = hidden
            if index < wanted[-1]:
                hidden = self.layers[index](hidden, extended)
        return out, extended

    def load_task(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> TaskModel:
        """Load an adapter version as this engine's top."""
        return TaskModel.load(store, task, version, config, self)


class ServedModel(Protocol):
    """What the classifier serves for one task in one domain, whichever engine computes it."""

    task: Task
    version: str
    labels: tuple[str, ...]
    start: int  # the first encoder layer it holds; the engine's trunk supplies its input
    temperature: float

    def probabilities(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class Engine(Protocol):
    """The seam between the classifier and what computes: the shared trunk, and the loader of task tops.

    `Trunk` (torch: CPU or CUDA, bf16 where the hardware has it) and `learner.onnx_engine.OnnxTrunk` (ONNX Runtime
    on the CPU, int8) are the two engines; `make_engine` picks one from the config.
    """

    engine: str
    device: torch.device
    dtype: torch.dtype

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stops: Sequence[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]: ...

    def load_task(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> ServedModel: ...


def make_engine(config: ModelConfig, device_spec: str = "auto") -> Engine:
    """Return the engine `config.engine` names, on the device `device_spec` picks."""
    if config.engine == "onnx":
        from learner.onnx_engine import OnnxTrunk

        if resolve_device(device_spec).type != "cpu":
            raise ModelLoadError("model.engine = onnx runs on the CPU; set scorer.device = cpu or model.engine = torch")
        if config.inference_dtype == "bfloat16":
            raise ModelLoadError(
                "model.engine = onnx computes in int8 or float32; set inference_dtype to auto or float32"
            )
        return OnnxTrunk(config, "float32" if config.inference_dtype == "float32" else "int8")
    return Trunk(config, resolve_device(device_spec))


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
        renamed = {_shift_layer(k, start): v.to(trunk.device, trunk.dtype) for k, v in weights.items()}
        parts.load_state_dict(renamed, assign=True)
        parts.requires_grad_(False)
        parts.eval()
        return cls(task, version, start, layers, pooler, head, trunk.device, read_temperature(path))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, extended: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch from the hidden states at layer `start`."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # The pooler reads the [CLS] state only: the top layer computes nothing else.
            hidden = layer(hidden, extended, first_only=index == last)
        return self.classifier(self.pooler(hidden))

    def probabilities(self, hidden: torch.Tensor, extended: torch.Tensor) -> torch.Tensor:
        """Return calibrated class probabilities (float32, on the CPU)."""
        logits = self.logits(hidden, extended).float()
        return torch.softmax(logits / self.temperature, dim=-1).cpu()


def padded(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return token ids padded on the right to the longest of `encoded`, and their attention mask."""
    width = max((len(seq) for seq in encoded), default=0)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class Classifier:
    """Score texts for sentiment and topic, each text with its domain's models; models swap between batches.

    Every task has a model for the default domain; a domain with its own champion of a task gets that one, any
    other domain the default's. Both tasks and all domains read one pass of the shared trunk.
    """

    def __init__(
        self,
        tokenizer: ScoringTokenizer,
        trunk: Engine,
        models: dict[Task, ServedModel],
        max_length: int,
    ) -> None:
        missing = [task for task in task_names() if task not in models]
        if missing:
            raise ModelLoadError(f"a classifier needs a model for every task; missing {missing}")
        self.tokenizer = tokenizer
        self.trunk = trunk
        self.max_length = max_length
        self.device = trunk.device
        self._served: dict[Task, dict[str, ServedModel]] = {
            task: {DEFAULT_DOMAIN: models[task]} for task in task_names()
        }
        self._unknown_id: int | None = getattr(tokenizer, "unk_token_id", None)
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        # Swaps happen on another thread (update listener); a batch must see one consistent set.
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, config: ModelConfig, device_spec: str = "auto") -> Classifier:
        """Load the champion adapter of every task in every domain that has one."""
        trunk = make_engine(config, device_spec)
        store = AdapterStore(config.adapters_dir)
        champions = store.champions()
        models = {task: trunk.load_task(store, task, champions[task], config) for task in task_names()}
        tokenizer = ScoringTokenizer(base_model_path(config.base_model), config.max_length)
        classifier = cls(tokenizer, trunk, models, config.max_length)
        for task in task_names():
            for domain, version in store.domain_champions(task).items():
                if domain != DEFAULT_DOMAIN:
                    classifier.swap(classifier.load(store, task, version, config), domain)
        return classifier

    def load(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> ServedModel:
        """Load a version of a task onto this classifier's engine (not serving it yet: see `swap`)."""
        return self.trunk.load_task(store, task, version, config)

    @property
    def versions(self) -> dict[str, str]:
        """Return the adapter version serving each task in the default domain."""
        with self._lock:
            return {task: served[DEFAULT_DOMAIN].version for task, served in self._served.items()}

    @property
    def serving(self) -> dict[str, dict[str, str]]:
        """Return the version serving each task in each domain that has its own (the default domain included)."""
        with self._lock:
            return {task: {domain: m.version for domain, m in served.items()} for task, served in self._served.items()}

    def domain_versions(self, task: Task) -> dict[str, str]:
        """Return the version serving a task in each domain that has its own (the default domain included)."""
        with self._lock:
            return {domain: model.version for domain, model in self._served[task].items()}

    @property
    def models(self) -> dict[Task, ServedModel]:
        """Return the model serving each task in the default domain."""
        with self._lock:
            return {task: served[DEFAULT_DOMAIN] for task, served in self._served.items()}

    @property
    def shared_layers(self) -> int:
        """Return how many encoder layers run once for both tasks and every domain."""
        with self._lock:
            return min(model.start for served in self._served.values() for model in served.values())

    def swap(self, model: ServedModel, domain: str = DEFAULT_DOMAIN) -> str | None:
        """Serve `model` for its task in `domain` from the next batch on. Return the version it replaces there
        (None: the domain was served the default domain's)."""
        with self._lock:
            served = self._served[model.task]
            previous = served[domain].version if domain in served else None
            served[domain] = model
        return previous

    def drop(self, task: Task, domain: str) -> str | None:
        """Serve `domain` the default domain's model of `task` again; return the version it had."""
        if domain == DEFAULT_DOMAIN:
            raise ModelLoadError("the default domain always has a model; swap in another one instead")
        with self._lock:
            model = self._served[task].pop(domain, None)
        return model.version if model is not None else None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize texts without padding (the ids `probabilities` takes)."""
        return self.tokenizer.encode(texts)

    def _snapshot(self) -> dict[Task, dict[str, ServedModel]]:
        with self._lock:
            return {task: dict(served) for task, served in self._served.items()}

    def probabilities(
        self,
        encoded: Sequence[Sequence[int]],
        batch_size: int = 64,
        domains: Sequence[str] | None = None,
        served: dict[Task, dict[str, ServedModel]] | None = None,
    ) -> tuple[dict[Task, torch.Tensor], dict[Task, list[str]]]:
        """Return every task's class probabilities for tokenized texts in their order, and the version behind
        each row. Batches are length-sorted and padded only to their own longest text; the trunk runs once each.
        """
        served = served if served is not None else self._snapshot()
        n = len(encoded)
        domains = list(domains) if domains is not None else [DEFAULT_DOMAIN] * n
        if len(domains) != n:
            raise ValueError(f"{len(domains)} domains for {n} texts")
        # Each text's model per task: its domain's own, else the default domain's.
        chosen = {
            task: [by_domain.get(d, by_domain[DEFAULT_DOMAIN]) for d in domains] for task, by_domain in served.items()
        }
        out = {task: torch.empty(n, len(by_domain[DEFAULT_DOMAIN].labels)) for task, by_domain in served.items()}
        versions = {task: [model.version for model in models] for task, models in chosen.items()}
        if n == 0:
            return out, versions
        # Sorting by length keeps similar lengths together, so padding (wasted compute) stays small.
        order = sorted(range(n), key=lambda i: len(encoded[i]))
        pad_id = self.tokenizer.pad_token_id
        stops = [model.start for by_domain in served.values() for model in by_domain.values()]
        pinned = self.device.type == "cuda"
        for begin in range(0, n, batch_size):
            chunk = order[begin : begin + batch_size]
            ids, mask = padded([encoded[i] for i in chunk], pad_id)
            ids = (ids.pin_memory() if pinned else ids).to(self.device, non_blocking=True)
            mask = (mask.pin_memory() if pinned else mask).to(self.device, non_blocking=True)
            hidden, extended = self.trunk.hidden_states(ids, mask, stops)
            for task, models in chosen.items():
                groups: dict[int, tuple[ServedModel, list[int]]] = {}
                for row, i in enumerate(chunk):
                    groups.setdefault(id(models[i]), (models[i], []))[1].append(row)
                for model, rows in groups.values():
                    if len(rows) == len(chunk):  # the usual case: one model for the whole chunk, no gather
                        probs = model.probabilities(hidden[model.start], extended)
                    else:
                        picked = torch.tensor(rows, device=self.device)
                        probs = model.probabilities(hidden[model.start][picked], extended[picked])
                    out[task][torch.tensor([chunk[r] for r in rows])] = probs
        return out, versions

    def predict(
        self, texts: Sequence[str], batch_size: int = 64, domains: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Score texts (each in its domain, default: the default domain) with the models serving now."""
        if not texts:
            return []
        served = self._snapshot()
        encoded = self.encode(texts)
        readings = [
            read(text, ids, self._unknown_id, self._special_ids) for text, ids in zip(texts, encoded, strict=True)
        ]
        probs, versions = self.probabilities(encoded, batch_size, domains, served)
        # The labels are the model's argmax; what it says of text it cannot read is noise (Chinese scores
        # `neutral` at 0.96), so those rows carry the uniform distribution instead, flagged by their outcome: no
        # reader takes them for an answer and the sentiment metrics leave them out.
        chosen = {task: p.argmax(dim=-1) for task, p in probs.items()}
        unread = [i for i, r in enumerate(readings) if r.outcome != "scored"]
        if unread:
            index = torch.tensor(unread)
            for task in probs:
                probs[task][index] = 1.0 / probs[task].shape[1]
        answers: dict[Task, list[Answer]] = {}
        for task, p in probs.items():
            labels, keep = served[task][DEFAULT_DOMAIN].labels, spec_of(task).probability_columns
            idx = chosen[task].tolist()
            confidence = p.gather(1, chosen[task][:, None]).squeeze(1).tolist()
            rows = p.tolist() if keep else [None] * len(idx)
            answers[task] = [
                Answer(labels[k], c, v, dict(zip(labels, row, strict=True)) if row is not None else None)
                for k, c, v, row in zip(idx, confidence, versions[task], rows, strict=True)
            ]
        return [
            Prediction.of({task: by_text[i] for task, by_text in answers.items()}, r.language, r.outcome)
            for i, r in enumerate(readings)
        ]


def module_dtype(model: ServedModel) -> str:
    """Return what a task model computes in: `bfloat16`, `float32`, or `int8` (an int8 ONNX graph)."""
    if isinstance(model, TaskModel):
        parameter: Any = next(model.classifier.parameters())
        return str(parameter.dtype).removeprefix("torch.")
    return str(getattr(model, "precision", "float32"))
