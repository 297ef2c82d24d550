"""`finpulse bench faults`: what the scorers, the broker and the learner do when things go wrong, measured.

Real parts throughout: scorer processes started with the CLI's `score` command (as the end-to-end tests start
them), a Kafka broker of the benchmark's own in a temp dir (or the configured cluster, on loopback only), a
fresh DuckDB history, and `finpulse learn`. The scenarios run one after another, each on its own topics and
consumer group, so that a partition stalled by one cannot stall the next:

1. bad input: two scorers in one group; every case of `finpulse.badinput` interleaved with valid messages.
2. kill failover: a steady stream and two scorers; one is SIGKILLed `kills` times, a replacement started
   after each once the failover is measured, and the group let settle before the next kill.
3. broker restart: the broker is stopped for `outage_s` while the stream keeps producing into its buffer,
   then started again on the same port, under the same two scorers.
4. learner kills: `finpulse learn` SIGKILLed mid-training, then left to finish.

The figures:

- the outcome of each catalogue kind: `dead_letter` when a `news.dlq` record names the produced record's
  topic, partition and offset; `scored` when a history row carries them; `both` or `none` otherwise.
  `bad_input_kinds` counts the kinds expected dead-lettered, `dead_lettered` and `scored` count kinds by
  outcome, `mismatched` lists the kinds whose outcome is not the expected one.
- `crashes`: scorer processes that exited without the benchmark killing or stopping them; each is restarted
  so the run goes on.
- `kill_failover_s`: per kill, the time from the SIGKILL until every partition has a committed offset beyond
  the end offset it had at the kill: a record produced after the kill has been scored and committed on every
  partition, the killed scorer's included. The median over kills; a kill that timed out counts as slower
  than every other (the median is null when those are half or more).
- `broker_restart_recovery_s`: the time from the restarted broker answering until every partition's committed
  offset is past every record whose send began before that moment (everything produced during the outage).
- `lost`: ids of the valid stream that the broker acknowledged and that have no history row at the end;
  `duplicated_rows`: history rows minus distinct ids.
- `registry_consistent`: after the kills and a final learner run, DuckDB's champion of every task is the one
  its CHAMPION file names, every version directory is registered, `Registry.sync` has nothing to repair, no
  staging directory or temporary CHAMPION file is left, no experience is still open and every label is stored.

Every wait has a deadline; one that passes it leaves its figure null and its name in `timeouts`. Every process
the benchmark starts is stopped when it ends, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from finpulse.badinput import Case, cases, valid_message
from finpulse.config import AppConfig
from finpulse.errors import FinpulseError
from learner.tasks import SENTIMENT
from stream.admin import ensure_topics
from stream.broker import LocalBroker
from stream.config import TopicNames
from stream.errors import BrokerError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

LOOPBACK = ("127.", "localhost", "::1", "[::1]")
# A crashed scorer is restarted after this pause: its model load (~10 s) is the real back-off, this only keeps
# a process that dies at once from being restarted in a tight loop.
RESTART_DELAY_S = 2.0
POLL_S = 0.25  # how often a wait re-reads offsets: the resolution of every time figure
STREAM_ATTEMPTS = 5  # sends of one valid message before it counts as not produced
# Where `finpulse learn -v` says it began training a candidate; the kills are timed from that line.
TRAINING_MARKER = "event=training task="
# Seconds after the marker at which the learner is SIGKILLed, one per kill: early in the feature-bank pass,
# halfway, and in the optimiser steps (the whole candidate takes ~60-120 s here with LEARNER_SETTINGS).
LEARNER_KILL_DELAYS_S = (3.0, 12.0, 30.0)
# A small learner: a short replay memory, one epoch and a time budget keep one candidate to about a minute
# on a busy 2-core CPU; the 1,000 held-out tweets of the shipped champion are the fixed part of that minute.
LEARNER_SETTINGS = {
    "learner.replay_size": 64,
    "learner.epochs": 1,
    "learner.trainable_layers": 1,
    "learner.time_budget_s": 15,
}


class FaultsError(FinpulseError):
    """The fault benchmark cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class FaultSettings:
    """The size of one run: the defaults are the benchmark's, `quick()` the smoke test's."""

    kills: int = 5
    valid_per_case: int = 2  # valid messages produced before each catalogue case
    bad_rate: float = 60.0  # messages per second of the bad-input stream
    # Messages per second while scorers are killed and the broker restarts: well within what two scorers
    # handle on a shared 2-core CPU (~20-50/s each there), so a backlog is the fault's doing, not the rate's.
    steady_rate: float = 20.0
    outage_s: float = 20.0
    learner_kills: int = 3  # 0: no learner scenario
    labels: int = 300
    # A scorer loads its model in ~10 s on an idle 2-core CPU and several times that on a busy one.
    join_timeout_s: float = 240.0
    drain_timeout_s: float = 240.0
    failover_timeout_s: float = 120.0  # kafka-python's default session timeout alone is 45 s
    recovery_timeout_s: float = 240.0
    learner_timeout_s: float = 600.0
    quick: bool = False  # the smoke test's size (reported, so a quick run is never read as a full one)

    def __post_init__(self) -> None:
        if self.kills < 1:
            raise ValueError(f"kills must be at least 1, got {self.kills}")
        if not 0 <= self.learner_kills <= len(LEARNER_KILL_DELAYS_S):
            raise ValueError(f"learner_kills must be 0..{len(LEARNER_KILL_DELAYS_S)}, got {self.learner_kills}")
        if self.bad_rate <= 0 or self.steady_rate <= 0:
            raise ValueError("bad_rate and steady_rate must be positive messages per second")

    @classmethod
    def of(cls, kills: int | None = None, quick: bool = False) -> FaultSettings:
        """Return the benchmark's size, or with `quick` the smoke test's: one valid message per case, 2 kills,
        a 10 s outage, no learner; `kills` overrides the number of kills of either."""
        if not quick:
            return cls() if kills is None else cls(kills=kills)
        return cls(kills=kills or 2, valid_per_case=1, steady_rate=15.0, outage_s=10.0, learner_kills=0, quick=True)


