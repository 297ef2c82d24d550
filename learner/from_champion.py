"""`finpulse bench cl --from-champion`: learn the shared data's other domains starting from the shipped champion.

`bench cl` trains fresh adapters, which hides what users meet: a champion that already knows TFNS and labels
from a domain that labels differently. Here the learner's own trainer (`learner.trainer.train_candidate`, the
code `finpulse learn` runs) continues the shipped sentiment champion on each new domain of the `bench cl`
sequence (SEntFiN headlines, then the stock-market tweets) in two ways:

* `replay_ewc`, one global adapter: each domain is learnt with replay of the TFNS memory and online EWC into a
  candidate for every domain, TFNS included; as in `finpulse learn`, the next domain starts from what is served,
  which changes only when the gate promotes;
* `domain_scoped`: each domain gets its own version, trained from the champion, served to that domain only; TFNS
  (the default domain) keeps being served the champion.

Reported per strategy: the gain on each new domain's test set (the version serving that domain at the end against
the champion) and the change on TFNS (the version serving the default domain against the champion), with the
gate's decision on each candidate; for `replay_ewc` also each candidate's own gain and TFNS change, promoted or
not, and the blend weights the gate tried (learner.blend): what replay + EWC learnt, apart from what the gate
let through. TFNS is tested on its valid split less the gate's slice of it. Every trained version lives in a
scratch copy of the adapters.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from learner.adapters import AdapterStore
from learner.benchmark import FULL, QUICK, ExperienceData, sequence
from learner.config import ContinualConfig, ModelConfig
from learner.datasets import Example, tfns_sentiment
from learner.domains import DEFAULT_DOMAIN
from learner.experience import bootstrap_slices, split_holdout
from learner.gate import decide
from learner.labels import labels_of
from learner.model import Classifier
from learner.trainer import ExperienceSlices, train_candidate

Progress = Callable[[str], None]


def run_from_champion(
    config: ContinualConfig,
    model_config: ModelConfig,
    *,
    quick: bool = False,
    data_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run both strategies from the shipped sentiment champion; return the JSON document."""
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    experiences = sequence(QUICK if quick else FULL, data_dir)
    tfns, new_domains = experiences[0], experiences[1:]
    with tempfile.TemporaryDirectory(prefix="finpulse-from-champion-") as scratch:
        root = Path(scratch) / "adapters"
        shutil.copytree(model_config.adapters_dir, root, ignore=_staging)  # topic too: the judge's classifier loads it
        store = AdapterStore(root)
        mc = model_config.model_copy(update={"adapters_dir": root})
        champion = store.champion("sentiment")
        judge = _Judge(store, mc)
        memory, tfns_holdout = bootstrap_slices("sentiment", config.replay_size, config.seed, data_dir)
        # TFNS is tested on its whole valid split less the gate's slice of it: the gate chose among candidates
        # (and blends) on that slice, so it cannot also measure them; and a 500-text sample's paired noise
        # (~1 point) is as large as the forgetting to be measured.
        gate_texts = {t for _, t, _ in tfns_holdout}
        tests = {e.name: e.test for e in experiences}
        tests[tfns.name] = [e for e in tfns_sentiment("valid", data_dir) if e.text not in gate_texts]
        base = {name: judge.accuracy(champion, examples) for name, examples in tests.items()}
        say(f"champion {champion}: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
        exp0 = ExperienceSlices(0, [(t, y) for _, t, y in memory], [(t, y) for _, t, y in tfns_holdout])
        seed_memory = [(t, y) for _, t, y in memory]

        # One global adapter: every domain learnt into it, in turn, with replay + EWC, through the gate.
        served, earlier, gates, candidates = champion, [exp0], {}, {}
        for number, domain in enumerate(new_domains, start=1):
            slices = _slices(number, domain, config, "default")
            say(f"replay_ewc: learning {domain.name} from {served}…")
            candidate = train_candidate(
                "sentiment", store, served, slices, earlier, config, mc, seed_memory=seed_memory
            )
            decision = candidate.decision or decide(
                candidate.new, candidate.earlier, config.min_gain, config.max_forgetting
            )
            gates[domain.name] = {"promote": decision.promote, "reason": decision.reason}
            candidates[domain.name] = {
                "version": candidate.version,
                "gain": round(judge.accuracy(candidate.version, tests[domain.name]) - base[domain.name], 4),
                "tfns_change": round(judge.accuracy(candidate.version, tests[tfns.name]) - base[tfns.name], 4),
                "promote": decision.promote,
                "blend": candidate.metrics["blend"],
            }
            weight = candidate.metrics["blend"]["weight"]
            say(
                f"replay_ewc: {candidate.version} (blend {weight:g}) gains "
                f"{candidates[domain.name]['gain']:+.3f} on {domain.name}, "
                f"{candidates[domain.name]['tfns_change']:+.3f} on TFNS: "
                + ("promoted" if decision.promote else f"rejected ({decision.reason})")
            )
            if decision.promote:
                served = candidate.version
            earlier = [*earlier, slices]
        global_final = {name: judge.accuracy(served, examples) for name, examples in tests.items()}
        replay_ewc = {
            "gain": {d.name: round(global_final[d.name] - base[d.name], 4) for d in new_domains},
            "tfns_change": round(global_final[tfns.name] - base[tfns.name], 4),
            "version": served,
            "gate": gates,
            "candidates": candidates,
        }

        # A version per domain, from the champion; the default domain keeps the champion.
        scoped_gain, scoped_gates = {}, {}
        for number, domain in enumerate(new_domains, start=len(new_domains) + 1):
            slices = _slices(number, domain, config, domain.name)
            say(f"domain_scoped: learning {domain.name} from {champion}…")
            candidate = train_candidate("sentiment", store, champion, slices, [], config, mc)
            decision = candidate.decision or decide(
                candidate.new, candidate.earlier, config.min_gain, config.max_forgetting
            )
            scoped_gates[domain.name] = {"promote": decision.promote, "reason": decision.reason}
            scoped_gain[domain.name] = round(
                judge.accuracy(candidate.version, tests[domain.name]) - base[domain.name], 4
            )
        # Measured, not assumed: what the default domain is served (the champion) on the TFNS test set.
        served_default = judge.accuracy(store.champion("sentiment"), tests[tfns.name])
        domain_scoped = {
            "gain": scoped_gain,
            "tfns_change": round(served_default - base[tfns.name], 4),
            "gate": scoped_gates,
        }
    return {
        "benchmark": "cl_from_champion",
        "champion": champion,
        "champion_accuracy": {k: round(v, 4) for k, v in base.items()},
        "strategies": {"replay_ewc": replay_ewc, "domain_scoped": domain_scoped},
        "sizes": {e.name: {"train": len(e.train), "test": len(tests[e.name])} for e in experiences},
        "config": config.model_dump(),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _slices(number: int, domain: ExperienceData, config: ContinualConfig, name: str) -> ExperienceSlices:
    rows = [(f"{domain.name}-{i}", e.text, e.label) for i, e in enumerate(domain.train)]
    train, holdout = split_holdout(rows, config.holdout_fraction, config.seed + number)
    return ExperienceSlices(number, [(t, y) for _, t, y in train], [(t, y) for _, t, y in holdout], name)


def _staging(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".tmp-") or n.endswith(".tmp")]


class _Judge:
    """Accuracy of any version on labelled examples, with the scorers' engine (trunk + the version's top)."""

    def __init__(self, store: AdapterStore, config: ModelConfig) -> None:
        self.store = store
        self.config = config
        self.classifier = Classifier.from_store(config, "cpu")

    def accuracy(self, version: str, examples: Sequence[Example]) -> float:
        model = self.classifier.load(self.store, "sentiment", version, self.config)
        probs, _ = self.classifier.probabilities(
            self.classifier.encode([e.text for e in examples]), served={"sentiment": {DEFAULT_DOMAIN: model}}
        )
        labels = labels_of("sentiment")
        predicted = probs["sentiment"].argmax(-1).tolist()
        return sum(labels[p] == e.label for p, e in zip(predicted, examples, strict=True)) / max(1, len(examples))
