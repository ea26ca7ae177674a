"""Manifest routes: HEAD, GET, PUT and DELETE by tag or digest.

Content negotiation serves the stored manifest as pushed, whatever the
Accept header lists, with one exception taken from Distribution v3. A
client that fetches an image index or Docker manifest list by tag, accepts
neither, but accepts the type of the index's linux/amd64 entry gets that
entry instead, unless the repository no longer stores it.

Distribution v3 returns 404 when the Accept header leaves out a stored OCI
type. cairn serves the bytes instead, because the Content-Type tells the
client what it got, and a 404 for a manifest that exists breaks more
clients than it protects.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from engine.api.blobs import etag_matches
from engine.api.body import read_limited
from engine.api.errors import ErrorCode, HTTPError, unsupported
from engine.api.http import Request, Response, empty_response, repository_path
from engine.api.threads import run_sync
from engine.domain.digest import Digest
from engine.domain.errors import (
    DigestInvalid,
    DigestMismatch,
    ManifestUnknown,
    TagInvalid,
)
from engine.domain.manifests import (
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
)
from engine.domain.names import validate_tag
from engine.domain.preconditions import Preconditions
from engine.registry import ManifestInfo, Repository

INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
DEFAULT_PLATFORM: Final = {"os": "linux", "architecture": "amd64"}

# Maximum distinct tag query parameters on one push by digest, so that one
# commit appends a bounded number of events. The OCI distribution
# specification states that a registry SHOULD take at least 10 and MAY send
# 414 for more than it takes.
MAX_QUERY_TAGS: Final = 1000


def parse_reference(reference: str) -> tuple[str | None, Digest | None]:
    """Split a manifest reference into (tag, None) or (None, digest)."""
    if ":" in reference:
        return None, Digest.parse(reference)
    return validate_tag(reference), None


def lookup_reference(
    repository: Repository, reference: str
) -> tuple[str | None, Digest | None]:
    """Parse the reference of a GET, HEAD or DELETE, raising ManifestUnknown
    when it is neither a valid tag nor a valid digest.

    The OCI distribution specification lists only 200 and 404 for GET and
    HEAD. For DELETE it reserves 400 for a registry that does not allow
    deletes, and `cairn mirror` reads a 400 that way. No manifest can be
    stored under an invalid reference, so these requests get the 404 of any
    other unknown manifest.
    """
    try:
        return parse_reference(reference)
    except (TagInvalid, DigestInvalid) as error:
        raise ManifestUnknown(
            f"manifest unknown: {reference!r} is not a valid tag or digest",
            {
                "repository": repository.name,
                "reference": reference,
                "reason": error.message,
            },
        ) from None


def accepted_types(request: Request) -> set[str] | None:
    """Return the media types the Accept header lists, or None for any type.

    A type with the weight q=0 is left out, because RFC 9110 section 12.4.2
    defines that weight as "not acceptable".
    """
    header = request.header("accept")
    if not header:
        return None
    types = set()
    for part in header.split(","):
        media_type, *parameters = part.split(";")
        if not any(_is_zero_weight(parameter) for parameter in parameters):
            types.add(media_type.strip().lower())
    types.discard("")
    if not types or "*/*" in types or "application/*" in types:
        return None
    return types


_ZERO_WEIGHT: Final = re.compile(r"\s*[qQ]\s*=\s*0(?:\.0{0,3})?\s*")


def _is_zero_weight(parameter: str) -> bool:
    return _ZERO_WEIGHT.fullmatch(parameter) is not None


def _resolve(
    repository: Repository, tag: str | None, digest: Digest | None
) -> ManifestInfo:
    if tag is not None:
        return repository.tags.get(tag)
    assert digest is not None
    return repository.manifests.stat(digest)


def _platform_child(
    repository: Repository, content: bytes, accepted: set[str]
) -> tuple[ManifestInfo, bytes] | None:
    """Return the linux/amd64 entry of an index when the client accepts it
    and the repository still stores it."""
    try:
        entries = json.loads(content).get("manifests", [])
    except (ValueError, AttributeError):
        return None
    for entry in entries:
        platform: Any = entry.get("platform") or {}
        if (
            platform.get("os") == DEFAULT_PLATFORM["os"]
            and platform.get("architecture") == DEFAULT_PLATFORM["architecture"]
            and entry.get("mediaType") in accepted
        ):
            try:
                return repository.manifests.get(Digest.parse(entry["digest"]))
            except ManifestUnknown:
                # A deleted child leaves the index to be served as stored,
                # not a 404 for a tag that exists, naming a digest the
                # client never requested.
                return None
    return None


def _fetch(
    repository: Repository,
    tag: str | None,
    digest: Digest | None,
    accepted: set[str] | None,
    with_content: bool,
) -> tuple[ManifestInfo, bytes | None]:
    info = _resolve(repository, tag, digest)
    needs_negotiation = (
        tag is not None
        and accepted is not None
        and info.media_type in INDEX_TYPES
        and info.media_type not in accepted
    )
    if not with_content and not needs_negotiation:
        return info, None
    info, content = repository.manifests.get(info.digest)
    if needs_negotiation:
        assert accepted is not None
        child = _platform_child(repository, content, accepted)
        if child is not None:
            info, content = child
    return info, content


async def get_manifest(request: Request) -> Response:
    """Serve GET and HEAD of /v2/<name>/manifests/<reference>."""
    repository = request.repository()
    reference = request.path_params["reference"]
    tag, digest = lookup_reference(repository, reference)
    is_get = request.method == "GET"

    info, content = await run_sync(
        _fetch, repository, tag, digest, accepted_types(request), is_get
    )
    headers = [
        ("Content-Type", info.media_type),
        ("Docker-Content-Digest", str(info.digest)),
        ("ETag", f'"{info.digest}"'),
    ]
    if tag is not None:
        # What a tag serves depends on Accept when it names an index (see
        # the module docstring), so caches must key on it.
        headers.append(("Vary", "Accept"))
    if_match = Preconditions.from_headers(request.header("if-match"), None)
    if if_match is not None:
        if_match.check(
            str(info.digest), {"repository": repository.name, "reference": reference}
        )
    if etag_matches(request, info.digest):
        return empty_response(304, headers)
    if not is_get:
        return Response(200, headers, content_length=info.size)

    bus = request.state.bus
    if bus is not None:
        bus.notify_pull(
            repository.name,
            reference,
            str(info.digest),
            request.actor,
            request.request_id,
        )
    return Response(200, headers, content or b"")


def query_tags(request: Request, tag: str | None) -> list[str]:
    """Return the distinct tag query parameters of a manifest PUT, in order.

    The OCI distribution specification defines them, after its v1.1.1
    release, for a push by digest only: the registry sets each tag with the
    manifest. On a push by tag they get 400 UNSUPPORTED, and an invalid one
    gets 400 MANIFEST_INVALID, the error of an invalid tag in the path.
    """
    values = request.params("tag")
    if not values:
        return []
    if tag is not None:
        raise unsupported(
            "the tag query parameter applies only to a push by digest: push "
            "by digest to set several tags, or push once per tag",
            parameter="tag",
            values=values,
        )
    distinct = list(dict.fromkeys(values))
    if len(distinct) > MAX_QUERY_TAGS:
        raise HTTPError(
            ErrorCode.UNSUPPORTED,
            414,
            f"a push may set at most {MAX_QUERY_TAGS} tags, but the request "
            f"gives {len(distinct)}: push the manifest again with the rest",
            {"parameter": "tag", "count": len(distinct), "limit": MAX_QUERY_TAGS},
        )
    for value in distinct:
        try:
            validate_tag(value)
        except TagInvalid as error:
            raise TagInvalid(
                f"query parameter tag: {error.message}",
                {"parameter": "tag", "tag": value},
            ) from None
    return distinct


def preconditions(request: Request) -> Preconditions | None:
    """Return the request's If-Match and If-None-Match, None without either."""
    return Preconditions.from_headers(
        request.header("if-match"), request.header("if-none-match")
    )


