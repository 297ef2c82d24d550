"""Fail fast, in one sentence, when the PostgreSQL server of the lake's catalog takes no connection.

libpq alone would wait for the kernel's TCP timeout (minutes) on a silent host and print a multi-line message
that does not name the setting; commands probe the catalog first (before importing torch, where they do).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

from storage.config import StorageConfig
from storage.errors import StorageError
from storage.lake_config import parse_dsn


class CatalogUnreachableError(StorageError):
    """The PostgreSQL server of the lake's catalog takes no connection; the message names it and the fix."""


# libpq's port when a DSN names none.
POSTGRES_PORT = 5432
# A refused or unresolvable server fails at once; a silent one (a firewall dropping packets) costs this much on
# top of the second a command takes to start, within the 10 s a bad setting may cost. libpq alone would wait
# for the kernel's TCP timeout: minutes.
POSTGRES_PREFLIGHT_S = 4.0


def require_catalog(storage: StorageConfig, timeout_s: float = POSTGRES_PREFLIGHT_S) -> None:
    """Return once the lake's PostgreSQL catalog takes a TCP connection; else raise CatalogUnreachableError.

    Nothing to check for a SQLite catalog. Only TCP hosts are probed: a Unix socket, or a DSN that leaves the
    host to libpq's defaults, is left to libpq. The sentence names host:port and why, never the password.
    """
    lake = storage.lake
    if lake is None or lake.catalog != "postgres":
        return
    for field, dsn in (("postgres_dsn", lake.postgres_dsn), ("analyst_postgres_dsn", lake.analyst_postgres_dsn)):
        if dsn is None:
            continue
        servers = _postgres_servers(parse_dsn(dsn.get_secret_value()))
        problems = _probe_tcp(servers, timeout_s)
        if servers and all(problem is not None for problem in problems.values()):
            found = " or ".join(f"{server} ({problem})" for server, problem in problems.items())
            env = f"FINPULSE_STORAGE__LAKE__{field.upper()}"
            raise CatalogUnreachableError(
                f"cannot reach PostgreSQL (the lake's catalog) at {found}: fix host and port in "
                f"storage.lake.{field} (env {env}), or start the server"
            )


def _postgres_servers(pairs: dict[str, str]) -> list[tuple[str, int]]:
    """Return the TCP (host, port) pairs a libpq DSN names, in its order (libpq tries each in turn)."""
    hosts = (pairs.get("hostaddr") or pairs.get("host") or "").split(",")
    ports = (pairs.get("port") or "").split(",")
    servers = []
    for n, host in enumerate(hosts):
        port = (ports[n] if len(ports) == len(hosts) else ports[0]).strip()
        host = host.strip()
        # Empty means libpq's default, and a path (or @name) a Unix socket: neither is a TCP address to probe.
        if not host or host.startswith(("/", "@")) or (port and not port.isdigit()):
            continue
        servers.append((host, int(port) if port else POSTGRES_PORT))
    return servers


def _probe_tcp(servers: Sequence[tuple[str, int]], timeout_s: float) -> dict[str, str | None]:
    """Connect to every server at once; return, per `host:port`, why it failed, or None when it took the connection."""

    def name(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets

    problems: dict[str, str | None] = {}

    def probe(host: str, port: int) -> None:
        problem: str | None = None
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except socket.gaierror as e:
            problem = f"host does not resolve: {e.strerror}"
        except ConnectionRefusedError:
            problem = "connection refused"
        except TimeoutError:
            problem = f"connection timed out after {timeout_s:g} s"
        except OSError as e:
            problem = e.strerror or type(e).__name__
        problems[name(host, port)] = problem

    # Daemon threads, joined until the deadline: getaddrinfo cannot be interrupted, and a stuck one must not
    # keep the command from saying so.
    deadline = time.monotonic() + timeout_s
    threads = [threading.Thread(target=probe, args=server, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = f"no connection within {timeout_s:g} s"
    return {name(host, port): problems.get(name(host, port), late) for host, port in servers}
