"""The sizes of a BERT encoder, read from its config.json: what both engines build their layers from.

Its own module, apart from `learner.bert`'s torch layers, so that the onnx engine reads it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from learner.errors import ModelLoadError

# The activations both engines compute (as transformers names them).
ACTIVATIONS = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"})


@dataclass(frozen=True)
class BertShape:
    """The sizes of a BERT encoder, from its config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def read(cls, model_dir: Path) -> BertShape:
        """Read config.json of a BERT model directory; refuse what this module cannot run."""
        try:
            raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            shape = cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read a BERT config from {model_dir / 'config.json'}: {e}") from e
        if raw.get("model_type") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"{model_dir} is not a BERT encoder with absolute positions")
        if shape.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"{model_dir}: activation {shape.hidden_act!r} is not supported")
        return shape
