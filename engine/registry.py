"""The registry's Python API: Registry -> Repository -> manifests, tags, blobs.

Every command validates its input, decides which events the change needs
(none when nothing changes), appends them and updates the projections in one
transaction. Reads go to the projections. All methods are synchronous and
may block on disk or the database; the HTTP layer calls them from worker
threads.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from engine import log as event_log
from engine.blobs import BlobStore, StagedBlob, is_upload_id
from engine.blobs.limits import check_declared_size, check_received_size
from engine.blobs.store import StagingLock, describe_file_type
from engine.db import Database
from engine.domain.digest import Digest
from engine.domain.errors import (
    BlobCollected,
    BlobTooLarge,
    BlobUnknown,
    BlobUploadUnknown,
    DigestMismatch,
    InsufficientStorage,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RangeInvalid,
    RegistryError,
)
from engine.domain.events import Actor, EventType, NewEvent, StoredEvent
from engine.domain.manifests import Descriptor, Manifest, Reference, parse_manifest
from engine.domain.names import validate_repository_name, validate_tag
from engine.domain.preconditions import Preconditions
from engine.identity import load_registry_id
from engine.prepared import Prepared, in_list
from engine.projections import ALL_PROJECTIONS, apply_events
from engine.tables import (
    blob_links,
    bytewise,
    manifest_contents,
    manifests,
    referrers,
    repositories,
    tags,
    uploads,
)

log = structlog.get_logger(__name__)

# Statements on the push and pull paths are built once: constructing one
# costs several times more than running it.
_MANIFEST_ROW = Prepared(
    sa.select(manifests).where(
        (manifests.c.repository == sa.bindparam("b_repository"))
        & (manifests.c.digest == sa.bindparam("b_digest"))
    )
)
_MANIFEST_CONTENT = Prepared(
    sa.select(manifest_contents.c.content).where(
        manifest_contents.c.digest == sa.bindparam("b_digest")
    )
)
_MANIFEST_CONTENT_EXISTS = Prepared(
    sa.select(manifest_contents.c.digest).where(
        manifest_contents.c.digest == sa.bindparam("b_digest")
    )
)
_INSERT_MANIFEST_CONTENT = Prepared(sa.insert(manifest_contents))
_TAGGED_MANIFEST = Prepared(
    sa.select(manifests)
    .join(
        tags,
        (tags.c.repository == manifests.c.repository)
        & (tags.c.digest == manifests.c.digest),
    )
    .where(
        (tags.c.repository == sa.bindparam("b_repository"))
        & (tags.c.tag == sa.bindparam("b_tag"))
    )
)
_TAG_DIGEST = Prepared(
    sa.select(tags.c.digest).where(
        (tags.c.repository == sa.bindparam("b_repository"))
        & (tags.c.tag == sa.bindparam("b_tag"))
    )
)
_BLOB_LINK = Prepared(
    sa.select(blob_links).where(
        (blob_links.c.repository == sa.bindparam("b_repository"))
        & (blob_links.c.digest == sa.bindparam("b_digest"))
    )
)
_SIZE_BATCH = 500
# Reference kinds whose content is a manifest of the repository.
_MANIFEST_KINDS = frozenset({"manifest", "subject"})
# Listing pages. A LIMIT as large as a signed 64-bit integer allows stands
# for no limit at all.
_NO_LIMIT = 2**63 - 1
_TAGS_PAGE = Prepared(
    sa.select(tags.c.tag)
    .where(
        (tags.c.repository == sa.bindparam("b_repository"))
        & (bytewise(tags.c.tag) > bytewise(sa.bindparam("b_last")))
    )
    .order_by(bytewise(tags.c.tag))
    .limit(sa.bindparam("b_limit"))
)
_CATALOG_PAGE = Prepared(
    sa.select(repositories.c.name)
    .where(bytewise(repositories.c.name) > bytewise(sa.bindparam("b_last")))
    .order_by(bytewise(repositories.c.name))
    .limit(sa.bindparam("b_limit"))
)
_REPOSITORY_EXISTS = Prepared(
    sa.select(repositories.c.name).where(repositories.c.name == sa.bindparam("b_name"))
)
_UPLOAD_ROW = Prepared(
    sa.select(uploads).where(
        (uploads.c.id == sa.bindparam("b_id"))
        & (uploads.c.repository == sa.bindparam("b_repository"))
    )
)
_INSERT_UPLOAD = Prepared(sa.insert(uploads))
_UPDATE_UPLOAD = Prepared(
    sa.update(uploads)
    .where(uploads.c.id == sa.bindparam("b_id"))
    .values(offset=sa.bindparam("b_offset"), updated_at=sa.bindparam("b_time"))
)
_DELETE_UPLOAD = Prepared(
    sa.delete(uploads).where(uploads.c.id == sa.bindparam("b_id"))
)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int
    artifact_type: str | None = None
    subject: Digest | None = None


@dataclass(frozen=True, slots=True)
class PutManifestResult:
    manifest: ManifestInfo
    events: list[StoredEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StagingFile:
    """An upload's staging file and its size in bytes."""

    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class UploadPurge:
    """The result of a purge of expired uploads: what it removed, or would
    remove.

    ``sessions`` are the ids of the expired upload sessions, with or without
    a staging file. ``staging_files`` are those sessions' files and the
    expired files that belong to no session.
    """

    sessions: list[str]
    staging_files: list[StagingFile]


@dataclass(frozen=True, slots=True)
class UploadStatus:
    id: str
    repository: str
    offset: int
    started_at: datetime


