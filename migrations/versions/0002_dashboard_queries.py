"""Add the activity projection and the indexes the dashboard queries use.

The activity tables are filled from the events already in the log, so an
upgraded database equals one rebuilt from scratch.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from engine.tables import JSONDocument, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_PAGE_SIZE = 10_000
_UPLOAD_TYPES = frozenset({"blob.pushed", "manifest.pushed"})

_INDEXES = (
    ("ix_events_repository_position", "events", ["repository", "position"]),
    ("ix_events_actor_user_position", "events", ["actor_user", "position"]),
    ("ix_events_actor_address_position", "events", ["actor_address", "position"]),
    ("ix_repositories_blob_bytes_name", "repositories", ["blob_bytes", "name"]),
    ("ix_repositories_pushed_bytes_name", "repositories", ["pushed_bytes", "name"]),
    ("ix_repositories_tag_count_name", "repositories", ["tag_count", "name"]),
    ("ix_repositories_updated_position", "repositories", ["updated_position"]),
    ("ix_tags_repository_position", "tags", ["repository", "position"]),
    ("ix_manifests_repository_position", "manifests", ["repository", "position"]),
    ("ix_referrers_repository_position", "referrers", ["repository", "position"]),
)

_events = sa.table(
    "events",
    sa.column("position", sa.BigInteger),
    sa.column("repository", sa.String),
    sa.column("type", sa.String),
    sa.column("time", UTCDateTime),
    sa.column("payload", JSONDocument),
)
_activity = sa.table(
    "activity",
    sa.column("hour", sa.Integer),
    sa.column("type", sa.String),
    sa.column("events", sa.BigInteger),
    sa.column("bytes", sa.BigInteger),
)
_repository_activity = sa.table(
    "repository_activity",
    sa.column("repository", sa.String),
    sa.column("hour", sa.Integer),
    sa.column("type", sa.String),
    sa.column("events", sa.BigInteger),
    sa.column("bytes", sa.BigInteger),
)
_checkpoints = sa.table(
    "projection_checkpoints",
    sa.column("name", sa.String),
    sa.column("position", sa.BigInteger),
)


def upgrade() -> None:
    # WITHOUT ROWID on SQLite stores rows in key order: a range of hours is
    # read sequentially. PostgreSQL ignores the option.
    op.create_table(
        "activity",
        sa.Column("hour", sa.Integer, autoincrement=False),
        sa.Column("type", sa.String(32)),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("hour", "type", name="pk_activity"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "repository_activity",
        sa.Column("hour", sa.Integer, autoincrement=False),
        sa.Column("repository", sa.String(255)),
        sa.Column("type", sa.String(32)),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "hour", "repository", "type", name="pk_repository_activity"
        ),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_repository_activity_repository_hour",
        "repository_activity",
        ["repository", "hour"],
    )
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)
    _fill_activity(op.get_bind())


def _hour(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return calendar.timegm(moment.utctimetuple()) // 3600


def _fill_activity(conn: sa.Connection) -> None:
    """Fold the existing log into the activity tables, as a rebuild would."""
    overall: dict[tuple[int, str], list[int]] = {}
    per_repository: dict[tuple[str, int, str], list[int]] = {}
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_events)
            .where(_events.c.position > after)
            .order_by(_events.c.position)
            .limit(_PAGE_SIZE)
        ).all()
        for row in rows:
            hour = _hour(row.time)
            size = int(row.payload["size"]) if row.type in _UPLOAD_TYPES else 0
            for totals in (
                overall.setdefault((hour, row.type), [0, 0]),
                per_repository.setdefault((row.repository, hour, row.type), [0, 0]),
            ):
                totals[0] += 1
                totals[1] += size
        if len(rows) < _PAGE_SIZE:
            break
        after = rows[-1].position
    if not overall:
        return

    _insert(
        conn,
        _activity,
        [
            {"hour": hour, "type": kind, "events": events, "bytes": size}
            for (hour, kind), (events, size) in overall.items()
        ],
    )
    _insert(
        conn,
        _repository_activity,
        [
            {
                "repository": repository,
                "hour": hour,
                "type": kind,
                "events": events,
                "bytes": size,
            }
            for (repository, hour, kind), (events, size) in per_repository.items()
        ],
    )
    head = conn.execute(sa.text("SELECT position FROM log_head WHERE id = 1"))
    conn.execute(
        sa.insert(_checkpoints).values(name="activity", position=head.scalar_one())
    )


def _insert(conn: sa.Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), _PAGE_SIZE):
        conn.execute(sa.insert(table), rows[start : start + _PAGE_SIZE])


def downgrade() -> None:
    for name, table, _ in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
    op.drop_index(
        "ix_repository_activity_repository_hour", table_name="repository_activity"
    )
    op.drop_table("repository_activity")
    op.drop_table("activity")
    op.execute(sa.delete(_checkpoints).where(_checkpoints.c.name == "activity"))
