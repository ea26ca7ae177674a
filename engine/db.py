"""Database connections and the two kinds of transaction cairn uses.

cairn uses SQLAlchemy's synchronous Core API. Commands run in a worker thread
(the ASGI layer calls them through engine.api.threads), so the event loop
never waits on the database. The synchronous style was chosen deliberately:
the same code serves the HTTP API, the command-line tools (rebuild, verify)
and the tests, the mature drivers (sqlite3 and psycopg) are used directly,
and every append is serialised on the log head anyway, so an async driver
would add no write concurrency.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from engine.domain.errors import InsufficientStorage
from engine.log.store import APPENDED_KEY
from engine.prepared import execute_driver_sql
from engine.sqlite_read_only import ReadOnlySqlite
from engine.tables import log_head

log = structlog.get_logger(__name__)

SQLITE_FILE = "cairn.db"


# SQLite's result code for a write that found the disk full (SQLITE_FULL).
SQLITE_FULL = 13
# PostgreSQL's SQLSTATE disk_full, class 53 "insufficient resources".
POSTGRES_DISK_FULL = "53100"

# How long a SQLite statement waits for another connection's lock, in
# seconds, before it fails with "database is locked".
SQLITE_BUSY_TIMEOUT = 30.0
# SQLite's primary result codes for a lock that another connection holds
# (SQLITE_BUSY) or that a statement of the same connection holds
# (SQLITE_LOCKED). Extended codes carry the primary one in their low byte.
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
# PostgreSQL's SQLSTATEs for a transaction that failed because of other
# transactions or of the server's state, and that succeeds when it runs
# again: lock_not_available (a lock_timeout ended), serialization_failure,
# deadlock_detected, too_many_connections, and admin_shutdown,
# crash_shutdown and cannot_connect_now while the server stops or starts.
# Class 08, connection_exception, counts too.
POSTGRES_UNAVAILABLE = frozenset(
    {"55P03", "40001", "40P01", "53300", "57P01", "57P02", "57P03"}
)
# The reason that a 503's detail gives for each of those conditions.
_POSTGRES_REASONS: Final = {
    "55P03": "lock timeout",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "53300": "too many connections",
    "57P01": "database server shutting down",
    "57P02": "database server restarting after a crash",
    "57P03": "database server starting up",
}


def is_database_full(error: BaseException) -> bool:
    """Return whether ``error``, or the driver error it wraps, reports that
    the database could not write because its disk is full."""
    driver_error = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    if getattr(driver_error, "sqlite_errorcode", None) == SQLITE_FULL:
        return True
    return getattr(driver_error, "sqlstate", None) == POSTGRES_DISK_FULL


@contextmanager
def database_full_errors() -> Iterator[None]:
    """Raise InsufficientStorage in place of a database error for a full disk."""
    try:
        yield
    except Exception as error:
        if not is_database_full(error):
            raise
        log.error("database_storage_full", error=str(error))
        raise InsufficientStorage(
            "the registry's database is full, so nothing was stored. "
            "Send the request again after space is freed",
            {"reason": str(error).splitlines()[0]},
        ) from error


def is_database_unavailable(error: BaseException) -> bool:
    """Return whether ``error`` reports a database that is busy or
    unreachable for a while, so that the same request can succeed later.

    On SQLite that is a lock that a statement waited for until its busy
    timeout ended. On PostgreSQL it is a lock timeout, serialization failure
    or deadlock, or a server that refuses connections or closes them because
    it stops. A connection pool without a free connection in time counts
    too.
    """
    if isinstance(error, sa.exc.TimeoutError):
        # The pool's wait for a free connection ended.
        return True
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    sqlite_code = getattr(error.orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    driver_error = error.orig
    if driver_error is None or not hasattr(driver_error, "sqlstate"):
        return False
    sqlstate: str | None = driver_error.sqlstate
    if sqlstate is None:
        # psycopg raises OperationalError without a SQLSTATE when it cannot
        # connect, or loses the connection, before the server responds.
        return isinstance(error, sa.exc.OperationalError)
    return sqlstate.startswith("08") or sqlstate in POSTGRES_UNAVAILABLE


def unavailable_reason(error: BaseException) -> str:
    """Name the condition of an error that is_database_unavailable accepts,
    in words that are safe to send to a client.

    The driver's own message is left out, because libpq's message for a
    failed connection names the database server's host, port and user.
    """
    if isinstance(error, sa.exc.TimeoutError):
        return "no database connection free in time"
    driver_error = getattr(error, "orig", None)
    sqlite_code = getattr(driver_error, "sqlite_errorcode", None)
    if sqlite_code is not None:
        if sqlite_code & 0xFF == SQLITE_LOCKED:
            return "database table is locked"
        return "database is locked"
    sqlstate = getattr(driver_error, "sqlstate", None)
    if sqlstate in _POSTGRES_REASONS:
        return _POSTGRES_REASONS[sqlstate]
    return "cannot connect to the database server"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"


def normalise_url(url: str) -> str:
    """Select the psycopg 3 driver for plain ``postgresql://`` URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


