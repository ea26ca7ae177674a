"""Blob bytes on content-addressed disk.

Layout under the data directory, and nowhere else:

    blobs/<algorithm>/<first two hex>/<hex>    committed, immutable blobs
    uploads/<upload id>                        staging files being written

A committed blob is written to its staging file, verified, fsynced, and
renamed into place, then its directory is fsynced. A crash at any point
therefore leaves either no blob at its path or the whole, correct one.

Garbage collection removes a two-hex-digit directory once it is empty,
without any lock that a commit takes. A commit whose rename finds the
directory gone creates it again and retries. A commit also fsyncs the
directory's parents when it cannot tell that the directory's own entry is
durable (see DurableDirectories).

A write or commit that fails because the disk or the quota is full (ENOSPC,
EDQUOT) raises InsufficientStorage, and a commit that fails removes its
staging file.

Large writes bypass the page cache: the whole aligned blocks of a write of at
least PARALLEL_WRITE_BYTES go to the staging file with O_DIRECT, when the
file system takes it. On the virtual machines cairn was measured on, copying
a new blob into page-cache memory cost more than the disk write itself. Once
such a blob is committed, a low-priority thread reads it back through the page
cache, so that pulls soon after find it there. It reads the bytes instead of
only asking the kernel to load them (POSIX_FADV_WILLNEED): on those machines
the first access of the guest's CPU to a page the guest has not used before,
or has freed and the host has taken back, costs several microseconds, so a
pull of pages that the kernel only loaded ran at about 400 MiB/s.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import mmap
import os
import queue
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import structlog

from engine.blobs.directories import DurableDirectories
from engine.domain.digest import Digest, DigestVerifier
from engine.domain.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    DigestMismatch,
    InsufficientStorage,
)

log = structlog.get_logger(__name__)

READ_CHUNK = 1024 * 1024

# A staging file starts writing its pages back to disk in the background
# every this many bytes, so the fsync at commit finds little left to flush
# and the disk works while the network still delivers.
BACKGROUND_SYNC_BYTES = 32 * 1024 * 1024
_SYNCER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cairn-blob-sync")

# Writes of at least this many bytes go to the file in a helper thread while
# the calling thread hashes them. Both release the GIL, so a large upload
# uses two cores.
PARALLEL_WRITE_BYTES = 256 * 1024
_WRITER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cairn-blob-write")


# O_DIRECT writes move whole blocks between a memory buffer and a file
# offset both aligned to the device's logical block size. 4096 is a multiple
# of every common one (512 and 4096).
DIRECT_ALIGNMENT: Final = 4096
# Size of the page-aligned buffer through which a staged blob's O_DIRECT
# writes pass.
DIRECT_BUFFER_BYTES: Final = 1024 * 1024
# Aligned buffers kept for reuse once their upload request ends. A chunked
# upload takes one for every PATCH, and on the virtual machines cairn was
# measured on, the first touch of each page of a new mapping cost several
# microseconds (BENCHMARKS.md, "Fresh guest memory and the pull of a new blob").
IDLE_DIRECT_BUFFERS: Final = 4
# One thread reads committed blobs back into the page cache (see the module
# docstring) at this nice value, so that uploads and downloads get the CPU
# first.
WARM_NICE: Final = 10
# Maximum number of blobs waiting to be read back. When uploads arrive faster
# than the thread reads, the blobs that find the queue full are skipped.
WARM_QUEUE_LIMIT: Final = 8

# Maximum number of renames a commit tries when garbage collection keeps
# removing its blob's directory between the mkdir and the rename.
RENAME_ATTEMPTS: Final = 10

# A full file system and an exhausted disk quota.
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextmanager
def disk_full_errors() -> Iterator[None]:
    """Raise InsufficientStorage in place of an OSError for a full disk."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        raise InsufficientStorage(
            "the registry's storage is full, so the blob was not stored. "
            "Push it again after space is freed",
            {"reason": os.strerror(error.errno)},
        ) from error


_File = TypeVar("_File")


