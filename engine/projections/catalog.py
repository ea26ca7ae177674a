"""The catalog: every repository that has at least one event."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import Projection
from engine.tables import repositories


class CatalogProjection(Projection):
    name = "catalog"
    tables = (repositories,)
    handles = frozenset(EventType)

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        updated = conn.execute(
            sa.update(repositories)
            .where(repositories.c.name == event.repository)
            .values(updated_position=event.position, updated_at=event.time)
        ).rowcount
        if not updated:
            conn.execute(
                sa.insert(repositories).values(
                    name=event.repository,
                    created_position=event.position,
                    created_at=event.time,
                    updated_position=event.position,
                    updated_at=event.time,
                )
            )
