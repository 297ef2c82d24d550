"""The model registry on real adapter dirs and a real DuckDB file: crash-safe promotion, sync, reject, rollback,
staging, the `finpulse models` commands and the exported metrics."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from finpulse.cli import main
from learner.adapters import CARD_FILE, AdapterStore, ModelCard
from learner.errors import LearnerError, ModelLoadError
from learner.registry import Registry, RegistryError, VersionNotFoundError, held_out_accuracy
from monitor.metrics import ModelVersionCollector
from storage import History, StorageConfig
from storage.labels import Experience, LabelStore
from storage.models import ModelVersionStore

Published = list[tuple[str, str, str, str | None]]


@pytest.fixture
def root(tmp_path: Path, adapters_dir: Path) -> Path:
    """A private copy of the shipped adapters (sentiment-v1 and topic-v1, both champions)."""
    copy = tmp_path / "adapters"
    # The weights are not needed to register versions: only configs, cards and CHAMPION files.
    shutil.copytree(adapters_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.tmp", ".tmp-*"))
    return copy


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "history.duckdb"


@pytest.fixture
def published() -> Published:
    return []


@pytest.fixture
def registry(root: Path, db: Path, published: Published) -> Registry:
    registry = _registry(root, db, lambda *update: published.append(update))
    registry.sync()
    return registry


def _registry(root: Path, db: Path, publish: Callable[[str, str, str, str | None], None] | None) -> Registry:
    history = History(StorageConfig(duckdb_path=db, lock_timeout_s=5))
    return Registry(AdapterStore(root), ModelVersionStore(history), publish)


def _new_version(root: Path, task: str, parent: str, accuracy: float = 0.9) -> str:
    """Write a version the way the learner does: into a staging dir, committed by one rename."""
    store = AdapterStore(root)
    version = store.next_version(task)  # type: ignore[arg-type]
    staging = store.staging_dir(task, version)  # type: ignore[arg-type]
    source = root / task / f"{task}-v1"
    shutil.copy(source / "adapter_config.json", staging)
    card = json.loads((source / CARD_FILE).read_text())
    card.update(version=version, parent=parent, metrics={"holdout": {"accuracy": accuracy}})
    (staging / CARD_FILE).write_text(json.dumps(card))
    store.commit_staged(task, version)  # type: ignore[arg-type]
    return version


def _candidate(registry: Registry, task: str, parent: str, accuracy: float = 0.9) -> str:
    version = _new_version(registry.adapters.root, task, parent, accuracy)
    registry.add_candidate(task, version, parent, None, {"holdout": {"accuracy": accuracy}})  # type: ignore[arg-type]
    return version


def _champion_file(root: Path, task: str) -> str:
    return (root / task / "CHAMPION").read_text().strip()


def test_sync_registers_the_versions_on_disk(registry: Registry, published: Published) -> None:
    rows = {row.version: row for row in registry.list()}
    assert set(rows) == {"sentiment-v1", "topic-v1"}
    v1 = rows["sentiment-v1"]
    assert (v1.status, v1.parent, v1.task) == ("champion", None, "sentiment")
    assert held_out_accuracy(v1.metrics) == pytest.approx(0.8681, abs=1e-4)  # from the model card
    assert v1.created_at.isoformat() == "2026-12-02T05:40:00+00:00"
    assert registry.sync() == [] and published == []  # nothing to repair, nothing announced
    assert registry.versions.event_counts() == {}
    assert registry.champions() == {"sentiment": "sentiment-v1", "topic": "topic-v1"}


def test_promote_writes_the_file_then_duckdb_then_announces(
    registry: Registry, root: Path, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = _candidate(registry, "sentiment", "sentiment-v1")
    assert registry.versions.get(v2).status == "candidate"  # type: ignore[union-attr]
    calls: list[str] = []
    file_write, db_write = AdapterStore.set_champion, ModelVersionStore.set_champion

    def spy_file(self: AdapterStore, *args: object) -> None:
        calls.append("file")
        file_write(self, *args)  # type: ignore[arg-type]

    def spy_db(self: ModelVersionStore, *args: object, **kwargs: object) -> str | None:
        calls.append("duckdb")
        return db_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AdapterStore, "set_champion", spy_file)
    monkeypatch.setattr(ModelVersionStore, "set_champion", spy_db)

    def spy_publish(*update: object) -> None:
        calls.append("publish")
        published.append(update)  # type: ignore[arg-type]

    registry._publish = spy_publish

    change = registry.promote("sentiment", v2, reason="holdout +3.1 points")
    assert calls == ["file", "duckdb", "publish"]
    assert (change.version, change.previous, change.outcome, change.published) == (v2, "sentiment-v1", "promoted", True)
    assert published == [("sentiment", v2, "promoted", "sentiment-v1")]
    assert _champion_file(root, "sentiment") == v2
    rows = {row.version: row for row in registry.list("sentiment")}
    assert (rows[v2].status, rows[v2].reason) == ("champion", "holdout +3.1 points")
    assert (rows["sentiment-v1"].status, rows["sentiment-v1"].reason) == ("retired", f"replaced by {v2}")
    [event] = registry.versions.events()
    assert (event.outcome, event.version, event.previous, event.source) == ("promoted", v2, "sentiment-v1", "learner")
    with pytest.raises(RegistryError, match="already the sentiment champion"):
        registry.promote("sentiment", v2, reason=None)


def test_a_crash_after_the_champion_file_is_repaired_by_sync(
    registry: Registry, root: Path, db: Path, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = _candidate(registry, "sentiment", "sentiment-v1")

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed between the CHAMPION file and DuckDB")

    with monkeypatch.context() as patch:
        patch.setattr(ModelVersionStore, "set_champion", killed)
        with pytest.raises(RuntimeError, match="killed"):
            registry.promote("sentiment", v2, reason="gate passed")
    # The file is the commit point: the new version serves, DuckDB still records the old one, nobody was told.
    assert AdapterStore(root).champion("sentiment") == v2
    assert registry.versions.champion("sentiment").version == "sentiment-v1"  # type: ignore[union-attr]
    assert published == []

    restarted = _registry(root, db, lambda *update: published.append(update))
    [change] = restarted.sync()
    assert (change.task, change.version, change.previous, change.outcome) == (
        "sentiment",
        v2,
        "sentiment-v1",
        "promoted",
    )
    assert restarted.versions.champion("sentiment").version == v2  # type: ignore[union-attr]
    assert restarted.versions.get("sentiment-v1").status == "retired"  # type: ignore[union-attr]
    assert published == [("sentiment", v2, "promoted", "sentiment-v1")]
    assert restarted.versions.event_counts() == {("sentiment", "promoted"): 1}
    assert restarted.sync() == []


def test_a_crash_before_the_champion_file_changes_nothing(
    registry: Registry, root: Path, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = _candidate(registry, "sentiment", "sentiment-v1")

    def killed(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(AdapterStore, "set_champion", killed)
    with pytest.raises(OSError, match="disk full"):
        registry.promote("sentiment", v2, reason=None)
    assert _champion_file(root, "sentiment") == "sentiment-v1"
    assert registry.versions.champion("sentiment").version == "sentiment-v1"  # type: ignore[union-attr]
    assert registry.versions.events() == [] and published == []


def test_sync_adopts_a_version_written_to_disk_but_never_registered(registry: Registry, root: Path) -> None:
    v2 = _new_version(root, "topic", "topic-v1", accuracy=0.8)  # a learner killed before add_candidate
    assert registry.sync() == []
    row = registry.versions.get(v2)
    assert row is not None and (row.status, row.parent) == ("retired", "topic-v1")
    assert held_out_accuracy(row.metrics) == 0.8


def test_reject_keeps_the_champion(registry: Registry, root: Path, db: Path) -> None:
    labels = LabelStore(History(StorageConfig(duckdb_path=db, lock_timeout_s=5)))
    from datetime import UTC, datetime

    from storage.labels import LabelRow

    labels.write([LabelRow(id="n1", text="t", sentiment="negative", topic=None, labelled_at=datetime.now(UTC))])
    experience: Experience = labels.create_experience("sentiment", [("n1", "t", "negative")], [])
    v2 = _new_version(root, "sentiment", "sentiment-v1")
    row = registry.add_candidate("sentiment", v2, "sentiment-v1", experience, {"holdout": {"accuracy": 0.5}})
    assert (row.experience_id, row.span_start) == (experience.id, experience.span_start)
    with pytest.raises(RegistryError, match="registered already"):
        registry.add_candidate("sentiment", v2, "sentiment-v1", experience, {})
    rejected = registry.reject("sentiment", v2, reason="holdout -2.0 points")
    assert (rejected.status, rejected.reason) == ("rejected", "holdout -2.0 points")
    assert _champion_file(root, "sentiment") == "sentiment-v1"
    [event] = registry.versions.events(task="sentiment")
    assert (event.outcome, event.version, event.previous) == ("rejected", v2, "sentiment-v1")
    with pytest.raises(RegistryError, match="is the serving sentiment champion: roll it back"):
        registry.reject("sentiment", "sentiment-v1", reason=None)
    with pytest.raises(RegistryError, match="no adapter at"):
        registry.add_candidate("sentiment", "sentiment-v9", "sentiment-v1", None, {})


def test_rollback_serves_the_parent_or_the_latest_retired_version(
    registry: Registry, root: Path, published: Published
) -> None:
    with pytest.raises(RegistryError, match="no earlier sentiment version to roll back to"):
        registry.rollback("sentiment")
    v2 = _candidate(registry, "sentiment", "sentiment-v1")
    registry.promote("sentiment", v2, reason="gate")
    v3 = _candidate(registry, "sentiment", v2)
    registry.promote("sentiment", v3, reason="gate")
    v4 = _candidate(registry, "sentiment", v3)
    registry.reject("sentiment", v4, reason="worse")

    change = registry.rollback("sentiment", reason="live accuracy dropped")
    assert (change.version, change.previous, change.outcome) == (v2, v3, "rolled_back")  # v3's parent
    assert published[-1] == ("sentiment", v2, "rolled_back", v3)
    assert _champion_file(root, "sentiment") == v2
    assert (registry.versions.get(v3).status, registry.versions.get(v3).reason) == (  # type: ignore[union-attr]
        "retired",
        f"rolled back to {v2}",
    )
    with pytest.raises(RegistryError, match=f"{v4} never served \\(status rejected\\)"):
        registry.rollback("sentiment", to=v4)
    with pytest.raises(RegistryError, match="already the sentiment champion"):
        registry.rollback("sentiment", to=v2)
    with pytest.raises(RegistryError, match="not a sentiment version"):
        registry.rollback("sentiment", to="topic-v1")
    with pytest.raises(VersionNotFoundError, match="no version sentiment-v9: see `finpulse models list`"):
        registry.rollback("sentiment", to="sentiment-v9")
    assert registry.rollback("sentiment", to="sentiment-v1").version == "sentiment-v1"
    # v1 has no parent: the default is the latest retired version that was not itself rolled back (not v2, v3).
    with pytest.raises(RegistryError, match="no earlier sentiment version"):
        registry.rollback("sentiment")
    counts = registry.versions.event_counts()
    assert counts == {("sentiment", "promoted"): 2, ("sentiment", "rejected"): 1, ("sentiment", "rolled_back"): 2}


def test_rollback_without_a_parent_takes_the_latest_retired_version(registry: Registry) -> None:
    v2 = _candidate(registry, "topic", "topic-v1")
    registry.promote("topic", v2, reason="gate")
    registry.promote("topic", "topic-v1", reason="manual", source="cli")  # v1 serves again, v2 retired
    assert registry.rollback("topic").version == v2


def test_a_failed_announcement_does_not_undo_the_promotion(registry: Registry, root: Path) -> None:
    def unreachable(*update: object) -> None:
        raise ConnectionError("Kafka at b1:9092 does not answer")

    registry._publish = unreachable
    v2 = _candidate(registry, "topic", "topic-v1")
    change = registry.promote("topic", v2, reason="gate")
    assert not change.published and change.note == "Kafka at b1:9092 does not answer"
    assert _champion_file(root, "topic") == v2 and registry.versions.champion("topic").version == v2  # type: ignore[union-attr]


def test_staging_dirs_are_invisible_until_committed_and_discarded_after_a_crash(root: Path) -> None:
    store = AdapterStore(root)
    staging = store.staging_dir("sentiment", "sentiment-v2")
    assert staging == root / "sentiment" / ".tmp-sentiment-v2" and staging.is_dir()
    (staging / "adapter_config.json").write_text("{}")
    assert store.versions("sentiment") == ["sentiment-v1"] and store.next_version("sentiment") == "sentiment-v2"
    # A second run staging the same version starts from an empty dir.
    assert list(store.staging_dir("sentiment", "sentiment-v2").iterdir()) == []
    with pytest.raises(ModelLoadError, match="holds no adapter_config.json"):
        store.commit_staged("sentiment", "sentiment-v2")
    with pytest.raises(ModelLoadError, match="exists already"):
        store.staging_dir("sentiment", "sentiment-v1")
    with pytest.raises(ModelLoadError, match="a topic version is named topic-vN"):
        store.staging_dir("topic", "sentiment-v5")
    store.staging_dir("topic", "topic-v7")
    assert store.discard_staging() == [root / "sentiment" / ".tmp-sentiment-v2", root / "topic" / ".tmp-topic-v7"]
    assert store.discard_staging() == []
    assert sorted(p.name for p in (root / "sentiment").iterdir()) == ["CHAMPION", "sentiment-v1"]

    committed = _new_version(root, "sentiment", "sentiment-v1")
    assert store.versions("sentiment") == ["sentiment-v1", committed]
    assert ModelCard.read(store.version_dir("sentiment", committed) / CARD_FILE).parent == "sentiment-v1"
    assert not (root / "sentiment" / f".tmp-{committed}").exists()


def test_collector_exports_every_task_and_outcome_and_the_champions(registry: Registry) -> None:
    metrics = CollectorRegistry()
    metrics.register(_collector(registry))

    def value(name: str, **labels: str) -> float | None:
        return metrics.get_sample_value(name, {"domain": "default", **labels})

    for task in ("sentiment", "topic"):
        for outcome in ("promoted", "rejected", "rolled_back"):
            assert value("finpulse_model_versions_total", task=task, outcome=outcome) == 0
    assert value("finpulse_model_champion_info", task="sentiment", version="sentiment-v1") == 1
    v2 = _candidate(registry, "sentiment", "sentiment-v1")
    registry.promote("sentiment", v2, reason="gate")
    registry.rollback("sentiment", source="cli")  # a CLI action in another process counts too
    assert value("finpulse_model_versions_total", task="sentiment", outcome="promoted") == 1
    assert value("finpulse_model_versions_total", task="sentiment", outcome="rolled_back") == 1
    assert value("finpulse_model_versions_total", task="topic", outcome="rolled_back") == 0
    assert value("finpulse_model_champion_info", task="sentiment", version="sentiment-v1") == 1
    assert value("finpulse_model_champion_info", task="sentiment", version=v2) is None


def test_collector_exports_a_domain_from_its_first_event_and_keeps_it(registry: Registry) -> None:
    metrics = CollectorRegistry()
    metrics.register(_collector(registry))

    def value(name: str, **labels: str) -> float | None:
        return metrics.get_sample_value(name, labels)

    def champions() -> dict[tuple[str, str], str]:
        [family] = [f for f in metrics.collect() if f.name == "finpulse_model_champion_info"]
        return {(s.labels["task"], s.labels["domain"]): s.labels["version"] for s in family.samples}

    # No series of a domain before it has anything: the default domain alone is exported from 0.
    assert value("finpulse_model_versions_total", task="sentiment", domain="stocktweets", outcome="promoted") is None
    default_champions = {("sentiment", "default"): "sentiment-v1", ("topic", "default"): "topic-v1"}
    assert champions() == default_champions
    version = _candidate(registry, "sentiment", "sentiment-v1")
    registry.promote("sentiment", version, "better on stocktweets", domain="stocktweets")
    stocktweets = {"task": "sentiment", "domain": "stocktweets"}
    assert value("finpulse_model_versions_total", **stocktweets, outcome="promoted") == 1
    # The domain's other outcomes start from 0, so that its first rejection or rollback is an increase.
    assert value("finpulse_model_versions_total", **stocktweets, outcome="rejected") == 0
    assert value("finpulse_model_versions_total", **stocktweets, outcome="rolled_back") == 0
    assert value("finpulse_model_champion_info", **stocktweets, version=version) == 1
    assert champions() == {**default_champions, ("sentiment", "stocktweets"): version}
    assert value("finpulse_model_versions_total", task="sentiment", domain="default", outcome="promoted") == 0
    assert value("finpulse_model_versions_total", task="topic", domain="stocktweets", outcome="promoted") is None
    # Withdrawn, the domain keeps its counters and loses its champion series.
    registry.rollback("sentiment", domain="stocktweets")
    assert value("finpulse_model_versions_total", **stocktweets, outcome="rolled_back") == 1
    assert champions() == default_champions


def _collector(registry: Registry) -> ModelVersionCollector:
    return ModelVersionCollector(registry.versions.event_counts_by_domain, registry.versions.champions_by_domain)


def test_collector_keeps_the_last_counts_when_duckdb_cannot_be_read() -> None:
    answers: list[dict[tuple[str, str, str], int] | Exception] = [
        {("topic", "default", "rejected"): 2, ("topic", "wire", "rejected"): 1},
        OSError("locked"),
    ]

    def counts() -> dict[tuple[str, str, str], int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    metrics = CollectorRegistry()
    metrics.register(ModelVersionCollector(counts))
    for _ in range(2):
        for domain, count in (("default", 2), ("wire", 1)):
            labels = {"task": "topic", "domain": domain, "outcome": "rejected"}
            assert metrics.get_sample_value("finpulse_model_versions_total", labels) == count
    labels = {"task": "topic", "domain": "default", "version": "topic-v1"}
    assert metrics.get_sample_value("finpulse_model_champion_info", labels) is None


# -- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def cli(root: Path, db: Path, monkeypatch: pytest.MonkeyPatch, published: Published) -> Callable[..., int]:
    """Run `finpulse models …` on the private adapters and history, announcing into `published`."""
    monkeypatch.setattr("finpulse.cli._update_publisher", lambda config: lambda *update: published.append(update))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables fit the terminal: keep every cell whole

    def run(*argv: str) -> int:
        return main(["models", *argv, "--duckdb-path", str(db), "--adapters-dir", str(root)])

    return run


def test_models_list_and_show(
    cli: Callable[..., int], root: Path, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _new_version(root, "sentiment", "sentiment-v1", accuracy=0.91)
    assert cli("list") == 0
    table = capsys.readouterr().out
    for needle in ("sentiment-v2", "sentiment-v1", "topic-v1", "champion", "retired", "0.9100", "0.8681"):
        assert needle in table
    assert cli("list", "--task", "topic", "--json") == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["version"], row["status"], row["parent"]) == ("topic-v1", "champion", None)
    assert cli("show", "sentiment-v1", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["serving"] is True and shown["card"]["hyperparameters"]["lora_r"] == 64
    assert cli("show", "sentiment-v2") == 0
    text = capsys.readouterr().out
    assert "sentiment-v2 (sentiment, retired)" in text and '"parent": "sentiment-v1"' in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["show", "sentiment-v9"], "finpulse models: error: no version sentiment-v9: see `finpulse models list`"),
        (["promote", "sentiment-v9"], "no version sentiment-v9: see `finpulse models list`"),
        (["promote", "sentiment-v1"], "sentiment-v1 is already the sentiment champion"),
        (["show", "bogus"], "no version bogus: versions are named sentiment-vN or topic-vN"),
        (["rollback", "topic", "--to", "topic-v9"], "no version topic-v9: see `finpulse models list`"),
        (["rollback", "topic"], "no earlier topic version to roll back to: name one with --to"),
    ],
)
def test_models_errors_are_one_line(
    cli: Callable[..., int], argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*argv) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_models_promote_and_rollback(
    cli: Callable[..., int], root: Path, db: Path, published: Published, capsys: pytest.CaptureFixture[str]
) -> None:
    v2 = _new_version(root, "sentiment", "sentiment-v1")
    assert cli("promote", v2, "--reason", "hand-checked") == 0
    captured = capsys.readouterr()
    assert captured.err == f"finpulse models promote: warning: {v2} went live without the learner's held-out gate\n"
    assert f"promoted {v2}: the sentiment champion now (was sentiment-v1)" in captured.out
    assert "note:" not in captured.out
    assert published == [("sentiment", v2, "manual", "sentiment-v1")]
    assert _champion_file(root, "sentiment") == v2

    assert cli("rollback", "sentiment") == 0
    assert f"rolled back sentiment: sentiment-v1 serves again (was {v2})" in capsys.readouterr().out
    assert published[-1] == ("sentiment", "sentiment-v1", "rolled_back", v2)
    events = ModelVersionStore(History(StorageConfig(duckdb_path=db))).events()
    assert [(e.outcome, e.source, e.reason) for e in events] == [
        ("promoted", "cli", "hand-checked"),
        ("rolled_back", "cli", f"rolled back from {v2}"),
    ]


@pytest.mark.parametrize(
    ("servers", "why"),
    [
        # No cluster configured and no local broker running in this data dir.
        ("", "no Kafka configured and the local broker is not running"),
        # A configured cluster that refuses connections: found out in milliseconds, not producer timeouts.
        ("127.0.0.1:1", "Kafka at 127.0.0.1:1 does not answer"),
    ],
)
def test_models_promote_without_kafka_still_promotes(
    servers: str, why: str, root: Path, db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v2 = _new_version(root, "topic", "topic-v1")
    argv = ["models", "promote", v2, "--duckdb-path", str(db), "--adapters-dir", str(root)]
    argv += ["--set", f"kafka.bootstrap_servers={servers}", "--set", f"kafka.data_dir={tmp_path / 'kafka'}"]
    assert main(argv) == 0  # the real publisher factory of finpulse.runtime
    out = capsys.readouterr().out
    assert f"promoted {v2}" in out
    assert f"note: not announced on model.updates ({why}); scorers switch to {v2}" in out
    assert _champion_file(root, "topic") == v2


def test_models_commands_repair_a_crashed_promotion_first(
    cli: Callable[..., int], root: Path, db: Path, published: Published, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("list") == 0
    v2 = _new_version(root, "topic", "topic-v1")
    AdapterStore(root).set_champion("topic", v2)  # the learner died right after its commit point
    capsys.readouterr()
    assert cli("list", "--json") == 0
    captured = capsys.readouterr()
    assert f"repaired: DuckDB now records {v2} as the topic champion" in captured.err
    statuses = {row["version"]: row["status"] for row in json.loads(captured.out)}
    assert statuses[v2] == "champion" and statuses["topic-v1"] == "retired"
    assert published == [("topic", v2, "promoted", "topic-v1")]


def test_learner_errors_are_known_to_the_cli() -> None:
    assert issubclass(RegistryError, LearnerError)


# --- domains ---------------------------------------------------------------------------------------------------


def test_a_domain_promotion_leaves_the_default_champion_and_rolls_back_to_it(
    registry: Registry, root: Path, published: Published
) -> None:
    version = _candidate(registry, "sentiment", "sentiment-v1")
    change = registry.promote("sentiment", version, "better on the social tweets", domain="social")
    assert change.previous is None and change.published
    store = AdapterStore(root)
    # The default domain is served what it was; the domain has its own champion, on disk and in DuckDB.
    assert store.champion("sentiment") == "sentiment-v1"
    assert store.domain_champions("sentiment") == {"default": "sentiment-v1", "social": version}
    assert registry.versions.champion("sentiment").version == "sentiment-v1"  # type: ignore[union-attr]
    assert registry.versions.champion("sentiment", "social").version == version  # type: ignore[union-attr]
    assert registry.versions.champions()["sentiment"] == "sentiment-v1"
    assert registry.show(version).serving
    # Nothing earlier of its own: a rollback withdraws the domain's champion, so it serves the default again.
    back = registry.rollback("sentiment", domain="social")
    assert back.version == "sentiment-v1" and back.previous == version
    assert store.domain_champions("sentiment") == {"default": "sentiment-v1"}
    assert registry.versions.get(version).status == "retired"  # type: ignore[union-attr]
    assert [(e.outcome, e.domain) for e in registry.versions.events(version=version)] == [
        ("promoted", "social"),
        ("rolled_back", "social"),
    ]
    with pytest.raises(RegistryError, match="no sentiment champion of its own"):
        registry.rollback("sentiment", domain="social")


def test_sync_repairs_a_domain_pointer_that_duckdb_missed(registry: Registry, root: Path, db: Path) -> None:
    version = _candidate(registry, "topic", "topic-v1")
    AdapterStore(root).set_champion("topic", version, "wire")  # a promotion that crashed before DuckDB
    changes = _registry(root, db, None).sync()
    assert [(c.task, c.version, c.outcome) for c in changes] == [("topic", version, "promoted")]
    assert registry.versions.champion("topic", "wire").version == version  # type: ignore[union-attr]
    assert registry.versions.champion("topic").version == "topic-v1"  # type: ignore[union-attr]


def test_domain_names_are_checked_where_they_become_file_names(root: Path) -> None:
    from learner.domains import DomainTable

    store = AdapterStore(root)
    with pytest.raises(ModelLoadError, match="not a domain name"):
        store.set_champion("sentiment", "sentiment-v1", "../escape")
    with pytest.raises(ValueError, match="not a domain name"):
        DomainTable({"x": "Has Spaces"})
    table = DomainTable({"StockTwits": "social"})
    assert table.domain_of("stocktwits") == "social" and table.domain_of("reuters") == "default"
    assert table.domain_of(None) == "default" and table.domains == ["default", "social"]
