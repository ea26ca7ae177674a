"""One HTTP request per event: body, signature, headers and the outcome.

Each request carries

- ``Idempotency-Key`` and ``Cairn-Event-Id``: the event id, the same on every
  attempt, so a receiver can drop repeats;
- ``Cairn-Event-Type``, ``Cairn-Repository`` and ``Cairn-Delivery-Attempt``;
- ``Cairn-Signature: sha256=<hex>`` when the endpoint has a secret: the
  HMAC-SHA256 of the exact body bytes, keyed with the secret's UTF-8 bytes.

Only a 2xx status counts as delivered. Redirects are not followed, because
a 302 or 303 would turn the POST into a GET; configure the final URL.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx

from consumers.httperrors import describe_http_error
from consumers.webhook.config import Endpoint
from consumers.webhook.payloads import (
    CLOUDEVENTS_MEDIA_TYPE,
    DISTRIBUTION_MEDIA_TYPE,
    ManifestFacts,
    cloudevents_body,
    distribution_body,
)

SIGNATURE_HEADER: Final = "Cairn-Signature"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
EVENT_ID_HEADER: Final = "Cairn-Event-Id"
EVENT_TYPE_HEADER: Final = "Cairn-Event-Type"
REPOSITORY_HEADER: Final = "Cairn-Repository"
ATTEMPT_HEADER: Final = "Cairn-Delivery-Attempt"
USER_AGENT: Final = "cairn-webhook"

# Characters of a failing receiver's response body kept for the log line.
ERROR_BODY_LIMIT: Final = 200


@dataclass(frozen=True, slots=True)
class Request:
    """A request body ready to send, and the ids it is sent for."""

    body: bytes
    content_type: str
    event_id: str
    event_type: str
    repository: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt. ``status`` is None when no response came."""

    delivered: bool
    status: int | None
    error: str | None
    seconds: float


def sign(secret: str, body: bytes) -> str:
    """Return the ``Cairn-Signature`` header value for ``body``."""
    mac = hmac.new(secret.encode("utf-8"), body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def build_request(
    endpoint: Endpoint,
    event: dict[str, Any],
    registry_url: str | None,
    facts: ManifestFacts | None,
) -> Request:
    """Encode ``event`` in the endpoint's format."""
    if endpoint.format == "cloudevents":
        body = cloudevents_body(event, registry_url)
        content_type = CLOUDEVENTS_MEDIA_TYPE
    else:
        body = distribution_body(event, registry_url, facts)
        content_type = DISTRIBUTION_MEDIA_TYPE
    return Request(
        body=body,
        content_type=content_type,
        event_id=str(event["id"]),
        event_type=str(event["type"]),
        repository=str(event["repository"]),
    )


def http_client(endpoint: Endpoint) -> httpx.AsyncClient:
    """Build the endpoint's own client, so that its pool and timeouts are its own."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(endpoint.timeout),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


async def send(
    client: httpx.AsyncClient, endpoint: Endpoint, request: Request, attempt: int
) -> Outcome:
    """POST ``request`` to the endpoint once."""
    headers = [
        *endpoint.headers,
        ("Content-Type", request.content_type),
        (IDEMPOTENCY_HEADER, request.event_id),
        (EVENT_ID_HEADER, request.event_id),
        (EVENT_TYPE_HEADER, request.event_type),
        (REPOSITORY_HEADER, request.repository),
        (ATTEMPT_HEADER, str(attempt)),
    ]
    if endpoint.secret is not None:
        headers.append((SIGNATURE_HEADER, sign(endpoint.secret, request.body)))

    started = time.monotonic()
    try:
        response = await client.post(
            endpoint.url, content=request.body, headers=headers
        )
    except httpx.HTTPError as error:
        reason = describe_http_error(error, "the endpoint's timeout")
        return Outcome(False, None, reason, _since(started))
    elapsed = _since(started)
    if 200 <= response.status_code < 300:
        return Outcome(True, response.status_code, None, elapsed)
    return Outcome(False, response.status_code, _describe(response), elapsed)


def _describe(response: httpx.Response) -> str:
    if response.is_redirect:
        location = response.headers.get("Location", "")
        return (
            f"HTTP {response.status_code} redirect to {location!r}; redirects are "
            "not followed, so configure that URL"
        )
    text = response.text[:ERROR_BODY_LIMIT].strip()
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
