"""The continual-learning benchmark: a domain-incremental sentiment sequence, five strategies side by side.

Sequence: twitter-financial-news tweets -> SEntFiN headlines -> stock-market tweets (Apr-Jul 2020, trained on the
earlier ones and tested on the later ones). Every strategy starts from the same pretrained encoder with a fresh
adapter, sees the same data in the same order, and is evaluated on every experience's test split after each
experience: an accuracy matrix R[i][j] = accuracy on test set j after training on experience i.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.config import ContinualConfig, ModelConfig, TrainConfig
from learner.continual import (
    FeatureBank,
    TopModel,
    accuracy_on,
    build_strategy,
    experience_of,
    freeze_lower_layers,
    label_ids,
    progress_plugin,
    seed_everything,
    tensor_dataset,
)
from learner.datasets import Example, sentfin_headlines, stock_tweets, tfns_sentiment
from learner.encoder import load_tokenizer
from learner.tasks import SENTIMENT
from learner.training import lora_model

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("naive", "replay", "ewc", "replay_ewc", "joint")
_PLUGINS = {"naive": (False, False), "replay": (True, False), "ewc": (False, True), "replay_ewc": (True, True)}


@dataclass(frozen=True)
class ExperienceData:
    """One domain of the sequence with its train and test examples."""

    name: str
    train: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class Sizes:
    """How many examples each experience trains and tests on."""

    train: int
    test: int


# A production memory is small beside the labels it summarises: 10% of what was seen. The learner's own
# replay_size (2,000) would hold every example of this benchmark (2 x 1,000 before the last experience), which
# makes replay equal joint training by construction (measured 0.730 vs 0.732).
MEMORY_FRACTION = 0.1
QUICK = Sizes(train=400, test=200)
FULL = Sizes(train=1000, test=500)


def sequence(sizes: Sizes, data_dir: Path | None = None, data_seed: int = 0) -> list[ExperienceData]:
    """Build the three experiences; samples are fixed by `data_seed`, not by the training seed."""
    rng = random.Random(data_seed)
    tfns_train = tfns_sentiment("train", data_dir)
    tfns_test = tfns_sentiment("valid", data_dir)
    headlines = sentfin_headlines(data_dir)
    rng.shuffle(headlines)
    tweets = [Example(t.text, t.sentiment) for t in stock_tweets(data_dir, labelled_only=True) if t.sentiment]
    # Time order: the model learns from the earlier tweets and is tested on the later ones.
    tweet_test = min(sizes.test, len(tweets) // 3)
    tweet_train = tweets[: len(tweets) - tweet_test][-sizes.train :]
    return [
        ExperienceData("tfns", rng.sample(tfns_train, sizes.train), rng.sample(tfns_test, sizes.test)),
        ExperienceData("sentfin", headlines[: sizes.train], headlines[sizes.train : sizes.train + sizes.test]),
        ExperienceData("stock_tweets", tweet_train, tweets[len(tweets) - tweet_test :]),
    ]


@dataclass
class StrategyResult:
    """One strategy's outcome, over seeds."""

    matrices: list[list[list[float]]] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return mean and spread over seeds of the headline figures."""
        avg = [_avg_accuracy(m) for m in self.matrices]
        fgt = [_forgetting(m) for m in self.matrices]
        bwt = [_bwt(m) for m in self.matrices]
        return {
            "avg_accuracy": round(statistics.fmean(avg), 4),
            "forgetting": round(statistics.fmean(fgt), 4),
            "bwt": round(statistics.fmean(bwt), 4),
            "train_s": round(statistics.fmean(self.train_s), 1),
            "avg_accuracy_std": round(statistics.pstdev(avg), 4),
            "forgetting_std": round(statistics.pstdev(fgt), 4),
            "per_seed_avg_accuracy": [round(a, 4) for a in avg],
            "matrix": [
                [round(statistics.fmean(c), 4) for c in zip(*rows, strict=True)]
                for rows in zip(*self.matrices, strict=False)
            ],
        }


def _mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    # Element-wise mean over seeds: rows of seed matrices grouped by index, then columns.
    return [
        [round(statistics.fmean(column), 4) for column in zip(*rows, strict=True)]
        for rows in zip(*matrices, strict=True)
    ]


def _avg_accuracy(matrix: list[list[float]]) -> float:
    return statistics.fmean(matrix[-1])


def _forgetting(matrix: list[list[float]]) -> float:
    # For each earlier experience: best accuracy it ever had minus its final accuracy.
    if len(matrix) < 2:
        return 0.0
    final = matrix[-1]
    return statistics.fmean(max(row[j] for row in matrix[:-1]) - final[j] for j in range(len(matrix) - 1))


def _bwt(matrix: list[list[float]]) -> float:
    # Backward transfer: final accuracy minus the accuracy just after learning that experience.
    if len(matrix) < 2:
        return 0.0
    return statistics.fmean(matrix[-1][j] - matrix[j][j] for j in range(len(matrix) - 1))


@dataclass
class BenchmarkResult:
    """Everything a run measured."""

    experiences: list[str]
    seeds: list[int]
    sizes: dict[str, int]
    config: dict[str, Any]
    results: dict[str, StrategyResult]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON document (`strategies` as `finpulse bench cl --json` prints it)."""
        return {
            "strategies": {name: r.summary() for name, r in self.results.items()},
            "experiences": self.experiences,
            "seeds": self.seeds,
            "sizes": self.sizes,
            "config": self.config,
            "wall_s": round(self.wall_s, 1),
        }


