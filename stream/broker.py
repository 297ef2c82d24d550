"""Run a single-node Apache Kafka 4 broker (KRaft, combined broker and controller) on loopback.

The jars come from Maven Central through `kafka-dist/pom.xml`; the broker runs detached, so it outlives the
process that started it, and everything it needs lives in one data dir:

    broker.json        pid, ports and bootstrap of the last start (ports are reused so clients keep working)
    server.properties  the broker config, rewritten on every start
    log4j2.properties  logging config: the broker's own log goes to server.log (rolled at 10 MB)
    broker.log         the JVM's stdout and stderr (crashes, JVM warnings)
    logs/              the Kafka log dir: topic data and the KRaft metadata log

Besides its plaintext listener the broker can open secured ones (`BrokerSecurity`): SASL/PLAIN, TLS, and both
(SASL_SSL), so the clients' security settings are exercised against a real broker.
"""

import base64
import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import process
from stream.admin import broker_answers
from stream.errors import BrokerError

KAFKA_DIR = Path(__file__).resolve().parents[1] / "kafka-dist"
POM = KAFKA_DIR / "pom.xml"
DEFAULT_JARS_DIR = KAFKA_DIR / "lib"
HOST = process.HOST
MIN_JAVA = 17  # Kafka 4 brokers refuse to run on older JVMs
# Small, fixed heap: the broker shares a 2-core machine with model training and only carries local traffic.
JVM_OPTS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    # Kafka's own shutdown hook logs until the very end; log4j's hook would close the file first and the
    # tail of every shutdown would land in broker.log via log4j's fallback logger instead of server.log.
    "-Dlog4j2.shutdownHookEnabled=false",
)
_MVN_TIMEOUT_S = 900
_POLL_S = 0.25


@dataclass(frozen=True)
class BrokerStatus:
    """What `LocalBroker.status` found; `pid` and `bootstrap` are None unless the broker is running."""

    running: bool
    pid: int | None
    bootstrap: str | None
    data_dir: Path
    # Security protocol → host:port of each secured listener (empty when only plaintext is open).
    listeners: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokerSecurity:
    """Secured listeners beside the plaintext one: SASL/PLAIN users, a TLS keystore, or both (then SASL_SSL too)."""

    users: Mapping[str, str] = field(default_factory=dict)  # SASL/PLAIN user name → password
    keystore: Path | None = None  # PKCS12 keystore holding the broker's key and certificate chain
    keystore_password: str = ""

    def protocols(self) -> list[str]:
        """Return the security protocols of the listeners this opens."""
        found = ["SASL_PLAINTEXT"] if self.users else []
        if self.keystore is not None:
            found += ["SSL", "SASL_SSL"] if self.users else ["SSL"]
        return found


# Listener names in server.properties of each secured protocol.
_LISTENER_NAMES = {"SASL_PLAINTEXT": "SASL", "SSL": "TLS", "SASL_SSL": "SASLTLS"}


