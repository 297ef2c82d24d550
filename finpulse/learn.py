"""The learner service: labels from Kafka into DuckDB, experiences when a trigger fires, gated new versions.

One loop, one thread: poll `news.labels` -> store (dead-letter the invalid) -> commit; then, per task, form an
experience when enough labels wait (or the oldest is old enough, or `--now`), train a candidate from the
champion, gate it on every experience's held-out slice, and promote or reject it. Everything it decides is in
DuckDB before the next step, so a learner killed at any point restarts where it was: open experiences are
trained again, half-written versions are discarded, and the registry is reconciled with the CHAMPION files.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from finpulse.config import AppConfig
from learner.adapters import AdapterStore
from learner.experience import bootstrap_slices, split_holdout, trigger
from learner.gate import Decision, decide
from learner.labels import TASKS, Task
from learner.registry import Registry
from learner.trainer import Candidate, ExperienceSlices, train_candidate
from monitor.metrics import ModelVersionCollector
from storage import History
from storage.labels import Experience, LabelStore
from storage.models import ModelVersionStore
from stream.labels import LabelConsumer
from stream.updates import UpdatePublisher

log = logging.getLogger(__name__)

LEARNER_GROUP = "finpulse-learner"


@dataclass(frozen=True)
class Outcome:
    """What one training run decided."""

    task: str
    experience: int
    version: str
    promoted: bool
    reason: str
    candidate: Candidate


class LearnerMetrics:
    """The learner's own series, beside the registry's `finpulse_model_versions_total`."""

    def __init__(self, registry: CollectorRegistry, versions: ModelVersionStore) -> None:
        self.registry = registry
        self.labels = Counter(
            "finpulse_learner_labels", "Labels consumed from news.labels.", ["outcome"], registry=registry
        )
        self.pending = Gauge(
            "finpulse_learner_pending_labels", "Labels waiting for an experience.", ["task"], registry=registry
        )
        self.train_seconds = Histogram(
            "finpulse_learner_train_seconds",
            "Wall time of one candidate's training.",
            ["task"],
            buckets=(10, 30, 60, 120, 300, 600, 1200, 2400),
            registry=registry,
        )
        self.holdout = Gauge(
            "finpulse_learner_candidate_holdout_accuracy",
            "Held-out accuracy of the last candidate on its own experience.",
            ["task"],
            registry=registry,
        )
        registry.register(ModelVersionCollector(versions.event_counts, versions.champions))
        for outcome in ("stored", "dead_lettered"):
            self.labels.labels(outcome=outcome)
        for task in TASKS:
            self.pending.labels(task=task)
            self.train_seconds.labels(task=task)


class Learner:
    """Continual learning from analysts' labels, one experience at a time."""

    def __init__(
        self,
        config: AppConfig,
        bootstrap_servers: str,
        registry: CollectorRegistry | None = None,
        show_progress: bool = False,
        tasks: tuple[Task, ...] = TASKS,
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.show_progress = show_progress
        self.history = History(config.storage)
        self.history.ensure_schema()
        self.labels = LabelStore(self.history)
        self.versions = ModelVersionStore(self.history)
        self.adapters = AdapterStore(config.model.adapters_dir)
        kafka = config.kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
        self.publisher = UpdatePublisher(kafka)
        self.registry = Registry(self.adapters, self.versions, self.publisher.publish)
        self.metrics = LearnerMetrics(registry or CollectorRegistry(), self.versions)
        self.consumer = LabelConsumer(
            bootstrap_servers,
            config.kafka.topics,
            LEARNER_GROUP,
            self.labels,
            config.scorer.max_text_bytes,
        )
        self.outcomes: list[Outcome] = []

    def start(self) -> None:
        """Recover from whatever a previous run left: staging leftovers, registry drift, missing bootstrap."""
        removed = self.adapters.discard_staging()
        if removed:
            log.warning("event=discarded_staging paths=%s", [str(p) for p in removed])
        for change in self.registry.sync():
            log.warning("event=registry_repaired task=%s version=%s note=%s", change.task, change.version, change.note)
        for task in self.tasks:
            self._ensure_bootstrap(task)

    def _ensure_bootstrap(self, task: Task) -> None:
        # The shipped champion's own data is experience 0: its sample seeds the replay memory and its held-out
        # slice keeps every later candidate honest about the original domain.
        if self.labels.experiences(task):
            return
        cfg = self.config.learner
        memory, holdout = bootstrap_slices(task, cfg.replay_size, cfg.seed)
        if not memory or not holdout:
            log.warning(
                "event=no_bootstrap_data task=%s: earlier knowledge is guarded by labelled experiences only", task
            )
            return
        experience = self.labels.create_experience(task, memory, holdout)
        self.labels.mark_trained(experience.id, self.adapters.champion(task))

    def poll_labels(self, timeout_s: float) -> int:
        """Consume one batch of labels; return how many records were read."""
        batch = self.consumer.poll(timeout_s)
        self.metrics.labels.labels(outcome="stored").inc(batch.stored)
        self.metrics.labels.labels(outcome="dead_lettered").inc(batch.dead_lettered)
        return batch.consumed

    def step(self, now: bool = False) -> list[Outcome]:
        """Train every open experience, then form and train new ones whose trigger fired."""
        done: list[Outcome] = []
        for task in self.tasks:
            for experience in self.labels.experiences(task, status="open"):
                done.append(self._train(task, experience))
            self.metrics.pending.labels(task=task).set(self.labels.pending_count(task))
            formed = self._form(task, now)
            if formed is not None:
                done.append(self._train(task, formed))
                self.metrics.pending.labels(task=task).set(self.labels.pending_count(task))
        return done

    def _form(self, task: Task, now: bool) -> Experience | None:
        cfg = self.config.learner
        count = self.labels.pending_count(task)
        if count < cfg.min_labels:
            return None  # the common idle case: spare the second read of the file every poll
        fired = trigger(count, self.labels.oldest_pending(task), datetime.now(UTC), cfg, manual=now)
        if fired is None:
            return None
        rows = [(r.id, r.text, r.label(task) or "") for r in self.labels.pending(task)]
        existing = len(self.labels.experiences(task))
        train, holdout = split_holdout(rows, cfg.holdout_fraction, cfg.seed + existing)
        experience = self.labels.create_experience(task, train, holdout)
        log.info(
            "event=experience_formed task=%s experience=%d train=%d holdout=%d trigger=%s",
            task, experience.id, len(train), len(holdout), fired,
        )  # fmt: skip
        return experience

    def _train(self, task: Task, experience: Experience) -> Outcome:
        cfg = self.config.learner
        champion = self.adapters.champion(task)
        slices = self._slices(experience)
        earlier = [
            self._slices(e) for e in self.labels.experiences(task) if e.id != experience.id and e.status == "trained"
        ]
        seed_memory: list[tuple[str, str]] = []
        if earlier and earlier[0].id == self.labels.experiences(task)[0].id:
            seed_memory = [(t, y) for t, y in self.labels.examples(earlier[0].id, "train")]
        log.info("event=training task=%s experience=%d champion=%s", task, experience.id, champion)
        candidate = train_candidate(
            task,
            self.adapters,
            champion,
            slices,
            earlier,
            cfg,
            self.config.model,
            seed_memory=seed_memory,
            show_progress=self.show_progress,
        )
        self.metrics.train_seconds.labels(task=task).observe(candidate.train_s)
        self.metrics.holdout.labels(task=task).set(candidate.new.candidate)
        decision: Decision = decide(candidate.new, candidate.earlier, cfg.min_gain, cfg.max_forgetting)
        metrics = {**candidate.metrics, "gate": decision.reason}
        self.registry.add_candidate(task, candidate.version, champion, experience, metrics)
        if decision.promote:
            self.registry.promote(task, candidate.version, decision.reason)
        else:
            self.registry.reject(task, candidate.version, decision.reason)
        self.labels.mark_trained(experience.id, candidate.version)
        log.info(
            "event=%s task=%s version=%s reason=%r",
            "promoted" if decision.promote else "rejected", task, candidate.version, decision.reason,
        )  # fmt: skip
        outcome = Outcome(task, experience.id, candidate.version, decision.promote, decision.reason, candidate)
        self.outcomes.append(outcome)
        return outcome

    def _slices(self, experience: Experience) -> ExperienceSlices:
        return ExperienceSlices(
            experience.id,
            self.labels.examples(experience.id, "train"),
            self.labels.examples(experience.id, "holdout"),
        )

    def run(
        self,
        stop: threading.Event,
        *,
        now: bool = False,
        once: bool = False,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Consume labels and learn until `stop`; with `once`, drain the topic, learn once and return."""
        self.start()
        outcomes: list[Outcome] = []
        first = True
        while not stop.is_set():
            consumed = self.poll_labels(self.config.learner.poll_s)
            if once and consumed:
                continue  # drain what is there before deciding
            for outcome in self.step(now=now and first):
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
            first = False
            if once:
                break
        return outcomes

    def close(self) -> None:
        """Leave the consumer group and close the producer."""
        try:
            self.consumer.close()
        finally:
            self.publisher.close()
