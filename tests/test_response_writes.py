"""How a request cycle's transport proxy writes a response: the head goes
out with the first body bytes in one writelines call, a head whose body
writes nothing goes out alone, and a close sends a kept head first."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from engine.api.protocol import _CycleTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, chunks: Any) -> None:
        self.calls.append(("writelines", tuple(chunks)))

    def get_write_buffer_size(self) -> int:
        return 0


def _proxy() -> tuple[_CycleTransport, RecordingTransport, list[str]]:
    recorded = RecordingTransport()
    closes: list[str] = []
    proxy = _CycleTransport(
        cast(asyncio.Transport, recorded), lambda: closes.append("close")
    )
    return proxy, recorded, closes


def test_head_sent_with_first_body() -> None:
    proxy, recorded, _ = _proxy()
    proxy.hold_head()
    proxy.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert recorded.calls == []
    proxy.write(b"{}")
    proxy.write(b"more")

    assert recorded.calls == [
        ("writelines", (b"HTTP/1.1 200 OK\r\n\r\n", b"{}")),
        ("write", b"more"),
    ]


def test_empty_body_sends_head_alone() -> None:
    proxy, recorded, _ = _proxy()
    proxy.hold_head()
    proxy.write(b"HTTP/1.1 201 Created\r\n\r\n")
    proxy.write(b"")

    assert recorded.calls == [("write", b"HTTP/1.1 201 Created\r\n\r\n")]


def test_flush_sends_head_without_body() -> None:
    proxy, recorded, _ = _proxy()
    proxy.hold_head()
    proxy.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    proxy.flush_head()
    proxy.flush_head()

    assert recorded.calls == [
        ("write", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    ]


def test_close_sends_kept_head_first() -> None:
    proxy, recorded, closes = _proxy()
    proxy.hold_head()
    proxy.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    proxy.close()

    assert recorded.calls == [("write", b"HTTP/1.1 500 Internal Server Error\r\n\r\n")]
    assert closes == ["close"]


def test_writes_pass_through_unheld() -> None:
    proxy, recorded, _ = _proxy()
    proxy.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    assert recorded.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
    assert proxy.get_write_buffer_size() == 0
