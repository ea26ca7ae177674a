"""`cairn` commands given a data directory or database they cannot use.

Each command runs as a subprocess and must exit with status 1, print one
`cairn: ...` line on standard error, log no error record beside it, and
show no traceback. Unwritable directories are tested as the user nobody when the
tests run as root, because root may write anywhere.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from engine.config import parse_trusted_proxies
from engine.database_url import redacted_database_url
from engine.migrate import head_revision
from tests.conftest import ADMIN_URL, scratch_postgres_database
from tests.nats import wait_until
from tests.server import START_TIMEOUT_S, push_blob

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# Arguments after `cairn`, for each command that opens the storage.
STORAGE_COMMANDS = {
    "serve": ["serve", "--no-nats", "--listen", "127.0.0.1:0"],
    "verify": ["verify"],
    "rebuild": ["projections", "rebuild"],
    "gc": ["gc"],
    "db-upgrade": ["db", "upgrade"],
}
CREATING_COMMANDS = ["serve", "db-upgrade"]
READING_COMMANDS = ["verify", "rebuild", "gc"]
WRITING_COMMANDS = ["serve", "rebuild", "gc", "db-upgrade"]


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def messages(self) -> list[str]:
        """The lines of standard error that are not JSON log lines."""
        return [line for line in self.stderr.splitlines() if line.startswith("cairn:")]

    @property
    def plain_lines(self) -> list[str]:
        """The lines of standard error that are not JSON log lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]

    @property
    def logged_errors(self) -> list[dict[str, Any]]:
        return [
            line
            for line in self.log_events
            if line.get("level") in ("error", "critical")
        ]

    @property
    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.stderr.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def logged_error(self, event: str) -> dict[str, Any] | None:
        for line in self.log_events:
            if line.get("event") == event and line.get("level") == "error":
                return line
        return None


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}


