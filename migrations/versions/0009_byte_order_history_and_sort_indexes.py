"""Index the tag history and the repository sorts in byte order on PostgreSQL.

The tags at a log position compare and sort tag names with COLLATE "C"
(engine.tables.bytewise), as the present tag list does since 0008, and
the repository listing by size, pushed size or tag count breaks ties by
name with COLLATE "C". The primary key of tag_history and the indexes
(column, name) are in the database's collation, so without these indexes
each page read and sorted every history row of the repository, or every
repository with the sort value of the cursor. SQLite already compares
bytes and gets no index.

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

_TAG_HISTORY_INDEX = "ix_tag_history_repository_tag_bytes"
# Sort column -> index on (column, name COLLATE "C").
_SORT_INDEXES = {
    "blob_bytes": "ix_repositories_blob_bytes_name_bytes",
    "pushed_bytes": "ix_repositories_pushed_bytes_name_bytes",
    "tag_count": "ix_repositories_tag_count_name_bytes",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"CREATE INDEX {_TAG_HISTORY_INDEX} "
        'ON tag_history (repository, (tag COLLATE "C"), from_position)'
    )
    for column, index in _SORT_INDEXES.items():
        op.execute(
            f'CREATE INDEX {index} ON repositories ({column}, (name COLLATE "C"))'
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for index in _SORT_INDEXES.values():
        op.execute(f"DROP INDEX {index}")
    op.execute(f"DROP INDEX {_TAG_HISTORY_INDEX}")
