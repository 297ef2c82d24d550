"""How unlike the training data a text is: its distance to the nearest training text in the base encoder's space.

all-MiniLM-L6-v2 is a sentence encoder: the mean of its last layer over the tokens is its sentence embedding,
and cosine similarity between two of them says how alike two texts read. A text whose nearest training text is
far away is one the adapters have seen nothing like: a label there teaches more than one more tweet like a
thousand already learnt. Confidence alone misses it: a model is often confidently wrong far from its data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from learner.config import ModelConfig
from learner.datasets import tfns_sentiment
from learner.encoder import base_model_path
from learner.model import padded
from learner.tokenizer import ScoringTokenizer
from learner.torch_engine import Trunk

# Training texts sampled as the reference: nearest-neighbour distances settle well before the whole split
# (9,543 texts), and 2,000 embed in a few seconds on two CPU cores.
REFERENCE_SIZE = 2000
_BATCH = 64


class Novelty:
    """Embeds texts with the base encoder and scores each against a reference set of training texts."""

    def __init__(self, config: ModelConfig, extra_reference: Sequence[str] = (), seed: int = 0) -> None:
        """Take the reference: a seeded sample of the TFNS training split (what the shipped adapters learnt)
        and `extra_reference`, e.g. the texts analysts labelled since (what later versions learnt)."""
        self._trunk = Trunk(config, torch.device("cpu"))
        self._tokenizer = ScoringTokenizer(base_model_path(config.base_model), config.max_length)
        train = [e.text for e in tfns_sentiment("train")]
        sample = random.Random(seed).sample(train, min(REFERENCE_SIZE, len(train)))
        self.reference = self.embed([*sample, *extra_reference])

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the unit-length sentence embeddings of `texts` (float32, one row each)."""
        rows: list[torch.Tensor] = []
        depth = len(self._trunk.layers)
        for begin in range(0, len(texts), _BATCH):
            ids, padding = padded(self._tokenizer.encode(texts[begin : begin + _BATCH]), self._tokenizer.pad_token_id)
            hidden, _ = self._trunk.hidden_states(ids, padding, [depth])
            mask = torch.from_numpy(padding)
            last = hidden[depth].float()
            pooled = (last * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows) if rows else torch.empty(0, 0)

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Return, per text, 1 − the cosine similarity to its nearest reference text: 0 for a text the training
        data holds, larger the less like anything there it is."""
        if not texts:
            return []
        nearest = (self.embed(texts) @ self.reference.T).max(dim=1).values
        return [round(float(1.0 - s), 4) for s in nearest]
