"""The relay's side of the database: its checkpoint and the events after it.

All functions are synchronous and take an open connection; the relay calls
them from worker threads.

The row's generation is a fencing token. A relay claims a new generation
each time it becomes the leader (``claim_checkpoint``), and a reset starts
one too (``set_checkpoint``). The relay's writes (``advance_checkpoint``,
``rewind_checkpoint``) change the row only while it still has the relay's
generation, so a relay that lost its leader lock without noticing cannot
overwrite what a reset or the next leader wrote.
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


class CheckpointFenced(Exception):
    """The checkpoint row no longer has the generation a relay claimed.

    Another relay became the leader, or `cairn events republish` reset the
    row, since this relay claimed ``generation``. ``current`` is the row's
    generation, None when the row is missing.
    """

    def __init__(self, name: str, generation: int, current: int | None) -> None:
        row = "is missing" if current is None else f"has generation {current}"
        super().__init__(
            f"the checkpoint row of relay {name} {row}, not the generation "
            f"{generation} that this relay claimed"
        )
        self.name = name
        self.generation = generation
        self.current = current


@dataclass(frozen=True, slots=True)
class Claim:
    """A relay's checkpoint and generation, as read when it became the leader."""

    position: int
    generation: int


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


def claim_checkpoint(conn: Connection, name: str) -> Claim:
    """Increment the generation of relay ``name``'s row and read the row.

    A relay calls this, in a write transaction, each time it becomes the
    leader, and passes the generation to every later write. The increment
    makes the writes of every relay that claimed an earlier generation fail.
    A missing row is created at position 0.
    """
    now = datetime.now(UTC)
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(relay_checkpoints.c.name == name)
        .values(generation=relay_checkpoints.c.generation + 1, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(
            sa.insert(relay_checkpoints).values(
                name=name, position=0, generation=1, updated_at=now
            )
        )
    row = conn.execute(
        sa.select(relay_checkpoints.c.position, relay_checkpoints.c.generation).where(
            relay_checkpoints.c.name == name
        )
    ).one()
    return Claim(row.position, row.generation)


def advance_checkpoint(
    conn: Connection, name: str, position: int, generation: int
) -> None:
    """Move the checkpoint forward to ``position``; never move it back.

    Raises CheckpointFenced, and writes nothing, unless the row still has
    ``generation``. The generation keeps a relay that lost its leadership
    without noticing yet from undoing a reset or the progress of the next
    leader. Within one generation the row only moves forward, so a write
    that commits after a later position's write changes nothing.
    """
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(
            (relay_checkpoints.c.name == name)
            & (relay_checkpoints.c.generation == generation)
            & (relay_checkpoints.c.position < position)
        )
        .values(position=position, updated_at=datetime.now(UTC))
    )
    if not updated.rowcount:
        _check_generation(conn, name, generation)


def rewind_checkpoint(
    conn: Connection, name: str, position: int, generation: int
) -> None:
    """Set the checkpoint to ``position``, forward or back.

    Raises CheckpointFenced, and writes nothing, unless the row still has
    ``generation``.
    """
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(
            (relay_checkpoints.c.name == name)
            & (relay_checkpoints.c.generation == generation)
        )
        .values(position=position, updated_at=datetime.now(UTC))
    )
    if not updated.rowcount:
        _check_generation(conn, name, generation)


def set_checkpoint(conn: Connection, name: str, position: int) -> int:
    """Set the checkpoint to ``position`` and start a new generation.

    Returns the new generation. Every relay that claimed an earlier one can
    no longer write the row, so none of them undoes this change.
    """
    now = datetime.now(UTC)
    updated = conn.execute(
        sa.update(relay_checkpoints)
        .where(relay_checkpoints.c.name == name)
        .values(
            position=position,
            generation=relay_checkpoints.c.generation + 1,
            updated_at=now,
        )
    )
    if not updated.rowcount:
        conn.execute(
            sa.insert(relay_checkpoints).values(
                name=name, position=position, generation=1, updated_at=now
            )
        )
    generation: int = conn.execute(
        sa.select(relay_checkpoints.c.generation).where(
            relay_checkpoints.c.name == name
        )
    ).scalar_one()
    return generation


def read_generation(conn: Connection, name: str) -> int | None:
    """Return the generation of relay ``name``'s row, or None if there is no row."""
    generation: int | None = conn.execute(
        sa.select(relay_checkpoints.c.generation).where(
            relay_checkpoints.c.name == name
        )
    ).scalar_one_or_none()
    return generation


def _check_generation(conn: Connection, name: str, generation: int) -> None:
    current = read_generation(conn, name)
    if current != generation:
        raise CheckpointFenced(name, generation, current)


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
