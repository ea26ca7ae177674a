"""A client for the OCI Distribution API (v1.1), the mirror's only way in or
out of a registry.

Every method raises TransientError for failures worth retrying (status
408, 425, 429 or 5xx, timeouts and dropped connections) and MirrorError for
other unexpected responses, with the registry's error body in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import httpx

from consumers.mirror.errors import (
    MirrorError,
    SourceGone,
    TransientError,
    request_failed,
)
from engine.domain.digest import Digest, DigestVerifier
from engine.domain.errors import DigestMismatch
from engine.domain.manifests import MANIFEST_MEDIA_TYPES

CHUNK_SIZE: Final = 1024 * 1024
ERROR_BODY_LIMIT: Final = 300
MANIFEST_ACCEPT: Final = ", ".join(sorted(MANIFEST_MEDIA_TYPES))
_RETRYABLE: Final = frozenset({408, 425, 429})
# The mirror's hint on where to set credentials, added to a 401 error.
MIRROR_CREDENTIALS: Final = "see --source-creds and --target-creds"


@dataclass(frozen=True, slots=True)
class BlobStream:
    """A blob being read: its size when the registry sent one, and its bytes."""

    size: int | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob that a registry serves. ``size`` is None when the response
    had no Content-Length."""

    size: int | None