class LocalBroker:
    """Install, start, stop and inspect the local single-node Kafka broker kept in `data_dir`."""

    def __init__(self, data_dir: Path, jars_dir: Path | None = None, security: BrokerSecurity | None = None) -> None:
        """Bind to `data_dir` (created on start) and the jar dir, `kafka-dist/lib` of the repo by default.

        With `security`, each start also opens its secured listeners (see `BrokerStatus.listeners`).
        """
        # Absolute paths: they end up in config files read by a JVM running in another cwd.
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.jars_dir = Path(jars_dir).expanduser().resolve() if jars_dir is not None else DEFAULT_JARS_DIR
        self.security = security or BrokerSecurity()
        _check_jaas_safe(self.security)
        self._proc: subprocess.Popen[bytes] | None = None
        self._java_path: str | None = None

    # -- paths -------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        """Return the JSON file with pid, ports and bootstrap."""
        return self.data_dir / "broker.json"

    @property
    def config_file(self) -> Path:
        """Return the broker's server.properties."""
        return self.data_dir / "server.properties"

    @property
    def log_file(self) -> Path:
        """Return the file that receives the JVM's stdout and stderr."""
        return self.data_dir / "broker.log"

    @property
    def server_log_file(self) -> Path:
        """Return the file the broker's log4j output goes to."""
        return self.data_dir / "server.log"

    @property
    def kafka_log_dir(self) -> Path:
        """Return Kafka's log.dirs: topic data and the metadata log."""
        return self.data_dir / "logs"

    # -- installation --------------------------------------------------------------------------------------

    def has_jars(self) -> bool:
        """Return True when the jar dir holds the Kafka broker jar."""
        return any(self.jars_dir.glob("kafka_2.13-*.jar"))

    def ensure_jars(self) -> None:
        """Fetch the Kafka jars with Maven into the jar dir unless they are already there."""
        if self.has_jars():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                f"mvn not found and {self.jars_dir} has no Kafka jars: install Maven 3.8+ "
                f"(e.g. apt-get install maven) or copy the jars there"
            )
        self.java()  # Maven itself needs a JVM; say so plainly rather than through Maven's error
        if not POM.is_file():
            raise BrokerError(f"{POM} is missing: the Kafka jars cannot be resolved without it")
        # Resolve into a staging dir and swap it in at the end, so an interrupted download never leaves a
        # half-filled jar dir that has_jars() would take for complete.
        staging = self.jars_dir.with_name(f".{self.jars_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM),
            "dependency:copy-dependencies", f"-Djars.dir={staging}",
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_MVN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BrokerError(f"mvn did not fetch the Kafka jars within {_MVN_TIMEOUT_S} s") from exc
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BrokerError(f"cannot run mvn ({mvn}): {exc}") from exc
        if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            reason = _first_error_line(done.stdout + "\n" + done.stderr) or f"exit code {done.returncode}"
            raise BrokerError(
                f"mvn could not fetch the Kafka jars ({reason}); it needs Maven Central or a filled ~/.m2"
            )
        # Move file by file (never delete the jar dir: a caller may have pointed it at a shared folder), the
        # Kafka jar last, so has_jars() turns true only once every other jar is in place.
        self.jars_dir.mkdir(parents=True, exist_ok=True)
        for jar in sorted(staging.iterdir(), key=lambda path: path.name.startswith("kafka_2.13-")):
            jar.replace(self.jars_dir / jar.name)
        shutil.rmtree(staging, ignore_errors=True)

    def java(self) -> str:
        """Return the path of a Java 17+ executable, from JAVA_HOME or PATH."""
        if self._java_path is not None:
            return self._java_path
        java_home = os.environ.get("JAVA_HOME")
        candidate = Path(java_home) / "bin" / "java" if java_home else None
        java = str(candidate) if candidate is not None and candidate.is_file() else shutil.which("java")
        if java is None:
            raise BrokerError("java not found: install OpenJDK 17+ (or set JAVA_HOME)")
        try:
            done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"cannot run {java}: {exc}; install OpenJDK 17+ (or set JAVA_HOME)") from exc
        major = _java_major(done.stderr + done.stdout)
        if major is None or major < MIN_JAVA:
            found = f"Java {major}" if major is not None else "an unknown Java version"
            raise BrokerError(f"{java} is {found}, Kafka 4 needs {MIN_JAVA}+: install OpenJDK 17+ or set JAVA_HOME")
        self._java_path = java
        return java

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, port: int | None = None, timeout_s: float = 60) -> str:
        """Start the broker (or find it running) and return its bootstrap string `127.0.0.1:PORT`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            if pid is not None:
                bootstrap = str(state["bootstrap"])
                if port is not None and int(state["port"]) != port:
                    raise BrokerError(
                        f"the broker in {self.data_dir} already runs on {bootstrap} (pid {pid}): stop it "
                        f"before asking for port {port}"
                    )
                # Possibly still booting under another process: wait for it instead of starting a second one.
                self._wait_until_answering(bootstrap, pid, timeout_s)
                return bootstrap

            broker_port, controller_port = self._choose_ports(port, state)  # first: cheap, and fails fast
            secured = self._secured_ports(state, {broker_port, controller_port})
            self.ensure_jars()
            java = self.java()
            bootstrap = f"{HOST}:{broker_port}"
            self._write_log4j_config()
            self._write_server_config(broker_port, controller_port, secured)
            cluster_id = self._format_once(java, state)

            with self.log_file.open("ab") as out:
                try:
                    self._proc = subprocess.Popen(
                        [java, *JVM_OPTS, f"-Dlog4j2.configurationFile={self._log4j_file}",
                         "-cp", str(self.jars_dir / "*"), "kafka.Kafka", str(self.config_file)],
                        cwd=self.data_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # detached: no SIGINT/SIGHUP from the caller's terminal
                    )  # fmt: skip
                except OSError as exc:
                    raise BrokerError(f"cannot launch {java}: {exc}") from exc
            self._write_state(
                {
                    "pid": self._proc.pid,
                    "port": broker_port,
                    "controller_port": controller_port,
                    "bootstrap": bootstrap,
                    "listeners": {protocol: f"{HOST}:{p}" for protocol, p in secured.items()},
                    "cluster_id": cluster_id,
                    "started_at": time.time(),
                }
            )
            try:
                self._wait_until_answering(bootstrap, self._proc.pid, timeout_s)
            except BrokerError:
                # A broker that never came up must not linger holding the ports and the data dir.
                self._terminate(self._proc.pid, process.KILL_WAIT_S)
                self._clear_pid()
                raise
            return bootstrap

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after `timeout_s`; do nothing when it is not running."""
        if not self.data_dir.is_dir():
            return
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            if pid is not None:
                self._terminate(pid, timeout_s)
            if state.get("pid") is not None:
                self._clear_pid()

    def status(self) -> BrokerStatus:
        """Report whether the broker of this data dir runs, and where."""
        state = self._read_state()
        pid = self._live_pid(state)
        if pid is None:
            return BrokerStatus(running=False, pid=None, bootstrap=None, data_dir=self.data_dir)
        listeners = state.get("listeners")
        return BrokerStatus(
            running=True,
            pid=pid,
            bootstrap=str(state["bootstrap"]),
            data_dir=self.data_dir,
            listeners=dict(listeners) if isinstance(listeners, dict) else {},
        )

    # -- internals -----------------------------------------------------------------------------------------

    @property
    def _log4j_file(self) -> Path:
        """Return the log4j2 config the broker is launched with."""
        return self.data_dir / "log4j2.properties"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock on the data dir so concurrent starts and stops cannot interleave."""
        return process.locked(self.data_dir / "broker.lock")

    def _read_state(self) -> dict[str, Any]:
        """Return the saved state, or {} when there is none or it is unreadable."""
        return process.read_state(self.state_file)

    def _write_state(self, state: dict[str, Any]) -> None:
        """Save the state atomically, so a reader never sees half a file."""
        process.write_state(self.state_file, state)

    def _clear_pid(self) -> None:
        """Forget the pid but keep the ports, so the next start reuses them."""
        state = self._read_state()
        state["pid"] = None
        self._write_state(state)

    def _live_pid(self, state: dict[str, Any]) -> int | None:
        """Return the saved pid if that process is alive and is this data dir's broker."""
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not self._alive(pid):
            return None
        # The pid may have been recycled by an unrelated process since the broker died.
        if not process.cmdline_mentions(pid, b"kafka.Kafka", str(self.config_file).encode()):
            return None
        return pid

    def _alive(self, pid: int) -> bool:
        """Return True while `pid` runs."""
        return process.alive(pid, self._proc)

    def _terminate(self, pid: int, timeout_s: float) -> None:
        """Send SIGTERM, wait up to `timeout_s`, then SIGKILL; raise BrokerError if it still runs."""
        if not process.terminate(pid, timeout_s, self._proc):
            raise BrokerError(f"broker pid {pid} survived SIGKILL; kill it by hand and remove {self.state_file}")

    def _wait_until_answering(self, bootstrap: str, pid: int, timeout_s: float) -> None:
        """Block until the broker answers a metadata request; raise BrokerError if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._alive(pid):
                code = self._proc.returncode if self._proc is not None and self._proc.pid == pid else None
                how = f"exited with code {code}" if code is not None else "exited"
                hint = _last_error_line(self.server_log_file) or _last_error_line(self.log_file)
                raise BrokerError(
                    f"broker {how} while starting on {bootstrap}"
                    + (f" ({hint})" if hint else "")
                    + f"; see {self.log_file} and {self.server_log_file}"
                )
            remaining = deadline - time.monotonic()
            if broker_answers(bootstrap, timeout_s=max(min(remaining, 3.0), 0.1)):
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"broker did not answer on {bootstrap} within {timeout_s:g} s; "
                    f"see {self.log_file} and {self.server_log_file}"
                )
            time.sleep(_POLL_S)

    def _choose_ports(self, port: int | None, state: dict[str, Any]) -> tuple[int, int]:
        """Return (broker port, controller port): the requested or remembered ones if free, else new ones."""
        if port is not None:
            if not 0 < port < 65536:
                raise BrokerError(f"port must be in 1..65535, got {port}")
            if not process.port_free(port):
                raise BrokerError(f"port {port} on {HOST} is in use: pass another port or free it")
            broker_port = port
        else:
            remembered = state.get("port")
            # Reusing the last port keeps bootstrap strings in other processes' configs valid across restarts.
            broker_port = remembered if isinstance(remembered, int) and process.port_free(remembered) else _free_port()
        remembered = state.get("controller_port")
        if isinstance(remembered, int) and remembered != broker_port and process.port_free(remembered):
            controller_port = remembered
        else:
            controller_port = _free_port(exclude={broker_port})
        return broker_port, controller_port

    def _secured_ports(self, state: dict[str, Any], taken: set[int]) -> dict[str, int]:
        """Return a port per secured protocol: the remembered one if still free, else a new one."""
        found = state.get("listeners")
        remembered: dict[str, Any] = found if isinstance(found, dict) else {}
        ports: dict[str, int] = {}
        for protocol in self.security.protocols():
            _, _, old = str(remembered.get(protocol, "")).rpartition(":")
            port = int(old) if old.isdigit() and int(old) not in taken and process.port_free(int(old)) else 0
            ports[protocol] = port or _free_port(exclude=taken)
            taken = taken | {ports[protocol]}
        return ports

    def _write_server_config(self, broker_port: int, controller_port: int, secured: Mapping[str, int]) -> None:
        """Write server.properties for a combined broker+controller with a static one-voter quorum."""
        listeners = [f"PLAINTEXT://{HOST}:{broker_port}"]
        listeners += [f"{_LISTENER_NAMES[protocol]}://{HOST}:{port}" for protocol, port in secured.items()]
        protocol_map = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        protocol_map += [f"{_LISTENER_NAMES[protocol]}:{protocol}" for protocol in secured]
        settings: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "listeners": ",".join([*listeners, f"CONTROLLER://{HOST}:{controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocol_map),
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            # A static voter set (rather than a dynamic quorum formatted with --standalone) takes the
            # controller endpoint from this file on every start, so a changed port never strands the data.
            "controller.quorum.voters": f"1@{HOST}:{controller_port}",
            "log.dirs": str(self.kafka_log_dir),
            "num.partitions": 3,
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # One node: every internal topic must make do with one replica, and few partitions keep the
            # first consumer-group join fast.
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 3,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 3,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "share.coordinator.state.topic.num.partitions": 3,
            "min.insync.replicas": 1,
            "default.replication.factor": 1,
            "group.initial.rebalance.delay.ms": 0,  # tests and restarts should not wait 3 s per group
            # Fewer threads and smaller segments than the defaults: a 2-core box shared with training.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "background.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "num.replica.fetchers": 1,
            "log.cleaner.threads": 1,
            "log.segment.bytes": 64 * 1024 * 1024,
            "log.retention.hours": 168,
            "log.retention.check.interval.ms": 300_000,
            # The controller writes a no-op record every 500 ms by default; nothing here needs that cadence.
            "metadata.max.idle.interval.ms": 5000,
            **self._security_settings(secured),
        }
        text = "# Written by stream/broker.py on every start; edits are overwritten.\n"
        text += "".join(f"{key}={value}\n" for key, value in settings.items())
        # Passwords may be in it: readable by this user only, from the moment it exists.
        self.config_file.touch(mode=0o600)
        self.config_file.chmod(0o600)
        self.config_file.write_text(text, encoding="utf-8")

    def _security_settings(self, secured: Mapping[str, int]) -> dict[str, str | int]:
        """Return the server.properties lines of the secured listeners: JAAS users per SASL listener, keystore."""
        settings: dict[str, str | int] = {}
        users = " ".join(f'user_{name}="{password}"' for name, password in self.security.users.items())
        for protocol in secured:
            if protocol.startswith("SASL_"):
                name = _LISTENER_NAMES[protocol].lower()
                settings[f"listener.name.{name}.sasl.enabled.mechanisms"] = "PLAIN"
                settings[f"listener.name.{name}.plain.sasl.jaas.config"] = (
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
                )
        if self.security.keystore is not None:
            settings["ssl.keystore.type"] = "PKCS12"
            settings["ssl.keystore.location"] = str(Path(self.security.keystore).resolve())
            settings["ssl.keystore.password"] = self.security.keystore_password
            settings["ssl.key.password"] = self.security.keystore_password
        return settings

    def _write_log4j_config(self) -> None:
        """Write the log4j2 config: INFO to a rolled server.log, chatty request/state loggers at WARN."""
        log = self.server_log_file
        text = f"""\
