"""How every Kafka client of finpulse reaches its cluster: the bootstrap servers plus the security settings.

A `Connection` is what producers, consumers and admin clients are built from; a bare bootstrap string stands for
a plaintext cluster (the local broker, tests). The settings are kafka-python's own keyword arguments
(`security_protocol`, `sasl_mechanism`, `ssl_cafile`, ...), so they mean exactly what that client documents.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Settings whose values are secrets: never in a log line, an error or `repr`.
SECRET_SETTINGS = frozenset({"sasl_plain_password", "ssl_password"})


@dataclass(frozen=True)
class Connection:
    """A Kafka cluster: `bootstrap_servers` and the client settings that reach it (security, timeouts)."""

    bootstrap_servers: str
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __str__(self) -> str:
        """Return the bootstrap string: what error lines and logs name the cluster by."""
        return self.bootstrap_servers

    def __repr__(self) -> str:
        """Name the settings but hide the secrets' values."""
        shown = {k: "***" if k in SECRET_SETTINGS else v for k, v in self.settings.items()}
        return f"Connection({self.bootstrap_servers!r}, {shown})"

    @property
    def protocol(self) -> str:
        """Return the security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
        return str(self.settings.get("security_protocol", "PLAINTEXT"))

    @property
    def uses_tls(self) -> bool:
        """Return True when the connection is encrypted with TLS."""
        return self.protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext:
        """Return a TLS context with the same trust, client certificate and hostname check as the clients."""
        context = ssl.create_default_context(cafile=self.settings.get("ssl_cafile"))
        context.check_hostname = bool(self.settings.get("ssl_check_hostname", True))
        if self.settings.get("ssl_certfile"):
            context.load_cert_chain(
                self.settings["ssl_certfile"], self.settings.get("ssl_keyfile"), self.settings.get("ssl_password")
            )
        return context


# A bare string is the bootstrap of a plaintext cluster.
Target = Connection | str


def as_connection(target: Target) -> Connection:
    """Return `target` as a Connection."""
    return target if isinstance(target, Connection) else Connection(target)


def client_kwargs(target: Target, **extra: Any) -> dict[str, Any]:
    """Return the keyword arguments of a kafka-python client for `target`, with `extra` on top."""
    connection = as_connection(target)
    return {"bootstrap_servers": connection.bootstrap_servers, **connection.settings, **extra}
