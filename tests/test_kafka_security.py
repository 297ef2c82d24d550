"""Kafka security against a real broker: SASL/PLAIN, TLS and SASL_SSL listeners, reached through `kafka.client`.

One broker for the module opens all three secured listeners beside its plaintext one. Its certificate is signed
by a CA made here with Java's keytool; clients trust that CA through `kafka.client.ssl_cafile`, as they would a
company CA. The SASL password travels only through the environment or a file, and must never be printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from finpulse.cli import main
from finpulse.config import load_config
from finpulse.errors import ConfigError
from finpulse.replay import labelled_stream, news_messages
from finpulse.runtime import connect
from learner.config import ModelConfig
from learner.model import Classifier
from monitor.metrics import ScorerMetrics
from storage import History, StorageConfig
from stream.admin import require_broker
from stream.broker import BrokerSecurity, LocalBroker
from stream.config import ScorerConfig, TopicNames
from stream.connection import Connection, client_kwargs
from stream.errors import BrokerError
from stream.scorer import Scorer

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(shutil.which("keytool") is None, reason="keytool (a JDK) is needed to make certificates"),
]

USER = "analyst"
PASSWORD = "s3cret-Pa55-" + uuid.uuid4().hex[:8]  # unique: a leak into any output is unmistakable
STORE_PASSWORD = "store-" + uuid.uuid4().hex[:8]


def _keytool(*args: str) -> None:
    subprocess.run(["keytool", *args], check=True, capture_output=True, timeout=120)


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """Make a CA and a broker certificate it signs for 127.0.0.1; return (broker keystore, CA PEM)."""
    ca_store, broker_store = folder / "ca.p12", folder / "broker.p12"
    ca_pem, csr, cert = folder / "ca.pem", folder / "broker.csr", folder / "broker.pem"
    common = ["-storetype", "PKCS12", "-storepass", STORE_PASSWORD, "-keypass", STORE_PASSWORD]
    key = ["-keyalg", "RSA", "-keysize", "2048", "-validity", "2"]
    _keytool("-genkeypair", "-alias", "ca", "-dname", "CN=finpulse test CA", "-ext", "bc:c", *key,
             "-keystore", str(ca_store), *common)  # fmt: skip
    _keytool("-exportcert", "-rfc", "-alias", "ca", "-keystore", str(ca_store), "-file", str(ca_pem), *common)
    _keytool("-genkeypair", "-alias", "broker", "-dname", "CN=localhost", *key,
             "-keystore", str(broker_store), *common)  # fmt: skip
    _keytool("-certreq", "-alias", "broker", "-keystore", str(broker_store), "-file", str(csr), *common)
    _keytool("-gencert", "-rfc", "-alias", "ca", "-keystore", str(ca_store), "-infile", str(csr),
             "-outfile", str(cert), "-ext", "SAN=IP:127.0.0.1,DNS:localhost", "-validity", "2", *common)  # fmt: skip
    _keytool("-importcert", "-noprompt", "-alias", "ca", "-keystore", str(broker_store), "-file", str(ca_pem), *common)
    _keytool("-importcert", "-alias", "broker", "-keystore", str(broker_store), "-file", str(cert), *common)
    return broker_store, ca_pem


class SecureBroker:
    """The module's broker: where each secured listener is, and the CA that signed its certificate."""

    def __init__(self, listeners: dict[str, str], ca: Path) -> None:
        self.listeners = listeners
        self.ca = ca

    def environ(self, protocol: str, **extra: str) -> dict[str, str]:
        """Return the FINPULSE_ environment that points a command at the listener of `protocol`."""
        env = {
            "FINPULSE_KAFKA__BOOTSTRAP_SERVERS": self.listeners[protocol],
            "FINPULSE_KAFKA__CLIENT__SECURITY_PROTOCOL": protocol,
        }
        if protocol.startswith("SASL_"):
            env |= {
                "FINPULSE_KAFKA__CLIENT__SASL_MECHANISM": "PLAIN",
                "FINPULSE_KAFKA__CLIENT__SASL_PLAIN_USERNAME": USER,
                "FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD": PASSWORD,
            }
        if protocol.endswith("SSL"):
            env["FINPULSE_KAFKA__CLIENT__SSL_CAFILE"] = str(self.ca)
        return env | extra


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    folder = tmp_path_factory.mktemp("secure-kafka")
    keystore, ca = make_certificates(folder)
    security = BrokerSecurity(users={USER: PASSWORD}, keystore=keystore, keystore_password=STORE_PASSWORD)
    broker = LocalBroker(folder / "kafka", security=security)
    broker.start()
    try:
        listeners = dict(broker.status().listeners)
        assert set(listeners) == {"SASL_PLAINTEXT", "SSL", "SASL_SSL"}
        yield SecureBroker(listeners, ca)
    finally:
        broker.stop()