def _unprivileged_prefix() -> list[str]:
    """Return the command prefix that drops root's rights, or [] for others."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    nobody = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    ]


def run_cairn(
    *args: str,
    unprivileged: bool = False,
    env: dict[str, str] | None = None,
    stdin_text: str = "",
) -> Result:
    """Run `cairn --log-format json ARGS` to completion, with the variables in
    ``env`` added to an environment without CAIRN_* variables and
    ``stdin_text`` on standard input."""
    prefix = _unprivileged_prefix() if unprivileged else []
    command = [*prefix, sys.executable, "-m", "engine.cli", "--log-format", "json"]
    completed = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        input=stdin_text,
        cwd=REPOSITORY_ROOT,
        env={**_environment(), **(env or {})},
        timeout=START_TIMEOUT_S,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


def assert_storage_error(result: Result, message: str) -> None:
    """Check the exit status, the one-line message, the log line, no traceback."""
    assert result.status == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.messages) == 1, result.stderr
    assert result.messages[0].startswith(f"cairn: {message}"), result.messages[0]
    assert result.logged_errors == [], result.stderr
    assert "listening on" not in result.stdout


@pytest.fixture
def locked_dir() -> Iterator[Path]:
    """An empty directory that unprivileged cairn processes can enter, not write.

    It lives in a fresh directory under the system's temporary directory,
    because pytest's own temporary directories are closed to other users.
    """
    root = Path(tempfile.mkdtemp(prefix="cairn-locked-"))
    root.chmod(0o755)
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o555 if os.geteuid() != 0 else 0o755)
    try:
        yield locked
    finally:
        for path in [locked, *locked.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root)


@pytest.mark.parametrize("command", CREATING_COMMANDS)
def test_data_dir_not_creatable(command: str, locked_dir: Path) -> None:
    data_dir = locked_dir / "data"

    result = run_cairn(
        *STORAGE_COMMANDS[command], "--data-dir", str(data_dir), unprivileged=True
    )

    assert_storage_error(
        result, f"cannot use data directory {data_dir}: Permission denied"
    )
    assert not data_dir.exists()


@pytest.mark.parametrize("command", CREATING_COMMANDS)
def test_data_dir_not_writable(command: str, locked_dir: Path) -> None:
    result = run_cairn(
        *STORAGE_COMMANDS[command], "--data-dir", str(locked_dir), unprivileged=True
    )

    assert_storage_error(
        result, f"cannot use data directory {locked_dir}: Permission denied"
    )
    assert list(locked_dir.iterdir()) == []


# verify only reads, and tests/test_read_only_data_dir.py checks it there.
@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_used_data_dir_not_writable(command: str, locked_dir: Path) -> None:
    data_dir = locked_dir / "data"
    locked_dir.chmod(0o755)
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0
    for path in [data_dir, data_dir / "blobs", data_dir / "uploads"]:
        path.chmod(0o555)
    (data_dir / "cairn.db").chmod(0o444)

    result = run_cairn(
        *STORAGE_COMMANDS[command], "--data-dir", str(data_dir), unprivileged=True
    )

    assert_storage_error(result, f"cannot use data directory {data_dir}: not writable")


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_database_file_not_writable(command: str, locked_dir: Path) -> None:
    data_dir = locked_dir / "data"
    locked_dir.chmod(0o755)
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0
    for path in [data_dir, data_dir / "blobs", data_dir / "uploads"]:
        path.chmod(0o777)
    database_file = data_dir / "cairn.db"
    database_file.chmod(0o444)

    result = run_cairn(
        *STORAGE_COMMANDS[command], "--data-dir", str(data_dir), unprivileged=True
    )

    assert_storage_error(
        result,
        f"cannot use data directory {data_dir}: {database_file} is not writable",
    )


@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_data_dir_below_regular_file(command: str, tmp_path: Path) -> None:
    regular_file = tmp_path / "file"
    regular_file.write_text("not a directory\n")
    data_dir = regular_file / "data"

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(
        result, f"cannot use data directory {data_dir}: Not a directory"
    )
    assert regular_file.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_data_dir_is_regular_file(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "file"
    data_dir.write_text("not a directory\n")

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(
        result, f"cannot use data directory {data_dir}: Not a directory"
    )
    assert data_dir.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", READING_COMMANDS)
def test_missing_data_dir_not_created(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "typo"

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(result, f"data directory {data_dir} not found")
    assert not data_dir.exists()
    assert "no problems found" not in result.stdout


@pytest.mark.parametrize("command", READING_COMMANDS)
def test_empty_data_dir_left_empty(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(result, f"data directory {data_dir} contains no cairn data")
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("command", READING_COMMANDS)
def test_used_data_dir_accepted(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert result.status == 0, result.stderr
    assert result.messages == []


def test_db_upgrade_creates_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"

    result = run_cairn("db", "upgrade", "--data-dir", str(data_dir))

    assert result.status == 0, result.stderr
    assert (data_dir / "cairn.db").is_file()
    assert (data_dir / "blobs").is_dir()
    head = head_revision()
    assert result.stdout == f"schema created at revision {head}\n"

    again = run_cairn("db", "upgrade", "--data-dir", str(data_dir))

    assert again.status == 0, again.stderr
    assert again.stdout == f"schema is up to date at revision {head}\n"


@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_schema_revision_unknown(command: str, tmp_path: Path) -> None:
    # As after a rollback: a newer cairn upgraded the schema past this one.
    data_dir = tmp_path / "data"
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0
    with sqlite3.connect(data_dir / "cairn.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(
        result,
        f"cannot use database sqlite:///{data_dir}/cairn.db: its schema is at "
        f"revision 9999, which this cairn does not know (its newest is "
        f"{head_revision()})",
    )


@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_database_file_damaged(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "blobs").mkdir(parents=True)
    damaged = os.urandom(8192)
    (data_dir / "cairn.db").write_bytes(damaged)

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(
        result,
        f"cannot use database sqlite:///{data_dir}/cairn.db: file is not a database",
    )
    assert (data_dir / "cairn.db").read_bytes() == damaged


@pytest.mark.parametrize("command", READING_COMMANDS)
def test_database_without_schema_left_empty(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "blobs").mkdir(parents=True)
    (data_dir / "cairn.db").touch()

    result = run_cairn(*STORAGE_COMMANDS[command], "--data-dir", str(data_dir))

    assert_storage_error(
        result,
        f"cannot use database sqlite:///{data_dir}/cairn.db: it contains no "
        "cairn schema",
    )
    with sqlite3.connect(data_dir / "cairn.db") as conn:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == []
    assert not (data_dir / "registry-id").exists()


@pytest.mark.parametrize(
    "command", [["verify"], ["gc", "--dry-run"], ["db", "backup", "copy.db"]]
)
def test_postgresql_without_schema_for_reading(
    command: list[str], tmp_path: Path
) -> None:
    if ADMIN_URL == "skip":
        pytest.skip("CAIRN_TEST_POSTGRES_URL=skip")
    data_dir = tmp_path / "data"
    (data_dir / "blobs").mkdir(parents=True)

    with scratch_postgres_database() as url:
        result = run_cairn(*command, "--data-dir", str(data_dir), "--database", url)

    assert_storage_error(
        result,
        f"cannot use database {redacted_database_url(url)}: it contains no "
        "cairn schema",
    )


@pytest.mark.parametrize("command", CREATING_COMMANDS)
def test_database_with_foreign_tables(
    command: str, tmp_path: Path, empty_database_url: str
) -> None:
    # Another program's tables, two of them named as cairn's are.
    engine = sa.create_engine(empty_database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE events (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("CREATE TABLE tags (name TEXT)")
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER)")
    storage = ["--data-dir", str(tmp_path / "data"), "--database", empty_database_url]

    result = run_cairn(*STORAGE_COMMANDS[command], *storage)

    assert_storage_error(
        result,
        f"cannot use database {redacted_database_url(empty_database_url)}: it "
        "contains no cairn schema but has tables named events, tags, which "
        "cairn would create",
    )
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"events", "tags", "orders"}
    engine.dispose()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so connections fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_database_unreachable(command: str, tmp_path: Path, refused_port: int) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "blobs").mkdir(parents=True)
    url = f"postgresql://cairn:secret-password@127.0.0.1:{refused_port}/cairn"

    result = run_cairn(
        *STORAGE_COMMANDS[command], "--data-dir", str(data_dir), "--database", url
    )

    redacted_url = f"postgresql://cairn:***@127.0.0.1:{refused_port}/cairn"
    assert_storage_error(result, f"cannot use database {redacted_url}: ")
    assert "secret-password" not in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "invalid database URL 'not a url': "),
        (
            "postgresql://cairn:secret@127.0.0.1:port/cairn",
            "invalid database URL 'postgresql://cairn:***@127.0.0.1:port/cairn': ",
        ),
        (
            "mysql://cairn:secret@127.0.0.1/cairn",
            "unsupported database 'mysql://cairn:***@127.0.0.1/cairn': ",
        ),
        (
            "sqlite://",
            "invalid database URL 'sqlite://': an in-memory SQLite database ",
        ),
        (
            "sqlite:///:memory:",
            "invalid database URL 'sqlite:///:memory:': an in-memory SQLite ",
        ),
        (
            "sqlite:///file::memory:?cache=shared&uri=true",
            "invalid database URL 'sqlite:///file::memory:?cache=shared&uri=true': "
            "an in-memory SQLite database ",
        ),
        (
            "sqlite:///file:registry?mode=memory&uri=true",
            "invalid database URL 'sqlite:///file:registry?mode=memory&uri=true': "
            "an in-memory SQLite database ",
        ),
        (
            "sqlite://db-host/cairn.db",
            "invalid database URL 'sqlite://db-host/cairn.db': a SQLite URL "
            "names a file, not a host",
        ),
        (
            "sqlite:///cairn.db?timeout=abc",
            "invalid database URL 'sqlite:///cairn.db?timeout=abc': cairn sets "
            "SQLite's connection options itself, so a SQLite URL takes no query "
            "parameters (found: timeout)",
        ),
        (
            "sqlite:///cairn%00.db",
            "invalid database URL 'sqlite:///cairn%00.db': it contains a NUL byte",
        ),
        (
            "postgresql+asyncpg://cairn:secret@127.0.0.1/cairn",
            "unsupported database driver 'asyncpg' in "
            "'postgresql+asyncpg://cairn:***@127.0.0.1/cairn': ",
        ),
        (
            "postgresql+nosuchdriver://cairn@127.0.0.1/cairn",
            "unsupported database driver 'nosuchdriver' in ",
        ),
        (
            "postgresql://cairn:secret@127.0.0.1:99999/cairn",
            "invalid database URL 'postgresql://cairn:***@127.0.0.1:99999/cairn': "
            "port 99999 is not in 1-65535",
        ),
        (
            "postgresql://cairn@db.invalid:0/cairn",
            "invalid database URL 'postgresql://cairn@db.invalid:0/cairn': "
            "port 0 is not in 1-65535",
        ),
        (
            "postgresql://cairn@127.0.0.1/cairn?port=abc",
            "invalid database URL 'postgresql://cairn@127.0.0.1/cairn?port=abc': ",
        ),
        (
            "postgresql://cairn@127.0.0.1/cairn?password=secret&colour=blue",
            "invalid database URL "
            "'postgresql://cairn@127.0.0.1/cairn?password=***&colour=blue': "
            'invalid connection option "colour"',
        ),
        (
            "postgresql://cairn@127.0.0.1:port/cairn?password=secret",
            "invalid database URL "
            "'postgresql://cairn@127.0.0.1:port/cairn?password=***': ",
        ),
        (
            "postgresql://cairn@127.0.0.1/cairn?sslpassword=secret&colour=blue",
            "invalid database URL "
            "'postgresql://cairn@127.0.0.1/cairn?sslpassword=***&colour=blue': "
            'invalid connection option "colour"',
        ),
        (
            "postgresql://cairn@127.0.0.1/cairn?connect_timeout=soon",
            "invalid database URL "
            "'postgresql://cairn@127.0.0.1/cairn?connect_timeout=soon': "
            "bad value for connect_timeout: 'soon'",
        ),
        (
            "postgresql://cairn@db.invalid/cairn?application_name=a%00b",
            "invalid database URL "
            "'postgresql://cairn@db.invalid/cairn?application_name=a%00b': "
            "it contains a NUL byte",
        ),
    ],
    ids=[
        "unparsable",
        "bad-port",
        "mysql",
        "sqlite-memory-default",
        "sqlite-memory-name",
        "sqlite-memory-uri",
        "sqlite-memory-mode",
        "sqlite-host",
        "sqlite-query",
        "sqlite-nul",
        "async-driver",
        "unknown-driver",
        "port-out-of-range",
        "port-zero",
        "query-port",
        "unknown-option",
        "bad-port-query-password",
        "query-sslpassword",
        "bad-connect-timeout",
        "postgresql-nul",
    ],
)
def test_database_url_invalid(url: str, message: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    result = run_cairn("db", "upgrade", "--data-dir", str(data_dir), "--database", url)

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"argument --database: {message}" in result.stderr
    assert "secret" not in result.stderr
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "command", [*STORAGE_COMMANDS, "republish"], ids=[*STORAGE_COMMANDS, "republish"]
)
def test_memory_database_variable_rejected(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    arguments = STORAGE_COMMANDS.get(command, ["events", "republish", "--from", "1"])

    result = run_cairn(
        *arguments,
        "--data-dir",
        str(data_dir),
        env={"CAIRN_DATABASE_URL": "sqlite://"},
    )

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "argument --database: invalid database URL 'sqlite://': " in result.stderr
    assert "(from environment variable CAIRN_DATABASE_URL)" in result.stderr
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--listen", "127.0.0.1:70000", "port 70000 is not in 0-65535"),
        ("--listen", "127.0.0.1:65536", "port 65536 is not in 0-65535"),
        ("--nats-port", "99999", "invalid port '99999'"),
        ("--nats-port", "-1", "invalid port '-1'"),
        ("--trusted-proxies", "10.0.0.1,notanip", "invalid trusted proxy 'notanip'"),
        ("--trusted-proxies", "10.0.0.0/33", "invalid trusted proxy '10.0.0.0/33'"),
        (
            "--trusted-proxies",
            "10.0.0.1,,10.0.0.2",
            "invalid trusted proxy '' at entry 2 of '10.0.0.1,,10.0.0.2'",
        ),
        (
            "--trusted-proxies",
            "10.0.0.1,",
            "invalid trusted proxy '' at entry 2 of '10.0.0.1,'",
        ),
        (
            "--trusted-proxies",
            ",10.0.0.1",
            "invalid trusted proxy '' at entry 1 of ',10.0.0.1'",
        ),
        ("--stream", "bad.name", "invalid stream name 'bad.name'"),
        ("--subject-prefix", "a.>", "invalid subject prefix 'a.>'"),
        ("--shutdown-timeout", "nan", "invalid duration 'nan'"),
    ],
)
def test_serve_option_invalid(
    option: str, value: str, message: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    # Should the value be accepted, the server starts on a free port without
    # NATS instead of on the default 127.0.0.1:5000. The option under test
    # comes last, so it overrides --listen.
    safe = ["--listen=127.0.0.1:0", "--no-nats"]

    result = run_cairn("serve", "--data-dir", str(data_dir), *safe, f"{option}={value}")

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"argument {option}: " in result.stderr
    assert message in result.stderr
    assert not data_dir.exists()


def test_trusted_proxies_variable_invalid(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    result = run_cairn(
        "serve",
        "--data-dir",
        str(data_dir),
        env={"CAIRN_TRUSTED_PROXIES": "10.0.0.1, ,10.0.0.2"},
    )

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "argument --trusted-proxies: " in result.stderr
    assert "invalid trusted proxy '' at entry 2 of '10.0.0.1, ,10.0.0.2'" in (
        result.stderr
    )
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        (" ", []),
        ("10.0.0.1", ["10.0.0.1"]),
        (" 10.0.0.0/8 , * ", ["10.0.0.0/8", "*"]),
    ],
)
def test_trusted_proxies_valid(value: str, expected: list[str]) -> None:
    assert parse_trusted_proxies(value) == expected


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--timeout", "nan", "invalid timeout 'nan'"),
        ("--poll-interval", "inf", "invalid duration 'inf'"),
        ("--retries", "-1", "invalid count '-1'"),
        ("--subject-prefix", "a.>", "invalid subject prefix 'a.>'"),
    ],
)
def test_mirror_option_invalid(
    option: str, value: str, message: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    # Port 1 on loopback refuses connections, so an accepted value would
    # make the mirror retry there instead of reaching another host.
    result = run_cairn(
        "mirror",
        "--source=http://127.0.0.1:1",
        f"--target=oci:{tmp_path / 'layout'}",
        f"--checkpoint={checkpoint}",
        "--retries=1",
        "--once",
        f"{option}={value}",
    )

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"argument {option}: " in result.stderr
    assert message in result.stderr
    assert not checkpoint.exists()


# ---- user errors: one line on standard error, no error record -----------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port on which another socket listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def assert_user_error(result: Result, prefix: str) -> None:
    """Check the exit status, the one plain line and that nothing was logged
    as an error."""
    assert result.status == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.plain_lines == [result.plain_lines[0]], result.stderr
    assert result.plain_lines[0].startswith(prefix), result.stderr
    assert result.logged_errors == [], result.stderr


def test_serve_tls_file_missing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    missing = tmp_path / "missing.pem"

    result = run_cairn(
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen=127.0.0.1:0",
        "--no-nats",
        "--tls-cert",
        str(missing),
        "--tls-key",
        str(missing),
    )

    assert_user_error(result, f"cairn: TLS file {missing} not found")


def test_serve_auth_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "users"

    result = run_cairn(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen=127.0.0.1:0",
        "--no-nats",
        "--auth-file",
        str(missing),
    )

    assert_user_error(result, f"cairn: cannot read users file {missing}")


def test_serve_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = run_cairn(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        f"--listen=127.0.0.1:{busy_port}",
        "--no-nats",
    )

    assert_user_error(result, f"cairn: cannot listen on 127.0.0.1:{busy_port}: ")


def test_verify_data_dir_missing(tmp_path: Path) -> None:
    result = run_cairn("verify", "--data-dir", str(tmp_path / "missing"))

    assert_user_error(result, f"cairn: data directory {tmp_path / 'missing'} ")


@pytest.mark.parametrize(
    ("name", "contents", "message"),
    [
        ("bad:name", None, "cairn: cannot add user bad:name to "),
        ("alice", "not a users line\n", "cairn: cannot add user alice: "),
    ],
    ids=["invalid-name", "invalid-file"],
)
def test_users_add_rejected(
    name: str, contents: str | None, message: str, tmp_path: Path
) -> None:
    auth_file = tmp_path / "users"
    if contents is not None:
        auth_file.write_text(contents)

    result = run_cairn(
        "users",
        "add",
        "--auth-file",
        str(auth_file),
        name,
        stdin_text="password\n",
    )

    assert_user_error(result, message)


def test_republish_after_head_rejected(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0

    result = run_cairn(
        "events", "republish", "--data-dir", str(data_dir), "--from", "5"
    )

    assert_user_error(result, "cairn events republish: position 5 is after ")


# ---- two `cairn serve` processes on one data directory ------------------------


@dataclass
class EmbeddedServe:
    """A `cairn serve` subprocess that starts its embedded nats-server."""

    process: subprocess.Popen[str]
    url: str

    def stop(self) -> int:
        """Send SIGTERM to the process by its PID and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=START_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return status


