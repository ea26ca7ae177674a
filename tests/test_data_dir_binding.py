"""A data directory's registry-id file binds it to one registry's database.

gc removes the blob files that the database does not link, so gc on a data
directory with another registry's database would remove that registry's
blobs. The registry-id file that `cairn serve` writes prevents that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from engine.db import normalise_url, sqlite_url
from engine.domain.digest import Digest
from engine.identity import DATA_DIR_ID_FILE, bind_data_dir
from engine.migrate import upgrade
from engine.registry import Registry
from tests.server import start_serve

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def cairn(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY_ROOT,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def other_registry(data_dir: Path) -> tuple[Registry, Path]:
    """Open a second registry with its own SQLite database in ``data_dir``,
    bound to it as cairn serve binds it, holding one blob."""
    data_dir.mkdir()
    registry = Registry.open(data_dir, sqlite_url(data_dir))
    upgrade(registry.database)
    bind_data_dir(data_dir, registry.registry_id(), adopt=True, require=False)
    data = os.urandom(500)
    digest = Digest.of(data)
    registry.repository("other/app").blobs.push(digest, [data])
    return registry, registry.blob_store.path(digest)


def _unbound_data_dir(tmp_path: Path, database_url: str) -> tuple[Path, list[str]]:
    """Make another registry's data directory without its registry-id file;
    return its blob's path and the storage options that pair it with
    ``database_url``."""
    other, blob_path = other_registry(tmp_path / "other")
    other.database.dispose()
    (tmp_path / "other" / DATA_DIR_ID_FILE).unlink()
    return blob_path, [
        "--data-dir",
        str(tmp_path / "other"),
        "--database",
        database_url,
    ]


def test_serve_records_registry_id(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "served"
    served = start_serve(data_dir, database_url, tmp_path / "serve.log")
    try:
        registry_id = httpx.get(f"{served.url}/_cairn/registry").json()["registry_id"]
        assert served.stop() == 0
    finally:
        served.kill()

    recorded = (data_dir / DATA_DIR_ID_FILE).read_text()
    assert recorded == registry_id + "\n"


def test_gc_rejects_other_registry_data_dir(
    registry: Registry, tmp_path: Path, database_url: str
) -> None:
    other, blob_path = other_registry(tmp_path / "other")
    other.database.dispose()
    other_dir = str(tmp_path / "other")

    result = cairn(
        "gc", "--data-dir", other_dir, "--database", database_url, "--grace-period", "0"
    )

    assert result.returncode == 1
    assert f"data directory {other_dir} contains the blobs of registry" in result.stderr
    assert f"but the database is registry {registry.registry_id()}" in result.stderr
    assert blob_path.exists()


def test_serve_rejects_other_registry_data_dir(
    registry: Registry, tmp_path: Path, database_url: str
) -> None:
    other, _ = other_registry(tmp_path / "other")
    other.database.dispose()

    result = cairn(
        "serve",
        "--data-dir",
        str(tmp_path / "other"),
        "--database",
        database_url,
        "--listen",
        "127.0.0.1:0",
        "--no-nats",
    )

    assert result.returncode == 1
    assert "point --data-dir and --database at the same registry" in result.stderr


def test_gc_requires_id_file_beside_blobs(
    registry: Registry, tmp_path: Path, database_url: str
) -> None:
    # A data directory from before registry-id files, or another
    # registry's that was never bound.
    blob_path, storage = _unbound_data_dir(tmp_path, database_url)

    result = cairn("gc", *storage, "--grace-period", "0")

    assert result.returncode == 1
    assert f"has no {DATA_DIR_ID_FILE} file" in result.stderr
    assert blob_path.exists()
    # A dry run is refused too: its list would be another registry's files.
    dry_run = cairn("gc", *storage, "--grace-period", "0", "--dry-run")
    assert dry_run.returncode == 1


def test_gc_on_default_sqlite_records_id(tmp_path: Path) -> None:
    data_dir = tmp_path / "plain"
    other, blob_path = other_registry(data_dir)
    registry_id = other.registry_id()
    other.database.dispose()
    (data_dir / DATA_DIR_ID_FILE).unlink()

    # The default database lives in the data directory, so they belong
    # together.
    result = cairn("gc", "--data-dir", str(data_dir), "--grace-period", "0")

    assert result.returncode == 0, result.stderr
    assert (data_dir / DATA_DIR_ID_FILE).read_text() == registry_id + "\n"
    assert blob_path.exists()


def test_gc_dry_run_default_sqlite(tmp_path: Path) -> None:
    data_dir = tmp_path / "plain"
    other, blob_path = other_registry(data_dir)
    other.database.dispose()
    (data_dir / DATA_DIR_ID_FILE).unlink()

    # The real run accepts this directory (above), so the dry run that
    # previews it must accept it too, and write nothing.
    result = cairn(
        "gc", "--data-dir", str(data_dir), "--grace-period", "0", "--dry-run"
    )

    assert result.returncode == 0, result.stderr
    assert not (data_dir / DATA_DIR_ID_FILE).exists()
    assert blob_path.exists()


def test_serve_rejects_unlinked_blob_dir(
    registry: Registry, tmp_path: Path, database_url: str
) -> None:
    # As if --database named a new registry's database by mistake.
    blob_path, storage = _unbound_data_dir(tmp_path, database_url)

    result = cairn("serve", *storage, "--listen", "127.0.0.1:0", "--no-nats")

    assert result.returncode == 1
    assert "the database links none of the 1 blob files" in result.stderr
    assert not (tmp_path / "other" / DATA_DIR_ID_FILE).exists()
    gc = cairn("gc", *storage, "--grace-period", "0")
    assert gc.returncode == 1
    assert blob_path.exists()


def test_serve_adopts_linked_blob_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "linked"
    other, blob_path = other_registry(data_dir)
    registry_id = other.registry_id()
    other.database.dispose()
    # A data directory from before registry-id files, with an explicit
    # --database that links its blob.
    (data_dir / DATA_DIR_ID_FILE).unlink()

    bound = Registry.open(data_dir, sqlite_url(data_dir))
    try:
        bind_data_dir(
            data_dir,
            bound.registry_id(),
            adopt=True,
            require=False,
            database=bound.database,
        )
    finally:
        bound.database.dispose()

    assert (data_dir / DATA_DIR_ID_FILE).read_text() == registry_id + "\n"
    assert blob_path.exists()


def _bound_data_dir(tmp_path: Path) -> Path:
    """A data directory bound to a registry of its own, with one blob."""
    other, _ = other_registry(tmp_path / "bound")
    other.database.dispose()
    return tmp_path / "bound"


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--listen", "127.0.0.1:0", "--no-nats"],
        ["db", "upgrade"],
    ],
    ids=["serve", "db-upgrade"],
)
def test_bound_dir_schemaless_database_untouched(
    tmp_path: Path, empty_database_url: str, command: list[str]
) -> None:
    data_dir = _bound_data_dir(tmp_path)
    registry_id = (data_dir / DATA_DIR_ID_FILE).read_text().strip()

    result = cairn(
        *command, "--data-dir", str(data_dir), "--database", empty_database_url
    )

    assert result.returncode == 1
    assert f"contains the blobs of registry {registry_id}" in result.stderr
    assert "has no cairn schema" in result.stderr
    engine = sa.create_engine(normalise_url(empty_database_url))
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--listen", "127.0.0.1:0", "--no-nats"],
        ["db", "upgrade"],
        ["verify"],
    ],
    ids=["serve", "db-upgrade", "verify"],
)
def test_bound_dir_without_database_untouched(
    tmp_path: Path, command: list[str]
) -> None:
    # The data directory of a registry whose database is elsewhere, such as
    # PostgreSQL: its registry-id file, but no cairn.db.
    data_dir = _bound_data_dir(tmp_path)
    registry_id = (data_dir / DATA_DIR_ID_FILE).read_text().strip()
    (data_dir / "cairn.db").unlink()

    result = cairn(*command, "--data-dir", str(data_dir))

    assert result.returncode == 1
    assert f"contains the blobs of registry {registry_id}" in result.stderr
    assert "no database was given" in result.stderr
    assert "--database or CAIRN_DATABASE_URL" in result.stderr
    assert sorted(path.name for path in data_dir.iterdir()) == [
        "blobs",
        DATA_DIR_ID_FILE,
        "uploads",
    ]


def test_missing_sqlite_file_not_created(tmp_path: Path) -> None:
    data_dir = _bound_data_dir(tmp_path)
    typo = tmp_path / "typo.db"
    database = f"sqlite:///{typo}"

    served = cairn(
        "serve",
        "--data-dir",
        str(data_dir),
        "--database",
        database,
        "--listen",
        "127.0.0.1:0",
        "--no-nats",
    )
    verified = cairn("verify", "--data-dir", str(data_dir), "--database", database)

    assert served.returncode == 1
    assert "has no cairn schema" in served.stderr
    assert verified.returncode == 1
    assert f"{typo} does not exist" in verified.stderr
    assert not typo.exists()
