"""The learner's pure parts: the label contract, holdout splits, the gate, benchmark figures, the EWC state."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import torch
from torch import nn

from learner.benchmark import StrategyResult, markdown_table
from learner.config import ContinualConfig
from learner.continual import ewc_plugin_class
from learner.experience import split_holdout, trigger
from learner.gate import SliceScore, decide
from storage.labels import LabelRow
from stream.labels import label_value, parse_label
from stream.messages import Invalid, Reason

AT = "2026-11-30T09:00:00Z"


def test_a_valid_label_parses_with_utc_time_and_optional_fields() -> None:
    row = parse_label(label_value("n-1", "Oil slides", "2026-11-30T10:00:00+01:00", sentiment="negative"), 8192)
    assert isinstance(row, LabelRow)
    assert (row.id, row.sentiment, row.topic, row.labeller) == ("n-1", "negative", None, None)
    assert row.labelled_at == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    both = parse_label(label_value("n-2", "Fed holds", AT, sentiment="neutral", topic="Fed / Central Banks"), 8192)
    assert isinstance(both, LabelRow) and both.topic == "Fed / Central Banks"


@pytest.mark.parametrize(
    ("value", "reason", "fragment"),
    [
        (None, Reason.EMPTY, "no value"),
        (b"\xff\xfe", Reason.NOT_UTF8, "UTF-8"),
        (b"{nope", Reason.INVALID_JSON, "not JSON"),
        (b"[1]", Reason.NOT_OBJECT, "object"),
        (json.dumps({"text": "t", "labelled_at": AT, "sentiment": "neutral"}).encode(), Reason.MISSING_FIELD, "'id'"),
        (label_value("a", "t", AT), Reason.MISSING_FIELD, "'sentiment', 'topic' or both"),
        (label_value("a", "t", AT, sentiment="bearish"), Reason.UNKNOWN_LABEL, "'bearish'"),
        (label_value("a", "t", AT, topic="Crypto"), Reason.UNKNOWN_LABEL, "one of the 20 topics"),
        (label_value("a", "t", "yesterday", sentiment="neutral"), Reason.BAD_TIMESTAMP, "RFC 3339"),
        (label_value("a", "t", "2026-11-30T09:00:00", sentiment="neutral"), Reason.BAD_TIMESTAMP, "RFC 3339"),
        (label_value("a", "   ", AT, sentiment="neutral"), Reason.EMPTY, "'text'"),
        (label_value("a", "x" * 9000, AT, sentiment="neutral"), Reason.OVERSIZED, "9000 bytes"),
        (label_value("a", "t", AT, sentiment=3), Reason.WRONG_TYPE, "'sentiment' must be a string"),  # type: ignore[arg-type]
        (label_value("a", "t", AT, sentiment="neutral", labeller=["x"]), Reason.WRONG_TYPE, "'labeller'"),
    ],
)
def test_invalid_labels_say_why(value: bytes | None, reason: Reason, fragment: str) -> None:
    parsed = parse_label(value, 8192)
    assert isinstance(parsed, Invalid)
    assert parsed.reason == reason
    assert fragment in parsed.detail


def test_holdout_split_is_stratified_deterministic_and_order_free() -> None:
    rows = [(f"id-{i}", f"text {i}", ["negative", "neutral", "positive"][i % 3 if i < 90 else 1]) for i in range(120)]
    train, holdout = split_holdout(rows, 0.2, seed=5)
    assert len(train) + len(holdout) == 120 and not {r[0] for r in train} & {r[0] for r in holdout}
    assert Counter(r[2] for r in holdout) == {"negative": 6, "neutral": 12, "positive": 6}
    again = split_holdout(list(reversed(rows)), 0.2, seed=5)
    assert again == (train, holdout)
    assert split_holdout(rows, 0.2, seed=6) != (train, holdout)
    # A class with a single label trains; it cannot be both taught and judged.
    lone_train, lone_holdout = split_holdout(
        [("a", "t", "negative"), ("b", "u", "neutral"), ("c", "v", "neutral")], 0.5, 1
    )
    assert [r[0] for r in lone_train if r[2] == "negative"] == ["a"] and len(lone_holdout) == 1


def test_gate_promotes_a_clear_gain_that_keeps_earlier_slices() -> None:
    new = SliceScore(2, 400, champion=0.55, candidate=0.70)
    decision = decide(new, [SliceScore(1, 300, 0.88, 0.875)], min_gain=0.01, max_forgetting=0.01)
    assert decision.promote and "+15.0 pts" in decision.reason


def test_gate_rejects_forgetting_beyond_the_margin() -> None:
    # 24 labels lost, 6 gained of 300: -6 points, 1.8 points of paired noise: clearly beyond the 1-point allowance.
    earlier = SliceScore(1, 300, 0.88, 0.82, lost=24, gained=6)
    decision = decide(SliceScore(2, 400, 0.55, 0.70), [earlier], min_gain=0.01, max_forgetting=0.01)
    assert not decision.promote and "forgets experience 1" in decision.reason and "-6.0 pts" in decision.reason


def test_gate_promotes_a_clear_gain_whose_earlier_drop_is_within_the_noise() -> None:
    # The in-domain topic case: +6 points on the new slice, -1.5 on experience 0 (14 lost, 8 gained of 400):
    # the paired standard error is 1.2 points, so the drop is no evidence of forgetting beyond 1 point.
    earlier = SliceScore(0, 400, 0.88, 0.865, lost=14, gained=8)
    new = SliceScore(5, 60, 0.70, 0.767, lost=1, gained=5)
    decision = decide(new, [earlier], min_gain=0.01, max_forgetting=0.01)
    assert decision.promote, decision.reason


def test_paired_counts_tighten_the_bound_when_the_versions_mostly_agree() -> None:
    unpaired = SliceScore(1, 400, 0.80, 0.83)
    paired = SliceScore(1, 400, 0.80, 0.83, lost=2, gained=14)
    assert paired.standard_error < unpaired.standard_error / 2
    assert decide(paired, [], 0.01, 0.01).promote and not decide(unpaired, [], 0.01, 0.01).promote


def test_gate_rejects_a_gain_within_the_noise_of_a_small_slice() -> None:
    # +5 points on 40 labels is two examples: less than one standard error of the difference (~10 points).
    decision = decide(SliceScore(3, 40, 0.60, 0.65), [], min_gain=0.01, max_forgetting=0.01)
    assert not decision.promote and "not better" in decision.reason and "40 held-out labels" in decision.reason
    assert decide(SliceScore(3, 4000, 0.60, 0.65), [], min_gain=0.01, max_forgetting=0.01).promote


def test_benchmark_figures_follow_their_definitions() -> None:
    result = StrategyResult(
        matrices=[[[0.8, 0.3], [0.6, 0.7]], [[0.9, 0.2], [0.7, 0.8]]],
        train_s=[10.0, 12.0],
    )
    s = result.summary()
    assert s["avg_accuracy"] == pytest.approx((0.65 + 0.75) / 2)
    assert s["forgetting"] == pytest.approx(0.2)  # best earlier accuracy minus final, averaged
    assert s["bwt"] == pytest.approx(-0.2)
    assert s["matrix"] == [[0.85, 0.25], [0.65, 0.75]]
    table = markdown_table({"strategies": {"naive": s, "joint": s}})
    assert "| naive | 0.700 |" in table and "| joint | 0.700 | 0.050 | — | — |" in table


def test_ewc_state_covers_trainable_weights_only_and_round_trips() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    x = torch.arange(12, dtype=torch.long)
    features = torch.randn(12, 4)
    targets = torch.tensor([i % 3 for i in range(12)])

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return self.inner(features[index])  # type: ignore[no-any-return]

    from learner.continual import tensor_dataset

    lookup = Lookup()
    plugin = ewc_plugin_class()(ewc_lambda=10.0, decay_factor=0.5)
    plugin.consolidate(lookup, tensor_dataset(x, targets.tolist()), torch.device("cpu"), 4)
    assert set(plugin.fisher) == {"inner.1.weight", "inner.1.bias"}  # the frozen layer has no importance
    assert all(float(f.sum()) > 0 for f in plugin.fisher.values())
    restored = ewc_plugin_class()(ewc_lambda=10.0, decay_factor=0.5)
    restored.load(plugin.state(), torch.device("cpu"))
    assert restored.experiences_seen == 1
    assert all(torch.equal(restored.fisher[k], plugin.fisher[k]) for k in plugin.fisher)
    assert all(torch.equal(restored.anchors[k], plugin.anchors[k]) for k in plugin.anchors)
    # Online EWC: the next consolidation keeps decay x the old importance.
    old = {k: v.clone() for k, v in plugin.fisher.items()}
    plugin.consolidate(lookup, tensor_dataset(x, targets.tolist()), torch.device("cpu"), 4)
    for k in old:
        assert torch.allclose(plugin.fisher[k], 0.5 * old[k] + old[k])


def test_training_stops_at_the_time_budget_and_counts_its_steps() -> None:
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.templates import SupervisedTemplate

    from learner.continual import experience_of, progress_plugin, tensor_dataset

    features = torch.randn(40, 4)

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return self.linear(features[index])  # type: ignore[no-any-return]

    def train(budget_s: float | None) -> tuple[int, bool]:
        model = Lookup()
        bar = progress_plugin(30, "test", budget_s, show=False)
        template = SupervisedTemplate(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_mb_size=4,
            train_epochs=3,
            plugins=[bar],
            evaluator=EvaluationPlugin(),
        )
        data = tensor_dataset(torch.arange(40), [i % 3 for i in range(40)])
        template.train(experience_of(data, 0), eval_streams=[])
        return bar.steps, bar.out_of_time

    assert train(None) == (30, False)  # 3 epochs of 10 steps
    assert train(0.0) == (1, True)  # the budget is checked after every step; the remaining epochs are skipped


def test_the_trigger_fires_on_count_on_age_and_on_demand_but_never_below_the_minimum() -> None:
    cfg = ContinualConfig(trigger_labels=200, trigger_interval_s=3600, min_labels=50)
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    fresh, stale = at - timedelta(minutes=5), at - timedelta(hours=1, seconds=1)
    assert trigger(200, fresh, at, cfg) == "count"
    assert trigger(199, fresh, at, cfg) is None
    assert trigger(60, stale, at, cfg) == "age"
    assert trigger(60, at - timedelta(seconds=3599), at, cfg) is None
    assert trigger(60, fresh, at, cfg, manual=True) == "now"
    # Too few labels for a held-out slice that means anything: not even --now or an old label forms one.
    assert trigger(49, stale, at, cfg, manual=True) is None
    # An interval of 0 switches the time trigger off.
    assert trigger(60, stale, at, cfg.model_copy(update={"trigger_interval_s": 0})) is None
