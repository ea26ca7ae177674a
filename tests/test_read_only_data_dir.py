"""`cairn verify` and `cairn gc --dry-run` on a data directory that their user
may only read: another account's directory, a backup copy or a read-only
mount. They must check it without writing to it, and stop with one
`cairn: ...` line where SQLite cannot read it without writing.

The unwritable directories are tested as the user nobody, so these tests
run only as root.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.migrate import head_revision
from engine.sqlite_read_only import ReadOnlySqlite, SqliteChanged
from tests.images import make_image
from tests.server import ServeProcess, push_blob, push_image, start_serve
from tests.test_cli_errors import Result, assert_storage_error, run_cairn

READ_ONLY_COMMANDS = {
    "verify": ["verify"],
    "gc-dry-run": ["gc", "--dry-run", "--grace-period", "0"],
}
EXPECTED_OUTPUT = {
    "verify": "log, blobs and projections verified: no problems found\n",
    "gc-dry-run": (
        "dry run: would remove 0 blob file(s), 0 staging file(s), 0 expired "
        "upload session(s) and 0 empty blob directory(ies), freeing 0 bytes\n"
    ),
}


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory that the user nobody can enter, unlike pytest's own."""
    if os.geteuid() != 0:
        pytest.skip("only root can make files that another user may only read")
    root = Path(tempfile.mkdtemp(prefix="cairn-read-only-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root)


def serve(data_dir: Path) -> ServeProcess:
    """Start `cairn serve` on the SQLite database that ``data_dir`` contains."""
    data_dir.mkdir(exist_ok=True)
    return start_serve(
        data_dir,
        f"sqlite:///{data_dir / 'cairn.db'}",
        data_dir.parent / "serve.log",
    )


def push_content(served: ServeProcess) -> None:
    with httpx.Client(base_url=served.url) as client:
        push_image(client, "demo/app", make_image(), tag="v1")
        push_blob(client, "demo/blobs", b"abc")


def populate(data_dir: Path) -> None:
    """Push content through `cairn serve` on ``data_dir``, then stop it."""
    served = serve(data_dir)
    try:
        push_content(served)
    finally:
        assert served.stop() == 0


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Map every path under ``directory`` to its size and mtime."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in [directory, *directory.rglob("*")]
    }


def run_read_only(command: str, data_dir: Path) -> Result:
    return run_cairn(
        *READ_ONLY_COMMANDS[command], "--data-dir", str(data_dir), unprivileged=True
    )


def lock(data_dir: Path) -> None:
    """Let other users read ``data_dir`` and nothing more."""
    for path in [data_dir, *data_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def assert_no_problems(result: Result, command: str) -> None:
    """Assert that ``command`` succeeded, found no problems and wrote no messages."""
    assert result.status == 0, result.stderr
    assert result.stdout == EXPECTED_OUTPUT[command]
    assert result.messages == []


@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_unwritable_data_dir_checked(command: str, shared_root: Path) -> None:
    data_dir = shared_root / "data"
    populate(data_dir)
    lock(data_dir)
    before = listing(data_dir)

    result = run_read_only(command, data_dir)

    assert_no_problems(result, command)
    events = [event.get("event") for event in result.log_events]
    assert "direct_io_unavailable" not in events
    assert listing(data_dir) == before


def test_unwritable_data_dir_verified_while_served(shared_root: Path) -> None:
    # The pushes are in cairn.db-wal, not yet in cairn.db. A reader that
    # ignores the write-ahead log would find the log short and the blob
    # files unlinked.
    data_dir = shared_root / "data"
    served = serve(data_dir)
    try:
        push_content(served)
        assert (data_dir / "cairn.db-wal").stat().st_size > 0
        data_dir.chmod(0o555)

        result = run_read_only("verify", data_dir)
    finally:
        data_dir.chmod(0o755)
        assert served.stop() == 0

    assert_no_problems(result, "verify")


def test_unwritable_data_dir_damage_reported(shared_root: Path) -> None:
    data_dir = shared_root / "data"
    populate(data_dir)
    with sqlite3.connect(data_dir / "cairn.db") as conn:
        conn.execute("DELETE FROM tags")
    conn.close()
    lock(data_dir)
    before = listing(data_dir)

    result = run_read_only("verify", data_dir)

    assert result.status == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(
        "problem: projection tags: replay produces row ('demo/app', 'v1', "
    ), lines[0]
    assert lines[0].endswith("missing live"), lines[0]
    assert lines[1] == "1 problem(s) found"
    assert result.messages == []
    assert listing(data_dir) == before


@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_copy_with_wal_but_no_shm_rejected(command: str, shared_root: Path) -> None:
    # A copy made while cairn serve ran, without the -shm file.
    data_dir = shared_root / "data"
    copy = shared_root / "copy"
    served = serve(data_dir)
    try:
        push_content(served)
        shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("cairn.db-shm"))
    finally:
        assert served.stop() == 0
    assert (copy / "cairn.db-wal").stat().st_size > 0
    lock(copy)
    before = listing(copy)

    result = run_read_only(command, copy)

    assert_storage_error(
        result,
        f"cannot use data directory {copy}: not writable, and SQLite can read "
        "the changes in cairn.db-wal only by creating cairn.db-shm there",
    )
    assert listing(copy) == before


@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_outdated_schema_not_upgraded(command: str, shared_root: Path) -> None:
    data_dir = shared_root / "data"
    assert run_cairn("db", "upgrade", "--data-dir", str(data_dir)).status == 0
    with sqlite3.connect(data_dir / "cairn.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0008'")
    conn.close()
    lock(data_dir)

    result = run_read_only(command, data_dir)

    assert_storage_error(
        result,
        f"cannot use database sqlite:///{data_dir}/cairn.db: its schema is at "
        f"revision 0008, older than this cairn's newest, {head_revision()}, and "
        "a command that only reads does not upgrade it",
    )


@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_read_only_mount_checked(command: str, shared_root: Path) -> None:
    data_dir = shared_root / "data"
    populate(data_dir)
    mount_point = shared_root / "mounted"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(data_dir), str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount: {mounted.stderr.strip()}")
    try:
        assert not os.access(mount_point, os.W_OK)
        result = run_cairn(*READ_ONLY_COMMANDS[command], "--data-dir", str(mount_point))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)

    assert_no_problems(result, command)


def test_immutable_read_detects_change(tmp_path: Path) -> None:
    path = tmp_path / "cairn.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
    conn.close()
    opened = ReadOnlySqlite.inspect(path)
    assert opened.immutable
    opened.check_unchanged()

    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()

    with pytest.raises(SqliteChanged):
        opened.check_unchanged()
