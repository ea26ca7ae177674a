"""The web dashboard: static pages under /_cairn/ui/ that draw the query API.

The files are read once and served from memory. Only the names in FILES are
served, so no request path reaches the filesystem. The Content-Security-Policy
allows scripts, styles and requests from this origin only: the pages load
nothing from the network, and a value that slipped into markup could not run.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

from engine.api.errors import ErrorCode, HTTPError
from engine.api.http import Request, Response

FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "repository.html": "text/html; charset=utf-8",
    "tag.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS: Final = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


@functools.cache
def _content(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


async def redirect_to_index(request: Request) -> Response:
    """Redirect GET /_cairn/ui to /_cairn/ui/, keeping the query string.

    The pages link their scripts and styles by relative paths, which resolve
    under /_cairn/ only without the trailing slash. The Location is a path,
    never built from the Host or X-Forwarded-* headers, because a 308 may be
    cached and shared with other clients.
    """
    query = request.scope.get("query_string", b"").decode("latin-1")
    location = "/_cairn/ui/" + (f"?{query}" if query else "")
    return Response(308, [("Location", location)])


async def page(request: Request) -> Response:
    """Serve GET /_cairn/ui/ and the files beside it."""
    name = request.path_params.get("file") or "index.html"
    content_type = FILES.get(name)
    if content_type is None:
        raise HTTPError(
            ErrorCode.UNSUPPORTED,
            404,
            "no such dashboard file",
            {"path": request.path, "files": sorted(FILES)},
        )
    return Response(
        200,
        [("Content-Type", content_type), *SECURITY_HEADERS],
        _content(name),
    )
