"""Small Kafka admin helpers: probe a broker, create and delete the topics finpulse uses."""

import contextlib
import functools
import itertools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from stream.connection import Connection, Target, as_connection, client_kwargs
from stream.errors import BrokerError

log = logging.getLogger(__name__)

# A healthy broker answers in milliseconds and a loaded one within a second or two. The worst case, a listener
# that never answers, costs the whole 4 s on top of the 3-5 s (2 busy cores) a command spends importing torch
# before it connects: 8-9.5 s in all, under the 10 s that a bad setting may cost.
PREFLIGHT_TIMEOUT_S = 4.0
_FIX = (
    "set kafka.bootstrap_servers (env FINPULSE_KAFKA__BOOTSTRAP_SERVERS) to a running broker, "
    "or leave it empty to use the local one"
)
_API_VERSIONS_KEY = 18  # ApiVersions v0: every Kafka broker answers it, before any other request
_MAX_RESPONSE_BYTES = 1 << 20  # an ApiVersions answer is a few kB; a larger "size" is some other protocol
_HUNG_UP = "not a Kafka broker: it closed the connection on a Kafka request"
_correlation_ids = itertools.count(1)
_T = TypeVar("_T")


def _split_host_port(server: str) -> tuple[str, int]:
    """Split one `host:port` entry of a bootstrap string."""
    host, _, port = server.strip().rpartition(":")
    return host.strip("[]"), int(port)  # [::1]:9092 → ::1


def port_open(bootstrap: Target, timeout_s: float = 0.5) -> bool:
    """Return True when a TCP connection to the first bootstrap server succeeds."""
    host, port = _split_host_port(as_connection(bootstrap).bootstrap_servers.split(",")[0])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def broker_answers(bootstrap: Target, timeout_s: float = 3.0) -> bool:
    """Return True when the cluster at `bootstrap` answers a metadata request within `timeout_s`."""
    # A plain TCP check first: KafkaAdminClient spawns an IO thread per instance and logs every refused
    # connection, which would flood the log while a broker is still booting.
    if not port_open(bootstrap, timeout_s=min(timeout_s, 0.5)):
        return False
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        admin = KafkaAdminClient(
            **client_kwargs(bootstrap),
            client_id="finpulse-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
    except (KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(KafkaError, OSError):
            admin.close()
    return True


@dataclass
class _Probe:
    """One bootstrap server and how far its check got: resolving, connecting or asking."""

    server: str
    step: str = "resolving"


def require_broker(bootstrap: Target, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Return once the cluster at `bootstrap` answers a metadata request; else raise BrokerError in one sentence.

    Every server is resolved, connected to and asked for its API versions at once, in raw bytes (no client
    threads, no log lines), so the sentence says what failed for each: the host does not resolve, the
    connection is refused or times out, or what listens is not a Kafka broker. Then kafka-python's admin
    client asks for metadata, which also reaches the brokers the cluster advertises. All within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    connection = as_connection(bootstrap)
    servers = connection.bootstrap_servers.split(",")
    probes = [_Probe(server.strip()) for server in servers if server.strip()]
    reach = functools.partial(_reach, deadline=deadline, timeout_s=timeout_s, connection=connection)
    reached = _within(deadline, [functools.partial(reach, p) for p in probes])
    problems = {p.server: _late(p.step, timeout_s) if r is None else r[0] for p, r in zip(probes, reached, strict=True)}
    reachable = ",".join(server for server, problem in problems.items() if problem is None)
    if not reachable:
        found = " or ".join(f"{server} ({problem})" for server, problem in problems.items())
        if connection.protocol == "PLAINTEXT" and _HUNG_UP in found:
            found += ", as a TLS listener does to a plaintext client: set kafka.client.security_protocol"
        raise BrokerError(f"cannot reach Kafka at {found}: {_FIX}")
    for server, problem in problems.items():
        if problem is not None:
            log.warning("event=bootstrap_server_unusable server=%s problem=%r", server, problem)
    (answered,) = _within(
        deadline, [lambda: _metadata_problem(replace(connection, bootstrap_servers=reachable), deadline)]
    )
    problem = f"sent no metadata within {timeout_s:g} s" if answered is None else answered[0]
    if problem is not None:
        if connection.protocol.startswith("SASL_"):
            # kafka-python retries a refused login silently until its timeout: this is how one looks from here.
            check = (
                "check kafka.client.sasl_plain_username, its password and sasl_mechanism (a refused login ends "
                "like this), then that the listeners it advertises are reachable from here"
            )
        else:
            check = (
                "check that the listeners it advertises are reachable from here, and if the cluster needs SASL, "
                "set kafka.client.security_protocol"
            )
        raise BrokerError(f"Kafka at {reachable} answers but {problem}; {check}, or {_FIX}")


def _within(deadline: float, calls: Sequence[Callable[[], _T]]) -> list[tuple[_T] | None]:
    """Run `calls` at once in daemon threads until `deadline`; return `(result,)` for each, None for a late one."""
    # getaddrinfo cannot be interrupted and kafka-python's bootstrap may outlast its own timeouts: a daemon
    # thread bounds both, and the process may exit while one still runs.
    results: list[tuple[_T] | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], _T]) -> None:
        try:
            results[index] = (call(),)
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(i, call), name="finpulse-preflight", daemon=True)
        for i, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    return results


