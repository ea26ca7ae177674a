"""Create the repository sort indexes of 0009 where 0009 did not.

Revision 0009 first created only the byte-order index of the tag history,
and later also the indexes on (column, name COLLATE "C") that keep each
page of the repository listing by size, pushed size or tag count an index
range scan. A PostgreSQL database that an earlier cairn upgraded to 0009
lacks those three, so this revision creates each one that is missing.
SQLite gets none, as in 0009.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Sort column -> index on (column, name COLLATE "C"), as in 0009.
_SORT_INDEXES = {
    "blob_bytes": "ix_repositories_blob_bytes_name_bytes",
    "pushed_bytes": "ix_repositories_pushed_bytes_name_bytes",
    "tag_count": "ix_repositories_tag_count_name_bytes",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column, index in _SORT_INDEXES.items():
        op.execute(
            f"CREATE INDEX IF NOT EXISTS {index} "
            f'ON repositories ({column}, (name COLLATE "C"))'
        )


def downgrade() -> None:
    # 0009's downgrade drops the indexes, which 0009 now creates.
    pass