class Reporter:
    """Progress of a run as `event=... key=value` lines: on the console for a terminal, else as log lines."""

    def __init__(self, console: Console | None = None, to_stderr: bool = False) -> None:
        """Print to `console` when stderr is a terminal; else log, through a stderr handler if `to_stderr`."""
        self._console = console if console is not None and sys.stderr.isatty() else None
        if self._console is None and to_stderr and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False  # the CLI's root handler would print the line a second time

    def __call__(self, event: str, **fields: object) -> None:
        """Report one event."""
        text = " ".join([f"event={event}", *(f"{key}={_shown(value)}" for key, value in fields.items())])
        if self._console is not None:
            self._console.print(f"faults: {text}", highlight=False, soft_wrap=True)
        else:
            log.info("%s", text)


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, str) and (not value or any(c in value for c in ' ="')):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# -- waiting -------------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = POLL_S) -> float | None:
    """Return the monotonic time at which `condition()` first held, or None once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def _answered(ask: Callable[[], T | None], timeout_s: float = 60.0) -> T | None:
    """Ask until there is an answer (the cluster may be restarting), at most `timeout_s`."""
    found: list[T] = []

    def got() -> bool:
        answer = ask()
        if answer is not None:
            found.append(answer)
        return answer is not None

    return found[0] if wait_until(got, timeout_s) is not None else None


def past(committed: dict[int, int] | None, targets: dict[int, int]) -> bool:
    """Return True when every partition's committed offset is beyond its target offset.

    >>> past({0: 5, 1: 9}, {0: 4, 1: 8}), past({0: 5, 1: 8}, {0: 4, 1: 8}), past(None, {0: 1})
    (True, False, False)
    """
    return committed is not None and all(committed.get(p, 0) > offset for p, offset in targets.items())


def reached(committed: dict[int, int] | None, targets: dict[int, int]) -> bool:
    """Return True when every partition's committed offset is at least its target offset."""
    return committed is not None and all(committed.get(p, 0) >= offset for p, offset in targets.items())


# -- the cluster, seen from outside --------------------------------------------------------------------------------


class Observer:
    """End offsets, committed offsets and group state, read with an admin client; None while nobody answers."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self._bootstrap = bootstrap
        self._partitions = partitions
        self._admin: KafkaAdminClient | None = None

    def _ask(self, what: str, question: Callable[[KafkaAdminClient], T]) -> T | None:
        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self._bootstrap,
                    client_id="finpulse-faults-observer",
                    bootstrap_timeout_ms=3000,
                    request_timeout_ms=5000,
                    # Seconds, not kafka-python's 30 s: the figures time the cluster, not this client.
                    reconnect_backoff_max_ms=1000,
                )
            return question(self._admin)
        except (KafkaError, OSError) as e:
            # Unanswered is an answer here: the broker may be down on purpose. A fresh client asks next time.
            log.debug("event=observer_unanswered what=%s error=%r", what, str(e))
            self.close()
            return None

    def _tps(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(self._partitions)]

    def ends(self, topic: str) -> dict[int, int] | None:
        """Return each partition's end offset (the next offset to be written)."""
        specs = {tp: OffsetSpec.LATEST for tp in self._tps(topic)}
        found = self._ask("ends", lambda a: a.list_partition_offsets(specs))
        return None if found is None else {tp.partition: int(o.offset) for tp, o in found.items()}

    def committed(self, group: str, topic: str) -> dict[int, int] | None:
        """Return each partition's committed offset in `group` (0 where nothing is committed yet)."""
        found = self._ask("committed", lambda a: a.list_group_offsets({group: self._tps(topic)}))
        if found is None:
            return None
        offsets = found.get(group, {})
        return {tp.partition: max(0, int(offsets[tp].offset)) if tp in offsets else 0 for tp in self._tps(topic)}

    def members(self, group: str) -> int | None:
        """Return how many members a Stable group has; 0 while it rebalances or is empty."""
        found = self._ask("group", lambda a: a.describe_groups([group]))
        if found is None:
            return None
        described = found.get(group) or {}
        if described.get("group_state") != "Stable":
            return 0
        return len(described.get("members") or [])

    def close(self) -> None:
        """Close the admin client (a new one is made on the next question)."""
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(KafkaError, OSError):
                admin.close()


# -- processes -----------------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One scorer process of a pool."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    stopping: bool = False  # the benchmark killed it or is stopping it: its exit is not a crash


@dataclass(frozen=True)
class Crash:
    """A scorer process that exited by itself."""

    scenario: str
    member: str
    returncode: int
    lived_s: float
    reason: str


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b|finpulse \w+: error:).*")


