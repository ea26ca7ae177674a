"""The registry id: a random UUID that distinguishes one registry from another.

Migration 0005 creates it. Every server on the same database reports the
same id, and a copy of the database made with a backup reports it too.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from engine.db import Database
from engine.tables import registry_identity

_SELECT = sa.select(registry_identity.c.registry_id).where(registry_identity.c.id == 1)


def load_registry_id(database: Database) -> str:
    """Return the registry id, creating it if its row is missing.

    The row is missing only when someone emptied the table. Concurrent
    servers then race to insert it, and all of them read the winner's id.
    """
    with database.read() as conn:
        stored = conn.execute(_SELECT).scalar_one_or_none()
    if stored is not None:
        return str(stored)
    dialect = sqlite if database.is_sqlite else postgresql
    insert = (
        dialect.insert(registry_identity)
        .values(id=1, registry_id=str(uuid.uuid4()))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    with database.transaction() as conn:
        conn.execute(insert)
    with database.read() as conn:
        return str(conn.execute(_SELECT).scalar_one())
