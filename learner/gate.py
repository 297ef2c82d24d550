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
    # Paired counts: labels only the champion gets right (lost) and only the candidate does (gained). None when
    # unknown (then the unpaired bound applies).
    lost: int | None = None
    gained: int | None = None

    @property
    def delta(self) -> float:
        """Candidate minus champion accuracy."""
        return self.candidate - self.champion

    @property
    def standard_error(self) -> float:
        """The standard error of `delta`.

        Both models answer the same labels, so only the labels where they disagree carry noise (a paired
        test, as McNemar's): se = sqrt(b + c - (c - b)^2 / n) / n with b lost, c gained. Without the counts,
        the unpaired sqrt(2 p (1 - p) / n) is used: larger, since the models agree on most labels.
        """
        n = max(1, self.n)
        if self.lost is not None and self.gained is not None:
            b, c = self.lost, self.gained
            return math.sqrt(max(b + c - (c - b) ** 2 / n, 1.0)) / n  # at least one disagreement's worth
        p = min(max((self.champion + self.candidate) / 2, 0.05), 0.95)
        return math.sqrt(2 * p * (1 - p) / n)


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and the sentence that says why."""

    promote: bool
    reason: str
    # Whether the new slice's gain passed its test: a rejection with `better` set was for forgetting alone.
    better: bool = False


# One-sided 95%: a gain must be this many standard errors above 0, a loss this many beyond the allowance.
Z: float = 1.645


def decide(
    new: SliceScore,
    earlier: Sequence[SliceScore],
    min_gain: float,
    max_forgetting: float,
    *,
    prove_kept: bool = False,
) -> Decision:
    """Promote only if the candidate is better on the new slice and worse on no earlier one, both with 95%
    one-sided confidence from a paired test on the held-out labels.

    Better: the gain is at least `min_gain` and significantly above 0 (gain - Z se > 0): with 40 held-out
    labels a lucky 4 points cannot promote a version (this keeps an experience with 30% flipped labels from
    promoting a model that is no better). Worse: an earlier slice's loss is significantly beyond
    `max_forgetting` (loss - Z se > max_forgetting). A drop within the slice's noise is not called
    forgetting: on a 400-label slice where the two versions disagree on 40 labels, se is 1.6 points.

    With `prove_kept` the burden on earlier slices turns round: the candidate must show, with the same 95%
    confidence, that it loses at most `max_forgetting` (loss + Z se <= max_forgetting). A blend of the champion
    and a candidate that forgot (learner.blend) is judged so: it exists to stop the forgetting, and it is one of
    several versions looked at on the same slice.
    """
    needed = max(min_gain, Z * new.standard_error)
    # Accuracies are fractions of counts: compare with a tolerance, or 0.87 - 0.86 > 0.01 in floating point.
    if new.delta < needed - _EPS:
        return Decision(
            False,
            f"not better on experience {new.experience_id}: {new.candidate:.3f} vs champion {new.champion:.3f} "
            f"({_pts(new.delta, 2)}; needs {_pts(needed, 2)} on {new.n} held-out labels)",
        )
    for s in earlier:
        if prove_kept and -s.delta + Z * s.standard_error > max_forgetting + _EPS:
            return Decision(
                False,
                f"cannot show it keeps experience {s.experience_id}: {s.candidate:.3f} vs champion "
                f"{s.champion:.3f} ({_pts(s.delta)} ± {s.standard_error * 100:.1f}; the loss must stay within "
                f"{max_forgetting * 100:.1f} pts with 95% confidence)",
                better=True,
            )
        if -s.delta - Z * s.standard_error > max_forgetting + _EPS:
            return Decision(
                False,
                f"forgets experience {s.experience_id}: {s.candidate:.3f} vs champion {s.champion:.3f} "
                f"({_pts(s.delta)} ± {s.standard_error * 100:.1f}; at most -{max_forgetting * 100:.1f} pts "
                "beyond the noise allowed)",
                better=True,
            )
    worst = min((s.delta for s in earlier), default=0.0)
    return Decision(
        True,
        f"better on experience {new.experience_id}: {new.candidate:.3f} vs {new.champion:.3f} ({_pts(new.delta)}); "
        f"worst change on {len(earlier)} earlier slice(s) {_pts(worst)}",
        better=True,
    )


def _pts(delta: float, digits: int = 1) -> str:
    # Two digits where a gain is compared with what it needs: "+3.5 needs +3.5" would read as a pass.
    return f"{delta * 100:+.{digits}f} pts"
