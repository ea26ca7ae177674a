"""Minimal HTTP/1.1 client over one socket, for bulk blob transfers.

httpx parses bodies in 64 KiB reads through h11, which caps a single Python client
well below loopback speed. This client sends request bodies with os.sendfile or
sendall and discards response bodies with recv_into, so the server is what gets
measured. It supports only what the OCI blob endpoints need: Content-Length and
chunked responses, keep-alive and 1xx interim responses.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.urls import loopback_host_port

_READ_SIZE = 1 << 20
_MAX_HEAD = 64 * 1024
_MAX_KEPT_BODY = 1 << 20


@dataclass(frozen=True)
class FileBody:
    """A byte range of a file, sent with os.sendfile."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class StreamBody:
    """Chunks from an iterable whose total size is known in advance."""

    chunks: Iterable[bytes | bytearray | memoryview]
    length: int


Body = bytes | FileBody | StreamBody


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    body_length: int = 0

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class HttpProtocolError(Exception):
    pass


class RawConnection:
    """One keep-alive connection to a loopback HTTP server.

    Not thread-safe: give each thread its own connection.
    """

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.host, self.port = loopback_host_port(base_url)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._pending = bytearray()
        self._scratch = memoryview(bytearray(_READ_SIZE))

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._pending.clear()

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        keep_body: bool = True,
    ) -> RawResponse:
        """Send one request and read the whole response.

        `target` is the request-target (path and query). With keep_body=False the
        response body is counted and dropped. Otherwise up to 1 MiB of it is kept.
        """
        sock = self._connect()
        length = _body_length(body)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            sock.sendall(head)
            if body is not None:
                _send_body(sock, body)
        except (BrokenPipeError, ConnectionResetError):
            # The server may reject a request before reading its body. Its
            # response, if any, explains why, so read it before giving up.
            response = self._read_response(method, keep_body=True)
            self.close()
            return response
        response = self._read_response(method, keep_body)
        if _closes_connection(response):
            self.close()
        return response

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._pending.clear()
        return self._sock

    def _recv_some(self) -> int:
        assert self._sock is not None
        received = self._sock.recv_into(self._scratch)
        if received == 0:
            raise HttpProtocolError(
                f"connection to {self.host}:{self.port} closed mid-response"
            )
        return received

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            end = self._pending.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._pending) > _MAX_HEAD:
                raise HttpProtocolError("response head is larger than 64 KiB")
            received = self._recv_some()
            self._pending += self._scratch[:received]
        head = bytes(self._pending[:end]).decode("latin-1")
        del self._pending[: end + 4]
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HttpProtocolError(f"invalid status line: {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return int(parts[1]), headers

    def _read_response(self, method: str, keep_body: bool) -> RawResponse:
        status, headers = self._read_head()
        while 100 <= status < 200:
            status, headers = self._read_head()
        response = RawResponse(status, headers)
        if method == "HEAD" or status in (204, 304):
            return response
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._read_chunked(response, keep_body)
        elif "content-length" in headers:
            self._read_exact(response, int(headers["content-length"]), keep_body)
        else:
            self._read_to_close(response, keep_body)
        return response

    def _take(self, response: RawResponse, data: memoryview, keep_body: bool) -> None:
        response.body_length += len(data)
        if keep_body and len(response.body) < _MAX_KEPT_BODY:
            response.body += bytes(data[: _MAX_KEPT_BODY - len(response.body)])

    def _read_exact(self, response: RawResponse, length: int, keep_body: bool) -> None:
        buffered = min(length, len(self._pending))
        if buffered:
            self._take(response, memoryview(self._pending)[:buffered], keep_body)
            del self._pending[:buffered]
        remaining = length - buffered
        assert self._sock is not None
        while remaining > 0:
            view = self._scratch[: min(remaining, _READ_SIZE)]
            received = self._sock.recv_into(view)
            if received == 0:
                raise HttpProtocolError(
                    f"connection closed with {remaining} body bytes still expected"
                )
            self._take(response, view[:received], keep_body)
            remaining -= received

    def _read_line(self) -> bytes:
        while True:
            end = self._pending.find(b"\r\n")
            if end >= 0:
                line = bytes(self._pending[:end])
                del self._pending[: end + 2]
                return line
            received = self._recv_some()
            self._pending += self._scratch[:received]

    def _read_chunked(self, response: RawResponse, keep_body: bool) -> None:
        while True:
            size_line = self._read_line().split(b";", 1)[0].strip()
            size = int(size_line, 16)
            if size == 0:
                while self._read_line():
                    pass  # trailer fields end with an empty line
                return
            self._read_exact(response, size, keep_body)
            if self._read_line():
                raise HttpProtocolError("chunk data is not followed by CRLF")

    def _read_to_close(self, response: RawResponse, keep_body: bool) -> None:
        if self._pending:
            self._take(response, memoryview(self._pending), keep_body)
            self._pending.clear()
        assert self._sock is not None
        while True:
            received = self._sock.recv_into(self._scratch)
            if received == 0:
                break
            self._take(response, self._scratch[:received], keep_body)
        self.close()


def _body_length(body: Body | None) -> int:
    if body is None:
        return 0
    if isinstance(body, bytes):
        return len(body)
    return body.length


def _send_body(sock: socket.socket, body: Body) -> None:
    if isinstance(body, bytes):
        sock.sendall(body)
    elif isinstance(body, FileBody):
        # socket.sendfile uses os.sendfile and waits correctly on a socket that
        # has a timeout, which a bare os.sendfile loop would not.
        with open(body.path, "rb") as file:
            sent = sock.sendfile(file, body.offset, body.length)
        if sent != body.length:
            raise HttpProtocolError(
                f"{body.path} sent {sent} bytes from offset {body.offset}, "
                f"expected {body.length}"
            )
    else:
        sent_total = 0
        for chunk in body.chunks:
            sock.sendall(chunk)
            sent_total += len(chunk)
        if sent_total != body.length:
            raise HttpProtocolError(
                f"stream body sent {sent_total} bytes, declared {body.length}"
            )


def _closes_connection(response: RawResponse) -> bool:
    return "close" in response.headers.get("connection", "").lower()


def request_target(url: str) -> str:
    """Return the path and query of an absolute URL, for the request line."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")
