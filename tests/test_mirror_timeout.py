"""`cairn mirror --timeout`: a response slower than the timeout stops the
mirror with an error that names the timeout, and 0 turns the timeout off."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.domain.digest import Digest
from tests.images import make_image
from tests.server import ServeProcess, push_image, running
from tests.test_mirror import WAIT, log_events, run_mirror_status
from tests.test_mirror_layout import HOP_HEADERS

# Seconds that the proxy holds back the response to the delayed path, and a
# --timeout well below it.
DELAY_S = 2.0
SHORT_TIMEOUT_S = 0.5


class DelayingProxy:
    """An ASGI app that forwards every request to ``upstream``, and waits
    DELAY_S before it forwards the response to ``delayed_path``."""

    def __init__(self, upstream: str, delayed_path: str) -> None:
        self.upstream = upstream
        self.delayed_path = delayed_path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more_body = True
        while more_body:
            message = await receive()
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        query = scope["query_string"].decode()
        url = self.upstream + scope["path"] + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_HEADERS]

        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.request(
                scope["method"], url, headers=headers, content=body
            )
        if scope["path"] == self.delayed_path:
            await asyncio.sleep(DELAY_S)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [
                    (k, v)
                    for k, v in response.headers.raw
                    if k.lower() not in HOP_HEADERS
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.content})


def test_mirror_timeout_zero_waits(tmp_path: Path, source: ServeProcess) -> None:
    image = make_image()
    with httpx.Client(base_url=source.url, timeout=WAIT) as client:
        push_image(client, "library/app", image, "v1")
    layer_digest = Digest.of(image.layers[0])
    proxy = DelayingProxy(source.url, f"/v2/library/app/blobs/{layer_digest}")

    with running(proxy) as proxied:
        # The delay is longer than a short timeout, so the copy fails.
        short = run_mirror_status(
            proxied.url,
            f"oci:{tmp_path / 'short'}",
            "--timeout",
            str(SHORT_TIMEOUT_S),
            "--retries",
            "1",
        )
        # Without a timeout, the mirror waits for the delayed response.
        unlimited = run_mirror_status(
            proxied.url,
            f"oci:{tmp_path / 'unlimited'}",
            "--timeout",
            "0",
            "--retries",
            "1",
        )

    assert short.returncode == 1, short.stderr[-4000:]
    assert "Traceback" not in short.stderr
    failed = events_of(short.stderr, "mirror_failed")
    assert len(failed) == 1
    assert f"GET blob {layer_digest}" in failed[0]["error"]

    assert unlimited.returncode == 0, unlimited.stderr[-4000:]
    assert "Traceback" not in unlimited.stderr
    (stopped,) = events_of(unlimited.stderr, "mirror_stopped")
    assert stopped["status"] == 0
    assert stopped["not_copied"] == 0
    blobs = tmp_path / "unlimited" / "library" / "app" / "blobs" / "sha256"
    assert (blobs / layer_digest.encoded).read_bytes() == image.layers[0]


@pytest.mark.parametrize("delayed", ["blob", "manifest"])
def test_mirror_timeout_named_in_error(
    tmp_path: Path, source: ServeProcess, delayed: str
) -> None:
    image = make_image()
    with httpx.Client(base_url=source.url, timeout=WAIT) as client:
        push_image(client, "library/app", image, "v1")
    layer_digest = Digest.of(image.layers[0])
    if delayed == "blob":
        delayed_path = f"/v2/library/app/blobs/{layer_digest}"
        request = f"GET blob {layer_digest} in library/app"
    else:
        delayed_path = f"/v2/library/app/manifests/{image.digest}"
        request = f"GET manifest {image.digest} in library/app"
    proxy = DelayingProxy(source.url, delayed_path)

    with running(proxy) as proxied:
        result = run_mirror_status(
            proxied.url,
            f"oci:{tmp_path / 'layout'}",
            "--timeout",
            str(SHORT_TIMEOUT_S),
            "--retries",
            "1",
        )

    assert result.returncode == 1, result.stderr[-4000:]
    (failed,) = events_of(result.stderr, "mirror_failed")
    # httpx's ReadTimeout has no text of its own.
    assert failed["error"].endswith(
        f"{request}: read timed out after {SHORT_TIMEOUT_S:g} s (--timeout)"
    ), failed["error"]


def events_of(stderr: str, event: str) -> list[dict[str, Any]]:
    return [line for line in log_events(stderr) if line["event"] == event]
