"""The alembic migrations and engine/tables.py describe the same schema, and
the command-line tools for the schema and projections work."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine.db import Database, sqlite_url
from engine.domain.digest import Digest
from engine.identity import load_registry_id
from engine.migrate import _config, current_revision, head_revision, upgrade
from engine.registry import Registry
from engine.tables import BYTE_ORDER_INDEXES, metadata
from tests.conftest import ADMIN_URL, reset_postgres
from tests.images import make_image


def _not_byte_order_index(
    name: str | None, kind: str, parent_names: dict[str, str | None]
) -> bool:
    return not (kind == "index" and name in BYTE_ORDER_INDEXES)


def test_migrations_match_table_definitions(database_url: str) -> None:
    database = Database(database_url)
    with database.engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={"compare_type": True, "include_name": _not_byte_order_index},
        )
        differences = compare_metadata(context, metadata)
    database.dispose()
    assert differences == []


def test_byte_order_indexes_on_postgresql(database_url: str) -> None:
    database = Database(database_url)
    query = "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE '%_bytes'"
    if database.engine.dialect.name != "postgresql":
        database.dispose()
        pytest.skip("SQLite compares text by its bytes and has no such index")
    with database.read() as conn:
        definitions = {
            name: definition for name, definition in conn.execute(sa.text(query))
        }
    database.dispose()
    assert set(definitions) == BYTE_ORDER_INDEXES
    for definition in definitions.values():
        assert 'COLLATE "C"' in definition


def sqlite_schema(database: Database) -> dict[str, str]:
    """Return the CREATE statement of every table and index, by name."""
    query = "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"
    with database.read() as conn:
        return {name: sql for name, sql in conn.execute(sa.text(query)).all()}


def tables_without_rowid(database: Database) -> set[str]:
    return {
        name
        for name, sql in sqlite_schema(database).items()
        if sql.startswith("CREATE TABLE") and sql.rstrip().endswith("WITHOUT ROWID")
    }


def test_migrations_match_sqlite_rowid_option(tmp_path: Path) -> None:
    """compare_metadata does not compare WITHOUT ROWID, so this test does."""
    database = Database(sqlite_url(tmp_path))
    upgrade(database)
    expected = {
        table.name
        for table in metadata.sorted_tables
        if not table.dialect_options["sqlite"]["with_rowid"]
    }
    assert tables_without_rowid(database) == expected
    assert {"blob_links", "tags", "tag_history"} <= expected
    database.dispose()


def test_without_rowid_migration_keeps_rows(tmp_path: Path) -> None:
    registry = Registry.open(tmp_path / "data")
    upgrade(registry.database)
    image = make_image()
    repo = registry.repository("app")
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    repo.manifests.put(image.manifest, tag="v1")
    repo.tags.tag("v2", image.digest)
    repo.tags.untag("v1")
    database = registry.database
    tables = ("blob_links", "tags", "tag_history")

    # Revision 0006 adds these columns to tag_history, and its upgrade fills
    # them from the log again.
    later_columns = {"media_type", "size"}

    def rows() -> dict[str, list[dict[str, object]]]:
        found: dict[str, list[dict[str, object]]] = {}
        with database.read() as conn:
            for table in tables:
                query = sa.text(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
                found[table] = [dict(row._mapping) for row in conn.execute(query)]
        return found

    def without_later_columns(
        found: dict[str, list[dict[str, object]]],
    ) -> dict[str, list[dict[str, object]]]:
        stripped = dict(found)
        stripped["tag_history"] = [
            {name: value for name, value in row.items() if name not in later_columns}
            for row in found["tag_history"]
        ]
        return stripped

    before = rows()
    schema = sqlite_schema(database)
    assert all(before.values())

    config = _config()
    with database.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    assert tables_without_rowid(database).isdisjoint(tables)
    assert rows() == without_later_columns(before)

    upgrade(database)
    assert set(tables) <= tables_without_rowid(database)
    assert rows() == before
    assert sqlite_schema(database) == schema
    database.dispose()


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


@contextmanager
def role_url(postgres_url: str, privileges: str) -> Iterator[str]:
    """Create a role that has ``privileges`` on every cairn table and owns
    none, and return the URL of ``postgres_url`` as that role. The role is
    dropped at the end."""
    role = f"cairn_test_role_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(
            f'GRANT {privileges} ON ALL TABLES IN SCHEMA public TO "{role}"'
        )
    try:
        yield (
            sa.make_url(postgres_url)
            .set(username=role, password=None)
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


@pytest.fixture
def reader_url(postgres_url: str) -> Iterator[str]:
    """Return the run's PostgreSQL database, emptied, as a new role that may
    only read cairn's tables."""
    reset_postgres(postgres_url)
    with role_url(postgres_url, "SELECT") as url:
        yield url


