"""Weight blending (learner.blend): the mix of champion and trained weights, the gate's fixed-order search, and a
blended candidate trained, saved and served for real."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from learner.adapters import AdapterStore
from learner.benchmark import FULL, sequence
from learner.blend import WeightBlend, search
from learner.config import ContinualConfig, ModelConfig
from learner.domains import DEFAULT_DOMAIN
from learner.experience import bootstrap_slices, split_holdout
from learner.gate import Decision, SliceScore, decide
from learner.labels import SENTIMENTS
from learner.model import Classifier
from learner.trainer import ExperienceSlices, train_candidate


def test_a_blend_sets_each_trainable_weight_between_the_champions_and_the_trained() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    params = dict(layer.named_parameters())
    start = WeightBlend.snapshot(params)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    trained = WeightBlend.snapshot(params)
    blend = WeightBlend(start, params)

    blend.apply(0.25)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), start[name] + 0.25 * (trained[name] - start[name]))
    blend.apply(0.0)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), start[name])
    blend.apply(1.0)  # back to the trained values exactly, after any other blend
    for name, p in params.items():
        assert torch.equal(p.detach(), trained[name])
    with pytest.raises(ValueError, match="between 0 and 1"):
        blend.apply(1.5)
    with pytest.raises(ValueError, match="no starting value"):
        WeightBlend({}, params)


# A candidate whose gain and forgetting both shrink as it is blended back: (gain, TFNS change) at each weight,
# on a 500-label new slice and a 1,000-label earlier slice (the bootstrap slice's size).
PATH = {1.0: (0.12, -0.05), 0.5: (0.07, -0.02), 0.25: (0.04, -0.002)}


def _judge(path: dict[float, tuple[float, float]], judged: list[float]) -> Callable[[float], Decision]:
    def judge(weight: float) -> Decision:
        judged.append(weight)
        gain, change = path[weight]
        # Paired counts as two mostly-agreeing versions have them: changes made of labels won and lost.
        new = SliceScore(1, 500, 0.60, 0.60 + gain, lost=10, gained=10 + round(gain * 500))
        earlier = SliceScore(0, 1000, 0.88, 0.88 + change, lost=round(-change * 1000) + 4, gained=4)
        # As the trainer judges: a blend must show it kept the earlier slice.
        return decide(new, [earlier], min_gain=0.01, max_forgetting=0.01, prove_kept=weight < 1.0)

    return judge


def test_a_blend_must_show_it_kept_the_earlier_slice_where_a_candidate_need_only_not_forget_it() -> None:
    # -0.5 points, 10 lost and 8 gained of 400: within the noise (se 1.1 points), but not shown within 1 point.
    earlier = SliceScore(0, 400, 0.88, 0.875, lost=10, gained=8)
    new = SliceScore(1, 500, 0.60, 0.70, lost=5, gained=55)
    assert decide(new, [earlier], 0.01, 0.01).promote
    shown = decide(new, [earlier], 0.01, 0.01, prove_kept=True)
    assert not shown.promote and shown.better and "cannot show it keeps experience 0" in shown.reason
    kept = SliceScore(0, 1000, 0.88, 0.879, lost=4, gained=3)
    assert decide(new, [kept], 0.01, 0.01, prove_kept=True).promote


def test_the_search_keeps_the_trained_candidate_when_the_gate_accepts_it() -> None:
    judged: list[float] = []
    weight, tries = search((0.5, 0.25), _judge({1.0: (0.12, -0.005)}, judged))
    assert weight == 1.0 and judged == [1.0] and tries[0].decision.promote


def test_the_search_blends_back_until_the_forgetting_is_within_the_allowance() -> None:
    judged: list[float] = []
    weight, tries = search((0.5, 0.25), _judge(PATH, judged))
    assert weight == 0.25 and judged == [1.0, 0.5, 0.25]
    assert [t.decision.promote for t in tries] == [False, False, True]
    assert all(t.forgets_only for t in tries[:2]) and "forgets experience 0" in tries[0].decision.reason
    # -2 points at 0.5: beyond the allowance with its noise, so not shown kept (the trained gate would not call
    # a loss within its noise forgetting).
    assert "cannot show it keeps experience 0" in tries[1].decision.reason


def test_the_search_stops_at_the_first_weight_that_is_not_better() -> None:
    # At 0.5 the gain is within the noise: 0.25 is never tried, and the candidate stays as trained (rejected).
    path = {**PATH, 0.5: (0.005, -0.02)}
    judged: list[float] = []
    weight, tries = search((0.5, 0.25), _judge(path, judged))
    assert weight == 1.0 and judged == [1.0, 0.5]
    assert (
        not any(t.decision.promote for t in tries)
        and "not better" in tries[1].decision.reason
        and not tries[1].forgets_only
    )


def test_a_candidate_that_is_not_better_is_never_blended() -> None:
    judged: list[float] = []
    weight, _ = search((0.5, 0.25), _judge({1.0: (0.0, -0.05)}, judged))
    assert weight == 1.0 and judged == [1.0]


def test_an_empty_search_judges_the_trained_candidate_alone() -> None:
    judged: list[float] = []
    weight, tries = search((), _judge(PATH, judged))
    assert weight == 1.0 and judged == [1.0] and len(tries) == 1 and not tries[0].decision.promote


@pytest.mark.parametrize(
    ("weights", "fragment"), [((0.5, 0.5), "must fall"), ((1.0,), "between 0 and 1"), ((0.0,), "between 0 and 1")]
)
def test_blend_weights_are_validated_with_the_fix(weights: tuple[float, ...], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ContinualConfig(blend_weights=weights)
    assert ContinualConfig(blend_weights=()).blend_weights == ()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_blended_candidate_is_saved_as_blended_and_scored_so_by_the_serving_engine(
    adapters_dir: Path, tmp_path: Path
) -> None:
    # Real parts: the shipped sentiment champion, the stock tweets (which label unlike TFNS, so the trained
    # candidate forgets TFNS), avalanche training, and the scorers' engine reading the saved adapter.
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir, root)
    store = AdapterStore(root)
    model_config = ModelConfig(adapters_dir=root)
    # A 2-point allowance: as trained, the candidate loses ~5 points of TFNS on the gate's slice (beyond it with
    # any noise); blended to 0.375 of its step it lost 0.9 +- 0.6 there, within it, while 14 points better on
    # its own slice (measured on `bench cl --from-champion`, whose stock-tweet experience this is).
    config = ContinualConfig(max_forgetting=0.02)
    memory, holdout0 = bootstrap_slices("sentiment", config.replay_size, config.seed)
    pairs = lambda rows: [(text, label) for _, text, label in rows]  # noqa: E731
    tweets = sequence(FULL)[2]
    assert tweets.name == "stock_tweets"
    rows = [(f"tweet-{i}", e.text, e.label) for i, e in enumerate(tweets.train)]
    train, holdout = split_holdout(rows, config.holdout_fraction, config.seed + 2)
    earlier = ExperienceSlices(0, pairs(memory), pairs(holdout0))

    candidate = train_candidate(
        "sentiment", store, "sentiment-v1", ExperienceSlices(2, pairs(train), pairs(holdout)), [earlier],
        config, model_config, seed_memory=pairs(memory),
    )  # fmt: skip

    blend = store.card("sentiment", candidate.version).metrics["blend"]
    first = blend["tried"][0]
    assert not first["promote"] and first["reason"].startswith("forgets experience 0"), first
    weights = [t["weight"] for t in blend["tried"]]
    assert weights == [1.0, *config.blend_weights][: len(weights)]
    assert candidate.decision is not None
    assert candidate.decision.promote == (blend["weight"] < 1.0) == blend["tried"][-1]["promote"]
    assert candidate.decision.promote and blend["weight"] < 1.0 and "blended back" in candidate.decision.reason
    # What was saved is the blend: the serving engine scores the TFNS slice as the gate did, not as trained.
    classifier = Classifier.from_store(model_config, "cpu")
    served = classifier.load(store, "sentiment", candidate.version, model_config)
    texts = [t for _, t, _ in holdout0]
    probs, _ = classifier.probabilities(classifier.encode(texts), served={"sentiment": {DEFAULT_DOMAIN: served}})
    predicted = [SENTIMENTS[i] for i in probs["sentiment"].argmax(-1).tolist()]
    accuracy = sum(p == y for p, (_, _, y) in zip(predicted, holdout0, strict=True)) / len(holdout0)
    trained_accuracy = float(first["reason"].split(": ")[1].split(" vs ")[0])
    assert abs(accuracy - candidate.earlier[0].candidate) <= 0.01
    assert accuracy - trained_accuracy >= 0.02  # the blend kept TFNS points the trained candidate had lost
