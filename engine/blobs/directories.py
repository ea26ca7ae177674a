"""Durable entries for the two-hex-digit blob directories.

A commit fsyncs the directory it renames its blob into, which makes the
blob's entry durable but not the directory's own entry in
``blobs/<algorithm>/``. That entry is new whenever the directory was
created, for the first time or again after garbage collection removed it,
possibly by another commit or another process that has not yet fsynced the
parents. A commit may return only once both entries are on disk, so it
also fsyncs the parents the first time it meets a directory that this
process does not know to be durable.

A directory is known by its device, inode number and inode generation,
which the FS_IOC_GETVERSION ioctl reads. ext4 reuses a freed inode number
at once but gives the new inode another generation: a directory removed
and made again had the same number and a new generation (seen on ext4).
So a directory that gc removed and a commit created again is not mistaken
for the old one. The directories that exist at a store's
first commit into an algorithm's tree are known after one fsync of that
tree.

On a file system without the ioctl, such as tmpfs or overlayfs, only the
commit that created the directory fsyncs the parents.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from pathlib import Path
from typing import Final

# FS_IOC_GETVERSION, _IOR('v', 1, long) in linux/fs.h; the kernel writes a
# 32-bit generation number.
FS_IOC_GETVERSION: Final = 0x80087601

Identity = tuple[int, int, int]


class DurableDirectories:
    """The blob directories whose entries are on disk, as far as this store
    has seen them synced."""

    def __init__(self) -> None:
        self._known: set[Identity] = set()
        self._seeded: set[Path] = set()
        self._seeding = threading.Lock()

    def sync(self, directory: Path, *, created: bool) -> None:
        """Fsync ``directory`` and, unless its entry is known to be durable,
        its parent and grandparent.

        ``created`` is true when the caller created ``directory``; it counts
        only where the file system gives no inode generation. Raises
        FileNotFoundError when ``directory`` does not exist.
        """
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
            identity = _identity(fd)
        finally:
            os.close(fd)
        if identity is None:
            if created:
                _fsync_parents(directory)
            return
        self._seed(directory.parent)
        if identity in self._known:
            return
        _fsync_parents(directory)
        self._known.add(identity)

    def _seed(self, algorithm_dir: Path) -> None:
        """Know every directory under ``algorithm_dir`` at the first call."""
        if algorithm_dir in self._seeded:
            return
        with self._seeding:
            if algorithm_dir in self._seeded:
                return
            # Listed before the fsync, so the fsync covers every entry found.
            found: set[Identity] = set()
            for entry in os.scandir(algorithm_dir):
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                try:
                    identity = _identity(fd)
                finally:
                    os.close(fd)
                if identity is not None:
                    found.add(identity)
            fsync_directory(algorithm_dir)
            fsync_directory(algorithm_dir.parent)
            self._known |= found
            self._seeded.add(algorithm_dir)


def _identity(fd: int) -> Identity | None:
    """Return the device, inode and generation of ``fd``; None where the
    file system gives no generation."""
    buffer = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buffer, True)
    except OSError:
        return None
    status = os.fstat(fd)
    return status.st_dev, status.st_ino, int.from_bytes(buffer[:4], sys.byteorder)


def _fsync_parents(directory: Path) -> None:
    fsync_directory(directory.parent)
    fsync_directory(directory.parent.parent)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
