"""The learner service: labels from Kafka into DuckDB, experiences when a trigger fires, gated new versions.

Two threads. The caller's thread owns the consumer: poll `news.labels` -> store (dead-letter the invalid) -> commit,
over and over, also while a candidate trains, so a training of any length never costs the group membership
(kafka-python drops a member that does not poll for `max.poll.interval.ms`, and the group rebalances). A worker
runs one learning step at a time: per task, form an experience when enough labels wait (or the oldest is old
enough, or `--now`), train a candidate from the champion, gate it on every experience's held-out slice, and
promote or reject it. Labels that arrive meanwhile are stored and committed as usual and wait for the next
experience; an experience takes only the labels it read, so none is lost between the two threads. They share
the DuckDB file (one session at a time per process) and the metrics, nothing else.

Everything it decides is in DuckDB before the next step, so a learner killed at any point restarts where it
was: open experiences are trained again, half-written versions are discarded, and the registry is reconciled
with the CHAMPION files. A step that raises is logged and retried the same way, after a backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from finpulse.config import AppConfig
from learner.adapters import AdapterStore
from learner.config import ContinualConfig, ModelConfig
from learner.domains import DomainTable
from learner.experience import bootstrap_slices, split_holdout, trigger
from learner.gate import Decision, decide
from learner.registry import Registry
from learner.tasks import Task, task_names
from learner.trainer import Candidate, ExperienceSlices, train_candidate
from monitor.metrics import ModelVersionCollector
from storage import History
from storage.labels import Experience, LabelRow, LabelStore
from storage.models import ModelVersionStore
from stream.connection import Target
from stream.labels import DEFAULT_MAX_POLL_INTERVAL_MS, LabelConsumer
from stream.updates import UpdatePublisher

log = logging.getLogger(__name__)

LEARNER_GROUP = "finpulse-learner"
# The longest wait between two tries of a failing task (`learner.retry_s` doubles up to it): a training that
# fails for good costs one log line an hour, and a cause that goes away (a disk freed) is noticed within one.
MAX_RETRY_S: Final = 3600.0


class TrainFn(Protocol):
    """How a candidate is trained: `learner.trainer.train_candidate`, or a stand-in in tests."""

    def __call__(
        self,
        task: Task,
        adapters: AdapterStore,
        champion: str,
        new: ExperienceSlices,
        earlier: Sequence[ExperienceSlices],
        config: ContinualConfig,
        model_config: ModelConfig,
        seed_memory: Sequence[tuple[str, str]] = (),
        show_progress: bool = False,
    ) -> Candidate: ...


@dataclass
class _Retry:
    """One task's failed steps in a row and when it may try again (monotonic seconds); the worker's alone."""

    failures: int = 0
    at: float = 0.0


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
        registry.register(ModelVersionCollector(versions.event_counts_by_domain, versions.champions_by_domain))
        for outcome in ("stored", "dead_lettered"):
            self.labels.labels(outcome=outcome)
        for task in task_names():
            self.pending.labels(task=task)
            self.train_seconds.labels(task=task)


class Learner:
    """Continual learning from analysts' labels, one experience at a time."""

    def __init__(
        self,
        config: AppConfig,
        bootstrap_servers: Target,
        registry: CollectorRegistry | None = None,
        show_progress: bool = False,
        tasks: tuple[Task, ...] | None = None,
        group_id: str = LEARNER_GROUP,
        max_poll_interval_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS,
        train: TrainFn = train_candidate,
    ) -> None:
        """Open the stores and join `group_id`; `train` makes a candidate (the real trainer unless a test's)."""
        self.config = config
        self.tasks = tasks if tasks is not None else task_names()
        self.show_progress = show_progress
        self.group_id = group_id
        self.max_poll_interval_ms = max_poll_interval_ms
        self.train = train
        self.history = History(config.storage)
        self.history.ensure_schema()
        self.labels = LabelStore(self.history)
        self.versions = ModelVersionStore(self.history)
        self.adapters = AdapterStore(config.model.adapters_dir)
        self.domains = DomainTable(config.model.domains)
        self.publisher = UpdatePublisher(config.kafka, connection=bootstrap_servers)
        self.registry = Registry(self.adapters, self.versions, self.publisher.publish)
        self.metrics = LearnerMetrics(registry or CollectorRegistry(), self.versions)
        self.consumer = LabelConsumer(
            bootstrap_servers,
            config.kafka.topics,
            group_id,
            self.labels,
            config.scorer.max_text_bytes,
            max_poll_interval_ms=max_poll_interval_ms,
        )
        self.outcomes: list[Outcome] = []
        # One worker, one step in flight at most; the lock also keeps a direct `step()` call from overlapping it.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-learner-train")
        self._stepping = threading.RLock()
        self._retries = {task: _Retry() for task in self.tasks}

    def start(self) -> None:
        """Recover from whatever a previous run left: staging leftovers, registry drift, missing bootstrap."""
        with self._stepping:
            self._recover()
            for task in self.tasks:
                self._ensure_bootstrap(task)

    def _recover(self) -> None:
        # Called under `_stepping`, the only place versions are staged from: whatever staging is left is dead.
        removed = self.adapters.discard_staging()
        if removed:
            log.warning("event=discarded_staging paths=%s", [str(p) for p in removed])
        for change in self.registry.sync():
            log.warning("event=registry_repaired task=%s version=%s note=%s", change.task, change.version, change.note)

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
            done.extend(self._step_task(task, now))
        return done

    def _step_task(self, task: Task, now: bool) -> list[Outcome]:
        done: list[Outcome] = []
        with self._stepping:
            for experience in self.labels.experiences(task, status="open"):
                done.append(self._train(task, experience))
            self.metrics.pending.labels(task=task).set(self.labels.pending_count(task))
            for formed in self._form(task, now):
                done.append(self._train(task, formed))
                self.metrics.pending.labels(task=task).set(self.labels.pending_count(task))
        return done

    def _step_contained(self, now: bool = False) -> list[Outcome]:
        """Run `step` task by task; a task whose step raises is logged and tried again after a backoff."""
        done: list[Outcome] = []
        for task in self.tasks:
            retry = self._retries[task]
            if time.monotonic() < retry.at:
                continue
            try:
                with self._stepping:
                    if retry.failures:
                        self._recover()  # what a restart would do first: the failed try may have left either
                    done.extend(self._step_task(task, now))
            except Exception as e:  # contained: logged with its traceback, retried later, never a crash loop
                retry.failures += 1
                delay = min(self.config.learner.retry_s * 2 ** (retry.failures - 1), MAX_RETRY_S)
                retry.at = time.monotonic() + delay
                log.error(
                    "event=training_failed task=%s failures=%d error_type=%s error=%r retry_in_s=%.1f",
                    task, retry.failures, type(e).__name__, str(e), delay, exc_info=e,
                )  # fmt: skip
                continue
            if retry.failures:
                log.warning("event=training_recovered task=%s failures=%d", task, retry.failures)
                self._retries[task] = _Retry()
        return done

    def _form(self, task: Task, now: bool) -> list[Experience]:
        """Form an experience of each domain whose waiting labels fired the trigger."""
        cfg = self.config.learner
        count = self.labels.pending_count(task)
        if count < cfg.min_labels:
            return []  # the common idle case: spare the second read of the file every poll
        by_domain: dict[str, list[LabelRow]] = {}
        rows = self.labels.pending(task)
        for row, domain in zip(rows, self._domains(rows), strict=True):
            by_domain.setdefault(domain, []).append(row)
        formed: list[Experience] = []
        for domain, group in sorted(by_domain.items()):
            if len(group) < cfg.min_labels:
                continue
            oldest = min(r.labelled_at for r in group)
            fired = trigger(len(group), oldest, datetime.now(UTC), cfg, manual=now)
            if fired is None:
                continue
            pairs = [(r.id, r.text, r.label(task) or "") for r in group]
            existing = len(self.labels.experiences(task))
            train, holdout = split_holdout(pairs, cfg.holdout_fraction, cfg.seed + existing)
            experience = self.labels.create_experience(task, train, holdout, domain=domain)
            log.info(
                "event=experience_formed task=%s domain=%s experience=%d train=%d holdout=%d trigger=%s",
                task, domain, experience.id, len(train), len(holdout), fired,
            )  # fmt: skip
            formed.append(experience)
        return formed

    def _domains(self, rows: Sequence[LabelRow]) -> list[str]:
        """Return the domain of each label: the one it names, else that of the news it labels (by its source)."""
        unnamed = [r.id for r in rows if not r.domain]
        sources = {news.id: news.source for news in self.history.fetch(unnamed)} if unnamed else {}
        return [r.domain or self.domains.domain_of(sources.get(r.id)) for r in rows]

    def _train(self, task: Task, experience: Experience) -> Outcome:
        cfg = self.config.learner
        domain = experience.domain
        # A domain without its own champion is served the default one: its first candidate starts from it.
        champion = self.adapters.domain_champions(task).get(domain) or self.adapters.champion(task)
        slices = self._slices(experience)
        # Only this domain's earlier experiences judge it: promoting for a domain changes no other domain.
        earlier = [
            self._slices(e)
            for e in self.labels.experiences(task)
            if e.id != experience.id and e.status == "trained" and e.domain == domain
        ]
        seed_memory: list[tuple[str, str]] = []
        if earlier and earlier[0].id == self.labels.experiences(task)[0].id:
            seed_memory = [(t, y) for t, y in self.labels.examples(earlier[0].id, "train")]
        log.info("event=training task=%s domain=%s experience=%d champion=%s", task, domain, experience.id, champion)
        candidate = self.train(
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
        decision: Decision = candidate.decision or decide(
            candidate.new, candidate.earlier, cfg.min_gain, cfg.max_forgetting
        )
        metrics = {**candidate.metrics, "gate": decision.reason}
        self.registry.add_candidate(task, candidate.version, champion, experience, metrics)
        if decision.promote:
            self.registry.promote(task, candidate.version, decision.reason, domain=domain)
        else:
            self.registry.reject(task, candidate.version, decision.reason)
        self.labels.mark_trained(experience.id, candidate.version)
        log.info(
            "event=%s task=%s domain=%s version=%s reason=%r",
            "promoted" if decision.promote else "rejected", task, domain, candidate.version, decision.reason,
        )  # fmt: skip
        outcome = Outcome(task, experience.id, candidate.version, decision.promote, decision.reason, candidate)
        self.outcomes.append(outcome)
        return outcome

    def _slices(self, experience: Experience) -> ExperienceSlices:
        return ExperienceSlices(
            experience.id,
            self.labels.examples(experience.id, "train"),
            self.labels.examples(experience.id, "holdout"),
            experience.domain,
        )

    def run(
        self,
        stop: threading.Event,
        *,
        now: bool = False,
        once: bool = False,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Consume labels and learn until `stop`; with `once`, drain the topic, learn once and return.

        This thread polls all along; the steps run on the worker, one at a time, and `on_outcome` is called here.
        A step still running when `stop` is set is finished (polling goes on) before this returns. With `once`,
        an exception of the step is raised here, and a batch of labels that cannot be stored is retried until it
        is (or `stop`); without `once`, a failed step is logged and its task retried after `learner.retry_s`.
        """
        self.start()
        outcomes: list[Outcome] = []
        first = True
        running: Future[list[Outcome]] | None = None
        seen = len(self.outcomes)
        while running is not None or not stop.is_set():
            consumed = self.poll_labels(self.config.learner.poll_s)
            if running is not None:
                if not running.done():
                    continue  # the poll above kept this member in its group
                error, running = running.exception(), None
                # Read from the record, not the result: a step that raised may have decided some already.
                for outcome in self.outcomes[seen:]:
                    outcomes.append(outcome)
                    if on_outcome is not None:
                        on_outcome(outcome)
                seen = len(self.outcomes)
                if error is not None:
                    raise error
                if once:
                    break
            if stop.is_set():
                break
            if once and (consumed or self.consumer.retrying):
                continue  # drain what is there before deciding
            running = self._worker.submit(self.step if once else self._step_contained, now and first)
            first = False
        return outcomes

    def close(self) -> None:
        """Leave the consumer group, wait for a step in progress to end, then close the producer.

        A training cannot be interrupted; one that a kill cuts short instead is trained again at the next start.
        """
        try:
            self.consumer.close()
        finally:
            try:
                self._worker.shutdown(wait=True, cancel_futures=True)
            finally:
                self.publisher.close()  # last: a promotion announces itself on model.updates
