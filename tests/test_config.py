"""Config: defaults, file < env < flags precedence, and one-line errors that name the field."""

from pathlib import Path

import pytest

from finpulse.config import load_config
from finpulse.errors import ConfigError


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.kafka.topics.raw == "news.raw"
    assert config.kafka.bootstrap_servers == ""
    assert config.scorer.max_batch == 512


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "finpulse.toml"
    path.write_text('[scorer]\nmax_batch = 10\nmax_wait_ms = 50\ngroup_id = "from-file"\n')
    env = {"FINPULSE_SCORER__MAX_BATCH": "20", "FINPULSE_SCORER__GROUP_ID": "from-env"}
    config = load_config(path, environ=env, overrides={"scorer.max_batch": 30})
    assert config.scorer.max_batch == 30  # flag beats env and file
    assert config.scorer.group_id == "from-env"  # env beats file
    assert config.scorer.max_wait_ms == 50  # file beats default


def test_config_file_named_by_env(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[kafka]\nbootstrap_servers = "broker-1:9092,broker-2:9092"\n')
    config = load_config(environ={"FINPULSE_CONFIG": str(path)})
    assert config.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"FINPULSE_SCORER__MAX_BATCH": "0"}, "scorer.max_batch"),
        ({"FINPULSE_SCORER__MAX_BATCH": "many"}, "scorer.max_batch"),
        ({"FINPULSE_KAFKA__BOOTSTRAP_SERVERS": "localhost"}, "kafka.bootstrap_servers"),
        ({"FINPULSE_SCORER__DEVICE": "tpu"}, "scorer.device"),
        ({"FINPULSE_SCORER__PARALLEL": "threads"}, "scorer.parallel"),
        ({"FINPULSE_SCORER__BATCHSIZE": "3"}, "scorer.batchsize"),
        ({"FINPULSE_METRICS__PORT": "70000"}, "metrics.port"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=env)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"config: {field}: ")
    assert "FINPULSE_" + field.upper().replace(".", "__") in message


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[scorer\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config(path, environ={})


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("aapl, $tsla", ("AAPL", "TSLA")), ('["nvda"]', ("NVDA",)), ("", ())],
)
def test_watchlist_from_the_environment(raw: str, expected: tuple[str, ...]) -> None:
    assert load_config(environ={"FINPULSE_SCORER__WATCHLIST": raw}).scorer.watchlist == expected


def test_watchlist_bad_json_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^config: scorer.watchlist: .*not a JSON list"):
        load_config(environ={"FINPULSE_SCORER__WATCHLIST": "[nvda"})


def test_example_config_loads_and_matches_the_defaults() -> None:
    example = Path(__file__).resolve().parents[1] / "finpulse.example.toml"
    assert load_config(example, environ={}) == load_config(environ={}, overrides={})


def test_a_refused_secret_is_never_echoed() -> None:
    from finpulse.config import load_config
    from finpulse.errors import ConfigError

    environ = {
        "FINPULSE_STORAGE__LAKE__CATALOG": "postgres",
        "FINPULSE_STORAGE__LAKE__POSTGRES_DSN": "host=db password=hunter2 'unclosed",
    }
    with pytest.raises(ConfigError) as refused:
        load_config(environ=environ)
    assert "storage.lake.postgres_dsn" in str(refused.value) and "hunter2" not in str(refused.value)
