"""Blob routes: HEAD, GET (with byte ranges) and DELETE."""

from __future__ import annotations

import re
import stat
from typing import BinaryIO, Final

import structlog

from engine.api.errors import HTTPError
from engine.api.http import Request, Response, empty_response
from engine.api.threads import run_sync
from engine.domain.digest import Digest
from engine.domain.errors import BlobUnknown, DigestInvalid, RangeNotSatisfiable
from engine.domain.preconditions import Preconditions
from engine.registry import BlobInfo, Repository

log = structlog.get_logger(__name__)

# Each number may have up to 100 digits and is read as it is. A start past
# the end then gets a 416 and a large end is clamped. Longer is malformed.
# Range unit names are case-insensitive (RFC 9110 section 14.1). Spaces and
# tabs may surround "=" and "-", but a number or the unit containing one is
# malformed, so "bytes=1 0-20" is not read as bytes 10 to 20.
_RANGE: Final = re.compile(
    r"bytes[ \t]*=[ \t]*([0-9]{0,100})[ \t]*-[ \t]*([0-9]{0,100})", re.IGNORECASE
)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the [start, end) bytes a Range header requests, or None for all.

    Follows RFC 9110: a header that is malformed or requests several ranges
    is ignored, and a range that starts past the end raises
    RangeNotSatisfiable.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip(" \t"))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(size - suffix, 0), size
    start = int(first)
    end = size if not last else int(last) + 1
    if last and end <= start:
        return None
    if start >= size:
        raise _unsatisfiable(header, size)
    return start, min(end, size)


def _unsatisfiable(header: str, size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        "requested range is not satisfiable",
        {"range": header, "size": size},
        size=size,
    )


def etag_matches(request: Request, digest: Digest) -> bool:
    """Return True if If-None-Match names ``digest``, quoted or not."""
    header = request.header("if-none-match")
    if not header:
        return False
    candidates = {
        value.strip().removeprefix("W/").strip('"') for value in header.split(",")
    }
    return str(digest) in candidates or "*" in candidates


def blob_headers(digest: Digest) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", str(digest)),
        ("ETag", f'"{digest}"'),
        ("Accept-Ranges", "bytes"),
        # Blobs are immutable: a digest names the same bytes forever.
        ("Cache-Control", "max-age=31536000"),
    ]


def lookup_digest(repository: Repository, value: str) -> Digest:
    """Parse the digest of a GET, HEAD or DELETE, raising BlobUnknown when it
    is invalid.

    No blob can be stored under an invalid digest, and the OCI distribution
    specification lists only 200 and 404 for GET and HEAD. For DELETE it
    reserves 400 for a registry that does not allow deletes.
    """
    try:
        return Digest.parse(value)
    except DigestInvalid as error:
        raise BlobUnknown(
            f"blob unknown: {value!r} is not a valid digest",
            {"repository": repository.name, "digest": value, "reason": error.message},
        ) from None


def _stat(repository: Repository, digest: Digest) -> BlobInfo:
    """Return the linked blob's info, raising BlobUnknown when its file is
    missing or has another size than the blob.

    A 404 makes a client push the blob again, and that upload's commit
    writes the file anew. A 200 would promise bytes that the file lacks.
    """
    info = repository.blobs.stat(digest)
    path = repository.registry.blob_store.path(digest)
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        status = None
    if status is None or not stat.S_ISREG(status.st_mode):
        log.error(
            "blob_file_missing",
            repository=repository.name,
            digest=str(digest),
            request_id=repository.request_id,
        )
        raise BlobUnknown(
            "blob unknown to registry",
            {"repository": repository.name, "digest": str(digest)},
        )
    if status.st_size != info.size:
        log.error(
            "blob_file_damaged",
            repository=repository.name,
            digest=str(digest),
            path=str(path),
            size=status.st_size,
            expected_size=info.size,
            request_id=repository.request_id,
            note="the next push of this blob replaces the file; cairn verify "
            "lists every damaged blob file",
        )
        raise BlobUnknown(
            "blob unknown to registry: its stored file is damaged",
            {"repository": repository.name, "digest": str(digest)},
        )
    return info


def _open(repository: Repository, digest: Digest) -> BinaryIO:
    try:
        return open(repository.registry.blob_store.path(digest), "rb")
    except FileNotFoundError:
        log.error(
            "blob_file_missing",
            repository=repository.name,
            digest=str(digest),
            request_id=repository.request_id,
        )
        raise BlobUnknown(
            "blob unknown to registry",
            {"repository": repository.name, "digest": str(digest)},
        ) from None


async def get_blob(request: Request) -> Response:
    """Serve GET and HEAD of /v2/<name>/blobs/<digest>."""
    repository = request.repository()
    digest = lookup_digest(repository, request.path_params["digest"])
    info = await run_sync(_stat, repository, digest)
    headers = blob_headers(digest)

    # An unknown blob got 404 above, whatever its If-Match (RFC 9110 section
    # 13.2.1). If-None-Match on a read gets 304 below, not 412.
    if_match = Preconditions.from_headers(request.header("if-match"), None)
    if if_match is not None:
        if_match.check(
            str(digest), {"repository": repository.name, "digest": str(digest)}
        )
    if etag_matches(request, digest):
        return empty_response(304, headers)

    # RFC 9110 section 14.2 defines Range for GET alone, so a HEAD gets the
    # whole blob's status and length, as the existence check of the OCI
    # specification expects.
    range_header = request.header("range") if request.method == "GET" else None
    if_range = request.header("if-range")
    if if_range is not None and if_range.strip() != f'"{digest}"':
        # RFC 9110 13.1.5: a validator that does not match gets the whole
        # blob. Only the ETag matches, because blobs have no Last-Modified.
        range_header = None
    try:
        byte_range = parse_range(range_header, info.size)
    except RangeNotSatisfiable as error:
        unsatisfied = [
            ("Content-Range", f"bytes */{info.size}"),
            ("Accept-Ranges", "bytes"),
        ]
        raise HTTPError.from_registry_error(error, unsatisfied) from None
    status = 200
    start, end = 0, info.size
    if byte_range is not None:
        status = 206
        start, end = byte_range
        headers.append(("Content-Range", f"bytes {start}-{end - 1}/{info.size}"))
    length = end - start

    if request.method == "HEAD" or length == 0:
        return Response(status, headers, content_length=length)
    file = await run_sync(_open, repository, digest)
    return Response(
        status, headers, content_length=length, file=file, file_offset=start
    )


async def delete_blob(request: Request) -> Response:
    repository = request.repository()
    digest = lookup_digest(repository, request.path_params["digest"])
    conditions = Preconditions.from_headers(
        request.header("if-match"), request.header("if-none-match")
    )
    await run_sync(repository.blobs.delete, digest, conditions)
    return empty_response(202, [("Docker-Content-Digest", str(digest))])