def _late(step: str, timeout_s: float) -> str:
    """Say what did not happen within `timeout_s` at `step`."""
    if step == "resolving":
        return f"host did not resolve within {timeout_s:g} s"
    if step == "connecting":
        return f"connection timed out after {timeout_s:g} s"
    if step == "handshaking":
        return f"no TLS handshake within {timeout_s:g} s: is the listener TLS? check kafka.client.security_protocol"
    return f"no Kafka answer within {timeout_s:g} s: not a Kafka broker, or one too busy to answer"


def _reach(probe: _Probe, deadline: float, timeout_s: float, connection: Connection) -> str | None:
    """Resolve, connect to and ask one server for its API versions; return what failed, None if it is Kafka.

    On a TLS listener the request goes inside a TLS session made with the clients' own trust settings, so a
    certificate the clients would refuse is named here; ApiVersions needs no SASL login (KIP-511), so a SASL
    listener answers it too and a wrong password is left to the metadata step.
    """
    host, port = _split_host_port(probe.server)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"host does not resolve: {e.strerror}"  # a typo (not known), or DNS down (temporary failure)
    try:
        probe.step = "connecting"
        with _connect(addresses, deadline) as sock:
            if connection.uses_tls:
                probe.step = "handshaking"
                with connection.ssl_context().wrap_socket(sock, server_hostname=host) as tls:
                    probe.step = "asking"
                    return _not_kafka(tls)
            probe.step = "asking"
            return _not_kafka(sock)
    except ConnectionRefusedError:
        return "connection refused"
    except ssl.SSLCertVerificationError as e:
        return f"its TLS certificate is not trusted here ({e.verify_message}): set kafka.client.ssl_cafile to its CA"
    except ssl.SSLError as e:
        return f"the TLS handshake failed ({e.reason or e}): is the listener TLS? check kafka.client.security_protocol"
    except TimeoutError:
        return _late(probe.step, timeout_s)
    except OSError as e:
        if probe.step == "asking":  # reset or broken pipe: it hung up on a Kafka request
            return _HUNG_UP
        return f"unreachable: {e.strerror or e}"


def _connect(addresses: list[tuple[Any, ...]], deadline: float) -> socket.socket:
    """Connect to the first of `addresses` that accepts before `deadline`; raise the last error otherwise."""
    error: OSError = TimeoutError()
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return sock
    raise error


