"""Small Kafka admin helpers: probe a broker, create and delete the topics finpulse uses."""

import contextlib
import socket
from collections.abc import Sequence

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from stream.errors import BrokerError


def _split_host_port(server: str) -> tuple[str, int]:
    """Split one `host:port` entry of a bootstrap string."""
    host, _, port = server.strip().rpartition(":")
    return host, int(port)


def port_open(bootstrap: str, timeout_s: float = 0.5) -> bool:
    """Return True when a TCP connection to the first bootstrap server succeeds."""
    host, port = _split_host_port(bootstrap.split(",")[0])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def broker_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """Return True when the cluster at `bootstrap` answers a metadata request within `timeout_s`."""
    # A plain TCP check first: KafkaAdminClient spawns an IO thread per instance and logs every refused
    # connection, which would flood the log while a broker is still booting.
    if not port_open(bootstrap, timeout_s=min(timeout_s, 0.5)):
        return False
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
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


def ensure_topics(
    bootstrap: str,
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
            bootstrap_servers=bootstrap,
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


def delete_topics(bootstrap: str, names: Sequence[str], *, timeout_s: float = 30.0) -> list[str]:
    """Delete the topics in `names` that exist; return the names actually deleted.

    Missing topics are skipped, so cleanup code may name topics that were never created.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
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
