"""Partial files, through which an OCI layout target writes every file.

A file appears under its final name only whole: it is written as
``.partial-<name>-<32 hex digits>`` beside that name, fsynced and renamed.
Its writer holds an exclusive flock(2) on it from its creation until the
rename, so that a mirror can tell a partial file whose writer was killed
(no process holds its lock) from one that another mirror is writing.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final, NamedTuple

import structlog

log = structlog.get_logger(__name__)

PREFIX: Final = ".partial-"
# <name> is the file that the partial file becomes: a blob named by its
# sha256 or sha512 digest, index.json or oci-layout.
_PARTIAL_NAME: Final = re.compile(
    r"\.partial-(?:[0-9a-f]{64}|[0-9a-f]{128}|index\.json|oci-layout)-[0-9a-f]{32}"
)


class PartialFile:
    """A new, locked partial file that ``commit`` renames to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        while True:
            self.temp = path.with_name(f"{PREFIX}{path.name}-{uuid.uuid4().hex}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            descriptor = os.open(self.temp, flags, 0o666)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            # A mirror that started may have found the file unlocked, between
            # its creation and the lock, and removed it.
            if os.fstat(descriptor).st_nlink > 0:
                break
            os.close(descriptor)
        self.handle = os.fdopen(descriptor, "wb")

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def commit(self) -> None:
        """Fsync the file and rename it to ``path``, then release the lock."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        os.replace(self.temp, self.path)
        self.handle.close()
        sync_dir(self.path.parent)

    def discard(self) -> None:
        """Remove the file, then release the lock."""
        self.temp.unlink(missing_ok=True)
        self.handle.close()


def write_atomically(path: Path, data: bytes) -> None:
    partial = PartialFile(path)
    try:
        partial.write(data)
        partial.commit()
    except BaseException:
        partial.discard()
        raise


def copy_atomically(origin: Path, path: Path) -> None:
    partial = PartialFile(path)
    try:
        with origin.open("rb") as source:
            shutil.copyfileobj(source, partial.handle)
        partial.commit()
    except BaseException:
        partial.discard()
        raise


def find_partial_files(root: Path) -> list[Path]:
    """List the files under ``root`` named as partial files, and no others."""
    found: list[Path] = []
    for directory, _, names in os.walk(root):
        found.extend(
            Path(directory) / name for name in names if _PARTIAL_NAME.fullmatch(name)
        )
    return found


class Removal(NamedTuple):
    """The outcome of remove_abandoned: the files removed, their bytes, and
    the files left because another process holds them locked."""

    files: int
    size: int
    locked: int


def remove_abandoned(paths: Iterable[Path]) -> Removal:
    """Remove the regular files among ``paths`` that no process holds
    locked.

    The lock is taken before the removal and held through it, so a writer
    that creates its file meanwhile sees it removed and starts another.
    """
    removed = size = locked = 0
    directories: set[Path] = set()
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            # Gone, renamed into place, or a symbolic link.
            continue
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked += 1
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning(
                    "partial_file_not_removed",
                    path=str(path),
                    error=error.strerror or str(error),
                )
                continue
        finally:
            os.close(descriptor)
        removed += 1
        size += info.st_size
        directories.add(path.parent)
    for directory in directories:
        sync_dir(directory)
    return Removal(removed, size, locked)


def sync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