def crash_reason(log_path: Path, returncode: int) -> str:
    """Return the last exception or error line of a process log, else the exit code."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 16_384))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        tail = ""
    lines = [line.strip() for line in tail.splitlines() if _EXCEPTION_LINE.match(line.strip())]
    if lines:
        return lines[-1][:200]
    return f"exit code {returncode}" if returncode >= 0 else f"signal {-returncode}"


class ScorerPool:
    """The scorer processes of one consumer group: started, SIGKILLed on purpose, restarted after crashes."""

    def __init__(self, scenario: str, command: Sequence[str], env: dict[str, str], logs: Path, report: Reporter):
        self.scenario = scenario
        self.crashes: list[Crash] = []
        self._command = list(command)
        self._env = env
        self._logs = logs
        self._report = report
        self._lock = threading.Lock()
        self._members: list[Member] = []
        self._restarts: list[float] = []  # monotonic times at which a crashed member is replaced
        self._serial = 0
        self._closed = False
        self._watchdog = threading.Thread(target=self._watch, name=f"faults-{scenario}-watchdog", daemon=True)
        self._watchdog.start()

    def spawn(self) -> Member:
        """Start one more scorer process."""
        with self._lock:
            if self._closed:
                raise FaultsError(f"the {self.scenario} scorers are stopped already")
            return self._spawn_locked()

    def _spawn_locked(self) -> Member:
        self._serial += 1
        name = f"{self.scenario}-{self._serial}"
        path = self._logs / f"scorer-{name}.log"
        with path.open("wb") as out:
            process = subprocess.Popen(
                self._command,
                cwd=Path.cwd(),
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        member = Member(name, process, path, time.monotonic())
        self._members.append(member)
        self._report("scorer_started", scenario=self.scenario, member=name, pid=process.pid)
        return member

    def oldest(self) -> Member | None:
        """Return the longest-running live member."""
        with self._lock:
            alive = [m for m in self._members if not m.stopping and m.process.poll() is None]
            return min(alive, key=lambda m: m.started_at) if alive else None

    def kill(self, member: Member) -> None:
        """SIGKILL a member (no crash: the benchmark did it) and reap it."""
        with self._lock:
            member.stopping = True
        with contextlib.suppress(ProcessLookupError):
            member.process.send_signal(signal.SIGKILL)
        member.process.wait(timeout=30)
        with self._lock, contextlib.suppress(ValueError):
            self._members.remove(member)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                for member in list(self._members):
                    code = member.process.poll()
                    if code is None or member.stopping:
                        continue
                    self._members.remove(member)
                    crash = Crash(
                        self.scenario, member.name, code, now - member.started_at, crash_reason(member.log_path, code)
                    )
                    self.crashes.append(crash)
                    self._restarts.append(now + RESTART_DELAY_S)
                    self._report("scorer_crashed", **{k: v for k, v in asdict(crash).items() if k != "scenario"})
                for due in [t for t in self._restarts if t <= now]:
                    self._restarts.remove(due)
                    try:
                        self._spawn_locked()
                    except OSError as e:
                        self._report("scorer_restart_failed", scenario=self.scenario, error=str(e))

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop every member: SIGTERM, then SIGKILL after `timeout_s`; no restart happens after this."""
        with self._lock:
            self._closed = True
            members = list(self._members)
            self._members.clear()
            for member in members:
                member.stopping = True
        for member in members:
            with contextlib.suppress(ProcessLookupError):
                member.process.terminate()
        deadline = time.monotonic() + timeout_s
        for member in members:
            try:
                member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait(timeout=30)
        self._watchdog.join(timeout=5)


# -- producing -----------------------------------------------------------------------------------------------------


class SteadyStream(threading.Thread):
    """Valid messages with unique ids at a steady rate; failed sends are sent again, so it rides out an outage."""

    def __init__(self, bootstrap: str, topic: str, prefix: str, rate: float, texts: Sequence[str]) -> None:
        super().__init__(name=f"faults-stream-{prefix}", daemon=True)
        self.topic = topic
        self.error: BaseException | None = None
        self._prefix = prefix
        self._rate = rate
        self._texts = list(texts)
        self._lock = threading.Lock()
        self._retry: deque[str] = deque()
        self._attempts: Counter[str] = Counter()
        self._first_sent: dict[str, float] = {}
        self._acked: dict[str, tuple[int, int]] = {}
        self._failed: set[str] = set()
        self._halt = threading.Event()
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="finpulse-faults-stream",
            acks="all",
            linger_ms=5,
            max_block_ms=5000,  # a send that cannot even be buffered fails fast and is retried by the loop
            reconnect_backoff_max_ms=1000,  # back within a second of the broker, not kafka-python's 30 s
        )

    def run(self) -> None:
        """Send until stopped, then flush."""
        try:
            started, slot, number = time.monotonic(), 0, 0
            while not self._halt.is_set():
                if self._halt.wait(max(0.0, started + slot / self._rate - time.monotonic())):
                    break
                slot += 1
                with self._lock:
                    ident = self._retry.popleft() if self._retry else None
                if ident is None:
                    ident, number = f"{self._prefix}-{number}", number + 1
                self._send(ident)
            self._producer.flush(timeout=60)
        except BaseException as e:  # reported by the benchmark: it ends the stream, never the run
            self.error = e
        finally:
            self._producer.close(timeout=10)

    def _send(self, ident: str) -> None:
        value = valid_message(ident, self._texts[zlib.crc32(ident.encode()) % len(self._texts)])
        with self._lock:
            self._first_sent.setdefault(ident, time.monotonic())
            self._attempts[ident] += 1
        try:
            future = self._producer.send(self.topic, key=ident.encode(), value=value)
        except KafkaError as e:  # no metadata within max_block_ms: the broker is away
            self._failed_send(ident, e)
            return
        future.add_callback(lambda metadata, i=ident: self._acked_send(i, metadata))
        future.add_errback(lambda error, i=ident: self._failed_send(i, error))

    def _acked_send(self, ident: str, metadata: Any) -> None:
        with self._lock:
            self._acked.setdefault(ident, (int(metadata.partition), int(metadata.offset)))

    def _failed_send(self, ident: str, error: BaseException) -> None:
        with self._lock:
            if self._attempts[ident] >= STREAM_ATTEMPTS:
                self._failed.add(ident)
                log.warning("event=stream_send_failed id=%s error=%r", ident, str(error))
            else:
                self._retry.append(ident)

    def stop(self, timeout_s: float = 90.0) -> None:
        """Stop sending; what was sent is flushed."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout_s)

    def acked(self) -> dict[str, tuple[int, int]]:
        """Return (partition, offset) of every acknowledged id."""
        with self._lock:
            return dict(self._acked)

    def failed(self) -> set[str]:
        """Return the ids given up after STREAM_ATTEMPTS sends."""
        with self._lock:
            return set(self._failed)

    def sent_before(self, moment: float) -> list[str]:
        """Return the ids whose first send began before the monotonic time `moment`."""
        with self._lock:
            return [i for i, at in self._first_sent.items() if at < moment]

    def settled(self, ids: Sequence[str]) -> bool:
        """Return True when each of `ids` is acknowledged or given up."""
        with self._lock:
            return all(i in self._acked or i in self._failed for i in ids)


@dataclass
class Produced:
    """What the bad-input scenario produced: each case's (partition, offset), the valid ids acknowledged."""

    cases: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # kind -> why the broker refused it
    valid: dict[str, tuple[int, int]] = field(default_factory=dict)
    valid_failed: int = 0  # valid messages the broker did not acknowledge: not produced, so never lost


