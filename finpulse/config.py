"""The application config: one TOML file, then environment overrides, then CLI flags.

Precedence, lowest to highest: built-in defaults < TOML file < `FINPULSE_<SECTION>__<FIELD>` environment
variables < command-line flags. The TOML file is the first found of: `--config PATH`, `$FINPULSE_CONFIG`,
`./finpulse.toml`. Every value is validated at load; an invalid one stops the program with one line naming
the field and how to fix it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finpulse.errors import ConfigError
from learner.config import ContinualConfig, ModelConfig, TrainConfig
from monitor.config import AlertRulesConfig, DispatcherConfig, MetricsConfig
from storage.config import StorageConfig
from stream.config import KafkaConfig, ScorerConfig

ENV_PREFIX = "FINPULSE_"
CONFIG_ENV = "FINPULSE_CONFIG"
DEFAULT_FILE = Path("finpulse.toml")


class AppConfig(BaseModel):
    """Everything finpulse can be configured with, one section per component."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    learner: ContinualConfig = Field(default_factory=ContinualConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig)
    # The alert rules' windows and time base. With time_base = "event" every scorer keeps event-time windows of
    # these lengths; Prometheus must run the rules generated with the same values (python -m monitor.rules).
    alerts: AlertRulesConfig = Field(default_factory=AlertRulesConfig)


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Load, merge and validate the config; `overrides` are dotted keys from CLI flags."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    source = _config_file(path, env)
    if source is not None:
        _merge(merged, _read_toml(source))
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and key != CONFIG_ENV and "__" in key:
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(merged, dotted, value, origin=f"environment variable {key}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(merged, dotted, value, origin="command line")
    try:
        return AppConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from e


def _config_file(path: Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: fix --config or create the file")
        return path
    if env.get(CONFIG_ENV):
        named = Path(env[CONFIG_ENV])
        if not named.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named} does not exist: fix the variable or create the file")
        return named
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _set_dotted(into: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = into
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted} (from {origin}): {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


_SECRET_FIELD = re.compile(r"password|secret|token|dsn|credential|sasl|api_key", re.IGNORECASE)


def _one_line(error: ValidationError, source: Path | None) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    got = first.get("input")
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown setting; check its spelling against `finpulse config`"
    env_name = ENV_PREFIX + field.upper().replace(".", "__")
    where = f"{source}" if source else "finpulse.toml"
    # A secret's value (a password, a DSN, a token) is never printed back, not even when it is wrong.
    secret = _SECRET_FIELD.search(field) is not None
    shown = "" if isinstance(got, dict) or secret else f" (got {got!r})"
    if secret and isinstance(got, str) and got:
        message = message.replace(got, "***")
    more = f" [+{error.error_count() - 1} more]" if error.error_count() > 1 else ""
    return f"config: {field}: {message}{shown}; fix it in {where}, {env_name} or the matching flag{more}"
