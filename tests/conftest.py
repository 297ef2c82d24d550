"""Shared fixtures: one real Kafka broker per test session, and fresh topic / group names per test.

Use `kafka_bootstrap` (a `127.0.0.1:PORT` string) in any test that needs Kafka, and mark such tests
`@pytest.mark.kafka`. The broker is started lazily, on first use, so sessions without Kafka tests pay
nothing. Topics and consumer groups are never deleted: give every test its own names via `unique_name`
(or `fresh_topics`, which also creates them) so tests cannot see each other's messages or offsets.
"""

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.postgres_local import LocalPostgres, postgres_binaries
from stream import clientlog
from stream.admin import ensure_topics
from stream.broker import LocalBroker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _kafka_log_unfiltered() -> Iterator[None]:
    """Undo the CLI's kafka-python log filter after each test: a test calling `main()` must not hide the
    kafka-python lines a later test reads."""
    yield
    clientlog.uninstall()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start one local broker for the whole session and yield its bootstrap string."""
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.start()
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Return a factory of names unique to this call, e.g. `unique_name("news")` → `news-1f0c…`."""

    def make(prefix: str) -> str:
        # Topic names allow [A-Za-z0-9._-]; a uuid hex suffix keeps within that and within 249 characters.
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def fresh_topics(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Callable[..., list[str]]:
    """Return a factory that creates new topics on the session broker, e.g. `fresh_topics("raw", "dlq")`."""

    def make(*prefixes: str, partitions: int = 3) -> list[str]:
        names = [unique_name(prefix) for prefix in prefixes]
        ensure_topics(kafka_bootstrap, names, partitions)
        return names

    return make


@pytest.fixture(scope="session")
def adapters_dir() -> Path:
    """Return the adapters the tests score with: the shipped ones, or `$FINPULSE_TEST_ADAPTERS` while retraining."""
    return Path(os.environ.get("FINPULSE_TEST_ADAPTERS", REPO / "adapters"))


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """Start one throwaway PostgreSQL server for the session (the lake's multi-host catalog) and yield its DSN."""
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install -y postgresql")
    # Not pytest's tmp_path: when root, the server runs as user postgres, which cannot enter root's 0700 dirs.
    data_dir = Path(tempfile.mkdtemp(prefix="finpulse-test-pg-", dir="/tmp"))
    server = LocalPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def fresh_postgres_database(dsn: str, name: str) -> str:
    """Create database `name` on the server of `dsn` (the session's PostgreSQL) and return a DSN for it."""
    import duckdb

    from storage.lake import extension_path

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute(f"LOAD '{extension_path('postgres')}'")
        con.execute(f"ATTACH '{dsn}' AS pg (TYPE postgres)")
        con.execute(f"CALL postgres_execute('pg', 'CREATE DATABASE {name}', use_transaction => false)")
    finally:
        con.close()
    return dsn.replace("dbname=finpulse", f"dbname={name}")
