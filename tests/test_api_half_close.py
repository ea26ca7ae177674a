"""Clients that shut down their sending side once the request is sent.

`nc -N`, and programs that pipe a request into a socket, send a request and
then shut down their side of the connection while they wait for the
response. The server responds to each complete request and then closes. One
`cairn serve` process on SQLite is driven over raw sockets on 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.images import Image, make_image
from tests.server import ServeProcess, push_blob, serve_cairn

BOUND_S = 30.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = serve_cairn(tmp_path_factory.mktemp("half-close") / "registry")
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def client(serve: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.url, timeout=BOUND_S, trust_env=False) as client:
        yield client


def _connect(serve: ServeProcess) -> socket.socket:
    port = int(serve.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)


def _head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


def _send_then_half_close(serve: ServeProcess, request: bytes) -> bytes:
    """Send ``request``, shut down the sending side, and return every byte
    the server sent until it closed the connection."""
    with _connect(serve) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {BOUND_S:g} s"
            ) from None
    return bytes(received)


def _manifest_put(client: httpx.Client, repository: str) -> tuple[Image, bytes]:
    """Push a new image's blobs to ``repository``; return the image and the
    head of a PUT of its manifest as tag v1."""
    image = make_image()
    for blob in image.blobs:
        push_blob(client, repository, blob)
    head = _head(
        "PUT",
        f"/v2/{repository}/manifests/v1",
        f"Content-Type: {image.media_type}",
        f"Content-Length: {len(image.manifest)}",
    )
    return image, head


def _statuses(received: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", received)


def test_get_after_half_close(serve: ServeProcess) -> None:
    received = _send_then_half_close(serve, _head("GET", "/v2/"))

    assert _statuses(received) == [b"200"]
    assert received.endswith(b"\r\n\r\n{}")


def test_manifest_put_after_half_close(
    serve: ServeProcess, client: httpx.Client
) -> None:
    image, head = _manifest_put(client, "half/put")
    request = head + image.manifest

    received = _send_then_half_close(serve, request)

    assert _statuses(received) == [b"201"]
    assert f"docker-content-digest: {image.digest}".encode() in received.lower()
    stored = client.get("/v2/half/put/manifests/v1")
    assert stored.status_code == 200
    assert stored.content == image.manifest


def test_pipelined_requests_each_get_response(serve: ServeProcess) -> None:
    request = _head("GET", "/v2/") + _head("GET", "/v2/half/none/tags/list")

    received = _send_then_half_close(serve, request)

    assert _statuses(received) == [b"200", b"404"]


def test_half_close_inside_body_stores_nothing(
    serve: ServeProcess, client: httpx.Client
) -> None:
    image, head = _manifest_put(client, "half/cut")
    request = head + image.manifest[: len(image.manifest) // 2]

    received = _send_then_half_close(serve, request)

    assert received == b""
    assert client.get("/v2/half/cut/manifests/v1").status_code == 404
    events = client.get("/_cairn/events", params={"repository": "half/cut"})
    assert [event["type"] for event in events.json()["events"]] == [
        "blob.pushed",
        "blob.pushed",
    ]


def test_half_close_between_requests_closes(serve: ServeProcess) -> None:
    with _connect(serve) as sock:
        sock.sendall(_head("GET", "/v2/"))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert _statuses(received) == [b"200"]
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk

    # The 200's body may arrive with the close, but no other response.
    assert _statuses(rest) == []
