"""An OCI image layout directory as a mirror target (``--target oci:DIR``).

Each repository becomes a layout of its own under ``DIR/<repository>``,
with the files the OCI image-layout specification (v1.1) defines:
``oci-layout``, ``index.json`` and ``blobs/<algorithm>/<encoded>``. Tools
then read a tag as ``oci:DIR/<repository>:<tag>``.

``index.json`` lists every manifest the repository holds: one entry per tag,
annotated with ``org.opencontainers.image.ref.name``, and one entry without
the annotation for each manifest that no tag points at.

A repository whose name continues another's with a layout entry, such as
``col/index.json`` or ``col/blobs/sha256`` beside ``col``, would have its
layout among the other's files. The first access to a repository checks
that no layout overlaps its own, before anything is written, and raises
LayoutCollision naming both repositories, which stops the mirror.

Blobs are written to a partial file, fsynced and renamed into place, so a
file named by a digest is always whole. ``index.json`` is rewritten the same
way, when the mirror saves its checkpoint and before the checkpoint
records the changes, and before a delete removes files. Each repository
under DIR must have one writer, so two mirrors may share DIR only when
their ``--repositories`` do not overlap.

A partial file is named ``.partial-<name>-<32 hex digits>``, where name is
the file it becomes. Its writer holds an exclusive flock(2) on it until the
file is renamed into place or removed. A mirror that starts removes every
partial file under DIR that no process holds locked, which only a writer
killed mid-copy leaves behind, and keeps the ones that another running
mirror writes.

Each propagated delete is followed by a garbage collection of the
repository's ``blobs/``. A blob file stays while a manifest that
``index.json`` lists reaches it: that manifest's own file, its config and
layers, and the same for its child manifests and its subject, recursively.
Every other file named by a digest is removed, and so are partial files
that no process holds locked. That includes blobs copied for a manifest whose
own event comes later; the copy of that manifest fetches them again. When
a manifest in that closure is missing or does not parse, nothing is
removed. A blob.deleted event removes only that blob, and only when no
manifest reaches it.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Final

import structlog

from consumers.mirror.errors import MirrorError
from consumers.mirror.partial import (
    PartialFile,
    copy_atomically,
    find_partial_files,
    remove_abandoned,
    sync_dir,
    write_atomically,
)
from consumers.mirror.registry import StoredBlob
from consumers.mirror.target import BlobCopy, BlobOpener
from engine.domain.digest import Digest
from engine.domain.errors import RegistryError
from engine.domain.manifests import Manifest, parse_stored_manifest
from engine.domain.names import validate_repository_name

log = structlog.get_logger(__name__)

REF_NAME: Final = "org.opencontainers.image.ref.name"
INDEX_MEDIA_TYPE: Final = "application/vnd.oci.image.index.v1+json"
LAYOUT_VERSION: Final = {"imageLayoutVersion": "1.0.0"}
# The entries of a layout's root, as the OCI image-layout specification
# (v1.1) names them. The mirror's partial files there start with ".", which
# no component of a repository name does.
LAYOUT_ENTRIES: Final = ("blobs", "index.json", "oci-layout")


class LayoutUnreadable(Exception):
    """A manifest that index.json's closure needs is missing or does not parse."""


class LayoutCollision(MirrorError):
    """A repository whose layout would overlap another repository's."""


class LayoutTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"oci:{root}"
        # Repositories whose layout exists with nothing else among its
        # entries. A layout that would overlap one of them fails the check
        # of its ancestors, so they need no check again.
        self._checked: set[str] = set()
        # Each repository has one writer, so its index is read once and kept.
        self._indexes: dict[str, list[dict[str, Any]]] = {}
        # The digests that each repository's index.json reaches, computed on
        # a delete and forgotten whenever that index.json changes.
        self._referenced: dict[str, frozenset[str]] = {}
        # Repositories whose index changed since its index.json was written.
        self._changed: set[str] = set()

    async def start(self) -> None:
        """Remove the partial files that a mirror killed mid-copy left."""
        partial_files = await asyncio.to_thread(find_partial_files, self.root)
        removal = await asyncio.to_thread(remove_abandoned, partial_files)
        if removal.files:
            log.info(
                "layout_partial_files_removed",
                layout=str(self.root),
                files=removal.files,
                size=removal.size,
            )
        if removal.locked:
            log.info(
                "layout_partial_files_kept",
                layout=str(self.root),
                files=removal.locked,
                reason="another process writes them",
            )

    def repository_dir(self, repository: str) -> Path:
        """Return the directory of a repository's layout, raising
        LayoutCollision when it overlaps another repository's layout."""
        # The repository grammar allows no "." or ".." component, so the
        # path stays under the root.
        validate_repository_name(repository)
        if repository not in self._checked:
            self._check_place(repository)
        return self.root / repository

    def _check_place(self, repository: str) -> None:
        """Raise LayoutCollision when the layout of ``repository`` would
        run through an existing layout, or one is among its entries."""
        components = repository.split("/")
        for depth in range(1, len(components)):
            entry = components[depth]
            outer = "/".join(components[:depth])
            if entry in LAYOUT_ENTRIES and _is_layout(self.root / outer):
                raise self._collision(repository, outer, outer, entry)

        directory = self.root / repository
        for entry in ("index.json", "oci-layout"):
            if (directory / entry).is_dir():
                inner = self._inner_layout(directory / entry)
                raise self._collision(repository, inner, repository, entry)
        if _is_layout(directory):
            self._checked.add(repository)
            return
        # Until the repository's layout files exist, blobs/ holds only
        # algorithm directories with blob and partial files in them.
        inner = self._inner_layout(directory / "blobs")
        if inner is not None:
            raise self._collision(repository, inner, repository, "blobs")

    def _inner_layout(self, directory: Path) -> str | None:
        """Return the repository of a layout inside ``directory``, or None."""
        for path, _, names in os.walk(directory):
            if "oci-layout" in names or "index.json" in names:
                return PurePosixPath(Path(path).relative_to(self.root)).as_posix()
        return None

    def _collision(
        self, repository: str, other: str | None, outer: str, entry: str
    ) -> LayoutCollision:
        """Build the error for two layouts that overlap at the ``entry`` of
        the layout of ``outer``, one of the two repositories."""
        path = self.root / outer / entry
        start = f"cannot mirror repository {repository} into {self.description}"
        if other is None:
            return LayoutCollision(
                f"{start}: {path}, the {entry} file of its layout, is a "
                "directory. Remove it, or mirror into another directory"
            )
        kind = "directory" if entry == "blobs" else "file"
        return LayoutCollision(
            f"{start}: its layout and that of repository {other} overlap at "
            f"{path}, the {entry} {kind} of the layout of {outer}. A layout "
            "target cannot hold both; leave one out with --repositories, or "
            "mirror it into another directory"
        )

    def _blob_path(self, repository: str, digest: str) -> Path:
        return _layout_blob_path(self.repository_dir(repository), digest)

    async def has_blob(self, repository: str, digest: str) -> bool:
        return await asyncio.to_thread(self._blob_path(repository, digest).is_file)

    async def stored_blob(self, repository: str, digest: str) -> StoredBlob | None:
        path = self._blob_path(repository, digest)
        size = await asyncio.to_thread(_file_size, path)
        return None if size is None else StoredBlob(size)

    async def put_blob(
        self,
        repository: str,
        digest: str,
        open_blob: BlobOpener,
        mount_from: str | None,
    ) -> BlobCopy:
        path = self._blob_path(repository, digest)
        await asyncio.to_thread(self._prepare, repository, path.parent)
        if mount_from is not None:
            # The origin is only read, and a file named by the digest contains
            # that blob wherever it is, so the origin's layout needs no check.
            validate_repository_name(mount_from)
            origin = _layout_blob_path(self.root / mount_from, digest)
            if await asyncio.to_thread(_link_or_copy, origin, path):
                return BlobCopy(mounted=True, size=0)

        partial = await asyncio.to_thread(PartialFile, path)
        size = 0
        try:
            async with open_blob() as blob:
                async for chunk in blob.chunks:
                    await asyncio.to_thread(partial.write, chunk)
                    size += len(chunk)
            await asyncio.to_thread(partial.commit)
        except BaseException:
            partial.discard()
            raise
        return BlobCopy(mounted=False, size=size)

    async def has_manifest(self, repository: str, digest: str) -> bool:
        index = await self._index(repository)
        if not any(entry["digest"] == digest for entry in index):
            return False
        return await self.has_blob(repository, digest)

    async def put_manifest(
        self, repository: str, digest: str, media_type: str, raw: bytes
    ) -> None:
        path = self._blob_path(repository, digest)
        if not await asyncio.to_thread(path.is_file):
            await asyncio.to_thread(self._prepare, repository, path.parent)
            await asyncio.to_thread(write_atomically, path, raw)
        index = await self._index(repository)
        if any(entry["digest"] == digest for entry in index):
            return
        index.append(_entry(media_type, digest, len(raw), None))
        self._index_changed(repository)

    async def tagged_digest(self, repository: str, tag: str) -> str | None:
        for entry in await self._index(repository):
            if (entry.get("annotations") or {}).get(REF_NAME) == tag:
                return str(entry["digest"])
        return None

    async def set_tag(self, repository: str, tag: str, digest: str) -> None:
        raw = await asyncio.to_thread(self._blob_path(repository, digest).read_bytes)
        index = await self._index(repository)
        media_type = _listed_media_type(index, digest)
        if media_type is None:
            media_type = parse_stored_manifest(raw, None).media_type
        moved = [entry for entry in index if _ref_name(entry) == tag]
        index[:] = [
            entry
            for entry in index
            if _ref_name(entry) != tag
            and not (entry["digest"] == digest and _ref_name(entry) is None)
        ]
        index.append(_entry(media_type, digest, len(raw), tag))
        for entry in moved:
            _keep_untagged(index, entry)
        self._index_changed(repository)

    async def delete_tag(self, repository: str, tag: str) -> bool:
        index = await self._index(repository)
        removed = [entry for entry in index if _ref_name(entry) == tag]
        if not removed:
            return True
        index[:] = [entry for entry in index if _ref_name(entry) != tag]
        for entry in removed:
            _keep_untagged(index, entry)
        self._index_changed(repository)
        return True

    async def delete_manifest(self, repository: str, digest: str) -> None:
        index = await self._index(repository)
        kept = [entry for entry in index if entry["digest"] != digest]
        if len(kept) != len(index):
            index[:] = kept
            self._index_changed(repository)
        # index.json stops listing the manifest before its files go.
        await self._write_index(repository)
        # Also when the entry was gone already: a crash after the index was
        # saved and before the files were removed leaves them to this run.
        await self._collect_garbage(repository)

    async def delete_blob(self, repository: str, digest: str) -> None:
        referenced = await self._referenced_digests(repository)
        if referenced is None or digest in referenced:
            return
        path = self._blob_path(repository, digest)
        await self._write_index(repository)
        removed, size = await asyncio.to_thread(_remove_files, [path])
        if removed:
            log.info(
                "layout_blob_removed", repository=repository, digest=digest, size=size
            )

    async def flush(self) -> None:
        """Write the index.json of every repository whose index changed."""
        for repository in sorted(self._changed):
            await self._write_index(repository)

    async def aclose(self) -> None:
        return None

    # ---- garbage collection of blobs/ ------------------------------------

    async def _collect_garbage(self, repository: str) -> None:
        referenced = await self._referenced_digests(repository)
        if referenced is None:
            return
        blobs = self.repository_dir(repository) / "blobs"
        garbage = await asyncio.to_thread(_unreferenced_files, blobs, referenced)
        removed, size = await asyncio.to_thread(_remove_files, garbage)
        partial_files = await asyncio.to_thread(find_partial_files, blobs)
        removal = await asyncio.to_thread(remove_abandoned, partial_files)
        removed += removal.files
        size += removal.size
        if removed:
            log.info(
                "layout_blobs_removed", repository=repository, files=removed, size=size
            )

    async def _referenced_digests(self, repository: str) -> frozenset[str] | None:
        """Return the digests that index.json reaches, or None if unknown."""
        cached = self._referenced.get(repository)
        if cached is not None:
            return cached
        entries = list(await self._index(repository))
        try:
            referenced = await asyncio.to_thread(self._closure, repository, entries)
        except LayoutUnreadable as error:
            log.warning(
                "layout_gc_skipped",
                repository=repository,
                error=str(error),
                note="no blob file was removed",
            )
            return None
        self._referenced[repository] = referenced
        return referenced

    def _closure(
        self, repository: str, entries: list[dict[str, Any]]
    ) -> frozenset[str]:
        """Return every digest that the manifests of ``entries`` reach.

        Raises LayoutUnreadable when a listed or child manifest has no file,
        or a manifest file does not parse, because the blobs it references
        are then unknown. A subject without a file is skipped, because a
        referrer may be copied without its subject.
        """
        referenced: set[str] = set()
        # (digest, media type, whether its file must exist)
        pending: list[tuple[str, str | None, bool]] = [
            (str(entry.get("digest")), entry.get("mediaType"), True)
            for entry in entries
        ]
        while pending:
            digest, media_type, required = pending.pop()
            if digest in referenced:
                continue
            try:
                parsed = Digest.parse(digest)
                raw = self._blob_path(repository, digest).read_bytes()
            except RegistryError as error:
                raise LayoutUnreadable(f"invalid digest {digest!r}: {error}") from None
            except FileNotFoundError:
                if required:
                    raise LayoutUnreadable(
                        f"manifest {digest} has no file in blobs/"
                    ) from None
                continue
            referenced.add(digest)
            manifest = _parse_layout_manifest(raw, digest, media_type, parsed.algorithm)
            for reference in manifest.references():
                child = reference.descriptor
                if reference.kind in ("manifest", "subject"):
                    pending.append(
                        (str(child.digest), child.media_type, reference.required)
                    )
                else:
                    referenced.add(str(child.digest))
        return frozenset(referenced)

    # ---- index.json ------------------------------------------------------

    async def _index(self, repository: str) -> list[dict[str, Any]]:
        cached = self._indexes.get(repository)
        if cached is None:
            cached = await asyncio.to_thread(self._read_index, repository)
            self._indexes[repository] = cached
        return cached

    def _read_index(self, repository: str) -> list[dict[str, Any]]:
        path = self.repository_dir(repository) / "index.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        manifests = document.get("manifests", [])
        return [entry for entry in manifests if isinstance(entry, dict)]

    def _index_changed(self, repository: str) -> None:
        """Note that the repository's index changed. Its index.json is
        written by ``flush``, before the mirror's checkpoint passes the
        change, so a tag costs one write per checkpoint, not one each."""
        self._referenced.pop(repository, None)
        self._changed.add(repository)

    async def _write_index(self, repository: str) -> None:
        if repository not in self._changed:
            return
        data = _index_document(self._indexes[repository])
        directory = self.repository_dir(repository)
        await asyncio.to_thread(self._prepare, repository, directory)
        await asyncio.to_thread(write_atomically, directory / "index.json", data)
        self._changed.discard(repository)

    def _prepare(self, repository: str, directory: Path) -> None:
        """Create the directories of a repository and the files that make it
        a valid layout: ``oci-layout``, and ``index.json`` with no manifests
        until one is listed. A repository with only blobs needs both too."""
        directory.mkdir(parents=True, exist_ok=True)
        root = self.repository_dir(repository)
        index = root / "index.json"
        if not index.exists():
            write_atomically(index, _index_document([]))
        marker = root / "oci-layout"
        if not marker.exists():
            write_atomically(marker, json.dumps(LAYOUT_VERSION).encode())


