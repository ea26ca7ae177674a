"""Rebuild every projection from the log."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
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

# Events decoded and folded at a time. In small pages the rows, payloads and
# FoldEvents of a page are still in the CPU's caches when the fold reads
# them. On SQLite, reading, decoding and folding the 1,000,000 events of
# bench/rebuild.py took 4.0 s in pages of 100 and 5.5 s in pages of 20,000.
REPLAY_PAGE_SIZE = 100
# Rows fetched from PostgreSQL's server-side cursor at a time, one round trip
# each. SQLite, which has no round trip, fetches a page at a time: fetching
# 20,000 rows at a time made its rebuild of bench/rebuild.py's log 0.4 to
# 0.9 s slower in three runs.
POSTGRESQL_FETCH_SIZE = 20_000
# Rows that a rebuild encodes and keeps in memory while a helper thread
# creates the indexes of the rows written before them. 100,000 rows of
# manifests, the largest rows, took 59 MB and 0.35 s to encode with
# bench/rebuild.py.
ENCODE_AHEAD_ROWS = 100_000
# SQLite's page cache while a replay writes, in KiB (1 GiB). The cache grows
# only as pages are used. The projection tables of bench/rebuild.py's
# 1,000,000 events take 395 MB, so they stay in memory until commit. Larger
# ones spill to the write-ahead log before commit, which is slower.
SQLITE_REPLAY_CACHE_KIB = 1_048_576

# The phases of a rebuild, each timed in seconds: deleting the old rows,
# fetching log rows from the driver, decoding them into FoldEvents, folding,
# writing the folded rows, creating the secondary indexes, and committing.
# The deletes and the indexes run in a helper thread while the rebuild folds
# or writes, and count only the time that the rebuild then waits for them.
PHASES = ("clear", "read", "decode", "fold", "write", "index", "commit")


def rebuild_projections(
    database: Database, *, phases: dict[str, float] | None = None
) -> int:
    """Drop every projection row and replay the whole log; return the position
    reached. Runs in one transaction holding the append lock, so no push can
    interleave and a failure or crash leaves the old projections in place.
    On PostgreSQL the old rows are deleted once the log is folded, and
    readers wait from then until the rebuild commits.

    ``phases``, when given, receives the seconds spent in each of PHASES.
    """
    timings = dict.fromkeys(PHASES, 0.0)
    started = time.perf_counter()
    # On SQLite another connection reads the log, in a read transaction that
    # starts after this one has taken the write lock, so it reads the same
    # log. Meanwhile a helper thread clears the projections on this one.
    # PostgreSQL clears them only after the fold, because TRUNCATE makes
    # readers wait until commit.
    log_reader = database.read if database.is_sqlite else None
    with database.write() as conn:
        position = _replay(
            conn, ALL_PROJECTIONS, timings, clear=True, log_reader=log_reader
        )
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
    for statement in _clear_statements(conn, truncate=truncate):
        conn.exec_driver_sql(statement)


def projection_tables() -> list[sa.Table]:
    """Return every table that a rebuild clears: the projections' tables and
    their checkpoints."""
    tables = [table for p in ALL_PROJECTIONS for table in p.tables]
    tables.append(projection_checkpoints)
    return tables


def _clear_statements(conn: Connection, *, truncate: bool) -> list[str]:
    tables = projection_tables()
    quote = conn.dialect.identifier_preparer.quote
    if truncate and conn.dialect.name == "postgresql":
        return ["TRUNCATE " + ", ".join(quote(table.name) for table in tables)]
    return [f"DELETE FROM {quote(table.name)}" for table in tables]


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
    accumulates the seconds spent in each of PHASES but "clear", "index"
    and "commit".
    """
    timings = phases if phases is not None else dict.fromkeys(PHASES, 0.0)
    return _replay(conn, projections, timings, clear=False)


