"""Shared fixtures: a registry on SQLite and on PostgreSQL, its app served
in a thread with an httpx client, the app with a users file, a PostgreSQL
database with an en-US collation, containers client settings for skopeo and
podman, a nats-server per test, and the `cairn serve` processes that the
mirror tests use as source and target.

PostgreSQL tests use one fresh database per test run, created on the server
named by CAIRN_TEST_POSTGRES_URL (default: the local server on 127.0.0.1:5432
as user postgres) and dropped at the end. Each test starts from empty tables.
Set CAIRN_TEST_POSTGRES_URL=skip to run SQLite only; CI never does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from engine.api.app import create_app
from engine.api.auth import Authenticator, Role, add_user
from engine.db import Database
from engine.identity import bind_data_dir
from engine.logs import configure_logging
from engine.migrate import upgrade
from engine.registry import Registry
from engine.tables import metadata
from tests.nats import NatsServer
from tests.server import (
    READER,
    WRITER,
    ServeProcess,
    ServerThread,
    running,
    serve_cairn,
)

ADMIN_URL = os.environ.get(
    "CAIRN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

configure_logging("warning", json=False)


def _backends() -> list[str]:
    return ["sqlite"] if ADMIN_URL == "skip" else ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Create a fresh, migrated PostgreSQL database for this test run."""
    if ADMIN_URL == "skip":
        pytest.skip("CAIRN_TEST_POSTGRES_URL=skip")
    name = f"cairn_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = (
        sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    )
    database = Database(url)
    upgrade(database)
    database.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def reset_postgres(url: str) -> None:
    """Empty every cairn table and reset the log head."""
    engine = sa.create_engine(url)
    names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {names}")
        conn.exec_driver_sql(
            "INSERT INTO log_head (id, position, hash) VALUES (1, 0, :h)".replace(
                ":h", "'" + "0" * 64 + "'"
            )
        )
    engine.dispose()


@pytest.fixture(params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: SQLite in tmp_path, or the run's PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cairn.db'}"
        database = Database(url)
        upgrade(database)
        database.dispose()
        return url
    url = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def registry(data_dir: Path, database_url: str) -> Iterator[Registry]:
    registry = Registry.open(data_dir, database_url)
    # As cairn serve does, so that commands on this data directory and
    # database find them bound to each other.
    bind_data_dir(data_dir, registry.registry_id(), adopt=True, require=False)
    yield registry
    registry.database.dispose()


@pytest.fixture
def app_server(registry: Registry) -> Iterator[ServerThread]:
    """The registry app, served in a thread on a 127.0.0.1 port."""
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def app_client(app_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app_server.url, timeout=60) as client:
        yield client


@pytest.fixture
def host(app_server: ServerThread) -> str:
    """The app_server's address as a registry client writes it in references."""
    return f"127.0.0.1:{app_server.port}"


@pytest.fixture
def auth_server(registry: Registry, tmp_path: Path) -> Iterator[ServerThread]:
    """cairn with a users file of a pull user READER and a push user WRITER."""
    users = tmp_path / "users"
    add_user(users, READER[0], Role.PULL, READER[1])
    add_user(users, WRITER[0], Role.PUSH, WRITER[1])
    app = create_app(registry, authenticator=Authenticator.from_file(users))
    with running(app) as server:
        yield server


@contextmanager
def scratch_postgres_database(options: str = "") -> Iterator[str]:
    """Create a PostgreSQL database with CREATE DATABASE ``options``, yield
    its URL and drop it afterwards."""
    name = f"cairn_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" {options}')
        url = sa.make_url(ADMIN_URL).set(database=name)
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture(params=_backends())
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without any schema: a new SQLite file in tmp_path, or a new
    PostgreSQL database that is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with scratch_postgres_database() as url:
        yield url


@pytest.fixture
def en_us_postgres_url() -> Iterator[str]:
    """Create a migrated PostgreSQL database whose default collation is
    ICU's en-US, which sorts as an English locale does, not by bytes."""
    if ADMIN_URL == "skip":
        pytest.skip("CAIRN_TEST_POSTGRES_URL=skip")
    options = (
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    )
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_postgres_database(options))
        except sa.exc.DBAPIError as error:
            pytest.skip(f"PostgreSQL cannot create an ICU database: {error}")
        database = Database(url)
        upgrade(database)
        database.dispose()
        yield url


@pytest.fixture
def runroot() -> Iterator[Path]:
    # podman rejects a runroot path longer than 50 characters, longer than
    # pytest's tmp_path, so this one sits directly in /tmp.
    path = Path(tempfile.mkdtemp(prefix="cairn-run-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client_env(tmp_path: Path, runroot: Path) -> dict[str, str]:
    """An environment that points containers/image at files of this test only."""
    config = tmp_path / "containers"
    config.mkdir()
    policy = config / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    registries = config / "registries.conf"
    registries.write_text(
        'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
    )
    storage = config / "storage.conf"
    storage.write_text(
        "[storage]\n"
        'driver = "vfs"\n'
        f'graphroot = "{tmp_path / "storage-root"}"\n'
        f'runroot = "{runroot}"\n'
    )
    containers_conf = config / "containers.conf"
    containers_conf.write_text(
        '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n'
    )

    home = tmp_path / "home"
    home.mkdir()
    (home / "auth.json").write_text('{"auths": {}}')
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "CONTAINERS_STORAGE_CONF": str(storage),
        "CONTAINERS_CONF": str(containers_conf),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        "TMPDIR": str(tmp_path),
        "POLICY": str(policy),
    }


@pytest.fixture(name="nats_server")
def nats_server_fixture(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server for one test, stopped at its end."""
    server = NatsServer(tmp_path / "nats-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server_without_jetstream(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server without JetStream, its default, for one test."""
    server = NatsServer(tmp_path / "plain-nats-server", jetstream=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Debian 12's nats-server package installs version 2.9.10 here, the oldest
# version that cairn supports.
DEBIAN_NATS_SERVER = Path("/usr/sbin/nats-server")


@pytest.fixture(name="debian_nats_server")
def debian_nats_server_fixture(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server from Debian's package, stopped at the test's end.

    The test is skipped where that package is not installed.
    """
    if not DEBIAN_NATS_SERVER.is_file():
        pytest.skip(f"{DEBIAN_NATS_SERVER} not found: apt-get install nats-server")
    server = NatsServer(tmp_path / "debian-nats-server", DEBIAN_NATS_SERVER)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def source(tmp_path: Path) -> Iterator[ServeProcess]:
    """A `cairn serve` on SQLite that mirror tests copy from."""
    served = serve_cairn(tmp_path / "source")
    try:
        yield served
    finally:
        served.kill()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[ServeProcess]:
    """A `cairn serve` on SQLite that mirror tests copy to."""
    served = serve_cairn(tmp_path / "target")
    try:
        yield served
    finally:
        served.kill()
