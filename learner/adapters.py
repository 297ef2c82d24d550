"""Adapters on disk: `<adapters_dir>/<task>/<version>/` in peft format with a model card, and a champion per task.

Beside peft's `adapter_config.json` and weights, a version holds what Hugging Face readers look for: `config.json`
(the base model's config with the task's `id2label`/`label2id`) and `README.md` (a model card with hub metadata),
both derived from `model_card.json` by `write_hub_files`. The labels cannot live in `adapter_config.json`: peft
0.13 builds its `LoraConfig` from every key there and refuses unknown ones, and neither peft nor transformers
reads labels from it; `AutoConfig.from_pretrained(<version dir>)` reads `config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner import model_card
from learner.domains import DEFAULT_DOMAIN, check_domain
from learner.encoder import base_model_path
from learner.errors import ModelLoadError
from learner.tasks import Task, labels_of, task_names, version_number, version_task

CARD_FILE = "model_card.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HUB_CONFIG_FILE = "config.json"
README_FILE = "README.md"
# The hub id `learner.training.save_adapter` records for the packaged base encoder. It is training.PACKAGED_BASE_ID,
# repeated because training imports this module; tests/test_model_card.py keeps the two equal.
PACKAGED_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
CHAMPION_FILE = "CHAMPION"
STAGING_PREFIX = ".tmp-"


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
    domain: str = DEFAULT_DOMAIN  # the domain whose labels it learnt last (the default: the shipped data)

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
            if p.is_dir() and not p.name.startswith(STAGING_PREFIX) and version_task(p.name) is not None
        ]
        return sorted(found, key=version_number)

    def staging_dir(self, task: Task, version: str) -> Path:
        """Return an empty directory to write a new version into, next to where it will live.

        Nothing reads it until `commit_staged` renames it into place, so a run killed while writing leaves
        no half-written version behind, only a staging dir that `discard_staging` removes.
        """
        if version_task(version) != task:
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
        write_hub_files(staging)  # written here, so every committed version has them and they are fsynced below
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
        for name in (task,) if task is not None else task_names():
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
        number = version_number(existing[-1]) + 1 if existing else 1
        return f"{task}-v{number}"

    def champion(self, task: Task, domain: str = DEFAULT_DOMAIN) -> str:
        """Return the champion version of a task in a domain, or raise if there is none."""
        pointer = self._pointer(task, domain)
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError as e:
            if domain != DEFAULT_DOMAIN:
                raise ModelLoadError(
                    f"no {task} champion for domain {domain!r}: it is served the default domain's"
                ) from e
            raise ModelLoadError(
                f"no {task} adapter in {self.root}: run `finpulse bootstrap` to train the first versions"
            ) from e
        if not (self.version_dir(task, version) / "adapter_config.json").is_file():
            raise ModelLoadError(f"{pointer} names {version!r}, which is not an adapter in {self.root / task}")
        return version

    def domain_champions(self, task: Task) -> dict[str, str]:
        """Return the champion of a task in every domain that has its own, the default domain included."""
        out = {DEFAULT_DOMAIN: self.champion(task)}
        task_dir = self.root / task
        for pointer in sorted(task_dir.glob(f"{CHAMPION_FILE}.*")):
            domain = pointer.name[len(CHAMPION_FILE) + 1 :]
            if domain in (DEFAULT_DOMAIN, "tmp"):  # CHAMPION.tmp: what an older finpulse's crash left
                continue
            try:
                out[check_domain(domain)] = self.champion(task, domain)
            except ValueError as e:
                raise ModelLoadError(f"{pointer} is not a champion pointer: {e}") from e
        return out

    def set_champion(self, task: Task, version: str, domain: str = DEFAULT_DOMAIN) -> None:
        """Point the champion of a task in a domain at `version`, atomically (a crash leaves the old or the new)."""
        if not (self.version_dir(task, version) / "adapter_config.json").is_file():
            raise ModelLoadError(f"cannot promote {version!r}: no adapter at {self.version_dir(task, version)}")
        pointer = self._pointer(task, domain)
        tmp = pointer.with_name(f".{pointer.name}.tmp")  # hidden: never taken for a domain's pointer
        tmp.write_text(version + "\n", encoding="utf-8")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, pointer)

    def clear_champion(self, task: Task, domain: str) -> None:
        """Remove a domain's own champion, so it is served the default domain's again."""
        if domain == DEFAULT_DOMAIN:
            raise ModelLoadError("the default domain always has a champion; promote or roll back instead")
        self._pointer(task, domain).unlink(missing_ok=True)
        _fsync_dir(self.root / task)

    def _pointer(self, task: Task, domain: str) -> Path:
        if domain == DEFAULT_DOMAIN:
            return self.root / task / CHAMPION_FILE
        try:
            return self.root / task / f"{CHAMPION_FILE}.{check_domain(domain)}"
        except ValueError as e:
            raise ModelLoadError(str(e)) from e

    def card(self, task: Task, version: str) -> ModelCard:
        """Read the model card of a version."""
        return ModelCard.read(self.version_dir(task, version) / CARD_FILE)

    def champions(self) -> dict[str, str]:
        """Return the champion of every task."""
        return {task: self.champion(task) for task in task_names()}


def write_hub_files(version_dir: Path) -> None:
    """Write `config.json` (labels) and `README.md` (model card) of a version from its model card and adapter config.

    Regenerating them changes nothing else in the version: the adapter and its weights stay as they are.
    """
    card = ModelCard.read(version_dir / CARD_FILE)
    adapter_config = _read_json(version_dir / ADAPTER_CONFIG_FILE)
    base = str(adapter_config.get("base_model_name_or_path") or "")
    config = hub_config(card, _read_json(_base_dir(base, version_dir) / HUB_CONFIG_FILE), base)
    (version_dir / HUB_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (version_dir / README_FILE).write_text(model_card.render(asdict(card)), encoding="utf-8")


def hub_config(card: ModelCard, base_config: dict[str, Any], base: str) -> dict[str, Any]:
    """Return the transformers config of base + adapter: the base's, with the card's labels and a classifier class."""
    expected = list(labels_of(card.task)) if card.task in task_names() else None
    if expected is None or card.labels != expected:
        raise ModelLoadError(
            f"model card of {card.version} lists labels {card.labels}, but the {card.task} classifier outputs "
            f"{expected}: fix the card's `task` or `labels`"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = dict(base_config)
    classifier = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(str(config.get("model_type")))
    if classifier is not None:
        config["architectures"] = [classifier]
    config.update(
        # transformers derives num_labels from id2label; it is written too for readers that do not.
        _name_or_path=base,
        id2label={str(i): label for i, label in enumerate(card.labels)},
        label2id={label: i for i, label in enumerate(card.labels)},
        num_labels=len(card.labels),
        problem_type="single_label_classification",
    )
    return config


def _base_dir(base: str, version_dir: Path) -> Path:
    """Return the local directory of the base model an adapter config names: the packaged one, or a path."""
    try:
        return base_model_path("" if base == PACKAGED_BASE_ID else base)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"{version_dir / ADAPTER_CONFIG_FILE} names base model {base!r}, which is neither the packaged "
            f"{PACKAGED_BASE_ID} nor a local model directory: {e}"
        ) from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} holds no JSON object")
    return raw


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