def _replay(
    conn: Connection,
    projections: Sequence[Projection],
    timings: dict[str, float],
    *,
    clear: bool,
    log_reader: Callable[[], AbstractContextManager[Connection]] | None = None,
) -> int:
    """Fold the log and write the folded rows. With ``clear``, first delete
    every projection row and checkpoint, and drop the secondary indexes of
    the projection tables, which are created again after the load: one sort
    each instead of one insert per row. ``log_reader``, when given, opens
    the transaction that the log is read in, on another connection than
    ``conn``.

    The statements that drop, delete and create run in the driver with the
    GIL released, in a helper thread. Meanwhile this thread frees the state
    it has written and encodes the next rows, and with ``log_reader`` it
    folds the log while the old rows are deleted. Indexing blob_links and
    encoding the references of manifests took 0.6 and 0.7 s for the
    1,000,000 events of bench/rebuild.py, and 0.7 s side by side on an idle
    second core. All of it runs in the caller's transaction, so a failure
    rolls it all back.
    """
    tables = [table for projection in projections for table in projection.tables]
    states: list[dict[Any, Any]] = [{} for _ in projections]
    # The fold allocates millions of tuples and dicts that all live until they
    # are written, and the cyclic garbage collector would traverse them again
    # and again while finding nothing to free. They are freed while it is
    # still off, so that its next full collection does not traverse them.
    with _gc_paused(), contextlib.ExitStack() as stack:
        try:
            if log_reader is None:
                position = _fold_log(conn, projections, states, timings)
            indexes = _secondary_indexes(conn, tables) if clear else {}
            stack.enter_context(_sqlite_cache(conn))
            helper = stack.enter_context(_Helper(conn, timings))
            if clear:
                drops = [f"DROP INDEX {name}" for name, _ in _definitions(indexes)]
                helper.start([*drops, *_clear_statements(conn, truncate=True)], "clear")
            if log_reader is not None:
                with log_reader() as log_conn:
                    position = _fold_log(log_conn, projections, states, timings)
            writer = _BulkWriter(conn, timings)
            for projection, state in zip(projections, states, strict=True):
                for rows in projection.rows(state):
                    writer.write(rows, helper)
                owned = {t.name: indexes.get(t.name, []) for t in projection.tables}
                creates = [definition for _, definition in _definitions(owned)]
                if creates:
                    helper.start(creates, "index")
                started = time.perf_counter()
                state.clear()
                timings["write"] += time.perf_counter() - started
            helper.wait()
        finally:
            states.clear()
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
    server-side cursor on PostgreSQL, so no more than POSTGRESQL_FETCH_SIZE
    rows are in memory.
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
    fetch_size = POSTGRESQL_FETCH_SIZE if dialect == "postgresql" else REPLAY_PAGE_SIZE
    strings: dict[str, str] = {}
    try:
        cursor.execute(_READ_LOG[dialect])
        while True:
            started = time.perf_counter()
            rows = cursor.fetchmany(fetch_size)
            timings["read"] += time.perf_counter() - started
            if not rows:
                return
            for start in range(0, len(rows), REPLAY_PAGE_SIZE):
                started = time.perf_counter()
                page = _decode_page(rows[start : start + REPLAY_PAGE_SIZE], strings)
                timings["decode"] += time.perf_counter() - started
                yield page
    finally:
        cursor.close()


def _decode_page(rows: Sequence[Any], strings: dict[str, str]) -> list[FoldEvent]:
    """Decode log rows into FoldEvents.

    ``strings`` maps each repository name, time and user seen so far to one
    copy of it, which the events then share instead of the driver's new
    string per row. Folded states keep a few thousand strings instead of
    millions, and the dicts keyed by repository find them by identity.
    Consecutive events often share all three, because one append stamps all
    its events with one time.
    """
    loads = orjson.loads
    current = CURRENT_SCHEMA_VERSION
    # FoldEvent._make without its check of the field count: tuple.__new__ is
    # a C call and _make a Python one.
    new = tuple.__new__
    shared = strings.setdefault
    last_repository: str | None = None
    last_moment: Any = None
    last_user: str | None = None
    page = []
    for position, repository, type_name, schema_version, moment, user, text in rows:
        event_type = _EVENT_TYPES[type_name]
        try:
            payload = loads(text)
        except orjson.JSONDecodeError:
            # Earlier cairn versions accepted NaN in a child manifest's
            # platform, which the payload copies. SQLite then stores the NaN
            # literal, which orjson rejects and json.loads reads.
            payload = json.loads(text)
        if schema_version != current[event_type]:
            payload = upcast(event_type, schema_version, payload)
        if repository != last_repository:
            last_repository = shared(repository, repository)
        if moment != last_moment:
            last_moment = shared(moment, moment)
        if user != last_user:
            last_user = None if user is None else shared(user, user)
        event = (position, last_repository, event_type, last_moment, last_user, payload)
        page.append(new(FoldEvent, event))
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
) -> dict[str, list[tuple[str, str]]]:
    """Return, for each of ``tables``, the quoted name and the CREATE INDEX
    statement of each of its indexes that backs no primary key or unique
    constraint."""
    quote = conn.dialect.identifier_preparer.quote
    indexes: dict[str, list[tuple[str, str]]] = {}
    for table in tables:
        if conn.dialect.name == "sqlite":
            rows = conn.execute(_SQLITE_INDEXES, {"table": table.name}).all()
            indexes[table.name] = [(quote(name), sql) for name, sql in rows]
        else:
            parameters = {"table": quote(table.name)}
            rows = conn.execute(_POSTGRESQL_INDEXES, parameters).all()
            indexes[table.name] = [(name, sql) for name, sql in rows]
    return indexes


