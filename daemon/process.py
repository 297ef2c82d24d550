"""What every detached local server finpulse runs needs: is it alive, stop it, a free port, its state, its errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
KILL_WAIT_S = 10.0


def alive(pid: int, child: subprocess.Popen[bytes] | None = None) -> bool:
    """Return True while `pid` runs; reap it first if it is an exited child of this process."""
    if child is not None and child.pid == pid:
        return child.poll() is None
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie still accepts signal 0; /proc tells it apart (absent off Linux: trust the signal).
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def cmdline_mentions(pid: int, *needles: bytes) -> bool:
    """Return False when `pid`'s command line lacks one of `needles` (a recycled pid); True if unknown."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return all(needle in args for needle in needles)


def wait_dead(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None = None, poll_s: float = 0.1) -> bool:
    """Return True once `pid` has exited, False if it still runs after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while alive(pid, child):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def terminate(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None = None) -> bool:
    """Send SIGTERM, wait up to `timeout_s`, then SIGKILL; return False if it survived even that."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # Kafka, Prometheus and Alertmanager all close their data cleanly on TERM
    if wait_dead(pid, timeout_s, child):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return wait_dead(pid, KILL_WAIT_S, child)


def free_port(exclude: set[int] | None = None) -> int:
    """Return a loopback port that nothing listens on right now; raise OSError if none turns up."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in (exclude or set()):
            return port
    raise OSError(f"no free TCP port on {HOST}")


def port_free(port: int) -> bool:
    """Return True when `port` can be bound on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The JVM's and Go's acceptors set SO_REUSEADDR too: a TIME_WAIT left by the last run is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock so concurrent starts and stops of one server cannot interleave."""
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_state(path: Path) -> dict[str, Any]:
    """Return the saved state, or {} when there is none or it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_atomically(path: Path, text: str) -> None:
    """Write `text` through a temporary file, so a reader (or a reloading server) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Save the state atomically."""
    write_atomically(path, json.dumps(state, indent=2) + "\n")


def last_matching_line(path: Path, is_error: Callable[[str], bool], max_bytes: int = 64 * 1024) -> str:
    """Return the last line of the tail of `path` that `is_error` accepts, trimmed to 300 characters."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(path.stat().st_size - max_bytes, 0))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        if is_error(line):
            return line.strip()[:300]
    return ""
