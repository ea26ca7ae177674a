"""`cairn gc`: remove blob files that no repository can read, and expired
upload staging files.

What is removed
---------------

A blob file under ``blobs/`` is garbage when no row of the blob_links
projection names its digest, in any repository, and no stored manifest
references it. The API serves a blob only through a link, so an unlinked
blob cannot be pulled. Deleting a blob link does not look at the
repository's manifests, though, so a manifest can still reference a blob
whose link is gone. gc keeps such a file until the manifest is deleted,
because the manifest still describes it. Manifest bytes live in the
database, not under ``blobs/``. A client that also pushes a manifest's bytes
as a blob gets a link like any other blob, and gc treats it as one.

Staging files under ``uploads/`` go as ``Registry.purge_uploads`` decides:
the sessions idle for longer than the upload expiry with their files, and
files that no session refers to and that were last written before then.

gc appends no event for the files it removes. The log records which
repository links which blob, not which files exist, so removing a file that
nothing links changes no state that the log describes, and `cairn verify`,
which checks that every link has its file, still passes afterwards.

Unreferenced links
------------------

Deleting a manifest leaves the links of its config and layers, as in
Distribution, so their files stay. With ``unlink_unreferenced`` gc first
deletes each link that no stored manifest of its repository references and
that was created longer ago than the grace period, by appending one
``blob.deleted`` event per link. The blob's file must be older than the
grace period as well: an upload of a blob that the repository already links
appends no event, so the link keeps its old time, but the upload touches
the file. The events carry the run's request id (``gc-`` and a random hex
string) and no user. Each batch of unlinks runs under the append lock and
checks again that the link still exists, that its file is still old and
that no manifest pushed since the scan references it. A manifest push
checks its links under the same lock, so either the push commits first and
gc keeps the link, or gc unlinks first and the push fails with
MANIFEST_BLOB_UNKNOWN. The push can fail that way only if its client
skipped the upload because the blob was already there (a HEAD request) and
no upload touched the file within the grace period. Pushing the
image again uploads the blob and succeeds. The file sweep below then
removes the files that no link names any more.

Why it is safe while `cairn serve` runs
---------------------------------------

Only an append creates a link (``blob.pushed`` or ``blob.mounted``), and
every append runs in ``Database.write()``, which takes the log's append
lock: ``BEGIN IMMEDIATE`` on SQLite, a row lock on the log head on
PostgreSQL, which every ``cairn serve`` process sharing the database takes.
gc removes a file only inside ``Database.write()`` as well. Under the lock
it checks again that no link names the digest, that no manifest pushed
since its scan references it, and that the file's mtime is older than the
grace period. Every append that creates a link checks, under the same lock,
that the blob file exists, and links nothing when it does not. The two
transactions cannot overlap. Either the link commits first, and gc's check
sees it and keeps the file, or gc removes the file first, and the append's
check fails. No committed link can name a missing file.

That covers the three ways a link meets an existing file:

- An upload renames its new file into place before the transaction that
  appends ``blob.pushed``, so for a moment the file exists unlinked.
- A push of a digest that is already stored writes nothing and then links
  the existing file.
- A mount links a file that another repository links.

For the first two, ``BlobStore.commit`` sets the file's mtime to now, so the
grace period keeps the file until the link commits and the push succeeds.
With a grace period shorter than that gap, gc may remove the file, and the
push then fails with BLOB_UPLOAD_UNKNOWN (``BlobCollected``), linking
nothing, and the client pushes the blob again. A mount needs a link in its
source repository, which gc's check sees, and it checks the file too:
without one it falls back to an upload.

The scan that picks the candidates holds no lock. It reads the links, the
manifests' references and the log position in one snapshot. On PostgreSQL
it first takes ACCESS SHARE locks on both tables, because `cairn
projections rebuild` empties them with TRUNCATE, and a snapshot taken
before a TRUNCATE commits sees the tables empty afterwards. A manifest
pushed after the scan has a larger position, so the check under the lock
reads only those. A manifest that references a blob needs its link when it
is pushed, so the scan or the link check sees that blob.

gc removes files in batches of ``BATCH_SIZE``, each in its own transaction,
so a push waits for at most one batch. It does not fsync the directories
after removing files, because a removal that a crash undoes leaves only an
unlinked file, which the next run removes.

Empty prefix directories
------------------------

After the last batch, gc removes each empty two-hex-digit prefix directory
under ``blobs/<algorithm>/`` and leaves any other directory there alone.
It tries each directory once per run, without the lock.
``BlobStore.commit`` creates the directory and renames its file into it
without the lock too, so gc can remove the directory between the two
steps. The rename then fails with ENOENT, and the commit creates the
directory again and retries. A commit fsyncs the parents of a directory it
has not seen synced before the push links the blob (see
``engine.blobs.directories``). A removal that a crash undoes leaves only
an empty directory.
"""

