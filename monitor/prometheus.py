"""Run a local Prometheus and Alertmanager (the Debian binaries) on loopback, each detached, state in a data dir.

Prometheus scrapes the given scorer targets, evaluates the rules of monitor/rules.py and sends alerts to the
Alertmanager, which posts every notification (resolved ones too) to one webhook. Both outlive the process that
started them; a later `start` finds them running, rewrites their configs and reloads them. The data dir holds:

    prometheus.json / alertmanager.json   pid, port and URL of the last start (ports are reused on restart)
    prometheus.yml  / alertmanager.yml    the generated configs, rewritten on every start
    alertmanager.token                    the dispatcher's bearer token, mode 0600, when one is given
    prometheus.log  / alertmanager.log    the servers' stdout and stderr
    rules/finpulse.rules.yml              the rules Prometheus evaluates
    tsdb/                                 Prometheus' samples
    alertmanager/                         Alertmanager's notification log and silences
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import SecretStr

from daemon import process
from monitor.config import AlertRulesConfig, PrometheusConfig, duration_seconds
from monitor.errors import PrometheusError
from monitor.rules import render_rules

HOST = process.HOST
INSTALL_HINT = "apt-get install prometheus prometheus-alertmanager"
_POLL_S = 0.1
_HTTP_TIMEOUT_S = 5.0
# Prometheus' guidance: a rate() window should span at least four scrapes, or a missed scrape empties it.
_MIN_SCRAPES_PER_WINDOW = 4
_TARGET = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")


@dataclass(frozen=True)
class ServiceStatus:
    """What `status()` found; `pid` and `url` are None unless the server is running."""

    running: bool
    pid: int | None
    url: str | None
    data_dir: Path


def find_binary(configured: str, names: Sequence[str]) -> str:
    """Return the path of `configured` (a path or a name on PATH), else of the first of `names` found."""
    candidates = [configured] if configured else list(names)
    for name in candidates:
        found = shutil.which(name)
        if found is None and "/" not in name:
            fallback = Path("/usr/bin") / name  # PATH may lack /usr/bin under a minimal environment
            found = str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None
        if found is not None:
            return found
    wanted = " or ".join(candidates)
    raise PrometheusError(f"{names[0]} not found (looked for {wanted}): {INSTALL_HINT}")


class _LocalServer:
    """What Prometheus and Alertmanager share: a detached process, its state file, readiness and reload."""

    name: ClassVar[str]  # also the stem of the state, config and log files
    binary_names: ClassVar[tuple[str, ...]]

    def __init__(self, config: PrometheusConfig | None = None) -> None:
        """Bind to `config.data_dir` (created on start); nothing runs until `start`."""
        self.config = config if config is not None else PrometheusConfig()
        # Absolute: the paths go into config files and command lines of servers running in another cwd.
        self.data_dir = Path(self.config.data_dir).expanduser().resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        """Return the JSON file with pid, port and URL."""
        return self.data_dir / f"{self.name}.json"

    @property
    def config_file(self) -> Path:
        """Return the generated config the server runs with."""
        return self.data_dir / f"{self.name}.yml"

    @property
    def log_file(self) -> Path:
        """Return the file receiving the server's stdout and stderr."""
        return self.data_dir / f"{self.name}.log"

    # -- lifecycle -----------------------------------------------------------------------------------------

    def binary(self) -> str:
        """Return the path of the server's executable."""
        raise NotImplementedError

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `timeout_s`; do nothing when it is not running."""
        if not self.data_dir.is_dir():
            return
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            if pid is not None:
                self._terminate(pid, timeout_s)
            if state.get("pid") is not None:
                state["pid"] = None  # keep the port: the next start reuses it
                self._write_state(state)

    def status(self) -> ServiceStatus:
        """Report whether the server of this data dir runs, and where."""
        state = self._read_state()
        pid = self._live_pid(state)
        if pid is None:
            return ServiceStatus(running=False, pid=None, url=None, data_dir=self.data_dir)
        return ServiceStatus(running=True, pid=pid, url=str(state["url"]), data_dir=self.data_dir)

    @property
    def url(self) -> str:
        """Return the base URL of the running server, e.g. `http://127.0.0.1:9090`."""
        status = self.status()
        if status.url is None:
            raise PrometheusError(f"{self.name} is not running in {self.data_dir}: start it first")
        return status.url

    # -- internals -----------------------------------------------------------------------------------------

    def _arguments(self, port: int) -> list[str]:
        """Return the command line after the binary."""
        raise NotImplementedError

    def _start(self, files: Mapping[Path, str], port: int | None, timeout_s: float | None) -> str:
        """Write `files`, then reload the running server or launch one; return its URL once it is ready."""
        timeout = self.config.start_timeout_s if timeout_s is None else timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self.binary()  # before any file is touched: a missing binary should change nothing
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            if pid is not None and port is not None and int(state["port"]) != port:
                raise PrometheusError(
                    f"{self.name} in {self.data_dir} already runs on {state['url']} (pid {pid}): stop it before "
                    f"asking for port {port}"
                )
            for path, text in files.items():
                _write_atomically(path, text)
            if pid is not None:
                url = str(state["url"])
                self._wait_ready(url, pid, timeout)  # possibly still booting under another process
                self._reload(url)
                return url

            chosen = self._choose_port(port, state)
            url = f"http://{HOST}:{chosen}"
            with self.log_file.open("ab") as out:
                try:
                    self._proc = subprocess.Popen(
                        [binary, *self._arguments(chosen)],
                        cwd=self.data_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # detached: no SIGINT/SIGHUP from the caller's terminal
                    )
                except OSError as e:
                    raise PrometheusError(f"cannot launch {binary}: {e.strerror or e}") from e
            self._write_state({"pid": self._proc.pid, "port": chosen, "url": url, "started_at": time.time()})
            try:
                self._wait_ready(url, self._proc.pid, timeout)
            except PrometheusError:
                # A server that never came up must not linger holding the port and the data dir.
                self._terminate(self._proc.pid, process.KILL_WAIT_S)
                state = self._read_state()
                state["pid"] = None
                self._write_state(state)
                raise
            return url

    def _reload(self, url: str) -> None:
        """Make the running server read its rewritten config; raise with the server's reason if it refuses."""
        status, body = _http("POST", f"{url}/-/reload")
        if status != 200:
            reason = body.decode("utf-8", errors="replace").strip() or f"HTTP {status}"
            raise PrometheusError(f"{self.name} refused its new config {self.config_file}: {reason}")

    def _wait_ready(self, url: str, pid: int, timeout_s: float) -> None:
        """Block until `/-/ready` answers 200; raise if the server exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._alive(pid):
                code = self._proc.returncode if self._proc is not None and self._proc.pid == pid else None
                how = f"exited with code {code}" if code is not None else "exited"
                hint = _last_error_line(self.log_file)
                raise PrometheusError(
                    f"{self.name} {how} while starting on {url}"
                    + (f" ({hint})" if hint else "")
                    + f"; see {self.log_file}"
                )
            if _http("GET", f"{url}/-/ready", timeout_s=1.0)[0] == 200:
                return
            if time.monotonic() >= deadline:
                raise PrometheusError(f"{self.name} was not ready on {url} within {timeout_s:g} s; see {self.log_file}")
            time.sleep(_POLL_S)

    def _choose_port(self, port: int | None, state: dict[str, Any]) -> int:
        """Return the requested port if free, else the remembered one if free, else a new one."""
        if port is not None:
            if not 0 < port < 65536:
                raise PrometheusError(f"port must be in 1..65535, got {port}")
            if not process.port_free(port):
                raise PrometheusError(f"port {port} on {HOST} is in use: pass another port or free it")
            return port
        remembered = state.get("port")
        # Reusing the last port keeps URLs handed to other processes (scrape targets, webhooks) valid.
        return remembered if isinstance(remembered, int) and process.port_free(remembered) else process.free_port()

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock on this server's state so concurrent starts and stops cannot interleave."""
        return process.locked(self.data_dir / f"{self.name}.lock")

    def _read_state(self) -> dict[str, Any]:
        """Return the saved state, or {} when there is none or it is unreadable."""
        return process.read_state(self.state_file)

    def _write_state(self, state: dict[str, Any]) -> None:
        """Save the state atomically, so a reader never sees half a file."""
        _write_atomically(self.state_file, json.dumps(state, indent=2) + "\n")

    def _live_pid(self, state: dict[str, Any]) -> int | None:
        """Return the saved pid if that process is alive and is this data dir's server."""
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not self._alive(pid):
            return None
        # The pid may have been recycled by an unrelated process since the server died.
        if not process.cmdline_mentions(pid, f"--config.file={self.config_file}".encode()):
            return None
        return pid

    def _alive(self, pid: int) -> bool:
        """Return True while `pid` runs."""
        return process.alive(pid, self._proc)

    def _terminate(self, pid: int, timeout_s: float) -> None:
        """Send SIGTERM, wait up to `timeout_s`, then SIGKILL; raise if it still runs."""
        if not process.terminate(pid, timeout_s, self._proc):
            raise PrometheusError(
                f"{self.name} pid {pid} survived SIGKILL; kill it by hand and remove {self.state_file}"
            )

    def _get_json(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        """GET `path` of the running server and return the decoded JSON body."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        status, body = _http("GET", url)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if status != 200:
            detail = data.get("error") if isinstance(data, dict) else body[:200].decode("utf-8", errors="replace")
            raise PrometheusError(f"{self.name} answered HTTP {status} to {path}: {detail}")
        if data is None:
            raise PrometheusError(f"{self.name} answered {path} with something other than JSON")
        return data


class LocalPrometheus(_LocalServer):
    """Start, reload, stop and query the local Prometheus kept in `config.data_dir`."""

    name = "prometheus"
    binary_names = ("prometheus",)

    @property
    def rules_file(self) -> Path:
        """Return the rules file Prometheus evaluates."""
        return self.data_dir / "rules" / "finpulse.rules.yml"

    @property
    def tsdb_dir(self) -> Path:
        """Return Prometheus' sample storage."""
        return self.data_dir / "tsdb"

    def binary(self) -> str:
        """Return the path of the prometheus executable."""
        return find_binary(self.config.prometheus_binary, self.binary_names)

    def start(
        self,
        targets: Sequence[str],
        *,
        alertmanager_url: str | None = None,
        rules: AlertRulesConfig | None = None,
        port: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Scrape the scorer `targets` (host:port), evaluate `rules`, alert to `alertmanager_url`; return the URL."""
        rules = rules if rules is not None else AlertRulesConfig()
        self._check_rules_fit(rules)
        bad = [target for target in targets if not _TARGET.match(target)]
        if bad:
            raise PrometheusError(f"scrape targets must be host:port, got {', '.join(map(repr, bad))}")
        text = _yaml_with_header(self._config_document(targets, alertmanager_url, rules.job))
        return self._start({self.rules_file: render_rules(rules), self.config_file: text}, port, timeout_s)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant PromQL query and return its result list (for a vector: `metric` and `value` each)."""
        data = self._get_json("/api/v1/query", {"query": expr})
        result = data.get("data", {}).get("result", [])
        if not isinstance(result, list):  # a scalar or string answer: [time, value]
            return [{"metric": {}, "value": result}]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Return the alerts Prometheus holds now, pending and firing, with `labels`, `annotations` and `state`."""
        data = self._get_json("/api/v1/alerts")
        alerts = data.get("data", {}).get("alerts", [])
        return alerts if isinstance(alerts, list) else []

    def _arguments(self, port: int) -> list[str]:
        """Return Prometheus' command line after the binary."""
        return [
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.tsdb_dir}",
            f"--storage.tsdb.retention.time={self.config.retention}",
            f"--web.listen-address={HOST}:{port}",
            # Alerts carry links back to Prometheus (generatorURL): make them point at this address.
            f"--web.external-url=http://{HOST}:{port}/",
            "--web.enable-lifecycle",  # POST /-/reload: a later start applies new targets without a restart
        ]

    def _check_rules_fit(self, rules: AlertRulesConfig) -> None:
        """Refuse rules whose window is too short for the scrape interval, which would leave shares empty."""
        scrape = duration_seconds(self.config.scrape_interval)
        if duration_seconds(rules.window) < _MIN_SCRAPES_PER_WINDOW * scrape:
            raise PrometheusError(
                f"the rules' window ({rules.window}) must span at least {_MIN_SCRAPES_PER_WINDOW} scrapes of "
                f"{self.config.scrape_interval}: lengthen the window or shorten the scrape interval"
            )

    def _config_document(self, targets: Sequence[str], alertmanager_url: str | None, job: str) -> dict[str, Any]:
        """Return prometheus.yml as a mapping."""
        scrape_s = duration_seconds(self.config.scrape_interval)
        document: dict[str, Any] = {
            "global": {
                "scrape_interval": self.config.scrape_interval,
                # Prometheus refuses a timeout longer than the interval; its default is 10s.
                "scrape_timeout": self.config.scrape_interval if scrape_s < 10 else "10s",
                "evaluation_interval": self.config.evaluation_interval,
            },
            "rule_files": [str(self.rules_file)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if alertmanager_url is not None:
            parsed = urllib.parse.urlsplit(alertmanager_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise PrometheusError(f"alertmanager_url must be an http(s) URL, got {alertmanager_url!r}")
            document["alerting"] = {
                "alertmanagers": [
                    {
                        "scheme": parsed.scheme,
                        "path_prefix": parsed.path or "/",
                        "static_configs": [{"targets": [parsed.netloc]}],
                    }
                ]
            }
        return document


class LocalAlertmanager(_LocalServer):
    """Start, reload, stop and query the local Alertmanager kept in `config.data_dir`."""

    name = "alertmanager"
    # Debian names the binary prometheus-alertmanager; upstream tarballs and other distributions alertmanager.
    binary_names = ("prometheus-alertmanager", "alertmanager")
    receiver = "finpulse-webhook"

    @property
    def storage_dir(self) -> Path:
        """Return Alertmanager's notification log and silences."""
        return self.data_dir / "alertmanager"

    @property
    def token_file(self) -> Path:
        """Return the file holding the bearer token Alertmanager sends to the webhook, when given one."""
        return self.data_dir / "alertmanager.token"

    def binary(self) -> str:
        """Return the path of the Alertmanager executable."""
        return find_binary(self.config.alertmanager_binary, self.binary_names)

    def start(
        self,
        webhook_url: str,
        *,
        bearer_token: SecretStr | None = None,
        bearer_token_file: Path | None = None,
        port: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Route every alert to `webhook_url` (resolved ones too) and return Alertmanager's URL once ready.

        With `bearer_token` (written to `token_file`, mode 0600) or `bearer_token_file`, every notification
        carries `Authorization: Bearer <token>`; the config names the file, so the token is not in the YAML.
        """
        parsed = urllib.parse.urlsplit(webhook_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise PrometheusError(f"webhook_url must be an http(s) URL, got {webhook_url!r}")
        if bearer_token is not None and bearer_token_file is not None:
            raise PrometheusError("give Alertmanager bearer_token or bearer_token_file, not both")
        credentials = None
        if bearer_token is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _write_secret(self.token_file, bearer_token.get_secret_value() + "\n")
            credentials = self.token_file
        elif bearer_token_file is not None:
            credentials = Path(bearer_token_file).expanduser().resolve()
        text = _yaml_with_header(self._config_document(webhook_url, credentials))
        return self._start({self.config_file: text}, port, timeout_s)

    def alerts(self) -> list[dict[str, Any]]:
        """Return the alerts Alertmanager holds now (API v2), with `labels`, `annotations` and `status`."""
        data = self._get_json("/api/v2/alerts")
        return data if isinstance(data, list) else []

    def _arguments(self, port: int) -> list[str]:
        """Return Alertmanager's command line after the binary."""
        return [
            f"--config.file={self.config_file}",
            f"--storage.path={self.storage_dir}",
            f"--web.listen-address={HOST}:{port}",
            f"--web.external-url=http://{HOST}:{port}/",
            # Empty: no gossip cluster. A single local instance needs no peers, and the default listens on
            # 0.0.0.0:9094, which collides between instances and leaves loopback.
            "--cluster.listen-address=",
        ]

    def _config_document(self, webhook_url: str, credentials: Path | None = None) -> dict[str, Any]:
        """Return alertmanager.yml as a mapping: one route, one webhook receiver, critical inhibits warning."""
        # One notification group per alert and subject, so a subscriber to a topic gets that topic's alerts.
        subject = ["alertname", "topic", "ticker"]
        webhook: dict[str, Any] = {"url": webhook_url, "send_resolved": True, "max_alerts": 0}
        if credentials is not None:
            # Alertmanager reads the file at each notification: a rotated token needs no reload.
            webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials_file": str(credentials)}}
        return {
            "route": {
                "receiver": self.receiver,
                "group_by": list(subject),
                "group_wait": self.config.group_wait,
                "group_interval": self.config.group_interval,
                "repeat_interval": self.config.repeat_interval,
            },
            "receivers": [
                {
                    "name": self.receiver,
                    "webhook_configs": [webhook],
                }
            ],
            # A critical spike fires alongside its warning (monitor/rules.py); notify the critical one only.
            "inhibit_rules": [
                {
                    "source_matchers": ['severity="critical"'],
                    "target_matchers": ['severity="warning"'],
                    "equal": list(subject),  # a copy: a shared list would be written as a YAML anchor
                }
            ],
        }


# -- helpers -----------------------------------------------------------------------------------------------


def _yaml_with_header(document: Mapping[str, Any]) -> str:
    """Return a generated config as YAML under a do-not-edit header."""
    header = "# Written by monitor/prometheus.py on every start; edits are overwritten.\n"
    return header + yaml.safe_dump(dict(document), sort_keys=False, width=1000)


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a server reloading it never reads half a file."""
    try:
        process.write_atomically(path, text)
    except OSError as e:
        raise PrometheusError(f"cannot write {path}: {e.strerror or e}") from e


def _write_secret(path: Path, text: str) -> None:
    """Write a secret readable by this user only, through a temporary file created with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover of a crash keeps the mode it was created with
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        tmp.replace(path)
    except OSError as e:
        raise PrometheusError(f"cannot write {path}: {e.strerror or e}") from e


def _http(method: str, url: str, timeout_s: float = _HTTP_TIMEOUT_S) -> tuple[int, bytes]:
    """Send one request and return (status, body); status 0 when nothing answered."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())
    except (urllib.error.URLError, OSError):
        return 0, b""


def _last_error_line(path: Path) -> str:
    """Return the last error line (Go logfmt `level=error`) in the tail of a server's log."""
    return process.last_matching_line(path, lambda line: "level=error" in line or "level=fatal" in line)
