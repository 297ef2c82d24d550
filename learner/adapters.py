"""Adapters on disk: `<adapters_dir>/<task>/<version>/` in peft format with a model card, and a champion per task."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.errors import ModelLoadError
from learner.labels import TASKS, Task

CARD_FILE = "model_card.json"
CHAMPION_FILE = "CHAMPION"
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
        found = [p.name for p in task_dir.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(found, key=_version_number)

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