def create_staging_file(path: Path, create: Callable[[Path], _File]) -> _File:
    """Return ``create(path)``, which creates the staging file ``path``.

    When the staging directory is missing, because someone removed it while
    cairn ran, it is created again and ``create`` called once more, so that
    uploads do not fail until a restart. A full disk raises
    InsufficientStorage.
    """
    try:
        with disk_full_errors():
            return create(path)
    except FileNotFoundError:
        if path.parent.is_dir():
            raise
    log.warning("staging_directory_recreated", directory=str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_errors():
        return create(path)


def _open_new(path: Path) -> io.BufferedRandom:
    return open(path, "w+b")


def _create_exclusive(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL, 0o666)


def is_upload_id(value: str) -> bool:
    """Return True when ``value`` is a UUID in the form that cairn issues as
    an upload id: lowercase hexadecimal digits in hyphenated groups.

    uuid.UUID also parses uppercase digits, braces, a ``urn:uuid:`` prefix
    and digits without hyphens. Those spellings are not upload ids, so that
    each upload has one name.
    """
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class BlobPaths:
    """Every on-disk path cairn uses for blobs comes from here."""

    root: Path

    def blob(self, digest: Digest) -> Path:
        return (
            self.root / "blobs" / digest.algorithm / digest.encoded[:2] / digest.encoded
        )

    def staging(self, upload_id: str) -> Path:
        # The id is always a UUID that cairn generated. Checking it again
        # here keeps a client-chosen id from reaching the filesystem as a
        # path, or another spelling of a real id from reaching its file.
        if not is_upload_id(upload_id):
            raise ValueError(f"invalid upload id: {upload_id!r}")
        return self.root / "uploads" / upload_id

    @property
    def staging_dir(self) -> Path:
        return self.root / "uploads"


class StagingLock:
    """An exclusive flock on a staging file, released by close()."""

    def __init__(self, fd: int, *, created: bool) -> None:
        self._fd = fd
        self.created = created

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StagingLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stat_if_named(path: Path, fd: int) -> os.stat_result | None:
    """Return the status of the file open as ``fd`` while ``path`` still
    names it, and None once the file was renamed, removed or replaced."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return None
    opened = os.fstat(fd)
    if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
        return None
    return opened


class StagedBlob:
    """A staging file being appended to while its sha256 is computed.

    ``offset`` is the number of bytes written. Not thread-safe: one writer at
    a time, which the upload service guarantees with a per-upload lock.
    With ``direct_io``, large writes use O_DIRECT (see the module docstring),
    and ``wrote_direct`` tells whether any did.
    """

    def __init__(self, path: Path, offset: int = 0, *, direct_io: bool = False) -> None:
        self.path = path
        self.offset = offset
        self.wrote_direct = False
        self._verifier = DigestVerifier("sha256")
        self._unsynced = 0
        self._sync: Future[None] | None = None
        self._direct_io = direct_io
        self._direct_fd: int | None = None
        self._aligned: mmap.mmap | None = None
        try:
            self._file = open(path, "r+b")  # noqa: SIM115
        except FileNotFoundError:
            if offset:
                raise
            # A new, empty file needs no truncating or rehashing.
            self._file = create_staging_file(path, _open_new)
            return
        if offset:
            self._rehash_prefix(offset)
        self._file.truncate(offset)
        self._file.seek(offset)

    def matches_path(self) -> bool:
        """Return True when ``path`` still names this open file and the file
        is ``offset`` bytes long.

        Another process may have written to the file, or a lost file may have
        been replaced by a new one at the same path.
        """
        if self._file.closed:
            return False
        status = _stat_if_named(self.path, self._file.fileno())
        return status is not None and status.st_size == self.offset

    def _rehash_prefix(self, offset: int) -> None:
        remaining = offset
        self._file.seek(0)
        while remaining:
            chunk = self._file.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise BlobUploadUnknown(
                    "upload staging file is shorter than its recorded offset",
                    {"path": self.path.name, "offset": offset},
                )
            self._verifier.update(chunk)
            remaining -= len(chunk)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. After an error the file and hash are unusable,
        and the caller must close the staged blob and discard the file."""
        with disk_full_errors():
            self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= PARALLEL_WRITE_BYTES:
            written: Future[object]
            if self._direct_io:
                self._file.flush()
                written = _WRITER.submit(self._write_direct, data)
            else:
                written = _WRITER.submit(self._file.write, data)
            try:
                self._verifier.update(data)
            finally:
                # The file must not be touched again before this write ends.
                written.result()
        else:
            self._file.write(data)
            self._verifier.update(data)
        self.offset += len(data)
        self._unsynced += len(data)
        if self._unsynced >= BACKGROUND_SYNC_BYTES and (
            self._sync is None or self._sync.done()
        ):
            sync_error = self._wait_for_sync()
            if sync_error is not None:
                raise sync_error
            self._file.flush()
            self._sync = _SYNCER.submit(os.fdatasync, self._file.fileno())
            self._unsynced = 0

    def _write_direct(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``self.offset`` with positioned writes, its whole
        aligned blocks through the O_DIRECT descriptor, then move the file
        object's position past it.

        The bytes before the first block boundary and after the last one go
        through the page cache, and so does everything once the kernel has
        rejected an O_DIRECT write with EINVAL.
        """
        view = memoryview(data).cast("B")
        fd = self._file.fileno()
        offset = self.offset
        head = min(-offset % DIRECT_ALIGNMENT, len(view))
        end = head + (len(view) - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        _pwrite_all(fd, view[:head], offset)
        position = head
        while position < end and self._direct_io:
            length = min(end - position, DIRECT_BUFFER_BYTES)
            if self._pwrite_direct(
                view[position : position + length], offset + position
            ):
                position += length
        _pwrite_all(fd, view[position:], offset + position)
        self._file.seek(offset + len(view))

    def _pwrite_direct(self, block: memoryview, offset: int) -> bool:
        """Write ``block`` at ``offset`` with O_DIRECT and return True, or
        return False after turning O_DIRECT off for this file."""
        if self._aligned is None:
            self._aligned = _DIRECT_BUFFERS.acquire()
        self._aligned[: len(block)] = block
        try:
            if self._direct_fd is None:
                self._direct_fd = self._open_direct()
            _pwrite_all(
                self._direct_fd, memoryview(self._aligned)[: len(block)], offset
            )
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            log.warning("direct_io_rejected", path=self.path.name, error=str(error))
            self._release_direct(reuse=False)
            self._direct_io = False
            return False
        self.wrote_direct = True
        return True

    def _open_direct(self) -> int:
        """Open the file that ``self._file`` has open again, with O_DIRECT.

        It is opened through /proc/self/fd, so that a staging file that gc
        removed while the upload stalled still takes the write, as the open
        file does, and the upload's session check then reports the removal.
        """
        flags = os.O_WRONLY | os.O_DIRECT
        try:
            return os.open(f"/proc/self/fd/{self._file.fileno()}", flags)
        except FileNotFoundError:
            # No /proc: open the file by its name.
            return os.open(self.path, flags)

    def release_direct_io(self) -> None:
        """Close the O_DIRECT descriptor and release the aligned buffer.

        An upload between two chunks keeps its staged blob open, so it
        releases these instead of holding 1 MiB of memory while it waits.
        The next large write opens them again. Only the thread that writes
        the upload may call this, once its writes have ended.
        """
        self._release_direct(reuse=True)

    def _release_direct(self, *, reuse: bool) -> None:
        """Close the O_DIRECT descriptor and drop the aligned buffer, keeping
        it for another upload only with ``reuse``.

        A close from another thread, such as the purge of an expired upload,
        may come while a write still copies into the buffer, which must then
        not reach another upload.
        """
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self._aligned is not None and reuse:
            _DIRECT_BUFFERS.release(self._aligned)
        # A dropped mapping is unmapped when its last reference goes. Closing
        # it here would fail while a traceback still keeps a view of it.
        self._aligned = None

    def _wait_for_sync(self) -> BaseException | None:
        """Wait for the background fdatasync and return its error, if any.

        The descriptor must outlive any fdatasync still running on it. On
        Linux a later fsync of the same descriptor succeeds after a failed
        writeback (PostgreSQL wiki, "Fsync Errors"), so an error here may be
        the only report of lost bytes.
        """
        error = None
        if self._sync is not None:
            error = self._sync.exception()
            self._sync = None
        return error

    def flush(self) -> None:
        with disk_full_errors():
            self._file.flush()

    def digest(self, algorithm: str = "sha256") -> Digest:
        """Return the digest of everything written, in ``algorithm``."""
        if algorithm == "sha256":
            return self._verifier.digest()
        self.flush()
        hasher = hashlib.new(algorithm)
        with open(self.path, "rb") as stream:
            while chunk := stream.read(READ_CHUNK):
                hasher.update(chunk)
        return Digest(algorithm, hasher.hexdigest())

    def close(self) -> None:
        """Close the file, ignoring unsynced bytes that cannot be written.

        Only a staging file that will be written again or discarded is
        closed this way, and a commit uses sync_and_close.
        """
        self._wait_for_sync()
        self._release_direct(reuse=False)
        try:
            self._file.close()
        except OSError as error:
            # The close still released the descriptor. The bytes that could
            # not be flushed are past the offset that the session records.
            log.warning(
                "staging_file_close_failed", path=self.path.name, error=str(error)
            )

    def sync_and_close(self) -> None:
        """Flush and fsync the file, then close it. Raise if any byte may not
        have reached the disk."""
        try:
            with disk_full_errors():
                self._file.flush()
                sync_error = self._wait_for_sync()
                if sync_error is not None:
                    raise sync_error
                os.fsync(self._file.fileno())
        except BaseException:
            self.close()
            raise
        self._release_direct(reuse=True)
        self._file.close()


class BlobStore:
    """Content-addressed blob files; each blob is stored once.

    A store opened ``read_only`` neither creates ``blobs/`` and ``uploads/``
    nor probes ``uploads/`` for O_DIRECT, so it works in a directory that
    its user may only read.
    """

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.paths = BlobPaths(root)
        self._directories = DurableDirectories()
        self.direct_io = False
        if read_only:
            return
        self.paths.staging_dir.mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.direct_io = accepts_direct_io(self.paths.staging_dir)

    def exists(self, digest: Digest) -> bool:
        return self.paths.blob(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        try:
            return self.paths.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    def path(self, digest: Digest) -> Path:
        return self.paths.blob(digest)

    def stage(self, upload_id: str, offset: int = 0) -> StagedBlob:
        """Open the staging file of ``upload_id`` for appending at ``offset``."""
        path = self.paths.staging(upload_id)
        if offset and not path.exists():
            raise BlobUploadUnknown(
                "upload staging file is missing", {"upload": upload_id}
            )
        if offset and path.stat().st_size < offset:
            offset = path.stat().st_size
        return StagedBlob(path, offset, direct_io=self.direct_io)

    def lock_staging(self, upload_id: str) -> StagingLock:
        """Take an exclusive flock on the staging file of ``upload_id``,
        waiting while another thread or process holds it.

        The lock orders the requests of one upload across cairn serve
        processes that share the data directory. A missing file is created
        empty, and then the lock's ``created`` is True. A file renamed or removed
        while this call waited is replaced in the same way.
        """
        path = self.paths.staging(upload_id)
        # Linux's NFS client emulates flock with an fcntl byte-range lock,
        # and an exclusive one needs a file open for writing (flock(2)).
        while True:
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                try:
                    fd = create_staging_file(path, _create_exclusive)
                except FileExistsError:
                    continue
                created = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _stat_if_named(path, fd) is not None:
                    return StagingLock(fd, created=created)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def staged_size(self, upload_id: str) -> int | None:
        try:
            return self.paths.staging(upload_id).stat().st_size
        except FileNotFoundError:
            return None

    def discard(self, upload_id: str) -> None:
        self.paths.staging(upload_id).unlink(missing_ok=True)

    def commit(self, staged: StagedBlob, expected: Digest) -> int:
        """Verify ``staged`` against ``expected`` and move it into place.

        Returns the blob's size. The blob file's mtime is set to now, whether
        this commit wrote the file or found it stored, so that garbage
        collection's grace period protects it until the caller links it. On a
        digest mismatch the staging file is removed and DigestMismatch is
        raised; nothing is stored. A failure to write the file to disk also
        removes it, and raises InsufficientStorage when the disk is full.
        """
        try:
            actual = staged.digest(expected.algorithm)
        except BaseException:
            staged.close()
            staged.path.unlink(missing_ok=True)
            raise
        size = staged.offset
        if actual != expected:
            staged.close()
            staged.path.unlink(missing_ok=True)
            raise DigestMismatch(
                "uploaded content does not match digest",
                {"expected": str(expected), "actual": str(actual), "size": size},
            )
        target = self.paths.blob(expected)
        if _reuse_stored(target, size):
            # The stored copy was fsynced before its rename, so this one needs
            # no flush. Its directory is synced in case the commit that
            # renamed it has not yet synced it.
            staged.close()
            staged.path.unlink(missing_ok=True)
            self._sync_blob_directory(target.parent, created=False)
            return size
        try:
            staged.sync_and_close()
            if _reuse_stored(target, size):
                # Another upload of the same digest committed meanwhile.
                staged.path.unlink(missing_ok=True)
                return size
            # A rename keeps the file's mtime, which is that of the last
            # chunk and may be hours old, and garbage collection removes an
            # unlinked file once its mtime is older than its grace period.
            os.utime(staged.path)
            with disk_full_errors():
                created_directory = _rename_into_place(staged.path, target)
        except FileNotFoundError as error:
            if staged.path.exists():
                staged.path.unlink(missing_ok=True)
                raise
            # cairn gc, or another cairn serve on the same database, expired
            # the upload and unlinked its staging file while it was written.
            raise BlobUploadUnknown(
                "blob upload unknown: its staging file was deleted while this "
                "request wrote to it, for example by cairn gc as expired; "
                "start the upload again",
                {"upload": staged.path.name},
            ) from error
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise
        # The blob is now in place, whole and correct, and another upload of
        # the same digest may already rely on it, so an error from here on
        # leaves it.
        self._sync_blob_directory(target.parent, created=created_directory)
        if staged.wrote_direct:
            WARMER.submit(target)
        log.debug("blob_committed", digest=str(expected), size=size)
        return size

    def _sync_blob_directory(self, path: Path, *, created: bool) -> None:
        """Make the directory of a blob file durable, unless garbage
        collection has removed the blob file and then the directory.

        The caller then links nothing, because the check under the append
        lock finds the file missing and raises BlobCollected.
        """
        try:
            self._directories.sync(path, created=created)
        except FileNotFoundError:
            log.debug("blob_directory_removed_before_sync", directory=str(path))

    def iter_range(self, digest: Digest, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes of ``digest`` from ``start`` up to ``end`` exclusive."""
        with open(self.paths.blob(digest), "rb") as stream:
            stream.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = stream.read(min(READ_CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def iter_blobs(self) -> Iterator[tuple[Digest, Path]]:
        """Yield each entry at the path of a digest under ``blobs/``, with
        that digest, whatever the entry's file type, which callers check.

        Other entries are not cairn's. A file where the layout has a
        directory, such as ``blobs/README``, is left out, and any other entry
        of a directory ``blobs/<algorithm>/<name>`` is left out and logged as
        unknown_blob_entry_skipped.
        """
        for algorithm_dir in _subdirectories(self.paths.root / "blobs"):
            for prefix_dir in _subdirectories(algorithm_dir):
                try:
                    paths = sorted(prefix_dir.iterdir())
                except FileNotFoundError:
                    # Garbage collection removed the emptied directory.
                    continue
                for path in paths:
                    digest = self._digest_at(algorithm_dir.name, path)
                    if digest is None:
                        log.warning("unknown_blob_entry_skipped", path=str(path))
                        continue
                    yield digest, path

    def _digest_at(self, algorithm: str, path: Path) -> Digest | None:
        """Return the digest whose blob path is ``path``, or None."""
        try:
            digest = Digest.parse(f"{algorithm}:{path.name}")
        except DigestInvalid:
            return None
        return digest if self.paths.blob(digest) == path else None


def _subdirectories(directory: Path) -> list[Path]:
    """List the directories in ``directory``, following symbolic links, by name."""
    return sorted(path for path in directory.iterdir() if path.is_dir())


# The file types that are not regular files, as ls(1) and stat(1) name them.
_FILE_TYPES: Final = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character special file"),
    (stat.S_ISBLK, "block special file"),
)


def describe_file_type(mode: int) -> str:
    """Return the name of the file type in ``mode``, such as "directory"."""
    if stat.S_ISREG(mode):
        return "regular file"
    for is_type, name in _FILE_TYPES:
        if is_type(mode):
            return name
    return "file of unknown type"


def accepts_direct_io(directory: Path) -> bool:
    """Return whether files in ``directory`` can be opened with O_DIRECT.

    The probe is an unnamed file (O_TMPFILE), which leaves nothing behind.
    A file system without O_TMPFILE is taken not to accept O_DIRECT either.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_DIRECT, 0o600)
    except (AttributeError, OSError) as error:
        log.info("direct_io_unavailable", directory=str(directory), error=str(error))
        return False
    os.close(fd)
    return True


class _AlignedBuffers:
    """Page-aligned buffers of DIRECT_BUFFER_BYTES for O_DIRECT writes,
    keeping up to IDLE_DIRECT_BUFFERS of them between uploads."""

    def __init__(self) -> None:
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def acquire(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        # An anonymous mapping starts on a page boundary.
        return mmap.mmap(-1, DIRECT_BUFFER_BYTES)

    def release(self, buffer: mmap.mmap) -> None:
        """Keep ``buffer`` for the next upload, or drop it when enough are
        kept."""
        with self._lock:
            if len(self._idle) < IDLE_DIRECT_BUFFERS:
                self._idle.append(buffer)


_DIRECT_BUFFERS: Final = _AlignedBuffers()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class PageCacheWarmer:
    """A daemon thread that reads committed blobs through the page cache.

    The reads are a hint that costs nothing to lose, so the thread does not
    keep the process from exiting, and a blob that finds the queue full is
    skipped.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Path] = queue.Queue(WARM_QUEUE_LIMIT)
        self._started = False
        self._lock = threading.Lock()

    def submit(self, path: Path) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(
                    target=self._run, name="cairn-blob-warm", daemon=True
                ).start()
                self._started = True
        try:
            self._queue.put_nowait(path)
        except queue.Full:
            log.debug("blob_warm_skipped", path=str(path))

    def join(self) -> None:
        """Wait until every submitted blob has been read."""
        self._queue.join()

    def _run(self) -> None:
        # On Linux a thread has its own nice value, and PRIO_PROCESS with a
        # thread id sets it for that thread alone.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_NICE)
        except OSError as error:
            log.info("blob_warm_priority_unchanged", error=str(error))
        while True:
            path = self._queue.get()
            try:
                _warm_page_cache(path)
            finally:
                self._queue.task_done()


WARMER: Final = PageCacheWarmer()


def _warm_page_cache(path: Path) -> None:
    """Read ``path`` through the page cache and discard the bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        # Garbage collection may have removed the blob already.
        log.info("blob_warm_failed", path=str(path), error=str(error))
        return
    buffer = memoryview(bytearray(READ_CHUNK))
    offset = 0
    try:
        while read := os.preadv(fd, [buffer], offset):
            offset += read
    except OSError as error:
        log.warning("blob_warm_failed", path=str(path), error=str(error))
    finally:
        os.close(fd)


def _reuse_stored(path: Path, size: int) -> bool:
    """Touch the stored blob file ``path`` and return True when it has
    ``size`` bytes; return False when it is missing or damaged.

    A file of another size was cut short or overwritten, for example by an
    interrupted restore, and the commit replaces it with its verified copy.
    """
    try:
        stored = os.stat(path).st_size
    except FileNotFoundError:
        return False
    if stored != size:
        log.warning(
            "blob_file_damaged",
            path=str(path),
            size=stored,
            expected_size=size,
            note="replaced by the verified bytes of this upload",
        )
        return False
    return _touch(path)


def _touch(path: Path) -> bool:
    """Set the mtime of ``path`` to now; return False when it does not exist.

    A blob file that a commit reuses is touched, so that garbage collection
    finds a recent mtime and leaves the file alone until the upload links it.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _rename_into_place(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target``, creating the directory of ``target``
    when it is missing; return True when this call created that directory.

    Garbage collection may remove the directory between the mkdir and the
    rename, because the directory is then empty. The rename then fails with
    ENOENT while ``source`` still exists, and the directory is created again.
    Each retry needs another removal by gc, which tries each directory once
    per run, so RENAME_ATTEMPTS bounds the loop only against a fault.
    """
    created = False
    attempt = 1
    while True:
        try:
            target.parent.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        try:
            os.replace(source, target)
            return created
        except FileNotFoundError:
            if attempt == RENAME_ATTEMPTS or not source.exists():
                raise
        log.info(
            "blob_directory_recreated", directory=str(target.parent), attempt=attempt
        )
        attempt += 1
