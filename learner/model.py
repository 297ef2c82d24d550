"""The scoring model: one pass of the shared lower layers, then each task's adapted top layers and head.

Adapters carry LoRA weights only in the top layers of the encoder (`shared_layers` below them stay the base
model's), so every task reads the same lower-layer hidden states: the engine's trunk runs the embeddings and
those layers once per batch, and each task model holds only its own merged top layers, pooler and head. On this
2-core CPU the two tasks then cost 4 + 2 + 2 layer passes where two whole encoders cost 12. An adapter with
LoRA in lower layers too (the first shipped versions) still serves correctly: it starts at its first adapted
layer and runs the base layers between the trunk's stop and there itself.

This module imports no torch: the classifier speaks numpy to its engine, so a scorer on the onnx engine runs
without torch installed (`learner.torch_engine` is imported only when the torch engine is chosen).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_args

import numpy as np

from learner.adapters import ADAPTER_CONFIG_FILE, CARD_FILE, AdapterStore
from learner.config import ModelConfig, ParallelMode
from learner.domains import DEFAULT_DOMAIN
from learner.encoder import base_model_path
from learner.errors import ModelLoadError
from learner.language import Outcome, read
from learner.tasks import Task, spec_of, task_names
from learner.tokenizer import ScoringTokenizer

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


@functools.cache
def _cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""  # not Linux: no flags, so float32 and the onnx engine, which are correct everywhere


@functools.cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(word for line in _cpu_info().splitlines() if line.startswith("flags") for word in line.split())


def cpu_description() -> dict[str, Any]:
    """Return the CPU's model name and the matrix instructions the engines choose by, for benchmark reports."""
    names = [line.split(":", 1)[1].strip() for line in _cpu_info().splitlines() if line.startswith("model name")]
    wanted = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": names[0] if names else "unknown", "features": [f for f in wanted if f in _cpu_flags()]}


def cpu_has_bf16() -> bool:
    """Return True when the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_has_amx() -> bool:
    """Return True when the CPU has AMX bf16 tiles (Sapphire Rapids and later Xeons)."""
    return "amx_bf16" in _cpu_flags()


def auto_inference_batch(engine: str, device: str) -> int:
    """Texts per forward pass when the config leaves it to finpulse (0): what measured fastest per engine."""
    if device.startswith("cuda"):
        return 512  # the GPU needs width to be busy
    if engine == "torch" and cpu_has_amx():
        # AMX tiles want more rows: torch bf16 on a 2-core Xeon, model alone 643 msg/s at 64 vs 532 at 32.
        return 64
    return 32  # less padding, cache-sized activations


# The compute threads `set_compute_threads` chose for this process, and how they share a batch; engines read them
# when they start.
_threads: dict[str, int] = {}
_parallel: dict[str, str] = {}
PARALLEL_MODES: tuple[str, ...] = get_args(ParallelMode)
# Fewest texts a worker is handed when a batch is split so that every worker has a share.
MIN_SHARE = 8


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_compute_threads(setting: int = 0, parallel: str = "auto") -> int:
    """Set the engines' compute threads: `setting`, or with 0 the cores this process may run on, and how they
    share a batch (`parallel`, see `batch_workers`). Return the count.

    torch takes the count now if it is loaded, else when the torch engine starts; the onnx engine when it starts.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"scorer.parallel is {parallel!r}; use one of {', '.join(PARALLEL_MODES)}")
    count = setting if setting > 0 else _cores()
    _threads["compute"] = count
    _parallel["mode"] = parallel
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    return count


def configured_threads() -> int | None:
    """Return the compute threads `set_compute_threads` set, or None when it was not called."""
    return _threads.get("compute")


def compute_threads() -> int:
    """Return the compute threads engines use: those set, else the cores this process may run on."""
    return _threads.get("compute") or _cores()


