"""Index tags and repository names in byte order on PostgreSQL.

The tag list and the catalog compare and sort names with COLLATE "C"
(engine.tables.bytewise), because a database created with an English
locale sorts by that locale, which the OCI tag order does not allow. The
primary keys are in the database's collation, so without these indexes
each page of a listing read and sorted every tag of the repository, or
every repository. SQLite already compares bytes and gets no index.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TAGS_INDEX = "ix_tags_repository_tag_bytes"
_REPOSITORIES_INDEX = "ix_repositories_name_bytes"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f'CREATE INDEX {_TAGS_INDEX} ON tags (repository, (tag COLLATE "C"))')
    op.execute(
        f'CREATE INDEX {_REPOSITORIES_INDEX} ON repositories ((name COLLATE "C"))'
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP INDEX {_REPOSITORIES_INDEX}")
    op.execute(f"DROP INDEX {_TAGS_INDEX}")
