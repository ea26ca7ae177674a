"""Index the tag history by tag in byte order on PostgreSQL.

The tags at a log position compare and sort tag names with COLLATE "C"
(engine.tables.bytewise), as the present tag list does since 0008. The
primary key (repository, tag, from_position) is in the database's
collation, so without this index each page read and sorted every history
row of the repository. SQLite already compares bytes and gets no index.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_INDEX = "ix_tag_history_repository_tag_bytes"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"CREATE INDEX {_INDEX} "
        'ON tag_history (repository, (tag COLLATE "C"), from_position)'
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP INDEX {_INDEX}")