def batch_workers(device: str = "cpu", engine: str = "torch") -> int:
    """Return how many sub-batches of a batch the classifier runs side by side on `device` with `engine`.

    `batches`: one worker per compute thread, each running whole sub-batches on one thread. `operators`: one
    sub-batch at a time, each operator split across the compute threads. `auto`: batches for torch on a CPU,
    operators otherwise (onnx, any GPU). torch's split operators wait at every step for their slowest thread, and
    a thread that lost its core to the scorer's Kafka and storage threads stalls them all; whole sub-batches on one
    thread each never wait for each other. ONNX Runtime's fused operators lose less, and its workers then contend
    with the sinks for the interpreter between runs. `finpulse bench score`, 1,000 tweets, alternating: on a 2-core
    Xeon with AMX, torch 332-338 msg/s by operators, 386-393 by batches; on a 2-core Zen 4, onnx 347-451 by
    operators, 344-382 by batches, torch 318-326 and 304-358.
    """
    mode = _parallel.get("mode", "auto")
    if mode == "operators" or not device.startswith("cpu") or (mode == "auto" and engine != "torch"):
        return 1
    return compute_threads()


def operator_threads(device: str = "cpu", engine: str = "torch") -> int:
    """Return the threads one operator may use on `device`: one when sub-batches run side by side."""
    return 1 if batch_workers(device, engine) > 1 else compute_threads()


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


