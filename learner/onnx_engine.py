"""The ONNX Runtime engine: the trunk and each task's top as ONNX graphs with int8 weights, built from the same weights.

The graphs are written here node by node from the base model's safetensors file and an adapter's merged
weights (no exporter, no tracing, no torch on their path): the same BERT layer `learner.bert` computes, the top
layer reading the [CLS] query only. Weight matrices are int8 per output column, activations uint8 per row
(QuantizeLinear, then ONNX Runtime's MatMulIntegerToFloat), so a text scores the same in any batch; attention is
ONNX Runtime's fused MultiHeadAttention, the FFN's bias and Gelu one BiasGelu. Measured on a 2-core Zen 4 (no
AMX): 1.3x torch bf16's model throughput. On all of TFNS valid: sentiment 0.869 vs 0.868 for torch bf16, topic
0.898 vs 0.897. The fused operators took the model alone from 322-341 to 378-388 msg/s on a 2-core Xeon.
`Trunk` and `TaskModel` in `learner.torch_engine` are the torch engine; the classifier calls either through the same
two methods (`hidden_states`, `probabilities`), so domain routing and hot swap are engine-blind.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from learner.adapters import ADAPTER_CONFIG_FILE, AdapterStore
from learner.bert_shape import BertShape
from learner.config import ModelConfig
from learner.encoder import base_model_path
from learner.errors import ModelLoadError
from learner.model import (
    _PEFT_PREFIX,
    _plain_lora,
    first_adapted_layer,
    lora_scaling,
    operator_threads,
    read_temperature,
)
from learner.tasks import Task, labels_of

Precision = Literal["int8", "float32"]

# Activations are symmetric around this uint8 zero point (uint8 x int8 is the product ONNX Runtime's x86 kernels
# run fastest: int8 x int8 measured 35-48 vs 143-155 msg/s).
_ZERO_POINT = 128
# ONNX Runtime's own operators (fused attention, bias + Gelu, residual + layer norm, int8 products to float).
_MS = "com.microsoft"

# Per encoder layer, as transformers names them (and the base file stores them under encoder.layer.<i>.).
_LAYER_TENSORS = [
    f"{module}.{kind}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
]


def onnx_available() -> bool:
    """Return True when onnx and onnxruntime can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Graph:
    """Nodes and initializers of one ONNX graph under construction, with BERT's building blocks."""

    def __init__(self, shape: BertShape, precision: Precision) -> None:
        self.shape = shape
        self.precision = precision
        self.nodes: list[Any] = []
        self.initializers: list[tuple[str, np.ndarray]] = []  # numpy until `session` moves them into the model
        self._count = 0
        self._quantised: dict[str, tuple[str, str]] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        name = self._name(hint)
        # Not np.ascontiguousarray: it turns a scalar into shape (1,), and Gather's scalar index must stay one.
        self.initializers.append((name, np.require(array, requirements="C")))
        return name

    def op(self, op_type: str, *inputs: str, hint: str = "", output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = output or self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """`x` (... x in) times `weight` plus `bias`, in the input's shape (the pooler and the classifier)."""
        flat = self.op("Add", self.product(x, weight), self.const(bias.astype(np.float32), "b"))
        out_shape = self.op(
            "Concat", self.op("Shape", x, end=-1), self.const(np.array([weight.shape[0]], np.int64)), axis=0
        )
        return self.op("Reshape", flat, out_shape)

    def product(self, x: str, weight: np.ndarray) -> str:
        """`x` (... x in) times `weight` (torch's out x in) without its bias, as rows x out: the bias goes to the
        fused operator that reads the product (attention, Gelu, the residual's layer norm)."""
        # torch stores out x in; MatMul wants in x out.
        matrix = weight.T.astype(np.float32)
        if self.precision == "int8":
            # Weights: symmetric int8 per output column. Activations: uint8 per row (one token's vector), with
            # its own scale, so that a text's score never depends on the texts batched with it (a per-batch scale,
            # ONNX Runtime's fused DynamicQuantizeMatMul, moved one probability by up to 0.24 between batches).
            # MatMulIntegerToFloat scales the int32 sums by the column scales as it writes them (its A scale is
            # per tensor only: 1 here); the row scales follow as one Mul. Written node by node: quantising a built
            # graph with ONNX Runtime's Python tool costs seconds of GIL per hot swap, which stalled the scoring
            # thread.
            scale = np.maximum(np.abs(matrix).max(axis=0), 1e-8) / 127.0
            quantised = np.clip(np.rint(matrix / scale), -127, 127).astype(np.int8)
            rows, row_scale = self.quantise_rows(x, matrix.shape[0])
            product = self.op(
                "MatMulIntegerToFloat",
                rows,
                self.const(quantised, "wq"),
                self.const(np.array(1.0, np.float32), "one"),
                self.const(scale.astype(np.float32), "ws"),
                self.const(np.array(_ZERO_POINT, np.uint8), "xz"),
                domain=_MS,
            )
            return self.op("Mul", product, row_scale)
        rows = self.op("Reshape", x, self.const(np.array([-1, matrix.shape[0]], np.int64)))
        return self.op("MatMul", rows, self.const(matrix, "w"))

    def quantise_rows(self, x: str, width: int) -> tuple[str, str]:
        """Quantise `x` (... x width) to uint8 per row; return the rows (rows x width) and their scales (rows x 1).
        Products reading the same input (query, key and value) share one quantisation."""
        if x not in self._quantised:
            rows = self.op("Reshape", x, self.const(np.array([-1, width], np.int64)))
            absmax = self.op("ReduceMax", self.op("Abs", rows), axes=[1], keepdims=0)
            scale = self.op(
                "Div",
                self.op("Max", absmax, self.const(np.array(1e-8, np.float32))),
                self.const(np.array(127.0, np.float32)),
            )
            # QuantizeLinear per axis 0 wants one zero point per row: 128 each, as many as there are scales.
            zero = self.op("Expand", self.const(np.array(_ZERO_POINT, np.uint8), "xz"), self.op("Shape", scale))
            quantised = self.op("QuantizeLinear", rows, scale, zero, axis=0)
            column = self.op("Unsqueeze", scale, self.const(np.array([1], np.int64)))
            self._quantised[x] = (quantised, column)
        return self._quantised[x]

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.const(weight.astype(np.float32), "ln_w"),
            self.const(bias.astype(np.float32), "ln_b"),
            axis=-1,
            epsilon=self.shape.layer_norm_eps,
        )

    def activation(self, x: str, bias: np.ndarray) -> str:
        """The activation of `x` + `bias`."""
        if self.shape.hidden_act == "gelu":
            # Exact gelu, 0.5 x (1 + erf(x / sqrt 2)), with the bias added in the same kernel.
            return self.op("BiasGelu", x, self.const(bias.astype(np.float32), "b"), domain=_MS)
        x = self.op("Add", x, self.const(bias.astype(np.float32), "b"))
        if self.shape.hidden_act == "relu":
            return self.op("Relu", x)
        # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = self.op("Mul", self.op("Mul", x, x), x)
        inner = self.op("Add", x, self.op("Mul", cube, self.const(np.array(0.044715, np.float32))))
        scaled = self.op("Mul", inner, self.const(np.array(math.sqrt(2 / math.pi), np.float32)))
        gate = self.op("Add", self.op("Tanh", scaled), self.const(np.array(1.0, np.float32)))
        return self.op("Mul", self.op("Mul", x, gate), self.const(np.array(0.5, np.float32)))

    def key_mask(self, attention_mask: str) -> str:
        """The int64 batch x length 0/1 mask as the int32 key padding mask MultiHeadAttention reads."""
        return self.op("Cast", attention_mask, to=6)  # 6 = INT32

    def embeddings(self, input_ids: str, w: dict[str, np.ndarray]) -> str:
        words = self.op("Gather", self.const(w["embeddings.word_embeddings.weight"], "words"), input_ids, axis=0)
        length = self.op("Gather", self.op("Shape", input_ids), self.const(np.array([1], np.int64)), axis=0)
        positions = self.op(
            "Slice",
            self.const(w["embeddings.position_embeddings.weight"], "positions"),
            self.const(np.array([0], np.int64)),
            length,
            self.const(np.array([0], np.int64)),
        )
        # One segment: token type 0 everywhere, as the scorer's single texts are.
        segment = self.const(w["embeddings.token_type_embeddings.weight"][0], "segment")
        hidden = self.op("Add", self.op("Add", words, positions), segment)
        return self.layer_norm(hidden, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])

    def output(self, x: str, skip: str, w: dict[str, np.ndarray], module: str) -> str:
        """BERT's output block `module` (its dense, then LayerNorm(dense + bias + skip)), x and the result as rows x
        width, skip as ... x width."""
        # Two Adds and the standard LayerNormalization: ONNX Runtime's fused SkipLayerNormalization measured
        # slower here (1.7 s against 0.75 s in one profile of 4,000 texts).
        width = self.shape.hidden_size
        flat_skip = self.op("Reshape", skip, self.const(np.array([-1, width], np.int64)))
        dense = self.product(x, w[f"{module}.dense.weight"])
        summed = self.op(
            "Add", self.op("Add", dense, self.const(w[f"{module}.dense.bias"].astype(np.float32), "b")), flat_skip
        )
        return self.layer_norm(summed, w[f"{module}.LayerNorm.weight"], w[f"{module}.LayerNorm.bias"])

    def layer(self, hidden: str, mask: str, w: dict[str, np.ndarray], first_only: bool) -> str:
        """One encoder layer over `hidden` (batch x length x width) and the int32 key mask; with `first_only`, the
        [CLS] row alone (batch x 1 x width)."""
        queries = (
            self.op(
                "Slice",
                hidden,
                self.const(np.array([0], np.int64)),
                self.const(np.array([1], np.int64)),
                self.const(np.array([1], np.int64)),
            )
            if first_only
            else hidden
        )
        batch_shape = self.op("Shape", queries)  # batch x queries x width

        def project(x: str, name: str) -> str:
            # MultiHeadAttention reads batch x length x width and adds the three biases itself.
            rows = self.product(x, w[f"attention.self.{name}.weight"])
            return self.op("Reshape", rows, self.op("Shape", x))

        bias = np.concatenate([w[f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        # One kernel for scores, scale, the padding mask, softmax and the weighted sum, heads split inside it.
        context = self.op(
            "MultiHeadAttention",
            project(queries, "query"),
            project(hidden, "key"),
            project(hidden, "value"),
            self.const(bias.astype(np.float32), "qkv_b"),
            mask,
            domain=_MS,
            num_heads=self.shape.num_attention_heads,
        )
        attended = self.output(context, queries, w, "attention.output")
        inner = self.activation(self.product(attended, w["intermediate.dense.weight"]), w["intermediate.dense.bias"])
        out = self.output(inner, attended, w, "output")
        return self.op("Reshape", out, batch_shape)

    def session(self, inputs: list[Any], outputs: list[Any], threads: int) -> Any:
        """Build the model and open an inference session on it."""
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        # IR 10 / opset 17 (LayerNormalization), and ONNX Runtime's own domain for the fused operators.
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(_MS, 1)]
        model = helper.make_model(
            helper.make_graph(self.nodes, "finpulse", inputs, outputs), opset_imports=opsets, ir_version=10
        )
        # Each weight moves into the model on its own and this graph lets go of it, so the build never holds
        # every weight in several forms at once (numpy, tensor protos, graph, model, bytes, ONNX Runtime's):
        # measured on the trunk, the build took 214 MB above the loaded engine, against 366 MB before.
        while self.initializers:
            name, array = self.initializers.pop()
            model.graph.initializer.append(numpy_helper.from_array(array, name))
            del array
        onnx.checker.check_model(model)
        serialised = model.SerializeToString()
        del model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The scorer's Kafka and storage threads share the cores: idle compute threads must not spin (measured:
        # spinning halved throughput, 144 vs 290 msg/s beside torch's).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])


def _read_base(model_file: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Return the base file's float32 tensors of these names (`encoder.layer.3.…`, `embeddings.…`)."""
    from safetensors import safe_open

    if not model_file.is_file():
        raise ModelLoadError(f"{model_file} is missing: the base model needs its safetensors weights")
    out: dict[str, np.ndarray] = {}
    with safe_open(str(model_file), "np") as f:
        keys = set(f.keys())
        for name in names:
            key = next((k for k in (name, f"bert.{name}") if k in keys), None)
            if key is None:
                raise ModelLoadError(f"{model_file} has no tensor {name}")
            out[name] = f.get_tensor(key).astype(np.float32, copy=False)
    return out


class OnnxTrunk:
    """The base encoder's embeddings and lower layers as one ONNX graph per depth the served models need."""

    engine = "onnx"

    def __init__(self, config: ModelConfig, precision: Precision = "int8") -> None:
        if not onnx_available():
            raise ModelLoadError("model.engine is onnx but onnx / onnxruntime are not installed; use engine torch")
        model_dir = base_model_path(config.base_model)
        self.shape = BertShape.read(model_dir)
        self.model_file = model_dir / "model.safetensors"
        self.precision = precision
        self.device = "cpu"
        # The threads one operator may use: those set for the process (set_compute_threads), or one each when
        # the classifier runs sub-batches side by side (learner.model.batch_workers).
        self.threads = operator_threads("cpu", self.engine)
        self.num_layers = self.shape.num_hidden_layers
        self.layer_names = [
            sorted(
                {
                    f"bert.encoder.layer.{i}." + ".".join(t.split(".")[: j + 1])
                    for t in _LAYER_TENSORS
                    for j in range(t.count("."))
                }
            )
            for i in range(self.num_layers)
        ]
        self._sessions: dict[int, Any] = {}
        self._building = threading.Lock()  # workers may ask for the same depth at once: build it once

    def base_layers(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Return the base file's weights of encoder layers `start` .. `stop - 1` (keys `encoder.layer.<i>.…`)."""
        names = [f"encoder.layer.{i}.{t}" for i in range(start, stop) for t in _LAYER_TENSORS]
        return _read_base(self.model_file, names)

    def _session(self, depth: int) -> Any:
        with self._building:
            return self._built(depth)

    def _built(self, depth: int) -> Any:
        if depth not in self._sessions:
            from onnx import TensorProto, helper

            names = [
                f"embeddings.{n}"
                for n in (
                    "word_embeddings.weight",
                    "position_embeddings.weight",
                    "token_type_embeddings.weight",
                    "LayerNorm.weight",
                    "LayerNorm.bias",
                )
            ]
            weights = _read_base(self.model_file, names) | self.base_layers(0, depth)
            graph = _Graph(self.shape, self.precision)
            mask = graph.key_mask("attention_mask")
            hidden = graph.embeddings("input_ids", weights)
            outputs = [graph.op("Identity", hidden, output="hidden_0")]
            for i in range(depth):
                layer = {t: weights[f"encoder.layer.{i}.{t}"] for t in _LAYER_TENSORS}
                hidden = graph.layer(hidden, mask, layer, first_only=False)
                outputs.append(graph.op("Identity", hidden, output=f"hidden_{i + 1}"))
            del weights, layer  # the graph holds what it needs (int8 copies of the matrices): free the float32 ones
            width = self.shape.hidden_size
            self._sessions[depth] = graph.session(
                [
                    helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "length"]),
                ],
                [
                    helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "length", width])
                    for name in outputs
                ],
                self.threads,
            )
        return self._sessions[depth]

    def hidden_states(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, stops: Sequence[int]
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Run the base layers up to the highest of `stops`; return the hidden states at each stop and the mask
        (here the 0/1 mask itself: each top graph casts it for its attention)."""
        wanted = sorted(set(stops))
        session = self._session(wanted[-1])
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        results = session.run([f"hidden_{s}" for s in wanted], feeds)
        return dict(zip(wanted, results, strict=True)), attention_mask

    def select(self, states: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Return these rows of a batch's hidden states or mask."""
        return states[list(rows)]

    def load_task(self, store: AdapterStore, task: Task, version: str, config: ModelConfig) -> OnnxTaskModel:
        """Load an adapter version as this engine's top graph."""
        return OnnxTaskModel.load(store, task, version, self)

    def start_workers(self, count: int) -> Executor:
        """Start `count` threads that run whole sub-batches side by side (ONNX Runtime sessions take concurrent
        runs; with several workers each session computes on one thread)."""
        return ThreadPoolExecutor(count, thread_name_prefix="finpulse-model")


def merged_lora_top(adapter_dir: Path, start: int, trunk: OnnxTrunk) -> dict[str, np.ndarray]:
    """Return the float32 weights of a version's top (layers from `start`, pooler, head) with its LoRA merged
    onto the base (W + B·A·scale, as peft's merge does). Adapters other than plain LoRA are the torch engine's."""
    from safetensors import safe_open

    try:
        adapter = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {adapter_dir / ADAPTER_CONFIG_FILE}: {e}") from e
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not _plain_lora(adapter) or not weights_file.is_file():
        raise ModelLoadError(f"{adapter_dir} is not a plain LoRA adapter: the onnx engine cannot merge it; use torch")
    with safe_open(str(weights_file), "np") as f:
        saved = {key.removeprefix(_PEFT_PREFIX): f.get_tensor(key).astype(np.float32) for key in f.keys()}  # noqa: SIM118
    head = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    if not set(head) <= saved.keys():
        raise ModelLoadError(f"{weights_file} lacks the pooler or classifier weights")
    scaling = lora_scaling(adapter)
    weights = trunk.base_layers(start, trunk.num_layers)
    for key in list(weights):
        module = "bert." + key.removesuffix(".weight")
        if key.endswith(".weight") and f"{module}.lora_A.weight" in saved:
            weights[key] = (
                weights[key] + (saved[f"{module}.lora_B.weight"] @ saved[f"{module}.lora_A.weight"]) * scaling
            )
    return weights | {name.removeprefix("bert."): saved[name] for name in head}


class OnnxTaskModel:
    """One immutable adapter version of one task as an ONNX graph: its merged top layers, pooler and head."""

    def __init__(
        self, task: Task, version: str, start: int, session: Any, temperature: float = 1.0, precision: str = "int8"
    ) -> None:
        self.task = task
        self.precision = precision
        self.version = version
        self.labels = labels_of(task)
        self.start = start
        self.session = session
        self.temperature = temperature

    @classmethod
    def load(cls, store: AdapterStore, task: Task, version: str, trunk: OnnxTrunk) -> OnnxTaskModel:
        from onnx import TensorProto, helper

        path = store.version_dir(task, version)
        start = first_adapted_layer(path, trunk.layer_names)
        weights = merged_lora_top(path, start, trunk)
        graph = _Graph(trunk.shape, trunk.precision)
        mask = graph.key_mask("attention_mask")
        hidden = "hidden"
        for i in range(start, trunk.num_layers):
            layer = {t: weights[f"encoder.layer.{i}.{t}"] for t in _LAYER_TENSORS}
            # The pooler reads the [CLS] state only: the top layer computes nothing else.
            hidden = graph.layer(hidden, mask, layer, first_only=i == trunk.num_layers - 1)
        first = graph.op("Gather", hidden, graph.const(np.array(0, np.int64)), axis=1)
        pooled = graph.op("Tanh", graph.linear(first, weights["pooler.dense.weight"], weights["pooler.dense.bias"]))
        graph.op(
            "Identity",
            graph.linear(pooled, weights["classifier.weight"], weights["classifier.bias"]),
            output="logits",
        )
        width, classes = trunk.shape.hidden_size, weights["classifier.weight"].shape[0]
        del weights, layer
        session = graph.session(
            [
                helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "length", width]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "length"]),
            ],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
            trunk.threads,
        )
        return cls(task, version, start, session, read_temperature(path), trunk.precision)

    def logits(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return the logits of a batch from the hidden states at layer `start`."""
        feeds = {"hidden": np.ascontiguousarray(hidden), "attention_mask": mask}
        logits: np.ndarray = self.session.run(["logits"], feeds)[0]
        return logits

    def probabilities(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return calibrated class probabilities (float32, on the CPU)."""
        scaled = self.logits(hidden, mask) / np.float32(self.temperature)
        exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
        return probs
