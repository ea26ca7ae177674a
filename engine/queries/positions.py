"""The log head, the projections' checkpoints, and times mapped to positions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.db import Database
from engine.projections import ALL_PROJECTIONS
from engine.tables import events, projection_checkpoints
from engine.tables import log_head as log_head_table

_HEAD = sa.select(log_head_table.c.position).where(log_head_table.c.id == 1)
_CHECKPOINTS = sa.select(
    projection_checkpoints.c.name, projection_checkpoints.c.position
)
# Ordered on the time index, so the database reads one index entry. Ties on
# time (one append stores one time for all its events) go to the last one.
_POSITION_AT = (
    sa.select(events.c.position)
    .where(events.c.time <= sa.bindparam("b_time"))
    .order_by(events.c.time.desc(), events.c.position.desc())
    .limit(1)
)
_POSITION_BEFORE = (
    sa.select(events.c.position)
    .where(events.c.time < sa.bindparam("b_time"))
    .order_by(events.c.time.desc(), events.c.position.desc())
    .limit(1)
)

_PROJECTION_NAMES = frozenset(projection.name for projection in ALL_PROJECTIONS)


@contextmanager
def snapshot(database: Database) -> Iterator[Connection]:
    """Open a read-only transaction whose statements all see one state, so
    the log head read first never falls behind the rows read after it."""
    with database.read() as conn:
        yield conn


def log_head(conn: Connection) -> int:
    """Return the position of the last event in the log, 0 when it is empty."""
    return int(conn.execute(_HEAD).scalar_one())


def projection_position(conn: Connection) -> int:
    """Return the position every projection has applied, the lowest checkpoint.

    A projection without a checkpoint has applied nothing, unless the log is
    empty too.
    """
    found = {row.name: row.position for row in conn.execute(_CHECKPOINTS)}
    if _PROJECTION_NAMES - found.keys():
        return 0
    return min(int(found[name]) for name in _PROJECTION_NAMES)


def position_at(conn: Connection, moment: datetime) -> int:
    """Return the last position whose event time is at or before ``moment``.

    This assumes that event times never decrease along the log. Appends
    take their time under the log head lock, so this holds unless the
    server's clock steps back.
    """
    found = conn.execute(_POSITION_AT, {"b_time": moment}).scalar_one_or_none()
    return int(found or 0)


def position_before(conn: Connection, moment: datetime) -> int:
    """Return the last position whose event time is before ``moment``."""
    found = conn.execute(_POSITION_BEFORE, {"b_time": moment}).scalar_one_or_none()
    return int(found or 0)