def run(
    *,
    quick: bool,
    seeds: Sequence[int],
    config: ContinualConfig,
    model_config: ModelConfig,
    train_config: TrainConfig,
    strategies: Sequence[str] = STRATEGIES,
    data_dir: Path | None = None,
    show_progress: bool = True,
    memory_fraction: float | None = MEMORY_FRACTION,
) -> BenchmarkResult:
    """Run every strategy for every seed and collect accuracy matrices; replay memories hold at most
    `memory_fraction` of the examples seen (None: `config.replay_size`)."""
    started = time.perf_counter()
    sizes = QUICK if quick else FULL
    experiences = sequence(sizes, data_dir)
    tokenizer = load_tokenizer(model_config.base_model)
    torch.manual_seed(0)
    first = lora_model(SENTIMENT.name, model_config, train_config)
    frozen = freeze_lower_layers(first, config.trainable_layers)
    # The frozen layers of every fresh adapter equal the base encoder's (LoRA's B starts at zero),
    # so one bank of features serves every strategy and seed.
    bank = FeatureBank(first, tokenizer, frozen, train_config.max_length)
    data = []
    for exp in experiences:
        train_idx = bank.add([e.text for e in exp.train])
        test_idx = bank.add([e.text for e in exp.test])
        data.append(
            (
                train_idx,
                label_ids(SENTIMENT.name, [e.label for e in exp.train]),
                test_idx,
                label_ids(SENTIMENT.name, [e.label for e in exp.test]),
            )
        )
    del first
    results: dict[str, StrategyResult] = {}
    for name in strategies:
        result = StrategyResult()
        for seed in seeds:
            matrix, train_s = _run_one(
                name, seed, data, bank, config, model_config, train_config, show_progress, memory_fraction
            )
            result.matrices.append(matrix)
            result.train_s.append(train_s)
            log.info("%s seed %d: final row %s (%.0f s)", name, seed, [round(a, 3) for a in matrix[-1]], train_s)
        results[name] = result
    return BenchmarkResult(
        experiences=[e.name for e in experiences],
        seeds=list(seeds),
        sizes={e.name: len(e.train) for e in experiences} | {f"{e.name}_test": len(e.test) for e in experiences},
        config={**config.model_dump(), "memory_fraction": memory_fraction},
        results=results,
        wall_s=time.perf_counter() - started,
    )


