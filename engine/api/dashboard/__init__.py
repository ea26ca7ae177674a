"""The dashboard API: read-only JSON queries under /_cairn/api/v1/.

Repository names contain slashes, so a repository's sub-resources follow a
``/-/`` separator, which no repository name can contain: the tags of
``library/app`` are at ``/_cairn/api/v1/repositories/library/app/-/tags``.
"""

from __future__ import annotations

from typing import Final

from engine.api.dashboard import handlers
from engine.api.routing import Router

PREFIX: Final = "/_cairn/api/v1"

# A name never contains a "-" path segment, so an unknown sub-resource such
# as ``library/app/-/nope`` matches no route and gets a 404.
_NAME: Final = r"(?P<name>[^/](?:(?!/-(?:/|$)).)*?)"
_TAG: Final = r"(?P<tag>[^/]+)"


def add_routes(router: Router) -> None:
    """Add every dashboard API route to ``router``."""
    repository = rf"{PREFIX}/repositories/{_NAME}"
    router.add(rf"{PREFIX}/openapi\.json", GET=handlers.openapi)
    router.add(rf"{PREFIX}/position", GET=handlers.position)
    router.add(rf"{PREFIX}/repositories", GET=handlers.repositories)
    router.add(rf"{repository}/-/tags/{_TAG}/history", GET=handlers.tag_history)
    router.add(rf"{repository}/-/tags/{_TAG}", GET=handlers.tag)
    router.add(rf"{repository}/-/tags", GET=handlers.tags)
    router.add(rf"{repository}/-/manifests", GET=handlers.manifests)
    router.add(rf"{repository}/-/referrers", GET=handlers.referrers)
    router.add(repository, GET=handlers.repository)
    router.add(rf"{PREFIX}/catalog", GET=handlers.catalog)
    router.add(rf"{PREFIX}/activity", GET=handlers.activity)
    router.add(rf"{PREFIX}/top", GET=handlers.top)
    router.add(rf"{PREFIX}/events", GET=handlers.events)