class Registry:
    """Entry point: hands out Repository objects and enumerates everything.

    ``max_blob_size`` is the largest blob, in bytes, that an upload may
    store; None allows any size.
    """

    def __init__(
        self,
        database: Database,
        blob_store: BlobStore,
        *,
        max_blob_size: int | None = None,
    ) -> None:
        self.database = database
        self.blob_store = blob_store
        self.max_blob_size = max_blob_size
        self._upload_locks: dict[str, threading.Lock] = {}
        self._upload_locks_guard = threading.Lock()
        # Open staging files keyed by upload id, so consecutive chunks of an
        # upload keep their running hash instead of rehashing the prefix.
        self._staged: dict[str, StagedBlob] = {}
        self._registry_id: str | None = None

    @classmethod
    def open(
        cls, data_dir: Path, database_url: str | None = None, *, read_only: bool = False
    ) -> Registry:
        """Open the registry in ``data_dir``, creating the directory unless
        ``read_only``. With ``read_only`` no file in the data directory is
        created or written, and a SQLite database is opened read-only (see
        Database and BlobStore)."""
        from engine.db import sqlite_url

        if not read_only:
            data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(database_url or sqlite_url(data_dir), read_only=read_only)
        return cls(database, BlobStore(data_dir, read_only=read_only))

    def registry_id(self) -> str:
        """Return the random id of this registry (see engine.identity)."""
        if self._registry_id is None:
            self._registry_id = load_registry_id(self.database)
        return self._registry_id

    def repository(
        self, name: str, *, actor: Actor | None = None, request_id: str | None = None
    ) -> Repository:
        return Repository(
            self, validate_repository_name(name), actor or Actor(), request_id
        )

    def catalog(self, n: int | None = None, last: str | None = None) -> list[str]:
        """List repository names in lexical order, after ``last``."""
        # Every name is longer than "", so "" as last starts at the beginning.
        params = {"b_last": last or "", "b_limit": _NO_LIMIT if n is None else n}
        with self.database.read() as conn:
            return [row[0] for row in _CATALOG_PAGE.execute(conn, params).tuples]

    def iter_repositories(self, page_size: int = 1000) -> Iterator[str]:
        last: str | None = None
        while True:
            page = self.catalog(page_size, last)
            yield from page
            if len(page) < page_size:
                return
            last = page[-1]

    def iter_manifests(
        self, page_size: int = 1000
    ) -> Iterator[tuple[str, ManifestInfo]]:
        """Yield (repository, manifest) for every manifest, in push order."""
        after = 0
        while True:
            with self.database.read() as conn:
                rows = conn.execute(
                    sa.select(manifests)
                    .where(manifests.c.position > after)
                    .order_by(manifests.c.position)
                    .limit(page_size)
                ).all()
            for row in rows:
                yield row.repository, _manifest_info(row)
            if len(rows) < page_size:
                return
            after = rows[-1].position

    def purge_uploads(
        self,
        older_than: timedelta,
        *,
        dry_run: bool = False,
        into: UploadPurge | None = None,
    ) -> UploadPurge:
        """Delete upload sessions idle for longer than ``older_than``, and
        staging files that belong to no session and were last written before
        then (left by a crash during a monolithic push). A session is idle
        while no write to it finishes and its staging file is not written.

        Returns the sessions and staging files removed. With ``dry_run``
        nothing is deleted, and the return value lists what would be removed.
        ``into``, when given, receives them as they go and is returned, so a
        caller still has them when a removal raises. An entry under
        ``uploads/`` that is not a regular file is not cairn's, so it is
        logged as staging_entry_skipped and left alone.
        """
        purge = UploadPurge([], []) if into is None else into
        cutoff = datetime.now(UTC) - older_than
        with self.database.read() as conn:
            candidates = set(
                conn.execute(
                    sa.select(uploads.c.id).where(uploads.c.updated_at < cutoff)
                ).scalars()
            )
        # The files are checked outside the write transaction, which other
        # writers wait for, and the delete checks updated_at again, so a
        # write that finishes meanwhile keeps its session.
        candidates = {
            upload_id
            for upload_id in candidates
            if not self._staging_written_since(upload_id, cutoff)
        }
        stale = candidates
        if dry_run:
            # A read transaction, so that a dry run works on a database that
            # its user may only read.
            with self.database.read() as conn:
                live = set(conn.execute(sa.select(uploads.c.id)).scalars()) - stale
        else:
            with self.database.transaction() as conn:
                if candidates:
                    deleted = conn.execute(
                        sa.delete(uploads)
                        .where(
                            uploads.c.id.in_(candidates)
                            & (uploads.c.updated_at < cutoff)
                        )
                        .returning(uploads.c.id)
                    ).scalars()
                    stale = set(deleted)
                live = set(conn.execute(sa.select(uploads.c.id)).scalars()) - stale

        purge.sessions.extend(sorted(stale))
        removed = 0
        for path in self._staging_entries():
            if path.name in live:
                continue
            try:
                status = path.lstat()
            except FileNotFoundError:
                # Its upload committed or was cancelled meanwhile.
                continue
            if not stat.S_ISREG(status.st_mode):
                log.warning(
                    "staging_entry_skipped",
                    path=str(path),
                    file_type=describe_file_type(status.st_mode),
                )
                continue
            modified = datetime.fromtimestamp(status.st_mtime, UTC)
            if path.name in stale or modified < cutoff:
                if not dry_run:
                    self._forget_upload(path.name)
                    path.unlink(missing_ok=True)
                purge.staging_files.append(StagingFile(path, status.st_size))
                removed += 1
        if (stale or removed) and not dry_run:
            log.info(
                "uploads_purged",
                sessions=len(stale),
                staging_files=removed,
                older_than=str(older_than),
            )
        if not dry_run:
            self._close_staged_without_session()
        return purge

    def _staging_entries(self) -> list[Path]:
        """List ``uploads/`` in name order; a missing directory, which a
        read-only open does not create, lists as empty."""
        try:
            return sorted(self.blob_store.paths.staging_dir.iterdir())
        except FileNotFoundError:
            return []

    def _staging_written_since(self, upload_id: str, cutoff: datetime) -> bool:
        """Return True when the staging file of ``upload_id`` was written
        after ``cutoff``.

        A session's ``updated_at`` moves only when a request finishes, so a
        PATCH that streams for longer than the expiry leaves it old while the
        file grows.
        """
        try:
            modified = self.blob_store.paths.staging(upload_id).stat().st_mtime
        except FileNotFoundError:
            return False
        return datetime.fromtimestamp(modified, UTC) >= cutoff

    def _close_staged_without_session(self) -> None:
        """Close the open staging files of uploads whose session is gone.

        Another process (cairn gc, or another cairn serve on the same
        database) may delete a session and unlink its staging file while this
        process has the file open, and an open file keeps its disk space.
        An upload whose lock is taken is being written now, so the next purge
        checks it.
        """
        for upload_id in list(self._staged):
            with self._upload_locks_guard:
                lock = self._upload_locks.get(upload_id)
            if lock is None or not lock.acquire(blocking=False):
                continue
            try:
                if upload_id not in self._staged:
                    continue
                with self.database.read() as conn:
                    session = conn.execute(
                        sa.select(uploads.c.id).where(uploads.c.id == upload_id)
                    ).first()
                if session is None:
                    log.info(
                        "staging_file_closed",
                        upload=upload_id,
                        reason="session deleted",
                    )
                    self._forget_upload(upload_id)
            finally:
                lock.release()

    def upload_lock(self, upload_id: str) -> threading.Lock:
        with self._upload_locks_guard:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    def _close_staged(self, upload_id: str) -> None:
        staged = self._staged.pop(upload_id, None)
        if staged is not None:
            staged.close()

    def _forget_upload(self, upload_id: str) -> None:
        self._close_staged(upload_id)
        with self._upload_locks_guard:
            self._upload_locks.pop(upload_id, None)


