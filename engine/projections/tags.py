"""Tags: the digest each tag points to now, and every digest it ever did."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.prepared import Prepared
from engine.projections.base import FoldEvent, FoldRows, Projection, rows_by_key
from engine.tables import manifests, tag_history, tags

_DELETE_TAG = Prepared(
    sa.delete(tags).where(
        (tags.c.repository == sa.bindparam("b_repository"))
        & (tags.c.tag == sa.bindparam("b_tag"))
    )
)
_INSERT_TAG = Prepared(sa.insert(tags))
_CLOSE_HISTORY = Prepared(
    sa.update(tag_history)
    .where(
        (tag_history.c.repository == sa.bindparam("b_repository"))
        & (tag_history.c.tag == sa.bindparam("b_tag"))
        & tag_history.c.to_position.is_(None)
    )
    .values(to_position=sa.bindparam("b_position"), to_time=sa.bindparam("b_time"))
)
_INSERT_HISTORY = Prepared(sa.insert(tag_history))
_MANIFEST_FACTS = Prepared(
    sa.select(manifests.c.media_type, manifests.c.size).where(
        (manifests.c.repository == sa.bindparam("b_repository"))
        & (manifests.c.digest == sa.bindparam("b_digest"))
    )
)
_MANIFEST_EVENTS = frozenset({EventType.MANIFEST_PUSHED, EventType.MANIFEST_DELETED})
_TAG_COLUMNS = ("repository", "tag", "digest", "position", "updated_at")
_HISTORY_COLUMNS = (
    "repository",
    "tag",
    "from_position",
    "digest",
    "from_time",
    "to_position",
    "to_time",
    "actor_user",
    "media_type",
    "size",
)
# An open row leaves to_position and to_time NULL.
_OPEN_HISTORY_COLUMNS = tuple(
    name for name in _HISTORY_COLUMNS if name not in ("to_position", "to_time")
)


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
            _DELETE_TAG.execute(conn, {"b_repository": event.repository, "b_tag": tag})
        if event.type is EventType.TAG_DELETED:
            return
        _INSERT_TAG.execute(
            conn,
            {
                "repository": event.repository,
                "tag": tag,
                "digest": event.payload["digest"],
                "position": event.position,
                "updated_at": event.time,
            },
        )

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        # state maps a repository to its tags: tag -> row.
        deleted = EventType.TAG_DELETED
        for position, repository, event_type, moment, _user, payload in events:
            tag = payload["tag"]
            repository_tags = state.get(repository)
            if repository_tags is None:
                repository_tags = state[repository] = {}
            if event_type is deleted:
                repository_tags.pop(tag, None)
            else:
                repository_tags[tag] = (
                    repository,
                    tag,
                    payload["digest"],
                    position,
                    moment,
                )

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        yield FoldRows(tags, _TAG_COLUMNS, rows_by_key(state))


class TagHistoryProjection(Projection):
    """One row per stretch of log positions during which a tag kept a digest,
    with the media type and size of the manifest it pointed to."""

    name = "tag_history"
    tables = (tag_history,)
    handles = frozenset({EventType.TAG_SET, EventType.TAG_DELETED}) | _MANIFEST_EVENTS

    def apply_all(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        # The manifest facts of a tag.set come from the manifest events that
        # precede it in this append and otherwise from the manifests table,
        # which contains the manifests of every earlier append. The table can
        # also reflect a manifest.deleted later in this append if
        # ManifestProjection ran first, but no command deletes a manifest
        # after setting a tag to it in one append.
        facts: dict[str, tuple[str, int] | None] = {}
        for event in events:
            if event.type is EventType.MANIFEST_PUSHED:
                payload = event.payload
                facts[payload["digest"]] = (payload["media_type"], payload["size"])
            elif event.type is EventType.MANIFEST_DELETED:
                facts[event.payload["digest"]] = None
            else:
                self._apply_tag(conn, event, facts)

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        self.apply_all(conn, [event])

    def _apply_tag(
        self,
        conn: Connection,
        event: StoredEvent,
        facts: dict[str, tuple[str, int] | None],
    ) -> None:
        tag = event.payload["tag"]
        if not _is_new_tag(event):
            _CLOSE_HISTORY.execute(
                conn,
                {
                    "b_repository": event.repository,
                    "b_tag": tag,
                    "b_position": event.position,
                    "b_time": event.time,
                },
            )
        if event.type is EventType.TAG_DELETED:
            return
        digest = event.payload["digest"]
        if digest in facts:
            manifest = facts[digest]
        else:
            row = _MANIFEST_FACTS.execute(
                conn, {"b_repository": event.repository, "b_digest": digest}
            ).first()
            manifest = None if row is None else (row.media_type, row.size)
        media_type, size = manifest or (None, None)
        _INSERT_HISTORY.execute(
            conn,
            {
                "repository": event.repository,
                "tag": tag,
                "from_position": event.position,
                "digest": digest,
                "from_time": event.time,
                "to_position": None,
                "to_time": None,
                "actor_user": event.actor.user,
                "media_type": media_type,
                "size": size,
            },
        )

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        # state["closed"] collects finished rows as tuples in _HISTORY_COLUMNS
        # order. state["open"] maps a repository to its tags, and each tag to
        # its open row in _OPEN_HISTORY_COLUMNS order: without the
        # to_position and to_time that closing it fills in.
        # state["manifests"] maps (repository, digest) to the media type and
        # size of each manifest that the repository contains.
        closed: list[tuple[Any, ...]] = state.setdefault("closed", [])
        open_rows: dict[str, dict[str, tuple[Any, ...]]] = state.setdefault("open", {})
        manifest_facts: dict[tuple[str, str], tuple[str, int]] = state.setdefault(
            "manifests", {}
        )
        deleted = EventType.TAG_DELETED
        for position, repository, event_type, moment, user, payload in events:
            if event_type is EventType.MANIFEST_PUSHED:
                manifest_facts[repository, payload["digest"]] = (
                    payload["media_type"],
                    payload["size"],
                )
                continue
            if event_type is EventType.MANIFEST_DELETED:
                manifest_facts.pop((repository, payload["digest"]), None)
                continue
            tag = payload["tag"]
            repository_rows = open_rows.get(repository)
            if repository_rows is None:
                repository_rows = open_rows[repository] = {}
            current = repository_rows.pop(tag, None)
            if current is not None:
                (
                    _,
                    _,
                    from_position,
                    digest,
                    from_time,
                    actor_user,
                    media_type,
                    size,
                ) = current
                closed.append(
                    (
                        repository,
                        tag,
                        from_position,
                        digest,
                        from_time,
                        position,
                        moment,
                        actor_user,
                        media_type,
                        size,
                    )
                )
            if event_type is not deleted:
                digest = payload["digest"]
                media_type, size = manifest_facts.get(
                    (repository, digest), (None, None)
                )
                repository_rows[tag] = (
                    repository,
                    tag,
                    position,
                    digest,
                    moment,
                    user,
                    media_type,
                    size,
                )

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        closed = state.get("closed", [])
        # In key order: (repository, tag, from_position) is unique, so the
        # sort never compares the columns after it.
        closed.sort()
        yield FoldRows(tag_history, _HISTORY_COLUMNS, closed)
        yield FoldRows(
            tag_history, _OPEN_HISTORY_COLUMNS, rows_by_key(state.get("open", {}))
        )
