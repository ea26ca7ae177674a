"""Add registry_identity: one row with a random id for the registry.

The id is generated here, once per database, and served at
/_cairn/registry. `cairn mirror` compares the ids of its source and target
to reject a mirror into its own source, which two different URLs for one
registry would otherwise hide.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_identity",
        sa.Column("id", sa.Integer, autoincrement=False),
        sa.Column("registry_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registry_identity"),
    )
    op.bulk_insert(
        sa.table(
            "registry_identity",
            sa.column("id", sa.Integer),
            sa.column("registry_id", sa.String),
        ),
        [{"id": 1, "registry_id": str(uuid.uuid4())}],
    )


def downgrade() -> None:
    op.drop_table("registry_identity")
