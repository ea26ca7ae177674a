"""Run the alembic migrations that define cairn's schema."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from engine.db import Database
from engine.tables import metadata

log = structlog.get_logger(__name__)

# An arbitrary constant: PostgreSQL advisory lock key that makes concurrent
# `cairn serve` start-ups run the migrations one at a time.
_MIGRATION_LOCK_KEY = 0x636169726E  # "cairn"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(database: Database) -> str | None:
    with database.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class UnknownRevision(Exception):
    """A database schema at a revision that this cairn's migrations do not
    contain, such as one that a newer cairn upgraded."""

    def __init__(self, revision: str, newest: str | None) -> None:
        super().__init__(revision, newest)
        self.revision = revision
        self.newest = newest


class NoSchema(Exception):
    """A database that contains no cairn schema at all."""


class ForeignTables(Exception):
    """A database without cairn's schema whose tables have the names of
    tables that cairn would create."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


class OutdatedSchema(Exception):
    """A database schema at an older revision than this cairn's newest."""

    def __init__(self, revision: str, newest: str | None) -> None:
        super().__init__(revision, newest)
        self.revision = revision
        self.newest = newest


def check_schema(database: Database) -> None:
    """Raise unless the database schema is at this cairn's newest revision,
    without writing to the database.

    Raises NoSchema for a database without cairn's schema, UnknownRevision
    for a revision that this cairn does not know, and OutdatedSchema for an
    older one, which `cairn db upgrade` brings up to date.
    """
    script = ScriptDirectory.from_config(_config())
    # Not database.read(), whose first statement on PostgreSQL locks the
    # projection tables, which a database without the schema lacks.
    with database.engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = {script_revision.revision for script_revision in script.walk_revisions()}
    newest = script.get_current_head()
    if current is None:
        raise NoSchema()
    if current not in known:
        raise UnknownRevision(current, newest)
    if current != newest:
        raise OutdatedSchema(current, newest)


def upgrade(
    database: Database, revision: str = "head", *, create: bool = True
) -> tuple[str | None, str | None]:
    """Bring the database schema up to ``revision``; return the revisions
    before and after, None for a database without cairn's schema.

    Raises UnknownRevision for a schema at a revision that this cairn does
    not know. For a database without cairn's schema it raises NoSchema
    unless ``create`` is true, and ForeignTables when the database already
    has tables with the names of cairn's.
    """
    config = _config()
    script = ScriptDirectory.from_config(config)
    with database.engine.begin() as conn:
        if not database.is_sqlite:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        # Read under the lock: a process that waited for another's upgrade
        # finds the new revision and logs nothing.
        before = MigrationContext.configure(conn).get_current_revision()
        known = {
            script_revision.revision for script_revision in script.walk_revisions()
        }
        if before is not None and before not in known:
            raise UnknownRevision(before, script.get_current_head())
        if before is None and not create:
            raise NoSchema()
        if before is None:
            # Creating the schema would fail on the first of these, deep
            # inside a migration.
            existing = set(sa.inspect(conn).get_table_names())
            clashing = sorted(existing & set(metadata.tables))
            if clashing:
                raise ForeignTables(clashing)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    after = current_revision(database)
    if before != after:
        log.info("schema_upgraded", from_revision=before, to_revision=after)
    return before, after
