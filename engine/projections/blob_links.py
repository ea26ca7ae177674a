"""Blob links: which blobs each repository may read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.prepared import Prepared
from engine.projections.base import FoldEvent, FoldRows, Projection, rows_by_key
from engine.tables import blob_links

_DELETE = Prepared(
    sa.delete(blob_links).where(
        (blob_links.c.repository == sa.bindparam("b_repository"))
        & (blob_links.c.digest == sa.bindparam("b_digest"))
    )
)
_INSERT = Prepared(sa.insert(blob_links))
_COLUMNS = ("repository", "digest", "size", "position", "linked_at")


class BlobLinkProjection(Projection):
    name = "blob_links"
    tables = (blob_links,)
    handles = frozenset(
        {EventType.BLOB_PUSHED, EventType.BLOB_MOUNTED, EventType.BLOB_DELETED}
    )

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        digest = event.payload["digest"]
        _DELETE.execute(conn, {"b_repository": event.repository, "b_digest": digest})
        if event.type is EventType.BLOB_DELETED:
            return
        _INSERT.execute(
            conn,
            {
                "repository": event.repository,
                "digest": digest,
                "size": event.payload["size"],
                "position": event.position,
                "linked_at": event.time,
            },
        )

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        # state maps a repository to its links: digest -> row.
        deleted = EventType.BLOB_DELETED
        for position, repository, event_type, moment, _user, payload in events:
            digest = payload["digest"]
            links = state.get(repository)
            if links is None:
                links = state[repository] = {}
            if event_type is deleted:
                links.pop(digest, None)
            else:
                links[digest] = (repository, digest, payload["size"], position, moment)

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        yield FoldRows(blob_links, _COLUMNS, rows_by_key(state))