def read_temperature(adapter_dir: Path) -> float:
    """Return the calibration temperature recorded in a version's model card (1.0 when it has none)."""
    try:
        card = json.loads((adapter_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 1.0
    value = (card.get("metrics") or {}).get("calibration", {}).get("temperature", 1.0)
    return float(value) if isinstance(value, int | float) and value > 0 else 1.0


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


class ServedModel(Protocol):
    """What the classifier serves for one task in one domain, whichever engine computes it."""

    task: Task
    version: str
    labels: tuple[str, ...]
    start: int  # the first encoder layer it holds; the engine's trunk supplies its input
    temperature: float

    def probabilities(self, hidden: Any, mask: Any) -> np.ndarray:
        """Return calibrated class probabilities (float32 numpy, on the CPU) from the engine's states at `start`."""
        ...


class Engine(Protocol):
    """The seam between the classifier and what computes: the shared trunk, and the loader of task tops.

    `learner.torch_engine.Trunk` (torch: CPU or CUDA, bf16 where the hardware has it) and
    `learner.onnx_engine.OnnxTrunk` (ONNX Runtime on the CPU, int8, no torch) are the two engines; `make_engine`
    picks one from the config. The classifier hands them numpy token ids; the hidden states and masks they return
    are theirs (torch tensors on the device, numpy arrays) and only go back to their own task models.
    """

    engine: str
    device: str  # cpu, cuda, cuda:1

    def hidden_states(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, stops: Sequence[int]
    ) -> tuple[dict[int, Any], Any]:
        """Run the base layers up to the highest of `stops`; return the hidden states at each stop and the mask
        its task models take."""
        ...

    def select(self, states: Any, rows: Sequence[int]) -> Any:
        """Return these rows of a batch's hidden states or mask (for the texts one domain's model scores)."""
        ...

    def load_task(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> ServedModel:
        """Load an adapter version as this engine's top."""
        ...

    def start_workers(self, count: int) -> Executor:
        """Start `count` threads that run whole sub-batches side by side, each computing on one thread."""
        ...


def engine_name(config: ModelConfig, device_spec: str = "auto") -> str:
    """Return the engine `config.engine` resolves to on the device `device_spec` names."""
    if config.engine != "auto":
        return config.engine
    if config.inference_dtype == "bfloat16" or device_spec not in ("auto", "cpu"):
        return "torch"
    # Whether a GPU is there, without importing torch (the onnx scorer runs where torch is not installed): the
    # driver's device node. A node torch cannot use still gets torch, which then falls back to the CPU.
    if device_spec == "auto" and Path("/dev/nvidiactl").exists():
        return "torch"
    # AMX runs torch's bf16 faster than ONNX Runtime's int8 (measured on a 2-core Xeon with AMX: model alone
    # 532-643 vs 378-388 msg/s, end to end 378-387 vs 312-327); without AMX (Zen 4) int8 is 1.3x torch bf16.
    if config.inference_dtype == "auto" and cpu_has_amx() and _torch_installed():
        return "torch"
    from learner.onnx_engine import onnx_available

    return "onnx" if onnx_available() else "torch"


def _torch_installed() -> bool:
    # Without importing it: the onnx scorer's image has no torch, and importing it costs ~1 s and 300 MB.
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # ValueError: a blocked sys.modules["torch"] = None
        return False


def make_engine(config: ModelConfig, device_spec: str = "auto") -> Engine:
    """Return the engine `config.engine` names (see `engine_name`), on the device `device_spec` picks."""
    if engine_name(config, device_spec) == "onnx":
        from learner.onnx_engine import OnnxTrunk

        if device_spec not in ("auto", "cpu"):
            raise ModelLoadError("model.engine = onnx runs on the CPU; set scorer.device = cpu or model.engine = torch")
        if config.inference_dtype == "bfloat16":
            raise ModelLoadError(
                "model.engine = onnx computes in int8 or float32; set inference_dtype to auto or float32"
            )
        return OnnxTrunk(config, "float32" if config.inference_dtype == "float32" else "int8")
    from learner.torch_engine import Trunk, resolve_device

    return Trunk(config, resolve_device(device_spec))


def padded(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Return token ids padded on the right to the longest of `encoded`, and their attention mask (int64)."""
    width = max((len(seq) for seq in encoded), default=0)
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = seq
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
        self.workers = batch_workers(str(self.device), trunk.engine)
        self._pool: Executor | None = None  # started at the first batch that has work for more than one worker

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
    ) -> tuple[dict[Task, np.ndarray], dict[Task, list[str]]]:
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
        out = {
            task: np.empty((n, len(by_domain[DEFAULT_DOMAIN].labels)), np.float32) for task, by_domain in served.items()
        }
        versions = {task: [model.version for model in models] for task, models in chosen.items()}
        if n == 0:
            return out, versions
        # Sorting by length keeps similar lengths together, so padding (wasted compute) stays small.
        order = sorted(range(n), key=lambda i: len(encoded[i]))
        size = batch_size
        if self.workers > 1 and n < self.workers * batch_size:
            # Fewer texts than the workers' sub-batches: split them so that every worker has a share.
            size = max(MIN_SHARE, -(-n // self.workers))
        chunks = [order[begin : begin + size] for begin in range(0, n, size)]
        pad_id = self.tokenizer.pad_token_id
        stops = [model.start for by_domain in served.values() for model in by_domain.values()]

        def score(chunk: list[int]) -> None:
            ids, mask = padded([encoded[i] for i in chunk], pad_id)
            hidden, extended = self.trunk.hidden_states(ids, mask, stops)
            for task, models in chosen.items():
                groups: dict[int, tuple[ServedModel, list[int]]] = {}
                for row, i in enumerate(chunk):
                    groups.setdefault(id(models[i]), (models[i], []))[1].append(row)
                for model, rows in groups.values():
                    if len(rows) == len(chunk):  # the usual case: one model for the whole chunk, no gather
                        probs = model.probabilities(hidden[model.start], extended)
                    else:
                        probs = model.probabilities(
                            self.trunk.select(hidden[model.start], rows), self.trunk.select(extended, rows)
                        )
                    out[task][[chunk[r] for r in rows]] = probs  # each chunk its own rows

        if self.workers == 1 or len(chunks) == 1:
            for chunk in chunks:
                score(chunk)
        else:
            for _ in self._workers_pool().map(score, chunks):  # re-raises a chunk's error here
                pass
        return out, versions

    def _workers_pool(self) -> Executor:
        with self._lock:
            if self._pool is None:
                self._pool = self.trunk.start_workers(self.workers)
            return self._pool

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
        chosen = {task: p.argmax(axis=-1) for task, p in probs.items()}
        unread = [i for i, r in enumerate(readings) if r.outcome != "scored"]
        if unread:
            for task in probs:
                probs[task][unread] = 1.0 / probs[task].shape[1]
        answers: dict[Task, list[Answer]] = {}
        for task, p in probs.items():
            labels, keep = served[task][DEFAULT_DOMAIN].labels, spec_of(task).probability_columns
            idx = chosen[task].tolist()
            confidence = np.take_along_axis(p, chosen[task][:, None], axis=1)[:, 0].tolist()
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
    return str(getattr(model, "precision", "float32"))
