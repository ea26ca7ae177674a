"""`cairn db backup`: a consistent copy of a SQLite database while it is in use.

A copy of ``cairn.db`` made with cp lacks the commits that still wait in
``cairn.db-wal``. SQLite's online backup copies every page in one step by
default (Python's sqlite3 documentation, Connection.backup), in one read
transaction that includes the write-ahead log. In WAL mode writers go on
meanwhile, and the copy is one state of the log. The
copy goes to a temporary file beside the target, is synced, and is then
linked into place, so the target is either absent or complete.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from engine.blobs.directories import fsync_directory


class BackupTargetExists(Exception):
    """The backup's target file already exists."""


def backup_sqlite(source: Path, target: Path) -> int:
    """Copy the SQLite database ``source`` to the new file ``target`` and
    return the log position that the copy ends at.

    Raises BackupTargetExists when ``target`` exists, and sqlite3.Error or
    OSError when the copy fails, leaving no file at ``target``.
    """
    # lexists: a dangling symbolic link is a file that the backup keeps too.
    if os.path.lexists(target):
        raise BackupTargetExists(str(target))
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    reader = sqlite3.connect(f"file:{quote(str(source.absolute()))}?mode=ro", uri=True)
    try:
        writer = sqlite3.connect(temporary)
        try:
            reader.backup(writer)
            (position,) = writer.execute(
                "SELECT position FROM log_head WHERE id = 1"
            ).fetchone()
        finally:
            writer.close()
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        # link(2), unlike rename(2), fails on a name that exists meanwhile.
        try:
            os.link(temporary, target)
        except FileExistsError:
            raise BackupTargetExists(str(target)) from None
        fsync_directory(target.parent)
    finally:
        reader.close()
        temporary.unlink(missing_ok=True)
    return int(position)