# Written by stream/broker.py on every start; edits are overwritten.
status = warn
name = finpulse-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""
        self._log4j_file.write_text(text, encoding="utf-8")

    def _format_once(self, java: str, state: dict[str, Any]) -> str:
        """Format the log dir on first start and return the cluster id; never reformat existing data."""
        meta = self.kafka_log_dir / "meta.properties"
        if meta.is_file():
            found = re.search(r"^cluster\.id=(\S+)", meta.read_text(encoding="utf-8"), re.MULTILINE)
            return found.group(1) if found else str(state.get("cluster_id", ""))
        cluster_id = _new_cluster_id()
        cmd = [
            # One-shot tool: C1-only JIT and serial GC start faster on a busy 2-core box.
            java, "-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
            f"-Dlog4j2.configurationFile={self._log4j_file}",
            "-cp", str(self.jars_dir / "*"), "kafka.tools.StorageTool",
            "format", "-t", cluster_id, "-c", str(self.config_file),
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=self.data_dir)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"formatting {self.kafka_log_dir} failed: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise BrokerError(
                f"formatting {self.kafka_log_dir} failed (exit {done.returncode})"
                + (f": {detail[-1]}" if detail else "")
            )
        return cluster_id


def _check_jaas_safe(security: BrokerSecurity) -> None:
    """Refuse user names and passwords that would break out of their quotes in the JAAS line."""
    for name, password in security.users.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise BrokerError(f"SASL user name {name!r}: use letters, digits, '.', '_' or '-'")
        if any(c in password for c in '"\\\n;') or not password:
            raise BrokerError(f"the SASL password of {name!r} is empty or holds a quote, backslash, ';' or newline")
    if security.keystore is not None and not Path(security.keystore).is_file():
        raise BrokerError(f"keystore {security.keystore} is not a file")


def _free_port(exclude: set[int] | None = None) -> int:
    """Return a free loopback port."""
    try:
        return process.free_port(exclude)
    except OSError as e:
        raise BrokerError(str(e)) from e


def _new_cluster_id() -> str:
    """Return a random cluster id in Kafka's format: 16 random bytes, URL-safe base64, no padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):  # Kafka avoids these too: they read as a CLI option
            return cluster_id


def _java_major(version_output: str) -> int | None:
    """Return the major version from `java -version` output (1.8 → 8, 17.0.15 → 17)."""
    found = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def _first_error_line(output: str) -> str:
    """Return the first `[ERROR]` line of Maven output, without the prefix."""
    for line in output.splitlines():
        if line.startswith("[ERROR]") and line[7:].strip():
            return line[7:].strip()
    return ""


def _last_error_line(path: Path) -> str:
    """Return the last ERROR/FATAL/Exception line in the tail of a JVM log."""
    return process.last_matching_line(
        path, lambda line: " ERROR " in line or " FATAL " in line or "Exception" in line or line.startswith("Error")
    )
