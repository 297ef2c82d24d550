"""Alert subscriptions: what a subscriber may ask for, and which alerts reach whom.

A subscription names a webhook (`target_url`) and filters: `topics` (among learner.labels.TOPICS),
`tickers` and `min_severity`. An alert reaches a subscription when its severity is at least
`min_severity` and, when the subscription has a topics filter, its `topic` label is in it, and, when
it has a tickers filter, its `ticker` label is in it (both filters must hold when both are set).
A subscription without filters gets every alert of its severity or above.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast

from learner.labels import TOPICS
from monitor.errors import SubscriptionError
from storage.alerts import (
    AlertRecord,
    AlertStore,
    SubscriptionNameTakenError,
    SubscriptionNotFoundError,
    SubscriptionRow,
)

__all__ = [
    "SEVERITIES",
    "Severity",
    "Subscription",
    "add_subscription",
    "check_severity",
    "check_target_url",
    "check_tickers",
    "check_topics",
    "list_subscriptions",
    "normalize_ticker",
    "remove_subscription",
    "route",
    "severity_rank",
    "suggest_topic",
]

Severity = Literal["info", "warning", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")
_RANK: Final[dict[str, int]] = {severity: rank for rank, severity in enumerate(SEVERITIES)}
# AAPL, BRK.B, RDS-A, 7203 (Tokyo): letters and digits, with '.' or '-' for share classes.
_TICKER: Final = re.compile(r"[A-Z0-9][A-Z0-9.\-]{0,14}")
_NAME_MAX: Final = 64
_URL_EXAMPLE: Final = "https://hooks.example.com/finpulse"


def _topic_key(text: str) -> str:
    """Return the spelling-insensitive key of a topic: lower case without whitespace."""
    return "".join(text.lower().split())


_TOPIC_BY_KEY: Final[dict[str, str]] = {_topic_key(topic): topic for topic in TOPICS}
# Each part of "Energy / Oil" also points at its topic, so "oil" or "Fed" find a suggestion: difflib
# alone rates "Fed" against "Fed / Central Banks" far below any useful cutoff.
_TOPIC_ALIASES: Final[dict[str, str]] = {
    **{_topic_key(part): topic for topic in TOPICS for part in topic.split("/")},
    **_TOPIC_BY_KEY,
}


def severity_rank(value: object) -> int | None:
    """Return the rank of a severity (info 0 < warning 1 < critical 2), or None when it is not one."""
    return _RANK.get(value) if isinstance(value, str) else None


def normalize_ticker(value: object) -> str | None:
    """Return a ticker upper-cased without its `$`, or None when it is not a ticker symbol."""
    if not isinstance(value, str):
        return None
    ticker = value.strip().removeprefix("$").upper()
    return ticker if _TICKER.fullmatch(ticker) else None


def suggest_topic(text: str) -> str | None:
    """Return the topic closest to a misspelt one, or None when nothing is close."""
    key = _topic_key(text)
    if not key:
        return None
    found = difflib.get_close_matches(key, list(_TOPIC_ALIASES), n=1, cutoff=0.6)
    if found:
        return _TOPIC_ALIASES[found[0]]
    # "macroeconomics" or "central bank": a long enough prefix of either way round still points somewhere.
    for alias, topic in _TOPIC_ALIASES.items():
        if len(key) >= 3 and len(alias) >= 3 and (alias.startswith(key) or key.startswith(alias)):
            return topic
    return None


def check_name(name: object) -> str:
    """Return a subscription name stripped, or raise SubscriptionError."""
    if not isinstance(name, str) or not name.strip():
        raise SubscriptionError("subscription name: must not be empty; give a short name like 'fed-desk'")
    stripped = name.strip()
    if len(stripped) > _NAME_MAX:
        raise SubscriptionError(f"subscription name: {len(stripped)} characters is too long; keep it to {_NAME_MAX}")
    if stripped.isdigit():
        # Numbers are ids when removing a subscription, so a numeric name could never be removed by name.
        raise SubscriptionError(f"subscription name: {stripped!r} is a number; use a name with a letter in it")
    return stripped


def check_target_url(url: object) -> str:
    """Return the subscriber's webhook URL if it is http(s) with a host, or raise SubscriptionError."""
    if not isinstance(url, str) or not url.strip():
        raise SubscriptionError(f"subscription target_url: must not be empty; give a URL like {_URL_EXAMPLE}")
    text = url.strip()
    if any(char.isspace() or ord(char) < 0x20 for char in text):
        raise SubscriptionError(
            f"subscription target_url: {text!r} contains whitespace; percent-encode it (%20) or fix the URL"
        )
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in {"http", "https"}:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise SubscriptionError(
            f"subscription target_url: {text!r} has {scheme}, not http or https; give a URL like {_URL_EXAMPLE}"
        )
    if not parts.hostname:
        raise SubscriptionError(f"subscription target_url: {text!r} has no host; give a URL like {_URL_EXAMPLE}")
    try:
        parts.port  # noqa: B018 - reading it is what validates the port
    except ValueError:
        raise SubscriptionError(
            f"subscription target_url: {text!r} has an invalid port; use a number from 1 to 65535"
        ) from None
    return text