class Repository:
    """One repository's manifest, tag and blob services."""

    def __init__(
        self, registry: Registry, name: str, actor: Actor, request_id: str | None
    ) -> None:
        self.registry = registry
        self.name = name
        self.actor = actor
        self.request_id = request_id
        self.manifests = ManifestService(self)
        self.tags = TagService(self)
        self.blobs = BlobService(self)

    @property
    def database(self) -> Database:
        return self.registry.database

    def exists(self) -> bool:
        with self.database.read() as conn:
            return _repository_exists(conn, self.name)

    def commit(
        self, conn: Connection, new_events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        """Append ``new_events`` and apply them to every projection."""
        stored = event_log.append(
            conn, new_events, actor=self.actor, request_id=self.request_id
        )
        apply_events(conn, ALL_PROJECTIONS, stored)
        return stored

    def event(self, type: EventType, **payload: Any) -> NewEvent:
        return NewEvent(type=type, repository=self.name, payload=payload)


class ManifestService:
    def __init__(self, repository: Repository) -> None:
        self._repo = repository

    def _row(self, conn: Connection, digest: Digest) -> Any:
        return _MANIFEST_ROW.execute(
            conn, {"b_repository": self._repo.name, "b_digest": str(digest)}
        ).one_or_none()

    def exists(self, digest: Digest) -> bool:
        with self._repo.database.read() as conn:
            return self._row(conn, digest) is not None

    def stat(self, digest: Digest) -> ManifestInfo:
        with self._repo.database.read() as conn:
            row = self._row(conn, digest)
        if row is None:
            raise ManifestUnknown(
                "manifest unknown",
                {"repository": self._repo.name, "digest": str(digest)},
            )
        return _manifest_info(row)

    def get(self, digest: Digest) -> tuple[ManifestInfo, bytes]:
        with self._repo.database.read() as conn:
            row = self._row(conn, digest)
            if row is None:
                raise ManifestUnknown(
                    "manifest unknown",
                    {"repository": self._repo.name, "digest": str(digest)},
                )
            content = _MANIFEST_CONTENT.execute(
                conn, {"b_digest": str(digest)}
            ).scalar_one()
        return _manifest_info(row), bytes(content)

    def put(
        self,
        raw: bytes,
        content_type: str | None = None,
        *,
        tag: str | None = None,
        digest: Digest | None = None,
        tags: Sequence[str] = (),
        preconditions: Preconditions | None = None,
    ) -> PutManifestResult:
        """Store a manifest, and point ``tag`` and each of ``tags`` at it.

        ``tag`` is the tag the client pushed by, which the manifest.pushed
        event records. ``tags`` are further tags, such as the tag query
        parameters of a push by digest, set in the same commit. An invalid
        tag in either raises TagInvalid before anything is stored.
        ``digest`` is the digest the client pushed by; the bytes must hash to
        it. Every blob and child manifest the manifest requires must already
        be in this repository; the subject need not be. ``preconditions``
        must hold for what the reference (``tag``, else the digest) names
        before the push, or nothing is stored.
        """
        tags_to_set = list(dict.fromkeys([tag, *tags] if tag is not None else tags))
        for name in tags_to_set:
            validate_tag(name)
        manifest = parse_manifest(
            raw, content_type, algorithm=digest.algorithm if digest else "sha256"
        )
        if digest is not None and manifest.digest != digest:
            raise ManifestInvalid(
                "manifest digest does not match the digest in the URL",
                {"expected": str(digest), "actual": str(manifest.digest)},
            )
        with self._repo.database.write() as conn:
            self._check_references(conn, manifest)
            new_events: list[NewEvent] = []
            row = self._row(conn, manifest.digest)
            if preconditions is not None:
                if tag is not None:
                    reference, current = tag, _tag_digest(conn, self._repo.name, tag)
                else:
                    reference = str(manifest.digest)
                    current = None if row is None else reference
                preconditions.check(
                    current, {"repository": self._repo.name, "reference": reference}
                )
            if row is None:
                self._store_content(conn, manifest)
                new_events.append(self._pushed_event(manifest, tag))
            elif row.media_type != manifest.media_type:
                # Bytes without a mediaType can parse as either the OCI or the
                # Docker type of one kind. A digest keeps the type it was first
                # pushed as in its repository, so every pull returns that type.
                raise ManifestInvalid(
                    f"manifest {manifest.digest} is already stored as "
                    f"{row.media_type} and cannot be pushed as "
                    f"{manifest.media_type}. Push it with Content-Type "
                    f"{row.media_type}.",
                    {
                        "digest": str(manifest.digest),
                        "mediaType": manifest.media_type,
                        "storedMediaType": row.media_type,
                    },
                )
            for name in tags_to_set:
                current = _tag_digest(conn, self._repo.name, name)
                if current != str(manifest.digest):
                    new_events.append(
                        self._repo.event(
                            EventType.TAG_SET,
                            tag=name,
                            digest=str(manifest.digest),
                            previous=current,
                        )
                    )
            stored = self._repo.commit(conn, new_events)
        info = ManifestInfo(
            manifest.digest,
            manifest.media_type,
            manifest.size,
            manifest.artifact_type,
            manifest.subject.digest if manifest.subject else None,
        )
        if stored:
            log.info(
                "manifest_stored",
                repository=self._repo.name,
                digest=str(manifest.digest),
                tag=tag,
                tags=tags_to_set,
                position=stored[-1].position,
                request_id=self._repo.request_id,
            )
        return PutManifestResult(info, stored)

    def _check_references(self, conn: Connection, manifest: Manifest) -> None:
        """Check that every required reference is in the repository with the
        size its descriptor declares; clients verify sizes when they pull.

        The descriptor of a child manifest, or of a subject that the
        repository stores, must also give the stored media type, because
        clients fetch and parse a manifest by that type. A subject need not
        be stored, because clients may push it after its referrers.
        """
        references = manifest.references()
        required = [r for r in references if r.required]
        # One query per kind of content, however many layers the image has.
        stored_manifests = self._stored(
            conn,
            manifests,
            [str(r.descriptor.digest) for r in references if r.kind in _MANIFEST_KINDS],
        )
        stored_blobs = self._stored(
            conn,
            blob_links,
            [
                str(r.descriptor.digest)
                for r in required
                if r.kind not in _MANIFEST_KINDS
            ],
        )
        missing: list[dict[str, str]] = []
        for reference in references:
            descriptor = reference.descriptor
            kind = reference.kind
            found = stored_manifests if kind in _MANIFEST_KINDS else stored_blobs
            stored = found.get(str(descriptor.digest))
            if stored is None:
                if reference.required:
                    missing.append({"kind": kind, "digest": str(descriptor.digest)})
                continue
            stored_size, stored_media_type = stored
            if stored_size != descriptor.size:
                raise ManifestInvalid(
                    f"{kind} size does not match the stored content",
                    {
                        "digest": str(descriptor.digest),
                        "size": descriptor.size,
                        "stored_size": stored_size,
                    },
                )
            if stored_media_type is not None and (
                stored_media_type != descriptor.media_type
            ):
                raise ManifestInvalid(
                    f"{kind} mediaType does not match the stored manifest",
                    {
                        "digest": str(descriptor.digest),
                        "mediaType": descriptor.media_type,
                        "storedMediaType": stored_media_type,
                    },
                )
        if missing:
            raise ManifestBlobUnknown(
                "manifest references content that is not in the repository",
                {"repository": self._repo.name, "missing": missing},
            )

    def _stored(
        self, conn: Connection, table: sa.Table, digests: list[str]
    ) -> dict[str, tuple[int, str | None]]:
        """Return the size and, for manifests, the media type of each digest
        in ``digests`` that this repository's ``table`` contains."""
        stored: dict[str, tuple[int, str | None]] = {}
        # Batches stay well under the bound parameters SQLite allows.
        for start in range(0, len(digests), _SIZE_BATCH):
            batch = digests[start : start + _SIZE_BATCH]
            params = {"b_repository": self._repo.name}
            params.update((f"b_digest_{i}", digest) for i, digest in enumerate(batch))
            rows = _stored_query(table.name, len(batch)).execute(conn, params)
            for digest, size, media_type in rows.tuples:
                stored[digest] = (size, media_type)
        return stored

    def _store_content(self, conn: Connection, manifest: Manifest) -> None:
        digest = str(manifest.digest)
        exists = _MANIFEST_CONTENT_EXISTS.execute(conn, {"b_digest": digest}).first()
        if exists is None:
            _INSERT_MANIFEST_CONTENT.execute(
                conn, {"digest": digest, "content": manifest.raw}
            )

    def _pushed_event(self, manifest: Manifest, tag: str | None) -> NewEvent:
        """Build the manifest.pushed event of a new manifest.

        A push by tag records the tag too, so that a consumer can tell that
        a tag.set for it follows in the same commit: a new manifest has no
        tag pointing to it yet.
        """
        by_tag = {"tag": tag} if tag is not None else {}
        return self._repo.event(
            EventType.MANIFEST_PUSHED,
            digest=str(manifest.digest),
            media_type=manifest.media_type,
            size=manifest.size,
            artifact_type=manifest.artifact_type,
            subject=str(manifest.subject.digest) if manifest.subject else None,
            annotations=dict(manifest.annotations) if manifest.annotations else None,
            references=[
                _reference_json(r.kind, r.descriptor) for r in manifest.references()
            ],
            content_size=_content_size(manifest.size, manifest.references()),
            **by_tag,
        )

    def delete(
        self, digest: Digest, preconditions: Preconditions | None = None
    ) -> list[StoredEvent]:
        """Delete a manifest and every tag that points to it, if
        ``preconditions`` hold for it."""
        with self._repo.database.write() as conn:
            row = self._row(conn, digest)
            if row is None:
                raise ManifestUnknown(
                    "manifest unknown",
                    {"repository": self._repo.name, "digest": str(digest)},
                )
            if preconditions is not None:
                preconditions.check(
                    str(digest),
                    {"repository": self._repo.name, "reference": str(digest)},
                )
            tag_names = conn.execute(
                sa.select(tags.c.tag)
                .where(
                    (tags.c.repository == self._repo.name)
                    & (tags.c.digest == str(digest))
                )
                .order_by(bytewise(tags.c.tag))
            ).scalars()
            new_events = [
                self._repo.event(EventType.TAG_DELETED, tag=name, previous=str(digest))
                for name in tag_names
            ]
            content_size = row.size + sum(
                reference["size"]
                for reference in row.references
                if reference["kind"] in _BLOB_KINDS
            )
            new_events.append(
                self._repo.event(
                    EventType.MANIFEST_DELETED,
                    digest=str(digest),
                    content_size=content_size,
                )
            )
            stored = self._repo.commit(conn, new_events)
        log.info(
            "manifest_deleted",
            repository=self._repo.name,
            digest=str(digest),
            position=stored[-1].position,
            request_id=self._repo.request_id,
        )
        return stored

    def referrers(
        self, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """List the manifests whose subject is ``subject``, oldest first."""
        found = self.referrers_after(subject, artifact_type)
        return [descriptor for _position, descriptor in found]

    def referrers_after(
        self,
        subject: Digest,
        artifact_type: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[tuple[int, Descriptor]]:
        """List up to ``limit`` referrers of ``subject`` pushed after log
        position ``after``, oldest first, each with its position.

        A referrer's position is that of its manifest.pushed event, unique
        in the log, so a walk that passes the last position of each page on
        to the next lists every referrer once. A referrer pushed during the
        walk has a higher position and comes on a later page.
        """
        query = sa.select(referrers).where(
            (referrers.c.repository == self._repo.name)
            & (referrers.c.subject == str(subject))
            & (referrers.c.position > after)
        )
        if artifact_type is not None:
            query = query.where(referrers.c.artifact_type == artifact_type)
        query = query.order_by(referrers.c.position)
        if limit is not None:
            query = query.limit(limit)
        with self._repo.database.read() as conn:
            rows = conn.execute(query).all()
        return [
            (
                row.position,
                Descriptor(
                    media_type=row.media_type,
                    digest=Digest.parse(row.digest),
                    size=row.size,
                    annotations=row.annotations,
                    artifact_type=row.artifact_type,
                ),
            )
            for row in rows
        ]


class TagService:
    def __init__(self, repository: Repository) -> None:
        self._repo = repository

    def get(self, tag: str) -> ManifestInfo:
        """Return the manifest ``tag`` points to."""
        validate_tag(tag)
        with self._repo.database.read() as conn:
            row = _TAGGED_MANIFEST.execute(
                conn, {"b_repository": self._repo.name, "b_tag": tag}
            ).one_or_none()
        if row is None:
            raise ManifestUnknown(
                "manifest unknown", {"repository": self._repo.name, "tag": tag}
            )
        return _manifest_info(row)

    def tag(self, tag: str, digest: Digest) -> list[StoredEvent]:
        """Point ``tag`` at a manifest already in the repository."""
        validate_tag(tag)
        with self._repo.database.write() as conn:
            if ManifestService(self._repo)._row(conn, digest) is None:
                raise ManifestUnknown(
                    "manifest unknown",
                    {"repository": self._repo.name, "digest": str(digest)},
                )
            current = _tag_digest(conn, self._repo.name, tag)
            if current == str(digest):
                return []
            return self._repo.commit(
                conn,
                [
                    self._repo.event(
                        EventType.TAG_SET, tag=tag, digest=str(digest), previous=current
                    )
                ],
            )

    def untag(
        self, tag: str, preconditions: Preconditions | None = None
    ) -> list[StoredEvent]:
        """Delete ``tag``, if ``preconditions`` hold for what it points to."""
        validate_tag(tag)
        with self._repo.database.write() as conn:
            current = _tag_digest(conn, self._repo.name, tag)
            if current is None:
                raise ManifestUnknown(
                    "tag unknown", {"repository": self._repo.name, "tag": tag}
                )
            if preconditions is not None:
                preconditions.check(
                    current, {"repository": self._repo.name, "reference": tag}
                )
            return self._repo.commit(
                conn,
                [self._repo.event(EventType.TAG_DELETED, tag=tag, previous=current)],
            )

    def list(self, n: int | None = None, last: str | None = None) -> list[str]:
        """List tags in lexical order after ``last``, at most ``n``.

        Raises NameUnknown when the repository has never had an event.
        """
        params = {
            "b_repository": self._repo.name,
            "b_last": last or "",
            "b_limit": _NO_LIMIT if n is None else n,
        }
        with self._repo.database.read() as conn:
            names = [row[0] for row in _TAGS_PAGE.execute(conn, params).tuples]
            if not names and not _repository_exists(conn, self._repo.name):
                raise NameUnknown(
                    "repository name not known to registry", {"name": self._repo.name}
                )
        return names

    def iter_all(self, page_size: int = 1000) -> Iterator[str]:
        """Yield every tag in lexical order, one page at a time."""
        last: str | None = None
        while True:
            page = self.list(page_size, last)
            yield from page
            if len(page) < page_size:
                return
            last = page[-1]

    def lookup(self, digest: Digest) -> builtins.list[str]:
        """List the tags that point to ``digest``, in byte order."""
        with self._repo.database.read() as conn:
            return list(
                conn.execute(
                    sa.select(tags.c.tag)
                    .where(
                        (tags.c.repository == self._repo.name)
                        & (tags.c.digest == str(digest))
                    )
                    .order_by(bytewise(tags.c.tag))
                ).scalars()
            )


class BlobService:
    def __init__(self, repository: Repository) -> None:
        self._repo = repository

    @property
    def _store(self) -> BlobStore:
        return self._repo.registry.blob_store

    def stat(self, digest: Digest) -> BlobInfo:
        with self._repo.database.read() as conn:
            row = _blob_link(conn, self._repo.name, str(digest))
        if row is None:
            raise BlobUnknown(
                "blob unknown to registry",
                {"repository": self._repo.name, "digest": str(digest)},
            )
        return BlobInfo(digest, row.size)

    def path(self, digest: Digest) -> Path:
        """Return the file of a blob this repository may read."""
        self.stat(digest)
        return self._store.path(digest)

    def open(
        self, digest: Digest, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        info = self.stat(digest)
        return self._store.iter_range(digest, start, info.size if end is None else end)

    def delete(
        self, digest: Digest, preconditions: Preconditions | None = None
    ) -> list[StoredEvent]:
        """Unlink a blob from this repository, if ``preconditions`` hold for
        it. The bytes stay for others."""
        with self._repo.database.write() as conn:
            link = _blob_link(conn, self._repo.name, str(digest))
            if link is None:
                raise BlobUnknown(
                    "blob unknown to registry",
                    {"repository": self._repo.name, "digest": str(digest)},
                )
            if preconditions is not None:
                preconditions.check(
                    str(digest), {"repository": self._repo.name, "digest": str(digest)}
                )
            deleted = self._repo.event(
                EventType.BLOB_DELETED, digest=str(digest), size=link.size
            )
            return self._repo.commit(conn, [deleted])

    def mount(self, digest: Digest, source: str | None) -> BlobInfo | None:
        """Link a blob readable in ``source`` into this repository.

        With no ``source``, any repository that contains the blob will do. Return
        None when the blob cannot be mounted, so the caller can fall back to a
        normal upload.
        """
        if source is not None:
            source = validate_repository_name(source)
        with self._repo.database.write() as conn:
            existing = _blob_link(conn, self._repo.name, str(digest))
            if existing is not None:
                return BlobInfo(digest, existing.size)
            query = sa.select(blob_links).where(blob_links.c.digest == str(digest))
            if source is not None:
                query = query.where(blob_links.c.repository == source)
            # The repository that linked the blob first is the origin, so
            # the choice does not depend on the table's storage order.
            origin = conn.execute(
                query.order_by(blob_links.c.position).limit(1)
            ).first()
            # The file check runs under the append lock, which garbage
            # collection also holds while it removes a file.
            if origin is None or not self._store.exists(digest):
                return None
            self._repo.commit(
                conn,
                [
                    self._repo.event(
                        EventType.BLOB_MOUNTED,
                        digest=str(digest),
                        size=origin.size,
                        **{"from": origin.repository},
                    )
                ],
            )
        return BlobInfo(digest, origin.size)

    # ---- uploads ---------------------------------------------------------

    def create_upload(self) -> UploadStatus:
        upload_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        # The first write creates the staging file. A session with no bytes
        # yet has none, which saves a create and a close per blob.
        with self._repo.database.transaction(durable=False) as conn:
            _INSERT_UPLOAD.execute(
                conn,
                {
                    "id": upload_id,
                    "repository": self._repo.name,
                    "offset": 0,
                    "started_at": now,
                    "updated_at": now,
                },
            )
        return UploadStatus(upload_id, self._repo.name, 0, now)

    def upload_status(
        self, upload_id: str, *, new_staging_file: bool = False
    ) -> UploadStatus:
        """Return the session's status. With ``new_staging_file``, the caller
        has just created the staging file, and it counts as missing."""
        _check_upload_id(upload_id)
        with self._repo.database.read() as conn:
            row = _UPLOAD_ROW.execute(
                conn, {"b_id": upload_id, "b_repository": self._repo.name}
            ).one_or_none()
        if row is None:
            raise BlobUploadUnknown("blob upload unknown", {"upload": upload_id})
        staged = None if new_staging_file else self._store.staged_size(upload_id)
        if staged is None and row.offset == 0:
            staged = 0
        if staged is None:
            raise BlobUploadUnknown(
                "blob upload unknown: its staging file is gone", {"upload": upload_id}
            )
        return UploadStatus(
            upload_id, self._repo.name, min(row.offset, staged), row.started_at
        )

    @contextlib.contextmanager
    def _locked_upload(self, upload_id: str) -> Iterator[UploadStatus]:
        """Hold the locks of one upload and yield its status, read under them.

        A thread lock orders the requests of this process. A flock on the
        staging file orders those of other cairn serve processes that share
        the data directory and the database.
        """
        # The id names the staging file, so it is checked before any file
        # is opened.
        _check_upload_id(upload_id)
        with (
            self._repo.registry.upload_lock(upload_id),
            self._lock_staging(upload_id) as lock,
        ):
            try:
                status = self.upload_status(upload_id, new_staging_file=lock.created)
            except BlobUploadUnknown:
                # The file this request created belongs to no session, or
                # takes the place of the session's lost file.
                if lock.created:
                    self._store.discard(upload_id)
                # A staging file that this process still has open for the
                # upload is unlinked or orphaned, and would keep its space.
                # Forgetting the upload also drops its thread lock, so ids
                # that name no session leave no entry behind.
                self._repo.registry._forget_upload(upload_id)
                raise
            yield status

    def _lock_staging(self, upload_id: str) -> StagingLock:
        """Take the flock of the upload's staging file, creating a missing one.

        A disk too full to create the file discards the upload, as a write
        that fills the disk does, and raises InsufficientStorage. An id
        without a session raises BlobUploadUnknown instead. The caller holds
        the upload's thread lock.
        """
        try:
            return self._store.lock_staging(upload_id)
        except InsufficientStorage as error:
            try:
                self.upload_status(upload_id, new_staging_file=True)
            except BlobUploadUnknown:
                self._repo.registry._forget_upload(upload_id)
                raise
            self._discard_upload(upload_id, error)
            raise

    def _staged(self, status: UploadStatus) -> StagedBlob:
        cache = self._repo.registry._staged
        staged = cache.get(status.id)
        # Another process may have written to the file since this one
        # cached it, or a new file may have replaced a lost one.
        if (
            staged is None
            or staged.offset != status.offset
            or not staged.matches_path()
        ):
            if staged is not None:
                staged.close()
            staged = self._store.stage(status.id, status.offset)
            cache[status.id] = staged
        return staged

    def write_upload(
        self,
        upload_id: str,
        chunks: Iterable[bytes],
        start: int | None = None,
        *,
        declared_size: int | None = None,
    ) -> UploadStatus:
        """Append ``chunks`` to an upload; ``start`` must equal its offset.

        ``declared_size`` is the chunk's length as the request declared it.
        A chunk that would take the blob past the maximum blob size is then
        rejected before any of it is written.

        A blob that grows past the maximum blob size (BlobTooLarge) or a full
        disk (InsufficientStorage) discards the upload, because it can never
        complete. After any other error the session keeps its offset.
        """
        with self._locked_upload(upload_id) as status:
            check_upload_start(status, start)
            try:
                _check_declared_chunk(
                    status.offset, declared_size, self._repo.registry.max_blob_size
                )
                staged = self._staged(status)
                self._write_chunks(staged, chunks)
                staged.flush()
                staged.release_direct_io()
            except (BlobTooLarge, InsufficientStorage) as error:
                self._discard_upload(upload_id, error)
                raise
            except BaseException:
                # The open file may be past the session's offset, or its hash
                # may include bytes that never reached the file. The next
                # write opens it again at the recorded offset.
                self._repo.registry._close_staged(upload_id)
                raise
            # After a power cut the session may report an older offset, and
            # the client resends from there.
            with self._repo.database.transaction(durable=False) as conn:
                updated = _UPDATE_UPLOAD.execute(
                    conn,
                    {
                        "b_id": upload_id,
                        "b_offset": staged.offset,
                        "b_time": datetime.now(UTC),
                    },
                )
            if updated.rowcount == 0:
                # cairn gc, or another cairn serve on the same database,
                # deleted the session while this request wrote to it.
                self._repo.registry._forget_upload(upload_id)
                self._store.discard(upload_id)
                raise BlobUploadUnknown(
                    "blob upload unknown: its session was deleted while this "
                    "request wrote to it, for example by cairn gc as expired; "
                    "start the upload again",
                    {"upload": upload_id},
                )
            return UploadStatus(
                upload_id, self._repo.name, staged.offset, status.started_at
            )

    def commit_upload(
        self,
        upload_id: str,
        digest: Digest,
        chunks: Iterable[bytes] = (),
        start: int | None = None,
        *,
        declared_size: int | None = None,
    ) -> BlobInfo:
        """Append the final ``chunks``, verify ``digest`` and link the blob;
        ``start``, when given, must equal the upload's offset, and
        ``declared_size`` is checked as in write_upload.

        On a digest mismatch, a blob over the maximum blob size or a full
        disk, the upload is discarded and nothing is stored.
        """
        with self._locked_upload(upload_id) as status:
            check_upload_start(status, start)
            try:
                staged = self._staged(status)
                # The maximum may have been lowered since the upload began.
                check_declared_size(
                    staged.offset,
                    self._repo.registry.max_blob_size,
                    "the bytes already uploaded",
                )
                _check_declared_chunk(
                    staged.offset, declared_size, self._repo.registry.max_blob_size
                )
                self._write_chunks(staged, chunks)
                return self._commit_staged(staged, digest, upload_id)
            except (DigestMismatch, BlobCollected):
                # The staging file is gone; the session goes with it.
                with self._repo.database.transaction(durable=False) as conn:
                    _DELETE_UPLOAD.execute(conn, {"b_id": upload_id})
                raise
            except (BlobTooLarge, InsufficientStorage) as error:
                self._discard_upload(upload_id, error)
                raise
            finally:
                self._repo.registry._forget_upload(upload_id)

    def push(self, digest: Digest, chunks: Iterable[bytes]) -> BlobInfo:
        """Store a whole blob in one call: the monolithic upload. A failed
        push leaves no staging file."""
        upload_id = str(uuid.uuid4())
        try:
            staged = self._store.stage(upload_id)
            try:
                self._write_chunks(staged, chunks)
            except BaseException:
                staged.close()
                self._store.discard(upload_id)
                raise
            return self._commit_staged(staged, digest, None)
        except InsufficientStorage as error:
            self._log_storage_full(None, error)
            raise

    def _write_chunks(self, staged: StagedBlob, chunks: Iterable[bytes]) -> None:
        """Append ``chunks``, raising BlobTooLarge before the first chunk
        that would take the blob past the maximum blob size."""
        limit = self._repo.registry.max_blob_size
        for chunk in chunks:
            check_received_size(staged.offset + len(chunk), limit)
            staged.write(chunk)

    def _discard_upload(self, upload_id: str, error: RegistryError) -> None:
        """Delete an upload that can never complete: its staging file first,
        which frees its space, then its session. The caller holds the
        upload's lock."""
        if isinstance(error, InsufficientStorage):
            self._log_storage_full(upload_id, error)
        self._repo.registry._close_staged(upload_id)
        self._store.discard(upload_id)
        try:
            with self._repo.database.transaction(durable=False) as conn:
                _DELETE_UPLOAD.execute(conn, {"b_id": upload_id})
        except sa.exc.SQLAlchemyError as db_error:
            # Without its staging file the session reports its upload as
            # unknown, and purge_uploads deletes it when it expires.
            log.error(
                "upload_discard_failed",
                repository=self._repo.name,
                upload=upload_id,
                error=str(db_error),
                request_id=self._repo.request_id,
            )

    def _log_storage_full(self, upload_id: str | None, error: RegistryError) -> None:
        log.error(
            "blob_storage_full",
            repository=self._repo.name,
            upload=upload_id,
            error=str(error.__cause__ or error),
            data_dir=str(self._store.paths.root),
            request_id=self._repo.request_id,
        )

    def _commit_staged(
        self, staged: StagedBlob, digest: Digest, upload_id: str | None
    ) -> BlobInfo:
        """Move the staged blob into place and link it to this repository.

        The file is written outside the append lock, so garbage collection may
        remove it before the link commits. The check that it still exists runs
        inside the transaction that links it, while that transaction holds the
        append lock that garbage collection also takes to remove a file, so a
        committed link always has its file. Raises BlobCollected, linking
        nothing, when the file is gone.
        """
        size = self._store.commit(staged, digest)
        with self._repo.database.write() as conn:
            if upload_id is not None:
                _DELETE_UPLOAD.execute(conn, {"b_id": upload_id})
            if _blob_link(conn, self._repo.name, str(digest)) is None:
                if not self._store.exists(digest):
                    log.warning(
                        "blob_collected_before_link",
                        repository=self._repo.name,
                        digest=str(digest),
                        upload=upload_id,
                        request_id=self._repo.request_id,
                    )
                    raise BlobCollected(
                        "blob upload unknown: garbage collection removed the "
                        "blob before it was linked; push the blob again",
                        {"repository": self._repo.name, "digest": str(digest)},
                    )
                stored = self._repo.commit(
                    conn,
                    [
                        self._repo.event(
                            EventType.BLOB_PUSHED, digest=str(digest), size=size
                        )
                    ],
                )
                log.info(
                    "blob_pushed",
                    repository=self._repo.name,
                    digest=str(digest),
                    size=size,
                    position=stored[-1].position,
                    request_id=self._repo.request_id,
                )
        return BlobInfo(digest, size)

    def cancel_upload(self, upload_id: str) -> None:
        with self._locked_upload(upload_id):
            self._repo.registry._forget_upload(upload_id)
            with self._repo.database.transaction(durable=False) as conn:
                _DELETE_UPLOAD.execute(conn, {"b_id": upload_id})
            self._store.discard(upload_id)


@functools.lru_cache(maxsize=64)
def _stored_query(table_name: str, count: int) -> Prepared:
    """Return the query for the stored size and media type of ``count``
    digests in one repository's manifests, or for the size of ``count``
    digests in its blob links, whose media type is always null."""
    table = manifests if table_name == manifests.name else blob_links
    media_type = manifests.c.media_type if table is manifests else sa.null()
    return Prepared(
        sa.select(table.c.digest, table.c.size, media_type).where(
            (table.c.repository == sa.bindparam("b_repository"))
            & in_list(table.c.digest, "b_digest", count)
        )
    )


def _check_declared_chunk(
    offset: int, declared_size: int | None, limit: int | None
) -> None:
    """Raise BlobTooLarge when a chunk of ``declared_size`` bytes, appended at
    ``offset``, would take the blob past ``limit``."""
    if declared_size is not None:
        check_declared_size(
            offset + declared_size, limit, "the upload's offset plus Content-Length"
        )


def _check_upload_id(upload_id: str) -> None:
    """Raise BlobUploadUnknown unless ``upload_id`` has the form of the ids
    that create_upload issues.

    Another spelling of a real upload's id, such as its uppercase form, is
    unknown too, so that it never takes that upload's locks.
    """
    if not is_upload_id(upload_id):
        raise BlobUploadUnknown("blob upload unknown", {"upload": upload_id})


def check_upload_start(status: UploadStatus, start: int | None) -> None:
    """Raise RangeInvalid unless ``start``, when given, is the upload's offset."""
    if start is not None and start != status.offset:
        raise RangeInvalid(
            "chunk does not start at the upload's current offset",
            {"upload": status.id, "start": start, "offset": status.offset},
            offset=status.offset,
        )


# Reference kinds whose bytes are blobs; child manifests and subjects are not.
_BLOB_KINDS = frozenset({"config", "layer"})


def _content_size(manifest_size: int, references: Sequence[Reference]) -> int:
    """Return the bytes a manifest accounts for as pushed: its own size plus
    its config and layers, counted again for every manifest that shares them."""
    return manifest_size + sum(
        r.descriptor.size for r in references if r.kind in _BLOB_KINDS
    )


def _reference_json(kind: str, descriptor: Descriptor) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": kind,
        "media_type": descriptor.media_type,
        "digest": str(descriptor.digest),
        "size": descriptor.size,
    }
    if descriptor.platform is not None:
        body["platform"] = dict(descriptor.platform)
    return body


def _manifest_info(row: Any) -> ManifestInfo:
    return ManifestInfo(
        digest=Digest.parse(row.digest),
        media_type=row.media_type,
        size=row.size,
        artifact_type=row.artifact_type,
        subject=Digest.parse(row.subject) if row.subject else None,
    )


def _tag_digest(conn: Connection, repository: str, tag: str) -> str | None:
    digest: str | None = _TAG_DIGEST.execute(
        conn, {"b_repository": repository, "b_tag": tag}
    ).scalar_one_or_none()
    return digest


def _blob_link(conn: Connection, repository: str, digest: str) -> Any:
    return _BLOB_LINK.execute(
        conn, {"b_repository": repository, "b_digest": digest}
    ).one_or_none()


def _repository_exists(conn: Connection, name: str) -> bool:
    return _REPOSITORY_EXISTS.execute(conn, {"b_name": name}).first() is not None
