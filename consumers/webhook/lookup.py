"""Look up on the registry what an event from NATS does not carry.

A tag.set event names only the tag and the digest; Distribution receivers
expect the target's media type and size as well. With ``[registry] url``
configured, the webhook keeps them from the manifest.pushed events it reads,
and otherwise sends one HEAD request per manifest to the registry, in a
small cache. Digests never change their content, so a cached result stays
right, and a manifest deleted before its tag event is delivered keeps the
facts that its push carried.

An event too large for the NATS server arrives as a stand-in without its
payload (``engine.bus.messages.stand_in_message``). The webhook then reads
the full event from the registry's event feed, ``GET /_cairn/events``. It
reads the same feed, with the mirror's client, for events that a
re-created stream lacks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final
from urllib.parse import quote

import httpx
import structlog

from consumers.httperrors import describe_http_error
from consumers.mirror.errors import MirrorError, TransientError
from consumers.mirror.feed import PAGE_SIZE, FeedClient
from consumers.webhook.config import WebhookConfig
from consumers.webhook.payloads import ManifestFacts, event_problem
from engine.domain.manifests import MANIFEST_MEDIA_TYPES

log = structlog.get_logger(__name__)

CACHE_SIZE: Final = 4096
LOOKUP_TIMEOUT: Final = 5.0
# The webhook's hint on where to set credentials, added to a 401 error.
WEBHOOK_CREDENTIALS: Final = (
    "put them in [registry] url, as in https://user:password@registry.example.com"
)
_ACCEPT: Final = ", ".join(sorted(MANIFEST_MEDIA_TYPES))


class ManifestLookup:
    def __init__(
        self,
        registry_url: str,
        client: httpx.AsyncClient | None = None,
        auth: httpx.Auth | None = None,
    ):
        self.registry_url = registry_url
        self._client = client or httpx.AsyncClient(timeout=LOOKUP_TIMEOUT, auth=auth)
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
                error=describe_http_error(error),
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
        self._keep(digest, facts)
        return facts

    def remember(self, event: dict[str, Any]) -> None:
        """Keep the media type and size that a manifest.pushed event carries."""
        payload = event.get("payload") or {}
        digest = payload.get("digest")
        media_type = payload.get("media_type")
        size = payload.get("size")
        if (
            isinstance(digest, str)
            and isinstance(media_type, str)
            and isinstance(size, int)
            and not isinstance(size, bool)
        ):
            self._keep(digest, ManifestFacts(media_type, size))

    def _keep(self, digest: str, facts: ManifestFacts) -> None:
        self._cache[digest] = facts
        self._cache.move_to_end(digest)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        await self._client.aclose()


class EventLookupFailed(Exception):
    """The registry's event feed did not return the event asked for."""


class EventLookup:
    """Reads single events from the registry's event feed."""

    def __init__(
        self,
        registry_url: str,
        client: httpx.AsyncClient | None = None,
        auth: httpx.Auth | None = None,
    ):
        self.url = f"{registry_url}/_cairn/events"
        self._client = client or httpx.AsyncClient(timeout=LOOKUP_TIMEOUT, auth=auth)
        self._feed = FeedClient(registry_url, self._client, WEBHOOK_CREDENTIALS)

    async def event(self, position: int, event_id: str) -> dict[str, Any]:
        """Return the event at ``position``, which must have id ``event_id``.

        Raises EventLookupFailed with the URL and the reason.
        """
        request = f"GET {self.url}?after={position - 1}&limit=1"
        try:
            response = await self._client.get(
                self.url, params={"after": position - 1, "limit": 1}
            )
        except httpx.HTTPError as error:
            raise EventLookupFailed(
                f"{request} failed: {describe_http_error(error)}"
            ) from None
        if response.status_code != 200:
            raise EventLookupFailed(f"{request} returned HTTP {response.status_code}")
        try:
            found = response.json()["events"]
        except (ValueError, KeyError, TypeError):
            raise EventLookupFailed(f"{request} returned no event page") from None
        if not found or not isinstance(found[0], dict):
            raise EventLookupFailed(
                f"{request} returned no event at position {position}"
            )
        event: dict[str, Any] = found[0]
        if event.get("position") != position or event.get("id") != event_id:
            raise EventLookupFailed(
                f"{request} returned event {event.get('id')} at position "
                f"{event.get('position')}, not event {event_id} at {position}"
            )
        problem = event_problem(event)
        if problem is not None:
            raise EventLookupFailed(
                f"{request} returned an invalid event {event_id}: {problem}"
            )
        return event

    async def events_after(self, after: int, through: int) -> list[dict[str, Any]]:
        """Return the events after position ``after`` from one page of the
        feed, in log order, up to position ``through`` at most.

        Raises EventLookupFailed when the page fails, is empty, skips a
        position or contains an invalid event.
        """
        request = f"GET {self.url}?after={after}"
        try:
            page = await self._feed.page(after, min(through - after, PAGE_SIZE))
        except (MirrorError, TransientError) as error:
            raise EventLookupFailed(str(error)) from None
        if not page.events:
            raise EventLookupFailed(
                f"{request} returned no event, and the registry's log ends at "
                f"position {page.head}"
            )
        events: list[dict[str, Any]] = []
        for expected, event in enumerate(page.events, start=after + 1):
            if expected > through:
                break
            problem = event_problem(event)
            if problem is not None:
                raise EventLookupFailed(
                    f"{request} returned an invalid event: {problem}"
                )
            if event.get("position") != expected:
                raise EventLookupFailed(
                    f"{request} returned position {event.get('position')} in "
                    f"place of {expected}"
                )
            events.append(event)
        return events

    async def aclose(self) -> None:
        await self._client.aclose()


def registry_lookups(
    config: WebhookConfig,
) -> tuple[ManifestLookup | None, EventLookup | None]:
    """Build the look-ups on ``[registry] url``, with its credentials, or
    None for each when the configuration has no registry URL."""
    if config.registry_url is None:
        return None, None
    credentials = config.registry_credentials
    auth = credentials.auth() if credentials is not None else None
    return (
        ManifestLookup(config.registry_url, auth=auth),
        EventLookup(config.registry_url, auth=auth),
    )
