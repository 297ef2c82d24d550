"""The model: shipped adapters in standard peft format, batch-invariant predictions, clear load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.adapters import AdapterStore, ModelCard
from learner.config import ModelConfig, TrainConfig
from learner.datasets import tfns_sentiment
from learner.encoder import load_classifier_base, load_tokenizer
from learner.errors import ModelLoadError
from learner.labels import SENTIMENTS, TASKS, TOPICS
from learner.model import (
    Classifier,
    auto_inference_batch,
    batch_workers,
    cpu_has_amx,
    engine_name,
    module_dtype,
    operator_threads,
    set_compute_threads,
)
from learner.torch_engine import TaskModel, Trunk, resolve_device
from learner.training import train_adapter

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "$AAPL plunges after earnings miss and weak guidance",
    "Fed leaves interest rates unchanged, signals patience",
    "Exxon raises dividend by 5%",
    "ok",
    "Goldman upgrades $TSLA to buy, sees 40% upside as deliveries beat estimates by a wide margin this quarter",
]


@pytest.fixture(scope="module")
def classifier(adapters_dir: Path) -> Classifier:
    # float32 so that results can be compared with peft's own forward pass to 1e-4.
    return Classifier.from_store(
        ModelConfig(adapters_dir=adapters_dir, engine="torch", inference_dtype="float32"), "cpu"
    )


@pytest.mark.parametrize("task", TASKS)
def test_shipped_adapters_are_standard_peft_with_a_card(task: str, adapters_dir: Path) -> None:
    from peft import PeftModel

    store = AdapterStore(adapters_dir)
    version = store.champion(task)  # type: ignore[arg-type]
    path = store.version_dir(task, version)  # type: ignore[arg-type]
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    card = ModelCard.read(path / "model_card.json")
    assert card.version == version and card.task == task and card.seed == TrainConfig().seed
    assert 0.5 < card.metrics["valid"]["accuracy"] <= 1 and 0 < card.metrics["valid"]["macro_f1"] <= 1
    assert card.labels == list(SENTIMENTS if task == "sentiment" else TOPICS)
    model = PeftModel.from_pretrained(load_classifier_base(len(card.labels)), str(path)).eval()
    tokenizer = load_tokenizer()
    with torch.inference_mode():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (len(TEXTS), len(card.labels))


def test_merged_adapter_predicts_like_peft(classifier: Classifier, adapters_dir: Path) -> None:
    from peft import PeftModel

    store = AdapterStore(adapters_dir)
    version = store.champion("sentiment")
    peft_model = PeftModel.from_pretrained(load_classifier_base(3), str(store.version_dir("sentiment", version))).eval()
    tokenizer = load_tokenizer()
    with torch.inference_mode():
        logits = peft_model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    # Rows carry calibrated probabilities: the version's temperature divides the logits.
    expected = torch.softmax(logits / classifier.models["sentiment"].temperature, -1)
    got = torch.tensor([[p.sentiment_scores[s] for s in SENTIMENTS] for p in classifier.predict(TEXTS)])
    assert torch.allclose(got, expected, atol=1e-4)


def test_predictions_do_not_depend_on_batch_or_order(classifier: Classifier) -> None:
    together = classifier.predict(TEXTS, batch_size=2)
    alone = [classifier.predict([t])[0] for t in TEXTS]
    reversed_ = list(reversed(classifier.predict(list(reversed(TEXTS)), batch_size=64)))
    for a, b, c in zip(together, alone, reversed_, strict=True):
        assert (a.sentiment, a.topic) == (b.sentiment, b.topic) == (c.sentiment, c.topic)
        assert abs(a.sentiment_confidence - b.sentiment_confidence) < 1e-4
        assert abs(a.topic_confidence - c.topic_confidence) < 1e-4
        assert abs(sum(a.sentiment_scores.values()) - 1) < 1e-5
        assert a.sentiment_version == classifier.versions["sentiment"]


def test_shipped_sentiment_adapter_is_accurate_on_held_out_tweets(classifier: Classifier) -> None:
    valid = tfns_sentiment("valid")[::8]  # 299 tweets the adapter never trained on
    predicted = classifier.predict([e.text for e in valid])
    correct = sum(p.sentiment == e.label for p, e in zip(predicted, valid, strict=True))
    assert correct / len(valid) > 0.8


def test_bf16_inference_agrees_with_float32(classifier: Classifier, adapters_dir: Path) -> None:
    bf16 = Classifier.from_store(ModelConfig(adapters_dir=adapters_dir, inference_dtype="bfloat16"), "cpu")
    assert module_dtype(bf16.models["sentiment"]) == "bfloat16"
    texts = [e.text for e in tfns_sentiment("valid")[::16]]
    full, half = classifier.predict(texts), bf16.predict(texts)
    agree = sum(a.sentiment == b.sentiment for a, b in zip(full, half, strict=True)) / len(texts)
    assert agree > 0.97


def test_swap_changes_the_version_of_later_batches(classifier: Classifier, tmp_path: Path, adapters_dir: Path) -> None:
    store = AdapterStore(adapters_dir)
    copy = tmp_path / "sentiment" / "sentiment-v99"
    shutil.copytree(store.version_dir("sentiment", store.champion("sentiment")), copy)
    config = ModelConfig(inference_dtype="float32")
    swapped = classifier.load(AdapterStore(tmp_path), "sentiment", "sentiment-v99", config)
    previous = classifier.swap(swapped)
    try:
        assert classifier.predict(TEXTS[:1])[0].sentiment_version == "sentiment-v99"
    finally:
        restored = classifier.load(store, "sentiment", previous, config)
        classifier.swap(restored)
    assert classifier.versions["sentiment"] == previous


def test_missing_adapters_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="finpulse bootstrap"):
        Classifier.from_store(ModelConfig(adapters_dir=tmp_path), "cpu")


def test_bad_base_model_path_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.base_model"):
        load_classifier_base(3, str(tmp_path))


def test_cuda_without_a_gpu_is_refused_and_auto_falls_back() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_training_writes_a_loadable_adapter_and_card(tmp_path: Path) -> None:
    examples = tfns_sentiment("train")[:48]
    out = tmp_path / "sentiment" / "sentiment-v1"
    config = TrainConfig(epochs=1, batch_size=16, lora_r=4, lora_alpha=8)
    result = train_adapter(
        "sentiment",
        examples,
        examples[:16],
        out,
        "sentiment-v1",
        ModelConfig(),
        config,
        data={"train": "48 tweets"},
    )
    card = json.loads((out / "model_card.json").read_text())
    assert card["hyperparameters"]["lora_r"] == 4 and card["data"]["train"] == "48 tweets"
    assert card["data"]["calibration"] == "2 texts of the training split, kept out of training"
    assert set(result.metrics) == {"accuracy", "macro_f1", "n"}
    store = AdapterStore(tmp_path)
    store.set_champion("sentiment", "sentiment-v1")
    trunk = Trunk(ModelConfig(), torch.device("cpu"))
    model = TaskModel.load(store, "sentiment", store.champion("sentiment"), ModelConfig(), trunk)
    assert model.version == "sentiment-v1"
    # Only the adapted top layers are the version's own; the ones below are the shared trunk's.
    assert model.start == 6 - config.adapted_layers and len(model.layers) == config.adapted_layers
    assert model.temperature == card["metrics"]["calibration"]["temperature"]


def test_adapter_config_names_the_base_model_not_a_local_path(tmp_path: Path) -> None:
    out = tmp_path / "sentiment" / "sentiment-v1"
    train_adapter(
        "sentiment",
        tfns_sentiment("train")[:16],
        tfns_sentiment("valid")[:8],
        out,
        "sentiment-v1",
        ModelConfig(),
        TrainConfig(epochs=1, batch_size=16, lora_r=2, lora_alpha=4),
        data={},
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text().splitlines()


def test_a_version_adapted_in_every_layer_serves_beside_a_shared_trunk(
    classifier: Classifier, tmp_path: Path, adapters_dir: Path
) -> None:
    """A version with LoRA in lower layers too (the first shipped format) starts at layer 0 and still predicts
    exactly as peft does, next to a topic model that reads the shared trunk."""
    from peft import PeftModel

    examples = tfns_sentiment("train")[:32]
    out = tmp_path / "sentiment" / "sentiment-v7"
    config = TrainConfig(epochs=1, batch_size=16, lora_r=2, lora_alpha=4, adapted_layers=6)
    train_adapter("sentiment", examples, examples[:8], out, "sentiment-v7", ModelConfig(), config, data={})
    model_config = ModelConfig(inference_dtype="float32")
    every_layer = classifier.load(AdapterStore(tmp_path), "sentiment", "sentiment-v7", model_config)
    assert every_layer.start == 0 and len(every_layer.layers) == 6
    previous = classifier.swap(every_layer)
    try:
        got = torch.tensor([[p.sentiment_scores[s] for s in SENTIMENTS] for p in classifier.predict(TEXTS)])
        assert classifier.shared_layers == 0
    finally:
        classifier.swap(classifier.load(AdapterStore(adapters_dir), "sentiment", previous, model_config))
    peft_model = PeftModel.from_pretrained(load_classifier_base(3), str(out)).eval()
    with torch.inference_mode():
        logits = peft_model(**load_tokenizer()(TEXTS, padding=True, return_tensors="pt")).logits
    assert torch.allclose(got, torch.softmax(logits / every_layer.temperature, -1), atol=1e-4)


def test_shipped_versions_share_the_lower_layers(classifier: Classifier) -> None:
    # Both tasks read the trunk's hidden states: the layers below the adapted ones run once per batch.
    assert classifier.shared_layers == 6 - TrainConfig().adapted_layers
    assert {model.start for model in classifier.models.values()} == {classifier.shared_layers}


def test_the_scoring_tokenizer_gives_transformers_ids(classifier: Classifier) -> None:
    from finpulse.replay import labelled_stream

    texts = [li.item.text for li in labelled_stream(300)]
    texts += ["", "   ", "中国股市今日大幅下跌", "🚀🚀 $TSLA to the moon!!! 🌕", "word " * 200]
    texts += ["Café Müller ÇA VA naïve"]
    reference = load_tokenizer()(texts, truncation=True, max_length=classifier.max_length, padding=False)
    assert classifier.encode(texts) == reference["input_ids"]
    assert max(len(ids) for ids in classifier.encode(texts)) == classifier.max_length
    transformers_tokenizer = load_tokenizer()
    assert classifier.tokenizer.pad_token_id == transformers_tokenizer.pad_token_id
    assert classifier.tokenizer.unk_token_id == transformers_tokenizer.unk_token_id
    assert sorted(classifier.tokenizer.all_special_ids) == sorted(transformers_tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def onnx_float32(adapters_dir: Path) -> Classifier:
    config = ModelConfig(adapters_dir=adapters_dir, engine="onnx", inference_dtype="float32")
    return Classifier.from_store(config, "cpu")


@pytest.fixture(scope="module")
def int8(adapters_dir: Path) -> Classifier:
    return Classifier.from_store(ModelConfig(adapters_dir=adapters_dir, engine="onnx"), "cpu")


def test_onnx_engine_computes_what_the_torch_engine_does(classifier: Classifier, onnx_float32: Classifier) -> None:
    # The same weights in float32 on both engines: the graphs built node by node must be the same function.
    texts = [*TEXTS, *(e.text for e in tfns_sentiment("valid")[:59])]
    encoded = classifier.encode(texts)
    torch_probs, _ = classifier.probabilities(encoded, batch_size=16)
    onnx_probs, _ = onnx_float32.probabilities(encoded, batch_size=16)
    for task in TASKS:
        assert np.allclose(torch_probs[task], onnx_probs[task], atol=1e-4), task
    assert onnx_float32.trunk.engine == "onnx" and module_dtype(onnx_float32.models["sentiment"]) == "float32"


def test_onnx_int8_keeps_the_accuracy_of_torch(classifier: Classifier, int8: Classifier) -> None:
    assert module_dtype(int8.models["topic"]) == "int8"
    examples = tfns_sentiment("valid")[:400]
    texts = [e.text for e in examples]

    def accuracy(c: Classifier) -> float:
        return sum(p.sentiment == e.label for p, e in zip(c.predict(texts), examples, strict=True)) / len(examples)

    # Measured on all of TFNS valid: 0.868 torch bf16, 0.867 int8.
    assert abs(accuracy(int8) - accuracy(classifier)) <= 0.015


def test_onnx_int8_scores_a_text_the_same_whatever_its_batch(int8: Classifier) -> None:
    # Activations are quantised per row: a text's probabilities must not move with the texts batched beside it
    # (a per-batch scale moved one by 0.24 between these two calls).
    examples = [e.text for e in tfns_sentiment("valid")[:64]]
    together, _ = int8.probabilities(int8.encode(examples), batch_size=64)
    alone, _ = int8.probabilities(int8.encode(examples[:8]), batch_size=8)
    for task in TASKS:
        assert np.allclose(together[task][:8], alone[task], atol=1e-6), task


def test_onnx_domain_models_route_like_torch(
    onnx_float32: Classifier, classifier: Classifier, adapters_dir: Path
) -> None:
    # A second model served to one domain changes that domain's rows only, on the onnx engine as on torch.
    store = AdapterStore(adapters_dir)
    config = ModelConfig(adapters_dir=adapters_dir, engine="onnx", inference_dtype="float32")
    hot = onnx_float32.load(store, "sentiment", store.champion("sentiment"), config)
    hot.temperature = 8.0
    encoded = onnx_float32.encode(TEXTS)
    before, _ = onnx_float32.probabilities(encoded, domains=["default"] * len(TEXTS))
    assert onnx_float32.swap(hot, "social") is None
    try:
        domains = ["social" if i % 2 else "default" for i in range(len(TEXTS))]
        after, versions = onnx_float32.probabilities(encoded, domains=domains)
    finally:
        onnx_float32.drop("sentiment", "social")
    for i, domain in enumerate(domains):
        same = np.allclose(before["sentiment"][i], after["sentiment"][i], atol=1e-6)
        assert same == (domain == "default"), (i, domain)
    assert np.allclose(before["topic"], after["topic"], atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "device", "expected"),
    [
        ({"engine": "torch"}, "cpu", "torch"),
        ({"engine": "onnx"}, "auto", "onnx"),
        ({}, "cpu", "torch" if cpu_has_amx() else "onnx"),
        ({"inference_dtype": "float32"}, "cpu", "onnx"),
        ({"inference_dtype": "bfloat16"}, "cpu", "torch"),
        ({}, "cuda", "torch"),
        ({}, "auto", "torch" if Path("/dev/nvidiactl").exists() or cpu_has_amx() else "onnx"),
    ],
)
def test_engine_auto_is_onnx_on_the_cpu_and_torch_on_a_gpu_or_amx(
    settings: dict[str, str], device: str, expected: str
) -> None:
    assert engine_name(ModelConfig(**settings), device) == expected  # type: ignore[arg-type]


def test_auto_inference_batch_is_wider_where_the_hardware_wants_it() -> None:
    assert auto_inference_batch("onnx", "cpu") == 32
    assert auto_inference_batch("torch", "cuda:0") == 512
    assert auto_inference_batch("torch", "cpu") == (64 if cpu_has_amx() else 32)


@pytest.mark.parametrize(
    ("settings", "device", "field"),
    [({"inference_dtype": "bfloat16"}, "cpu", "inference_dtype"), ({}, "cuda", "scorer.device")],
)
def test_onnx_engine_refuses_what_it_cannot_run(settings: dict[str, str], device: str, field: str) -> None:
    with pytest.raises(ModelLoadError, match=field):
        Classifier.from_store(ModelConfig(engine="onnx", **settings), device)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_sub_batches_side_by_side_score_what_one_at_a_time_does(engine: str, adapters_dir: Path) -> None:
    config = ModelConfig(adapters_dir=adapters_dir, engine=engine, inference_dtype="float32")  # type: ignore[arg-type]
    try:
        set_compute_threads(2, "operators")
        one = Classifier.from_store(config, "cpu")
        set_compute_threads(2, "batches")
        side = Classifier.from_store(config, "cpu")
    finally:
        set_compute_threads()
    assert (one.workers, side.workers) == (1, 2)
    texts = [*TEXTS, *(e.text for e in tfns_sentiment("valid")[:65])]
    encoded = one.encode(texts)
    # 16: five sub-batches over two workers; 64: fewer texts than two sub-batches, split so that both have a share.
    for batch in (16, 64):
        alone, _ = one.probabilities(encoded, batch_size=batch)
        together, _ = side.probabilities(encoded, batch_size=batch)
        for task in TASKS:
            assert np.allclose(alone[task], together[task], atol=1e-5), (task, batch)
    assert side._pool is not None and one._pool is None  # the split batches did run on the workers


@pytest.mark.parametrize(
    ("mode", "device", "engine", "workers"),
    [
        ("auto", "cpu", "torch", 2),
        ("auto", "cpu", "onnx", 1),
        ("auto", "cuda:0", "torch", 1),
        ("batches", "cpu", "onnx", 2),
        ("batches", "cuda", "torch", 1),
        ("operators", "cpu", "torch", 1),
    ],
)
def test_parallel_modes_choose_the_workers(mode: str, device: str, engine: str, workers: int) -> None:
    try:
        set_compute_threads(2, mode)
        assert batch_workers(device, engine) == workers
        assert operator_threads(device, engine) == (1 if workers > 1 else 2)
    finally:
        set_compute_threads()


def test_an_unknown_parallel_mode_names_the_setting() -> None:
    with pytest.raises(ValueError, match="scorer.parallel"):
        set_compute_threads(0, "threads")


# Run in a fresh interpreter where torch, transformers and peft cannot be imported: the onnx scorer's whole path
# (its modules, the classifier, a hot-swap load) must not need them.
_WITHOUT_TORCH = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "transformers", "peft", "avalanche"}:
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, Refuse())
import finpulse.runtime, stream.scorer, stream.updates  # what `finpulse score` imports
from learner.adapters import AdapterStore
from learner.config import ModelConfig
from learner.model import Classifier, set_compute_threads

set_compute_threads(1)
config = ModelConfig(adapters_dir=sys.argv[1], engine="onnx")
classifier = Classifier.from_store(config, "auto")
store = AdapterStore(config.adapters_dir)
classifier.swap(classifier.load(store, "sentiment", store.champion("sentiment"), config), "social")
texts = json.loads(sys.argv[2])
predictions = classifier.predict(texts, domains=["social" if i % 2 else "default" for i in range(len(texts))])
print(json.dumps({"threads": classifier.trunk.threads, "torch": "torch" in sys.modules,
                  "rows": [[p.sentiment, p.topic, p.outcome] for p in predictions]}))
"""


def test_onnx_scorer_runs_without_torch(adapters_dir: Path, int8: Classifier) -> None:
    import subprocess
    import sys

    texts = [*TEXTS, "央行宣布降准50个基点"]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(adapters_dir), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["threads"] == 1
    # The same engine in this process (torch loaded) answers the same.
    expected = [[p.sentiment, p.topic, p.outcome] for p in int8.predict(texts)]
    assert got["rows"] == expected
    assert expected[-1][2] != "scored"  # the Chinese headline is flagged on this path too