def _definitions(
    indexes: dict[str, list[tuple[str, str]]],
) -> Iterator[tuple[str, str]]:
    for table_indexes in indexes.values():
        yield from table_indexes


@contextmanager
def _sqlite_cache(conn: Connection) -> Iterator[None]:
    """Enlarge SQLite's page cache for the connection, then restore it.

    The cache keeps the pages that dropping the indexes and deleting the old
    rows free, and those that the load writes, until commit. While the
    indexes were still dropped with the default cache, SQLite spilled pages
    to the write-ahead log during the drops, and the clear phase of
    bench/rebuild.py's --reuse rounds took 0.36 to 6.9 s. With the cache
    enlarged first it took 0.25 to 0.75 s.
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


class _Helper:
    """A thread that runs statements on the transaction's connection while
    the calling thread prepares rows.

    The two threads take turns on the connection: the caller waits for the
    helper before it inserts rows, starts the next statements or leaves.
    The time it waits is added to the phase named when the statements
    started.
    """

    def __init__(self, conn: Connection, timings: dict[str, float]) -> None:
        self._dbapi_connection: Any = conn.connection.dbapi_connection
        self._timings = timings
        self._thread: threading.Thread | None = None
        self._phase = ""
        self._error: Exception | None = None

    def __enter__(self) -> _Helper:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.wait()
            return
        # The error in flight is raised, but only once the helper has left the
        # connection to the rollback.
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            log.warning(
                "projection_rebuild_statement_failed",
                phase=self._phase,
                error=str(self._error),
            )

    def start(self, statements: Sequence[str], phase: str) -> None:
        """Run ``statements`` in order in a new thread."""
        self.wait()
        self._phase = phase
        self._thread = threading.Thread(
            target=self._run, args=(statements,), name="cairn-rebuild-helper"
        )
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> float:
        """Wait until the statements are done, raise their error if one
        failed, and return the seconds waited."""
        if self._thread is None:
            return 0.0
        started = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - started
        self._timings[self._phase] += waited
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return waited

    def _run(self, statements: Sequence[str]) -> None:
        try:
            cursor = self._dbapi_connection.cursor()
            try:
                for statement in statements:
                    cursor.execute(statement)
            finally:
                cursor.close()
        except Exception as exc:
            self._error = exc


class _BulkWriter:
    """Write FoldRows with the driver's fastest bulk path: executemany on
    SQLite, COPY on PostgreSQL."""

    def __init__(self, conn: Connection, timings: dict[str, float]) -> None:
        # sqlite3's or psycopg's own connection: its cursors take any
        # iterable in executemany, and psycopg's have copy().
        self._dbapi_connection: Any = conn.connection.dbapi_connection
        self._sqlite = conn.dialect.name == "sqlite"
        self._quote = conn.dialect.identifier_preparer.quote
        self._timings = timings

    def write(self, rows: FoldRows, helper: _Helper) -> None:
        """Insert ``rows`` once ``helper`` is done with the connection, and
        encode rows ahead while it is not."""
        started = time.perf_counter()
        json_columns = [
            i
            for i, name in enumerate(rows.columns)
            if isinstance(rows.table.c[name].type, sa.JSON)
        ]
        columns = ", ".join(self._quote(name) for name in rows.columns)
        table = self._quote(rows.table.name)
        # PostgreSQL stores jsonb parsed, so any valid encoding gives the
        # same value there.
        encode = _json_text if self._sqlite else _orjson_text
        values = iter(_encoded(rows.rows, json_columns, encode))
        ahead = _encode_ahead(values, helper)
        waited = helper.wait()
        if self._sqlite:
            placeholders = ", ".join(["?"] * len(rows.columns))
            cursor = self._dbapi_connection.cursor()
            try:
                cursor.executemany(
                    f"INSERT INTO {table} ({columns}) VALUES ({placeholders})",
                    itertools.chain(ahead, values),
                )
            finally:
                cursor.close()
        else:
            with (
                self._dbapi_connection.cursor() as cursor,
                cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
            ):
                for row in itertools.chain(ahead, values):
                    copy.write_row(row)
        self._timings["write"] += time.perf_counter() - started - waited


def _encode_ahead(
    values: Iterator[tuple[Any, ...]], helper: _Helper
) -> list[tuple[Any, ...]]:
    """Return the rows that ``values`` yields while ``helper`` is busy, taken
    a thousand at a time and at most ENCODE_AHEAD_ROWS of them."""
    ahead: list[tuple[Any, ...]] = []
    while helper.busy() and len(ahead) < ENCODE_AHEAD_ROWS:
        chunk = list(itertools.islice(values, 1000))
        if not chunk:
            break
        ahead.extend(chunk)
    return ahead


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