class ReadOnlyDatabase(Exception):
    """A write to a SQLite database that was opened read-only."""


class Database:
    """A pair of engines: one for writes, one for reads.

    On SQLite the writer starts every transaction with BEGIN IMMEDIATE, which
    takes the database's write lock at once, so a command's reads and its
    append see one consistent state and concurrent writers queue instead of
    failing on a lock upgrade. Readers use plain BEGIN, and in WAL mode they
    do not wait for the writer, nor it for them. On PostgreSQL ``write()``
    locks the log head row instead, and readers run at REPEATABLE READ.
    """

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        busy_timeout: float = SQLITE_BUSY_TIMEOUT,
        read_only: bool = False,
    ) -> None:
        """Open the engines of ``url``. On SQLite, a statement waits at most
        ``busy_timeout`` seconds for another process's lock.

        On SQLite, ``read_only`` opens the file read-only and creates no
        file beside it (see engine.sqlite_read_only), and write() and
        transaction() raise ReadOnlyDatabase. It raises
        SqliteUnreadable when the file cannot be read that way. PostgreSQL
        ignores ``read_only``: its grants decide what a user may write.
        """
        self.url = normalise_url(url)
        # Called with the events of each write transaction after it commits,
        # from the committing thread; the bus relay uses this to wake up.
        self.append_listeners: list[Callable[[list[Any]], None]] = []
        self.dialect = sa.make_url(self.url).get_backend_name()
        self._read_lock_statement: str | None = None
        self.read_only: ReadOnlySqlite | None = None
        if self.is_sqlite:
            database = sa.make_url(self.url).database or ""
            if read_only:
                self.read_only = ReadOnlySqlite.inspect(Path(database))
            self._writer = _sqlite_engine(
                self.url,
                immediate=True,
                echo=echo,
                busy_timeout=busy_timeout,
                read_only=self.read_only,
            )
            self._reader = _sqlite_engine(
                self.url,
                immediate=False,
                echo=echo,
                busy_timeout=busy_timeout,
                read_only=self.read_only,
            )
            self._group = GroupCommit(self._writer, Path(f"{database}-wal"))
        else:
            self._writer = sa.create_engine(
                self.url, echo=echo, pool_pre_ping=True, pool_size=10
            )
            # READ COMMITTED, PostgreSQL's default, would give each statement
            # of a read its own snapshot.
            self._reader = sa.create_engine(
                self.url,
                echo=echo,
                pool_pre_ping=True,
                pool_size=10,
                isolation_level="REPEATABLE READ",
                execution_options={"postgresql_readonly": True},
            )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def engine(self) -> Engine:
        return self._writer

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """Open a transaction that holds the log's append lock until commit.

        Returns only once the changes are durably committed. On SQLite the
        transaction may be shared with other writers of this process (see
        GroupCommit), and its changes commit or roll back as one unit of it.
        Raises InsufficientStorage when the database's disk is full.
        """
        self._check_writable()
        appended: list[Any] = []
        with database_full_errors(), self._write_connection() as conn:
            if not self.is_sqlite:
                self._lock_head(conn)
            conn.info[APPENDED_KEY] = appended
            try:
                yield conn
            finally:
                conn.info.pop(APPENDED_KEY, None)
        if appended:
            for listener in self.append_listeners:
                listener(appended)

    @contextmanager
    def scratch(self) -> Iterator[Connection]:
        """Open a transaction whose statements all see one state, that may
        write temporary tables only, and that is always rolled back.

        It takes no write lock, so writers go on meanwhile. On SQLite it is
        a deferred transaction of the reader engine, and writes to the
        ``temp`` schema need no lock of the database file. On PostgreSQL a
        read-only transaction may not create tables, so it is a REPEATABLE
        READ transaction of the writer engine that starts like read(). It
        drops the connection's prepared statements first: one prepared
        before a temporary table shadowed its table would go on using the
        stored table.
        """
        if self.is_sqlite:
            with self._reader.connect() as conn:
                transaction = conn.begin()
                try:
                    yield conn
                finally:
                    transaction.rollback()
            return
        with self._writer.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            transaction = conn.begin()
            try:
                execute_driver_sql(conn, "DEALLOCATE ALL")
                execute_driver_sql(conn, self._projection_share_lock())
                yield conn
            finally:
                transaction.rollback()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Connection]:
        """Open a read-write transaction that does not touch the log.

        With ``durable=False`` the commit survives a crash of the process
        but not of the machine: for bookkeeping that a client can redo, such
        as an upload session that has received no blob yet. Raises
        InsufficientStorage when the database's disk is full.
        """
        self._check_writable()
        with database_full_errors():
            if not self.is_sqlite:
                with self._writer.begin() as conn:
                    if not durable:
                        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    yield conn
                return
            with self._group.member(durable=durable) as conn:
                yield conn

    def check_unchanged(self) -> None:
        """Raise SqliteChanged when a SQLite file opened read-only without
        locks was written since it was opened, so that what was read may
        mix two states."""
        if self.read_only is not None:
            self.read_only.check_unchanged()

    def _check_writable(self) -> None:
        if self.read_only is not None:
            raise ReadOnlyDatabase(f"{self.read_only.path} was opened read-only")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Open a read-only transaction whose statements all see one state."""
        with self._reader.connect() as conn, conn.begin():
            if not self.is_sqlite:
                execute_driver_sql(conn, self._projection_share_lock())
            yield conn

    def _projection_share_lock(self) -> str:
        """Return the statement that locks every projection table against
        TRUNCATE for the rest of a PostgreSQL read transaction.

        A rebuild clears the projections with TRUNCATE, which is not
        MVCC-safe: to a transaction whose snapshot predates the rebuild's
        commit and that had not yet touched a table, the table reads as
        empty (PostgreSQL manual, "Concurrency Control", "Caveats"). The
        snapshot is taken at the first query, so a LOCK before it makes the
        reader either finish before the TRUNCATE or take its snapshot after
        the commit.
        """
        if self._read_lock_statement is None:
            from engine.projections.rebuild import projection_tables

            quote = self._reader.dialect.identifier_preparer.quote
            names = ", ".join(quote(table.name) for table in projection_tables())
            self._read_lock_statement = f"LOCK TABLE {names} IN ACCESS SHARE MODE"
        return self._read_lock_statement

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        if self.is_sqlite:
            with self._group.member() as conn:
                yield conn
            return
        with self._writer.begin() as conn:
            yield conn

    @staticmethod
    def _lock_head(conn: Connection) -> None:
        conn.execute(
            sa.select(log_head.c.position).where(log_head.c.id == 1).with_for_update()
        )

    def dispose(self) -> None:
        if self.is_sqlite:
            self._group.close()
        self._writer.dispose()
        self._reader.dispose()


class _SharedTransaction:
    """One SQLite write transaction that writers join one after another."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transaction = conn.begin()
        self.members = 0
        self.durable = False
        # Set when the first member failed or asked for a rollback: the
        # transaction holds only its changes and is rolled back whole.
        self.discard = False
        self.error: BaseException | None = None
        self.finished = threading.Event()