class RegistryClient:
    """A client of the source or the target registry. ``side`` is "source"
    or "target", and starts the description of each failed request."""

    def __init__(self, base_url: str, client: httpx.AsyncClient, side: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.side = side

    def _check(self, response: httpx.Response, what: str) -> None:
        check(response, what, f"see --{self.side}-creds")

    def url(self, repository: str, *parts: str) -> str:
        path = "/".join(quote(part, safe=":") for part in parts)
        return f"{self.base_url}/v2/{quote(repository)}/{path}"

    async def _request(
        self, method: str, url: str, what: str, **kwargs: object
    ) -> httpx.Response:
        try:
            response = await self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as error:
            raise request_failed(what, error) from error
        return response

    # ---- blobs -----------------------------------------------------------

    async def blob_exists(self, repository: str, digest: str) -> bool:
        return await self.head_blob(repository, digest) is not None

    async def head_blob(self, repository: str, digest: str) -> StoredBlob | None:
        """Return the blob with the size from the Content-Length of a HEAD
        request, or None when the repository has no such blob."""
        what = f"{self.side} HEAD blob {digest} in {repository}"
        response = await self._request(
            "HEAD", self.url(repository, "blobs", digest), what
        )
        if response.status_code == 404:
            return None
        self._check(response, what)
        length = response.headers.get("Content-Length", "")
        return StoredBlob(int(length) if length.isdigit() else None)

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: str
    ) -> AsyncIterator[BlobStream]:
        """Stream a blob; raise SourceGone when the repository no longer has it."""
        what = f"{self.side} GET blob {digest} in {repository}"
        request = self.client.build_request(
            "GET", self.url(repository, "blobs", digest)
        )
        try:
            # A registry may redirect a blob download to its storage. The
            # target's client follows no other redirects, so this request
            # enables them.
            response = await self.client.send(
                request, stream=True, follow_redirects=True
            )
        except httpx.TransportError as error:
            raise request_failed(what, error) from error
        try:
            if response.status_code == 404:
                raise SourceGone(f"{what}: not found")
            if response.status_code >= 300:
                await response.aread()
            self._check(response, what)
            length = response.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else None
            yield BlobStream(size, _chunks(response, what))
        finally:
            await response.aclose()

    async def start_upload(
        self, repository: str, mount: str | None = None, source: str | None = None
    ) -> tuple[bool, str]:
        """Start an upload, or mount ``mount`` from ``source`` when given.

        Returns (True, blob URL) when the registry mounted the blob, and
        (False, upload URL) when an upload session is open instead.
        """
        params = {"mount": mount, "from": source} if mount and source else None
        what = f"{self.side} POST upload in {repository}"
        response = await self._request(
            "POST", self.url(repository, "blobs", "uploads", ""), what, params=params
        )
        self._check(response, what)
        location = response.headers.get("Location")
        if response.status_code == 201:
            return True, location or ""
        if response.status_code != 202 or not location:
            raise MirrorError(
                f"{what}: expected 202 with a Location header, got "
                f"{response.status_code}"
            )
        return False, str(response.url.join(location))

    async def finish_upload(
        self, location: str, digest: str, size: int | None, chunks: AsyncIterator[bytes]
    ) -> str | None:
        """Send the whole blob in one PUT; return the Docker-Content-Digest
        of the response, the digest the registry reports it stored."""
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        what = f"{self.side} PUT upload of {digest}"
        # The upload URL may carry state in its query (Distribution's _state);
        # the digest joins it rather than replacing it.
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        response = await self._request(
            "PUT", str(url), what, content=chunks, headers=headers
        )
        self._check(response, what)
        stored: str | None = response.headers.get("Docker-Content-Digest")
        return stored

    async def verify_blob(self, repository: str, digest: str) -> str | None:
        """Read a blob back by ``digest`` and hash its bytes.

        Returns None when they match the digest, or else what is wrong.
        """
        expected = Digest.parse(digest)
        verifier = DigestVerifier(expected.algorithm)
        try:
            async with self.open_blob(repository, digest) as blob:
                async for chunk in blob.chunks:
                    await asyncio.to_thread(verifier.update, chunk)
        except SourceGone:
            return "it serves no blob under that digest"
        try:
            verifier.verify(expected)
        except DigestMismatch as error:
            actual = error.detail.get("actual")
            return f"the bytes that it serves under that digest hash to {actual}"
        return None

    async def cancel_upload(self, location: str) -> None:
        # A registry expires abandoned uploads itself, so a failure is harmless.
        with contextlib.suppress(httpx.TransportError):
            await self.client.delete(location)

    async def delete_blob(self, repository: str, digest: str) -> bool:
        """Delete a blob; False when the registry does not allow deletes."""
        return await self._delete(self.url(repository, "blobs", digest), repository)

    # ---- manifests -------------------------------------------------------

    async def get_manifest(
        self, repository: str, reference: str
    ) -> tuple[str, bytes] | None:
        """Return the manifest's media type and exact bytes, or None if absent."""
        what = f"{self.side} GET manifest {reference} in {repository}"
        response = await self._request(
            "GET",
            self.url(repository, "manifests", reference),
            what,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code == 404:
            return None
        self._check(response, what)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return media_type, response.content

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        """Return the digest a tag or digest resolves to, or None if absent."""
        what = f"{self.side} HEAD manifest {reference} in {repository}"
        response = await self._request(
            "HEAD",
            self.url(repository, "manifests", reference),
            what,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code == 404:
            return None
        self._check(response, what)
        digest: str | None = response.headers.get("Docker-Content-Digest")
        if not digest:
            raise MirrorError(f"{what}: the response has no Docker-Content-Digest")
        return digest

    async def manifest_metadata(
        self, repository: str, reference: str
    ) -> tuple[str, int | None] | None:
        """Return the media type and, when the registry sends Content-Length,
        the size of a manifest, or None if absent."""
        what = f"{self.side} HEAD manifest {reference} in {repository}"
        response = await self._request(
            "HEAD",
            self.url(repository, "manifests", reference),
            what,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code == 404:
            return None
        self._check(response, what)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        length = response.headers.get("Content-Length", "")
        return media_type, int(length) if length.isdigit() else None

    async def put_manifest(
        self, repository: str, reference: str, media_type: str, raw: bytes
    ) -> str | None:
        """PUT a manifest by tag or digest; return the digest the registry reports."""
        what = f"{self.side} PUT manifest {reference} in {repository}"
        response = await self._request(
            "PUT",
            self.url(repository, "manifests", reference),
            what,
            content=raw,
            headers={"Content-Type": media_type},
        )
        self._check(response, what)
        stored: str | None = response.headers.get("Docker-Content-Digest")
        return stored

    async def delete_manifest(self, repository: str, reference: str) -> bool:
        """Delete a manifest or tag; False when the registry does not allow it."""
        return await self._delete(
            self.url(repository, "manifests", reference), repository
        )

    async def _delete(self, url: str, repository: str) -> bool:
        what = f"{self.side} DELETE {url.removeprefix(self.base_url)}"
        response = await self._request("DELETE", url, what)
        if response.status_code in (200, 202, 204, 404):
            return True
        if response.status_code in (400, 405):
            return False
        self._check(response, what)
        return True


def check(
    response: httpx.Response, what: str, credentials: str = MIRROR_CREDENTIALS
) -> None:
    """Raise for a response whose status is not 2xx. ``credentials`` is the
    hint on where to set credentials, added to a 401 error."""
    status = response.status_code
    if status < 300:
        return
    detail = _error_text(response)
    message = f"{what}: HTTP {status}" + (f": {detail}" if detail else "")
    if status == 401:
        message += (
            "; the registry requires credentials, or rejects the ones given "
            f"({credentials})"
        )
    if status in _RETRYABLE or status >= 500:
        raise TransientError(message)
    raise MirrorError(message)


def _error_text(response: httpx.Response) -> str:
    try:
        return response.text[:ERROR_BODY_LIMIT].strip()
    except httpx.ResponseNotRead:
        return ""


async def _chunks(response: httpx.Response, what: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes(CHUNK_SIZE):
            yield chunk
    except httpx.TransportError as error:
        raise request_failed(what, error) from error
