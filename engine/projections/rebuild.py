"""Rebuild every projection from the log."""

from __future__ import annotations

import time

import sqlalchemy as sa
import structlog

from engine.db import Database
from engine.log import read_all
from engine.projections import ALL_PROJECTIONS, apply_events
from engine.tables import projection_checkpoints

log = structlog.get_logger(__name__)


def rebuild_projections(database: Database) -> int:
    """Drop every projection row and replay the whole log; return the position
    reached. Runs in one transaction holding the append lock, so no push can
    interleave and a failure leaves the old projections in place."""
    started = time.perf_counter()
    with database.write() as conn:
        for projection in ALL_PROJECTIONS:
            projection.reset(conn)
        conn.execute(sa.delete(projection_checkpoints))
        position = apply_events(conn, ALL_PROJECTIONS, read_all(conn))
    elapsed = time.perf_counter() - started
    log.info(
        "projection_rebuilt",
        position=position,
        seconds=round(elapsed, 3),
        projections=[p.name for p in ALL_PROJECTIONS],
    )
    return position
