"""Request bodies delivered in batches that the app requests (BODY_BATCH).

A small ASGI app runs under uvicorn with CairnHttpProtocol in a thread and
records the size of every body message it receives. A raw socket client
sends the body in small pieces with pauses, so that the server reads each
piece on its own.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from engine.api.pending_body import BODY_BATCH, MAX_PENDING_BYTES, PendingBody
from tests.server import running

PIECE = 16 * 1024


class RecordingApp:
    """An ASGI app that sets the body batch of each request and records the
    size of each body message."""

    def __init__(self, batch: int | None) -> None:
        self.batch = batch
        self.messages: list[int] = []
        self.disconnected = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.batch is not None:
            scope["extensions"][BODY_BATCH]["bytes"] = self.batch
        while True:
            message = await receive()
            if message["type"] != "http.request":
                self.disconnected = True
                return
            self.messages.append(len(message["body"]))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _post_in_pieces(port: int, size: int) -> bytes:
    head = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for _ in range(size // PIECE):
            sock.sendall(b"x" * PIECE)
            time.sleep(0.0005)
        return sock.recv(65536)


def _messages_of_post(batch: int | None, size: int) -> list[int]:
    """POST ``size`` bytes in pieces to an app that sets ``batch``; return
    the sizes of the body messages that it received."""
    app = RecordingApp(batch)
    with running(app) as server:
        reply = _post_in_pieces(server.port, size)

    assert reply.startswith(b"HTTP/1.1 204")
    assert sum(app.messages) == size
    return app.messages


@pytest.mark.parametrize("batch", [256 * 1024, 700_000])
def test_body_arrives_in_requested_batches(batch: int) -> None:
    size = 64 * PIECE
    messages = _messages_of_post(batch, size)

    # The first message may hold what arrived before the app set its batch,
    # and the last one the rest of the body.
    assert all(length >= batch for length in messages[1:-1]), messages
    assert len(messages) <= size // batch + 2


def test_full_body_wakes_app_before_batch() -> None:
    # The server stops reading once MAX_PENDING_BYTES wait, so a batch larger
    # than that must not keep the app waiting for bytes that cannot come.
    messages = _messages_of_post(8 * MAX_PENDING_BYTES, 3 * MAX_PENDING_BYTES)

    assert len(messages) >= 3


def test_pieces_wake_app_without_batch() -> None:
    messages = _messages_of_post(None, 64 * PIECE)

    assert min(messages[:-1]) < 256 * 1024


def test_pending_body_ready_at_batch() -> None:
    scope: dict[str, Any] = {"extensions": {BODY_BATCH: {"bytes": 10}}}
    pending = PendingBody()
    pending.append(b"x" * 9)
    assert not pending.ready(scope)

    pending.append(b"x")

    assert pending.ready(scope)


def test_pending_body_ready_when_full() -> None:
    scope: dict[str, Any] = {
        "extensions": {BODY_BATCH: {"bytes": 4 * MAX_PENDING_BYTES}}
    }
    pending = PendingBody()
    pending.append(b"x" * MAX_PENDING_BYTES)
    assert not pending.ready(scope)

    pending.append(b"x")

    assert pending.ready(scope)


def test_pending_body_ready_for_any_piece_without_batch() -> None:
    pending = PendingBody()
    pending.append(b"x")

    assert pending.ready({})
    assert pending.ready({"extensions": {BODY_BATCH: {}}})


def test_bytes_before_disconnect_reach_app() -> None:
    # Fewer bytes than the batch, then the client disconnects: the app still
    # gets them, so that it counts them as received, and then the disconnect.
    app = RecordingApp(MAX_PENDING_BYTES)
    head = (
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n"
    )
    with running(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + b"x" * 300_000)
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not app.disconnected and time.monotonic() < deadline:
            time.sleep(0.01)

    assert app.disconnected
    assert sum(app.messages) == 300_000
