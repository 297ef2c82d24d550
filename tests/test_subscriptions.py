"""Where subscriptions may point, what they may be called, and how their signing secret is shown: real DuckDB files."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import duckdb
import pytest
from pydantic import ValidationError

from finpulse.cli import main
from finpulse.config import load_config
from monitor.config import DispatcherConfig
from monitor.errors import SubscriptionError
from monitor.subscriptions import (
    add_subscription,
    address_refusal,
    check_name,
    check_target_url,
    list_subscriptions,
    mask_secret,
    remove_subscription,
    resolve_target,
)
from storage import AlertStore, StorageConfig
from storage.schema import MIGRATIONS

PASSWORD = "hunter2-Zq9"  # must never show in a message
TOKEN = "cli-token-0123456789abcdef"


@pytest.fixture()
def store(tmp_path: Path) -> AlertStore:
    """Return an AlertStore on a fresh history file under tmp_path."""
    return AlertStore(StorageConfig(duckdb_path=tmp_path / "history" / "finpulse.duckdb", lock_timeout_s=20))


# Every URL `finpulse subscribe` accepted on main that it must refuse, with what the reason says.
REFUSED_URLS: list[tuple[str, str]] = [
    ("http://169.254.169.254/latest", "169.254.169.254 is a cloud metadata address"),
    ("https://169.254.169.254/latest/meta-data/iam/", "cloud metadata address"),
    ("https://169.254.10.1/", "169.254.10.1 is link-local"),
    ("https://[fe80::1]/hook", "fe80::1 is link-local"),
    ("https://[fe80::1%25eth0]/hook", "fe80::1 is link-local"),
    ("https://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal is a cloud metadata name"),
    ("https://METADATA.google.internal./x", "cloud metadata name"),
    ("https://[fd00:ec2::254]/", "cloud metadata address"),
    ("https://[::ffff:169.254.169.254]/", "169.254.169.254 is a cloud metadata address (inside ::ffff:a9fe:a9fe)"),
    ("https://[64:ff9b::a9fe:a9fe]/", "cloud metadata address (inside 64:ff9b::a9fe:a9fe)"),
    ("http://[::1]:1", "::1 is loopback; add it to dispatcher.allowed_hosts"),
    ("https://127.0.0.2:8080/", "127.0.0.2 is loopback"),
    ("https://app.localhost/", "app.localhost is loopback (RFC 6761)"),
    ("http://localhost:0", "has an invalid port; use a number from 1 to 65535"),
    ("https://hooks.example.com:0/", "invalid port"),
    ("https://hooks.example.com:65536/", "invalid port"),
    ("https://hooks.example.com:99999999999/", "invalid port"),
    ("http://0.0.0.0", "0.0.0.0 is the unspecified address"),
    ("http://0.0.0.0:9466/alertmanager", "unspecified address"),
    ("https://[::]/", ":: is the unspecified address"),
    ("https://224.0.0.1/", "224.0.0.1 is multicast"),
    ("https://[ff02::1]/", "ff02::1 is multicast"),
    ("https://255.255.255.255/", "255.255.255.255 is the broadcast address"),
    ("https://240.0.0.1/", "240.0.0.1 is reserved"),
    ("http://2130706433/", "spells an IP address in a form other than a.b.c.d"),
    ("https://0x7f000001/", "spells an IP address"),
    ("https://0x7f.0.0.1/", "spells an IP address"),
    ("https://0177.0.0.1/", "spells an IP address"),
    ("https://127.1/", "spells an IP address"),
    ("https://0/", "spells an IP address"),
    ("https://2852039166/latest", "spells an IP address"),  # 169.254.169.254
    ("https://hooks.example.com/" + "a" * 10_240, "is 10,266 characters long; keep it to 2,048"),
    (f"http://user:{PASSWORD}@hooks.example.com/x", "carries credentials before the host"),
    (f"https://admin:{PASSWORD}@hooks.example.com/x", "carries credentials before the host"),
    (f"https://{PASSWORD}@hooks.example.com/x", "carries credentials"),
    (f"https://user:{PASSWORD}@169.254.169.254/", "carries credentials"),
    (f"https://u:{PASSWORD}@hooks.example.com:0/", "carries credentials"),
    ("https://hooks.example.com/\x07bell", "contains the non-printable character U+0007"),
    ("https://hooks\u200b.example.com/", "non-printable character U+200B"),
    ("https://hooks.example.com/\x1b[31m", "non-printable character U+001B"),
    ("https://hooks.example.com/\u202ereversed", "non-printable character U+202E"),
    ("https://hooks.example.com/a\nb", "contains whitespace"),
    ("http://hooks.example.com/finpulse", "is plain http; use https, or add hooks.example.com to"),
    ("https://[v1.fe80::1]/", "in brackets, which is not an IPv6 address"),
    ("https://[::1/", "is not a URL"),
    ("https://-hooks.example.com/", "is not a valid host name"),
    ("https://hooks..example.com/", "is not a valid host name"),
    ("https://hooks.example.com\\@evil/", "carries credentials"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
def test_add_subscription_refuses_each_url_with_one_line(store: AlertStore, url: str, reason: str) -> None:
    with pytest.raises(SubscriptionError) as caught:
        add_subscription(store, name="desk", target_url=url)
    message = str(caught.value)
    assert message.startswith("subscription target_url: ")
    assert reason in message
    assert "\n" not in message and "\x1b" not in message and "\x07" not in message
    assert PASSWORD not in message
    assert len(message) < 400  # a 10 KB URL is not echoed whole
    assert list_subscriptions(store) == []


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/finpulse?token=abc",
        "HTTPS://Hooks.Example.com:8443/x",
        "https://10.0.0.5/hook",  # private networks hold internal webhooks
        "https://192.168.1.20:8443/hook",
        "https://[2001:db8::1]/hook",
        "https://1.2.3.4/hook",
        "https://123.example.com/hook",  # a numeric label that is not the last one
        "https://xn--bcher-kva.example/hook",
        "https://bücher.example/hook",
        "http://127.0.0.1:8080/hook",  # allowed by default: the local demo
        "http://localhost:8080/hook",
        "http://LOCALHOST./hook",
    ],
)
def test_good_urls_are_accepted(url: str) -> None:
    assert check_target_url(url) == url


def test_allowed_hosts_decide_plain_http_and_loopback() -> None:
    with pytest.raises(SubscriptionError, match=r"plain http; use https, or add 10.0.0.5 .*\(now: none\)"):
        check_target_url("http://10.0.0.5:8080/hook", allowed_hosts=())
    with pytest.raises(SubscriptionError, match="127.0.0.1 is loopback; add it to dispatcher.allowed_hosts"):
        check_target_url("http://127.0.0.1:8080/hook", allowed_hosts=())
    with pytest.raises(SubscriptionError, match="127.0.0.1 is loopback"):
        check_target_url("https://127.0.0.1:8080/hook", allowed_hosts=())
    assert check_target_url("http://hooks.internal/x", allowed_hosts=("hooks.internal",)) == "http://hooks.internal/x"
    assert check_target_url("http://[::1]:8080/x", allowed_hosts=("[::1]",)) == "http://[::1]:8080/x"
    assert check_target_url("http://[0:0::1]:8080/x", allowed_hosts=("::1",)) == "http://[0:0::1]:8080/x"
    # Allowing a host never opens metadata, link-local, unspecified or multicast addresses.
    for host in ("169.254.169.254", "metadata.google.internal", "fe80::1", "0.0.0.0", "224.0.0.1"):
        with pytest.raises(ValidationError, match="can never be allowed"):
            DispatcherConfig(allowed_hosts=(host,))
    config = load_config(environ={"FINPULSE_DISPATCHER__ALLOWED_HOSTS": "Hooks.Internal, 127.0.0.1"})
    assert config.dispatcher.allowed_hosts == ("hooks.internal", "127.0.0.1")
    assert load_config(environ={"FINPULSE_DISPATCHER__ALLOWED_HOSTS": ""}).dispatcher.allowed_hosts == ()


def test_address_refusal_and_resolution() -> None:
    assert address_refusal(ipaddress.ip_address("10.1.2.3")) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allowed=True) is None
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), allowed=True) == (
        "169.254.169.254 is a cloud metadata address"
    )
    # Real resolution of a name that points at loopback: refused unless the name is allowed.
    with pytest.raises(SubscriptionError, match="localhost resolves to a refused address: .* is loopback"):
        resolve_target("localhost", 80, allowed=False)
    assert resolve_target("localhost", 80, allowed=True)
    assert resolve_target("127.0.0.1", 80, allowed=True) == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("x" * 65, "65 characters is too long; keep it to 64"),
        ("fed\x00desk", r"contains '\\x00'; use ASCII letters, digits, spaces and - _ . only"),
        ("fed\x1b[2Jdesk", r"contains '\\x1b'"),
        ("fed\ndesk", r"contains '\\n'"),
        ("fed\u200bdesk", r"contains '\\u200b'"),
        ("fеd-desk", "contains 'е'"),  # a Cyrillic е
        ("fed/desk", "contains '/'"),
        ("[bold]fed", r"contains '\['"),
        ("42", "is a number"),
    ],
)
def test_bad_names_are_refused_with_one_line(name: str, reason: str) -> None:
    with pytest.raises(SubscriptionError, match=reason) as caught:
        check_name(name)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_names_are_unique_in_any_case(store: AlertStore) -> None:
    assert check_name(" Fed Desk_1.v2-b ") == "Fed Desk_1.v2-b"
    first = add_subscription(store, name="Fed-Desk", target_url="https://hooks.example.com/a")
    for taken in ("fed-desk", "FED-DESK", "fEd-DeSk"):
        with pytest.raises(SubscriptionError, match=f"name '{taken}' is taken by subscription 1 \\(as 'Fed-Desk';"):
            add_subscription(store, name=taken, target_url="https://hooks.example.com/b")
    remove_subscription(store, first.id or 0)
    assert add_subscription(store, name="fed-desk", target_url="https://hooks.example.com/b").id == 2


def test_rows_stored_under_looser_checks_still_list_and_remove(store: AlertStore) -> None:
    # As main stored them: a metadata URL, a name with a control character, a decimal IP.
    store.ensure_schema()
    for name, url in (("meta\x07", "http://169.254.169.254/latest"), ("Desk " * 20, "http://2130706433/")):
        store.add_subscription(name=name, target_url=url, topics=(), tickers=(), min_severity="info")
    assert [s.name for s in list_subscriptions(store)] == ["meta\x07", "Desk " * 20]
    assert remove_subscription(store, "meta\x07").target_url == "http://169.254.169.254/latest"
    assert remove_subscription(store, 2).target_url == "http://2130706433/"


def test_a_file_of_schema_v4_lists_without_secrets_until_migrated(store: AlertStore) -> None:
    store.path.parent.mkdir(parents=True)
    with duckdb.connect(str(store.path)) as con:
        con.execute("CREATE TABLE schema_version (version INTEGER, description VARCHAR, applied_at TIMESTAMPTZ)")
        for migration in MIGRATIONS[:4]:
            for statement in migration.statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [migration.version, migration.description])
        con.execute(
            "INSERT INTO subscriptions VALUES "
            "(1, 'old', 'https://hooks.example.com/', [], [], 'info', now(), true, NULL)"
        )
    # Read-only: nothing migrates, and the missing column reads as "no secret yet".
    assert [(s.name, s.secret) for s in list_subscriptions(store)] == [("old", None)]
    assert mask_secret(None) == "none yet (made at the first delivery)"
    store.ensure_schema()
    assert [(s.name, s.secret) for s in list_subscriptions(store)] == [("old", None)]


def test_each_subscription_gets_its_own_secret(store: AlertStore) -> None:
    secrets = {
        add_subscription(store, name=f"desk-{n}", target_url=f"https://hooks.example.com/{n}").secret for n in range(5)
    }
    assert len(secrets) == 5
    for secret in secrets:
        assert secret is not None and secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    listed = list_subscriptions(store)
    assert {s.secret for s in listed} == secrets  # stored, for the dispatcher to sign with
    assert all(s.secret not in repr(s) for s in listed if s.secret)
    assert mask_secret("whsec_abcdefghijkl") == "whsec_…ijkl"


def test_subscribe_shows_the_secret_once_and_the_listing_masks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--duckdb-path", str(tmp_path / "h.duckdb")]
    assert main(["subscribe", "fed-desk", "--url", "https://hooks.example.com/x", *db]) == 0
    out = capsys.readouterr().out
    (secret,) = [word for word in out.split() if word.startswith("whsec_")]
    assert "shown once" in out and len(secret) == len("whsec_") + 44
    assert main(["subscriptions", *db]) == 0
    listed = capsys.readouterr().out
    assert secret not in listed and "whsec_…" + secret[-4:] in listed

    assert main(["subscribe", "meta", "--url", "http://169.254.169.254/latest", *db]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cloud metadata address" in err
    assert main(["subscribe", "creds", "--url", f"https://u:{PASSWORD}@hooks.example.com/", *db]) == 1
    err = capsys.readouterr().err
    assert PASSWORD not in err and "credentials" in err
    assert main(["subscribe", "FED-DESK", "--url", "https://hooks.example.com/y", *db]) == 1
    assert "is taken" in capsys.readouterr().err


def test_finpulse_config_never_prints_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINPULSE_DISPATCHER__TOKEN", TOKEN)
    assert load_config().dispatcher.token is not None
    assert main(["config", "--duckdb-path", str(tmp_path / "h.duckdb")]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and '"token": "**********"' in out
    monkeypatch.setenv("FINPULSE_DISPATCHER__TOKEN", "short-Zq9")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "too short" in err and "short-Zq9" not in err


def _dispatcher_values(**values: Any) -> DispatcherConfig:
    return DispatcherConfig(**values)


def test_tokens_must_fit_a_header() -> None:
    with pytest.raises(ValidationError, match="use only letters, digits") as caught:
        _dispatcher_values(token="has spaces in it, long enough")
    assert "has spaces" not in str(caught.value)
    assert _dispatcher_values(token="A" * 16).token is not None
