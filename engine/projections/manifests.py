"""Manifests each repository holds, and the referrers index over subjects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import FoldEvent, Projection
from engine.tables import manifests, referrers

_DELETE_MANIFEST = sa.delete(manifests).where(
    (manifests.c.repository == sa.bindparam("b_repository"))
    & (manifests.c.digest == sa.bindparam("b_digest"))
)
_INSERT_MANIFEST = sa.insert(manifests)
_DELETE_REFERRER = sa.delete(referrers).where(
    (referrers.c.repository == sa.bindparam("b_repository"))
    & (referrers.c.digest == sa.bindparam("b_digest"))
)
_INSERT_REFERRER = sa.insert(referrers)


def _manifest_row(event: StoredEvent | FoldEvent) -> dict[str, Any]:
    payload = event.payload
    return {
        "repository": event.repository,
        "digest": payload["digest"],
        "media_type": payload["media_type"],
        "size": payload["size"],
        "artifact_type": payload.get("artifact_type"),
        "subject": payload.get("subject"),
        "references": payload["references"],
        "position": event.position,
        "pushed_at": event.time,
    }


def _referrer_row(event: StoredEvent | FoldEvent) -> dict[str, Any]:
    payload = event.payload
    return {
        "repository": event.repository,
        "subject": payload["subject"],
        "digest": payload["digest"],
        "media_type": payload["media_type"],
        "artifact_type": payload.get("artifact_type"),
        "size": payload["size"],
        "annotations": payload.get("annotations"),
        "position": event.position,
    }


class ManifestProjection(Projection):
    name = "manifests"
    tables = (manifests,)
    handles = frozenset({EventType.MANIFEST_PUSHED, EventType.MANIFEST_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        # The registry appends manifest.pushed only for a manifest that the
        # repository does not hold, so there is no row to replace.
        if event.type is EventType.MANIFEST_PUSHED:
            conn.execute(_INSERT_MANIFEST, _manifest_row(event))
            return
        key = {"b_repository": event.repository, "b_digest": event.payload["digest"]}
        conn.execute(_DELETE_MANIFEST, key)

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        payload = event.payload
        key = (event.repository, payload["digest"])
        state.pop(key, None)
        if event.type is EventType.MANIFEST_DELETED:
            return
        state[key] = _manifest_row(event)

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.values():
            yield manifests, row


class ReferrerProjection(Projection):
    """Subject digest -> the manifests that name it as their subject.

    The subject need not exist in the repository: the OCI distribution spec
    lets a referrer be pushed before, or without, the manifest it refers to.
    """

    name = "referrers"
    tables = (referrers,)
    handles = frozenset({EventType.MANIFEST_PUSHED, EventType.MANIFEST_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        payload = event.payload
        if event.type is EventType.MANIFEST_PUSHED:
            # As for manifests, a pushed manifest has no row yet.
            if payload.get("subject"):
                conn.execute(_INSERT_REFERRER, _referrer_row(event))
            return
        key = {"b_repository": event.repository, "b_digest": payload["digest"]}
        conn.execute(_DELETE_REFERRER, key)

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        payload = event.payload
        key = (event.repository, payload["digest"])
        state.pop(key, None)
        if event.type is EventType.MANIFEST_DELETED or not payload.get("subject"):
            return
        state[key] = _referrer_row(event)

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for row in state.values():
            yield referrers, row
