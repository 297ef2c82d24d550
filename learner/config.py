"""Typed configuration of the model: base encoder, adapters, inference and training settings."""

import itertools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from learner.domains import check_domain

# How the compute threads share a batch (the scorer's `scorer.parallel`; learner.model.batch_workers says what each
# does and what it measured).
ParallelMode = Literal["auto", "batches", "operators"]


class ModelConfig(BaseModel):
    """Which encoder and adapters the scorers load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field(
        "",
        description="Path of a local Hugging Face encoder; empty = the packaged all-MiniLM-L6-v2 "
        "(env FINPULSE_MODEL__BASE_MODEL).",
    )
    adapters_dir: Path = Field(
        Path("adapters"),
        description="Directory holding <task>/<version>/ adapters in peft format (env FINPULSE_MODEL__ADAPTERS_DIR).",
    )
    inference_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights and activations at inference: auto = bfloat16 on CUDA and on CPUs with bf16 "
        "instructions (AMX / AVX512-BF16), float32 elsewhere (env FINPULSE_MODEL__INFERENCE_DTYPE).",
    )
    # Measured on a 2-core Zen 4 (no AMX): ONNX Runtime int8 1.3x torch bf16's model throughput, accuracy within 0.1
    # points on TFNS, 160 MB less memory. On a 2-core Xeon with AMX, torch bf16 is 1.4-1.7x int8's model throughput.
    engine: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="Inference engine: torch (CPU/CUDA, bf16 where the hardware has it), onnx (ONNX Runtime on the "
        "CPU, int8; float32 with inference_dtype = float32), or auto = torch on a GPU, on a CPU with AMX or with "
        "inference_dtype = bfloat16, onnx otherwise (env FINPULSE_MODEL__ENGINE).",
    )
    # The adapters are trained on 64 tokens; financial tweets average 28 (TFNS) to 52 (stock-market tweets).
    # Measured on the CPU: 64 scores ~1.3x faster than 128 on the stock-market tweets.
    max_length: int = Field(64, ge=8, le=512, description="Tokens kept per text; longer texts are truncated.")
    domains: dict[str, str] = Field(
        default_factory=dict,
        description='Message source -> domain, e.g. {"stocktwits": "social"}: each domain may have its own '
        "champion adapters; unknown sources belong to the default domain.",
    )

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, value: dict[str, str]) -> dict[str, str]:
        for domain in value.values():
            check_domain(domain)
        return value


class TrainConfig(BaseModel):
    """Hyper-parameters of `finpulse bootstrap` (first adapter versions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(13, description="Seed of every random choice in training.")
    # Only the top layers train, over cached lower-layer features: a pass over the sentiment split costs ~35 s
    # on a 2-core CPU, so bootstrap affords more passes than when every layer trained (4 and 2, 30 min each).
    epochs: int = Field(8, ge=1, le=50, description="Passes over the sentiment training split (9.5k tweets).")
    topic_epochs: int = Field(6, ge=1, le=50, description="Passes over the topic training split (17k tweets).")
    batch_size: int = Field(32, ge=1, le=1024, description="Training batch size.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="AdamW learning rate of LoRA and head weights.")
    # Measured on TFNS valid with 2 adapted layers: r=16 0.865 sentiment accuracy, r=64 0.868.
    lora_r: int = Field(64, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(128, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path.")
    max_length: int = Field(64, ge=8, le=512, description="Tokens kept per training text (tweets are short).")
    # The layers below stay the base model's, shared by both tasks and every domain: a scorer runs them once.
    adapted_layers: int = Field(
        2, ge=1, le=12, description="Top encoder layers that carry LoRA weights; the ones below are shared."
    )
    calibration_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of the training split kept out to fit the calibration temperature."
    )


class ContinualConfig(BaseModel):
    """The learner: when it trains, how (replay + online EWC via avalanche), and what it takes to promote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # When an experience forms.
    trigger_labels: int = Field(200, ge=1, description="Form an experience once this many new labels of a task wait.")
    trigger_interval_s: float = Field(
        3600.0, ge=0, description="Also form one when the oldest waiting label is this old (0 = never by time)."
    )
    min_labels: int = Field(50, ge=2, description="Fewest labels an experience may have (time trigger and --now).")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each experience's labels kept out of training for the gate."
    )
    # How it trains.
    trainable_layers: int = Field(
        2, ge=1, le=12, description="Top encoder layers whose LoRA weights train; lower ones stay frozen (cached)."
    )
    epochs: int = Field(3, ge=1, le=50, description="Passes over an experience's training labels.")
    batch_size: int = Field(32, ge=1, le=1024, description="New labels per step (replay adds as many again).")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="AdamW learning rate of LoRA and head weights.")
    # Chosen on `finpulse bench cl` (3 seeds, 1,000 training examples per experience): a 1,000-example memory
    # left replay + EWC 3.3 points under joint training with 3.8 points of forgetting; 2,000 closes the gap.
    # In production the memory is small beside the labels it summarises; 2,000 texts cost ~6 s of caching.
    replay_size: int = Field(2000, ge=0, description="Class-balanced replay memory, in examples (0 = no replay).")
    replay_batch_size: int = Field(32, ge=1, le=1024, description="Replayed examples per step.")
    # Measured at a 1,000-example memory: lambda 10 and 100 give the same accuracy (0.700 vs 0.699); 1e4 held
    # the weights so firmly that the new domains were learnt 4-10 points worse (single seed). The penalty is
    # an anchor against drift between experiences, not the main defence: replay is.
    ewc_lambda: float = Field(100.0, ge=0, description="Weight of the online-EWC penalty (0 = no EWC).")
    ewc_decay: float = Field(0.9, gt=0, le=1, description="Online EWC: how much of the old importance is kept.")
    distill_alpha: float = Field(
        0.0, ge=0, description="Weight of distillation towards the champion's outputs (LwF; 0 = off)."
    )
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of that distillation.")
    time_budget_s: float = Field(900.0, gt=0, description="Training stops after this long; the gate still runs.")
    seed: int = Field(13, description="Seed of shuffling, sampling and the held-out split.")
    # What it takes to be promoted.
    min_gain: float = Field(
        0.01, ge=0, lt=1, description="Held-out accuracy the candidate must gain on the new experience."
    )
    max_forgetting: float = Field(
        0.01, ge=0, lt=1, description="Held-out accuracy it may lose on any earlier experience (1 point)."
    )
    # Measured on the gate's slices of `bench cl --from-champion` (learner.blend), SEntFiN / stock tweets from the
    # champion: trained, +6.0 / +13.9 points on the new slice and -3.5 / -4.7 on TFNS; blended to 0.5,
    # +6.5 / +9.8 and -0.6 / -2.0; to 0.375, +6.0 / +10.4 and -0.1 / -0.9; to 0.25, +3.5 / +5.8 and 0.0 / -0.2;
    # to 0.125, +2.0 / +2.3 and +0.4 / +0.1. Steps of an eighth: finer ones mostly re-test the same trade.
    blend_weights: tuple[float, ...] = Field(
        (0.5, 0.375, 0.25, 0.125),
        description="When a candidate is better on its experience but forgets an earlier one, try its weights "
        "moved back towards the champion's by these fractions of the trained step, in this order (falling, "
        "each in (0, 1); empty = never).",
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="How long one poll of news.labels waits.")
    # A minute: a locked file or a broker away is usually back by then, and a task failing for good costs a
    # log line per try, not a hot loop. The learner doubles it at each failure in a row, up to an hour.
    retry_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="After a task's training step fails, wait this long before trying it again (doubles with "
        "each failure in a row, up to an hour).",
    )

    @field_validator("blend_weights")
    @classmethod
    def _falling_fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < w < 1 for w in value):
            raise ValueError("each blend weight must be between 0 and 1 (exclusive), e.g. [0.5, 0.25]")
        if any(a <= b for a, b in itertools.pairwise(value)):
            raise ValueError("blend weights are tried in order and must fall, e.g. [0.5, 0.25]")
        return value
