"""Typed configuration of the metrics endpoint, the alert dispatcher, the alert rules and the local Prometheus."""

import re
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class MetricsConfig(BaseModel):
    """Where a service serves Prometheus `/metrics`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="Interface of the /metrics server.")
    port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="Port of the /metrics server; 0 picks a free one (env FINPULSE_METRICS__PORT).",
    )


class DispatcherConfig(BaseModel):
    """Where the alert dispatcher receives Alertmanager's webhook and how it retries deliveries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Loopback by default: the webhook has no authentication, so only a local Alertmanager should reach it.
    host: str = Field("127.0.0.1", min_length=1, description="Interface the dispatcher listens on.")
    port: int = Field(
        9466,
        ge=0,
        le=65535,
        description="Port of the dispatcher; 0 picks a free one (env FINPULSE_DISPATCHER__PORT).",
    )
    attempts: int = Field(5, ge=1, le=50, description="Delivery attempts per alert and subscriber, the first included.")
    initial_backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first retry; doubles at each retry, with jitter."
    )
    max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(5.0, gt=0, description="Seconds one delivery request may take before it counts as failed.")

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        """Refuse a maximum backoff below the initial one."""
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s:g}) must be at least "
                f"initial_backoff_s ({self.initial_backoff_s:g})"
            )
        return self


# -- alert rules and the local Prometheus -----------------------------------------------------------------

# Prometheus' duration syntax, e.g. 30s, 5m, 1h30m; units largest first, each at most once.
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS_S = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def duration_seconds(text: str) -> float:
    """Return the seconds of a Prometheus duration such as `90s`, `5m` or `1h30m`."""
    found = _DURATION.match(text)
    if not text or found is None:
        raise ValueError(f"expected a Prometheus duration such as 30s, 5m or 1h30m, got {text!r}")
    return sum(int(n) * unit for n, unit in zip(found.groups(), _DURATION_UNITS_S, strict=True) if n)


def _positive_duration(text: str) -> str:
    """Accept a Prometheus duration longer than zero, as written."""
    if duration_seconds(text) <= 0:
        raise ValueError(f"expected a duration above zero, got {text!r}")
    return text


# Kept as the text the user wrote: it goes verbatim into PromQL and Prometheus / Alertmanager configs.
Duration = Annotated[str, AfterValidator(_positive_duration)]


