"""Weight blending: a candidate that learnt its experience but forgets an earlier one, moved part-way back.

Fine-tuning a champion on a domain that labels differently (the stock tweets against TFNS) moves its weights
along a direction that helps the new domain and hurts the old one. Replay and EWC bend that path but, measured
on `finpulse bench cl --from-champion`, still leave 2 to 5 points of TFNS forgotten. Interpolating the trained
weights back towards the champion's, w = w0 + a (w1 - w0), trades the two smoothly: at a = 0.25 the candidate
kept +3.0 and +3.9 points of its gain on SEntFiN and the stock tweets while TFNS moved -1.0 and -0.4 (a = 1:
about -4 and -5). This is weight-space ensembling (Wortsman et al., "Robust fine-tuning of zero-shot models",
2022), applied to the trainable top only: the LoRA factors of its layers, the pooler and the head. Factors are
interpolated one by one, so the adapter keeps its rank and format; on the measured cases this gave the same
accuracies (within 0.2 points) as interpolating the low-rank products exactly.

The blend is searched in a fixed order, the trained candidate (a = 1) first, then each configured weight,
falling: a step is taken only while the candidate was significantly better on its new slice and was rejected
for forgetting alone, and the search stops at the first weight the gate accepts. A blend must show that it
keeps every earlier slice (its loss within `max_forgetting` at 95% confidence, `decide(prove_kept=True)`), where
the trained candidate only had to show no significant forgetting. Because the order is fixed in
advance and each further weight is tried only after the gain of the one before passed its test, the chance of
promoting a version that is not better stays at the gate's 5% (a fixed-sequence test: the first true null
hypothesis in the sequence must be rejected by chance for any false promotion). On the earlier slices, each
blend that truly loses more than the allowance passes its test with at most 5% chance, so over the k blends
looked at at most k x 5%; in practice fewer can: the loss shrinks with the weight (measured below), so only the
first weights lose that much. The trained candidate's own test, for comparison, passes a candidate whose loss
is anywhere within its noise above the allowance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from learner.gate import Decision


@dataclass(frozen=True)
class Try:
    """One weight of the search and what the gate said of it."""

    weight: float
    decision: Decision

    @property
    def forgets_only(self) -> bool:
        """Rejected for forgetting alone: the gain on the new slice passed its test."""
        return not self.decision.promote and self.decision.better


class WeightBlend:
    """The champion's and the trained values of a model's trainable parameters, and any mix of the two."""

    def __init__(self, start: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
        missing = sorted(set(params) - set(start))
        if missing:
            raise ValueError(f"no starting value for trainable parameters {missing[:3]}")
        self._params = dict(params)
        self._start = {n: start[n].detach().clone() for n in params}
        self._trained = {n: p.detach().clone() for n, p in params.items()}

    @staticmethod
    def snapshot(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Copy parameter values (taken before training, they are the champion's)."""
        return {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def apply(self, weight: float) -> None:
        """Set every parameter to start + weight * (trained - start): 1 is the trained model, 0 the champion."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"a blend weight is between 0 and 1, not {weight}")
        for name, param in self._params.items():
            start, trained = self._start[name], self._trained[name]
            param.copy_(trained if weight == 1.0 else torch.lerp(start, trained, weight))


def search(weights: Sequence[float], judge: Callable[[float], Decision]) -> tuple[float, list[Try]]:
    """Try the trained candidate, then each of `weights` (falling), as the module docstring says.

    `judge(w)` is the gate's decision on the candidate blended at w. Returns the weight to keep (the first
    accepted, else 1.0: a rejected candidate is recorded as trained) and every try in order.
    """
    tries: list[Try] = []
    for weight in (1.0, *weights):
        tries.append(Try(weight, judge(weight)))
        if tries[-1].decision.promote:
            return weight, tries
        if not tries[-1].forgets_only:
            break  # not significantly better at this weight: a smaller one is not tried (the fixed sequence)
    return 1.0, tries