def _layout_blob_path(directory: Path, digest: str) -> Path:
    parsed = Digest.parse(digest)
    return directory / "blobs" / parsed.algorithm / parsed.encoded


def _is_layout(directory: Path) -> bool:
    """Return whether ``directory`` contains a layout's index.json or
    oci-layout file. The mirror writes index.json first, so the layout of a mirror
    killed before it wrote oci-layout counts too."""
    return (directory / "index.json").is_file() or (directory / "oci-layout").is_file()


def _parse_layout_manifest(
    raw: bytes, digest: str, media_type: str | None, algorithm: str
) -> Manifest:
    """Parse a manifest file by ``media_type``, the type that index.json or
    the descriptor pointing at it gives, or else by the type its body names.

    An earlier cairn stored indexes and referrers whose descriptors give a
    child or subject another type than the body's own, so the body decides
    when the two disagree. Raises LayoutUnreadable when neither parses.
    """
    try:
        return parse_stored_manifest(raw, media_type, algorithm=algorithm)
    except RegistryError as error:
        if media_type is None:
            raise LayoutUnreadable(
                f"manifest {digest} does not parse: {error}"
            ) from None
        descriptor_error = error
    try:
        return parse_stored_manifest(raw, None, algorithm=algorithm)
    except RegistryError:
        raise LayoutUnreadable(
            f"manifest {digest} does not parse as {media_type}: {descriptor_error}"
        ) from None


