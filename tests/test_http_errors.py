"""Error messages for failed httpx requests in the webhook, from a real slow
server on loopback. tests/test_mirror_timeout.py covers `cairn mirror`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog

from consumers.httperrors import describe_http_error
from consumers.webhook.config import Endpoint
from consumers.webhook.delivery import Request, http_client, send
from consumers.webhook.lookup import EventLookup, EventLookupFailed, ManifestLookup
from tests.server import ServerThread, running

# Seconds that the slow server waits before it responds, and a client
# timeout well below it.
DELAY_S = 2.0
SHORT_TIMEOUT_S = 0.5


async def slow_app(scope: Any, receive: Any, send: Any) -> None:
    """Respond 200 to every request after DELAY_S."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(DELAY_S)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def slow_server() -> Iterator[ServerThread]:
    with running(slow_app) as server:
        yield server


def test_webhook_delivery_timeout_message(slow_server: ServerThread) -> None:
    endpoint = Endpoint(
        name="slow", url=f"{slow_server.url}/hook", timeout=SHORT_TIMEOUT_S
    )
    request = Request(b"{}", "application/json", "event-1", "tag.set", "library/app")

    async def deliver() -> Any:
        async with http_client(endpoint) as client:
            return await send(client, endpoint, request, attempt=1)

    outcome = asyncio.run(deliver())

    assert not outcome.delivered
    assert outcome.status is None
    assert outcome.error == "read timed out after 0.5 s (the endpoint's timeout)"


def test_event_lookup_timeout_message(slow_server: ServerThread) -> None:
    async def look_up() -> None:
        client = httpx.AsyncClient(timeout=SHORT_TIMEOUT_S)
        lookup = EventLookup(slow_server.url, client)
        try:
            await lookup.event(7, "event-7")
        finally:
            await lookup.aclose()

    with pytest.raises(EventLookupFailed) as failed:
        asyncio.run(look_up())

    assert str(failed.value) == (
        f"GET {slow_server.url}/_cairn/events?after=6&limit=1 failed: "
        "read timed out after 0.5 s"
    )


def test_manifest_lookup_timeout_logged(slow_server: ServerThread) -> None:
    digest = "sha256:" + "a" * 64

    async def look_up() -> Any:
        client = httpx.AsyncClient(timeout=SHORT_TIMEOUT_S)
        lookup = ManifestLookup(slow_server.url, client)
        try:
            return await lookup.facts("library/app", digest)
        finally:
            await lookup.aclose()

    with structlog.testing.capture_logs() as logs:
        facts = asyncio.run(look_up())

    assert facts is None
    (failed,) = [line for line in logs if line["event"] == "manifest_lookup_failed"]
    assert failed["error"] == "read timed out after 0.5 s"
    assert failed["digest"] == digest


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (httpx.ReadError(""), "ReadError"),
        (httpx.ConnectError("connection refused"), "connection refused"),
        # A timeout that httpx did not tie to a request has no seconds.
        (httpx.ConnectTimeout(""), "connect timed out (--timeout)"),
        (httpx.PoolTimeout(""), "pool timed out (--timeout)"),
    ],
)
def test_describe_http_error(error: httpx.HTTPError, message: str) -> None:
    assert describe_http_error(error, "--timeout") == message


def test_describe_http_error_write_timeout() -> None:
    request = httpx.Request("PUT", "http://127.0.0.1:9/upload")
    request.extensions["timeout"] = httpx.Timeout(5.0, write=1.5).as_dict()
    error = httpx.WriteTimeout("", request=request)

    assert describe_http_error(error) == "write timed out after 1.5 s"