from __future__ import annotations

import errno
import re
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from engine import log as event_log
from engine.blobs.store import describe_file_type
from engine.domain.digest import Digest
from engine.domain.events import Actor, EventType, NewEvent
from engine.projections import ALL_PROJECTIONS, apply_events
from engine.registry import Registry, StagingFile, UploadPurge
from engine.tables import blob_links, manifests

log = structlog.get_logger(__name__)

DEFAULT_GRACE_PERIOD = timedelta(hours=1)
BATCH_SIZE = 500

# rmdir errors that leave a prefix directory in place: files remain in it
# (ENOTEMPTY, or EEXIST on some systems), another gc removed it (ENOENT), it
# is a symbolic link (ENOTDIR), or a file system is mounted on it (EBUSY).
_DIRECTORY_KEPT_ERRNOS = frozenset(
    {errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EBUSY}
)
# The name of a blob directory: the first two hex digits of the digest.
_PREFIX = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A committed blob's file and its size in bytes."""

    digest: Digest
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class BlobLink:
    """A repository's link to a blob, with the blob's size in bytes."""

    repository: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class LinkScan:
    """The links that no stored manifest of their repository referenced and
    that were older than the grace period, when the scan read the
    projections at log position ``position``."""

    position: int
    links: list[BlobLink]


@dataclass(frozen=True, slots=True)
class GarbageScan:
    """The blob files that no link and no stored manifest named, and that
    were older than the grace period, when the scan read the projections at
    log position ``position``."""

    position: int
    blobs: list[BlobFile]


@dataclass(frozen=True, slots=True)
class GcReport:
    """The files a run removed, or with ``dry_run`` the files it would remove.

    ``upload_sessions`` are the ids of the expired upload sessions, whose
    staging files, if any, are among ``staging_files``. ``directories`` are
    the empty prefix directories that the run removed or, with ``dry_run``,
    would remove. ``unlinked`` are the unreferenced links that the run
    deleted or would delete.
    """

    blobs: list[BlobFile]
    staging_files: list[StagingFile]
    dry_run: bool
    directories: list[Path] = field(default_factory=list)
    upload_sessions: list[str] = field(default_factory=list)
    unlinked: list[BlobLink] = field(default_factory=list)

    @property
    def files(self) -> int:
        return len(self.blobs) + len(self.staging_files)

    @property
    def bytes(self) -> int:
        """The bytes that the removed files took, as their sizes count them."""
        return sum(blob.size for blob in self.blobs) + sum(
            staged.size for staged in self.staging_files
        )


class GarbageCollectionFailed(Exception):
    """A gc run that stopped on ``error``, with ``report`` listing what the
    steps before it removed, or with a dry run would remove."""

    def __init__(self, report: GcReport, error: Exception) -> None:
        super().__init__(str(error))
        self.report = report
        self.error = error


