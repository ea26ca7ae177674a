"""The alembic migrations and engine/tables.py describe the same schema, and
the command-line tools for the schema and projections work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine.db import Database
from engine.domain.digest import Digest
from engine.migrate import current_revision, head_revision, upgrade
from engine.registry import Registry
from engine.tables import metadata
from tests.images import make_image


def test_migrations_match_table_definitions(database_url: str) -> None:
    database = Database(database_url)
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    database.dispose()
    assert differences == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)
    assert current_revision(database) == head_revision()
    database.dispose()


def cairn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_upgrade_rebuild_verify(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "cli-data"
    storage = ["--data-dir", str(data_dir)]
    if not database_url.startswith("sqlite"):
        storage += ["--database", database_url]
    upgraded = cairn("db", "upgrade", *storage)
    assert upgraded.returncode == 0, upgraded.stderr

    registry = Registry.open(
        data_dir, None if database_url.startswith("sqlite") else database_url
    )
    image = make_image()
    repo = registry.repository("cli")
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    repo.manifests.put(image.manifest, tag="latest")

    rebuilt = cairn("projections", "rebuild", *storage)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "up to position 4" in rebuilt.stdout

    verified = cairn("verify", *storage)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    with registry.database.transaction() as conn:
        conn.execute(sa.text("UPDATE events SET payload = '{}' WHERE position = 1"))
    broken = cairn("verify", *storage)
    assert broken.returncode == 1
    assert "position 1" in broken.stdout
    registry.database.dispose()
