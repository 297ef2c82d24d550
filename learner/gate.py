"""The promotion gate: a candidate replaces the champion only if it is measurably better and forgets nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-9


@dataclass(frozen=True)
class SliceScore:
    """Champion and candidate accuracy on one experience's held-out slice."""

    experience_id: int
    n: int
    champion: float
    candidate: float

    @property
    def delta(self) -> float:
        """Candidate minus champion accuracy."""
        return self.candidate - self.champion


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and the sentence that says why."""

    promote: bool
    reason: str


def decide(new: SliceScore, earlier: Sequence[SliceScore], min_gain: float, max_forgetting: float) -> Decision:
    """Promote only if the candidate gains at least `min_gain` on the new slice and loses at most
    `max_forgetting` on every earlier one.

    The gain must also clear the noise of a slice that size: one standard error of the difference of two
    accuracies on the same n examples, sqrt(2 p (1 - p) / n). With 40 held-out labels at 80% that is 9 points,
    so a small experience cannot promote a version on luck; this is what keeps a noisy experience (30% flipped
    labels) from promoting a model that is no better.
    """
    p = min(max((new.champion + new.candidate) / 2, 0.05), 0.95)
    noise = math.sqrt(2 * p * (1 - p) / max(1, new.n))
    needed = max(min_gain, noise)
    # Accuracies are fractions of counts: compare with a tolerance, or 0.87 - 0.86 > 0.01 in floating point.
    if new.delta < needed - _EPS:
        return Decision(
            False,
            f"not better on experience {new.experience_id}: {new.candidate:.3f} vs champion {new.champion:.3f} "
            f"({_pts(new.delta)}; needs {_pts(needed)} on {new.n} held-out labels)",
        )
    for s in earlier:
        if -s.delta > max_forgetting + _EPS:
            return Decision(
                False,
                f"forgets experience {s.experience_id}: {s.candidate:.3f} vs champion {s.champion:.3f} "
                f"({_pts(s.delta)}; at most -{max_forgetting * 100:.1f} pts allowed)",
            )
    worst = min((s.delta for s in earlier), default=0.0)
    return Decision(
        True,
        f"better on experience {new.experience_id}: {new.candidate:.3f} vs {new.champion:.3f} ({_pts(new.delta)}); "
        f"worst change on {len(earlier)} earlier slice(s) {_pts(worst)}",
    )


def _pts(delta: float) -> str:
    return f"{delta * 100:+.1f} pts"
