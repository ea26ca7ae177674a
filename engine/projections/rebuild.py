"""Rebuild every projection from the log."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from engine.db import Database
from engine.domain.events import CURRENT_SCHEMA_VERSION, EventType, upcast
from engine.projections import ALL_PROJECTIONS
from engine.projections.base import FoldEvent, FoldRows, Projection, save_checkpoints
from engine.tables import projection_checkpoints

log = structlog.get_logger(__name__)

# Events read from the log and folded per page.
REPLAY_PAGE_SIZE = 20_000
# SQLite's page cache while a replay writes, in KiB (1 GiB). The cache grows
# only as pages are used. The projection tables of bench/rebuild.py's
# 1,000,000 events take 460 MB, so they stay in memory until commit. Larger
# ones spill to the write-ahead log before commit, which is slower.
SQLITE_REPLAY_CACHE_KIB = 1_048_576

# The phases of a rebuild, each timed in seconds: deleting the old rows,
# fetching log rows from the driver, decoding them into FoldEvents, folding,
# writing the folded rows, creating the secondary indexes, and committing.
PHASES = ("clear", "read", "decode", "fold", "write", "index", "commit")


def rebuild_projections(
    database: Database, *, phases: dict[str, float] | None = None
) -> int:
    """Drop every projection row and replay the whole log; return the position
    reached. Runs in one transaction holding the append lock, so no push can
    interleave and a failure or crash leaves the old projections in place.
    The old rows are deleted once the log is folded, and on PostgreSQL
    readers wait from then until the rebuild commits.

    ``phases``, when given, receives the seconds spent in each of PHASES.
    """
    timings = dict.fromkeys(PHASES, 0.0)
    started = time.perf_counter()
    with database.write() as conn:
        position = _replay(conn, ALL_PROJECTIONS, timings, clear=True)
        commit_started = time.perf_counter()
    timings["commit"] = time.perf_counter() - commit_started
    elapsed = time.perf_counter() - started
    if phases is not None:
        phases.update(timings)
    log.info(
        "projection_rebuilt",
        position=position,
        seconds=round(elapsed, 3),
        phases={name: round(seconds, 3) for name, seconds in timings.items()},
        projections=[p.name for p in ALL_PROJECTIONS],
    )
    return position


def clear_projections(conn: Connection, *, truncate: bool = False) -> None:
    """Delete every projection row and checkpoint in the caller's transaction.

    ``truncate`` uses TRUNCATE on PostgreSQL: transactional there and far
    faster than DELETE on large tables, but it blocks readers until commit.
    """
    tables = [table for p in ALL_PROJECTIONS for table in p.tables]
    tables.append(projection_checkpoints)
    if truncate and conn.dialect.name == "postgresql":
        quote = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql("TRUNCATE " + ", ".join(quote(t.name) for t in tables))
        return
    for table in tables:
        conn.execute(sa.delete(table))


class ReplayError(Exception):
    """An event whose payload a projection cannot apply."""

    def __init__(self, position: int, event_type: EventType, cause: Exception) -> None:
        super().__init__(
            f"replay fails at position {position} ({event_type}): "
            f"{type(cause).__name__}: {cause}"
        )
        self.position = position


def replay(
    conn: Connection,
    projections: Sequence[Projection],
    *,
    phases: dict[str, float] | None = None,
) -> int:
    """Fold the whole log in memory and write the resulting rows in bulk, into
    tables the caller has emptied. Returns the last position.

    Much faster than applying events one at a time: each row is written once
    however many events touched it, and the rows go to the driver as tuples
    (executemany on SQLite, COPY on PostgreSQL). Timestamps are copied from
    the events table as the database returns them as text. ``phases``
    accumulates the seconds spent in each of PHASES but "clear" and
    "commit".
    """
    timings = phases if phases is not None else dict.fromkeys(PHASES, 0.0)
    return _replay(conn, projections, timings, clear=False)


def _replay(
    conn: Connection,
    projections: Sequence[Projection],
    timings: dict[str, float],
    *,
    clear: bool,
) -> int:
    """Fold the log and write the folded rows. With ``clear``, first delete
    every projection row and checkpoint, and rebuild the secondary indexes
    of the projection tables after the load instead of during it."""
    tables = [table for projection in projections for table in projection.tables]
    states: list[dict[Any, Any]] = [{} for _ in projections]
    # The fold allocates millions of tuples and dicts that all live until the
    # end, and the cyclic garbage collector would traverse them again and
    # again while finding nothing to free.
    with _gc_paused():
        position = _fold_log(conn, projections, states, timings)
        with _bulk_load(conn, tables, timings, drop_indexes=clear) as writer:
            if clear:
                started = time.perf_counter()
                clear_projections(conn, truncate=True)
                timings["clear"] += time.perf_counter() - started
            started = time.perf_counter()
            for projection, state in zip(projections, states, strict=True):
                for rows in projection.rows(state):
                    writer.write(rows)
            # Freed while the collector is off, so that its next full
            # collection does not traverse them.
            states.clear()
            timings["write"] += time.perf_counter() - started
    if position:
        save_checkpoints(conn, projections, position)
    return position


def _fold_log(
    conn: Connection,
    projections: Sequence[Projection],
    states: list[dict[Any, Any]],
    timings: dict[str, float],
) -> int:
    # Projections that handle the same event types share one filtered page.
    groups: dict[frozenset[EventType], list[tuple[Projection, dict[Any, Any]]]] = {}
    for projection, state in zip(projections, states, strict=True):
        groups.setdefault(projection.handles, []).append((projection, state))
    every_type = frozenset(EventType)
    position = 0
    for page in _read_log(conn, timings):
        started = time.perf_counter()
        for handles, members in groups.items():
            if handles >= every_type:
                events = page
            else:
                events = [event for event in page if event.type in handles]
            if not events:
                continue
            for projection, state in members:
                try:
                    projection.fold(state, events)
                except (KeyError, TypeError, ValueError) as exc:
                    raise _replay_error(projection, events, exc) from exc
        position = page[-1].position
        timings["fold"] += time.perf_counter() - started
    return position


def _replay_error(
    projection: Projection, events: Sequence[FoldEvent], cause: Exception
) -> ReplayError:
    """Name the event of a page that made ``projection.fold`` raise.

    Each event is folded alone into an empty state, which finds an event
    whose payload the projection cannot read. An event that fails only after
    earlier ones is reported as the page's last event.
    """
    for event in events:
        try:
            projection.fold({}, [event])
        except (KeyError, TypeError, ValueError) as exc:
            return ReplayError(event.position, event.type, exc)
    return ReplayError(events[-1].position, events[-1].type, cause)


_EVENT_TYPES = {str(t): t for t in EventType}

_READ_LOG = {
    "sqlite": (
        "SELECT position, repository, type, schema_version, time, actor_user, "
        "payload FROM events ORDER BY position"
    ),
    # Text is what the fold writes back, and orjson decodes the payload about
    # four times faster than json.loads, which psycopg uses for jsonb.
    "postgresql": (
        "SELECT position, repository, type, schema_version, time::text, "
        "actor_user, payload::text FROM events ORDER BY position"
    ),
}


def _read_log(conn: Connection, timings: dict[str, float]) -> Iterator[list[FoldEvent]]:
    """Yield the whole log in position order, a page of FoldEvents at a time.

    One query streams every row through the driver's cursor, which is a
    server-side cursor on PostgreSQL, so no more than a page is in memory.
    """
    dialect = conn.dialect.name
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    if dialect == "postgresql":
        # time::text is then ISO 8601 in UTC, which epoch_hour reads and COPY
        # parses back to the same instant. SET LOCAL ends with the transaction.
        conn.exec_driver_sql("SET LOCAL TimeZone TO 'UTC'")
        conn.exec_driver_sql("SET LOCAL DateStyle TO 'ISO'")
        cursor = dbapi_connection.cursor(name="cairn_replay")
    else:
        cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_READ_LOG[dialect])
        while True:
            started = time.perf_counter()
            rows = cursor.fetchmany(REPLAY_PAGE_SIZE)
            fetched = time.perf_counter()
            timings["read"] += fetched - started
            if not rows:
                return
            page = _decode_page(rows)
            timings["decode"] += time.perf_counter() - fetched
            yield page
    finally:
        cursor.close()


def _decode_page(rows: Sequence[Any]) -> list[FoldEvent]:
    loads = orjson.loads
    current = CURRENT_SCHEMA_VERSION
    make = FoldEvent._make
    page = []
    for position, repository, type_name, schema_version, moment, user, text in rows:
        event_type = _EVENT_TYPES[type_name]
        payload = loads(text)
        if schema_version != current[event_type]:
            payload = upcast(event_type, schema_version, payload)
        page.append(make((position, repository, event_type, moment, user, payload)))
    return page


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _bulk_load(
    conn: Connection,
    tables: Sequence[sa.Table],
    timings: dict[str, float],
    *,
    drop_indexes: bool,
) -> Iterator[_BulkWriter]:
    """Yield the writer that loads ``tables``, with SQLite's page cache
    enlarged. It is enlarged only now because SQLite reads the log faster
    with its default cache.

    With ``drop_indexes`` the tables' secondary indexes (those that back no
    constraint) are dropped first and created again from their stored
    definitions afterwards, which sorts each index once instead of inserting
    into it row by row. Both happen in the caller's transaction, so a failure
    rolls them back with the rows. On PostgreSQL DROP INDEX locks readers
    out until commit, which a rebuild's TRUNCATE does anyway but a check
    that rolls back must not.
    """
    indexes = _secondary_indexes(conn, tables) if drop_indexes else []
    for name, _definition in indexes:
        conn.exec_driver_sql(f"DROP INDEX {name}")
    with _sqlite_cache(conn):
        yield _BulkWriter(conn)
        started = time.perf_counter()
        for _name, definition in indexes:
            conn.exec_driver_sql(definition)
        timings["index"] += time.perf_counter() - started


_SQLITE_INDEXES = sa.text(
    "SELECT name, sql FROM sqlite_master "
    "WHERE type = 'index' AND tbl_name = :table AND sql IS NOT NULL"
)
_POSTGRESQL_INDEXES = sa.text(
    "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) "
    "FROM pg_index WHERE indrelid = to_regclass(:table) "
    "AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = indexrelid)"
)


def _secondary_indexes(
    conn: Connection, tables: Sequence[sa.Table]
) -> list[tuple[str, str]]:
    """Return the quoted name and the CREATE INDEX statement of each index on
    ``tables`` that backs no primary key or unique constraint."""
    quote = conn.dialect.identifier_preparer.quote
    indexes: list[tuple[str, str]] = []
    for table in tables:
        if conn.dialect.name == "sqlite":
            rows = conn.execute(_SQLITE_INDEXES, {"table": table.name}).all()
            indexes.extend((quote(name), sql) for name, sql in rows)
        else:
            parameters = {"table": quote(table.name)}
            rows = conn.execute(_POSTGRESQL_INDEXES, parameters).all()
            indexes.extend((name, sql) for name, sql in rows)
    return indexes


@contextmanager
def _sqlite_cache(conn: Connection) -> Iterator[None]:
    """Enlarge SQLite's page cache for the connection, then restore it.

    The setting is per connection and not transactional, so it is restored
    on every exit, because the pool hands the connection on.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    previous = conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
    conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_REPLAY_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size = {int(previous)}")


