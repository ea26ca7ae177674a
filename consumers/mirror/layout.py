"""An OCI image layout directory as a mirror target (``--target oci:DIR``).

Each repository becomes a layout of its own under ``DIR/<repository>``,
with the files the OCI image-layout specification (v1.1) defines:
``oci-layout``, ``index.json`` and ``blobs/<algorithm>/<encoded>``. Tools
then read a tag as ``oci:DIR/<repository>:<tag>``.

``index.json`` lists every manifest the repository holds: one entry per tag,
annotated with ``org.opencontainers.image.ref.name``, and one entry without
the annotation for each manifest that no tag points at.

Blobs are written to a temporary file, fsynced and renamed into place, so a
file named by a digest is always whole. ``index.json`` is rewritten the same
way. The mirror must be the only writer of DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Final

from consumers.mirror.target import BlobCopy, BlobOpener
from engine.domain.digest import Digest
from engine.domain.manifests import parse_manifest
from engine.domain.names import validate_repository_name

REF_NAME: Final = "org.opencontainers.image.ref.name"
INDEX_MEDIA_TYPE: Final = "application/vnd.oci.image.index.v1+json"
LAYOUT_VERSION: Final = {"imageLayoutVersion": "1.0.0"}
TEMP_PREFIX: Final = ".partial-"


class LayoutTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"oci:{root}"
        # The mirror is the only writer, so each index is read once and kept.
        self._indexes: dict[str, list[dict[str, Any]]] = {}

    def repository_dir(self, repository: str) -> Path:
        # The repository grammar allows no "." or ".." component, so the
        # path stays under the root.
        validate_repository_name(repository)
        return self.root / repository

    def _blob_path(self, repository: str, digest: str) -> Path:
        parsed = Digest.parse(digest)
        return (
            self.repository_dir(repository)
            / "blobs"
            / parsed.algorithm
            / parsed.encoded
        )

    async def has_blob(self, repository: str, digest: str) -> bool:
        return await asyncio.to_thread(self._blob_path(repository, digest).is_file)

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
            origin = self._blob_path(mount_from, digest)
            if await asyncio.to_thread(_link_or_copy, origin, path):
                return BlobCopy(mounted=True, size=0)

        temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
        handle = await asyncio.to_thread(temp.open, "wb")
        size = 0
        try:
            async with open_blob() as blob:
                async for chunk in blob.chunks:
                    await asyncio.to_thread(handle.write, chunk)
                    size += len(chunk)
            await asyncio.to_thread(_sync_and_close, handle)
            await asyncio.to_thread(os.replace, temp, path)
            await asyncio.to_thread(_sync_dir, path.parent)
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
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
            await asyncio.to_thread(_write_atomically, path, raw)
        index = await self._index(repository)
        if any(entry["digest"] == digest for entry in index):
            return
        index.append(_entry(media_type, digest, len(raw), None))
        await self._save_index(repository)

    async def tagged_digest(self, repository: str, tag: str) -> str | None:
        for entry in await self._index(repository):
            if (entry.get("annotations") or {}).get(REF_NAME) == tag:
                return str(entry["digest"])
        return None

    async def set_tag(self, repository: str, tag: str, digest: str) -> None:
        raw = await asyncio.to_thread(self._blob_path(repository, digest).read_bytes)
        media_type = parse_manifest(raw).media_type
        index = await self._index(repository)
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
        await self._save_index(repository)

    async def delete_tag(self, repository: str, tag: str) -> bool:
        index = await self._index(repository)
        removed = [entry for entry in index if _ref_name(entry) == tag]
        if not removed:
            return True
        index[:] = [entry for entry in index if _ref_name(entry) != tag]
        for entry in removed:
            _keep_untagged(index, entry)
        await self._save_index(repository)
        return True

    async def delete_manifest(self, repository: str, digest: str) -> None:
        # NOTE: the manifest's blob file stays, like every blob file; the
        # layout only stops listing it. Nothing collects unreferenced files.
        index = await self._index(repository)
        kept = [entry for entry in index if entry["digest"] != digest]
        if len(kept) != len(index):
            index[:] = kept
            await self._save_index(repository)

    async def delete_blob(self, repository: str, digest: str) -> None:
        # NOTE: blob files stay, because a manifest the layout still lists may
        # reference them and the layout must stay readable.
        return None

    async def aclose(self) -> None:
        return None

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

    async def _save_index(self, repository: str) -> None:
        document = {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": self._indexes[repository],
        }
        data = json.dumps(document, indent=2).encode() + b"\n"
        directory = self.repository_dir(repository)
        await asyncio.to_thread(self._prepare, repository, directory)
        await asyncio.to_thread(_write_atomically, directory / "index.json", data)

    def _prepare(self, repository: str, directory: Path) -> None:
        """Create the directories and the ``oci-layout`` file of a repository."""
        directory.mkdir(parents=True, exist_ok=True)
        marker = self.repository_dir(repository) / "oci-layout"
        if not marker.exists():
            _write_atomically(marker, json.dumps(LAYOUT_VERSION).encode())


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


def _ref_name(entry: dict[str, Any]) -> str | None:
    return (entry.get("annotations") or {}).get(REF_NAME)


def _link_or_copy(origin: Path, path: Path) -> bool:
    """Hard-link (or copy, across file systems) a blob from another repository."""
    if not origin.is_file():
        return False
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        os.link(origin, temp)
    except OSError:
        shutil.copyfile(origin, temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(temp, path)
    return True


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    with temp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _sync_dir(path.parent)


def _sync_and_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
