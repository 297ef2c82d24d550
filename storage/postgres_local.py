"""Run a throwaway PostgreSQL server on loopback, to serve as a DuckLake catalog for tests and local runs.

Production points `LakeConfig.postgres` at a real server; this module is for a developer machine or CI, where
the Debian `postgresql` package provides the binaries (`initdb`, `pg_ctl`, `createdb`). The server runs
detached, so it outlives the process that started it, and everything lives in one data dir:

    postgres.json   pid, port, user, password and database of the last start (mode 0600: it holds the password)
    cluster/        the PostgreSQL cluster made by `initdb`
    postgres.log    the server's log
    sock/           its Unix socket (kept here, not in /var/run/postgresql, which may not exist)

PostgreSQL refuses to run as root, so when this process is root every command runs as the `postgres` user
(`runuser -u postgres --`), and the data dir must be reachable by that user: a dir under /tmp works, pytest's
`tmp_path` (below a mode-0700 dir of root's) does not.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from daemon import process
from storage.errors import StorageError

__all__ = ["LocalPostgres", "PostgresError", "PostgresStatus", "postgres_binaries"]

HOST: Final = process.HOST
SERVICE_USER: Final = "postgres"  # the account Debian's package creates; initdb and postgres refuse root
DATABASE: Final = "finpulse"
USER: Final = "finpulse"
# Small and fixed: a 2-core machine shared with model training; the catalog carries only metadata and small
# inlined batches. fsync stays on: a catalog that loses a commit loses the offsets of a batch.
_SERVER_SETTINGS: Final = (
    "shared_buffers=64MB",
    "max_connections=64",
    "max_wal_size=256MB",
    "log_min_messages=warning",
)
_COMMAND_TIMEOUT_S: Final = 120
_POLL_S: Final = 0.2


class PostgresError(StorageError):
    """The local PostgreSQL server could not be installed, started, stopped or reached."""


@dataclass(frozen=True)
class PostgresStatus:
    """What `LocalPostgres.status` found; `pid` and `port` are None unless the server is running."""

    running: bool
    pid: int | None
    port: int | None
    data_dir: Path


def postgres_binaries() -> Path | None:
    """Return the dir holding `initdb`, `pg_ctl` and `postgres` (PATH first, then Debian's dirs), or None."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        bin_dir = Path(initdb).resolve().parent
        if (bin_dir / "pg_ctl").is_file() and (bin_dir / "postgres").is_file():
            return bin_dir
    # Debian installs them outside PATH; the newest version wins.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: _version_key(Path(p)))
    for candidate in reversed(candidates):
        bin_dir = Path(candidate).parent
        if (bin_dir / "pg_ctl").is_file() and (bin_dir / "postgres").is_file():
            return bin_dir
    return None


class LocalPostgres:
    """Initialise, start, stop and inspect a local PostgreSQL cluster kept in `data_dir`."""

    def __init__(self, data_dir: Path, bin_dir: Path | None = None) -> None:
        """Bind to `data_dir` (created on start) and the binaries in `bin_dir` (found on PATH by default)."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._bin_dir = bin_dir

    @property
    def state_file(self) -> Path:
        """Return the JSON file with pid, port and credentials."""
        return self.data_dir / "postgres.json"

    @property
    def cluster_dir(self) -> Path:
        """Return the cluster dir made by initdb."""
        return self.data_dir / "cluster"

    @property
    def log_file(self) -> Path:
        """Return the server's log file."""
        return self.data_dir / "postgres.log"

    def start(self, port: int | None = None, timeout_s: float = 60) -> str:
        """Start the server (or find it running) and return a libpq DSN for its `finpulse` database."""
        bin_dir = self._binaries()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with process.locked(self.data_dir / "postgres.lock"):
            state = process.read_state(self.state_file)
            pid = self._live_pid(state)
            if pid is not None:
                if port is not None and int(state["port"]) != port:
                    raise PostgresError(
                        f"the server in {self.data_dir} already runs on port {state['port']} (pid {pid}): "
                        f"stop it before asking for port {port}"
                    )
                return self._dsn(state)
            self._check_reachable()
            password = str(state.get("password") or secrets.token_urlsafe(24))
            if not (self.cluster_dir / "PG_VERSION").is_file():
                self._initdb(bin_dir, password)
            chosen = self._choose_port(port, state)
            state = {"pid": None, "port": chosen, "user": USER, "password": password, "database": DATABASE}
            self._write_state(state)
            self._pg_ctl_start(bin_dir, chosen, timeout_s)
            state["pid"] = self._postmaster_pid()
            state["started_at"] = time.time()
            self._write_state(state)
            self._ensure_database(bin_dir, state)
            return self._dsn(state)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server (fast shutdown, then SIGKILL after `timeout_s`); do nothing when it is not running."""
        if not self.data_dir.is_dir():
            return
        with process.locked(self.data_dir / "postgres.lock"):
            state = process.read_state(self.state_file)
            pid = self._live_pid(state)
            if pid is None:
                return
            bin_dir = self._binaries()
            # "fast" rolls back open transactions and checkpoints: a clean stop without waiting for clients.
            self._run([str(bin_dir / "pg_ctl"), "stop", "-D", str(self.cluster_dir), "-m", "fast", "-w",
                       "-t", str(int(timeout_s))], check=False)  # fmt: skip
            if not process.wait_dead(pid, 1.0) and not process.terminate(pid, timeout_s):
                raise PostgresError(
                    f"postgres pid {pid} survived SIGKILL; kill it by hand and remove {self.state_file}"
                )
            state["pid"] = None
            self._write_state(state)

    def status(self) -> PostgresStatus:
        """Report whether the server of this data dir runs, and on which port."""
        state = process.read_state(self.state_file)
        pid = self._live_pid(state)
        if pid is None:
            return PostgresStatus(running=False, pid=None, port=None, data_dir=self.data_dir)
        return PostgresStatus(running=True, pid=pid, port=int(state["port"]), data_dir=self.data_dir)

    def dsn(self) -> str:
        """Return the DSN of the running server; raise PostgresError when it is not running."""
        state = process.read_state(self.state_file)
        if self._live_pid(state) is None:
            raise PostgresError(f"no PostgreSQL server runs from {self.data_dir}: start it first")
        return self._dsn(state)

    # -- internals -----------------------------------------------------------------------------------------

    def _binaries(self) -> Path:
        """Return the binaries' dir or raise a PostgresError that says how to install them."""
        bin_dir = self._bin_dir or postgres_binaries()
        if bin_dir is None or not (Path(bin_dir) / "initdb").is_file():
            raise PostgresError(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
                "(e.g. apt-get install -y postgresql) or pass bin_dir"
            )
        return Path(bin_dir)

    def _as_root(self) -> bool:
        """Return True when commands must be handed to the service user."""
        return os.geteuid() == 0

    def _check_reachable(self) -> None:
        """Hand the data dir to the service user when running as root; fail early if that user cannot reach it."""
        if not self._as_root():
            return
        try:
            account = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise PostgresError(
                f"running as root needs the '{SERVICE_USER}' user to run PostgreSQL: install the postgresql package"
            ) from None
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001 and parent.stat().st_uid != account.pw_uid:
                raise PostgresError(
                    f"{self.data_dir} is not reachable by user {SERVICE_USER} ({parent} is mode {mode & 0o777:o}): "
                    f"put the data dir under /tmp"
                )
        for path in (self.data_dir, *self.data_dir.rglob("*")):
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)

    def _run(self, cmd: list[str], *, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run one PostgreSQL command (as the service user when root); return its output."""
        full = ["runuser", "-u", SERVICE_USER, "--", *cmd] if self._as_root() else cmd
        try:
            done = subprocess.run(
                full, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False,
                env={**os.environ, **(env or {})}, cwd=self.data_dir, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostgresError(f"cannot run {Path(cmd[0]).name}: {e}") from e
        if check and done.returncode != 0:
            reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise PostgresError(
                f"{Path(cmd[0]).name} failed with code {done.returncode}: {reason[-1] if reason else 'no output'}"
                f"; see {self.log_file}"
            )
        return done.stdout

    def _initdb(self, bin_dir: Path, password: str) -> None:
        """Create the cluster with a password-protected superuser, listening on loopback only."""
        shutil.rmtree(self.cluster_dir, ignore_errors=True)
        pwfile = self.data_dir / ".pwfile"
        pwfile.write_text(password + "\n", encoding="utf-8")
        try:
            pwfile.chmod(0o600)
            self._check_reachable()
            self._run([str(bin_dir / "initdb"), "-D", str(self.cluster_dir), "-U", USER, f"--pwfile={pwfile}",
                       "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _pg_ctl_start(self, bin_dir: Path, port: int, timeout_s: float) -> None:
        """Start the postmaster detached and wait until it accepts connections."""
        sock = self.data_dir / "sock"
        sock.mkdir(exist_ok=True)
        self._check_reachable()
        options = " ".join(
            [f"-p {port}", f"-c listen_addresses={HOST}", f"-c unix_socket_directories={sock}"]
            + [f"-c {setting}" for setting in _SERVER_SETTINGS]
        )
        self._run([str(bin_dir / "pg_ctl"), "start", "-D", str(self.cluster_dir), "-l", str(self.log_file),
                   "-w", "-t", str(int(timeout_s)), "-o", options])  # fmt: skip

    def _postmaster_pid(self) -> int:
        """Return the postmaster's pid from its pid file."""
        try:
            return int((self.cluster_dir / "postmaster.pid").read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError) as e:
            raise PostgresError(f"postgres started but left no readable postmaster.pid in {self.cluster_dir}") from e

    def _ensure_database(self, bin_dir: Path, state: dict[str, Any]) -> None:
        """Create the `finpulse` database unless it exists."""
        env = {"PGPASSWORD": str(state["password"])}
        found = self._run(
            [str(bin_dir / "psql"), "-h", HOST, "-p", str(state["port"]), "-U", USER, "-d", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"], env=env,
        )  # fmt: skip
        if found.strip() != "1":
            self._run([str(bin_dir / "createdb"), "-h", HOST, "-p", str(state["port"]), "-U", USER, DATABASE], env=env)

    def _choose_port(self, port: int | None, state: dict[str, Any]) -> int:
        """Return the requested port, the remembered one if still free, or a new free one."""
        if port is not None:
            if not 0 < port < 65536:
                raise PostgresError(f"port must be in 1..65535, got {port}")
            if not process.port_free(port):
                raise PostgresError(f"port {port} on {HOST} is in use: pass another port or free it")
            return port
        remembered = state.get("port")
        return remembered if isinstance(remembered, int) and process.port_free(remembered) else process.free_port()

    def _live_pid(self, state: dict[str, Any]) -> int | None:
        """Return the saved pid if that process is alive and is this data dir's postmaster."""
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not process.alive(pid):
            return None
        with contextlib.suppress(OSError):
            # A recycled pid belongs to some other program: the postmaster names its data dir on its command line.
            if str(self.cluster_dir).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
        return pid

    def _write_state(self, state: dict[str, Any]) -> None:
        """Save the state atomically, readable by this user only (it holds the password)."""
        process.write_state(self.state_file, state)
        self.state_file.chmod(0o600)

    def _dsn(self, state: dict[str, Any]) -> str:
        """Return the libpq DSN of `state`."""
        return (
            f"host={HOST} port={state['port']} dbname={state.get('database', DATABASE)} "
            f"user={state.get('user', USER)} password={state['password']}"
        )


def _version_key(initdb: Path) -> tuple[int, ...]:
    """Sort key of /usr/lib/postgresql/<version>/bin/initdb by version."""
    try:
        return tuple(int(part) for part in initdb.parents[1].name.split("."))
    except ValueError:
        return (0,)
