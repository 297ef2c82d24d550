"""Typed configuration of the metrics endpoint, the alert dispatcher, the alert rules and the local Prometheus."""

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator


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


# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# 16 characters of secrets.token_urlsafe carry 96 bits; `local` stacks generate 43 (256 bits).
TOKEN_MIN_LENGTH: Final = 16
TOKEN_HINT: Final = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Loopback only: the local demo's subscribers listen on http://127.0.0.1.
DEFAULT_ALLOWED_HOSTS: Final[tuple[str, ...]] = ("127.0.0.1", "localhost")
# Names that reach a cloud's instance metadata (credentials) from inside the instance.
METADATA_HOSTS: Final[frozenset[str]] = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES: Final[frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = frozenset(
    ipaddress.ip_address(text)
    # AWS/GCP/Azure/OpenStack, AWS ECS task metadata, AWS over IPv6, Alibaba Cloud.
    for text in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)


def _comma_separated(value: object) -> object:
    """Accept `a,b` from an environment variable for a list field."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _allowed_host(text: str) -> str:
    """Normalise one allowed host (lower case, no brackets or trailing dot); refuse metadata and unroutable ones."""
    host = text.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    if not host or any(char in host for char in "/@?# ") or not host.isprintable():
        raise ValueError(f"{text!r} is not a host name or IP address; give names like 127.0.0.1 or hooks.internal")
    if host in METADATA_HOSTS:
        raise ValueError(f"{host!r} is a cloud metadata name and can never be allowed")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address in METADATA_ADDRESSES or address.is_link_local or address.is_unspecified or address.is_multicast:
        raise ValueError(f"{host} is a metadata, link-local, unspecified or multicast address and can never be allowed")
    return address.compressed


AllowedHosts = Annotated[tuple[Annotated[str, AfterValidator(_allowed_host)], ...], BeforeValidator(_comma_separated)]


class DispatcherConfig(BaseModel):
    """Where the alert dispatcher receives Alertmanager's webhook, who may post to it, and how it delivers."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # Loopback by default: even with the token, only a local Alertmanager needs to reach the webhook.
    host: str = Field("127.0.0.1", min_length=1, description="Interface the dispatcher listens on.")
    port: int = Field(
        9466,
        ge=0,
        le=65535,
        description="Port of the dispatcher; 0 picks a free one (env FINPULSE_DISPATCHER__PORT).",
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token Alertmanager must send (`Authorization: Bearer <token>`); the dispatcher "
        "refuses to start without it or token_file (env FINPULSE_DISPATCHER__TOKEN). Never printed.",
    )
    token_file: Path | None = Field(
        None,
        description="File holding the token instead, e.g. a Docker secret; read at start, surrounding "
        "whitespace ignored (env FINPULSE_DISPATCHER__TOKEN_FILE). Give Alertmanager the same file as "
        "http_config.authorization.credentials_file.",
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest webhook body accepted (413 above). A notification is about 1 KB per alert, so "
        "1 MiB holds a group of ~1,000 alerts; Alertmanager groups by alertname, topic and ticker.",
    )
    queue_size: int = Field(
        1000,
        ge=1,
        description="Deliveries one subscriber may have waiting; past it a new one is given up with the reason "
        "(a critical one makes room by giving up the newest non-critical one). Bounds memory and how stale "
        "a backlog gets: at one attempt per second, 1,000 waiting is a quarter of an hour behind.",
    )
    allowed_hosts: AllowedHosts = Field(
        DEFAULT_ALLOWED_HOSTS,
        description="Subscriber hosts that may take plain http and may be (or resolve to) loopback addresses. "
        "Loopback by default, so the local demo's http://127.0.0.1 subscribers work; set it to [] in "
        "production (env FINPULSE_DISPATCHER__ALLOWED_HOSTS, comma-separated). Metadata, link-local, "
        "unspecified and multicast addresses stay refused whatever this says.",
    )
    attempts: int = Field(5, ge=1, le=50, description="Delivery attempts per alert and subscriber, the first included.")
    initial_backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first retry; doubles at each retry, with jitter."
    )
    max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(5.0, gt=0, description="Seconds one delivery request may take before it counts as failed.")
    prometheus_url: str | None = Field(
        None,
        description="Prometheus to read the current negative share from when an alert resolves, so the "
        "RESOLVED message states the share now, not the one it fired on (env FINPULSE_DISPATCHER__PROMETHEUS_URL).",
    )

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        """Refuse a maximum backoff below the initial one."""
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s:g}) must be at least "
                f"initial_backoff_s ({self.initial_backoff_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        """Refuse both token sources, and a token too short or not fit for a header (without showing it)."""
        # A model-level check: a field-level error would carry the token itself as its input.
        if self.token is not None and self.token_file is not None:
            raise ValueError("set dispatcher.token or dispatcher.token_file, not both")
        if self.token is not None:
            check_token(self.token.get_secret_value(), "dispatcher.token")
        return self


def check_token(token: str, origin: str) -> str:
    """Return the bearer token if it is long enough and header-safe; raise ValueError without echoing it."""
    if len(token) < TOKEN_MIN_LENGTH:
        raise ValueError(
            f"{origin}: {len(token)} characters is too short; use at least {TOKEN_MIN_LENGTH}, {TOKEN_HINT}"
        )
    if not TOKEN_PATTERN.fullmatch(token):
        raise ValueError(f"{origin}: use only letters, digits and -._~+/ (then = padding); {TOKEN_HINT}")
    return token


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
    time_base: Literal["processing", "event"] = Field(
        "processing",
        description="What the sentiment windows measure. `processing`: when the scorers scored each post "
        "(rates over the counters). `event`: when it was published (`published_at`), from the event-time "
        "windows every scorer keeps and exports; a replay or a backlog after an outage then lands in the "
        "windows of its own time instead of in the last few minutes. Give the scorers the same config, so "
        "that they keep the windows these rules read (EventWindowsMismatch fires when one does not).",
    )
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
