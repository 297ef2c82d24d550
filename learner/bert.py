"""The BERT encoder for inference only, in plain torch, read straight from the base model's safetensors file.

Scorers need the forward pass and nothing else. Importing transformers' modelling code costs ~160 MB of resident
memory and building its model materialises every weight in float32 before the cast; this module costs neither,
so a scorer holds the weights once, in its inference dtype. The module names mirror transformers'
(`encoder.layer.3.attention.self.query`), so the base file's tensors and peft's LoRA targets name the same
modules here. Training keeps transformers and peft (`learner.training`); `tests/test_model.py` checks that
both forward passes agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from learner.bert_shape import BertShape
from learner.errors import ModelLoadError

# One torch function per activation `learner.bert_shape` accepts.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": functional.gelu,
    "gelu_new": lambda x: functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: functional.gelu(x, approximate="tanh"),
    "relu": functional.relu,
}


class _Embeddings(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.position_embeddings = nn.Embedding(shape.max_position_embeddings, shape.hidden_size)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # One segment: token type 0 everywhere, as the scorer's single texts are.
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(hidden + self.token_type_embeddings.weight[0])


class _SelfAttention(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.heads = shape.num_attention_heads
        self.query = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.key = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.value = nn.Linear(shape.hidden_size, shape.hidden_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `queries` (default: every position of `hidden`) over every position of `hidden`."""
        batch, _, width = hidden.shape
        queries = hidden if queries is None else queries

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, width // self.heads).transpose(1, 2)

        attended = functional.scaled_dot_product_attention(
            heads(self.query(queries)), heads(self.key(hidden)), heads(self.value(hidden)), attn_mask=mask
        )
        return attended.transpose(1, 2).reshape(batch, queries.shape[1], width)


class _Output(nn.Module):
    """A projection, then the residual and LayerNorm (BertSelfOutput and BertOutput)."""

    def __init__(self, width_in: int, shape: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class _Attention(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.add_module("self", _SelfAttention(shape))  # transformers' name: `attention.self.query`
        self.output = _Output(shape.hidden_size, shape)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        attention = self._modules["self"]
        assert attention is not None
        queries = hidden[:, :1] if first_only else hidden
        out: torch.Tensor = self.output(attention(hidden, mask, queries), queries)
        return out


class _Intermediate(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.intermediate_size)
        self.activation = _ACTIVATIONS[shape.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden))


class BertLayer(nn.Module):
    """One encoder layer; `forward(hidden, mask)` takes the additive attention mask of `attention_mask`.

    With `first_only` it returns the first position's state alone (shape `batch x 1 x width`): what the pooler
    reads of the top layer. Keys and values still come from every position, so that state is exactly the full
    layer's, at a sixth of its cost (the key and value projections); MiniLM's layers are ~85% per-token work.
    """

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.attention = _Attention(shape)
        self.intermediate = _Intermediate(shape)
        self.output = _Output(shape.intermediate_size, shape)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        attended = self.attention(hidden, mask, first_only)
        out: torch.Tensor = self.output(self.intermediate(attended), attended)
        return out


class BertPooler(nn.Module):
    """The [CLS] state through a dense layer and tanh, as BERT's classification head reads it."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertEncoder(nn.Module):
    """Embeddings and encoder layers of a BERT model, loaded from `model.safetensors` in `dtype`."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shape = BertShape.read(model_dir)
        self.model_file = model_dir / "model.safetensors"
        # Built on the meta device, then given the file's tensors: no weight is initialised only to be replaced.
        with torch.device("meta"):
            self.embeddings = _Embeddings(self.shape)
            self.layer = nn.ModuleList(BertLayer(self.shape) for _ in range(self.shape.num_hidden_layers))
        # Here `layer.3.…` sits where the file says `encoder.layer.3.…`.
        names = {name: name if name.startswith("embeddings.") else f"encoder.{name}" for name in self.state_dict()}
        tensors = self.base_tensors(list(names.values()), dtype, device)
        self.load_state_dict({name: tensors[key] for name, key in names.items()}, assign=True)
        self.requires_grad_(False)
        self.eval()

    def base_tensors(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Return the base file's tensors of these module paths (`encoder.layer.4.output.dense.weight`...)."""
        from safetensors import safe_open

        if not self.model_file.is_file():
            raise ModelLoadError(f"{self.model_file} is missing: the base model needs its safetensors weights")
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(self.model_file), "pt") as f:
            keys = set(f.keys())
        for name in names:
            key = _file_key(name, keys)
            if key is None:
                raise ModelLoadError(f"{self.model_file} has no tensor {name}")
            # One mapping per tensor: the file's pages a read touches stay resident while it is mapped, so
            # reading all under one mapping held the whole float32 file (90 MB) beside the converted weights.
            with safe_open(str(self.model_file), "pt") as f:
                out[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        return out

    def new_layer(self) -> BertLayer:
        """Return an encoder layer on the meta device, to be given its weights with `load_state_dict(assign=True)`."""
        with torch.device("meta"):
            return BertLayer(self.shape)


def _file_key(name: str, names: set[str]) -> str | None:
    """Return the file's key for a module path: `encoder.layer.0…` (BertModel) or `bert.encoder.layer.0…`."""
    for key in (name, f"bert.{name}", name.removeprefix("bert.")):
        if key in names:
            return key
    return None
