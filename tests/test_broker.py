"""Tests of the local Kafka broker against a real JVM: lifecycle, data on restart, admin, and setup errors."""

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from stream.admin import broker_answers, delete_topics, ensure_topics
from stream.broker import LocalBroker
from stream.errors import BrokerError


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    """Send one message and wait for the broker's acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, value=value).get(timeout=30)
    finally:
        producer.close()


def _consume_one(bootstrap: str, topic: str, group: str, timeout_s: float = 30.0) -> bytes | None:
    """Read the first message of `topic` from the beginning as consumer group `group`; None on timeout."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                if records:
                    value: bytes = records[0].value
                    return value
        return None
    finally:
        consumer.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_lifecycle_and_data_survive_restart(tmp_path: Path, unique_name: Callable[[str], str]) -> None:
    broker = LocalBroker(tmp_path / "kafka")
    assert not broker.status().running

    bootstrap = broker.start()
    status = broker.status()
    assert status.running
    assert status.bootstrap == bootstrap
    assert status.pid is not None
    assert bootstrap.startswith("127.0.0.1:")
    # A second start finds the running broker instead of launching another JVM.
    assert broker.start() == bootstrap
    assert broker.status().pid == status.pid

    topic = unique_name("lifecycle")
    ensure_topics(bootstrap, [topic], partitions=1)
    _produce(bootstrap, topic, b"hello kafka")
    assert _consume_one(bootstrap, topic, unique_name("group")) == b"hello kafka"

    broker.stop()
    stopped = broker.status()
    assert not stopped.running
    assert stopped.pid is None
    assert not broker_answers(bootstrap, timeout_s=1.0)
    broker.stop()  # idempotent

    # A fresh instance, as a new process would create: same dir, same port, same data.
    again = LocalBroker(tmp_path / "kafka")
    try:
        assert again.start() == bootstrap
        assert _consume_one(bootstrap, topic, unique_name("group")) == b"hello kafka"
    finally:
        again.stop()
    assert not again.status().running


@pytest.mark.kafka
def test_ensure_and_delete_topics_touch_only_what_they_must(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    first, second = unique_name("topic"), unique_name("topic")
    assert ensure_topics(kafka_bootstrap, [first], partitions=3) == [first]
    # Existing topics are skipped, not an error; repeated names are sent once.
    assert ensure_topics(kafka_bootstrap, [first, second, second], partitions=2) == [second]

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(first) == {0, 1, 2}
        assert consumer.partitions_for_topic(second) == {0, 1}
    finally:
        consumer.close()

    # Missing topics are skipped, so cleanup code may name topics that were never created.
    never = unique_name("never")
    assert delete_topics(kafka_bootstrap, [first, second, never]) == [first, second]
    assert delete_topics(kafka_bootstrap, [first]) == []


def test_stop_without_start_is_a_no_op(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "never-started")
    broker.stop()
    assert not broker.status().running
    assert not (tmp_path / "never-started").exists()


def test_missing_jars_without_mvn_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    broker = LocalBroker(tmp_path / "data", jars_dir=tmp_path / "no-jars")

    with pytest.raises(BrokerError, match=r"^mvn not found and .*no-jars has no Kafka jars: install Maven"):
        broker.ensure_jars()
    with pytest.raises(BrokerError, match="mvn not found"):
        broker.start(timeout_s=1)
    assert not broker.status().running


def test_missing_java_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "kafka_2.13-4.1.1.jar").touch()  # counts as installed, so only java is missing
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(BrokerError, match=r"^java not found: install OpenJDK 17\+"):
        LocalBroker(tmp_path / "data", jars_dir=jars).start(timeout_s=1)


def test_requested_port_in_use_raises(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is in use"):
            LocalBroker(tmp_path / "data").start(port=port, timeout_s=1)


def test_kafka_client_checksums_in_c() -> None:
    """kafka-python falls back to a pure-Python CRC-32C without the crc32c package: a slow, silent install gap."""
    from kafka.record import util

    assert util.crc32c_c is not None
    assert util.calc_crc32c(memoryview(b"123456789")) == 0xE3069283  # the CRC-32C check value
