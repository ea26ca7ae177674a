"""Add a generation to relay_checkpoints, the fencing token of its writes.

Each relay that becomes the leader, and each `cairn events republish`,
increments the generation of the relay's row. A relay writes the row only
while it still has the generation that the relay read when it was elected.
So a relay that lost its leader lock without noticing yet cannot undo a
reset or the progress of the next leader. Existing rows start at 0.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("relay_checkpoints", recreate=_recreate()) as batch:
        batch.add_column(
            sa.Column("generation", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("relay_checkpoints", recreate=_recreate()) as batch:
        batch.drop_column("generation")


def _recreate() -> str:
    """Copy the table on SQLite in both directions, and alter it elsewhere.

    Alembic's batch mode drops a column on SQLite by copying the table, and
    after the copy SQLite stores the table's CREATE statement with the name
    quoted. Copying on upgrade too keeps that statement the same whether a
    database reached this revision directly or through a downgrade and an
    upgrade.
    """
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"