def _index_document(manifests: list[dict[str, Any]]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def _entry(media_type: str, digest: str, size: int, tag: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if tag is not None:
        entry["annotations"] = {REF_NAME: tag}
    return entry


def _keep_untagged(index: list[dict[str, Any]], removed: dict[str, Any]) -> None:
    """List the manifest of a removed tag entry untagged if no entry lists it."""
    if any(entry["digest"] == removed["digest"] for entry in index):
        return
    index.append(_entry(removed["mediaType"], removed["digest"], removed["size"], None))


def _listed_media_type(index: list[dict[str, Any]], digest: str) -> str | None:
    """Return the media type of the entry for ``digest`` in ``index``, or None.

    put_manifest lists each manifest with the type the source served it as.
    The bytes alone do not give it for a Docker body without mediaType.
    """
    for entry in index:
        if entry["digest"] == digest and isinstance(entry.get("mediaType"), str):
            return str(entry["mediaType"])
    return None


def _ref_name(entry: dict[str, Any]) -> str | None:
    return (entry.get("annotations") or {}).get(REF_NAME)


def _link_or_copy(origin: Path, path: Path) -> bool:
    """Hard-link (or copy, across file systems) a blob from another repository.

    Returns False when ``origin`` does not exist.
    """
    if not origin.is_file():
        return False
    try:
        os.link(origin, path)
    except FileExistsError:
        # Files named by a digest are whole, so the one in place is the blob.
        return True
    except FileNotFoundError:
        return False
    except OSError:
        copy_atomically(origin, path)
        return True
    sync_dir(path.parent)
    return True


def _unreferenced_files(blobs: Path, referenced: frozenset[str]) -> list[Path]:
    """List the files under ``blobs/<algorithm>/`` named by a digest outside
    ``referenced``. Partial files are left to remove_abandoned, and other
    names are not the mirror's and stay.
    """
    garbage: list[Path] = []
    try:
        algorithms = [path for path in blobs.iterdir() if path.is_dir()]
    except FileNotFoundError:
        return garbage
    for directory in algorithms:
        for path in directory.iterdir():
            digest = f"{directory.name}:{path.name}"
            try:
                Digest.parse(digest)
            except RegistryError:
                continue
            if digest not in referenced and path.is_file():
                garbage.append(path)
    return garbage


def _remove_files(paths: list[Path]) -> tuple[int, int]:
    """Remove ``paths`` and fsync their directories; return the count and bytes."""
    removed = size = 0
    directories: set[Path] = set()
    for path in paths:
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        size += length
        directories.add(path.parent)
    for directory in directories:
        sync_dir(directory)
    return removed, size


def _file_size(path: Path) -> int | None:
    """Return the size of the regular file at ``path``, or None without one."""
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None
