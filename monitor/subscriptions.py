"""Alert subscriptions: what a subscriber may ask for, and which alerts reach whom.

A subscription names a webhook (`target_url`) and filters: `topics` (the topic task's labels, learner.tasks.TOPIC),
`tickers` and `min_severity`. An alert reaches a subscription when its severity is at least
`min_severity` and, when the subscription has a topics filter, its `topic` label is in it, and, when
it has a tickers filter, its `ticker` label is in it (both filters must hold when both are set).
A subscription without filters gets every alert of its severity or above.

Where a subscription may point (`check_target_url`): an https URL of a public or private network host, or
plain http to a host the operator allows (`dispatcher.allowed_hosts`, loopback by default). Never a cloud
metadata endpoint, a link-local, unspecified, multicast, broadcast or reserved address, an IP spelt in decimal,
octal or hex, a URL carrying credentials, or one over 2,048 characters. The dispatcher checks the URL again at
every attempt, and the addresses its host resolves to (`resolve_target`), and connects to those very addresses,
so a DNS name pointing at 169.254.169.254 is refused like the address itself.

Each subscription has its own signing secret (`whsec_` + base64 of 32 random bytes, the Standard Webhooks
format), made by `add_subscription` and shown to whoever subscribes; listings mask it (`mask_secret`).
"""

from __future__ import annotations

import base64
import datetime as dt
import difflib
import ipaddress
import re
import secrets
import socket
import urllib.parse
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Final, Literal, cast

from learner.tasks import TOPIC
from monitor.config import DEFAULT_ALLOWED_HOSTS, METADATA_ADDRESSES, METADATA_HOSTS
from monitor.errors import SubscriptionError
from storage.alerts import (
    AlertRecord,
    AlertStore,
    SubscriptionNameTakenError,
    SubscriptionNotFoundError,
    SubscriptionRow,
)

