"""Manifests each repository holds, and the referrers index over subjects."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.prepared import Prepared
from engine.projections.base import FoldEvent, FoldRows, Projection, rows_by_key
from engine.tables import manifests, referrers

_DELETE_MANIFEST = Prepared(
    sa.delete(manifests).where(
        (manifests.c.repository == sa.bindparam("b_repository"))
        & (manifests.c.digest == sa.bindparam("b_digest"))
    )
)
_INSERT_MANIFEST = Prepared(sa.insert(manifests))
_DELETE_REFERRER = Prepared(
    sa.delete(referrers).where(
        (referrers.c.repository == sa.bindparam("b_repository"))
        & (referrers.c.digest == sa.bindparam("b_digest"))
    )
)
_INSERT_REFERRER = Prepared(sa.insert(referrers))


_MANIFEST_COLUMNS = (
    "repository",
    "digest",
    "media_type",
    "size",
    "artifact_type",
    "subject",
    "references",
    "position",
    "pushed_at",
)
_REFERRER_COLUMNS = (
    "repository",
    "subject",
    "digest",
    "media_type",
    "artifact_type",
    "size",
    "annotations",
    "position",
)


def _manifest_values(
    repository: str, position: int, moment: Any, payload: dict[str, Any]
) -> tuple[Any, ...]:
    """Return a manifests row as values in ``_MANIFEST_COLUMNS`` order."""
    return (
        repository,
        payload["digest"],
        payload["media_type"],
        payload["size"],
        payload.get("artifact_type"),
        payload.get("subject"),
        payload["references"],
        position,
        moment,
    )


def _referrer_values(
    repository: str, position: int, payload: dict[str, Any]
) -> tuple[Any, ...]:
    """Return a referrers row as values in ``_REFERRER_COLUMNS`` order."""
    return (
        repository,
        payload["subject"],
        payload["digest"],
        payload["media_type"],
        payload.get("artifact_type"),
        payload["size"],
        payload.get("annotations"),
        position,
    )


def _manifest_row(event: StoredEvent) -> dict[str, Any]:
    values = _manifest_values(
        event.repository, event.position, event.time, event.payload
    )
    return dict(zip(_MANIFEST_COLUMNS, values, strict=True))


def _referrer_row(event: StoredEvent) -> dict[str, Any]:
    values = _referrer_values(event.repository, event.position, event.payload)
    return dict(zip(_REFERRER_COLUMNS, values, strict=True))


class ManifestProjection(Projection):
    name = "manifests"
    tables = (manifests,)
    handles = frozenset({EventType.MANIFEST_PUSHED, EventType.MANIFEST_DELETED})

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        # The registry appends manifest.pushed only for a manifest that the
        # repository does not hold, so there is no row to replace.
        if event.type is EventType.MANIFEST_PUSHED:
            _INSERT_MANIFEST.execute(conn, _manifest_row(event))
            return
        key = {"b_repository": event.repository, "b_digest": event.payload["digest"]}
        _DELETE_MANIFEST.execute(conn, key)

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        # state maps a repository to its manifests: digest -> row.
        deleted = EventType.MANIFEST_DELETED
        for position, repository, event_type, moment, _user, payload in events:
            digest = payload["digest"]
            repository_manifests = state.get(repository)
            if repository_manifests is None:
                repository_manifests = state[repository] = {}
            if event_type is deleted:
                repository_manifests.pop(digest, None)
            else:
                row = _manifest_values(repository, position, moment, payload)
                repository_manifests[digest] = row

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        yield FoldRows(manifests, _MANIFEST_COLUMNS, rows_by_key(state))


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
                _INSERT_REFERRER.execute(conn, _referrer_row(event))
            return
        key = {"b_repository": event.repository, "b_digest": payload["digest"]}
        _DELETE_REFERRER.execute(conn, key)

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        deleted = EventType.MANIFEST_DELETED
        for position, repository, event_type, _moment, _user, payload in events:
            if event_type is deleted:
                state.pop((repository, payload["digest"]), None)
            elif payload.get("subject"):
                key = (repository, payload["digest"])
                state[key] = _referrer_values(repository, position, payload)

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        # Each row starts with its primary key (repository, subject, digest),
        # so sorting the rows puts them in key order.
        yield FoldRows(referrers, _REFERRER_COLUMNS, sorted(state.values()))