def collect_garbage(
    registry: Registry,
    *,
    grace_period: timedelta = DEFAULT_GRACE_PERIOD,
    upload_expiry: timedelta,
    dry_run: bool = False,
    unlink_unreferenced: bool = False,
) -> GcReport:
    """Remove unused blob files and expired staging files; with ``dry_run``
    only list them.

    ``grace_period`` keeps every blob file whose mtime is more recent, and
    ``upload_expiry`` is the idle time after which an upload is purged. With
    ``unlink_unreferenced``, the links that no manifest of their repository
    references and that are older than ``grace_period`` are deleted first.
    Raises GarbageCollectionFailed, from the error, when a step fails.
    """
    run_id = f"gc-{uuid.uuid4().hex}"
    log.info(
        "gc_started",
        dry_run=dry_run,
        grace_period=str(grace_period),
        upload_expiry=str(upload_expiry),
        unlink_unreferenced=unlink_unreferenced,
        request_id=run_id,
    )
    report = GcReport([], [], dry_run)
    try:
        position = _collect(
            registry,
            report,
            run_id,
            grace_period=grace_period,
            upload_expiry=upload_expiry,
            unlink_unreferenced=unlink_unreferenced,
        )
    except Exception as error:
        raise GarbageCollectionFailed(report, error) from error
    log.info(
        "gc_dry_run_finished" if dry_run else "blobs_collected",
        unlinked=len(report.unlinked),
        blobs=len(report.blobs),
        staging_files=len(report.staging_files),
        upload_sessions=len(report.upload_sessions),
        directories=len(report.directories),
        bytes=report.bytes,
        position=position,
        request_id=run_id,
    )
    return report


def _collect(
    registry: Registry,
    report: GcReport,
    run_id: str,
    *,
    grace_period: timedelta,
    upload_expiry: timedelta,
    unlink_unreferenced: bool,
) -> int:
    """Run the steps of collect_garbage and return the log position of the
    blob scan.

    Each step adds what it removes to ``report`` as it goes, so the report
    is complete up to a step that raises.
    """
    dry_run = report.dry_run
    if unlink_unreferenced:
        link_scan = scan_unreferenced_links(registry, grace_period)
        unlinked: Iterable[BlobLink] = link_scan.links
        if not dry_run:
            unlinked = delete_links(registry, link_scan, run_id, grace_period)
        for link in unlinked:
            report.unlinked.append(link)

    # A dry run deletes no link, so its file scan treats the links it would
    # delete as gone.
    ignored = report.unlinked if dry_run else []
    scan = scan_blobs(registry, grace_period, ignored_links=ignored)
    if dry_run:
        report.blobs.extend(scan.blobs)
        report.directories.extend(emptied_directories(registry, scan.blobs))
    else:
        for blob in remove_blobs(registry, scan, grace_period):
            report.blobs.append(blob)
        for directory in remove_empty_directories(registry):
            report.directories.append(directory)

    purge = UploadPurge(report.upload_sessions, report.staging_files)
    registry.purge_uploads(upload_expiry, dry_run=dry_run, into=purge)
    return scan.position


def scan_unreferenced_links(registry: Registry, grace_period: timedelta) -> LinkScan:
    """Find the links that no stored manifest of their repository references
    and that were created before the grace period, without taking the append
    lock."""
    database = registry.database
    linked_before = datetime.now(UTC) - grace_period
    with database.read() as conn:
        _lock_for_snapshot(conn, database.is_sqlite)
        position = event_log.head(conn)[0]
        referenced = _repository_references(conn, after=0)
        rows = conn.execute(
            sa.select(blob_links.c.repository, blob_links.c.digest, blob_links.c.size)
            .where(blob_links.c.linked_at < linked_before)
            .order_by(blob_links.c.repository, blob_links.c.digest)
        )
        links = [
            BlobLink(row.repository, row.digest, row.size)
            for row in rows
            if (row.repository, row.digest) not in referenced
        ]
    old_before = time.time() - grace_period.total_seconds()
    links = [link for link in links if _file_older(registry, link, old_before)]
    return LinkScan(position, links)


def _file_older(registry: Registry, link: BlobLink, old_before: float) -> bool:
    """Return whether the blob file of ``link`` was last written or reused
    before ``old_before`` (a Unix time). An upload of a blob that its
    repository already links appends no event but touches the file, so this
    keeps the link of a blob pushed again within the grace period. A missing
    file counts as old: its link is broken anyway."""
    try:
        path = registry.blob_store.path(Digest.parse(link.digest))
        return path.stat().st_mtime < old_before
    except FileNotFoundError:
        return True


