"""Leader election for the relay: one active relay per database and stream.

On PostgreSQL the leader takes a session-level advisory lock on a connection
of its own. The lock lasts until that session ends, so a leader that dies or
loses its connection frees it, and another process takes it on its next try.
On SQLite the leader takes an exclusive ``flock`` on a file beside the
database, which the kernel releases when the process exits.

Every method blocks on the database or the file system; the relay calls them
from worker threads, and a lock in each class keeps two calls (a release at
shutdown racing a pending acquire) from using one connection at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import IO, Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from engine.db import Database

log = structlog.get_logger(__name__)


class Leadership(Protocol):
    """A lock that at most one relay holds at a time."""

    def try_acquire(self) -> bool:
        """Take the lock if it is free; return whether this relay holds it."""
        ...

    def check(self) -> bool:
        """Return whether the lock is still held, after ``try_acquire`` succeeded."""
        ...

    def release(self) -> None: ...


def lock_key(name: str) -> int:
    """Map a relay name to a signed 64-bit PostgreSQL advisory lock key."""
    digest = hashlib.sha256(f"cairn relay {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresLeadership:
    """A session-level advisory lock on a dedicated PostgreSQL connection.

    NOTE: the lock needs a real session, so the database URL must not point
    at a pooler in transaction mode (such as PgBouncer with
    pool_mode=transaction), where the lock would follow a pooled connection.
    """

    def __init__(self, url: str, name: str) -> None:
        self.key = lock_key(name)
        self.name = name
        # TCP keepalives make a check on a dead link fail within about half a
        # minute (10 s idle, then 3 probes 5 s apart) instead of hanging. The
        # server ends the session the same way and frees the lock.
        self._engine = sa.create_engine(
            url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "application_name": f"cairn relay {name}",
            },
        )
        self._conn: Connection | None = None
        self._locked = False
        self._mutex = threading.Lock()

    def try_acquire(self) -> bool:
        with self._mutex:
            if self._locked:
                return True
            if self._conn is None:
                self._conn = self._engine.connect()
            try:
                locked = self._conn.execute(
                    sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
                ).scalar_one()
            except sa.exc.DBAPIError:
                self._drop()
                raise
            self._locked = bool(locked)
            return self._locked

    def check(self) -> bool:
        with self._mutex:
            if self._conn is None or not self._locked:
                return False
            try:
                self._conn.execute(sa.text("SELECT 1"))
            except sa.exc.DBAPIError as error:
                log.warning(
                    "relay_lock_connection_lost", relay=self.name, error=str(error)
                )
                self._drop()
                return False
            return True

    def release(self) -> None:
        with self._mutex:
            if self._conn is not None and self._locked:
                try:
                    self._conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}
                    )
                except sa.exc.DBAPIError as error:
                    # The session is gone, and the lock with it.
                    log.info("relay_unlock_failed", relay=self.name, error=str(error))
            self._drop()
            self._engine.dispose()

    def _drop(self) -> None:
        self._locked = False
        if self._conn is not None:
            with contextlib.suppress(sa.exc.DBAPIError):
                self._conn.close()
            self._conn = None


class FileLeadership:
    """An exclusive, non-blocking ``flock`` on a lock file.

    The lock belongs to the open file description, so two relays in one
    process exclude each other too. The file contains the leader's PID for
    operators, and its presence alone means nothing. A lock counts only while
    the path still names the locked file: once the file is deleted or
    replaced, another relay can lock a new file at the same path, so
    ``check`` then returns False and this relay steps down.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._mutex = threading.Lock()

    def try_acquire(self) -> bool:
        with self._mutex:
            if self._file is not None:
                return True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            if not _names_open_file(self.path, handle):
                # Another process deleted or replaced the file between the
                # open and the flock; the next try opens the new one.
                handle.close()
                return False
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._file = handle
            return True

    def check(self) -> bool:
        with self._mutex:
            if self._file is None:
                return False
            if _names_open_file(self.path, self._file):
                return True
            log.warning("relay_lock_file_replaced", path=str(self.path))
            return False

    def release(self) -> None:
        with self._mutex:
            if self._file is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._file.close()
                self._file = None


def _names_open_file(path: Path, handle: IO[str]) -> bool:
    """Return whether ``path`` still names the file that ``handle`` has open."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)


def leadership_for(database: Database, data_dir: Path, name: str) -> Leadership:
    """Choose the advisory lock on PostgreSQL and a lock file on SQLite.

    The lock file sits beside the SQLite database file, because every process
    that shares the database must find the same file. An in-memory database
    uses the data directory.
    """
    if not database.is_sqlite:
        return PostgresLeadership(database.url, name)
    database_file = sa.make_url(database.url).database
    if database_file and database_file != ":memory:":
        path = Path(database_file).with_name(
            f"{Path(database_file).name}.relay-{name}.lock"
        )
    else:
        path = data_dir / f"relay-{name}.lock"
    return FileLeadership(path)
