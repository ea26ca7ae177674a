"""Tags: the digest each tag points to now, and every digest it ever did."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import FoldEvent, Projection
from engine.tables import tag_history, tags

_DELETE_TAG = sa.delete(tags).where(
    (tags.c.repository == sa.bindparam("b_repository"))
    & (tags.c.tag == sa.bindparam("b_tag"))
)
_INSERT_TAG = sa.insert(tags)
_CLOSE_HISTORY = (
    sa.update(tag_history)
    .where(
        (tag_history.c.repository == sa.bindparam("b_repository"))
        & (tag_history.c.tag == sa.bindparam("b_tag"))
        & tag_history.c.to_position.is_(None)
    )
    .values(to_position=sa.bindparam("b_position"), to_time=sa.bindparam("b_time"))
)
_INSERT_HISTORY = sa.insert(tag_history)


def _is_new_tag(event: StoredEvent) -> bool:
    """Return True for a tag.set whose tag pointed nowhere before it: it has
    no row to replace and no history row to close."""
    payload = event.payload
    return (
        event.type is EventType.TAG_SET
        and "previous" in payload
        and payload["previous"] is None
    )


class TagProjection(Projection):
    name = "tags"
    tables = (tags,)
    handles = frozenset({EventType.TAG_SET, EventType.TAG_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        tag = event.payload["tag"]
        if not _is_new_tag(event):
            conn.execute(_DELETE_TAG, {"b_repository": event.repository, "b_tag": tag})
        if event.type is EventType.TAG_DELETED:
            return
        conn.execute(
            _INSERT_TAG,
            {
                "repository": event.repository,
                "tag": tag,
                "digest": event.payload["digest"],
                "position": event.position,
                "updated_at": event.time,
            },
        )

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        key = (event.repository, event.payload["tag"])
        state.pop(key, None)
        if event.type is EventType.TAG_DELETED:
            return
        state[key] = {
            "repository": event.repository,
            "tag": key[1],
            "digest": event.payload["digest"],
            "position": event.position,
            "updated_at": event.time,
        }

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.values():
            yield tags, row


class TagHistoryProjection(Projection):
    """One row per stretch of log positions during which a tag kept a digest."""

    name = "tag_history"
    tables = (tag_history,)
    handles = frozenset({EventType.TAG_SET, EventType.TAG_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        tag = event.payload["tag"]
        if not _is_new_tag(event):
            conn.execute(
                _CLOSE_HISTORY,
                {
                    "b_repository": event.repository,
                    "b_tag": tag,
                    "b_position": event.position,
                    "b_time": event.time,
                },
            )
        if event.type is EventType.TAG_DELETED:
            return
        conn.execute(
            _INSERT_HISTORY,
            {
                "repository": event.repository,
                "tag": tag,
                "from_position": event.position,
                "digest": event.payload["digest"],
                "from_time": event.time,
                "to_position": None,
                "to_time": None,
                "actor_user": event.actor.user,
            },
        )

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        # state["closed"] collects finished rows; state["open"] maps each tag
        # to the row that is still open.
        closed: list[dict[str, Any]] = state.setdefault("closed", [])
        open_rows: dict[tuple[str, str], dict[str, Any]] = state.setdefault("open", {})
        key = (event.repository, event.payload["tag"])
        current = open_rows.pop(key, None)
        if current is not None:
            current["to_position"] = event.position
            current["to_time"] = event.time
            closed.append(current)
        if event.type is EventType.TAG_DELETED:
            return
        open_rows[key] = {
            "repository": event.repository,
            "tag": key[1],
            "from_position": event.position,
            "digest": event.payload["digest"],
            "from_time": event.time,
            "to_position": None,
            "to_time": None,
            "actor_user": event.actor_user,
        }

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.get("closed", []):
            yield tag_history, row
        for row in state.get("open", {}).values():
            yield tag_history, row