def _put(
    repository: Repository,
    raw: bytes,
    content_type: str | None,
    tag: str | None,
    digest: Digest | None,
    tags: list[str],
    conditions: Preconditions | None,
) -> ManifestInfo:
    # A digest in the URL that the body does not hash to is the client's
    # digest being wrong, so it gets DIGEST_INVALID as a blob would.
    if digest is not None:
        actual = Digest.of(raw, digest.algorithm)
        if actual != digest:
            raise DigestMismatch(
                "manifest content does not match the digest in the URL",
                {"expected": str(digest), "actual": str(actual)},
            )
    result = repository.manifests.put(
        raw, content_type, tag=tag, digest=digest, tags=tags, preconditions=conditions
    )
    return result.manifest


async def put_manifest(request: Request) -> Response:
    repository = request.repository()
    tag, digest = parse_reference(request.path_params["reference"])
    tags = query_tags(request, tag)
    conditions = preconditions(request)
    if conditions is not None and tags:
        # The fields guard what the path names, and the tags that the query
        # sets would move unguarded.
        header = "If-Match" if conditions.if_match is not None else "If-None-Match"
        raise unsupported(
            f"{header} guards the digest in the path, not the tags that the "
            "tag query parameters set: push by tag, once per tag, to guard a tag",
            header=header,
            value=request.header(header.lower()),
            tags=tags,
        )
    raw = await read_limited(request, MAX_MANIFEST_SIZE)
    stored = await run_sync(
        _put,
        repository,
        raw,
        request.header("content-type"),
        tag,
        digest,
        tags,
        conditions,
    )
    location = repository_path(repository.name, "manifests", str(stored.digest))
    headers = [
        ("Location", request.url_for(location)),
        ("Docker-Content-Digest", str(stored.digest)),
    ]
    if stored.subject is not None:
        headers.append(("OCI-Subject", str(stored.subject)))
    # One OCI-Tag field per tag that the query parameters set.
    headers.extend(("OCI-Tag", name) for name in tags)
    return empty_response(201, headers)


async def delete_manifest(request: Request) -> Response:
    """Delete a manifest by digest, or only the tag when given a tag."""
    repository = request.repository()
    tag, digest = lookup_reference(repository, request.path_params["reference"])
    conditions = preconditions(request)
    if tag is not None:
        await run_sync(repository.tags.untag, tag, conditions)
    else:
        assert digest is not None
        await run_sync(repository.manifests.delete, digest, conditions)
    return empty_response(202)