def check_topics(topics: Iterable[str] | str) -> tuple[str, ...]:
    """Return topics in their canonical spelling, without repeats, or raise SubscriptionError naming the closest."""
    names = (topics,) if isinstance(topics, str) else tuple(topics)
    canonical: dict[str, None] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise SubscriptionError("subscription topics: empty topic; leave topics out to get every topic")
        topic = _TOPIC_BY_KEY.get(_topic_key(name))
        if topic is None:
            suggestion = suggest_topic(name)
            if suggestion is not None:
                raise SubscriptionError(f"subscription topics: unknown topic {name!r} — did you mean {suggestion!r}?")
            raise SubscriptionError(f"subscription topics: unknown topic {name!r}; choose from: {', '.join(TOPICS)}")
        canonical[topic] = None
    return tuple(canonical)


def check_tickers(tickers: Iterable[str] | str) -> tuple[str, ...]:
    """Return tickers upper-cased without `$` and repeats, or raise SubscriptionError."""
    names = (tickers,) if isinstance(tickers, str) else tuple(tickers)
    normalized: dict[str, None] = {}
    for name in names:
        ticker = normalize_ticker(name)
        if ticker is None:
            raise SubscriptionError(
                f"subscription tickers: {name!r} is not a ticker symbol; use letters and digits, "
                "with '.' or '-' for share classes, like AAPL, $MSFT or BRK.B"
            )
        normalized[ticker] = None
    return tuple(normalized)


def check_severity(value: object) -> Severity:
    """Return a severity in lower case, or raise SubscriptionError."""
    severity = value.strip().lower() if isinstance(value, str) else value
    if severity not in _RANK:
        raise SubscriptionError(
            f"subscription min_severity: {value!r} is not a severity; use info, warning or critical"
        )
    return cast(Severity, severity)


def _matches(topics: Sequence[str], tickers: Sequence[str], min_severity: str, labels: Mapping[str, object]) -> bool:
    """Return whether an alert with `labels` passes these filters."""
    rank = severity_rank(labels.get("severity"))
    floor = severity_rank(min_severity)
    if rank is None or floor is None or rank < floor:
        return False
    if topics and labels.get("topic") not in topics:
        return False
    return not tickers or normalize_ticker(labels.get("ticker")) in tickers


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """A subscriber's webhook and filters; building one validates and normalises every field."""

    name: str
    target_url: str
    topics: tuple[str, ...] = ()
    tickers: tuple[str, ...] = ()
    min_severity: Severity = "info"
    id: int | None = None  # None until stored
    created_at: dt.datetime | None = None
    active: bool = True

    def __post_init__(self) -> None:
        """Validate and normalise the fields; raise SubscriptionError naming the field and the fix."""
        object.__setattr__(self, "name", check_name(self.name))
        object.__setattr__(self, "target_url", check_target_url(self.target_url))
        object.__setattr__(self, "topics", check_topics(self.topics))
        object.__setattr__(self, "tickers", check_tickers(self.tickers))
        object.__setattr__(self, "min_severity", check_severity(self.min_severity))

    @classmethod
    def from_row(cls, row: SubscriptionRow) -> Subscription:
        """Build a Subscription from its stored row."""
        return cls(
            id=row.id,
            name=row.name,
            target_url=row.target_url,
            topics=row.topics,
            tickers=row.tickers,
            min_severity=cast(Severity, row.min_severity),
            created_at=row.created_at,
            active=row.active,
        )

    def matches(self, labels: Mapping[str, object]) -> bool:
        """Return whether an alert with these labels goes to this subscription."""
        return _matches(self.topics, self.tickers, self.min_severity, labels)


def route(alert: AlertRecord, subscriptions: Sequence[SubscriptionRow]) -> list[SubscriptionRow]:
    """Return the stored subscriptions an alert goes to (a `storage.alerts.Route`)."""
    # Matches on the stored rows without re-validating them: a row stored under an older topic list
    # must not stop the alerts of every other subscriber.
    return [row for row in subscriptions if _matches(row.topics, row.tickers, row.min_severity, alert.labels)]


def add_subscription(
    store: AlertStore,
    *,
    name: str,
    target_url: str,
    topics: Iterable[str] = (),
    tickers: Iterable[str] = (),
    min_severity: str = "info",
) -> Subscription:
    """Validate and store a new subscription; return it with its id."""
    wanted = Subscription(
        name=name,
        target_url=target_url,
        topics=tuple(topics),
        tickers=tuple(tickers),
        min_severity=check_severity(min_severity),
    )
    try:
        row = store.add_subscription(
            name=wanted.name,
            target_url=wanted.target_url,
            topics=wanted.topics,
            tickers=wanted.tickers,
            min_severity=wanted.min_severity,
        )
    except SubscriptionNameTakenError as e:
        raise SubscriptionError(str(e)) from e
    return Subscription.from_row(row)


def remove_subscription(store: AlertStore, id_or_name: int | str) -> Subscription:
    """Remove an active subscription by id or name; its alerts and deliveries stay in the history."""
    try:
        row = store.deactivate_subscription(id_or_name)
    except SubscriptionNotFoundError as e:
        raise SubscriptionError(f"{e}; list them with `finpulse subscriptions`") from e
    return Subscription.from_row(row)


def list_subscriptions(store: AlertStore, *, include_inactive: bool = False) -> list[Subscription]:
    """Return the active subscriptions by id, and the removed ones too when asked."""
    return [Subscription.from_row(row) for row in store.list_subscriptions(include_inactive=include_inactive)]
