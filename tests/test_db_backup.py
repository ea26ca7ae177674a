"""`cairn db backup`: a copy of a SQLite database in use, and its restore."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import log as event_log
from engine.db import SQLITE_FILE
from engine.identity import DATA_DIR_ID_FILE, bind_data_dir
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import make_image
from tests.test_registry import push_image
from tests.test_schema import cairn


def log_head(registry: Registry) -> int:
    """Return the position of the last event in ``registry``'s log."""
    with registry.database.read() as conn:
        position, _ = event_log.head(conn)
    return int(position)


@pytest.fixture
def in_use(tmp_path: Path) -> Iterator[Registry]:
    """Return a SQLite registry with three tags whose last commits are
    still in its write-ahead log, open as cairn serve would hold it."""
    registry = Registry.open(tmp_path / "data", None)
    upgrade(registry.database)
    bind_data_dir(tmp_path / "data", registry.registry_id(), adopt=True, require=False)
    repository = registry.repository("library/app")
    for tag in ("v1", "v2", "v3"):
        push_image(repository, make_image(), tag)
    try:
        yield registry
    finally:
        registry.database.dispose()


def test_backup_restores_every_commit(tmp_path: Path, in_use: Registry) -> None:
    data_dir = tmp_path / "data"
    wal = data_dir / f"{SQLITE_FILE}-wal"
    assert wal.stat().st_size > 0
    backup = tmp_path / "backup.db"
    head = log_head(in_use)

    result = cairn("db", "backup", str(backup), "--data-dir", str(data_dir))

    assert result.returncode == 0, result.stderr
    assert f"up to log position {head}" in result.stdout
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copyfile(backup, restored / SQLITE_FILE)
    shutil.copytree(data_dir / "blobs", restored / "blobs")
    shutil.copyfile(data_dir / DATA_DIR_ID_FILE, restored / DATA_DIR_ID_FILE)
    verified = cairn("verify", "--data-dir", str(restored))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    copy = Registry.open(restored, None)
    try:
        assert log_head(copy) == head
        assert copy.repository("library/app").tags.list() == ["v1", "v2", "v3"]
    finally:
        copy.database.dispose()


def test_backup_never_replaces_file(tmp_path: Path, in_use: Registry) -> None:
    backup = tmp_path / "backup.db"
    backup.write_bytes(b"an earlier backup")

    result = cairn("db", "backup", str(backup), "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"cairn db backup: {backup} exists; name a new file, because a backup "
        "never replaces one"
    )
    assert backup.read_bytes() == b"an earlier backup"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backup.db", "data"]


def test_backup_keeps_dangling_link(tmp_path: Path, in_use: Registry) -> None:
    backup = tmp_path / "backup.db"
    backup.symlink_to(tmp_path / "nowhere")

    result = cairn("db", "backup", str(backup), "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 1
    assert f"{backup} exists" in result.stderr
    assert backup.is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_backup_rejects_empty_name(tmp_path: Path, in_use: Registry) -> None:
    result = cairn("db", "backup", "", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert "an empty name names no file" in result.stderr


def test_backup_of_postgresql_names_pg_dump(tmp_path: Path, postgres_url: str) -> None:
    Registry.open(tmp_path / "data", postgres_url).database.dispose()
    backup = tmp_path / "backup.db"

    result = cairn(
        "db",
        "backup",
        str(backup),
        "--data-dir",
        str(tmp_path / "data"),
        "--database",
        postgres_url,
    )

    assert result.returncode == 2
    assert "pg_dump -Fc -f FILE DATABASE" in result.stderr
    assert not backup.exists()
