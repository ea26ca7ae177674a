"""Blob links: which blobs each repository may read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import FoldEvent, Projection
from engine.tables import blob_links

_DELETE = sa.delete(blob_links).where(
    (blob_links.c.repository == sa.bindparam("b_repository"))
    & (blob_links.c.digest == sa.bindparam("b_digest"))
)
_INSERT = sa.insert(blob_links)


class BlobLinkProjection(Projection):
    name = "blob_links"
    tables = (blob_links,)
    handles = frozenset(
        {EventType.BLOB_PUSHED, EventType.BLOB_MOUNTED, EventType.BLOB_DELETED}
    )

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        digest = event.payload["digest"]
        conn.execute(_DELETE, {"b_repository": event.repository, "b_digest": digest})
        if event.type is EventType.BLOB_DELETED:
            return
        conn.execute(
            _INSERT,
            {
                "repository": event.repository,
                "digest": digest,
                "size": event.payload["size"],
                "position": event.position,
                "linked_at": event.time,
            },
        )

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        key = (event.repository, event.payload["digest"])
        state.pop(key, None)
        if event.type is EventType.BLOB_DELETED:
            return
        state[key] = {
            "repository": event.repository,
            "digest": key[1],
            "size": event.payload["size"],
            "position": event.position,
            "linked_at": event.time,
        }

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.values():
            yield blob_links, row
