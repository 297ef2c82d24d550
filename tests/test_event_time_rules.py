"""The event-time rules (`time_base="event"`) under promtool: shares summed over scorers from their window gauges.

The promtool unit test is written here beside freshly generated fast-preset event-time rules (30s window, 5m
baseline, 10s `for`, 2 s evaluations), so its series and its expectations read side by side.
"""

from pathlib import Path

import yaml
from test_rules import _promtool, promtool  # noqa: F401  (promtool is a fixture)

from monitor.config import AlertRulesConfig
from monitor.rules import build_rules, main, render_rules, write_rules

EVENT = AlertRulesConfig.fast(time_base="event")
SCORER = 'job="finpulse-scorer", instance'


def _gauge(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
    """Return one input series of a scorer's gauge, constant or as promtool's expanding notation."""
    extra = "".join(f', {key}="{value}"' for key, value in labels.items())
    return {"series": f'{name}{{{SCORER}="{instance}"{extra}}}', "values": values}


def _posts(instance: str, topic: str, window: str, **by_sentiment: int) -> list[dict[str, str]]:
    """Return the window gauges of one scorer and topic, constant over the test."""
    return [
        _gauge("finpulse_event_window_messages", instance, f"{n}x60", topic=topic, sentiment=sentiment, window=window)
        for sentiment, n in by_sentiment.items()
    ]


def _alerts(eval_time: str, alertname: str, *labelled: dict[str, str]) -> dict[str, object]:
    """Return a promql_expr_test expecting exactly these firing alerts of `alertname`."""
    samples = []
    for labels in labelled:
        text = ", ".join(f'{k}="{v}"' for k, v in {"alertname": alertname, "alertstate": "firing", **labels}.items())
        samples.append({"labels": f"ALERTS{{{text}}}", "value": 1})
    return {
        "expr": f'ALERTS{{alertname="{alertname}", alertstate="firing"}}',
        "eval_time": eval_time,
        "exp_samples": samples,
    }


SENTIMENT = {"category": "sentiment"}
OIL, MACRO = "Energy / Oil", "Macro / Economic Data"
UNIT_TESTS = {
    "rule_files": ["event.rules.yml"],
    "evaluation_interval": "2s",
    "tests": [
        {
            # s1 and s2 own disjoint partitions: Energy / Oil is 12 of 20 negative on s1 and 4 of 20 on s2, so
            # 16 of 40 (40%) in all, over a 10% baseline. Macro has 18 of 20 negative on s1 and no baseline at
            # all; s1 restarted a while ago and has counted 100 s of publication time, 400 s from 60 s on.
            "name": "shares are sums over scorers; a missing baseline counts only once every scorer is whole",
            "interval": "2s",
            "input_series": [
                *_posts("s1", OIL, "window", negative=12, neutral=8),
                *_posts("s2", OIL, "window", negative=4, neutral=16),
                *_posts("s1", OIL, "baseline", negative=10, neutral=90),
                *_posts("s2", OIL, "baseline", negative=10, neutral=90),
                *_posts("s1", MACRO, "window", negative=18, neutral=2),
                _gauge("finpulse_event_window_coverage_seconds", "s1", "100x29 400x30"),
                _gauge("finpulse_event_window_coverage_seconds", "s2", "5000x60"),
                _gauge("finpulse_event_watermark_timestamp_seconds", "s1", "1000x60"),
                _gauge("finpulse_event_watermark_timestamp_seconds", "s2", "2000x60"),
            ],
            "promql_expr_test": [
                {
                    "expr": "finpulse:topic_negative_share:window",
                    "eval_time": "20s",
                    "exp_samples": [
                        {"labels": f'finpulse:topic_negative_share:window{{topic="{OIL}"}}', "value": 0.4},
                        {"labels": f'finpulse:topic_negative_share:window{{topic="{MACRO}"}}', "value": 0.9},
                    ],
                },
                {
                    "expr": "finpulse:topic_negative_share:baseline",
                    "eval_time": "20s",
                    "exp_samples": [
                        {"labels": f'finpulse:topic_negative_share:baseline{{topic="{OIL}"}}', "value": 0.1}
                    ],
                },
                {
                    "expr": "finpulse:topic_volume:window",
                    "eval_time": "20s",
                    "exp_samples": [
                        {"labels": f'finpulse:topic_volume:window{{topic="{OIL}"}}', "value": 40},
                        {"labels": f'finpulse:topic_volume:window{{topic="{MACRO}"}}', "value": 20},
                    ],
                },
                # Macro, 90% negative without a baseline, waits until s1 has counted window + baseline (330 s).
                _alerts("50s", "NegativeSentimentSpike", {"severity": "warning", "topic": OIL, **SENTIMENT}),
                _alerts(
                    "80s",
                    "NegativeSentimentSpike",
                    {"severity": "warning", "topic": OIL, **SENTIMENT},
                    {"severity": "warning", "topic": MACRO, **SENTIMENT},
                    {"severity": "critical", "topic": MACRO, **SENTIMENT},
                ),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20s",
                    "alertname": "NegativeSentimentSpike",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "topic": OIL, **SENTIMENT},
                            "exp_annotations": {
                                "summary": f"Negative sentiment on {OIL}: 40% of 40 posts in the last 30s vs 10% "
                                "baseline",
                                "description": f"The negative share of topic {OIL} over 30s of publication time "
                                "(up to the newest post each scorer has scored) has been at least 40% (warning "
                                "from 40%, critical from 60%) and 20 points above its baseline, the share over "
                                "the 5m before, for 10s, with at least 20 posts per 30s. Run the evidence query "
                                "with `finpulse query` to read the posts behind it. The alert resolves once the "
                                "share falls back.",
                                # From the earliest watermark (1000 s) back 70 s, by publication time.
                                "evidence": "SELECT published_at, source, sentiment, round(sentiment_confidence, 2) "
                                f"AS confidence, text FROM news WHERE topic = '{OIL}' AND published_at >= "
                                "TIMESTAMPTZ '1970-01-01 00:15:30Z' ORDER BY published_at DESC LIMIT 50",
                            },
                        }
                    ],
                }
            ],
        },
        {
            # s1 keeps the windows the rules read; s2 was started with processing time (no gauges); s3 keeps
            # a 1m window. s2 and s3 fire once `for` (scorer_down_for, 10s) has passed.
            "name": "a scorer without the rules' windows fires EventWindowsMismatch",
            "interval": "2s",
            "input_series": [
                _gauge("up", "s1", "1x30"),
                _gauge("up", "s2", "1x30"),
                _gauge("up", "s3", "1x30"),
                _gauge("finpulse_event_window_seconds", "s1", "30x30", window="window"),
                _gauge("finpulse_event_window_seconds", "s1", "300x30", window="baseline"),
                _gauge("finpulse_event_window_seconds", "s3", "60x30", window="window"),
                _gauge("finpulse_event_window_seconds", "s3", "300x30", window="baseline"),
            ],
            "promql_expr_test": [
                _alerts("6s", "EventWindowsMismatch"),
                _alerts(
                    "12s",
                    "EventWindowsMismatch",
                    *(
                        {"instance": i, "job": "finpulse-scorer", "severity": "critical", "category": "operations"}
                        for i in ("s2", "s3")
                    ),
                ),
            ],
        },
    ],
}