def delete_links(
    registry: Registry, scan: LinkScan, run_id: str, grace_period: timedelta
) -> Iterator[BlobLink]:
    """Delete the links of ``scan`` that are still unreferenced, each batch
    under the append lock with one ``blob.deleted`` event per link; yield
    the links of each batch once it is committed."""
    for start in range(0, len(scan.links), BATCH_SIZE):
        batch = scan.links[start : start + BATCH_SIZE]
        with registry.database.write() as conn:
            still_linked = _existing_links(conn, batch)
            referenced = _repository_references(conn, after=scan.position)
            old_before = time.time() - grace_period.total_seconds()
            unlinking = [
                link
                for link in batch
                if (link.repository, link.digest) in still_linked
                and (link.repository, link.digest) not in referenced
                and _file_older(registry, link, old_before)
            ]
            if not unlinking:
                continue
            events = [
                NewEvent(
                    type=EventType.BLOB_DELETED,
                    repository=link.repository,
                    payload={"digest": link.digest, "size": link.size},
                )
                for link in unlinking
            ]
            stored = event_log.append(conn, events, actor=Actor(), request_id=run_id)
            apply_events(conn, ALL_PROJECTIONS, stored)
        for link in unlinking:
            log.debug(
                "blob_unlinked",
                repository=link.repository,
                digest=link.digest,
                request_id=run_id,
            )
            yield link


def scan_blobs(
    registry: Registry,
    grace_period: timedelta,
    ignored_links: Iterable[BlobLink] = (),
) -> GarbageScan:
    """Find the blob files that no link or stored manifest names and whose
    mtime is older than ``grace_period``, without taking the append lock.

    ``ignored_links`` are counted as absent.
    """
    ignored = {(link.repository, link.digest) for link in ignored_links}
    database = registry.database
    with database.read() as conn:
        _lock_for_snapshot(conn, database.is_sqlite)
        position = event_log.head(conn)[0]
        if ignored:
            pairs = conn.execute(
                sa.select(blob_links.c.repository, blob_links.c.digest)
            )
            used = {
                digest
                for repository, digest in pairs
                if (repository, digest) not in ignored
            }
        else:
            used = set(
                conn.execute(sa.select(blob_links.c.digest).distinct()).scalars()
            )
        used.update(_referenced_digests(conn, after=0))

    old_before = time.time() - grace_period.total_seconds()
    candidates = [
        blob
        for blob, mtime in _blob_files(registry)
        if str(blob.digest) not in used and mtime < old_before
    ]
    return GarbageScan(position, candidates)


def remove_blobs(
    registry: Registry, scan: GarbageScan, grace_period: timedelta
) -> Iterator[BlobFile]:
    """Remove the files of ``scan`` that are still unused, each batch under
    the append lock; yield each file once it is removed."""
    for start in range(0, len(scan.blobs), BATCH_SIZE):
        batch = scan.blobs[start : start + BATCH_SIZE]
        with registry.database.write() as conn:
            yield from _remove_unused(conn, batch, scan.position, grace_period)


def remove_empty_directories(registry: Registry) -> Iterator[Path]:
    """Remove every empty two-hex-digit directory under ``blobs/<algorithm>/``,
    trying each once; yield each directory once it is removed.

    A commit that renames its file into a directory removed here creates the
    directory again, as ``BlobStore.commit`` describes.
    """
    for prefix_dir in _prefix_directories(registry):
        try:
            prefix_dir.rmdir()
        except OSError as error:
            if error.errno not in _DIRECTORY_KEPT_ERRNOS:
                raise
            continue
        log.debug("blob_directory_removed", path=str(prefix_dir))
        yield prefix_dir


def emptied_directories(registry: Registry, files: list[BlobFile]) -> list[Path]:
    """List the two-hex-digit directories that are empty, or would be once
    ``files`` are removed, for a dry run."""
    removing = {blob.path for blob in files}
    emptied: list[Path] = []
    for prefix_dir in _prefix_directories(registry):
        try:
            entries = set(prefix_dir.iterdir())
        except FileNotFoundError:
            continue
        if entries <= removing:
            emptied.append(prefix_dir)
    return emptied


