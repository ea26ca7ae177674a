"""Blob upload routes: start, mount, chunk, status, finish and cancel.

Range headers on upload responses follow Distribution's convention, an
inclusive ``0-<offset - 1>``, written ``0-0`` while the upload is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from engine.api.body import BUFFER_SIZE, BlobLimit, stream_to_thread
from engine.api.errors import HTTPError
from engine.api.http import Request, Response, empty_response, repository_path
from engine.api.threads import run_sync
from engine.blobs.limits import check_declared_size
from engine.domain.digest import Digest
from engine.domain.errors import (
    BlobTooLarge,
    DigestInvalid,
    NameInvalid,
    RangeInvalid,
    SizeInvalid,
)
from engine.domain.names import validate_repository_name
from engine.registry import BlobInfo, Repository, UploadStatus, check_upload_start

# The OCI form is "<start>-<end>"; the "bytes " prefix and "/<total>" suffix
# of RFC 9110's Content-Range are accepted as well. A total at or below
# <end> makes the header invalid (RFC 9110 section 14.4).
# Offsets are at most 19 ASCII digits, so they fit a signed 64-bit column.
_CONTENT_RANGE: Final = re.compile(
    r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/([0-9]{1,19}|\*))?"
)


def _upload_headers(
    request: Request, repository: str, status: UploadStatus
) -> list[tuple[str, str]]:
    end = status.offset - 1 if status.offset > 0 else 0
    return [
        (
            "Location",
            request.url_for(repository_path(repository, "blobs", "uploads", status.id)),
        ),
        ("Range", f"0-{end}"),
        ("Docker-Upload-UUID", status.id),
        ("Blob-Upload-Session-ID", status.id),
    ]


def _blob_created(request: Request, repository: str, info: BlobInfo) -> Response:
    location = request.url_for(repository_path(repository, "blobs", str(info.digest)))
    return empty_response(
        201, [("Location", location), ("Docker-Content-Digest", str(info.digest))]
    )


def _digest_param(request: Request) -> Digest:
    value = request.param("digest")
    if value is None:
        raise DigestInvalid(
            "the digest query parameter is required to finish an upload",
            {"digest": None},
        )
    return Digest.parse(value)


async def _upload_range(
    request: Request, repository: Repository, upload_id: str
) -> tuple[int | None, int | None, int | None]:
    """Return the chunk's start offset, its length and the blob's total
    length from Content-Range.

    All are None without the header, and the total is None when the header
    gives none or gives "*". A malformed or inverted range, or one whose
    total is at or below its end, raises a 416 that carries the upload's
    current Range, as the specification requires.
    """
    header = request.header("content-range")
    if header is None:
        return None, None, None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or not _is_valid_range(*match.groups()):
        status = await run_sync(repository.blobs.upload_status, upload_id)
        raise HTTPError.from_registry_error(
            RangeInvalid(
                "invalid Content-Range: expected <start>-<end>, inclusive, "
                "optionally followed by /<total> with a total above <end>",
                {"content_range": header, "offset": status.offset},
                offset=status.offset,
            ),
            _upload_headers(request, repository.name, status),
        )
    start, end = int(match.group(1)), int(match.group(2))
    length = end - start + 1
    declared = request.content_length()
    if declared is not None and declared != length:
        raise SizeInvalid(
            "Content-Length does not match the length of the Content-Range",
            {"content_range": header, "content_length": declared},
        )
    total = match.group(3)
    return start, length, None if total in (None, "*") else int(total)


def _is_valid_range(start: str, end: str, total: str | None) -> bool:
    """Return False when the range is inverted or ends at or past its total."""
    if int(end) < int(start):
        return False
    return total is None or total == "*" or int(total) > int(end)


def _expects_continue(request: Request) -> bool:
    expect = request.header("expect")
    return expect is not None and expect.strip().lower() == "100-continue"


async def _body_limit(
    request: Request,
    repository: Repository,
    upload_id: str,
    start: int | None,
    length: int | None,
    total: int | None,
) -> BlobLimit:
    """Return the limit for the body of a PATCH or final PUT, after
    rejecting one whose declared size already exceeds the maximum blob size.

    Content-Range declares where the chunk starts and ends, and its total,
    when given, the whole blob's size. Without it the chunk starts at the
    upload's offset, and Content-Length, when present, declares its end.
    An upload rejected here is discarded, because it can never complete.

    A body of at most BUFFER_SIZE bytes is checked without the upload's
    offset, which would cost a database read on every such request: the
    registry adds the offset under the upload's lock, once the body is read.
    A request that waits for 100 Continue reads the upload's state first.
    """
    if _expects_continue(request):
        # The client waits for 100 Continue before it sends the body. An
        # unknown upload, or a chunk that does not start at the upload's
        # offset, gets its error response now (RFC 9110 section 10.1.1).
        status = await run_sync(repository.blobs.upload_status, upload_id)
        if start is not None:
            check_upload_start(status, start)

    max_blob_size = request.state.registry.max_blob_size
    if max_blob_size is None:
        return BlobLimit(None)

    declared = request.content_length()
    if start is not None and length is not None:
        offset, end, source = start, start + length, "Content-Range"
        if total is not None:
            end, source = total, "the Content-Range total"
    elif declared is not None and declared <= BUFFER_SIZE:
        offset, end, source = 0, declared, "Content-Length"
    else:
        status = await run_sync(repository.blobs.upload_status, upload_id)
        offset, end, source = status.offset, status.offset, "the upload's offset"
        if declared is not None:
            end += declared
            source = "the upload's offset plus Content-Length"

    try:
        check_declared_size(end, max_blob_size, source)
    except BlobTooLarge:
        if start is not None:
            # A chunk that does not start at the offset gets its 416 and
            # leaves the upload as it was, whatever its size.
            status = await run_sync(repository.blobs.upload_status, upload_id)
            check_upload_start(status, start)
        await run_sync(repository.blobs.cancel_upload, upload_id)
        raise
    return BlobLimit(max_blob_size, offset)


async def _range_error(
    request: Request, repository: Repository, upload_id: str, error: RangeInvalid
) -> HTTPError:
    status = await run_sync(repository.blobs.upload_status, upload_id)
    return HTTPError.from_registry_error(
        error, _upload_headers(request, repository.name, status)
    )


async def start_upload(request: Request) -> Response:
    """Serve POST /v2/<name>/blobs/uploads/: mount, monolithic push or start."""
    repository = request.repository()

    mount = request.param("mount")
    if mount is not None:
        # An empty from, like none, lets the blob come from any repository.
        digest, source = _mount_params(mount, request.param("from") or None)
        info = await _try_mount(repository, digest, source)
        if info is not None:
            return _blob_created(request, repository.name, info)

    elif request.param("digest") is not None:
        digest = Digest.parse(request.param("digest") or "")
        limit = BlobLimit(request.state.registry.max_blob_size)
        declared = request.content_length()
        if declared is not None:
            check_declared_size(declared, limit.max_blob_size, "Content-Length")

        def push(chunks: Iterator[bytes]) -> BlobInfo:
            return repository.blobs.push(digest, chunks)

        info = await stream_to_thread(request, push, limit=limit)
        return _blob_created(request, repository.name, info)

    status = await run_sync(repository.blobs.create_upload)
    return empty_response(202, _upload_headers(request, repository.name, status))


def _mount_params(mount: str, source: str | None) -> tuple[Digest, str | None]:
    """Parse the mount and from query parameters of a POST.

    A malformed digest raises DigestInvalid and a malformed repository name
    NameInvalid, each naming the parameter and its value, before any upload
    session exists. The specification's fallback to a new upload is for a
    mount that the registry cannot perform, not for a malformed request.
    """
    try:
        digest = Digest.parse(mount)
    except DigestInvalid as error:
        raise type(error)(
            f"query parameter mount: {error.message}",
            {"parameter": "mount", **(error.detail or {})},
        ) from None
    if source is not None:
        try:
            validate_repository_name(source)
        except NameInvalid as error:
            raise NameInvalid(
                f"query parameter from: {error.message}",
                {"parameter": "from", **(error.detail or {})},
            ) from None
    return digest, source


async def _try_mount(
    repository: Repository, digest: Digest, source: str | None
) -> BlobInfo | None:
    """Mount a blob, or return None so the caller starts a normal upload.

    A blob that is not in ``source``, or in no repository when ``source`` is
    None, falls back, as the specification describes for a mount that the
    registry cannot perform.
    """
    return await run_sync(repository.blobs.mount, digest, source)


async def upload_status(request: Request) -> Response:
    repository = request.repository()
    status = await run_sync(
        repository.blobs.upload_status, request.path_params["upload"]
    )
    return empty_response(204, _upload_headers(request, repository.name, status))


async def patch_upload(request: Request) -> Response:
    """Append a chunk; a chunk that does not start at the offset gets a 416."""
    repository = request.repository()
    upload_id = request.path_params["upload"]
    start, length, total = await _upload_range(request, repository, upload_id)

    def write(chunks: Iterator[bytes]) -> UploadStatus:
        return repository.blobs.write_upload(
            upload_id, chunks, start, declared_size=request.content_length()
        )

    try:
        limit = await _body_limit(request, repository, upload_id, start, length, total)
        status = await stream_to_thread(
            request, write, expected_size=length, limit=limit
        )
    except RangeInvalid as error:
        raise await _range_error(request, repository, upload_id, error) from None
    return empty_response(202, _upload_headers(request, repository.name, status))


async def finish_upload(request: Request) -> Response:
    """Append the final chunk if there is one, verify the digest, link the blob."""
    repository = request.repository()
    upload_id = request.path_params["upload"]
    digest = _digest_param(request)
    start, length, total = await _upload_range(request, repository, upload_id)

    def finish(chunks: Iterator[bytes]) -> BlobInfo:
        return repository.blobs.commit_upload(
            upload_id, digest, chunks, start, declared_size=request.content_length()
        )

    try:
        if request.has_body:
            limit = await _body_limit(
                request, repository, upload_id, start, length, total
            )
            info = await stream_to_thread(
                request, finish, expected_size=length, limit=limit
            )
        else:
            info = await run_sync(repository.blobs.commit_upload, upload_id, digest)
    except RangeInvalid as error:
        raise await _range_error(request, repository, upload_id, error) from None
    return _blob_created(request, repository.name, info)


async def cancel_upload(request: Request) -> Response:
    repository = request.repository()
    await run_sync(repository.blobs.cancel_upload, request.path_params["upload"])
    return empty_response(204)