class GroupCommit:
    """Let the SQLite writers of one process share a transaction and its fsync.

    SQLite has one write lock, and each durable commit waits for an fsync
    of the write-ahead log. Writers take turns on a threading
    lock, which hands over as soon as it is released, instead of sleeping in
    SQLite's busy handler with its growing back-off. Each writer after the
    first runs inside a SAVEPOINT of the open transaction, so its failure
    rolls back only its own changes. The first writer needs none: until it
    finishes, the transaction holds only its changes, so its failure rolls
    back the whole transaction. A SAVEPOINT opened at the start of a
    transaction would make SQLite copy the original of every page the
    writer changes into a statement journal. A writer that finishes while
    others wait hands its turn to the next and then waits for the commit.
    The last writer, or the MAX_MEMBERS-th, commits for all of them. No
    writer returns before the commit that contains its changes, so a 201
    still means durable. Writers in other processes still wait in the busy
    handler.

    The connections run with synchronous=NORMAL, and a shared transaction
    with at least one durable member fsyncs the write-ahead log after its
    commit. That is what synchronous=FULL does after every commit, but
    SQLite cannot change the setting inside a transaction, and a shared
    transaction learns whether it must be durable only as members join.
    """

    MAX_MEMBERS = 32
    _SAVEPOINT = "cairn_member"

    def __init__(self, engine: Engine, wal: Path) -> None:
        self._engine = engine
        self._wal = wal
        self._wal_inode: int | None = None
        self._turn = threading.Lock()
        self._guard = threading.Lock()
        self._waiting = 0
        self._open: _SharedTransaction | None = None
        # One connection serves every shared transaction in turn, which
        # saves a pool checkout and reset per transaction.
        self._connection: Connection | None = None

    @contextmanager
    def member(
        self, *, rollback: bool = False, durable: bool = True
    ) -> Iterator[Connection]:
        """Run the caller's statements as one member of a shared transaction;
        ``rollback`` discards them even when they succeed, and ``durable``
        makes the commit wait until they are on disk."""
        shared = self._join()
        first = shared.members == 1
        if not first:
            try:
                execute_driver_sql(shared.conn, f"SAVEPOINT {self._SAVEPOINT}")
            except BaseException as exc:
                shared.error = exc
                self._leave(shared)
                raise
        failure: BaseException | None = None
        try:
            yield shared.conn
        except BaseException as exc:
            failure = exc
        keep = failure is None and not rollback
        shared.durable = shared.durable or (keep and durable)
        if first:
            shared.discard = not keep
        else:
            try:
                if not keep:
                    execute_driver_sql(shared.conn, f"ROLLBACK TO {self._SAVEPOINT}")
                execute_driver_sql(shared.conn, f"RELEASE {self._SAVEPOINT}")
            except BaseException as exc:
                shared.error = exc
                failure = failure or exc
        self._leave(shared)
        if failure is not None:
            raise failure
        if shared.error is not None:
            raise shared.error

    def _join(self) -> _SharedTransaction:
        with self._guard:
            self._waiting += 1
        self._turn.acquire()
        with self._guard:
            self._waiting -= 1
        shared = self._open
        if shared is None:
            try:
                if self._connection is None:
                    self._connection = self._engine.connect()
                shared = _SharedTransaction(self._connection)
            except BaseException:
                self._drop_connection()
                self._turn.release()
                raise
            self._open = shared
        shared.members += 1
        return shared

    def _leave(self, shared: _SharedTransaction) -> None:
        with self._guard:
            others_waiting = self._waiting > 0
        if (
            others_waiting
            and shared.error is None
            and not shared.discard
            and shared.members < self.MAX_MEMBERS
        ):
            self._turn.release()
            shared.finished.wait()
            return
        self._open = None
        try:
            if shared.error is None and not shared.discard:
                shared.transaction.commit()
                if shared.durable:
                    self._sync_wal()
            else:
                shared.transaction.rollback()
        except BaseException as exc:
            shared.error = shared.error or exc
            log.error("group_commit_failed", members=shared.members, error=str(exc))
            self._drop_connection()
        finally:
            self._turn.release()
            shared.finished.set()

    def close(self) -> None:
        """Close the writers' connection; the next writer opens a new one."""
        with self._turn:
            self._drop_connection()

    def _drop_connection(self) -> None:
        # After a failed commit or rollback the connection's state is
        # unknown, so it is discarded instead of returned to the pool.
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.invalidate()
            connection.close()
        except Exception as exc:
            log.warning("writer_connection_close_failed", error=str(exc))

    def _sync_wal(self) -> None:
        # fdatasync flushes the file's data whichever descriptor wrote it.
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            # SQLite removes the log only after checkpointing it into the
            # database file and syncing that.
            return
        try:
            os.fdatasync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if inode != self._wal_inode:
            # A new log file's directory entry must be durable too.
            directory = os.open(self._wal.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._wal_inode = inode


def _sqlite_engine(
    url: str,
    *,
    immediate: bool,
    echo: bool,
    busy_timeout: float,
    read_only: ReadOnlySqlite | None = None,
) -> Engine:
    options: dict[str, Any] = {}
    if read_only is not None:
        # The URL still selects SQLAlchemy's pool for a database file.
        options["creator"] = lambda: read_only.connect(busy_timeout)
    engine = sa.create_engine(
        url,
        echo=echo,
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
        pool_size=8,
        max_overflow=8,
        **options,
    )
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions
        # begin; the module's own implicit BEGIN would defeat BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if read_only is None:
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL syncs the log at checkpoints only; GroupCommit syncs it
            # after every durable commit, so a committed push survives a
            # power cut, not only a process crash.
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        execute_driver_sql(conn, begin)

    return engine