def read_values(connection: Connection, topic: str, expected: int, timeout_s: float = 60) -> list[bytes]:
    consumer = KafkaConsumer(**client_kwargs(connection, group_id=None, enable_auto_commit=False))
    try:
        deadline = time.monotonic() + timeout_s
        while not (found := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.2)
        partitions = [TopicPartition(topic, p) for p in sorted(found or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        values: list[bytes] = []
        while len(values) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                values.extend(r.value for r in batch)
        return values
    finally:
        consumer.close()


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SSL", "SASL_SSL"])
def test_label_send_reaches_a_secured_listener_through_the_config(
    secure_broker: SecureBroker,
    protocol: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`finpulse label send` on the secured listener: preflight, topic creation and the producer all use it."""
    for key, value in secure_broker.environ(protocol).items():
        monkeypatch.setenv(key, value)
    prefix = f"sec{uuid.uuid4().hex[:8]}."
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "\n".join(json.dumps({"id": f"n{i}", "text": f"Oil slides {i}", "sentiment": "negative"}) for i in range(3))
    )
    code = main(["label", "send", str(labels), "--set", f"kafka.topics.labels={prefix}labels"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sent 3 labels" in out.out
    assert PASSWORD not in out.out + out.err

    connection = load_config(environ=secure_broker.environ(protocol)).kafka.connection()
    values = read_values(connection, f"{prefix}labels", 3)
    assert sorted(json.loads(v)["id"] for v in values) == ["n0", "n1", "n2"]


def test_a_plaintext_client_cannot_read_a_secured_listener(secure_broker: SecureBroker) -> None:
    """The secured listeners really are secured: without the settings, nothing gets through."""
    for protocol in ("SASL_PLAINTEXT", "SSL"):
        with pytest.raises(BrokerError, match="set kafka.client.security_protocol"):
            require_broker(secure_broker.listeners[protocol], timeout_s=4)


def test_a_wrong_password_fails_in_one_line_that_never_shows_it(secure_broker: SecureBroker) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    env = secure_broker.environ("SASL_SSL", FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD=wrong)
    config = load_config(environ=env)
    started = time.monotonic()
    with pytest.raises(BrokerError) as raised:
        connect(config)
    message = str(raised.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message and wrong not in message and PASSWORD not in message
    assert secure_broker.listeners["SASL_SSL"] in message and "sasl_plain_username" in message


def test_an_untrusted_certificate_is_named(secure_broker: SecureBroker) -> None:
    env = secure_broker.environ("SSL")
    del env["FINPULSE_KAFKA__CLIENT__SSL_CAFILE"]  # the system's CAs never signed the test CA
    with pytest.raises(BrokerError, match="certificate is not trusted.*ssl_cafile"):
        connect(load_config(environ=env))


def test_the_password_file_is_read_and_the_config_never_prints_the_password(
    secure_broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    env = secure_broker.environ("SASL_PLAINTEXT")
    del env["FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD"]
    env["FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD_FILE"] = str(secret)
    require_broker(load_config(environ=env).kafka.connection())  # the file's password logs in

    for key, value in secure_broker.environ("SASL_PLAINTEXT").items():
        monkeypatch.setenv(key, value)
    assert main(["config"]) == 0
    shown = json.loads(capsys.readouterr().out)["kafka"]["client"]
    assert shown["sasl_plain_username"] == USER
    assert shown["sasl_plain_password"] not in (None, PASSWORD) and set(shown["sasl_plain_password"]) == {"*"}


def test_security_settings_are_checked_at_load_without_echoing_the_secret() -> None:
    env = {
        "FINPULSE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9093",
        "FINPULSE_KAFKA__CLIENT__SECURITY_PROTOCOL": "SASL_SSL",
        "FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD": PASSWORD,
    }
    with pytest.raises(ConfigError, match="sasl_mechanism") as raised:
        load_config(environ=env)
    assert PASSWORD not in str(raised.value)
    with pytest.raises(ConfigError, match="sasl_mechanism") as raised:
        load_config(environ=env | {"FINPULSE_KAFKA__CLIENT__SASL_MECHANISM": PASSWORD})
    assert PASSWORD not in str(raised.value)
    with pytest.raises(ConfigError, match="needs kafka.bootstrap_servers"):
        load_config(environ={"FINPULSE_KAFKA__CLIENT__SECURITY_PROTOCOL": "SSL"})


def test_the_scorer_scores_through_sasl_ssl(secure_broker: SecureBroker, adapters_dir: Path, tmp_path: Path) -> None:
    """Consumer group, producer, lag monitor and update listener of a scorer, all on the SASL_SSL listener."""
    config = load_config(environ=secure_broker.environ("SASL_SSL"))
    prefix = f"sec{uuid.uuid4().hex[:8]}."
    topics = TopicNames.prefixed(prefix)
    cluster = connect(config.model_copy(update={"kafka": config.kafka.model_copy(update={"topics": topics})}))
    items = labelled_stream(20)
    producer = KafkaProducer(**client_kwargs(cluster.connection, acks="all"))
    for key, value in news_messages(items):
        producer.send(topics.raw, key=key, value=value)
    producer.flush()
    producer.close()

    model_config = ModelConfig(adapters_dir=adapters_dir)
    classifier = Classifier.from_store(model_config, "cpu")
    history = History(StorageConfig(duckdb_path=tmp_path / "h.duckdb"))
    scorer_config = ScorerConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_batch=32, max_wait_ms=100)
    scorer = Scorer(
        cluster.connection, topics, scorer_config, classifier, history, ScorerMetrics(), model_config=model_config
    )
    try:
        stats = scorer.run(threading.Event(), until=lambda s: s.consumed >= len(items))
    finally:
        scorer.close()
    assert (stats.scored, stats.dead_lettered) == (len(items), 0)
    assert history.count() == len(items)
    assert len(read_values(cluster.connection, topics.scored, len(items))) == len(items)
