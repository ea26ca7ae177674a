"""Listing routes: tags, the catalog and referrers.

Tags and the catalog page with ``n`` and ``last`` and announce the next page
in a ``Link`` header. A page has at most MAX_PAGE_SIZE entries, because the OCI
specification lets a registry return fewer than ``n`` when it sends a Link.
A request without ``n`` gets every entry: past one page the body is
streamed one page at a time, so no listing is ever held in memory whole.

Referrers always come one page at a time, because the OCI specification
makes each page of them an image index of its own. The next page is
announced the same way, with an opaque ``cursor`` in place of ``last``. The
cursor carries the log position of the last referrer shown and a hash of the
repository, subject and ``artifactType`` of its listing, so a cursor passed to
another listing gets a 400 instead of a page of that listing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Final
from urllib.parse import urlencode

from engine.api.errors import unsupported
from engine.api.http import Request, Response, json_response, parse_decimal
from engine.api.threads import run_sync
from engine.domain.digest import Digest
from engine.domain.errors import Unsupported
from engine.domain.manifests import OCI_INDEX, Descriptor, is_media_type
from engine.encoding import encode_json
from engine.queries.pages import decode_cursor, encode_cursor

MAX_PAGE_SIZE: Final = 1000
# oras-go v2 reads at most MaxMetadataBytes, 4 MiB by default, of one
# referrers response and fails to decode a longer one. A page of referrers
# ends before its JSON passes a quarter of that, unless its first
# descriptor alone is larger.
MAX_REFERRERS_PAGE_BYTES: Final = 1024 * 1024

Page = Callable[[int, str | None], list[str]]


def page_size(request: Request, minimum: int = 0) -> int | None:
    """Return ``n`` from the query, None when absent.

    Raises HTTPError 400 UNSUPPORTED when ``n`` is not an integer from
    ``minimum`` to 2^63-1.
    """
    value = request.param("n")
    if value is None or value == "":
        return None
    number = parse_decimal(value)
    if number is None or number < minimum:
        raise unsupported(
            f"n must be an integer from {minimum} to 2^63-1",
            parameter="n",
            value=value,
        )
    return number


def _link(path: str, query: dict[str, str | int]) -> tuple[str, str]:
    return ("Link", f'<{path}?{urlencode(query)}>; rel="next"')


async def _paged(
    request: Request, key: str, prefix: dict[str, str], fetch: Page
) -> Response:
    """List one page, or everything when the request has no ``n``."""
    n = page_size(request)
    last = request.param("last") or None
    if n == 0:
        # The query still runs, so that an unknown repository gets its 404.
        await run_sync(fetch, 0, last)
        return json_response({**prefix, key: []})

    limit = MAX_PAGE_SIZE if n is None else min(n, MAX_PAGE_SIZE)
    # One extra entry shows whether another page follows.
    entries = await run_sync(fetch, limit + 1, last)
    more = len(entries) > limit
    entries = entries[:limit]

    if n is None and more:
        stream = _stream_all(prefix, key, entries, fetch)
        return Response(200, [("Content-Type", "application/json")], stream=stream)

    headers = []
    if more:
        headers.append(_link(request.path, {"n": n or limit, "last": entries[-1]}))
    return json_response({**prefix, key: entries}, headers=headers)


async def _stream_all(
    prefix: dict[str, str], key: str, first: list[str], fetch: Page
) -> AsyncIterator[bytes]:
    # Everything but the closing "]}" of the empty list.
    yield encode_json({**prefix, key: []})[:-2]
    page = first
    separator = b""
    while page:
        # The page's JSON array without its brackets.
        yield separator + encode_json(page)[1:-1]
        separator = b","
        if len(page) < MAX_PAGE_SIZE:
            break
        page = await run_sync(fetch, MAX_PAGE_SIZE, page[-1])
    yield b"]}"


async def tags(request: Request) -> Response:
    """Serve GET /v2/<name>/tags/list: NAME_UNKNOWN for an unknown repository."""
    repository = request.repository()
    return await _paged(
        request, "tags", {"name": repository.name}, repository.tags.list
    )


async def catalog(request: Request) -> Response:
    """Serve GET /v2/_catalog: every repository that has had an event."""
    return await _paged(request, "repositories", {}, request.state.registry.catalog)


async def referrers(request: Request) -> Response:
    """Serve GET /v2/<name>/referrers/<digest> as an OCI image index.

    An unknown repository or subject gives an empty index, never a 404, as
    the specification requires. It also requires a 400 for a subject that
    is not a valid digest, where GET of a manifest or blob gets a 404.

    Referrers come oldest first, at most MAX_PAGE_SIZE or ``n`` of them a
    page, and a page ends early at MAX_REFERRERS_PAGE_BYTES. The
    specification defines no ``n`` for referrers, but oras-go v2 sends one
    when its ReferrerListPageSize is set, so cairn reads it as tags/list
    does. The Link to the next page repeats ``artifactType`` and ``n``.
    """
    repository = request.repository()
    subject = Digest.parse(request.path_params["digest"])
    artifact_type = request.param("artifactType")
    if artifact_type == "":
        # An unset variable in a client's script would otherwise list every
        # referrer unfiltered.
        raise unsupported(
            "artifactType is empty: give a media type, or leave out the "
            "parameter to list every referrer",
            parameter="artifactType",
            value=artifact_type,
        )
    if artifact_type is not None and not is_media_type(artifact_type):
        # No stored referrer can have such a type, so the list would be
        # empty. A "+" sent unencoded, as in "sig+json", arrives as a space.
        raise unsupported(
            "artifactType is not a valid media type: send it as type/subtype, "
            "with '+' encoded as %2B",
            parameter="artifactType",
            value=artifact_type,
        )
    n = page_size(request, minimum=1)
    listing = _referrers_listing(repository.name, subject, artifact_type)
    cursor = request.param("cursor") or None
    after = 0 if cursor is None else _referrers_cursor_position(cursor, listing)
    limit = MAX_PAGE_SIZE if n is None else min(n, MAX_PAGE_SIZE)

    # One extra referrer shows whether another page follows.
    found = await run_sync(
        repository.manifests.referrers_after, subject, artifact_type, after, limit + 1
    )
    body, listed = _referrers_index(found[:limit])

    headers = [("Content-Type", OCI_INDEX)]
    if artifact_type is not None:
        headers.append(("OCI-Filters-Applied", "artifactType"))
    if listed < len(found):
        query: dict[str, str | int] = {}
        if artifact_type is not None:
            query["artifactType"] = artifact_type
        if n is not None:
            query["n"] = n
        query["cursor"] = encode_cursor(found[listed - 1][0], listing)
        headers.append(_link(request.path, query))
    return Response(200, headers, body)


def _referrers_listing(
    repository: str, subject: Digest, artifact_type: str | None
) -> str:
    """Return the hash that ties a referrers cursor to its listing."""
    key = encode_json([repository, str(subject), artifact_type])
    # The first 128 bits of SHA-256 distinguish listings. The cursor is no
    # secret, so the hash needs no key.
    return hashlib.sha256(key).hexdigest()[:32]


def _referrers_cursor_position(cursor: str, listing: str) -> int:
    """Return the log position that a referrers ``cursor`` continues after.

    Raises HTTPError 400 UNSUPPORTED for a cursor that is invalid or that
    belongs to a listing other than ``listing``.
    """
    try:
        position, cursor_listing = decode_cursor(cursor, (int, str))
    except Unsupported:
        raise unsupported(
            "invalid cursor: follow the Link header of the previous page unchanged",
            parameter="cursor",
            value=cursor,
        ) from None
    if cursor_listing != listing:
        raise unsupported(
            "the cursor belongs to another repository, subject or artifactType:"
            " follow the Link header of this listing's previous page",
            parameter="cursor",
            value=cursor,
        )
    return int(position)


def _referrers_index(found: list[tuple[int, Descriptor]]) -> tuple[bytes, int]:
    """Encode an image index of the first referrers in ``found`` that fit in
    MAX_REFERRERS_PAGE_BYTES, but at least one. Return it and their count."""
    envelope = encode_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    )
    # Everything but the closing "]}" of the empty list.
    head = envelope[:-2]
    size = len(envelope)
    parts: list[bytes] = []
    for _position, descriptor in found:
        part = encode_json(descriptor.to_json())
        separator = 1 if parts else 0
        if parts and size + separator + len(part) > MAX_REFERRERS_PAGE_BYTES:
            break
        parts.append(part)
        size += separator + len(part)
    return head + b",".join(parts) + b"]}", len(parts)
