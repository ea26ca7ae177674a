"""Look up the media type and size of a tagged manifest on the registry.

A tag.set event names only the tag and the digest; Distribution receivers
expect the target's media type and size as well. With ``[registry] url``
configured, the webhook sends one HEAD request per manifest to the registry
and keeps the results in a small cache. Digests never change their
content, so a cached result stays right.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final
from urllib.parse import quote

import httpx
import structlog

from consumers.webhook.payloads import ManifestFacts
from engine.domain.manifests import MANIFEST_MEDIA_TYPES

log = structlog.get_logger(__name__)

CACHE_SIZE: Final = 4096
LOOKUP_TIMEOUT: Final = 5.0
_ACCEPT: Final = ", ".join(sorted(MANIFEST_MEDIA_TYPES))


class ManifestLookup:
    def __init__(self, registry_url: str, client: httpx.AsyncClient | None = None):
        self.registry_url = registry_url
        self._client = client or httpx.AsyncClient(timeout=LOOKUP_TIMEOUT)
        self._cache: OrderedDict[str, ManifestFacts] = OrderedDict()

    async def facts(self, repository: str, digest: str) -> ManifestFacts | None:
        """Return the manifest's media type and size, or None if unavailable."""
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache.move_to_end(digest)
            return cached

        url = f"{self.registry_url}/v2/{quote(repository)}/manifests/{digest}"
        try:
            response = await self._client.head(url, headers={"Accept": _ACCEPT})
        except httpx.HTTPError as error:
            log.warning(
                "manifest_lookup_failed",
                repository=repository,
                digest=digest,
                error=str(error) or type(error).__name__,
            )
            return None

        media_type = response.headers.get("Content-Type")
        length = response.headers.get("Content-Length", "")
        if response.status_code != 200 or not media_type or not length.isdigit():
            log.info(
                "manifest_lookup_missed",
                repository=repository,
                digest=digest,
                status=response.status_code,
            )
            return None

        facts = ManifestFacts(media_type.split(";")[0].strip(), int(length))
        self._cache[digest] = facts
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return facts

    async def aclose(self) -> None:
        await self._client.aclose()
