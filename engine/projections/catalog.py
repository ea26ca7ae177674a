"""The catalog: every repository that has at least one event."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import FoldEvent, Projection
from engine.tables import repositories

# Statements are built once: constructing one costs far more than running it.
_TOUCH = (
    sa.update(repositories)
    .where(repositories.c.name == sa.bindparam("b_name"))
    .values(
        updated_position=sa.bindparam("b_position"), updated_at=sa.bindparam("b_time")
    )
)
_INSERT = sa.insert(repositories)


class CatalogProjection(Projection):
    name = "catalog"
    tables = (repositories,)
    handles = frozenset(EventType)

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        touched = {
            "b_name": event.repository,
            "b_position": event.position,
            "b_time": event.time,
        }
        if not conn.execute(_TOUCH, touched).rowcount:
            conn.execute(
                _INSERT,
                {
                    "name": event.repository,
                    "created_position": event.position,
                    "created_at": event.time,
                    "updated_position": event.position,
                    "updated_at": event.time,
                },
            )

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        row = state.get(event.repository)
        if row is None:
            state[event.repository] = {
                "name": event.repository,
                "created_position": event.position,
                "created_at": event.time,
                "updated_position": event.position,
                "updated_at": event.time,
            }
        else:
            row["updated_position"] = event.position
            row["updated_at"] = event.time

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.values():
            yield repositories, row
