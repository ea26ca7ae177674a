"""The dashboard API: read-only JSON queries under /_cairn/api/v1/.

Repository names contain slashes, so a repository's sub-resources follow a
``/-/`` separator, which no repository name can contain: the tags of
``library/app`` are at ``/_cairn/api/v1/repositories/library/app/-/tags``.
"""

from __future__ import annotations

import functools
from typing import Final

from engine.api.dashboard import handlers, params
from engine.api.dashboard.openapi import query_parameters
from engine.api.http import Request, Response
from engine.api.routing import Handler, Router

PREFIX: Final = "/_cairn/api/v1"

# A name never contains a "-" path segment, so an unknown sub-resource such
# as ``library/app/-/nope`` matches no route and gets a 404.
_NAME: Final = r"(?P<name>[^/](?:(?!/-(?:/|\Z)).)*?)"
_TAG: Final = r"(?P<tag>[^/]+)"
_REPOSITORY: Final = rf"/repositories/{_NAME}"

# Each route: its pattern under PREFIX, its path in the OpenAPI document,
# and its handler.
_ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    (r"/openapi\.json", "/openapi.json", handlers.openapi),
    ("/position", "/position", handlers.position),
    ("/repositories", "/repositories", handlers.repositories),
    (
        rf"{_REPOSITORY}/-/tags/{_TAG}/history",
        "/repositories/{name}/-/tags/{tag}/history",
        handlers.tag_history,
    ),
    (
        rf"{_REPOSITORY}/-/tags/{_TAG}",
        "/repositories/{name}/-/tags/{tag}",
        handlers.tag,
    ),
    (rf"{_REPOSITORY}/-/tags", "/repositories/{name}/-/tags", handlers.tags),
    (
        rf"{_REPOSITORY}/-/manifests",
        "/repositories/{name}/-/manifests",
        handlers.manifests,
    ),
    (
        rf"{_REPOSITORY}/-/referrers",
        "/repositories/{name}/-/referrers",
        handlers.referrers,
    ),
    (_REPOSITORY, "/repositories/{name}", handlers.repository),
    ("/catalog", "/catalog", handlers.catalog),
    ("/activity", "/activity", handlers.activity),
    ("/top", "/top", handlers.top),
    ("/events", "/events", handlers.events),
)


def _checking_parameters(handler: Handler, accepted: frozenset[str]) -> Handler:
    """Wrap ``handler`` so that a query parameter outside ``accepted`` gets a
    400 before the handler runs."""

    @functools.wraps(handler)
    async def checked(request: Request) -> Response:
        params.reject_unknown(request, accepted)
        return await handler(request)

    return checked


def add_routes(router: Router) -> None:
    """Add every dashboard API route to ``router``. Each takes the query
    parameters that the OpenAPI document lists for it, and no others."""
    for pattern, path, handler in _ROUTES:
        accepted = query_parameters(path)
        router.add(PREFIX + pattern, GET=_checking_parameters(handler, accepted))
