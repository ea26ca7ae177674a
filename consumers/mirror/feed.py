"""The source's event feed, GET /_cairn/events, read a page at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import httpx

from consumers.mirror.errors import MirrorError, request_failed
from consumers.mirror.identity import fetch_registry_id
from consumers.mirror.registry import check

PAGE_SIZE: Final = 500


@dataclass(frozen=True, slots=True)
class FeedPage:
    """Events after a position, the position to ask from next, and the head."""

    events: list[dict[str, Any]]
    next_after: int
    head: int


class FeedClient:
    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient,
        credentials: str = "see --source-creds",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/_cairn/events"
        self.client = client
        # The hint on where to set credentials, added to a 401 error.
        self.credentials = credentials

    async def registry_id(self) -> str | None:
        """Return the registry id of the source, or None for a cairn older
        than the id. Raises MirrorError for a 401 or 403."""
        return await fetch_registry_id(
            self.client,
            self.base_url,
            denied_is_unknown=False,
            credentials=self.credentials,
        )

    async def page(self, after: int, limit: int = PAGE_SIZE) -> FeedPage:
        what = f"GET {self.url}?after={after}"
        try:
            response = await self.client.get(
                self.url, params={"after": after, "limit": limit}
            )
        except httpx.TransportError as error:
            raise request_failed(what, error) from error
        if response.status_code == 404:
            raise MirrorError(
                f"{what}: HTTP 404; the source has no event feed, so it is not "
                "a cairn registry (or an older one)"
            )
        check(response, what, self.credentials)
        try:
            document = response.json()
            return FeedPage(
                events=list(document["events"]),
                next_after=int(document["next_after"]),
                head=int(document["head"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise MirrorError(
                f"{what}: the response is not an event page: {error}"
            ) from None
