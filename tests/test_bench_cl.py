"""`finpulse bench cl --quick`: the continual-learning benchmark runs from one command and says something.

The quick variant trains on 400 examples per experience (~4 minutes on 2 CPU cores for all five strategies,
~2 for the three this test compares). The full run (`finpulse bench cl`, three seeds) is the one whose figures
are reported; this checks the shape of the output and the two facts a benchmark of forgetting has to show to
mean anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finpulse.cli import main
from learner.config import ContinualConfig

# ~2 minutes alone on 2 cores; the suite-wide 600 s limit is too tight when the machine is shared.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_quick_benchmark_prints_one_json_line_writes_its_files_and_shows_forgetting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "cl.json"
    # The three strategies the assertions compare, given out of order; replay and EWC alone are each half of
    # replay_ewc and take another ~80 s at --quick, so the test leaves them to the benchmark itself.
    argv = ["bench", "cl", "--quick", "--json", "--out", str(out), "--strategies", "joint,replay_ewc,naive"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])

    assert doc["experiences"] == ["tfns", "sentfin", "stock_tweets"]
    assert doc["seeds"] == [1]
    strategies = doc["strategies"]
    assert list(strategies) == ["naive", "replay_ewc", "joint"]  # the documented order, not the given one
    for name, s in strategies.items():
        for key in ("avg_accuracy", "forgetting", "bwt", "train_s"):
            assert isinstance(s[key], int | float), (name, key)
        assert 0.33 < s["avg_accuracy"] <= 1.0, name  # better than chance on three classes
        rows = 1 if name == "joint" else 3
        assert len(s["matrix"]) == rows and all(len(r) == 3 for r in s["matrix"]), name
        assert s["train_s"] > 0
    # Naive fine-tuning must forget measurably, or the sequence is too easy to say anything...
    assert strategies["naive"]["forgetting"] > 0.03
    # ...and replay + EWC must forget less; joint training is the upper bound of naive. With the memory at 10%
    # of the examples seen (40, then 80 here) replay + EWC ends only ~0.2 points above naive (measured 0.612 vs
    # 0.610 at --quick), too close to assert; its forgetting is clearly lower (0.113 vs 0.140).
    assert strategies["replay_ewc"]["forgetting"] < strategies["naive"]["forgetting"] - 0.01
    assert strategies["joint"]["avg_accuracy"] > strategies["naive"]["avg_accuracy"]
    assert doc["config"]["memory_fraction"] == 0.1

    assert json.loads(out.read_text(encoding="utf-8"))["strategies"].keys() == strategies.keys()
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert table.startswith("| strategy |") and "| replay_ewc |" in table
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_from_champion_learns_each_domain_and_the_scoped_one_leaves_tfns_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Small on purpose (one pass, a 200-example memory): the figures come from the full benchmark.
    out = tmp_path / "fc.json"
    argv = ["bench", "cl", "--from-champion", "--quick", "--json", "--out", str(out)]
    argv += ["--set", "learner.epochs=1", "--set", "learner.replay_size=200"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scoped, shared = doc["strategies"]["domain_scoped"], doc["strategies"]["replay_ewc"]
    assert list(scoped["gain"]) == list(shared["gain"]) == ["sentfin", "stock_tweets"]
    # What the default domain is served did not change, measured on the TFNS test set.
    assert scoped["tfns_change"] == 0.0
    assert all(-1 <= g <= 1 for s in (scoped, shared) for g in s["gain"].values())
    assert -1 <= shared["tfns_change"] <= 1 and set(shared["gate"]) == {"sentfin", "stock_tweets"}
    # The global strategy serves a candidate only once the gate promotes it; each candidate is reported either way.
    assert set(shared["candidates"]) == {"sentfin", "stock_tweets"}
    promoted = [c["version"] for c in shared["candidates"].values() if c["promote"]]
    assert shared["version"] == (promoted[-1] if promoted else "sentiment-v1")
    if not promoted:
        assert shared["tfns_change"] == 0.0 and set(shared["gain"].values()) == {0.0}
    # A candidate that forgets is blended back in the configured order, and only while it stays better.
    for c in shared["candidates"].values():
        tried = c["blend"]["tried"]
        assert [t["weight"] for t in tried] == [1.0, *ContinualConfig().blend_weights][: len(tried)]
        assert tried[0]["promote"] or tried[0]["reason"].startswith(("forgets", "not better"))
        assert all(not t["promote"] and t["reason"].startswith(("forgets", "cannot show")) for t in tried[:-1])
        assert c["promote"] == tried[-1]["promote"]
        assert c["blend"]["weight"] == (tried[-1]["weight"] if c["promote"] else 1.0)
    assert json.loads(out.read_text(encoding="utf-8"))["champion"] == "sentiment-v1"
