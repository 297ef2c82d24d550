"""The `model.updates` topic and hot swap: tell running scorers that a champion changed, and let them follow it.

A message on `model.updates` (key = task, UTF-8 JSON value) only means "look again": the CHAMPION file of the
task stays the source of truth, so a rollback, a message lost or one that arrives out of order cannot make a
scorer serve a version that is not the champion.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from learner.adapters import AdapterStore
from learner.domains import DEFAULT_DOMAIN
from learner.errors import ModelLoadError
from learner.tasks import Task, check_task, task_names, version_task
from stream.broker import LocalBroker
from stream.config import KafkaConfig
from stream.connection import Connection, Target, client_kwargs
from stream.errors import BrokerError, StreamError

if TYPE_CHECKING:
    # Only for annotations: importing learner.model pulls in torch, which a publisher does not need.
    from learner.model import Classifier, ServedModel

log = logging.getLogger(__name__)
# The domain label of a failure to read a task's CHAMPION files: it concerns every domain of the task.
POINTERS = "champion-files"

UpdateEvent = Literal["promoted", "rolled_back", "manual"]


class UpdateError(StreamError):
    """A `model.updates` message or a call to publish one does not follow the contract."""


class ModelUpdate(BaseModel):
    """One `model.updates` message: `version` became the champion of `task`."""

    # Unknown keys are ignored so that a newer publisher can add fields without breaking older scorers.
    model_config = ConfigDict(frozen=True, extra="ignore")

    task: Task
    version: str
    event: UpdateEvent
    previous: str | None
    at: AwareDatetime

    @field_validator("task")
    @classmethod
    def _registered(cls, value: str) -> str:
        return check_task(value)

    @field_validator("version", "previous")
    @classmethod
    def _version_of_the_task(cls, value: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("task")  # absent when the task itself was refused: that error is reported instead
        if value is not None and task is not None and version_task(value) != task:
            raise ValueError(f"{value!r} is not a {task} version; expected {task}-vN")
        return value


def update_value(task: str, version: str, event: str, previous: str | None, at: datetime | None = None) -> bytes:
    """Encode a `model.updates` value, refusing anything `parse_update` would refuse."""
    when = at if at is not None else datetime.now(UTC)
    payload: dict[str, Any] = {
        "task": task,
        "version": version,
        "event": event,
        "previous": previous,
        "at": when.isoformat(timespec="milliseconds"),
    }
    _validated(payload)
    return json.dumps(payload).encode("utf-8")


def parse_update(value: bytes | None) -> ModelUpdate:
    """Decode and validate one `model.updates` value; raise UpdateError, in one line, on anything else."""
    if value is None:
        raise UpdateError("model update has no value (tombstone); publish a JSON object with task and version")
    try:
        payload = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UpdateError(f"model update is not UTF-8: {e.reason} at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise UpdateError(f"model update is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(payload, dict):
        raise UpdateError(f"model update must be a JSON object, got {type(payload).__name__}")
    return _validated(payload)


def _validated(payload: dict[str, Any]) -> ModelUpdate:
    try:
        return ModelUpdate.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "value"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "required field is missing"
        raise UpdateError(f"model update field {field!r}: {message}") from e


def _bootstrap(config: KafkaConfig) -> Connection:
    """Return the cluster to use; an empty setting means the local broker, which must be running."""
    if config.bootstrap_servers:
        return config.connection()
    status = LocalBroker(config.data_dir).status()
    if not status.running or not status.bootstrap:
        raise BrokerError(
            "kafka.bootstrap_servers is empty and the local broker is not running: "
            "run `finpulse kafka start` or set kafka.bootstrap_servers"
        )
    return config.connection(status.bootstrap)


class UpdatePublisher:
    """Publish champion changes; `publish` is the callable the learner's registry is given."""

    def __init__(self, kafka_config: KafkaConfig, timeout_s: float = 30.0, connection: Target | None = None) -> None:
        """Connect to `connection`, by default the cluster `kafka_config` names."""
        self.topic = kafka_config.topics.updates
        self._timeout_s = timeout_s
        bootstrap = connection if connection is not None else _bootstrap(kafka_config)
        try:
            self._producer = KafkaProducer(
                **client_kwargs(bootstrap), acks="all", enable_idempotence=True, client_id="finpulse-updates"
            )
        except KafkaError as e:
            raise StreamError(f"cannot connect to Kafka at {bootstrap} to publish model updates: {e}") from e

    def publish(self, task: str, version: str, event: str, previous: str | None) -> None:
        """Send one update and wait until the broker has it (a promotion is rare; losing one is not)."""
        value = update_value(task, version, event, previous)
        try:
            future = self._producer.send(self.topic, key=task.encode("utf-8"), value=value)
            self._producer.flush(timeout=self._timeout_s)
            future.get(timeout=self._timeout_s)
        except KafkaError as e:
            raise StreamError(
                f"cannot publish {version} to {self.topic}: {e}; scorers still pick it up "
                "from the CHAMPION file within scorer.champion_check_s"
            ) from e
        log.info("event=model_update_published task=%s version=%s update_event=%s", task, version, event)

    def close(self) -> None:
        """Flush and disconnect."""
        self._producer.close(timeout=self._timeout_s)

    def __enter__(self) -> UpdatePublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class UpdateListener:
    """Read `model.updates` from the moment it is created, with no consumer group: every scorer sees every update."""

    def __init__(self, kafka_config: KafkaConfig, timeout_s: float = 10.0, connection: Target | None = None) -> None:
        """Connect to `connection`, by default the cluster `kafka_config` names."""
        self.topic = kafka_config.topics.updates
        bootstrap = connection if connection is not None else _bootstrap(kafka_config)
        try:
            self._consumer = KafkaConsumer(
                **client_kwargs(bootstrap),
                group_id=None,  # a group would share the updates out: each scorer must see all of them
                enable_auto_commit=False,
                client_id="finpulse-updates-listener",
            )
        except KafkaError as e:
            raise StreamError(f"cannot connect to Kafka at {bootstrap} to listen for model updates: {e}") from e
        try:
            partitions = self._partitions(bootstrap, timeout_s)
            self._consumer.assign(partitions)
            # Resolved now, not at the first poll: an update published between creation and the first poll
            # must be seen (the caller reads the CHAMPION files right after creating the listener).
            ends = self._consumer.end_offsets(partitions, timeout_ms=int(timeout_s * 1000))
            for tp in partitions:
                self._consumer.seek(tp, ends[tp])
        except KafkaError as e:
            self._consumer.close()
            raise StreamError(f"cannot find the end of {self.topic} on {bootstrap}: {e}") from e
        except StreamError:
            self._consumer.close()
            raise

    def _partitions(self, bootstrap: Target, timeout_s: float) -> list[TopicPartition]:
        # Metadata of a topic created a moment ago can lag behind: ask again until the deadline.
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._consumer.partitions_for_topic(self.topic)
            if found:
                return [TopicPartition(self.topic, p) for p in sorted(found)]
            if time.monotonic() >= deadline:
                raise StreamError(
                    f"topic {self.topic!r} does not exist on {bootstrap}: create it (finpulse does when it "
                    "starts the scorer) or fix kafka.topics.updates"
                )
            time.sleep(0.2)

    def poll(self) -> list[ModelUpdate]:
        """Return the updates that arrived since the last call, without waiting; junk is logged and skipped."""
        try:
            polled = self._consumer.poll(timeout_ms=0)
        except KafkaError as e:
            # The periodic CHAMPION check covers what a broker hiccup hides here.
            log.warning("event=model_updates_poll_failed error=%r", str(e))
            return []
        updates: list[ModelUpdate] = []
        for records in polled.values():
            for record in records:
                try:
                    updates.append(parse_update(record.value))
                except UpdateError as e:
                    log.warning(
                        "event=bad_model_update partition=%d offset=%d error=%r",
                        record.partition,
                        record.offset,
                        str(e),
                    )
        return updates

    def close(self) -> None:
        """Disconnect."""
        self._consumer.close()


