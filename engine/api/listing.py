"""Listing routes: tags, the catalog and referrers.

Tags and the catalog page with ``n`` and ``last`` and announce the next page
in a ``Link`` header. A page has at most MAX_PAGE_SIZE entries, because the OCI
specification lets a registry return fewer than ``n`` when it sends a Link.
A request without ``n`` gets every entry: past one page the body is
streamed one page at a time, so no listing is ever held in memory whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final
from urllib.parse import urlencode

from engine.api.errors import unsupported
from engine.api.http import Request, Response, json_response, parse_decimal
from engine.api.threads import run_sync
from engine.domain.digest import Digest
from engine.domain.manifests import OCI_INDEX
from engine.encoding import encode_json

MAX_PAGE_SIZE: Final = 1000

Page = Callable[[int, str | None], list[str]]


def page_size(request: Request) -> int | None:
    """Return ``n`` from the query, None when absent; 400 when not a count."""
    value = request.param("n")
    if value is None or value == "":
        return None
    number = parse_decimal(value)
    if number is None:
        raise unsupported(
            "n must be an integer from 0 to 2^63-1", parameter="n", value=value
        )
    return number


def _link(path: str, n: int, last: str) -> tuple[str, str]:
    return ("Link", f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"')


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

    headers = [_link(request.path, n or limit, entries[-1])] if more else []
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
    """
    repository = request.repository()
    subject = Digest.parse(request.path_params["digest"])
    artifact_type = request.param("artifactType") or None
    descriptors = await run_sync(repository.manifests.referrers, subject, artifact_type)
    headers = [("Content-Type", OCI_INDEX)]
    if artifact_type is not None:
        headers.append(("OCI-Filters-Applied", "artifactType"))
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [descriptor.to_json() for descriptor in descriptors],
    }
    return Response(200, headers, encode_json(document))
