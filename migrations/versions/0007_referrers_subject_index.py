"""Index referrers by subject and position.

The referrers API reads one page of a subject's referrers at a time, in
log order, after the position of the previous page's last one. With only
the primary key (repository, subject, digest), each page read and sorted
every referrer of the subject.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEX = "ix_referrers_repository_subject_position"


def upgrade() -> None:
    op.create_index(_INDEX, "referrers", ["repository", "subject", "position"])


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="referrers")