def test_verify_as_role_that_only_reads(
    tmp_path: Path, postgres_url: str, reader_url: str
) -> None:
    data_dir = tmp_path / "data"
    registry = Registry.open(data_dir, postgres_url)
    image = make_image()
    repo = registry.repository("reader")
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    repo.manifests.put(image.manifest, tag="latest")
    # reset_postgres emptied the row that migrations write.
    load_registry_id(registry.database)
    verify = ("verify", "--data-dir", str(data_dir), "--database", reader_url)

    verified = cairn(*verify)
    with registry.database.transaction() as conn:
        conn.exec_driver_sql("DELETE FROM tags")
    drifted = cairn(*verify)
    registry.database.dispose()

    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert drifted.returncode == 1, drifted.stdout + drifted.stderr
    assert "projection tags:" in drifted.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ("serve", "--no-nats", "--listen", "127.0.0.1:0"),
            "lacks the INSERT privilege on table events",
        ),
        (("gc",), "lacks the INSERT privilege on table events"),
        (("projections", "rebuild"), "permission denied for table"),
    ],
)
def test_writing_command_as_reader_stops(
    tmp_path: Path,
    postgres_url: str,
    reader_url: str,
    command: tuple[str, ...],
    expected: str,
) -> None:
    data_dir = tmp_path / "data"
    registry = Registry.open(data_dir, postgres_url)
    load_registry_id(registry.database)
    registry.database.dispose()

    result = cairn(*command, "--data-dir", str(data_dir), "--database", reader_url)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"cairn: cannot use database {reader_url}: ")
    assert expected in line


SORT_INDEXES = (
    "ix_repositories_blob_bytes_name_bytes",
    "ix_repositories_pushed_bytes_name_bytes",
    "ix_repositories_tag_count_name_bytes",
)


def test_rebuild_by_role_not_owner_stops(tmp_path: Path, postgres_url: str) -> None:
    reset_postgres(postgres_url)
    data_dir = tmp_path / "data"
    registry = Registry.open(data_dir, postgres_url)
    load_registry_id(registry.database)
    registry.database.dispose()

    with role_url(postgres_url, "SELECT, INSERT, UPDATE, DELETE") as url:
        result = cairn(
            "projections", "rebuild", "--data-dir", str(data_dir), "--database", url
        )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "must be owner of" in line
    assert "run the command as the database user that owns cairn's tables" in line


def test_upgrade_adds_sort_indexes_missing_at_0009(postgres_url: str) -> None:
    # A database that an earlier 0009, without these indexes, upgraded.
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        for index in SORT_INDEXES:
            conn.exec_driver_sql(f"DROP INDEX {index}")
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0009'")
    database = Database(postgres_url)

    upgrade(database)

    with engine.connect() as conn:
        present = set(
            conn.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'repositories'"
            ).scalars()
        )
    assert present >= set(SORT_INDEXES)
    assert current_revision(database) == head_revision()
    database.dispose()
    engine.dispose()


def test_generation_migration_keeps_checkpoints(tmp_path: Path) -> None:
    database = Database(sqlite_url(tmp_path))
    upgrade(database, "0003")
    with database.transaction() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO relay_checkpoints (name, position, updated_at) "
                "VALUES ('CAIRN', 12, '2026-12-01 00:00:00')"
            )
        )

    upgrade(database, "0004")
    with database.read() as conn:
        upgraded = conn.execute(
            sa.text("SELECT name, position, generation FROM relay_checkpoints")
        ).all()
    assert [tuple(row) for row in upgraded] == [("CAIRN", 12, 0)]

    config = _config()
    with database.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    with database.read() as conn:
        downgraded = conn.execute(sa.text("SELECT * FROM relay_checkpoints")).all()
    assert [tuple(row)[:2] for row in downgraded] == [("CAIRN", 12)]
    assert len(downgraded[0]) == 3
    database.dispose()


def test_concurrent_upgrades_report_once() -> None:
    """Two start-ups on one new PostgreSQL database: one migrates, and the
    other, which waited for its lock, finds the schema current."""
    if ADMIN_URL == "skip":
        pytest.skip("CAIRN_TEST_POSTGRES_URL=skip")
    name = f"cairn_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(ADMIN_URL).set(database=name)
    databases = [Database(url.render_as_string(hide_password=False)) for _ in "ab"]
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(upgrade, databases))
    finally:
        for database in databases:
            database.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    head = head_revision()
    assert results.count((None, head)) == 1
    assert results.count((head, head)) == 1
