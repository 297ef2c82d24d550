"""Typed configuration of Kafka I/O and the scorer service."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from learner.config import ParallelMode
from stream.connection import Connection
from stream.errors import BrokerError

# kafka-python backs reconnects off up to 30 s: after a broker restart a client could sit out half a minute before
# it even tries again. Two seconds between tries costs nothing on loopback or a LAN and bounds that wait.
RECONNECT_BACKOFF_MAX_MS = 2_000

_ASSIGNORS: dict[str, Any] = {
    "cooperative-sticky": CooperativeStickyAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}


class TopicNames(BaseModel):
    """Kafka topic names; the defaults are the documented contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    raw: str = Field("news.raw", min_length=1, description="Incoming headlines and posts.")
    scored: str = Field("news.scored", min_length=1, description="Scored records for downstream consumers.")
    labels: str = Field("news.labels", min_length=1, description="Analyst-labelled feedback.")
    dlq: str = Field("news.dlq", min_length=1, description="Invalid input, with the reason.")
    updates: str = Field("model.updates", min_length=1, description="New champion adapter versions.")

    @classmethod
    def prefixed(cls, prefix: str) -> TopicNames:
        """Return the default names under `prefix`: one run's own topics (demo, benchmarks, tests)."""
        return cls(**{name: prefix + str(field.default) for name, field in cls.model_fields.items()})


class KafkaClientConfig(BaseModel):
    """Security settings every producer, consumer and admin client passes to the cluster (kafka-python's names).

    Secrets come from the environment (FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD) or from a file
    (`sasl_plain_password_file`, e.g. a Docker or Kubernetes secret) and are never printed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (managed clusters: SASL_SSL) "
        "(env FINPULSE_KAFKA__CLIENT__SECURITY_PROTOCOL).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism with SASL_PLAINTEXT/SASL_SSL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_plain_username: str | None = Field(None, min_length=1, description="SASL user name.")
    sasl_plain_password: SecretStr | None = Field(
        None, description="SASL password (env FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD). Never printed."
    )
    sasl_plain_password_file: Path | None = Field(
        None, description="File holding the SASL password instead; read at connect, surrounding whitespace ignored."
    )
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA certificates that sign the brokers' certificates; unset: the system's."
    )
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for clusters that require mTLS.")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile.")
    ssl_password: SecretStr | None = Field(None, description="Password of an encrypted ssl_keyfile. Never printed.")
    ssl_check_hostname: bool = Field(
        True, description="Check that the broker's certificate names the host connected to; keep it on."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaClientConfig:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"{self.security_protocol} needs kafka.client.sasl_mechanism (PLAIN or SCRAM-SHA-512)")
        if sasl and self.sasl_plain_username is None:
            raise ValueError(f"{self.security_protocol} needs kafka.client.sasl_plain_username")
        if sasl and self.sasl_plain_password is None and self.sasl_plain_password_file is None:
            raise ValueError(
                f"{self.security_protocol} needs kafka.client.sasl_plain_password "
                "(env FINPULSE_KAFKA__CLIENT__SASL_PLAIN_PASSWORD) or sasl_plain_password_file"
            )
        if self.sasl_plain_password is not None and self.sasl_plain_password_file is not None:
            raise ValueError("set kafka.client.sasl_plain_password or sasl_plain_password_file, not both")
        if not sasl and (self.sasl_mechanism or self.sasl_plain_username):
            raise ValueError(
                f"SASL settings need security_protocol SASL_PLAINTEXT or SASL_SSL, not {self.security_protocol}"
            )
        tls = self.security_protocol.endswith("SSL")
        if not tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError(f"ssl_* files need security_protocol SSL or SASL_SSL, not {self.security_protocol}")
        if (self.ssl_keyfile is not None) != (self.ssl_certfile is not None):
            raise ValueError("set kafka.client.ssl_certfile and ssl_keyfile together")
        for name in ("sasl_plain_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"kafka.client.{name} {path} is not a file: fix the path")
        return self

    def settings(self) -> MappingProxyType[str, Any]:
        """Return the kafka-python keyword arguments, with the secrets read (the password file at this call)."""
        out: dict[str, Any] = {}
        if self.security_protocol != "PLAINTEXT":
            out["security_protocol"] = self.security_protocol
        if self.sasl_mechanism is not None:
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_plain_username
            out["sasl_plain_password"] = self._password()
        if self.security_protocol.endswith("SSL"):
            out["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                path = getattr(self, name)
                if path is not None:
                    out[name] = str(Path(path).expanduser())
            if self.ssl_password is not None:
                out["ssl_password"] = self.ssl_password.get_secret_value()
        return MappingProxyType(out)

    def _password(self) -> str:
        if self.sasl_plain_password is not None:
            return self.sasl_plain_password.get_secret_value()
        path = Path(str(self.sasl_plain_password_file)).expanduser()
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise BrokerError(f"kafka.client.sasl_plain_password_file {path}: cannot read it ({reason})") from e
        if not text:
            raise BrokerError(f"kafka.client.sasl_plain_password_file {path} is empty: write the password in it")
        return text


class KafkaConfig(BaseModel):
    """Which cluster to use; an empty `bootstrap_servers` means the local broker finpulse runs itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        "",
        description="host:port[,host:port] of an existing cluster; empty = the local broker "
        "(env FINPULSE_KAFKA__BOOTSTRAP_SERVERS).",
    )
    data_dir: Path = Field(
        Path(".finpulse/kafka"),
        description="Where the local broker keeps its log, config and pid (env FINPULSE_KAFKA__DATA_DIR).",
    )
    partitions: int = Field(3, ge=1, le=256, description="Partitions of topics finpulse creates.")
    topics: TopicNames = Field(default_factory=TopicNames)
    client: KafkaClientConfig = Field(default_factory=KafkaClientConfig)

    def connection(self, bootstrap_servers: str | None = None) -> Connection:
        """Return the Connection to `bootstrap_servers` (default: the configured ones) with the client settings."""
        return Connection(bootstrap_servers or self.bootstrap_servers, self.client.settings())

    @model_validator(mode="after")
    def _secure_needs_a_cluster(self) -> KafkaConfig:
        # The local broker finpulse starts listens in plaintext on loopback only.
        if not self.bootstrap_servers and self.client.security_protocol != "PLAINTEXT":
            raise ValueError(
                f"security_protocol {self.client.security_protocol} needs kafka.bootstrap_servers: the local "
                "broker is plaintext on loopback; set the cluster's address or leave security_protocol PLAINTEXT"
            )
        return self

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        for server in filter(None, (s.strip() for s in value.split(","))):
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {server!r}")
        return value.strip()