def test_promtool_unit_tests_of_the_event_time_rules(promtool: str, tmp_path: Path) -> None:  # noqa: F811
    write_rules(EVENT, tmp_path / "event.rules.yml")
    (tmp_path / "event.test.yml").write_text(yaml.safe_dump(UNIT_TESTS, sort_keys=False, width=1000))
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "event.test.yml", cwd=tmp_path)


def test_event_time_rules_keep_the_recorded_names_and_read_no_counter() -> None:
    processing = build_rules(AlertRulesConfig())
    event = build_rules(AlertRulesConfig(time_base="event"))
    for before, after in zip(processing["groups"][:2], event["groups"][:2], strict=True):
        assert [r.get("record") for r in before["rules"]] == [r.get("record") for r in after["rules"]]
        for rule in after["rules"]:
            assert "_scored_total" not in rule["expr"] and "rate(" not in rule["expr"], rule
    assert "EventWindowsMismatch" not in render_rules(AlertRulesConfig())


def test_the_cli_writes_event_time_rules(tmp_path: Path) -> None:
    path = tmp_path / "event.rules.yml"
    assert main(["--fast", "--time-base", "event", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text == render_rules(EVENT)
    assert text.splitlines()[1] == "# Regenerate: python -m monitor.rules --fast --time-base event PATH"
    assert "# time_base=event window=30s baseline_window=5m (ending where the window starts) for=10s" in text
