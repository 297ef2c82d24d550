"""The topic task learns through the same path as sentiment: 20 classes, its own memory, EWC state and card.

Real parts: the packaged MiniLM, the shipped topic-v1 adapter, avalanche training, the TFNS topic data. One
candidate with the shipped defaults (~1 minute on 2 CPU cores); no broker, since the label path is shared with
sentiment and tested against Kafka there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from learner.adapters import AdapterStore
from learner.config import ContinualConfig, ModelConfig
from learner.continual import load_tensors
from learner.datasets import tfns_topic
from learner.experience import bootstrap_slices, split_holdout
from learner.labels import TOPICS
from learner.torch_engine import TaskModel, Trunk, resolve_device
from learner.trainer import EWC_FILE, REPLAY_FILE, ExperienceSlices, read_memory, train_candidate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_topic_experience_trains_a_twenty_class_version_with_its_memory_and_ewc_state(
    adapters_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir, root)
    store = AdapterStore(root)
    champion = store.champion("topic")
    model_config = ModelConfig(adapters_dir=root)
    config = ContinualConfig()  # the defaults the learner ships with

    memory, holdout0 = bootstrap_slices("topic", config.replay_size, config.seed)
    assert {label for _, _, label in memory} == set(TOPICS)  # class-balanced: every topic remembered
    seen = {text for _, text, _ in memory + holdout0}
    # The new experience: analysts' topic labels on tweets neither in the memory nor in experience 0's slice.
    fresh = [(f"t-{i}", e.text, e.label) for i, e in enumerate(tfns_topic("valid")) if e.text not in seen][:300]
    train, holdout = split_holdout(fresh, config.holdout_fraction, config.seed)
    pairs = lambda rows: [(text, label) for _, text, label in rows]  # noqa: E731
    earlier = ExperienceSlices(0, pairs(memory), pairs(holdout0))
    new = ExperienceSlices(1, pairs(train), pairs(holdout))

    candidate = train_candidate(
        "topic", store, champion, new, [earlier], config, model_config, seed_memory=pairs(memory)
    )

    assert candidate.version == "topic-v2" and store.versions("topic")[-1] == "topic-v2"
    assert candidate.parent == champion and candidate.steps > 0 and not candidate.out_of_time
    card = store.card("topic", candidate.version)
    assert card.task == "topic" and card.labels == list(TOPICS) and card.parent == champion
    assert card.data == {"experience": 1, "n_train": len(train), "n_holdout": len(holdout)}
    # Judged on both slices: the shipped adapter's own domain and the new labels.
    assert [s.experience_id for s in [*candidate.earlier, candidate.new]] == [0, 1]
    assert candidate.earlier[0].champion > 0.8  # topic-v1 is 0.897 on the TFNS valid split
    # In-domain labels with replay + EWC: the original slice moves by little (measured: 0.881 -> 0.867), far from
    # what forgetting looks like (naive sequential training loses 13 points on the sentiment benchmark).
    assert candidate.earlier[0].candidate > candidate.earlier[0].champion - 0.03
    assert candidate.new.candidate > 0.75

    kept = read_memory(candidate.path / REPLAY_FILE)
    assert 0 < len(kept) <= config.replay_size
    assert {label for _, label in kept} <= set(TOPICS)
    assert {text for text, _ in kept} & {text for text, _ in new.train}  # the memory now holds the new domain too
    ewc = load_tensors(candidate.path / EWC_FILE)
    fisher = [k for k in ewc if k.startswith("fisher.")]
    # Importances cover the trainable top only: the frozen lower layers carry no EWC state.
    assert fisher and all(f"anchor.{k[len('fisher.') :]}" in ewc for k in fisher)
    assert not any(".layer.0." in k for k in fisher)

    # The version is a standard peft adapter that a scorer loads and serves with 20 outputs.
    served = TaskModel.load(store, "topic", candidate.version, model_config, Trunk(model_config, resolve_device("cpu")))
    assert served.classifier.out_features == len(TOPICS)