def _prefix_directories(registry: Registry) -> list[Path]:
    """List the directories ``blobs/<algorithm>/<two hex digits>``. Any other
    directory there is not cairn's and is left alone."""
    root = registry.blob_store.paths.root / "blobs"
    return [
        prefix_dir
        for algorithm_dir in _subdirectories(root)
        for prefix_dir in _subdirectories(algorithm_dir)
        if _PREFIX.fullmatch(prefix_dir.name)
    ]


def _remove_unused(
    conn: Connection, batch: list[BlobFile], position: int, grace_period: timedelta
) -> Iterator[BlobFile]:
    digests = [str(blob.digest) for blob in batch]
    linked = set(
        conn.execute(
            sa.select(blob_links.c.digest)
            .where(blob_links.c.digest.in_(digests))
            .distinct()
        ).scalars()
    )
    referenced = _referenced_digests(conn, after=position)
    old_before = time.time() - grace_period.total_seconds()
    for blob in batch:
        digest = str(blob.digest)
        if digest in linked or digest in referenced:
            continue
        try:
            status = blob.path.lstat()
        except FileNotFoundError:
            # Another gc removed it.
            continue
        if not stat.S_ISREG(status.st_mode):
            # Something else took its place since the scan.
            _log_skipped(blob.path, status.st_mode)
            continue
        if status.st_mtime >= old_before:
            # A push stored or reused it since the scan.
            continue
        blob.path.unlink(missing_ok=True)
        log.debug("blob_file_removed", digest=digest, size=status.st_size)
        yield BlobFile(blob.digest, blob.path, status.st_size)


def _lock_for_snapshot(conn: Connection, is_sqlite: bool) -> None:
    """Keep `cairn projections rebuild` from emptying the tables that a scan
    reads while its snapshot is open.

    On PostgreSQL a snapshot taken before a TRUNCATE commits finds the tables
    empty afterwards, so the scan first takes ACCESS SHARE locks, before the
    first query, which takes the snapshot.
    """
    if not is_sqlite:
        conn.exec_driver_sql(
            f"LOCK TABLE {blob_links.name}, {manifests.name} IN ACCESS SHARE MODE"
        )


def _existing_links(conn: Connection, links: list[BlobLink]) -> set[tuple[str, str]]:
    """Return which of ``links`` still exist, as (repository, digest) pairs."""
    digests = sorted({link.digest for link in links})
    rows = conn.execute(
        sa.select(blob_links.c.repository, blob_links.c.digest).where(
            blob_links.c.digest.in_(digests)
        )
    )
    return {(row.repository, row.digest) for row in rows}


def _repository_references(conn: Connection, *, after: int) -> set[tuple[str, str]]:
    """Return the (repository, digest) pairs that the stored manifests pushed
    after log position ``after`` reference."""
    rows = conn.execution_options(yield_per=1000).execute(
        sa.select(manifests.c.repository, manifests.c.references).where(
            manifests.c.position > after
        )
    )
    pairs: set[tuple[str, str]] = set()
    for repository, references in rows:
        pairs.update((repository, reference["digest"]) for reference in references)
    return pairs


def _referenced_digests(conn: Connection, *, after: int) -> set[str]:
    """Return every digest that a stored manifest pushed after log position
    ``after`` references."""
    rows = conn.execution_options(yield_per=1000).execute(
        sa.select(manifests.c.references).where(manifests.c.position > after)
    )
    digests: set[str] = set()
    for references in rows.scalars():
        digests.update(reference["digest"] for reference in references)
    return digests


def _blob_files(registry: Registry) -> Iterator[tuple[BlobFile, float]]:
    """Yield every committed blob file with its mtime.

    An entry at a blob's path that is not a regular file, such as a
    directory or a symbolic link, is not one that cairn wrote, so it is
    logged and skipped, and so is every entry that BlobStore.iter_blobs
    skips.
    """
    for digest, path in registry.blob_store.iter_blobs():
        try:
            status = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(status.st_mode):
            _log_skipped(path, status.st_mode)
            continue
        yield BlobFile(digest, path, status.st_size), status.st_mtime


def _log_skipped(path: Path, mode: int) -> None:
    log.warning(
        "gc_unknown_file_skipped", path=str(path), file_type=describe_file_type(mode)
    )


def _subdirectories(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_dir())