def start_embedded_serve(data_dir: Path, log_path: Path) -> EmbeddedServe:
    command = [sys.executable, "-m", "engine.cli", "--log-format", "json", "serve"]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [*command, "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            cwd=REPOSITORY_ROOT,
            env=_environment(),
            text=True,
        )
    assert process.stdout is not None
    url = None
    for line in process.stdout:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if match:
            url = match.group(1)
            break
    if url is None:
        process.wait(timeout=START_TIMEOUT_S)
        raise RuntimeError(f"cairn serve exited early; see {log_path}")

    # cairn serve prints its address once the socket is bound, but accepts
    # connections only after the bus has started.
    try:
        wait_until(lambda: answers(url), timeout=START_TIMEOUT_S)
    except AssertionError:
        process.kill()
        process.wait(timeout=START_TIMEOUT_S)
        raise
    return EmbeddedServe(process, url)


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def bus_health(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/_cairn/health", timeout=10)
    assert response.status_code == 200, response.text
    bus: dict[str, Any] = response.json()["bus"]
    return bus


def caught_up(health: dict[str, Any]) -> dict[str, Any] | None:
    """Return ``health`` once the relay has published every logged event."""
    if health["state"] == "caught_up" and health["log_head"]:
        return health
    return None


def test_second_serve_rejects_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start_embedded_serve(data_dir, tmp_path / "first.log")
    try:
        nats_url = bus_health(first.url)["nats_url"]
        assert nats_url.startswith("nats://127.0.0.1:")

        second = run_cairn(
            "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"
        )

        assert second.status == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert len(second.messages) == 1, second.stderr
        message = second.messages[0]
        assert message.startswith("cairn: cannot start the embedded NATS server: ")
        assert f"{data_dir / 'nats'} is in use" in message
        assert f"PID {first.process.pid}" in message
        assert f"--nats {nats_url}" in message
        assert "--no-nats" in message
        assert second.logged_error("bus_start_failed") is not None
        # A server that never served must not print that it listens.
        assert "listening on" not in second.stdout
        assert "server_started" not in [line.get("event") for line in second.log_events]

        assert first.process.poll() is None
        with httpx.Client(base_url=first.url, timeout=30) as client:
            push_blob(client, "library/app", b"pushed after the second serve failed")
        health = wait_until(lambda: caught_up(bus_health(first.url)))
        assert health is not None
        assert health["nats_url"] == nats_url
        assert health["checkpoint"] == 1
        assert health["last_error"] is None
    finally:
        status = first.stop()
    assert status == 0
    assert "Traceback" not in (tmp_path / "first.log").read_text()


def test_gc_runs_with_maximum_durations(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    upgrade = run_cairn("db", "upgrade", "--data-dir", data_dir)
    assert upgrade.status == 0, upgrade.stderr

    result = run_cairn(
        "gc",
        "--data-dir",
        data_dir,
        "--unlink-unreferenced",
        "--grace-period=153722867",
        "--upload-expiry=2562047",
    )

    assert result.status == 0, result.stderr
    assert "Traceback" not in result.stderr

    result = run_cairn("gc", "--data-dir", data_dir, "--upload-expiry=1e20")

    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "invalid duration '1e20'" in result.stderr


@pytest.mark.parametrize(
    ("args", "command", "unrecognized"),
    [
        (["gc", "--dryrun"], "gc", "--dryrun"),
        (["gc", "extra"], "gc", "extra"),
        (["verify", "--bogus"], "verify", "--bogus"),
        (["db", "upgrade", "--bogus"], "db upgrade", "--bogus"),
        (
            ["serve", "--no-nats", "--listen-port", "5000"],
            "serve",
            "--listen-port 5000",
        ),
    ],
)
def test_unknown_argument_shows_command_usage(
    tmp_path: Path, args: list[str], command: str, unrecognized: str
) -> None:
    result = run_cairn(*args, "--data-dir", str(tmp_path / "data"))

    assert result.status == 2
    assert result.stderr.startswith(f"usage: cairn {command} [-h]")
    assert f"cairn {command}: error: unrecognized arguments: {unrecognized}" in (
        result.stderr
    )
    assert not (tmp_path / "data").exists()
