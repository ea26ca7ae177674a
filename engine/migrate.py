"""Run the alembic migrations that define cairn's schema."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from engine.db import Database

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


def upgrade(
    database: Database, revision: str = "head"
) -> tuple[str | None, str | None]:
    """Bring the database schema up to ``revision``; return the revisions
    before and after, None for a database without cairn's schema."""
    config = _config()
    with database.engine.begin() as conn:
        if not database.is_sqlite:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        # Read under the lock: a process that waited for another's upgrade
        # finds the new revision and logs nothing.
        before = MigrationContext.configure(conn).get_current_revision()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    after = current_revision(database)
    if before != after:
        log.info("schema_upgraded", from_revision=before, to_revision=after)
    return before, after