class SpikeThresholds(BaseModel):
    """When the negative share of one topic or ticker counts as a spike."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_share: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Negative share over the window needed to alert at all. The labelled stream runs at about "
        "15% negative, so 40% is over 2.5 times the usual share.",
    )
    min_increase: float = Field(
        0.2,
        gt=0,
        le=1,
        description="How far (in share points, 0.2 = 20 points) the share must rise above its baseline. "
        "Additive rather than a ratio: a ratio never fires for a topic that is chronically 55% negative "
        "and turns 95% negative, and fires on noise for one that moves from 3% to 6%.",
    )
    critical_share: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Negative share at which the spike is critical rather than a warning: most posts negative.",
    )
    min_volume: int = Field(
        20,
        ge=1,
        description="Posts needed over the window, so that three negative posts at night are no spike. At 20 "
        "posts the sampling error of a 15% share is about 8 points, so 40% lies 3 standard errors above it.",
    )

    @model_validator(mode="after")
    def _critical_above_warning(self) -> Self:
        """Refuse a critical share below the warning share."""
        if self.critical_share < self.min_share:
            raise ValueError(
                f"critical_share ({self.critical_share:g}) must be at least min_share ({self.min_share:g})"
            )
        return self


class AlertRulesConfig(BaseModel):
    """Thresholds and windows of the Prometheus recording and alerting rules (monitor/rules.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str = Field("finpulse-scorer", min_length=1, description="Prometheus job that scrapes the scorers.")
    window: Duration = Field(
        "5m",
        description="Window of the current negative share and volume. At a 15 s scrape it holds 20 samples, "
        "enough posts on a busy topic for a share to mean something, and short enough to react within "
        "minutes of breaking news.",
    )
    baseline_window: Duration = Field(
        "1h",
        description="Window of the baseline share, ending where `window` starts. An hour follows the "
        "intraday rhythm (pre-market, session, evening) yet averages out single bursts.",
    )
    for_: Duration = Field(
        "2m",
        description="How long a spike must hold before it fires (8 evaluations at 15 s): a single burst, "
        "such as one account reposting or a replayed backlog, does not page anyone.",
    )
    topic: SpikeThresholds = Field(default_factory=SpikeThresholds, description="Spike thresholds per topic.")
    ticker: SpikeThresholds = Field(
        default_factory=lambda: SpikeThresholds(min_volume=10),
        description="Spike thresholds per watched ticker; fewer posts mention one ticker than one topic, "
        "hence the lower default min_volume.",
    )
    scorer_down_for: Duration = Field(
        "1m",
        description="How long no scorer target may be up before ScorerDown fires (4 failed scrapes at 15 s).",
    )
    scorer_stalled_after: Duration = Field(
        "2m",
        description="How long a scorer with messages waiting may go without committing offsets before "
        "ScorerStalled fires. A working scorer commits after every batch (at most seconds apart, even on a CPU), "
        "and one starting up loads its models well within it.",
    )
    scorer_stalled_for: Duration = Field(
        "30s",
        description="How long ScorerStalled's condition must hold (2 evaluations at 15 s): the silence is "
        "already `scorer_stalled_after` long, this only rides out one odd scrape.",
    )
    max_consumer_lag: int = Field(
        5000,
        ge=1,
        description="Messages behind the raw topic (summed over partitions) above which ConsumerLagHigh fires; "
        "about a minute of a CPU scorer's throughput.",
    )
    consumer_lag_for: Duration = Field(
        "10m",
        description="How long the lag must stay high: a replay or a restart catches up within minutes.",
    )
    max_dead_letter_share: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Share of consumed messages dead-lettered over the window above which DeadLetterRateHigh "
        "fires; a healthy producer sends well under 1% bad input.",
    )
    dead_letter_min_volume: int = Field(
        50, ge=1, description="Messages consumed over the window needed before the dead-letter share counts."
    )
    dead_letter_for: Duration = Field(
        "5m", description="How long the dead-letter share must stay high (one bad batch is not a broken producer)."
    )
    model_event_window: Duration = Field(
        "15m",
        description="ModelVersionRejected and ModelRolledBack fire for this long after the event, so the "
        "notification goes out even with a slow Alertmanager group_interval.",
    )
    given_up_window: Duration = Field(
        "15m",
        description="DeliveriesGivingUp fires for this long after a delivery to a subscriber was given up, so "
        "the notification goes out even with a slow Alertmanager group_interval.",
    )

    @model_validator(mode="after")
    def _baseline_longer_than_window(self) -> Self:
        """Refuse a baseline window no longer than the current window."""
        if duration_seconds(self.baseline_window) <= duration_seconds(self.window):
            raise ValueError(f"baseline_window ({self.baseline_window}) must be longer than window ({self.window})")
        return self

    @classmethod
    def fast(cls, **updates: Any) -> Self:
        """Return the compressed-time preset of the demo and end-to-end tests: a spike alerts in well under 60 s."""
        values: dict[str, Any] = {
            "window": "30s",  # 15 samples at the fast 2 s scrape
            "baseline_window": "5m",
            "for_": "10s",
            "scorer_down_for": "10s",
            "scorer_stalled_after": "10s",  # 5 scrapes at 2 s; a CPU batch of the demo takes under 2 s
            "scorer_stalled_for": "4s",
            "consumer_lag_for": "30s",
            "dead_letter_for": "10s",
            "model_event_window": "1m",
            "given_up_window": "1m",
        }
        return cls.model_validate({**values, **updates})


class PrometheusConfig(BaseModel):
    """The local Prometheus and Alertmanager finpulse runs itself (monitor/prometheus.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prometheus_binary: str = Field(
        "",
        description="Path or name of the prometheus binary; empty = `prometheus` on PATH, else /usr/bin/prometheus.",
    )
    alertmanager_binary: str = Field(
        "",
        description="Path or name of the Alertmanager binary; empty = `prometheus-alertmanager` (Debian) or "
        "`alertmanager` on PATH, else /usr/bin/prometheus-alertmanager.",
    )
    data_dir: Path = Field(
        Path(".finpulse/prometheus"),
        description="Where both keep their configs, pids, logs and data (env FINPULSE_PROMETHEUS__DATA_DIR).",
    )
    scrape_interval: Duration = Field(
        "15s", description="How often the scorers are scraped; Prometheus' default, 20 samples per 5m window."
    )
    evaluation_interval: Duration = Field("15s", description="How often rules are evaluated; the scrape interval.")
    retention: Duration = Field("15d", description="How long Prometheus keeps samples.")
    group_wait: Duration = Field(
        "30s", description="Alertmanager's wait before the first notification of a group, to batch its alerts."
    )
    group_interval: Duration = Field(
        "5m", description="Alertmanager's wait before notifying changes (new or resolved alerts) of a group."
    )
    repeat_interval: Duration = Field(
        "4h", description="Alertmanager's wait before repeating an unchanged notification."
    )
    start_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for either server to report ready.")

    @classmethod
    def fast(cls, **updates: Any) -> Self:
        """Return the compressed-time preset matching `AlertRulesConfig.fast()`."""
        values: dict[str, Any] = {
            "scrape_interval": "2s",
            "evaluation_interval": "2s",
            "group_wait": "1s",
            "group_interval": "5s",
            "repeat_interval": "1h",
        }
        return cls.model_validate({**values, **updates})
