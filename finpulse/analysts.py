"""The demo's analysts: label a slice of the stream, as a person would, and let the learner learn it.

The labels go to `news.labels` like any labelling tool's; the learner (the same one `finpulse learn` runs) forms
an experience of the stream's domain, trains a candidate from the champion on cached lower-layer features,
gates it on held-out labels of that domain and promotes it for that domain only. Scorers follow the promotion
through `model.updates`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console

from finpulse.config import AppConfig
from finpulse.labelling import send
from finpulse.learn import Learner, Outcome
from finpulse.replay import LabelledItem
from learner.tasks import SENTIMENT
from stream.connection import Target
from stream.labels import label_value
from stream.scorer import Scorer

LABELLER = "demo-analyst"


@dataclass(frozen=True)
class LearningOutcome:
    """What one labelling round of the demo produced."""

    domain: str
    labels_sent: int
    version: str | None
    promoted: bool
    reason: str
    train_s: float
    wall_s: float


def send_labels(config: AppConfig, bootstrap: Target, items: Sequence[LabelledItem]) -> int:
    """Send the sentiment labels of `items` to `news.labels`; return how many were acknowledged."""
    labelled_at = datetime.now(UTC).isoformat()
    values = [
        (
            li.item.id.encode("utf-8"),
            label_value(li.item.id, li.item.text, labelled_at, sentiment=li.sentiment, labeller=LABELLER),
        )
        for li in items
        if li.sentiment is not None
    ]
    return send(bootstrap, config.kafka.topics.labels, values)


def label_and_learn(
    config: AppConfig, bootstrap: Target, items: Sequence[LabelledItem], domain: str, group_id: str, console: Console
) -> LearningOutcome:
    """Label `items`, run one learning round of the sentiment task and return what it decided."""
    started = time.perf_counter()
    sent = send_labels(config, bootstrap, items)
    console.print(f"learning: {LABELLER} sent {sent} sentiment labels of domain {domain} to news.labels")
    learner = Learner(config, bootstrap, tasks=(SENTIMENT.name,), group_id=group_id, show_progress=console.is_terminal)
    outcomes: list[Outcome] = []
    try:
        console.print("learning: training a candidate on cached lower-layer features…")
        outcomes = learner.run(threading.Event(), now=True, once=True)
    finally:
        learner.close()
    wall_s = time.perf_counter() - started
    if not outcomes:
        return LearningOutcome(domain, sent, None, False, "no experience formed", 0.0, round(wall_s, 1))
    outcome = outcomes[-1]  # the learner saw only this round's labels: one experience, of this domain
    verdict = f"promoted for domain {domain}" if outcome.promoted else "rejected"
    console.print(
        f"learning: {outcome.version} trained in {outcome.candidate.train_s:.0f} s, {verdict}: {outcome.reason}",
        highlight=False,
    )
    return LearningOutcome(
        domain,
        sent,
        outcome.version,
        outcome.promoted,
        outcome.reason,
        round(outcome.candidate.train_s, 1),
        round(wall_s, 1),
    )


def await_swap(scorer: Scorer, domain: str, version: str, timeout_s: float = 120.0) -> bool:
    """Take the scorer's between-batch steps until it serves `version` to `domain`; return whether it does."""
    swapper = scorer.swapper
    if swapper is None:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        swapper.between_batches()
        if scorer.classifier.domain_versions(SENTIMENT.name).get(domain) == version:
            return True
        time.sleep(0.1)
    return False
