"""`cairn mirror --target oci:DIR`: a mirror killed in the middle of a
blob leaves a partial file, which the next mirror that starts removes, but
not while another running mirror still writes it. Repositories whose
layouts would overlap stop the mirror before it writes into them."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from engine.domain.digest import Digest
from tests.images import make_image
from tests.nats import wait_until
from tests.server import ServeProcess, push_image, running
from tests.test_mirror import (
    WAIT,
    log_events,
    run_mirror_status,
    start_mirror,
)

# Headers that describe one hop of a connection, which a proxy does not pass on.
HOP_HEADERS = frozenset({b"connection", b"host", b"keep-alive", b"transfer-encoding"})


class StallingProxy:
    """An ASGI app that forwards every request to ``upstream``, except that
    it sends only the first chunk of the response to ``stalled_path`` and
    then waits until the client disconnects."""

    def __init__(self, upstream: str, stalled_path: str) -> None:
        self.upstream = upstream
        self.stalled_path = stalled_path
        self.stalled = threading.Event()

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

        async with (
            httpx.AsyncClient(timeout=WAIT) as client,
            client.stream(
                scope["method"], url, headers=headers, content=body
            ) as response,
        ):
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
            async for chunk in response.aiter_raw():
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
                if scope["path"] == self.stalled_path:
                    self.stalled.set()
                    # http.disconnect arrives when the client goes away.
                    await receive()
                    return
            await send({"type": "http.response.body", "body": b""})


def lines_of(text: str, event: str) -> list[dict[str, Any]]:
    return [line for line in log_events(text) if line["event"] == event]


def test_mirror_layout_removes_abandoned_partial(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    image = make_image(layer_count=1, layer_size=4 * 1024 * 1024)
    with httpx.Client(base_url=source.url, timeout=WAIT) as client:
        push_image(client, "stalled/app", image, "v1")
        push_image(client, "other/app", make_image(), "v1")
    layer = image.layers[0]
    layer_digest = Digest.of(layer)
    blobs = tmp_path / "layout" / "stalled" / "app" / "blobs" / "sha256"
    target = f"oci:{tmp_path / 'layout'}"
    proxy = StallingProxy(source.url, f"/v2/stalled/app/blobs/{layer_digest}")

    with running(proxy) as proxied:
        killed = start_mirror(
            proxied.url,
            target,
            tmp_path / "killed.log",
            "--repositories",
            "stalled/*",
        )
        try:
            wait_until(proxy.stalled.is_set, WAIT)
            partials = sorted(blobs.glob(".partial-*"))
            assert [path.name[:73] for path in partials] == [
                f".partial-{layer_digest.encoded}"
            ]

            # A second mirror on the same layout, for other repositories,
            # leaves the partial file that the first one is writing.
            result = run_mirror_status(source.url, target, "--repositories", "other/*")

            assert result.returncode == 0, result.stderr[-4000:]
            kept = lines_of(result.stderr, "layout_partial_files_kept")
            assert len(kept) == 1
            assert kept[0]["files"] == 1
            assert not lines_of(result.stderr, "layout_partial_files_removed")
            assert partials[0].exists()
        finally:
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait(10)

    assert partials[0].exists()
    # Named like a partial file, but not as the mirror names them.
    foreign = blobs / ".partial-notes"
    foreign.write_text("not the mirror's")

    result = run_mirror_status(source.url, target)

    assert result.returncode == 0, result.stderr[-4000:]
    removed = lines_of(result.stderr, "layout_partial_files_removed")
    assert len(removed) == 1
    assert removed[0]["files"] == 1
    assert not partials[0].exists()
    assert sorted((tmp_path / "layout").rglob(".partial-*")) == [foreign]
    assert (blobs / layer_digest.encoded).read_bytes() == layer


# Repositories whose layouts would lie among the files of the layout of
# "col": its index.json, its blobs directory and its oci-layout file.
NESTED = ["col/index.json", "col/blobs/sha256", "col/oci-layout"]


def assert_layout(directory: Path, tags: list[str]) -> None:
    """Check that ``directory`` is a layout whose index.json lists ``tags``."""
    assert json.loads((directory / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index = json.loads((directory / "index.json").read_text())
    names = [
        entry["annotations"]["org.opencontainers.image.ref.name"]
        for entry in index["manifests"]
    ]
    assert names == tags


def mirror_failure(result: Any) -> str:
    """Return the error of the mirror_failed line of a mirror that exited 1."""
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    failed = lines_of(result.stderr, "mirror_failed")
    assert len(failed) == 1
    error: str = failed[0]["error"]
    assert "\n" not in error
    return error


def test_mirror_layout_overlap_stops(tmp_path: Path, source: ServeProcess) -> None:
    with httpx.Client(base_url=source.url, timeout=WAIT) as client:
        for repository in ["col", *NESTED, "solo/blobs"]:
            push_image(client, repository, make_image(), "1")

    # col comes first in the log, so each nested repository would run
    # through its layout. The mirror stops at the first of them.
    first = tmp_path / "first"
    error = mirror_failure(run_mirror_status(source.url, f"oci:{first}"))

    assert "repository col/index.json" in error
    assert "repository col " in error
    assert str(first / "col" / "index.json") in error
    assert "--repositories" in error
    assert_layout(first / "col", ["1"])
    assert not (first / "solo").exists()

    # Without col, the nested repositories get layouts of their own, and a
    # later mirror of col into that directory stops before it writes.
    second = tmp_path / "second"
    result = run_mirror_status(source.url, f"oci:{second}", "--repositories", "col/*")
    assert result.returncode == 0, result.stderr[-4000:]
    for repository in NESTED:
        assert_layout(second / repository, ["1"])
    error = mirror_failure(
        run_mirror_status(source.url, f"oci:{second}", "--repositories", "col")
    )
    assert "repository col " in error
    assert "repository col/index.json" in error
    assert str(second / "col" / "index.json") in error
    assert not (second / "col" / "index.json").is_file()
    for repository in NESTED:
        assert_layout(second / repository, ["1"])

    # The layout of col/blobs/sha256 is inside col's blobs directory.
    third = tmp_path / "third"
    result = run_mirror_status(
        source.url, f"oci:{third}", "--repositories", "col/blobs/*"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    error = mirror_failure(
        run_mirror_status(source.url, f"oci:{third}", "--repositories", "col")
    )
    assert "repository col/blobs/sha256" in error
    assert str(third / "col" / "blobs") in error
    assert not (third / "col" / "index.json").exists()
    assert_layout(third / "col" / "blobs" / "sha256", ["1"])

    # Leaving the nested repositories out mirrors the rest. A name with a
    # layout entry in it and no repository above it keeps its plain path.
    result = run_mirror_status(
        source.url, f"oci:{first}", "--repositories", "col", "solo/*"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_layout(first / "col", ["1"])
    assert_layout(first / "solo" / "blobs", ["1"])

    # A directory that is no layout where col needs its index.json file.
    fourth = tmp_path / "fourth"
    (fourth / "col" / "index.json").mkdir(parents=True)
    error = mirror_failure(
        run_mirror_status(source.url, f"oci:{fourth}", "--repositories", "col")
    )
    assert f"{fourth / 'col' / 'index.json'}, the index.json file" in error
    assert "is a directory" in error
    assert not (fourth / "col" / "oci-layout").exists()