def produce_catalogue(
    bootstrap: str,
    topic: str,
    catalogue: Sequence[Case],
    valid: Sequence[tuple[str, bytes]],
    per_case: int,
    rate: float,
) -> Produced:
    """Produce the cases, each after `per_case` valid messages, at `rate` messages per second."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, client_id="finpulse-faults-catalogue", acks="all", linger_ms=5
    )
    case_futures: dict[str, Any] = {}
    valid_futures: dict[str, Any] = {}
    queue = iter(valid)
    started, sent = time.monotonic(), 0

    def pace() -> None:
        nonlocal sent
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent += 1

    produced = Produced()
    try:
        for case in catalogue:
            for ident, value in (next(queue, (None, b"")) for _ in range(per_case)):
                if ident is not None:
                    pace()
                    valid_futures[ident] = producer.send(topic, key=ident.encode(), value=value)
            pace()
            try:
                case_futures[case.kind] = producer.send(topic, key=case.key, value=case.value)
            except KafkaError as e:  # e.g. larger than the producer's max_request_size
                produced.cases[case.kind], produced.errors[case.kind] = None, f"{type(e).__name__}: {e}"
        for ident, value in queue:
            pace()
            valid_futures[ident] = producer.send(topic, key=ident.encode(), value=value)
        producer.flush(timeout=120)
        for kind, future in case_futures.items():
            try:
                metadata = future.get(timeout=30)
                produced.cases[kind] = (int(metadata.partition), int(metadata.offset))
            except KafkaError as e:
                produced.cases[kind], produced.errors[kind] = None, f"{type(e).__name__}: {e}"
        for ident, future in valid_futures.items():
            try:
                metadata = future.get(timeout=30)
            except KafkaError as e:
                produced.valid_failed += 1
                log.warning("event=valid_send_failed id=%s error=%r", ident, str(e))
                continue
            produced.valid[ident] = (int(metadata.partition), int(metadata.offset))
    finally:
        producer.close(timeout=10)
    return produced


def produce_labels(bootstrap: str, topic: str, count: int) -> int:
    """Produce `count` analyst labels (stock-market tweets of 2020); return how many the broker acknowledged."""
    from learner.datasets import stock_tweets
    from stream.labels import label_value

    tweets = stock_tweets(labelled_only=True)[:count]
    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="finpulse-faults-labels", acks="all")
    try:
        futures = [
            producer.send(
                topic,
                key=t.id.encode(),
                value=label_value(t.id, t.text, t.published_at.isoformat(), sentiment=t.sentiment, labeller="faults"),
            )
            for t in tweets
        ]
        producer.flush(timeout=60)
        return sum(1 for f in futures if f.succeeded())
    finally:
        producer.close(timeout=10)


# -- reading outcomes ----------------------------------------------------------------------------------------------


def dead_letter_coordinates(
    bootstrap: str, dlq: str, raw: str, partitions: int, timeout_s: float = 60
) -> set[tuple[int, int]]:
    """Return (partition, offset) of every `raw` record that a dead letter on `dlq` names."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    found: set[tuple[int, int]] = set()
    try:
        tps = [TopicPartition(dlq, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    letter = _json_object(record.value)
                    if letter is None or letter.get("topic") != raw:
                        continue
                    partition, offset = letter.get("partition"), letter.get("offset")
                    if isinstance(partition, int) and isinstance(offset, int):
                        found.add((partition, offset))
    finally:
        consumer.close()
    return found


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    try:
        decoded = json.loads(value) if value is not None else None
    except ValueError:  # a dead letter the benchmark cannot read names nothing
        return None
    return decoded if isinstance(decoded, dict) else None


_HISTORIES: dict[Path, Any] = {}


def _history(path: Path) -> Any:
    from storage import History, StorageConfig

    # One History (one lake connection) per history the benchmark reads, reused across its many reads.
    if path not in _HISTORIES:
        _HISTORIES[path] = History(StorageConfig(duckdb_path=path, lock_timeout_s=120))
    return _HISTORIES[path]


def _has_history(db: Path) -> bool:
    """Return True once the scorers wrote anything: the lake beside the state file, or the file itself."""
    from storage.history import lake_dir_of

    return (lake_dir_of(db) / "catalog.sqlite").exists() or db.exists()


def row_coordinates(db: Path, raw: str) -> set[tuple[int, int]]:
    """Return (partition, offset) of every history row that came from topic `raw`."""
    if not _has_history(db):
        return set()
    rows = _history(db).query("SELECT kafka_partition, kafka_offset FROM news WHERE kafka_topic = ?", [raw]).rows
    return {(int(p), int(o)) for p, o in rows}


def history_ids(db: Path) -> tuple[set[str], int]:
    """Return the distinct ids in the history and its row count."""
    if not _has_history(db):
        return set(), 0
    history = _history(db)
    ids = {str(r[0]) for r in history.query("SELECT DISTINCT id FROM news").rows}
    return ids, history.count()


def outcome_of(coordinates: tuple[int, int] | None, letters: set[tuple[int, int]], rows: set[tuple[int, int]]) -> str:
    """Return dead_letter, scored, both, none, or not_produced for one produced record."""
    if coordinates is None:
        return "not_produced"
    lettered, stored = coordinates in letters, coordinates in rows
    if lettered and stored:
        return "both"
    return "dead_letter" if lettered else "scored" if stored else "none"


# -- the learner ---------------------------------------------------------------------------------------------------


def registry_problems(adapters_dir: Path, db: Path, labels: int) -> list[str]:
    """Return what disagrees between the adapters directory and the learner's DuckDB (empty: consistent)."""
    from learner.adapters import CHAMPION_FILE, STAGING_PREFIX, AdapterStore
    from learner.errors import ModelLoadError
    from learner.registry import Registry
    from learner.tasks import task_names
    from storage.labels import LabelStore
    from storage.models import ModelVersionStore

    store, history = AdapterStore(adapters_dir), _history(db)
    versions = ModelVersionStore(history)
    problems: list[str] = []
    for task in task_names():
        task_dir = adapters_dir / task
        leftovers = sorted(
            p.name
            for p in (task_dir.iterdir() if task_dir.is_dir() else [])
            if p.name.startswith(STAGING_PREFIX) or p.name.startswith(CHAMPION_FILE + ".")
        )
        if leftovers:
            problems.append(f"{task}: half-written {leftovers}")
        try:
            on_file = store.champion(task)
        except ModelLoadError as e:
            problems.append(f"{task}: {e}")
            continue
        row = versions.champion(task)
        if row is None or row.version != on_file:
            problems.append(f"{task}: CHAMPION names {on_file}, DuckDB {row.version if row else 'none'}")
        registered = {r.version for r in versions.list(task)}
        unregistered = [v for v in store.versions(task) if v not in registered]
        if unregistered:
            problems.append(f"{task}: not in DuckDB: {unregistered}")
        still_open = [e.id for e in LabelStore(history).experiences(task, status="open")]
        if still_open:
            problems.append(f"{task}: experiences still open: {still_open}")
    stored = history.query("SELECT count(*) FROM labels").rows[0][0]
    if stored != labels:
        problems.append(f"labels: {stored} stored of {labels} produced")
    repaired = Registry(store, versions).sync(source="bench-faults")
    if repaired:
        problems.append(f"sync repaired {[c.version for c in repaired]}")
    return problems


# -- the run -------------------------------------------------------------------------------------------------------


def scenario_topics(run_id: str, scenario: str) -> TopicNames:
    """Return the topics of one scenario of one run."""
    return TopicNames.prefixed(f"faults.{run_id}.{scenario}.")


class _Run:
    """The state of one benchmark run, shared by its scenarios."""

    def __init__(
        self,
        config: AppConfig,
        settings: FaultSettings,
        work: Path,
        bootstrap: str,
        broker: LocalBroker | None,
        forward: Sequence[str],
        report: Reporter,
        stack: contextlib.ExitStack,
    ) -> None:
        self.config = config
        self.settings = settings
        self.work = work
        self.bootstrap = bootstrap
        self.broker = broker
        self.forward = list(forward)
        self.report = report
        self.stack = stack
        self.run_id = uuid.uuid4().hex[:8]
        self.db = work / "history.duckdb"
        self.partitions = config.kafka.partitions
        self.observer = Observer(bootstrap, self.partitions)
        stack.callback(self.observer.close)
        self.pools: list[ScorerPool] = []
        self.timeouts: list[str] = []
        self.valid: set[str] = set()  # every valid-stream id the broker acknowledged
        self.produce_failed = 0  # valid messages never acknowledged (not produced, so not counted as lost)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }

    def timed_out(self, what: str) -> None:
        """Record a wait that passed its deadline."""
        self.timeouts.append(what)
        self.report("timeout", what=what)

    def child(self, command: str, settings: dict[str, object], *extra: str) -> list[str]:
        """Return the command line of a `finpulse` child process on this run's cluster."""
        args = [
            sys.executable, "-m", "finpulse.cli", command, *extra, *self.forward,
            "--bootstrap-servers", self.bootstrap,
            "--metrics-port", "0",
        ]  # fmt: skip
        for key, value in {"metrics.host": "127.0.0.1", **settings}.items():
            args += ["--set", f"{key}={value}"]
        return args

    def pool(self, scenario: str, topics: TopicNames) -> tuple[ScorerPool, str]:
        """Create the scenario's topics and a pool of scorer processes for them; return it and its group."""
        t = topics
        ensure_topics(self.bootstrap, [t.raw, t.scored, t.dlq, t.labels, t.updates], self.partitions)
        group = f"faults-{self.run_id}-{scenario}"
        command = self.child(
            "score",
            {
                "kafka.topics.raw": t.raw,
                "kafka.topics.scored": t.scored,
                "kafka.topics.dlq": t.dlq,
                "kafka.topics.labels": t.labels,
                "kafka.topics.updates": t.updates,
                "scorer.group_id": group,
            },
            "--duckdb-path", str(self.db),
            "--adapters-dir", str(Path(self.config.model.adapters_dir).resolve()),
            "--device", self.config.scorer.device,
        )  # fmt: skip
        pool = ScorerPool(scenario, command, self.env, self.work, self.report)
        self.pools.append(pool)
        self.stack.callback(pool.close)
        return pool, group

    def committed_past(self, group: str, topic: str, targets: dict[int, int]) -> Callable[[], bool]:
        """Return a condition: every partition of `topic` has a committed offset beyond its target."""
        return lambda: past(self.observer.committed(group, topic), targets)

    def joined(self, group: str, members: int, what: str) -> bool:
        """Wait until the group is Stable with `members` members."""
        held = wait_until(lambda: self.observer.members(group) == members, self.settings.join_timeout_s, 0.5)
        if held is None:
            self.timed_out(what)
        return held is not None

    def steady(self, group: str, topic: str, what: str) -> bool:
        """Wait until two members are Stable and every partition commits past its end offset of now."""
        if not self.joined(group, 2, what + ": two scorers in the group"):
            return False
        ends = _answered(lambda: self.observer.ends(topic))
        if (
            ends is None
            or wait_until(lambda: past(self.observer.committed(group, topic), ends), self.settings.join_timeout_s)
            is None
        ):
            self.timed_out(what + ": every partition scoring")
            return False
        return True

    def drained(self, group: str, topic: str, what: str) -> float | None:
        """Wait until the group has committed everything on `topic`; return how long that took."""
        started = time.monotonic()
        ends = _answered(lambda: self.observer.ends(topic))
        held = (
            None
            if ends is None
            else wait_until(lambda: reached(self.observer.committed(group, topic), ends), self.settings.drain_timeout_s)
        )
        if held is None:
            self.timed_out(what)
            return None
        return held - started


def run_faults(
    config: AppConfig,
    settings: FaultSettings | None = None,
    *,
    forward: Sequence[str] = (),
    workdir: Path | None = None,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Run every fault scenario and return the figures (see the module docstring).

    `forward` are command-line arguments (`--config`, `--set`) handed on to every scorer and learner process,
    so they run with the configuration the benchmark was given.
    """
    settings = settings or FaultSettings()
    report = report or Reporter()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        work = (
            workdir
            if workdir is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finpulse-faults-")))
        )
        work.mkdir(parents=True, exist_ok=True)
        bootstrap, broker = _cluster(config, work, stack, report)
        run = _Run(config, settings, work, bootstrap, broker, forward, report, stack)
        report("run_started", run=run.run_id, bootstrap=bootstrap, kills=settings.kills, workdir=str(work))
        texts = _texts()

        # Both pools load their models at once: the kill scenario's scorers are ready when bad input is done.
        bad_topics, live_topics = scenario_topics(run.run_id, "bad"), scenario_topics(run.run_id, "live")
        bad_pool, bad_group = run.pool("bad", bad_topics)
        live_pool, live_group = run.pool("live", live_topics)
        for pool in (bad_pool, live_pool):
            pool.spawn()
            pool.spawn()

        result: dict[str, Any] = {"benchmark": "faults", "run_id": run.run_id, "quick": settings.quick}
        result.update(_bad_input(run, bad_pool, bad_group, bad_topics, texts))
        bad_pool.close()
        stream = SteadyStream(bootstrap, live_topics.raw, f"faults-{run.run_id}-live", settings.steady_rate, texts)
        stack.callback(stream.stop)
        run.joined(live_group, 2, "live: two scorers in the group")
        stream.start()
        result.update(_kill_failover(run, live_pool, live_group, live_topics.raw))
        result.update(_broker_restart(run, live_group, live_topics.raw, stream))
        stream.stop()
        if stream.error is not None:
            report("stream_failed", error=repr(stream.error))
        result["drain_s"] = _rounded(run.drained(live_group, live_topics.raw, "live: draining the stream"))
        live_pool.close()
        run.valid.update(stream.acked())
        run.produce_failed += len(stream.failed())
        result["produce_failed"] = run.produce_failed

        result.update(_accounting(run))
        result.update(_learner(run) if settings.learner_kills else {"learner_kills": 0, "registry_consistent": None})
        crashes = [c for pool in run.pools for c in pool.crashes]
        result["crashes"] = len(crashes)
        result["crashes_by_scenario"] = dict(Counter(c.scenario for c in crashes))
        result["crash_reasons"] = dict(Counter(c.reason for c in crashes).most_common())
        result["timeouts"] = run.timeouts
        result["settings"] = asdict(settings)
        result["host"] = platform.node()
        result["at"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["wall_s"] = round(time.monotonic() - started, 1)
        report("run_done", wall_s=result["wall_s"], crashes=result["crashes"], lost=result["lost"])
        return result


def _texts() -> list[str]:
    """Real tweets for the valid streams: the scorers' work per message is what it is in production."""
    from finpulse.replay import labelled_stream

    return [li.item.text for li in labelled_stream(500)] or ["Oil slides as OPEC+ signals higher output"]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the run lasts, so that its cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cluster(
    config: AppConfig, work: Path, stack: contextlib.ExitStack, report: Reporter
) -> tuple[str, LocalBroker | None]:
    """Return the bootstrap to use and the broker the benchmark owns (None for a configured cluster)."""
    configured = config.kafka.bootstrap_servers
    if configured:
        hosts = [s.strip().rpartition(":")[0] for s in configured.split(",") if s.strip()]
        if not all(h.startswith(LOOPBACK) for h in hosts):
            raise FaultsError(
                f"bench faults kills processes and floods topics, so it runs on loopback only, not {configured}: "
                "unset kafka.bootstrap_servers to let it start a broker of its own"
            )
        return configured, None
    broker = LocalBroker(work / "kafka")
    stack.callback(broker.stop)
    report("broker_starting", data_dir=str(broker.data_dir))
    return broker.start(), broker


def _bad_input(run: _Run, pool: ScorerPool, group: str, topics: TopicNames, texts: Sequence[str]) -> dict[str, Any]:
    """Produce the catalogue among valid messages, wait until it is handled, and classify every kind."""
    settings = run.settings
    catalogue = cases(run.run_id, run.config.scorer.max_text_bytes)
    count = len(catalogue) * settings.valid_per_case
    prefix = f"faults-{run.run_id}-bad"
    valid = [(f"{prefix}-{n}", valid_message(f"{prefix}-{n}", texts[n % len(texts)])) for n in range(count)]
    run.joined(group, 2, "bad input: two scorers in the group")
    run.report("bad_input_producing", kinds=len(catalogue), valid=len(valid), topic=topics.raw)
    produced = produce_catalogue(
        run.bootstrap, topics.raw, catalogue, valid, settings.valid_per_case, settings.bad_rate
    )
    run.valid.update(produced.valid)
    run.produce_failed += produced.valid_failed
    drain_s = run.drained(group, topics.raw, "bad input: scorers handling every record")
    letters = dead_letter_coordinates(run.bootstrap, topics.dlq, topics.raw, run.partitions)
    rows = row_coordinates(run.db, topics.raw)
    outcomes = {case.kind: outcome_of(produced.cases.get(case.kind), letters, rows) for case in catalogue}
    mismatched = {c.kind: outcomes[c.kind] for c in catalogue if outcomes[c.kind] != c.expect}
    by_outcome = Counter(outcomes.values())
    run.report(
        "bad_input_done",
        dead_lettered=by_outcome["dead_letter"],
        scored=by_outcome["scored"],
        mismatched=len(mismatched),
    )
    return {
        "bad_input_kinds": sum(c.expect == "dead_letter" for c in catalogue),
        "edge_kinds": sum(c.expect == "scored" for c in catalogue),
        "dead_lettered": by_outcome["dead_letter"],
        "scored": by_outcome["scored"],
        "unaccounted": by_outcome["none"] + by_outcome["both"] + by_outcome["not_produced"],
        "mismatched": sorted(mismatched),
        "mismatched_detail": {
            kind: {"expect": next(c.expect for c in catalogue if c.kind == kind), "got": got}
            for kind, got in sorted(mismatched.items())
        },
        "not_produced": produced.errors,
        "bad_input_drain_s": _rounded(drain_s),
    }


def _kill_failover(run: _Run, pool: ScorerPool, group: str, topic: str) -> dict[str, Any]:
    """SIGKILL a scorer `kills` times under a steady stream; time until every partition is scored again."""
    figures: list[float | None] = []
    for n in range(1, run.settings.kills + 1):
        run.steady(group, topic, f"kill {n}: before")
        victim = pool.oldest()
        ends = _answered(lambda: run.observer.ends(topic))
        if victim is None or ends is None:
            run.timed_out(f"kill {n}: no live scorer or no end offsets")
            figures.append(None)
            continue
        killed_at = time.monotonic()
        pool.kill(victim)
        # The definition of the figure: a record produced after the kill is committed on every partition.
        held = wait_until(run.committed_past(group, topic, ends), run.settings.failover_timeout_s)
        figure = None if held is None else held - killed_at
        if figure is None:
            run.timed_out(f"kill {n}: failover")
        figures.append(figure)
        run.report("scorer_killed", n=n, member=victim.name, failover_s=figure if figure is not None else "timeout")
        pool.spawn()  # the replacement; the next round (or the broker restart) waits for it to join
    return {
        "kills": len(figures),
        "kill_failover_s": _rounded(_median(figures)),
        "kill_failover_each_s": [_rounded(f) for f in figures],
    }


def _broker_restart(run: _Run, group: str, topic: str, stream: SteadyStream) -> dict[str, Any]:
    """Stop the broker for `outage_s` under the steady stream; time until everything sent is committed."""
    broker = run.broker
    if broker is None:
        run.report("broker_restart_skipped", reason="a configured cluster is not the benchmark's to stop")
        return {"broker_restart_recovery_s": None, "broker_outage_s": None, "broker_restart": "skipped"}
    run.steady(group, topic, "broker restart: before")
    port = int(run.bootstrap.rpartition(":")[2])
    stopped_at = time.monotonic()
    broker.stop()
    run.report("broker_stopped", port=port, stop_s=time.monotonic() - stopped_at)
    time.sleep(run.settings.outage_s)
    back_at = _restart_broker(broker, port)
    outage = back_at - stopped_at
    run.report("broker_back", outage_s=outage)
    sent = stream.sent_before(back_at)
    during = len(set(sent) - set(stream.sent_before(stopped_at)))
    settled_at = wait_until(lambda: stream.settled(sent), run.settings.recovery_timeout_s)
    if settled_at is None:
        run.timed_out("broker restart: the stream's buffered sends")
        return {"broker_restart_recovery_s": None, "broker_outage_s": round(outage, 1), "broker_restart": "timeout"}
    acked = stream.acked()
    targets: dict[int, int] = {}
    for ident in sent:
        if ident in acked:
            partition, offset = acked[ident]
            targets[partition] = max(targets.get(partition, 0), offset + 1)
    held = wait_until(lambda: reached(run.observer.committed(group, topic), targets), run.settings.recovery_timeout_s)
    if held is None:
        run.timed_out("broker restart: recovery")
    recovery = None if held is None else held - back_at
    run.report("broker_recovered", recovery_s=recovery if recovery is not None else "timeout", during_outage=during)
    return {
        "broker_restart_recovery_s": _rounded(recovery),
        "broker_outage_s": round(outage, 1),
        "broker_outage_sent": during,
        # The producer's part of the recovery: its buffered sends acknowledged (the rest is the scorers').
        "broker_restart_acked_s": _rounded(settled_at - back_at),
        "broker_restart": "done" if recovery is not None else "timeout",
    }


def _restart_broker(broker: LocalBroker, port: int, timeout_s: float = 120.0) -> float:
    """Start the broker again on `port` (clients keep their bootstrap); return the monotonic time it answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            broker.start(port=port)
            return time.monotonic()
        except BrokerError as e:
            # The old listener's port may take a moment to be free again; anything else is for the caller.
            if "in use" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _accounting(run: _Run) -> dict[str, Any]:
    """Count valid ids without a row, and rows beyond one per id."""
    ids, rows = history_ids(run.db)
    lost = sorted(run.valid - ids)
    run.report("accounted", valid=len(run.valid), rows=rows, lost=len(lost))
    return {
        "valid_produced": len(run.valid),
        "rows": rows,
        "lost": len(lost),
        "lost_sample": lost[:10],
        "duplicated_rows": rows - len(ids),
    }


def _learner(run: _Run) -> dict[str, Any]:
    """SIGKILL `finpulse learn` mid-training, let it finish, then check the registry."""
    topics = scenario_topics(run.run_id, "learn")
    t = topics
    ensure_topics(run.bootstrap, [t.raw, t.scored, t.labels, t.dlq, t.updates], run.partitions)
    adapters = run.work / "adapters"
    if adapters.exists():
        shutil.rmtree(adapters)
    shutil.copytree(Path(run.config.model.adapters_dir), adapters)  # never the shipped adapters
    db = run.work / "learner.duckdb"
    labels = produce_labels(run.bootstrap, t.labels, run.settings.labels)
    command = run.child(
        "learn",
        {
            **LEARNER_SETTINGS,
            "kafka.topics.raw": t.raw,
            "kafka.topics.scored": t.scored,
            "kafka.topics.labels": t.labels,
            "kafka.topics.dlq": t.dlq,
            "kafka.topics.updates": t.updates,
        },
        "--once", "--now", "--task", SENTIMENT.name, "--no-progress", "-v",
        "--duckdb-path", str(db),
        "--adapters-dir", str(adapters),
    )  # fmt: skip
    run.report("learner_labels", labels=labels, topic=t.labels)
    kills, outcome = 0, None
    left: list[list[str]] = []
    for n, delay in enumerate(LEARNER_KILL_DELAYS_S[: run.settings.learner_kills], start=1):
        with _learner_process(run, command, f"learner-{n}") as (process, log_path):
            marked = wait_until(
                lambda: process.poll() is not None or TRAINING_MARKER in _read(log_path), run.settings.join_timeout_s
            )
            if process.poll() is not None:
                outcome = f"finished before kill {n} (exit {process.returncode})"
                break
            if marked is None:
                run.timed_out(f"learner {n}: {TRAINING_MARKER!r} in its log")
            if wait_until(lambda: process.poll() is not None, delay) is not None:
                outcome = f"finished before kill {n} (exit {process.returncode})"
                break
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            kills += 1
            # A staging directory left behind says the kill fell while the candidate's files were written.
            staged = sorted(p.name for p in (adapters / SENTIMENT.name).glob(".tmp-*"))
            left.append(staged)
            run.report("learner_killed", n=n, after_marker_s=delay, staging_left=",".join(staged) or "none")
    if outcome is None:
        with _learner_process(run, command, "learner-final") as (process, log_path):
            try:
                code = process.wait(timeout=run.settings.learner_timeout_s)
                outcome = f"exit {code}" + ("" if code == 0 else f": {crash_reason(log_path, code)}")
            except subprocess.TimeoutExpired:
                run.timed_out("learner: final run")
                outcome = "timeout"
    problems = registry_problems(adapters, db, labels)
    run.report("learner_done", kills=kills, outcome=outcome, problems=len(problems))
    return {
        "learner_kills": kills,
        "registry_consistent": not problems,
        "registry_problems": problems,
        "learner_outcome": outcome,
        "learner_staging_left": left,
        "learner_versions": _versions(db),
    }


@contextlib.contextmanager
def _learner_process(run: _Run, command: Sequence[str], name: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run one learner process; whatever happens, it is not running afterwards."""
    path = run.work / f"{name}.log"
    with path.open("wb") as out:
        process = subprocess.Popen(
            list(command), cwd=run.work, env=run.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    run.report("learner_started", member=name, pid=process.pid)
    try:
        yield process, path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _versions(db: Path) -> dict[str, str]:
    """Return the sentiment versions the learner's DuckDB records, with their status."""
    if not db.exists():
        return {}
    rows = (
        _history(db)
        .query(f"SELECT version, status FROM model_versions WHERE task = '{SENTIMENT.name}' ORDER BY version")
        .rows
    )
    return {str(v): str(s) for v, s in rows}


def _median(figures: Sequence[float | None]) -> float | None:
    """Return the median, a timeout (None) counting as slower than any figure; None if a timeout is it."""
    if not figures:
        return None
    ordered = sorted(figures, key=lambda f: (f is None, f or 0.0))
    middle = len(ordered) // 2
    picked = ordered[middle - 1 : middle + 1] if len(ordered) % 2 == 0 else [ordered[middle]]
    if any(f is None for f in picked):
        return None
    return statistics.fmean(f for f in picked if f is not None)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# -- output --------------------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> Table:
    """Return the figures as a table that fits 100 columns."""
    out = Table(title=f"bench faults ({result['wall_s']:.0f} s, run {result['run_id']})", title_justify="left")
    out.add_column("figure", no_wrap=True)
    out.add_column("value", justify="right", overflow="fold", max_width=24)
    out.add_column("what it counts", overflow="fold", max_width=46)

    def s(value: object) -> str:
        if value is None:
            return "timeout"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    kinds = result["bad_input_kinds"] + result["edge_kinds"]
    skipped = result.get("broker_restart") == "skipped"
    learner = result["registry_consistent"] is not None
    rows: list[tuple[str, str, str]] = [
        ("bad_input_kinds", s(result["bad_input_kinds"]), f"kinds to dead-letter (+{result['edge_kinds']} to score)"),
        ("dead_lettered", s(result["dead_lettered"]), f"kinds of {kinds} dead-lettered (found by offset)"),
        ("scored", s(result["scored"]), f"kinds of {kinds} with a history row (by offset)"),
        ("mismatched", s(len(result["mismatched"])), "kinds not handled as expected (listed below)"),
        ("crashes", s(result["crashes"]), "scorer processes that exited by themselves"),
        ("kill_failover_s", s(result["kill_failover_s"]), "median: SIGKILL → all partitions past the end"),
        ("  each", " ".join(s(f) for f in result["kill_failover_each_s"]), "per kill, seconds"),
        (
            "broker_restart_recovery_s",
            "skipped" if skipped else s(result["broker_restart_recovery_s"]),
            "broker back → the outage's records committed",
        ),
        ("lost", s(result["lost"]), f"valid ids without a row, of {result['valid_produced']}"),
        ("duplicated_rows", s(result["duplicated_rows"]), f"rows beyond one per id, of {result['rows']}"),
        (
            "learner_kills",
            s(result["learner_kills"]),
            f"mid-training; final run: {result.get('learner_outcome') or '-'}",
        ),
        (
            "registry_consistent",
            s(result["registry_consistent"]) if learner else "-",
            "CHAMPION, DuckDB, staging agree",
        ),
        ("timeouts", s(len(result["timeouts"])), "waits past their deadline (listed below)"),
    ]
    for row in rows:
        out.add_row(*row)
    return out


def print_result(result: dict[str, Any], console: Console) -> None:
    """Print the table, then the mismatched kinds, crash reasons and timeouts."""
    width = min(console.width, 100)
    console.print(table(result), width=width)
    for kind, detail in result["mismatched_detail"].items():
        console.print(
            f"  mismatched {kind}: expected {detail['expect']}, got {detail['got']}", highlight=False, width=width
        )
    for reason, count in result["crash_reasons"].items():
        console.print(f"  crash ×{count}: {reason}", highlight=False, width=width)
    for what in result["timeouts"]:
        console.print(f"  timeout: {what}", highlight=False, width=width)
    for problem in result.get("registry_problems", []):
        console.print(f"  registry: {problem}", highlight=False, width=width)


def write_result(result: dict[str, Any], path: Path) -> None:
    """Write the result as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
