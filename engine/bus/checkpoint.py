"""The relay's side of the database: its checkpoint and the events after it.

All functions are synchronous and take an open connection; the relay calls
them from worker threads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine import log as event_log
from engine.domain.events import StoredEvent
from engine.tables import events, relay_checkpoints


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the relay is: its checkpoint, the log head, and the time the
    oldest unpublished event was committed (None when nothing is pending)."""

    checkpoint: int
    head: int
    oldest_pending: datetime | None


def read_checkpoint(conn: Connection, name: str) -> int:
    """Return the last position the relay named ``name`` has published (0 if none)."""
    position = conn.execute(
        sa.select(relay_checkpoints.c.position).where(relay_checkpoints.c.name == name)
    ).scalar_one_or_none()
    return position or 0


def advance_checkpoint(conn: Connection, name: str, position: int) -> None:
    """Move the checkpoint forward to ``position``; never move it back.

    Forward-only writes keep a stale relay, one that lost its leadership
    without noticing yet, from undoing the progress of the new leader.
    """
    now = datetime.now(UTC)
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(
            (relay_checkpoints.c.name == name)
            & (relay_checkpoints.c.position < position)
        )
        .values(position=position, updated_at=now)
    )
    if updated.rowcount:
        return
    exists = conn.execute(
        sa.select(relay_checkpoints.c.name).where(relay_checkpoints.c.name == name)
    ).first()
    if exists is None:
        conn.execute(
            sa.insert(relay_checkpoints).values(
                name=name, position=position, updated_at=now
            )
        )


def set_checkpoint(conn: Connection, name: str, position: int) -> None:
    """Set the checkpoint to ``position``, forward or back."""
    now = datetime.now(UTC)
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(relay_checkpoints.c.name == name)
        .values(position=position, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(
            sa.insert(relay_checkpoints).values(
                name=name, position=position, updated_at=now
            )
        )


def read_pending(
    conn: Connection, after: int, limit: int
) -> tuple[int, list[StoredEvent]]:
    """Return the log head and up to ``limit`` events after position ``after``.

    Events come exactly as stored, without upcasting, so that the payload
    matches the schema version and the hash the message carries.
    """
    head, _ = event_log.head(conn)
    return head, event_log.read(conn, after, limit, upcast_payload=False)


def event_id_at(conn: Connection, position: int) -> uuid.UUID | None:
    """Return the id of the event at ``position``, or None if there is none."""
    value = conn.execute(
        sa.select(events.c.id).where(events.c.position == position)
    ).scalar_one_or_none()
    if value is None or isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(str(value))


def read_progress(conn: Connection, name: str, after: int | None = None) -> Progress:
    """Read the log head and the oldest event after ``after``.

    ``after`` defaults to the checkpoint row of the relay named ``name``.
    """
    checkpoint = read_checkpoint(conn, name) if after is None else after
    head, _ = event_log.head(conn)
    oldest = None
    if head > checkpoint:
        oldest = conn.execute(
            sa.select(events.c.time).where(events.c.position == checkpoint + 1)
        ).scalar_one_or_none()
    return Progress(checkpoint, head, oldest)