def _run_one(
    name: str,
    seed: int,
    data: list[tuple[torch.Tensor, list[int], torch.Tensor, list[int]]],
    bank: FeatureBank,
    config: ContinualConfig,
    model_config: ModelConfig,
    train_config: TrainConfig,
    show_progress: bool,
    memory_fraction: float | None,
) -> tuple[list[list[float]], float]:
    seed_everything(seed)
    peft_model = lora_model(SENTIMENT.name, model_config, train_config)
    freeze_lower_layers(peft_model, config.trainable_layers)
    model = TopModel(peft_model, bank)
    if name == "joint":
        train_sets = [
            (torch.cat([d[0] for d in data]), [y for d in data for y in d[1]]),
        ]
    else:
        train_sets = [(d[0], d[1]) for d in data]
    replay, ewc = _PLUGINS.get(name, (False, False))
    steps = sum(len(ys) for _, ys in train_sets) // config.batch_size * config.epochs
    bar = progress_plugin(steps, f"{name} seed {seed}", None, show_progress)
    strategy = build_strategy(model, config, replay=replay, ewc=ewc, plugins=[bar])
    matrix: list[list[float]] = []
    train_s = 0.0
    seen = 0
    for number, (index, targets) in enumerate(train_sets):
        seen += len(targets)
        if strategy.replay is not None and memory_fraction is not None:
            # The memory after this experience holds at most this share of the examples seen so far: with
            # room for all of them, replay would be joint training by construction.
            cap = max(1, min(config.replay_size, int(memory_fraction * seen)))
            strategy.replay.mem_size = cap
            strategy.replay.storage_policy.max_size = cap
        t0 = time.perf_counter()
        strategy.template.train(experience_of(tensor_dataset(index, targets), number), eval_streams=[])
        train_s += time.perf_counter() - t0
        matrix.append([accuracy_on(model, d[2], d[3]) for d in data])
    return matrix, train_s


def markdown_table(doc: dict[str, Any]) -> str:
    """Render the summary as a markdown table."""
    lines = [
        "| strategy | avg accuracy | ± (seeds) | forgetting | BWT | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in doc["strategies"].items():
        # Joint training sees everything at once: forgetting and BWT do not apply.
        forgetting = "—" if name == "joint" else f"{s['forgetting']:.3f}"
        bwt = "—" if name == "joint" else f"{s['bwt']:+.3f}"
        lines.append(
            f"| {name} | {s['avg_accuracy']:.3f} | {s['avg_accuracy_std']:.3f} | {forgetting} | {bwt} | "
            f"{s['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def heatmaps(doc: dict[str, Any], path: Path) -> None:
    """Draw each strategy's mean accuracy matrix as a heatmap, side by side, into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in doc["strategies"] if n != "joint"] + (["joint"] if "joint" in doc["strategies"] else [])
    exps = doc["experiences"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    image = None
    for ax, name in zip(axes[0], names, strict=True):
        matrix = doc["strategies"][name]["matrix"]
        image = ax.imshow(matrix, vmin=0.3, vmax=1.0, cmap="viridis")
        ax.set_title(f"{name}\navg {doc['strategies'][name]['avg_accuracy']:.3f}", fontsize=10)
        ax.set_xticks(range(len(exps)), exps, rotation=30, ha="right", fontsize=8)
        rows = ["joint (all)"] if name == "joint" else [f"after {e}" for e in exps[: len(matrix)]]
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                # viridis is bright at the top: dark text there, white on the dark end.
                color = "black" if value >= 0.72 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.suptitle("accuracy on each experience's test set (rows: after training on)", fontsize=10)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write JSON, markdown and PNG results; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(doc), encoding="utf-8")
    heatmaps(doc, paths["png"])
    return paths
