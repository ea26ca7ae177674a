"""Create the event log, content, upload and projection tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.tables import JSONDocument, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("time", UTCDateTime, nullable=False),
        sa.Column("actor_user", sa.String(255)),
        sa.Column("actor_address", sa.String(255)),
        sa.Column("request_id", sa.String(64)),
        sa.Column("payload", JSONDocument, nullable=False),
        sa.Column("previous_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("id", name="uq_events_id"),
        sa.UniqueConstraint(
            "repository", "version", name="uq_events_repository_version"
        ),
    )
    op.create_index("ix_events_type_position", "events", ["type", "position"])
    op.create_index("ix_events_time", "events", ["time"])

    op.create_table(
        "log_head",
        sa.Column("id", sa.Integer, autoincrement=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_log_head"),
    )
    op.bulk_insert(
        sa.table(
            "log_head",
            sa.column("id", sa.Integer),
            sa.column("position", sa.BigInteger),
            sa.column("hash", sa.String),
        ),
        [{"id": 1, "position": 0, "hash": "0" * 64}],
    )

    op.create_table(
        "streams",
        sa.Column("repository", sa.String(255)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("repository", name="pk_streams"),
    )

    op.create_table(
        "manifest_contents",
        sa.Column("digest", sa.String(140)),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_manifest_contents"),
    )

    op.create_table(
        "uploads",
        sa.Column("id", sa.String(36)),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_uploads"),
    )

    op.create_table(
        "repositories",
        sa.Column("name", sa.String(255)),
        sa.Column("created_position", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("last_actor", sa.String(255)),
        sa.Column("tag_count", sa.Integer, nullable=False),
        sa.Column("manifest_count", sa.Integer, nullable=False),
        sa.Column("blob_bytes", sa.BigInteger, nullable=False),
        sa.Column("pushed_bytes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_repositories"),
    )

    op.create_table(
        "tags",
        sa.Column("repository", sa.String(255)),
        sa.Column("tag", sa.String(128)),
        sa.Column("digest", sa.String(140), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("repository", "tag", name="pk_tags"),
    )
    op.create_index("ix_tags_repository_digest", "tags", ["repository", "digest"])

    op.create_table(
        "manifests",
        sa.Column("repository", sa.String(255)),
        sa.Column("digest", sa.String(140)),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("artifact_type", sa.String(255)),
        sa.Column("subject", sa.String(140)),
        sa.Column("references", JSONDocument, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("pushed_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("repository", "digest", name="pk_manifests"),
    )
    op.create_index("ix_manifests_position", "manifests", ["position"])

    op.create_table(
        "blob_links",
        sa.Column("repository", sa.String(255)),
        sa.Column("digest", sa.String(140)),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("linked_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("repository", "digest", name="pk_blob_links"),
    )
    op.create_index("ix_blob_links_digest", "blob_links", ["digest"])

    op.create_table(
        "referrers",
        sa.Column("repository", sa.String(255)),
        sa.Column("subject", sa.String(140)),
        sa.Column("digest", sa.String(140)),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("artifact_type", sa.String(255)),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("annotations", JSONDocument),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("repository", "subject", "digest", name="pk_referrers"),
    )

    op.create_table(
        "tag_history",
        sa.Column("repository", sa.String(255)),
        sa.Column("tag", sa.String(128)),
        sa.Column("from_position", sa.BigInteger),
        sa.Column("digest", sa.String(140), nullable=False),
        sa.Column("from_time", UTCDateTime, nullable=False),
        sa.Column("to_position", sa.BigInteger),
        sa.Column("to_time", UTCDateTime),
        sa.Column("actor_user", sa.String(255)),
        sa.PrimaryKeyConstraint(
            "repository", "tag", "from_position", name="pk_tag_history"
        ),
    )

    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(64)),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_projection_checkpoints"),
    )

    op.create_table(
        "relay_checkpoints",
        sa.Column("name", sa.String(64)),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_relay_checkpoints"),
    )


def downgrade() -> None:
    for table in (
        "relay_checkpoints",
        "projection_checkpoints",
        "tag_history",
        "referrers",
        "blob_links",
        "manifests",
        "tags",
        "repositories",
        "uploads",
        "manifest_contents",
        "streams",
        "log_head",
        "events",
    ):
        op.drop_table(table)
