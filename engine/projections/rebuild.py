"""Rebuild every projection from the log."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

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


def snapshot_projections(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Return every projection row, per table, in a stable order, so two
    states can be compared exactly."""
    snapshot: dict[str, list[tuple[Any, ...]]] = {}
    for projection in ALL_PROJECTIONS:
        for table in projection.tables:
            key = list(table.primary_key.columns)
            rows = conn.execute(sa.select(table).order_by(*key)).all()
            snapshot[table.name] = [_comparable(tuple(row)) for row in rows]
    return snapshot


def _comparable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    # JSON columns come back as dicts and lists, which are not hashable;
    # their canonical encoding compares the same way and is.
    return tuple(
        json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        for value in row
    )


def diff_projections(
    live: dict[str, list[tuple[Any, ...]]], rebuilt: dict[str, list[tuple[Any, ...]]]
) -> list[str]:
    """Describe each row present in one snapshot and not the other."""
    problems: list[str] = []
    for table in sorted(set(live) | set(rebuilt)):
        live_rows = set(live.get(table, []))
        rebuilt_rows = set(rebuilt.get(table, []))
        for row in sorted(live_rows - rebuilt_rows, key=repr):
            problems.append(
                f"projection {table}: row {row!r} is not produced by a replay"
            )
        for row in sorted(rebuilt_rows - live_rows, key=repr):
            problems.append(
                f"projection {table}: replay produces row {row!r}, missing live"
            )
    return problems
