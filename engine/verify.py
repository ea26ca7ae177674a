"""`cairn verify`: check the hash chain, blob contents and projections.

verify() returns problems, which are damage to the stored data and make
`cairn verify` exit 1. The other checks return warnings, which do not
change the exit status. check_stored_manifests() warns about stored
manifests that the checks on new pushes reject, either when they parse or
when their descriptors are compared with the repository's contents. An
earlier cairn stored them under looser checks, and the registry still
serves them as stored.
check_manifest_contents_present() warns about manifests whose config,
layers or child manifests their repository no longer contains, because a
client deleted a blob or a child manifest that they use. Pulls of such a
manifest fail.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine import log as event_log
from engine.blobs.store import READ_CHUNK, describe_file_type
from engine.domain.digest import Digest
from engine.domain.errors import RegistryError
from engine.domain.events import GENESIS_HASH
from engine.domain.manifests import FOREIGN_LAYER_TYPES, parse_manifest
from engine.projections import ALL_PROJECTIONS
from engine.projections.rebuild import (
    ReplayError,
    diff_projections,
    projection_tables,
    replay,
    snapshot_projections,
)
from engine.registry import Registry
from engine.tables import blob_links, manifest_contents, manifests


def verify(registry: Registry) -> list[str]:
    """Return a description of every problem found; empty means all is well."""
    problems = verify_chain(registry) + verify_blobs(registry)
    problems += verify_manifest_contents(registry) + verify_projections(registry)
    return problems


def verify_chain(registry: Registry) -> list[str]:
    """Check positions are 1..N without gaps and every hash links and matches."""
    problems: list[str] = []
    expected_position = 1
    previous_hash = GENESIS_HASH
    with registry.database.read() as conn:
        head_position, head_hash = event_log.head(conn)
        for event in event_log.read_all(conn, upcast_payload=False):
            if event.position != expected_position:
                problems.append(
                    f"log: position {event.position} follows {expected_position - 1}; "
                    "positions must have no gaps"
                )
            if event.previous_hash != previous_hash:
                problems.append(
                    f"log: event at position {event.position} has previous hash "
                    f"{event.previous_hash}, but the event before it hashes to "
                    f"{previous_hash}"
                )
            if event.expected_hash() != event.hash:
                problems.append(
                    f"log: event at position {event.position} ({event.id}) does not "
                    f"match its hash {event.hash}; its content was changed"
                )
            previous_hash = event.hash
            expected_position = event.position + 1
    if head_position != expected_position - 1 or head_hash != previous_hash:
        problems.append(
            f"log: head records position {head_position} hash {head_hash}, but the "
            f"last event is position {expected_position - 1} hash {previous_hash}"
        )
    return problems


def verify_blobs(registry: Registry) -> list[str]:
    """Check every stored blob hashes to its name and every link has its file."""
    problems: list[str] = []
    store = registry.blob_store
    for digest, path in store.iter_blobs():
        problem = _check_blob_file(digest, path)
        if problem is not None:
            problems.append(problem)
    with registry.database.read() as conn:
        links = conn.execute(sa.select(blob_links.c.repository, blob_links.c.digest))
        for repository, digest_text in links:
            if not store.exists(Digest.parse(digest_text)):
                problems.append(
                    f"blob {digest_text}: linked in {repository} but missing on disk"
                )
    return problems


def _check_blob_file(digest: Digest, path: Path) -> str | None:
    """Return the problem with the blob file of ``digest`` at ``path``, or
    None when it is a regular file whose bytes hash to the digest.

    A symbolic link is followed, as the API follows it to serve the blob.
    """
    try:
        # O_NONBLOCK, so that opening a fifo does not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if path.is_symlink():
            return f"blob {digest}: {path} is a symbolic link to a missing file"
        # cairn gc removed it after the listing. A link to it, if any, is
        # reported by the check of the links.
        return None
    except OSError as error:
        return f"blob {digest}: cannot read {path}: {error.strerror or error}"

    hasher = hashlib.new(digest.algorithm)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            return (
                f"blob {digest}: {path} is a {describe_file_type(mode)}, "
                "not a regular file"
            )
        while chunk := os.read(descriptor, READ_CHUNK):
            hasher.update(chunk)
    except OSError as error:
        return f"blob {digest}: cannot read {path}: {error.strerror or error}"
    finally:
        os.close(descriptor)

    if hasher.hexdigest() != digest.encoded:
        return (
            f"blob {digest}: content hashes to {digest.algorithm}:"
            f"{hasher.hexdigest()} ({path})"
        )
    return None


def verify_manifest_contents(registry: Registry) -> list[str]:
    problems: list[str] = []
    with registry.database.read() as conn:
        # yield_per streams the rows instead of loading every manifest.
        rows = conn.execute(
            sa.select(manifest_contents).execution_options(yield_per=500)
        )
        for digest, content in rows:
            algorithm, encoded = digest.split(":", 1)
            actual = hashlib.new(algorithm, bytes(content)).hexdigest()
            if actual != encoded:
                problems.append(f"manifest {digest}: stored bytes hash to {actual}")
    return problems


def verify_projections(registry: Registry) -> list[str]:
    """Replay the log into temporary tables and compare them with the
    projections, in one transaction that reads one snapshot.

    Writers go on meanwhile, and a database that the user may only read
    works too: a SQLite file opened read-only, or a PostgreSQL role that
    may read the tables and create temporary ones.
    """
    with registry.database.scratch() as conn:
        live = snapshot_projections(conn)
        with _temporary_projection_tables(conn):
            try:
                replay(conn, ALL_PROJECTIONS)
            except ReplayError as exc:
                return [f"projections: {exc}"]
            rebuilt = snapshot_projections(conn)
    return diff_projections(live, rebuilt)


@contextmanager
def _temporary_projection_tables(conn: Connection) -> Iterator[None]:
    """Create an empty temporary table like each projection table, and drop
    them all at the end.

    Both SQLite and PostgreSQL look up a table name without a schema among
    the temporary tables first (PostgreSQL manual, "search_path"), so the
    statements of a replay and of snapshot_projections on ``conn`` use
    these tables meanwhile.
    """
    names = [table.name for table in projection_tables()]
    quote = conn.dialect.identifier_preparer.quote
    if conn.dialect.name == "sqlite":
        statements = _sqlite_temporary_tables(conn, names)
        schema = "temp"
    else:
        # The copied indexes include the unique ones that the replay's
        # ON CONFLICT clauses name.
        statements = [
            f"CREATE TEMPORARY TABLE {quote(name)} "
            f"(LIKE {quote(name)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING INDEXES)"
            for name in names
        ]
        schema = "pg_temp"
    created: list[str] = []
    try:
        for name, statement in zip(names, statements, strict=True):
            conn.exec_driver_sql(statement)
            created.append(name)
        yield
    finally:
        for name in created:
            conn.exec_driver_sql(f"DROP TABLE {schema}.{quote(name)}")


def _sqlite_temporary_tables(conn: Connection, names: list[str]) -> list[str]:
    """Return a CREATE TEMPORARY TABLE statement for each of the tables
    ``names``, with the table's own definition.

    A connection to a read-only file may create them, because the ``temp``
    schema is not stored in the database file. The secondary indexes are
    not copied, because they change no row.
    """
    placeholders = ", ".join("?" * len(names))
    # SQLite stores each CREATE TABLE with those two keywords first, in
    # upper case (SQLite documentation, "The Schema Table").
    rows = conn.exec_driver_sql(
        "SELECT name, sql FROM main.sqlite_master "
        f"WHERE type = 'table' AND name IN ({placeholders})",
        tuple(names),
    )
    definitions: dict[str, str] = {name: sql for name, sql in rows}
    return [
        "CREATE TEMPORARY TABLE " + definitions[name].removeprefix("CREATE TABLE ")
        for name in names
    ]


def check_stored_manifests(registry: Registry) -> list[str]:
    """Describe each manifest in a repository that the checks on new pushes
    reject, with the reason, in repository and digest order."""
    warnings: list[str] = []
    query = (
        sa.select(
            manifests.c.repository,
            manifests.c.digest,
            manifests.c.media_type,
            manifests.c.references,
            manifest_contents.c.content,
        )
        .join(manifest_contents, manifest_contents.c.digest == manifests.c.digest)
        .order_by(manifests.c.repository, manifests.c.digest)
        # Streamed, so that the contents of all manifests are never in memory.
        .execution_options(yield_per=500)
    )
    with registry.database.read() as conn:
        current: str | None = None
        contents = _RepositoryContents({}, {})
        rows = conn.execute(query)
        for repository, digest, media_type, references, content in rows:
            if repository != current:
                current = repository
                contents = _repository_contents(conn, repository)
            algorithm, encoded = digest.split(":", 1)
            raw = bytes(content)
            if hashlib.new(algorithm, raw).hexdigest() != encoded:
                # Damaged bytes, which verify_manifest_contents reports.
                continue
            reasons: list[str] = []
            try:
                parse_manifest(raw, media_type, algorithm=algorithm)
            except RegistryError as error:
                reasons.append(str(error))
            reasons += _descriptor_mismatches(references, contents)
            warnings += [
                f"manifest {repository}@{digest} ({media_type}) is rejected "
                f"by the checks on new pushes: {reason}"
                for reason in reasons
            ]
    return warnings


def _descriptor_mismatches(
    references: list[dict[str, Any]], contents: _RepositoryContents
) -> list[str]:
    """Describe each descriptor of a manifest whose size or media type
    differs from the content that its repository stores under its digest,
    as the checks on a manifest push compare them.

    Content that the repository does not store is left out, because
    check_manifest_contents_present reports what a manifest requires and
    lacks, and a subject need not be stored.
    """
    reasons: list[str] = []
    for reference in references:
        kind = reference["kind"]
        digest = reference["digest"]
        stored: tuple[int, str | None] | None
        if kind in ("manifest", "subject"):
            stored = contents.manifests.get(digest)
        elif reference["media_type"] in FOREIGN_LAYER_TYPES:
            # NOTE: the log does not record a layer's urls, so a foreign layer
            # with urls, which a push does not compare, cannot be distinguished
            # from a nondistributable layer without urls, which it compares.
            continue
        else:
            blob_size = contents.blobs.get(digest)
            stored = None if blob_size is None else (blob_size, None)
        if stored is None:
            continue
        stored_size, stored_media_type = stored
        if reference["size"] != stored_size:
            reasons.append(
                f"its {kind} descriptor of {digest} gives size "
                f"{reference['size']}, but the repository stores {stored_size} "
                "bytes under that digest"
            )
        if stored_media_type is not None and (
            reference["media_type"] != stored_media_type
        ):
            reasons.append(
                f"its {kind} descriptor of {digest} gives mediaType "
                f"{reference['media_type']}, but the repository stores that "
                f"manifest as {stored_media_type}"
            )
    return reasons


def check_manifest_contents_present(registry: Registry) -> list[str]:
    """Describe each reference of a stored manifest to a blob or child
    manifest that its repository does not contain, in repository and
    digest order."""
    warnings: list[str] = []
    query = (
        sa.select(manifests.c.repository, manifests.c.digest, manifests.c.references)
        .order_by(manifests.c.repository, manifests.c.digest)
        .execution_options(yield_per=500)
    )
    with registry.database.read() as conn:
        current: str | None = None
        contents = _RepositoryContents({}, {})
        for repository, digest, references in conn.execute(query):
            if repository != current:
                # One repository's links and manifests at a time.
                current = repository
                contents = _repository_contents(conn, repository)
            for reference in references:
                kind = reference["kind"]
                if kind not in _CONTENT_TABLE:
                    continue
                contained = getattr(contents, _CONTENT_TABLE[kind])
                if reference["digest"] not in contained:
                    warnings.append(
                        f"manifest {repository}@{digest} references {kind} "
                        f"{reference['digest']}, which the repository no longer "
                        "contains, so pulls of it fail"
                    )
    return warnings


# The table of repository contents that holds each kind of reference a
# manifest requires. A subject need not be in the repository.
_CONTENT_TABLE = {"config": "blobs", "layer": "blobs", "manifest": "manifests"}


@dataclass(frozen=True, slots=True)
class _RepositoryContents:
    """One repository's blob links, as digest to size, and its manifests, as
    digest to size and media type."""

    blobs: dict[str, int]
    manifests: dict[str, tuple[int, str]]


def _repository_contents(conn: Connection, repository: str) -> _RepositoryContents:
    linked = conn.execute(
        sa.select(blob_links.c.digest, blob_links.c.size).where(
            blob_links.c.repository == repository
        )
    )
    stored = conn.execute(
        sa.select(manifests.c.digest, manifests.c.size, manifests.c.media_type).where(
            manifests.c.repository == repository
        )
    )
    return _RepositoryContents(
        blobs={digest: size for digest, size in linked},
        manifests={digest: (size, media_type) for digest, size, media_type in stored},
    )
