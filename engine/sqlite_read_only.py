"""Open a SQLite database for reading without writing to it or beside it.

`cairn verify` and `cairn gc --dry-run` must work on a data directory that
their user may only read, such as another account's directory or a
read-only mount. cairn keeps SQLite in WAL mode, and a plain connection to
a WAL-mode database creates the ``-wal`` and ``-shm`` files beside it, so it
fails where it may not. SQLite 3.40.1, the version these rules were tested
with, behaves as follows for a user who may not write the directory:

- ``mode=ro`` reads the database, the write-ahead log included, when both
  ``-wal`` and ``-shm`` exist, even when that user may not write them. A
  running or crashed `cairn serve` leaves both. A user who may write
  ``-shm`` still updates its lock slots, as every reader does.
- ``mode=ro`` fails without them ("attempt to write a readonly database"),
  and with ``-wal`` but no ``-shm`` ("unable to open database file"). A
  user who may write the directory gets both files created, and they stay
  after the connection closes, owned by that user.
- ``immutable=1`` reads the database file alone, takes no locks and ignores
  a ``-wal`` file, so it misses every change that the log still holds.

So immutable=1 is used only when none of ``-wal``, ``-shm`` and
``-journal`` exists, when the database file contains every committed change.
A `cairn serve` that starts meanwhile writes its changes to a new ``-wal``
file, which the reader does not see, and they reach the database file only
at a checkpoint. check_unchanged() detects such a checkpoint by the file's
status, and otherwise the reader saw the state from before that serve.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

# The files beside a SQLite database that hold changes not yet in it, or
# the index of those changes: the write-ahead log, its shared-memory index,
# and the rollback journal of a database not in WAL mode.
SIDE_FILE_SUFFIXES = ("-wal", "-shm", "-journal")


class SqliteUnreadable(Exception):
    """A SQLite database that cannot be read without creating a file in
    ``directory``, which is not writable. ``reason`` gives the cause and
    the next step."""

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"{directory} is not writable, and {reason}")
        self.directory = directory
        self.reason = reason


class SqliteChanged(Exception):
    """A database file read with immutable=1 that changed during the read."""


@dataclass(frozen=True, slots=True)
class ReadOnlySqlite:
    """How to open the SQLite database at ``path`` read-only.

    ``status`` is the file's status before the first read, kept when
    ``immutable`` is true, so that check_unchanged() can compare it.
    """

    path: Path
    immutable: bool
    status: os.stat_result | None

    @classmethod
    def inspect(cls, path: Path) -> ReadOnlySqlite:
        """Choose immutable=1 or mode=ro for ``path`` from the files beside it.

        Raises SqliteUnreadable for a ``-wal`` file without its ``-shm``
        file in a directory that this process may not write, which SQLite
        cannot read. Raises FileNotFoundError for a missing database.
        """
        # The status comes first: a checkpoint that ends after it and
        # removes the -wal file before the check below changes the file,
        # which check_unchanged() then reports.
        status = path.stat()
        present = {
            suffix for suffix in SIDE_FILE_SUFFIXES if Path(f"{path}{suffix}").exists()
        }
        if not present:
            return cls(path, immutable=True, status=status)

        directory = path.parent
        shm_needed = "-wal" in present and "-shm" not in present
        if shm_needed and not os.access(directory, os.W_OK | os.X_OK):
            raise SqliteUnreadable(
                directory,
                f"SQLite can read the changes in {path.name}-wal only by "
                f"creating {path.name}-shm there: run the command as a user "
                "who may write the directory, or start and stop cairn serve "
                f"once, which moves those changes into {path.name}",
            )
        return cls(path, immutable=False, status=None)

    def uri(self) -> str:
        """Return the URI to pass to sqlite3.connect with ``uri=True``."""
        # quote() escapes "?", "#" and "%", which would end the path.
        options = "mode=ro&immutable=1" if self.immutable else "mode=ro"
        return f"file:{quote(str(self.path.absolute()))}?{options}"

    def connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(
            self.uri(), uri=True, timeout=timeout, check_same_thread=False
        )

    def check_unchanged(self) -> None:
        """Raise SqliteChanged when the database file read with immutable=1
        was written, moved or replaced since inspect() looked at it."""
        if self.status is None:
            return
        try:
            current = self.path.stat()
        except FileNotFoundError:
            current = None
        if current is None or _identity(current) != _identity(self.status):
            raise SqliteChanged(
                f"{self.path} changed while it was read without locks, which "
                "happens when cairn serve starts during the run: run the "
                "command again"
            )


def _identity(status: os.stat_result) -> tuple[int, int, int, int, int]:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )
