"""Mirror targets: a registry over HTTP, or an OCI image layout.

Both kinds implement ``Target``. Every method is idempotent, so replaying
an event that was already applied (after a crash, or from an older
checkpoint) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import structlog

from consumers.mirror.errors import MirrorError
from consumers.mirror.registry import BlobStream, RegistryClient, StoredBlob

log = structlog.get_logger(__name__)

# Opens the source's verified stream of one blob, only when it is needed.
BlobOpener = Callable[[], AbstractAsyncContextManager[BlobStream]]


@dataclass(frozen=True, slots=True)
class BlobCopy:
    """The result of a blob copy: mounted or uploaded, and the bytes uploaded."""

    mounted: bool
    size: int


class Target(Protocol):
    description: str

    async def start(self) -> None:
        """Prepare the target before the mirror applies its first event."""

    async def stored_blob(self, repository: str, digest: str) -> StoredBlob | None:
        """Return the blob and its size, or None when the target lacks it."""

    async def put_blob(
        self,
        repository: str,
        digest: str,
        open_blob: BlobOpener,
        mount_from: str | None,
    ) -> BlobCopy:
        """Store a blob, mounting it from ``mount_from`` when the target can."""

    async def has_manifest(self, repository: str, digest: str) -> bool: ...

    async def put_manifest(
        self, repository: str, digest: str, media_type: str, raw: bytes
    ) -> None:
        """Store a manifest by digest; its blobs and children are already there."""

    async def tagged_digest(self, repository: str, tag: str) -> str | None: ...

    async def set_tag(self, repository: str, tag: str, digest: str) -> None:
        """Point ``tag`` at a manifest the target already holds."""

    async def delete_tag(self, repository: str, tag: str) -> bool:
        """Remove a tag; False when the target cannot remove a tag alone."""

    async def delete_manifest(self, repository: str, digest: str) -> None: ...

    async def delete_blob(self, repository: str, digest: str) -> None: ...

    async def flush(self) -> None:
        """Make every change applied so far durable, before the checkpoint
        records it."""

    async def aclose(self) -> None: ...


class RegistryTarget:
    """A registry reached through the OCI Distribution API."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.description = client.base_url

    async def start(self) -> None:
        return None

    async def stored_blob(self, repository: str, digest: str) -> StoredBlob | None:
        return await self.client.head_blob(repository, digest)

    async def put_blob(
        self,
        repository: str,
        digest: str,
        open_blob: BlobOpener,
        mount_from: str | None,
    ) -> BlobCopy:
        # A registry that cannot mount responds 202 with an upload session,
        # which the copy then uses.
        mounted, location = await self.client.start_upload(
            repository, digest if mount_from else None, mount_from
        )
        if mounted:
            # Distribution 2.8 responds 201 to the mount of a sha512 blob
            # without linking it into the repository, so the blob is uploaded
            # when the target does not serve it after all.
            if await self.client.blob_exists(repository, digest):
                return BlobCopy(mounted=True, size=0)
            log.info(
                "blob_mount_without_effect",
                repository=repository,
                digest=digest,
                source=mount_from,
                target=self.description,
                note="the blob is uploaded instead",
            )
            _, location = await self.client.start_upload(repository)
        try:
            async with open_blob() as blob:
                stored = await self.client.finish_upload(
                    location, digest, blob.size, blob.chunks
                )
        except BaseException:
            await self.client.cancel_upload(location)
            raise
        if stored is not None and stored != digest:
            await self._check_stored_as(repository, digest, stored)
        return BlobCopy(mounted=False, size=blob.size or 0)

    async def _check_stored_as(self, repository: str, digest: str, stored: str) -> None:
        """Accept a blob that the target reports under another digest when
        it serves the same bytes under ``digest``; raise MirrorError if not.

        Distribution 2.8 stores every blob under its sha256 digest and reports
        that one, also for a blob uploaded as sha512. It serves the blob
        under both digests, which is what a later copy's HEAD finds.
        """
        problem = await self.client.verify_blob(repository, digest)
        if problem is not None:
            raise MirrorError(
                f"PUT upload of {digest} in {repository}: the target "
                f"{self.description} reports that it stored the blob as "
                f"{stored}, and {problem}"
            )
        log.debug(
            "blob_stored_as",
            repository=repository,
            digest=digest,
            stored=stored,
            note="the target serves the same bytes under the digest",
        )

    async def has_manifest(self, repository: str, digest: str) -> bool:
        return await self.client.manifest_digest(repository, digest) is not None

    async def put_manifest(
        self, repository: str, digest: str, media_type: str, raw: bytes
    ) -> None:
        stored = await self.client.put_manifest(repository, digest, media_type, raw)
        if stored is not None and stored != digest:
            raise MirrorError(
                f"the target stored manifest {digest} in {repository} as {stored}"
            )

    async def tagged_digest(self, repository: str, tag: str) -> str | None:
        return await self.client.manifest_digest(repository, tag)

    async def set_tag(self, repository: str, tag: str, digest: str) -> None:
        # The bytes come from the target itself, so the tag points at exactly
        # what it stores under the digest.
        fetched = await self.client.get_manifest(repository, digest)
        if fetched is None:
            raise MirrorError(
                f"manifest {digest} vanished from the target's {repository} "
                f"before tag {tag} could point at it"
            )
        media_type, raw = fetched
        stored = await self.client.put_manifest(repository, tag, media_type, raw)
        if stored is not None and stored != digest:
            raise MirrorError(
                f"the target stored tag {tag} in {repository} as {stored}, not {digest}"
            )

    async def delete_tag(self, repository: str, tag: str) -> bool:
        return await self.client.delete_manifest(repository, tag)

    async def delete_manifest(self, repository: str, digest: str) -> None:
        if not await self.client.delete_manifest(repository, digest):
            raise _deletes_disabled(self.description)

    async def delete_blob(self, repository: str, digest: str) -> None:
        if not await self.client.delete_blob(repository, digest):
            raise _deletes_disabled(self.description)

    async def flush(self) -> None:
        """Do nothing: the registry stored each change before its response."""

    async def aclose(self) -> None:
        await self.client.client.aclose()


def _deletes_disabled(target: str) -> MirrorError:
    return MirrorError(
        f"the target {target} rejects deletes; enable them there (for "
        "Distribution: storage.delete.enabled) or mirror without "
        "--propagate-deletes"
    )
