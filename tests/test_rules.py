"""The Prometheus rules: the shipped file is the generator's output, promtool accepts it, and its unit tests pass.

The promtool unit tests live in tests/rules/*.test.yml (series in, alerts with exact labels and texts out).
sentiment.test.yml and operations.test.yml run against the shipped monitor/rules/finpulse.rules.yml, and
fast.test.yml against the fast preset, generated next to a copy of it.
"""

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.config import AlertRulesConfig, SpikeThresholds
from monitor.errors import PrometheusError
from monitor.prometheus import INSTALL_HINT, find_binary
from monitor.rules import RULES_FILE, build_rules, render_rules, write_rules
from storage.config import StorageConfig
from storage.history import History, NewsRow

RULE_TESTS = Path(__file__).resolve().parent / "rules"
SHIPPED_TESTS = ("sentiment.test.yml", "operations.test.yml")
ALERTS = {
    "NegativeSentimentSpike",
    "NegativeSentimentSpikeTicker",
    "ScorerDown",
    "ScorerStalled",
    "ConsumerLagHigh",
    "DeadLetterRateHigh",
    "DeliveriesGivingUp",
    "ModelVersionRejected",
    "ModelRolledBack",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Return the promtool executable, or skip with the install hint."""
    try:
        return find_binary("", ("promtool",))
    except PrometheusError:
        pytest.skip(f"promtool not found: {INSTALL_HINT}")


def _promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    """Run promtool and return its output; fail the test with that output on a non-zero exit."""
    done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed:\n{output}")
    return output


def test_shipped_rules_file_is_the_generators_output() -> None:
    assert RULES_FILE.read_text(encoding="utf-8") == render_rules(
        AlertRulesConfig()
    ), "monitor/rules/finpulse.rules.yml is stale: regenerate it with `python -m monitor.rules`"


@pytest.mark.parametrize("time_base", ["processing", "event"])
@pytest.mark.parametrize("preset", ["production", "fast"])
def test_promtool_accepts_the_rules(promtool: str, tmp_path: Path, preset: str, time_base: str) -> None:
    config = (
        AlertRulesConfig(time_base=time_base) if preset == "production" else AlertRulesConfig.fast(time_base=time_base)
    )
    path = write_rules(config, tmp_path / "finpulse.rules.yml")
    count = 17 if time_base == "processing" else 18  # EventWindowsMismatch
    assert f"SUCCESS: {count} rules found" in _promtool(promtool, "check", "rules", str(path))


@pytest.mark.parametrize("time_base", ["processing", "event"])
def test_every_alert_has_severity_and_a_summary(time_base: str) -> None:
    rules = [rule for group in build_rules(AlertRulesConfig(time_base=time_base))["groups"] for rule in group["rules"]]
    alerts = [rule for rule in rules if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == ALERTS | ({"EventWindowsMismatch"} if time_base == "event" else set())
    for rule in alerts:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@pytest.mark.parametrize("name", SHIPPED_TESTS)
def test_rule_unit_tests_on_the_shipped_rules(promtool: str, name: str) -> None:
    assert "SUCCESS" in _promtool(promtool, "test", "rules", name, cwd=RULE_TESTS)


def test_rule_unit_tests_on_the_fast_preset(promtool: str, tmp_path: Path) -> None:
    shutil.copy(RULE_TESTS / "fast.test.yml", tmp_path)
    write_rules(AlertRulesConfig.fast(), tmp_path / "fast.rules.yml")
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "fast.test.yml", cwd=tmp_path)


def test_thresholds_come_from_the_config() -> None:
    config = AlertRulesConfig(
        window="10m", baseline_window="2h", for_="5m", topic=SpikeThresholds(min_share=0.5, min_volume=40)
    )
    topic_rules = build_rules(config)["groups"][0]["rules"]
    warning = next(rule for rule in topic_rules if rule.get("labels", {}).get("severity") == "warning")
    assert warning["for"] == "5m"
    assert "finpulse:topic_negative_share:window >= 0.5\n" in warning["expr"]
    assert "finpulse:topic_volume:window >= 40\n" in warning["expr"]
    baseline = next(rule for rule in topic_rules if rule.get("record") == "finpulse:topic_negative_share:baseline")
    assert "[2h] offset 10m" in baseline["expr"]


def test_stall_and_give_up_thresholds_come_from_the_config() -> None:
    config = AlertRulesConfig(scorer_stalled_after="5m", scorer_stalled_for="1m", given_up_window="30m")
    operations = {rule["alert"]: rule for rule in build_rules(config)["groups"][2]["rules"]}
    stalled = operations["ScorerStalled"]
    assert stalled["for"] == "1m"
    assert stalled["expr"].endswith("(time() - finpulse_last_commit_timestamp_seconds) > 300\n")
    assert "has not committed for over 5m" in stalled["annotations"]["description"]
    giving_up = operations["DeliveriesGivingUp"]
    assert '{outcome="given_up"}[30m])) > 0\n' in giving_up["expr"]
    assert "offset 30m) > 0\n" in giving_up["expr"]
    assert "for" not in giving_up  # one given-up delivery is the event: nothing to wait for


def test_invalid_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="baseline_window"):
        AlertRulesConfig(window="1h", baseline_window="30m")
    with pytest.raises(ValueError, match="critical_share"):
        SpikeThresholds(min_share=0.7, critical_share=0.6)
    with pytest.raises(ValueError, match="Prometheus duration"):
        AlertRulesConfig(for_="2 minutes")


def _row(news_id: str, topic: str, tickers: tuple[str, ...], scored_at: dt.datetime) -> NewsRow:
    """Return a stored negative post scored at `scored_at`."""
    return NewsRow(
        id=news_id, published_at=scored_at, source="test", text=f"post {news_id}", tickers=tickers, topic=topic,
        topic_confidence=0.9, sentiment="negative", sentiment_confidence=0.8, sentiment_negative=0.8,
        sentiment_neutral=0.1, sentiment_positive=0.1, topic_version="t1", sentiment_version="s1", scored_at=scored_at,
    )  # fmt: skip


def test_evidence_queries_select_the_subjects_recent_posts(tmp_path: Path) -> None:
    """The evidence the unit tests expect (as promtool rendered it) runs as an analyst query and finds the posts."""
    evidence = {
        (alert["exp_labels"].get("topic"), alert["exp_labels"].get("ticker")): alert["exp_annotations"]["evidence"]
        for name in SHIPPED_TESTS
        for test in yaml.safe_load((RULE_TESTS / name).read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
        for alert in case.get("exp_alerts", [])
        if "evidence" in alert.get("exp_annotations", {}) and alert["exp_labels"]["severity"] == "warning"
    }
    # Promtool's clock starts at the Unix epoch: the Fed alert at 65m looks back to 00:53 (12m).
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    history = History(StorageConfig(duckdb_path=tmp_path / "finpulse.duckdb"))
    history.write_batch(
        [
            _row("fed-new", "Fed / Central Banks", (), at + dt.timedelta(minutes=60)),
            _row("fed-old", "Fed / Central Banks", (), at + dt.timedelta(minutes=50)),
            _row("oil-new", "Energy / Oil", ("TSLA",), at + dt.timedelta(minutes=61)),
            _row("tsla-new", "Stock Movement", ("AAPL", "TSLA"), at + dt.timedelta(minutes=62)),
        ]
    )
    texts: dict[tuple[str | None, str | None], list[object]] = {}
    for key, sql in evidence.items():
        result = history.query(sql)  # what `finpulse query` runs: read-only, one statement
        texts[key] = [row[result.columns.index("text")] for row in result.rows]
    assert texts[("Fed / Central Banks", None)] == ["post fed-new"]
    assert texts[(None, "TSLA")] == ["post tsla-new", "post oil-new"]  # newest first
