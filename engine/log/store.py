"""Append to the log and read it back.

Every function takes an open connection, so a command's events commit in the
same transaction as the projection updates they cause. ``append`` must run
inside ``Database.write()``, which holds the log head lock: positions are then
assigned in commit order with no gaps, and each event's previous hash is the
hash of the event committed just before it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.errors import ConcurrencyConflict
from engine.domain.events import (
    CURRENT_SCHEMA_VERSION,
    Actor,
    EventType,
    NewEvent,
    StoredEvent,
    event_hash,
    upcast,
)
from engine.prepared import Prepared
from engine.tables import events, log_head, streams

# Key in Connection.info under which a write transaction collects the events
# it appends, so listeners can be called once the transaction has committed.
APPENDED_KEY = "cairn_appended_events"


# Statements are built once: constructing one costs far more than running it.
_HEAD = Prepared(
    sa.select(log_head.c.position, log_head.c.hash).where(log_head.c.id == 1)
)
_MOVE_HEAD = Prepared(
    sa.update(log_head)
    .where(log_head.c.id == 1)
    .values(position=sa.bindparam("b_position"), hash=sa.bindparam("b_hash"))
)
_STREAM_VERSION = Prepared(
    sa.select(streams.c.version).where(
        streams.c.repository == sa.bindparam("b_repository")
    )
)
_INSERT_STREAM = Prepared(sa.insert(streams))
_UPDATE_STREAM = Prepared(
    sa.update(streams)
    .where(streams.c.repository == sa.bindparam("b_repository"))
    .values(version=sa.bindparam("b_version"))
)
_INSERT_EVENTS = Prepared(sa.insert(events))


def head(conn: Connection) -> tuple[int, str]:
    """Return the last position and its hash (0 and the genesis hash when empty)."""
    position, hash_ = _HEAD.execute(conn).tuples[0]
    return position, hash_


def stream_version(conn: Connection, repository: str) -> int:
    version = _STREAM_VERSION.execute(conn, {"b_repository": repository}).scalar()
    return version or 0


def append(
    conn: Connection,
    new_events: Sequence[NewEvent],
    *,
    actor: Actor,
    request_id: str | None = None,
    expected_versions: dict[str, int] | None = None,
    now: datetime | None = None,
) -> list[StoredEvent]:
    """Append ``new_events`` in order and return them as stored.

    ``expected_versions`` maps a repository to the stream version the caller
    read; a different current version raises ConcurrencyConflict.
    """
    if not new_events:
        return []
    moment = now or datetime.now(UTC)
    position, previous_hash = head(conn)
    versions: dict[str, int] = {}
    stored: list[StoredEvent] = []

    for new in new_events:
        if new.repository not in versions:
            versions[new.repository] = stream_version(conn, new.repository)
            expected = (expected_versions or {}).get(new.repository)
            if expected is not None and expected != versions[new.repository]:
                raise ConcurrencyConflict(
                    "repository changed concurrently; retry",
                    {
                        "repository": new.repository,
                        "expected": expected,
                        "actual": versions[new.repository],
                    },
                )
        versions[new.repository] += 1
        position += 1
        fields: dict[str, Any] = {
            "position": position,
            "id": new.id,
            "repository": new.repository,
            "version": versions[new.repository],
            "type": new.type,
            "schema_version": new.schema_version,
            "time": moment,
            "actor": actor,
            "request_id": request_id,
            "payload": new.payload,
            "previous_hash": previous_hash,
        }
        event = StoredEvent(**fields, hash=event_hash(**fields))
        stored.append(event)
        previous_hash = event.hash

    _INSERT_EVENTS.executemany(conn, [_event_row(event) for event in stored])
    _MOVE_HEAD.execute(conn, {"b_position": position, "b_hash": previous_hash})
    _save_stream_versions(conn, versions, stored)
    pending = conn.info.get(APPENDED_KEY)
    if pending is not None:
        pending.extend(stored)
    return stored


def _save_stream_versions(
    conn: Connection, versions: dict[str, int], stored: list[StoredEvent]
) -> None:
    first_version: dict[str, int] = {}
    for event in stored:
        first_version.setdefault(event.repository, event.version)
    for repository, version in versions.items():
        if first_version[repository] == 1:
            _INSERT_STREAM.execute(conn, {"repository": repository, "version": version})
        else:
            _UPDATE_STREAM.execute(
                conn, {"b_repository": repository, "b_version": version}
            )


def _event_row(event: StoredEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "id": event.id,
        "repository": event.repository,
        "version": event.version,
        "type": str(event.type),
        "schema_version": event.schema_version,
        "time": event.time,
        "actor_user": event.actor.user,
        "actor_address": event.actor.address,
        "request_id": event.request_id,
        "payload": event.payload,
        "previous_hash": event.previous_hash,
        "hash": event.hash,
    }


def row_to_event(row: Any, *, upcast_payload: bool = True) -> StoredEvent:
    """Build a StoredEvent from an ``events`` row.

    With ``upcast_payload`` the payload is brought to the current schema
    version and ``schema_version`` is set to match. Without it the event is
    exactly as stored, which is what hash verification needs.
    """
    event_type = EventType(row.type)
    payload = row.payload
    schema_version = row.schema_version
    if upcast_payload and schema_version != CURRENT_SCHEMA_VERSION[event_type]:
        payload = upcast(event_type, schema_version, payload)
        schema_version = CURRENT_SCHEMA_VERSION[event_type]
    return StoredEvent(
        position=row.position,
        id=row.id if isinstance(row.id, uuid.UUID) else uuid.UUID(str(row.id)),
        repository=row.repository,
        version=row.version,
        type=event_type,
        schema_version=schema_version,
        time=row.time,
        actor=Actor(user=row.actor_user, address=row.actor_address),
        request_id=row.request_id,
        payload=payload,
        previous_hash=row.previous_hash,
        hash=row.hash,
    )


def read(
    conn: Connection,
    after: int = 0,
    limit: int = 1000,
    *,
    repository: str | None = None,
    types: Sequence[str] | None = None,
    upcast_payload: bool = True,
) -> list[StoredEvent]:
    """Return up to ``limit`` events with position greater than ``after``."""
    query = sa.select(events).where(events.c.position > after)
    if repository is not None:
        query = query.where(events.c.repository == repository)
    if types:
        query = query.where(events.c.type.in_(list(types)))
    query = query.order_by(events.c.position).limit(limit)
    return [
        row_to_event(row, upcast_payload=upcast_payload) for row in conn.execute(query)
    ]


def read_all(
    conn: Connection, after: int = 0, page_size: int = 5000, **filters: Any
) -> Iterator[StoredEvent]:
    """Yield every event after ``after`` in position order, a page at a time."""
    while True:
        page = read(conn, after, page_size, **filters)
        yield from page
        if len(page) < page_size:
            return
        after = page[-1].position