__all__ = [
    "SECRET_PREFIX",
    "SEVERITIES",
    "Severity",
    "Subscription",
    "add_subscription",
    "address_refusal",
    "check_name",
    "check_severity",
    "check_target_url",
    "check_tickers",
    "check_topics",
    "is_allowed_host",
    "list_subscriptions",
    "mask_secret",
    "new_secret",
    "normalize_ticker",
    "remove_subscription",
    "resolve_target",
    "route",
    "severity_rank",
    "suggest_topic",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Severity = Literal["info", "warning", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")
_RANK: Final[dict[str, int]] = {severity: rank for rank, severity in enumerate(SEVERITIES)}
# AAPL, BRK.B, RDS-A, 7203 (Tokyo): letters and digits, with '.' or '-' for share classes.
_TICKER: Final = re.compile(r"[A-Z0-9][A-Z0-9.\-]{0,14}")
_NAME_MAX: Final = 64
# ASCII only: a Cyrillic "е" in "fed-desk" would pass the case-insensitive uniqueness check and look the same.
_NAME: Final = re.compile(r"[A-Za-z0-9 _.\-]+")
_URL_EXAMPLE: Final = "https://hooks.example.com/finpulse"
# The de-facto limit of browsers, proxies and webhook providers; a longer one is a mistake or an attack.
URL_MAX: Final = 2048
# What an error message shows of a URL; the rest is cut.
_URL_SHOWN: Final = 100
# A host whose last label is a number is an IP address spelling (no top-level domain is numeric):
# 2130706433, 0x7f.1, 0177.0.0.1 and 127.1 all reach 127.0.0.1 through inet_aton.
_NUMERIC_LABEL: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
_DNS_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?")
# 64:ff9b::/96 (RFC 6052) reaches IPv4 through a NAT64 gateway.
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST: Final = ipaddress.ip_address("255.255.255.255")
SECRET_PREFIX: Final = "whsec_"
# The Standard Webhooks spec asks for 24 to 64 bytes; 32 is an HMAC-SHA256 block's worth of key.
_SECRET_BYTES: Final = 32


def _topic_key(text: str) -> str:
    """Return the spelling-insensitive key of a topic: lower case without whitespace."""
    return "".join(text.lower().split())


_TOPIC_BY_KEY: Final[dict[str, str]] = {_topic_key(topic): topic for topic in TOPIC.labels}
# Each part of "Energy / Oil" also points at its topic, so "oil" or "Fed" find a suggestion: difflib
# alone rates "Fed" against "Fed / Central Banks" far below any useful cutoff.
_TOPIC_ALIASES: Final[dict[str, str]] = {
    **{_topic_key(part): topic for topic in TOPIC.labels for part in topic.split("/")},
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
    """Return a subscription name stripped: 1 to 64 ASCII letters, digits, spaces, `-`, `_` or `.`, not a number."""
    if not isinstance(name, str) or not name.strip():
        raise SubscriptionError("subscription name: must not be empty; give a short name like 'fed-desk'")
    stripped = name.strip()
    if len(stripped) > _NAME_MAX:
        raise SubscriptionError(f"subscription name: {len(stripped)} characters is too long; keep it to {_NAME_MAX}")
    if not _NAME.fullmatch(stripped):
        bad = next(char for char in stripped if not _NAME.fullmatch(char))
        raise SubscriptionError(
            f"subscription name: {stripped!r} contains {bad!r}; use ASCII letters, digits, spaces and - _ . only"
        )
    if stripped.isdigit():
        # Numbers are ids when removing a subscription, so a numeric name could never be removed by name.
        raise SubscriptionError(f"subscription name: {stripped!r} is a number; use a name with a letter in it")
    return stripped


def check_target_url(url: object, allowed_hosts: Collection[str] = DEFAULT_ALLOWED_HOSTS) -> str:
    """Return the subscriber's webhook URL if a subscription may point there, or raise SubscriptionError.

    `allowed_hosts` (dispatcher.allowed_hosts) may take plain http and be loopback. The message names the
    problem and the fix in one line, and never shows the URL's credentials.
    """
    if not isinstance(url, str) or not url.strip():
        raise SubscriptionError(f"subscription target_url: must not be empty; give a URL like {_URL_EXAMPLE}")
    text = url.strip()
    shown = _shown(text)
    if len(text) > URL_MAX:
        raise SubscriptionError(
            f"subscription target_url: {shown} is {len(text):,} characters long; keep it to {URL_MAX:,}"
        )
    if any(char.isspace() for char in text):
        raise SubscriptionError(
            f"subscription target_url: {shown} contains whitespace; percent-encode it (%20) or fix the URL"
        )
    bad = next((char for char in text if not char.isprintable()), None)
    if bad is not None:
        raise SubscriptionError(
            f"subscription target_url: {shown} contains the non-printable character U+{ord(bad):04X}; remove it"
        )
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as e:
        raise SubscriptionError(f"subscription target_url: {shown} is not a URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        named = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise SubscriptionError(
            f"subscription target_url: {shown} has {named}, not http or https; give a URL like {_URL_EXAMPLE}"
        )
    if "@" in parts.netloc:
        raise SubscriptionError(
            f"subscription target_url: {shown} carries credentials before the host (…@); remove them: "
            "deliveries are signed (webhook-signature), so the subscriber can check who sent them"
        )
    if not parts.hostname:
        raise SubscriptionError(f"subscription target_url: {shown} has no host; give a URL like {_URL_EXAMPLE}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise SubscriptionError(f"subscription target_url: {shown} has an invalid port; use a number from 1 to 65535")
    host, address = _parse_host(parts.hostname, bracketed="[" in parts.netloc, shown=shown)
    allowed = is_allowed_host(host, allowed_hosts)
    if address is not None:
        refusal = address_refusal(address, allowed=allowed)
    elif host in METADATA_HOSTS:
        refusal = f"{host} is a cloud metadata name"
    elif (host == "localhost" or host.endswith(".localhost")) and not allowed:
        refusal = f"{host} is loopback (RFC 6761); add it to dispatcher.allowed_hosts to allow it"
    else:
        refusal = None
    if refusal is not None:
        raise SubscriptionError(f"subscription target_url: {shown} is refused: {refusal}")
    if scheme == "http" and not allowed:
        raise SubscriptionError(
            f"subscription target_url: {shown} is plain http; use https, or add {host} to dispatcher.allowed_hosts "
            f"(now: {', '.join(allowed_hosts) or 'none'})"
        )
    return text


def is_allowed_host(host: str, allowed_hosts: Collection[str]) -> bool:
    """Return whether a URL's host (as `urlsplit().hostname` gives it) is one of the operator's allowed hosts."""
    return _normal_host(host) in {_normal_host(allowed) for allowed in allowed_hosts}


def _normal_host(host: str) -> str:
    """Return a host lower-cased without brackets or trailing dot, an IP address in its compressed form."""
    text = host.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    try:
        return ipaddress.ip_address(text.partition("%")[0]).compressed
    except ValueError:
        return text


def address_refusal(address: IPAddress, *, allowed: bool = False) -> str | None:
    """Return why a subscriber may not be at `address`, or None when it may.

    Private networks (10/8, 172.16/12, 192.168/16, fc00::/7) are fine: internal webhooks live there.
    Loopback is refused unless the host is allowed; the rest is refused whatever the allowed hosts say.
    """
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = address_refusal(inner, allowed=allowed)
        return None if reason is None else f"{reason} (inside {address})"
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_unspecified:
        return f"{address} is the unspecified address"
    if address.is_link_local:
        return f"{address} is link-local"
    if address.is_multicast:
        return f"{address} is multicast"
    if address == _BROADCAST:
        return f"{address} is the broadcast address"
    if address.is_loopback:
        return None if allowed else f"{address} is loopback; add it to dispatcher.allowed_hosts to allow it"
    if address.is_reserved:
        return f"{address} is reserved"
    return None


def resolve_target(host: str, port: int, *, allowed: bool) -> list[str]:
    """Return the addresses `host` resolves to, to connect to those and no others.

    Raises SubscriptionError when any of them is refused (`address_refusal`): a name with one bad address
    among good ones is not trusted either. Raises OSError when the name does not resolve.
    """
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    for text in addresses:
        refusal = address_refusal(ipaddress.ip_address(text.partition("%")[0]), allowed=allowed)
        if refusal is not None:
            raise SubscriptionError(f"{host} resolves to a refused address: {refusal}")
    return addresses


def new_secret() -> str:
    """Return a new signing secret: `whsec_` and the base64 of 32 random bytes (the HMAC key)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def mask_secret(secret: str | None) -> str:
    """Return a secret as a listing shows it: the prefix and its last four characters."""
    if secret is None:
        return "none yet (made at the first delivery)"
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def _parse_host(hostname: str, *, bracketed: bool, shown: str) -> tuple[str, IPAddress | None]:
    """Return a URL host normalised, and its address when it is an IP literal; raise for a bad spelling."""
    host = hostname.lower().removesuffix(".")
    if bracketed:
        try:
            return host, ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise SubscriptionError(
                f"subscription target_url: {shown} has {host!r} in brackets, which is not an IPv6 address"
            ) from None
    if _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2]):
        try:
            return host, ipaddress.IPv4Address(host)
        except ValueError:
            raise SubscriptionError(
                f"subscription target_url: {shown} spells an IP address in a form other than a.b.c.d "
                "(decimal, octal, hex or shortened); write the four decimal parts, or use a host name"
            ) from None
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_host = ""
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise SubscriptionError(f"subscription target_url: {shown} has {host!r}, which is not a valid host name")
    return host, None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 one leads to (mapped, 6to4, NAT64), or None."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _shown(url: str) -> str:
    """Return a URL as an error message quotes it: credentials masked, escaped, cut to 100 characters."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    # Everything up to the last "@" before the query: "user:pa/ss@host" hides its password in the path too.
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" in before_query:
        rest = "***@" + rest[before_query.rindex("@") + 1 :]
    masked = f"{scheme}{separator}{rest}"
    return repr(masked if len(masked) <= _URL_SHOWN else masked[:_URL_SHOWN] + "…")


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
            known = ", ".join(TOPIC.labels)
            raise SubscriptionError(f"subscription topics: unknown topic {name!r}; choose from: {known}")
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
    secret: str | None = field(default=None, repr=False)  # the signing secret; shown once, by `subscribe`
    # The operator's dispatcher.allowed_hosts, which may take plain http and loopback; not stored.
    allowed_hosts: InitVar[Collection[str]] = DEFAULT_ALLOWED_HOSTS

    def __post_init__(self, allowed_hosts: Collection[str]) -> None:
        """Validate and normalise the fields; raise SubscriptionError naming the field and the fix."""
        object.__setattr__(self, "name", check_name(self.name))
        object.__setattr__(self, "target_url", check_target_url(self.target_url, allowed_hosts))
        object.__setattr__(self, "topics", check_topics(self.topics))
        object.__setattr__(self, "tickers", check_tickers(self.tickers))
        object.__setattr__(self, "min_severity", check_severity(self.min_severity))

    @classmethod
    def from_row(cls, row: SubscriptionRow) -> Subscription:
        """Build a Subscription from its stored row, as stored.

        Not validated again: a row added under an older, looser check must still be listed and removable
        (the dispatcher refuses to deliver to its URL).
        """
        subscription = object.__new__(cls)
        values = {
            "id": row.id,
            "name": row.name,
            "target_url": row.target_url,
            "topics": row.topics,
            "tickers": row.tickers,
            "min_severity": cast(Severity, row.min_severity),
            "created_at": row.created_at,
            "active": row.active,
            "secret": row.secret,
        }
        for name, value in values.items():
            object.__setattr__(subscription, name, value)
        return subscription

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
    allowed_hosts: Collection[str] = DEFAULT_ALLOWED_HOSTS,
) -> Subscription:
    """Validate and store a new subscription with a new signing secret; return it with its id and secret."""
    wanted = Subscription(
        name=name,
        target_url=target_url,
        topics=tuple(topics),
        tickers=tuple(tickers),
        min_severity=check_severity(min_severity),
        allowed_hosts=allowed_hosts,
    )
    try:
        row = store.add_subscription(
            name=wanted.name,
            target_url=wanted.target_url,
            topics=wanted.topics,
            tickers=wanted.tickers,
            min_severity=wanted.min_severity,
            secret=new_secret(),
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