def _not_kafka(sock: socket.socket) -> str | None:
    """Send an ApiVersions v0 request; return None if a Kafka answer comes back, else what came instead."""
    correlation_id = next(_correlation_ids)
    client_id = b"finpulse-preflight"
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id)) + client_id
    sock.sendall(struct.pack(">i", len(body)) + body)
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        if not chunk:
            return _HUNG_UP
        head += chunk
    size, answered_id = struct.unpack(">ii", head)
    if answered_id != correlation_id or not 4 <= size <= _MAX_RESPONSE_BYTES:
        return "not a Kafka broker: it answered a Kafka request with something else"
    return None


def _metadata_problem(bootstrap: Target, deadline: float) -> str | None:
    """Ask the cluster for its topics with kafka-python; return None on success, else what went wrong."""
    timeout_ms = max(int((deadline - time.monotonic()) * 1000), 100)
    try:
        admin = KafkaAdminClient(
            **client_kwargs(bootstrap),
            client_id="finpulse-preflight",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except (KafkaError, OSError) as e:
        return f"no metadata came back ({type(e).__name__}: {e})"
    try:
        admin.list_topics()
    except (KafkaError, OSError) as e:
        return f"listing its topics failed ({type(e).__name__}: {e})"
    finally:
        with contextlib.suppress(KafkaError, OSError):
            admin.close()
    return None


def ensure_topics(
    bootstrap: Target,
    names: Sequence[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics in `names` that do not exist yet; return the names actually created.

    Existing topics are left as they are, even when their partition count differs from `partitions`.
    Returns only once every named topic has a leader for each partition, so callers can produce at once.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")
    wanted = list(dict.fromkeys(names))  # de-duplicate, keep order: the broker rejects repeated names
    if not wanted:
        return []
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        admin = KafkaAdminClient(
            **client_kwargs(bootstrap),
            client_id="finpulse-admin",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except (KafkaError, OSError) as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap} to create topics: {exc}") from exc
    try:
        # raise_errors=False: one existing topic must not hide whether the others were created.
        response = admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": replication_factor} for name in wanted},
            timeout_ms=timeout_ms,
            raise_errors=False,
        )
        created: list[str] = []
        failures: list[str] = []
        for topic in response["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                created.append(topic["name"])
            elif error is not TopicAlreadyExistsError:
                failures.append(f"{topic['name']}: {topic.get('error_message') or error.__name__}")
        if failures:
            raise BrokerError(f"Kafka at {bootstrap} refused to create topics ({'; '.join(failures)})")
        admin.wait_for_topics(wanted, timeout_ms=timeout_ms)
        return [name for name in wanted if name in created]  # the response order is arbitrary
    except KafkaError as exc:
        raise BrokerError(f"creating topics {wanted} on {bootstrap} failed: {exc}") from exc
    finally:
        with contextlib.suppress(KafkaError, OSError):
            admin.close()


def delete_topics(bootstrap: Target, names: Sequence[str], *, timeout_s: float = 30.0) -> list[str]:
    """Delete the topics in `names` that exist; return the names actually deleted.

    Missing topics are skipped, so cleanup code may name topics that were never created.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        admin = KafkaAdminClient(
            **client_kwargs(bootstrap),
            client_id="finpulse-admin",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except (KafkaError, OSError) as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap} to delete topics: {exc}") from exc
    try:
        response = admin.delete_topics(wanted, timeout_ms=timeout_ms, raise_errors=False)
        deleted: list[str] = []
        failures: list[str] = []
        for topic in response["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                deleted.append(topic["name"])
            elif error is not UnknownTopicOrPartitionError:
                failures.append(f"{topic['name']}: {topic.get('error_message') or error.__name__}")
        if failures:
            raise BrokerError(f"Kafka at {bootstrap} refused to delete topics ({'; '.join(failures)})")
        return [name for name in wanted if name in deleted]  # the response order is arbitrary
    except KafkaError as exc:
        raise BrokerError(f"deleting topics {wanted} on {bootstrap} failed: {exc}") from exc
    finally:
        with contextlib.suppress(KafkaError, OSError):
            admin.close()
