"""Store blob_links, tags and tag_history as WITHOUT ROWID tables on SQLite.

A rowid table keeps each row in one B-tree and its primary key in a second
one. WITHOUT ROWID keeps only the primary key's B-tree, with the rows in it,
so an insert writes one tree instead of two. With the 1,000,000 events of
bench/rebuild.py the three tables and their indexes took 224 MB instead of
284 MB, most of the difference blob_links' primary key index, and a rebuild
writes that much less. manifests and referrers, whose rows carry JSON,
stay rowid tables: converting them as well left that database 47 MB larger
than converting these three, and its rebuild slower. PostgreSQL has no such
option, and this revision changes nothing there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("blob_links", "tags", "tag_history")


def upgrade() -> None:
    _recreate(with_rowid=False)


def downgrade() -> None:
    _recreate(with_rowid=True)


def _recreate(*, with_rowid: bool) -> None:
    """Copy each table into a new one with or without a rowid. Alembic's batch
    mode creates the new table, copies the rows, drops the old table, renames
    the new one and creates the indexes again."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in _TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_with_rowid": with_rowid}
        ):
            pass
