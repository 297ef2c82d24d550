"""The model registry: which adapter version serves each task, its candidates, and every change, on disk and in DuckDB.

Two records describe the versions and they must agree:

* the adapters directory (`learner.adapters.AdapterStore`): the version dirs and each task's CHAMPION pointer
  file, which scorers load and poll. Replacing that file (`os.replace`, atomic) is the commit point of a
  promotion or rollback: a crash before it leaves the old champion serving, a crash after it leaves the new one;
* DuckDB (`storage.models.ModelVersionStore`): one row per version with lineage, metrics and status, and the
  event log behind `finpulse_model_versions_total`.

So every change writes the file first, then DuckDB (one transaction), then announces it on `model.updates`.
`sync()`, run at every start, repairs what a crash between the two writes left behind: where they disagree
the file wins, DuckDB is fixed and the change is announced again.

Metrics of a version are free-form; the held-out accuracy shown by `finpulse models list` is read from
`metrics["holdout"]["accuracy"]` (or `metrics["holdout_accuracy"]`), falling back to the bootstrap's
`metrics["valid"]["accuracy"]`.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from learner.adapters import AdapterStore, ModelCard
from learner.domains import DEFAULT_DOMAIN
from learner.errors import LearnerError, ModelLoadError
from learner.tasks import Task, task_names, version_number, version_task
from storage.labels import Experience
from storage.models import ModelEvent, ModelVersionStore, VersionRow

__all__ = [
    "Change",
    "Publish",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "VersionNotFoundError",
    "held_out_accuracy",
    "task_of",
]

log = logging.getLogger(__name__)

# publish(task, version, event, previous): announce a champion change on `model.updates`.
Publish = Callable[[str, str, str, str | None], None]


class RegistryError(LearnerError):
    """A registry action is not possible in the current state; the message says what to do instead."""


class VersionNotFoundError(RegistryError):
    """No registered adapter version has this name."""


@dataclass(frozen=True)
class Change:
    """A champion change: committed on disk and in DuckDB; `published` says whether it was announced."""

    task: str
    version: str
    previous: str | None
    outcome: str  # promoted | rolled_back
    published: bool
    note: str | None = None  # why it was not announced


@dataclass(frozen=True)
class VersionInfo:
    """Everything known about one version: its row, its model card, its events and whether it serves."""

    row: VersionRow
    card: ModelCard | None
    serving: bool
    events: list[ModelEvent] = field(default_factory=list)


def task_of(version: str) -> Task:
    """Return the task of a `<task>-vN` version name, or raise VersionNotFoundError for other names."""
    task = version_task(version)
    if task is None:
        named = " or ".join(f"{name}-vN" for name in task_names())
        raise VersionNotFoundError(f"no version {version}: versions are named {named}; see `finpulse models list`")
    return task


def held_out_accuracy(metrics: dict[str, Any]) -> float | None:
    """Return the held-out accuracy recorded in a version's metrics, or None when there is none."""
    holdout, valid = metrics.get("holdout"), metrics.get("valid")
    for found in (
        holdout.get("accuracy") if isinstance(holdout, dict) else None,
        metrics.get("holdout_accuracy"),
        # The bootstrap's validation split is held out too.
        valid.get("accuracy") if isinstance(valid, dict) else None,
    ):
        if isinstance(found, int | float) and not isinstance(found, bool):
            return float(found)
    return None