class ScorerConfig(BaseModel):
    """How the scorer consumes, batches and validates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group_id: str = Field("finpulse-scorer", min_length=1, description="Kafka consumer group of the scorers.")
    # Under backlog, larger batches sort lengths better and spread the per-batch Kafka and DuckDB round trips
    # (measured on 2 CPU cores: 512 scores ~1.3x faster than 128); at low rates max_wait_ms bounds the latency.
    max_batch: int = Field(
        512, ge=1, le=8192, description="Most messages handled per batch (env FINPULSE_SCORER__MAX_BATCH)."
    )
    max_wait_ms: int = Field(
        200,
        ge=0,
        le=60_000,
        description="Longest a partial batch waits for more messages before it is scored.",
    )
    max_text_bytes: int = Field(
        8192, ge=16, description="Texts longer than this (UTF-8 bytes) are dead-lettered as oversized."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    # Measured on 2 cores: one scorer with 2 threads 92.5 msg/s; two scorers with 2 threads each 56.5 in all
    # (4 compute threads fight for 2 cores), with 1 thread each 88.3. Several scorers on one host: set it to
    # cores / scorers.
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Compute threads of the model in this scorer; 0 = auto: the CPU cores this process may use "
        "(env FINPULSE_SCORER__THREADS; with N scorers on one host, cores / N).",
    )
    # learner.model.batch_workers gives the measurements behind auto.
    parallel: ParallelMode = Field(
        "auto",
        description="How the compute threads share a batch: batches (whole sub-batches side by side, one thread "
        "each: none waits for another when Kafka and storage threads take a core), operators (one sub-batch at a "
        "time, each operator split across the threads); auto = batches for torch on a CPU, operators for onnx "
        "and on CUDA (env FINPULSE_SCORER__PARALLEL).",
    )
    inference_batch: int = Field(
        0,
        ge=0,
        le=16384,
        description="Texts per forward pass inside a consumed batch; 0 = auto: 32 on CPU (measured fastest: "
        "less padding, cache-sized activations), 64 for torch on AMX, 512 on CUDA (the GPU needs width to be busy).",
    )
    # Per-ticker series are opt-in: one label value per ticker ever seen would grow without bound.
    watchlist: tuple[str, ...] = Field(
        (),
        max_length=500,
        description="Tickers whose sentiment gets its own metric series "
        "(env FINPULSE_SCORER__WATCHLIST: AAPL,TSLA or a JSON list).",
    )
    # model.updates messages trigger a swap at once; this re-read of the CHAMPION files covers missed messages.
    champion_check_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="Seconds between re-reads of the CHAMPION files, to follow a champion change whose "
        "model.updates message was missed; 0 = follow the messages only.",
    )

    # A dead member's partitions wait for its session to time out: 6 s is the broker's default minimum
    # (group.min.session.timeout.ms), and kafka-python's 45 s default measured a 45 s stall per SIGKILL.
    session_timeout_ms: int = Field(
        6_000,
        ge=1_000,
        le=300_000,
        description="How long the group waits for a silent scorer before moving its partitions "
        "(the broker's group.min.session.timeout.ms bounds it from below).",
    )
    heartbeat_interval_ms: int = Field(
        1_000, ge=100, le=100_000, description="Heartbeats to the group coordinator; a third of the session or less."
    )
    group_instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=249,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Static membership (KIP-345): a stable, unique name per scorer (e.g. the pod name, env "
        "FINPULSE_SCORER__GROUP_INSTANCE_ID) lets a restarted scorer take its partitions back without a "
        "rebalance. Unset: dynamic membership.",
    )
    assignment: Literal["cooperative-sticky", "range", "roundrobin"] = Field(
        "cooperative-sticky",
        description="Partition assignment: cooperative-sticky moves only the partitions that change owner, "
        "so the other scorers keep scoring through a rebalance.",
    )

    lag_interval_s: float = Field(
        5.0,
        ge=0.1,
        le=3_600,
        description="Seconds between reads of this scorer's consumer lag from the broker (on its own thread).",
    )

    def group_settings(self) -> dict[str, Any]:
        """Return the kafka-python consumer settings of group membership."""
        settings: dict[str, Any] = {
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "partition_assignment_strategy": [_ASSIGNORS[self.assignment]],
        }
        if self.group_instance_id is not None:
            settings["group_instance_id"] = self.group_instance_id
        return settings

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> ScorerConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of "
                f"session_timeout_ms ({self.session_timeout_ms}): lower it or raise the session timeout"
            )
        return self

    @field_validator("watchlist", mode="before")
    @classmethod
    def _tickers(cls, value: object) -> object:
        if isinstance(value, str):
            # From the environment: a JSON list or a comma-separated string.
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not a JSON list: {e.msg}") from e
            else:
                value = [t for t in text.split(",") if t.strip()]
        if isinstance(value, list | tuple):
            return tuple(str(t).strip().upper().lstrip("$") for t in value)
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
