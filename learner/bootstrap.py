"""Train the first adapter versions of both tasks from the twitter-financial-news train splits."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from learner.adapters import AdapterStore
from learner.config import ModelConfig, TrainConfig
from learner.datasets import Example, task_data
from learner.tasks import Task, spec_of, task_names
from learner.training import TrainResult, train_adapter


@dataclass(frozen=True)
class BootstrapResult:
    """The trained versions of every task."""

    results: dict[str, TrainResult]


def _splits(task: Task, data_dir: Path | None) -> tuple[list[Example], list[Example]]:
    return task_data(task, "train", data_dir), task_data(task, "valid", data_dir)


def _source(task: Task) -> str:
    """Return where a task's bootstrap data comes from, as its model card records it."""
    data = spec_of(task).data
    return f"{data.hub_id} (data/{data.folder})"


def bootstrap(
    model_config: ModelConfig,
    train_config: TrainConfig,
    tasks: tuple[Task, ...] | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
) -> BootstrapResult:
    """Train a version of each task (default: every registered one), evaluate it on the valid split and make it
    champion."""
    store = AdapterStore(model_config.adapters_dir)
    results: dict[str, TrainResult] = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress) as progress:
        for task in tasks if tasks is not None else task_names():
            train, valid = _splits(task, data_dir)
            if limit is not None:
                train, valid = train[:limit], valid[:limit]
            version = store.next_version(task)
            bar = progress.add_task(f"{task} {version}", total=None, loss=float("nan"))

            def report(step: int, total: int, loss: float, bar: TaskID = bar) -> None:
                progress.update(bar, completed=step, total=total, loss=loss)

            final = store.version_dir(task, version)
            # Train into a scratch directory and rename: a crash never leaves a half-written version.
            scratch = final.with_name(f".{version}.partial")
            shutil.rmtree(scratch, ignore_errors=True)
            data = {
                "train": f"{_source(task)} train split, {len(train)} texts",
                "valid": f"{_source(task)} valid split, {len(valid)} texts",
            }
            result = train_adapter(task, train, valid, scratch, version, model_config, train_config, data, report)
            scratch.rename(final)
            store.set_champion(task, version)
            results[task] = TrainResult(version, final, result.metrics, result.train_s)
    return BootstrapResult(results)