class Registry:
    """Promotions, rejections and rollbacks of adapter versions, crash-safe across the files and DuckDB."""

    def __init__(self, adapters: AdapterStore, versions: ModelVersionStore, publish: Publish | None = None) -> None:
        """Use these stores; `publish` announces champion changes (None: scorers only poll the CHAMPION file)."""
        self.adapters = adapters
        self.versions = versions
        self._publish = publish

    def sync(self, source: str = "learner") -> builtins.list[Change]:
        """Make DuckDB agree with the adapters directory; return the champion changes it had to repair.

        Versions on disk that DuckDB lacks are registered from their model card (champion when the CHAMPION
        file names it and DuckDB has no champion, else retired). Where DuckDB's champion differs from the
        CHAMPION file, the file wins: a promotion or rollback committed it and crashed before DuckDB did.
        """
        changes: builtins.list[Change] = []
        for task in task_names():
            pointers = self._file_champions(task)
            known = {row.version: row for row in self.versions.list(task)}
            for version in self.adapters.versions(task):
                if version in known:
                    continue
                domain = next((d for d, v in pointers.items() if v == version), None)
                recorded = self._recorded(known, domain) if domain is not None else None
                adopt = domain is not None and recorded is None
                row = self._row_from_disk(task, version, "champion" if adopt else "retired", domain)
                self.versions.add(row)
                known[version] = row
            for domain, file_champion in pointers.items():
                recorded = self._recorded(known, domain)
                if recorded is not None and recorded.version == file_champion:
                    continue
                previous = recorded.version if recorded is not None else None
                # Which change crashed is not recorded anywhere; moving to an older version is taken as a rollback.
                older = previous is not None and version_number(file_champion) < version_number(previous)
                outcome = "rolled_back" if older else "promoted"
                pointer = "CHAMPION file" if domain == DEFAULT_DOMAIN else f"CHAMPION file of domain {domain}"
                reason = f"sync: the {pointer} names {file_champion}, DuckDB had {previous or 'no champion'}"
                log.warning("%s champion repaired in DuckDB: %s", task, reason)
                self.versions.set_champion(task, file_champion, outcome, source, reason, domain=domain)
                changes.append(self._announce(task, file_champion, outcome, previous))
        return changes

    @staticmethod
    def _recorded(known: dict[str, VersionRow], domain: str) -> VersionRow | None:
        return next((r for r in known.values() if r.status == "champion" and r.domain == domain), None)

    def add_candidate(
        self,
        task: Task,
        version: str,
        parent: str | None,
        experience: Experience | None,
        metrics: dict[str, Any],
    ) -> VersionRow:
        """Register a trained version (its adapter files already committed) as a candidate; return its row."""
        self._check_name(task, version)
        if not (self.adapters.version_dir(task, version) / "adapter_config.json").is_file():
            raise RegistryError(
                f"cannot register {version}: no adapter at {self.adapters.version_dir(task, version)}; "
                "commit the staged files first"
            )
        now = dt.datetime.now(dt.UTC)
        row = VersionRow(
            version=version,
            task=task,
            parent=parent,
            created_at=now,
            experience_id=experience.id if experience is not None else None,
            span_start=experience.span_start if experience is not None else None,
            span_end=experience.span_end if experience is not None else None,
            metrics=metrics,
            status="candidate",
            status_at=now,
            domain=experience.domain if experience is not None else DEFAULT_DOMAIN,
        )
        if not self.versions.add(row):
            found = self.versions.get(version)
            raise RegistryError(
                f"{version} is registered already (status {found.status if found else 'unknown'}); "
                f"stage the next version, {self.adapters.next_version(task)}"
            )
        return row

    def promote(
        self, task: Task, version: str, reason: str | None, source: str = "learner", domain: str = DEFAULT_DOMAIN
    ) -> Change:
        """Make `version` the champion of `domain`: its CHAMPION file (the commit point), then DuckDB, then the
        announcement. Only messages of that domain are served it: no other domain's models change."""
        self._require(task, version)
        previous = self._file_champion(task, domain)
        if previous == version:
            raise RegistryError(f"{version} is already the {task} champion{_in(domain)}")
        # (1) The commit point: from here on scorers load `version`, whatever happens next.
        self.adapters.set_champion(task, version, domain)
        # (2) A crash before this transaction commits is repaired by the next sync().
        self.versions.set_champion(task, version, "promoted", source, reason, domain=domain)
        # (3) Scorers that miss the announcement still see the file at their next poll. A promotion from the
        # command line is announced as "manual" (stream.updates.UpdateEvent): it skipped the held-out gate.
        return self._announce(task, version, "promoted", previous, event="manual" if source == "cli" else None)

    def reject(self, task: Task, version: str, reason: str | None, source: str = "learner") -> VersionRow:
        """Mark a candidate rejected (the serving version stays) and log the rejection; return its row."""
        self._require(task, version)
        if self._file_champion(task) == version:
            raise RegistryError(
                f"{version} is the serving {task} champion: roll it back with `finpulse models rollback {task}` first"
            )
        return self.versions.reject(version, reason, source)

    def rollback(
        self,
        task: Task,
        to: str | None = None,
        source: str = "cli",
        reason: str | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> Change:
        """Serve `to` again, or by default the champion's parent (else the latest retired version); in a domain
        with nothing earlier of its own, withdraw its champion so it is served the default domain's again."""
        current = self._file_champion(task, domain)
        if current is None:
            if domain != DEFAULT_DOMAIN:
                raise RegistryError(f"domain {domain} has no {task} champion of its own: it serves the default's")
            raise RegistryError(f"no {task} champion to roll back: run `finpulse bootstrap` first")
        if to is None and domain != DEFAULT_DOMAIN and self._domain_rollback_target(task, current, domain) is None:
            why = reason or f"withdrawn: domain {domain} is served the default champion again"
            self.adapters.clear_champion(task, domain)  # the commit point
            default = self._file_champion(task) or current
            self.versions.withdraw(task, current, default, source, why, domain)
            return self._announce(task, default, "rolled_back", current)
        if to is None:
            target = (
                self._domain_rollback_target(task, current, domain)
                if domain != DEFAULT_DOMAIN
                else self._rollback_target(task, current)
            )
            assert target is not None
        else:
            row = self._require(task, to)
            if to == current:
                raise RegistryError(f"{to} is already the {task} champion: pick an earlier version with --to")
            if row.status != "retired":
                raise RegistryError(
                    f"{to} never served (status {row.status}): put it live with `finpulse models promote {to}`"
                )
            target = to
        why = reason or f"rolled back from {current}"
        self.adapters.set_champion(task, target, domain)  # the commit point, as in promote()
        self.versions.set_champion(task, target, "rolled_back", source, why, domain=domain)
        return self._announce(task, target, "rolled_back", current)

    def list(self, task: Task | None = None) -> builtins.list[VersionRow]:
        """Return the registered versions (of `task` when given), newest first."""
        return self.versions.list(task)

    def show(self, version: str) -> VersionInfo:
        """Return a version's row, model card, events and whether it is serving."""
        task = task_of(version)
        row = self._require(task, version)
        try:
            card: ModelCard | None = self.adapters.card(task, version)
        except ModelLoadError:
            card = None  # a rejected version's files may have been cleaned up
        return VersionInfo(
            row=row,
            card=card,
            serving=version in self._file_champions(task).values(),
            events=self.versions.events(version=version),
        )

    def champions(self) -> dict[str, str]:
        """Return the serving version of every task that has one, as the CHAMPION files name it."""
        found: dict[str, str] = {}
        for task in task_names():
            version = self._file_champion(task)
            if version is not None:
                found[task] = version
        return found

    def _require(self, task: Task, version: str) -> VersionRow:
        """Return the row of a version of `task`, or raise a one-line error saying where to look."""
        self._check_name(task, version)
        row = self.versions.get(version)
        if row is None:
            raise VersionNotFoundError(f"no version {version}: see `finpulse models list`")
        return row

    @staticmethod
    def _check_name(task: Task, version: str) -> None:
        """Refuse a version name of another task or of no task."""
        if task_of(version) != task:
            raise RegistryError(f"{version} is not a {task} version: {task} versions are named {task}-vN")

    def _file_champion(self, task: Task, domain: str = DEFAULT_DOMAIN) -> str | None:
        """Return the version the domain's CHAMPION file names, or None when there is no usable one."""
        try:
            return self.adapters.champion(task, domain)
        except ModelLoadError as e:
            log.debug("no %s champion on disk for domain %s: %s", task, domain, e)
            return None

    def _file_champions(self, task: Task) -> dict[str, str]:
        """Return the version each domain's CHAMPION file names (none when the default's is unusable)."""
        try:
            return self.adapters.domain_champions(task)
        except ModelLoadError as e:
            log.debug("no %s champions on disk: %s", task, e)
            default = self._file_champion(task)
            return {DEFAULT_DOMAIN: default} if default is not None else {}

    def _domain_rollback_target(self, task: Task, current: str, domain: str) -> str | None:
        """Return the earlier version of this domain that served it (the newest), or None."""
        on_disk = set(self.adapters.versions(task))
        earlier = [
            row
            for row in self.versions.list(task)
            if row.domain == domain and row.status == "retired" and row.version != current and row.version in on_disk
        ]
        if not earlier:
            return None
        return max(earlier, key=lambda row: (row.status_at or row.created_at, version_number(row.version))).version

    def _rollback_target(self, task: Task, current: str) -> str:
        """Return the version a default rollback serves: the champion's parent, else the latest retired one."""
        on_disk = set(self.adapters.versions(task))
        rows = self.versions.list(task)
        by_version = {row.version: row for row in rows}
        parent = by_version[current].parent if current in by_version else None
        if parent is not None and parent in on_disk and parent != current:
            parent_row = by_version.get(parent)
            if parent_row is not None and parent_row.status == "retired":
                return parent
        # Versions that were rolled back once are not served again by default: they failed when they went live.
        failed = {event.previous for event in self.versions.events(task=task) if event.outcome == "rolled_back"}
        retired = [
            row
            for row in rows
            if row.status == "retired"
            and row.version != current
            and row.version in on_disk
            and row.version not in failed
        ]
        if not retired:
            raise RegistryError(
                f"no earlier {task} version to roll back to: name one with --to "
                f"(see `finpulse models list --task {task}`)"
            )
        return max(retired, key=lambda row: (row.status_at or row.created_at, version_number(row.version))).version

    def _row_from_disk(self, task: Task, version: str, status: str, serving: str | None = None) -> VersionRow:
        """Build the row of a version found on disk from its model card (a bare row if the card is unreadable)."""
        now = dt.datetime.now(dt.UTC)
        try:
            card = self.adapters.card(task, version)
        except ModelLoadError as e:
            log.warning("registering %s without its model card: %s", version, e)
            return VersionRow(
                version=version,
                task=task,
                parent=None,
                created_at=now,
                status=status,
                reason=f"found on disk by sync; model card unreadable: {e}",
                status_at=now,
                domain=serving or DEFAULT_DOMAIN,
            )
        experience_id = card.data.get("experience_id")
        return VersionRow(
            version=version,
            task=task,
            parent=card.parent,
            created_at=_parse_time(card.created_at) or now,
            experience_id=experience_id if isinstance(experience_id, int) else None,
            span_start=_parse_time(card.data.get("span_start")),
            span_end=_parse_time(card.data.get("span_end")),
            metrics=dict(card.metrics),
            status=status,
            reason="found on disk by sync",
            status_at=now,
            domain=serving or card.domain,
        )

    def _announce(
        self, task: str, version: str, outcome: str, previous: str | None, event: str | None = None
    ) -> Change:
        """Publish a committed change (as `event`, default: its outcome); a failure is reported, never raised."""
        if self._publish is None:
            return Change(task, version, previous, outcome, published=False, note="no publisher configured")
        try:
            self._publish(task, version, event or outcome, previous)
        except Exception as e:  # any Kafka or connection error: the change is committed and must stand
            # Info, not warning: the caller reports Change.note its own way (the CLI prints a one-line note).
            log.info("%s %s %s but not announced: %s", task, version, outcome, e)
            return Change(task, version, previous, outcome, published=False, note=str(e) or type(e).__name__)
        return Change(task, version, previous, outcome, published=True)


def _in(domain: str) -> str:
    return "" if domain == DEFAULT_DOMAIN else f" of domain {domain}"


def _parse_time(value: object) -> dt.datetime | None:
    """Parse an ISO 8601 time from a model card; naive times are taken as UTC, anything else as None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
