"""Keep the media type and size of each tag history entry's manifest.

The query API's past tag views joined tag_history to the manifests
projection, which loses a manifest's row when the manifest is deleted, so
those views showed null for both. Each entry now stores the values that the
manifest had when the tag was set. The upgrade fills them from the log as a
rebuild would: from the last manifest.pushed of the digest in the
repository before the tag.set, unless a manifest.deleted came after it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from engine.tables import JSONDocument

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_PAGE_SIZE = 10_000
_TYPES = ("manifest.pushed", "manifest.deleted", "tag.set")

_events = sa.table(
    "events",
    sa.column("position", sa.BigInteger),
    sa.column("repository", sa.String),
    sa.column("type", sa.String),
    sa.column("payload", JSONDocument),
)
_tag_history = sa.table(
    "tag_history",
    sa.column("repository", sa.String),
    sa.column("tag", sa.String),
    sa.column("from_position", sa.BigInteger),
    sa.column("media_type", sa.String),
    sa.column("size", sa.BigInteger),
)
_FILL = (
    sa.update(_tag_history)
    .where(
        (_tag_history.c.repository == sa.bindparam("b_repository"))
        & (_tag_history.c.tag == sa.bindparam("b_tag"))
        & (_tag_history.c.from_position == sa.bindparam("b_position"))
    )
    .values(media_type=sa.bindparam("b_media_type"), size=sa.bindparam("b_size"))
)


def upgrade() -> None:
    # SQLite's ALTER TABLE ADD COLUMN keeps the table WITHOUT ROWID.
    op.add_column("tag_history", sa.Column("media_type", sa.String(255)))
    op.add_column("tag_history", sa.Column("size", sa.BigInteger))
    _fill(op.get_bind())


def _fill(conn: sa.Connection) -> None:
    """Set media_type and size on every row whose manifest the log names."""
    held: dict[tuple[str, str], tuple[str, int]] = {}
    updates: list[dict[str, Any]] = []
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_events)
            .where((_events.c.position > after) & _events.c.type.in_(_TYPES))
            .order_by(_events.c.position)
            .limit(_PAGE_SIZE)
        ).all()
        for row in rows:
            key = (row.repository, row.payload["digest"])
            if row.type == "manifest.pushed":
                held[key] = (row.payload["media_type"], row.payload["size"])
            elif row.type == "manifest.deleted":
                held.pop(key, None)
            elif key in held:
                media_type, size = held[key]
                updates.append(
                    {
                        "b_repository": row.repository,
                        "b_tag": row.payload["tag"],
                        "b_position": row.position,
                        "b_media_type": media_type,
                        "b_size": size,
                    }
                )
        if len(updates) >= _PAGE_SIZE or (updates and len(rows) < _PAGE_SIZE):
            conn.execute(_FILL, updates)
            updates = []
        if len(rows) < _PAGE_SIZE:
            break
        after = rows[-1].position


def downgrade() -> None:
    # SQLite 3.35 and later drop a column in place, without copying the table.
    op.drop_column("tag_history", "size")
    op.drop_column("tag_history", "media_type")
