"""Tags: the digest each tag points to now, and every digest it ever did."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import Projection
from engine.tables import tag_history, tags


class TagProjection(Projection):
    name = "tags"
    tables = (tags,)
    handles = frozenset({EventType.TAG_SET, EventType.TAG_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        tag = event.payload["tag"]
        conn.execute(
            sa.delete(tags).where(
                (tags.c.repository == event.repository) & (tags.c.tag == tag)
            )
        )
        if event.type is EventType.TAG_DELETED:
            return
        conn.execute(
            sa.insert(tags).values(
                repository=event.repository,
                tag=tag,
                digest=event.payload["digest"],
                position=event.position,
                updated_at=event.time,
            )
        )


class TagHistoryProjection(Projection):
    """One row per stretch of log positions during which a tag kept a digest."""

    name = "tag_history"
    tables = (tag_history,)
    handles = frozenset({EventType.TAG_SET, EventType.TAG_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        tag = event.payload["tag"]
        conn.execute(
            sa.update(tag_history)
            .where(
                (tag_history.c.repository == event.repository)
                & (tag_history.c.tag == tag)
                & tag_history.c.to_position.is_(None)
            )
            .values(to_position=event.position, to_time=event.time)
        )
        if event.type is EventType.TAG_DELETED:
            return
        conn.execute(
            sa.insert(tag_history).values(
                repository=event.repository,
                tag=tag,
                from_position=event.position,
                digest=event.payload["digest"],
                from_time=event.time,
                actor_user=event.actor.user,
            )
        )