class _BulkWriter:
    """Write FoldRows with the driver's fastest bulk path: executemany on
    SQLite, COPY on PostgreSQL."""

    def __init__(self, conn: Connection) -> None:
        # sqlite3's or psycopg's own connection: its cursors take any
        # iterable in executemany, and psycopg's have copy().
        self._dbapi_connection: Any = conn.connection.dbapi_connection
        self._sqlite = conn.dialect.name == "sqlite"
        self._quote = conn.dialect.identifier_preparer.quote

    def write(self, rows: FoldRows) -> None:
        json_columns = [
            i
            for i, name in enumerate(rows.columns)
            if isinstance(rows.table.c[name].type, sa.JSON)
        ]
        columns = ", ".join(self._quote(name) for name in rows.columns)
        table = self._quote(rows.table.name)
        if self._sqlite:
            values = _encoded(rows.rows, json_columns, _json_text)
            placeholders = ", ".join(["?"] * len(rows.columns))
            cursor = self._dbapi_connection.cursor()
            try:
                cursor.executemany(
                    f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", values
                )
            finally:
                cursor.close()
            return
        # PostgreSQL stores jsonb parsed, so any valid encoding gives the
        # same value.
        values = _encoded(rows.rows, json_columns, _orjson_text)
        with (
            self._dbapi_connection.cursor() as cursor,
            cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
        ):
            for row in values:
                copy.write_row(row)


def _encoded(
    rows: Iterable[tuple[Any, ...]],
    json_columns: list[int],
    encode: Callable[[Any], str],
) -> Iterable[tuple[Any, ...]]:
    """Return ``rows`` with the values of ``json_columns`` encoded, None
    staying NULL."""
    if not json_columns:
        return rows
    return _encode_rows(rows, json_columns, encode)


def _encode_rows(
    rows: Iterable[tuple[Any, ...]],
    json_columns: list[int],
    encode: Callable[[Any], str],
) -> Iterator[tuple[Any, ...]]:
    for row in rows:
        values = list(row)
        for i in json_columns:
            if values[i] is not None:
                values[i] = encode(values[i])
        yield tuple(values)


# The text json.dumps returns with its defaults, which is what SQLAlchemy's
# JSON type stores on SQLite, so a rebuilt row has the bytes of a live one.
# Values decoded from the log cannot contain cycles, and without the check
# for them encoding took a fifth less time (200,000 references lists).
_json_text = json.JSONEncoder(check_circular=False).encode


def _orjson_text(value: Any) -> str:
    return orjson.dumps(value).decode()


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