class SwapMetrics:
    """Hot-swap metrics of one scorer, by task and domain; the default domain's exist from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.swaps = Counter(
            "finpulse_model_swaps",
            "Adapter versions swapped in while serving (or a domain's withdrawn, back to the default's), by task "
            "and domain.",
            ["task", "domain"],
            registry=registry,
        )
        self.failures = Counter(
            "finpulse_model_swap_failures",
            "Champion versions this scorer could not load (it kept serving the previous one), by task and domain "
            f"({POINTERS!r}: the CHAMPION files themselves could not be read).",
            ["task", "domain"],
            registry=registry,
        )

    def declare(self) -> None:
        """Export the counters at 0 for every task in the default domain, before the first swap."""
        for task in task_names():
            self.swaps.labels(task=task, domain=DEFAULT_DOMAIN)
            self.failures.labels(task=task, domain=DEFAULT_DOMAIN)


Fingerprint = tuple[tuple[str, int, int], ...]


def _fingerprint(directory: Path) -> Fingerprint:
    """Return name, size and mtime of the files of an adapter version: what changes when someone fixes it."""
    try:
        return tuple(
            sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file())
        )
    except OSError:
        return ()  # gone (or unreadable): the load fails with the reason


class ModelSwapper:
    """Keep a running classifier on the champion adapters: notice a change, load it aside, swap between batches.

    Only `between_batches` and `close` are called, both from the scorer's thread; loading runs on one
    background thread, so a batch never waits for a model to load.
    """

    def __init__(
        self,
        classifier: Classifier,
        store: AdapterStore,
        load: Callable[[Task, str], ServedModel],
        listener: UpdateListener | None,
        metrics: SwapMetrics,
        check_s: float,
    ) -> None:
        self.classifier = classifier
        self.store = store
        self.listener = listener
        self.metrics = metrics
        self.check_s = check_s
        self._load = load
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-model-load")
        # Each load remembers the files it started from: a failure is tied to those bytes, not to the name.
        self._loading: dict[tuple[Task, str, str], tuple[Future[ServedModel], Fingerprint]] = {}
        self._champion: dict[tuple[Task, str], str] = {}  # the last champion read, per task and domain
        # A version that failed is tried again only once its files change: the same bytes would fail again at
        # every check and every update message (the one announcing it often arrives after the first check).
        self._failed: dict[tuple[Task, str], tuple[str, Fingerprint]] = {}
        self._pointer_error: dict[Task, str] = {}
        # The first call reads every champion: the listener exists by then, so nothing falls in between.
        self._stale: set[Task] = set(task_names())
        self._next_check = time.monotonic() + check_s
        metrics.declare()

    def between_batches(self) -> bool:
        """Swap in what finished loading and start loading changed champions; return True if a model changed."""
        swapped = self._swap_loaded()
        if self.listener is not None:
            for update in self.listener.poll():
                log.info(
                    "event=model_update task=%s version=%s update_event=%s", update.task, update.version, update.event
                )
                self._stale.add(update.task)
        if self.check_s > 0 and time.monotonic() >= self._next_check:
            self._stale.update(task_names())
            self._next_check = time.monotonic() + self.check_s
        for task in sorted(self._stale):
            self._look(task)
        self._stale.clear()
        return swapped

    def close(self) -> None:
        """Stop listening; a load in progress finishes in the background and is dropped."""
        if self.listener is not None:
            self.listener.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _look(self, task: Task) -> None:
        try:
            champions = self.store.domain_champions(task)
        except ModelLoadError as e:
            # Logged and counted once per distinct problem: the periodic check would repeat it forever.
            if self._pointer_error.get(task) != str(e):
                self._pointer_error[task] = str(e)
                self.metrics.failures.labels(task=task, domain=POINTERS).inc()
                log.error("event=model_swap_failed task=%s error=%r", task, str(e))
            return
        self._pointer_error.pop(task, None)
        serving = self.classifier.domain_versions(task)
        for domain in sorted(set(serving) - set(champions)):
            # The domain's own champion was withdrawn: it is served the default domain's again.
            self._champion.pop((task, domain), None)
            dropped = self.classifier.drop(task, domain)
            self.metrics.swaps.labels(task=task, domain=domain).inc()
            log.info("event=model_swapped task=%s domain=%s version=default previous=%s", task, domain, dropped)
        for domain, champion in champions.items():
            self._champion[(task, domain)] = champion
            if champion == serving.get(domain) or (task, domain, champion) in self._loading:
                continue
            fingerprint = _fingerprint(self.store.version_dir(task, champion))
            if self._failed.get((task, domain)) == (champion, fingerprint):
                continue
            log.info(
                "event=model_load_started task=%s domain=%s version=%s serving=%s",
                task,
                domain,
                champion,
                serving.get(domain, "default"),
            )
            future = self._executor.submit(self._load, task, champion)
            self._loading[(task, domain, champion)] = (future, fingerprint)

    def _swap_loaded(self) -> bool:
        swapped = False
        for (task, domain, version), (future, fingerprint) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[(task, domain, version)]
            error = future.exception()
            if error is not None:
                self._failed[(task, domain)] = (version, fingerprint)
                self.metrics.failures.labels(task=task, domain=domain).inc()
                log.error(
                    "event=model_swap_failed task=%s domain=%s version=%s serving=%s error=%r",
                    task,
                    domain,
                    version,
                    self.classifier.domain_versions(task).get(domain, "default"),
                    f"{type(error).__name__}: {error}",
                )
                continue
            if self._champion.get((task, domain)) != version:
                # The champion moved on while this version loaded (say, a quick rollback): it must not serve.
                log.info("event=model_load_discarded task=%s domain=%s version=%s", task, domain, version)
                continue
            previous = self.classifier.swap(future.result(), domain)
            self.metrics.swaps.labels(task=task, domain=domain).inc()
            log.info("event=model_swapped task=%s domain=%s version=%s previous=%s", task, domain, version, previous)
            swapped = True
        return swapped
