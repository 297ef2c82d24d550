"""Adapters on disk: `<adapters_dir>/<task>/<version>/` in peft format with a model card, and a champion per task."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.errors import ModelLoadError
from learner.labels import TASKS, Task

CARD_FILE = "model_card.json"
CHAMPION_FILE = "CHAMPION"
STAGING_PREFIX = ".tmp-"
_VERSION = re.compile(r"^(sentiment|topic)-v(\d+)$")


@dataclass(frozen=True)
class ModelCard:
    """What a person needs to trust an adapter version: its data, metrics, lineage and seed."""

    version: str
    task: str
    labels: list[str]
    base_model: str
    parent: str | None
    created_at: str
    seed: int
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise to indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Read a model card, ignoring keys written by newer versions."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read model card {path}: {e}") from e
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise ModelLoadError(f"model card {path} lacks a field: {e}") from e


def now_utc() -> str:
    """Return the current time as RFC 3339 UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class AdapterStore:
    """The adapter directory: versions per task and which one is champion."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def version_dir(self, task: Task, version: str) -> Path:
        """Return the directory of one adapter version."""
        return self.root / task / version

    def versions(self, task: Task) -> list[str]:
        """List the versions of a task present on disk, oldest first."""
        task_dir = self.root / task
        if not task_dir.is_dir():
            return []
        # Staging dirs (`.tmp-<version>`) are not versions: a killed run may have left one half-written.
        found = [
            p.name
            for p in task_dir.iterdir()
            if p.is_dir() and not p.name.startswith(STAGING_PREFIX) and _VERSION.match(p.name)
        ]
        return sorted(found, key=_version_number)

    def staging_dir(self, task: Task, version: str) -> Path:
        """Return an empty directory to write a new version into, next to where it will live.

        Nothing reads it until `commit_staged` renames it into place, so a run killed while writing leaves
        no half-written version behind, only a staging dir that `discard_staging` removes.
        """
        if _VERSION.match(version) is None or not version.startswith(f"{task}-v"):
            raise ModelLoadError(f"cannot stage {version!r}: a {task} version is named {task}-vN")
        if self.version_dir(task, version).exists():
            raise ModelLoadError(f"cannot stage {version}: {self.version_dir(task, version)} exists already")
        staging = self.root / task / f"{STAGING_PREFIX}{version}"
        if staging.exists():
            shutil.rmtree(staging)  # the leftover of an earlier run that died writing this version
        staging.mkdir(parents=True)
        return staging

    def commit_staged(self, task: Task, version: str) -> Path:
        """Make a staged version visible, atomically: fsync its files, then rename the dir into place."""
        staging = self.root / task / f"{STAGING_PREFIX}{version}"
        target = self.version_dir(task, version)
        if not (staging / "adapter_config.json").is_file():
            raise ModelLoadError(f"cannot commit {version}: {staging} holds no adapter_config.json")
        if target.exists():
            # os.rename would silently replace an empty directory and fail on a full one.
            raise ModelLoadError(f"cannot commit {version}: {target} exists already; stage the next version")
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                _fsync(path)
        for path in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
            _fsync_dir(path)
        _fsync_dir(staging)
        os.rename(staging, target)
        # The rename is durable only once the directory entry is.
        _fsync_dir(target.parent)
        return target

    def discard_staging(self, task: Task | None = None) -> list[Path]:
        """Remove the staging dirs that killed runs left behind (of `task`, or of every task); return them.

        Call it only where no other process is staging: at the learner's start, never from the CLI.
        """
        removed: list[Path] = []
        for name in (task,) if task is not None else TASKS:
            task_dir = self.root / name
            if not task_dir.is_dir():
                continue
            for path in sorted(task_dir.iterdir()):
                if path.is_dir() and path.name.startswith(STAGING_PREFIX):
                    shutil.rmtree(path)
                    removed.append(path)
        return removed

    def next_version(self, task: Task) -> str:
        """Return the name the next version of a task gets."""
        existing = self.versions(task)
        number = _version_number(existing[-1]) + 1 if existing else 1
        return f"{task}-v{number}"

    def champion(self, task: Task) -> str:
        """Return the champion version of a task, or raise if there is none."""
        pointer = self.root / task / CHAMPION_FILE
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError as e:
            raise ModelLoadError(
                f"no {task} adapter in {self.root}: run `finpulse bootstrap` to train the first versions"
            ) from e
        if not (self.version_dir(task, version) / "adapter_config.json").is_file():
            raise ModelLoadError(f"{pointer} names {version!r}, which is not an adapter in {self.root / task}")
        return version

    def set_champion(self, task: Task, version: str) -> None:
        """Point the champion of a task at `version`, atomically (a crash leaves the old or the new one)."""
        if not (self.version_dir(task, version) / "adapter_config.json").is_file():
            raise ModelLoadError(f"cannot promote {version!r}: no adapter at {self.version_dir(task, version)}")
        pointer = self.root / task / CHAMPION_FILE
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(version + "\n", encoding="utf-8")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, pointer)

    def card(self, task: Task, version: str) -> ModelCard:
        """Read the model card of a version."""
        return ModelCard.read(self.version_dir(task, version) / CARD_FILE)

    def champions(self) -> dict[str, str]:
        """Return the champion of every task."""
        return {task: self.champion(task) for task in TASKS}


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    return int(match.group(2)) if match else 0


def _fsync(path: Path) -> None:
    """Flush one file's data to disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk (its new and renamed children)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
