"""Blob downloads by zero-copy send, and requests that httptools rejects.

Most tests drive a real `cairn serve` process over raw sockets on 127.0.0.1.
The process is shared by the module and runs on SQLite, because what is
tested here is the HTTP layer. The in-process tests run uvicorn with
CairnHttpProtocol in a thread, so they can count os.sendfile calls (which
shows that blob GETs take the zero-copy path) and send zero-copy messages
from a test app. A client on loopback gets file bodies copied through a
buffer instead of by sendfile, so the in-process tests of sendfile use a
protocol with that copy turned off, and the cairn serve tests exercise the
copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
import uvicorn
import uvloop

from engine.api.app import create_app
from engine.api.pending_body import MAX_PENDING_PARTS
from engine.api.protocol import CairnHttpProtocol
from engine.api.server import bind_socket
from engine.domain.digest import Digest
from engine.registry import Registry
from tests.server import ServeProcess, push_blob, start_serve

REPOSITORY = "library/app"
# A client that pauses while reading this much fills the socket buffers, so
# the server's sends block and resume. LARGE_BLOB_SIZE is more than both
# buffers take at once with tcp_wmem and tcp_rmem maximums of 4 and 32 MiB.
BLOB_SIZE = 8 * 1024 * 1024 + 12345
LARGE_BLOB_SIZE = 64 * 1024 * 1024


@dataclass
class Blob:
    data: bytes
    digest: Digest

    @property
    def path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.digest}"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("zerocopy")
    (root / "data").mkdir()
    process = start_serve(
        root / "data", f"sqlite:///{root / 'cairn.db'}", root / "serve.log"
    )
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def blob(serve: ServeProcess) -> Blob:
    return _push(serve.url, os.urandom(BLOB_SIZE))


@pytest.fixture(scope="module")
def large_blob(serve: ServeProcess) -> Blob:
    return _push(serve.url, os.urandom(LARGE_BLOB_SIZE))


def _push(url: str, data: bytes) -> Blob:
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        digest = push_blob(client, REPOSITORY, data)
    return Blob(data, digest)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---- a raw HTTP/1.1 client -----------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def request_bytes(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


def read_response(reader: BinaryIO, method: str = "GET") -> RawResponse:
    """Read one response; the body by Content-Length, chunks or until EOF."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or status in (204, 304):
        return RawResponse(status, headers, b"")
    if "content-length" in headers:
        body = reader.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = _read_chunked(reader)
    else:
        body = reader.read()
    return RawResponse(status, headers, body)


def _read_chunked(reader: BinaryIO) -> bytes:
    body = bytearray()
    while size := int(reader.readline().strip(), 16):
        body += reader.read(size)
        assert reader.read(2) == b"\r\n"
    assert reader.readline() == b"\r\n"
    return bytes(body)


@contextmanager
def connection(url: str) -> Iterator[tuple[socket.socket, BinaryIO]]:
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=60)
    reader = sock.makefile("rb")
    try:
        yield sock, reader
    finally:
        reader.close()
        sock.close()


def get(url: str, path: str, *headers: str, method: str = "GET") -> RawResponse:
    with connection(url) as (sock, reader):
        sock.sendall(request_bytes(method, path, *headers))
        return read_response(reader, method)


# ---- blob downloads through `cairn serve` -------------------------------------


def test_whole_blob(serve: ServeProcess, blob: Blob) -> None:
    response = get(serve.url, blob.path)

    assert response.status == 200
    assert response.headers["content-length"] == str(BLOB_SIZE)
    assert response.headers["docker-content-digest"] == str(blob.digest)
    assert len(response.body) == BLOB_SIZE
    assert response.body == blob.data


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-1048575", 0, 1024 * 1024),
        ("bytes=3000000-5999999", 3_000_000, 6_000_000),
        ("bytes=5000000-", 5_000_000, BLOB_SIZE),
        ("bytes=-777777", BLOB_SIZE - 777_777, BLOB_SIZE),
        ("bytes=8000000-99999999", 8_000_000, BLOB_SIZE),
    ],
    ids=["start", "middle", "open-ended", "suffix", "past-the-end"],
)
def test_blob_range(
    serve: ServeProcess, blob: Blob, header: str, start: int, end: int
) -> None:
    response = get(serve.url, blob.path, f"Range: {header}")

    assert response.status == 206
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{BLOB_SIZE}"
    assert response.headers["content-length"] == str(end - start)
    assert response.body == blob.data[start:end]


def test_blob_range_unsatisfiable(serve: ServeProcess, blob: Blob) -> None:
    response = get(serve.url, blob.path, f"Range: bytes={BLOB_SIZE}-")

    assert response.status == 416
    assert response.headers["content-range"] == f"bytes */{BLOB_SIZE}"


def test_blob_head(serve: ServeProcess, blob: Blob) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("HEAD", blob.path))
        head = read_response(reader, "HEAD")
        # The same connection carries on, so the HEAD sent no body bytes.
        sock.sendall(request_bytes("GET", "/v2/"))
        after = read_response(reader)

    assert head.status == 200
    assert head.headers["content-length"] == str(BLOB_SIZE)
    assert head.body == b""
    assert after.status == 200
    assert after.body == b"{}"


def test_blob_not_modified(serve: ServeProcess, blob: Blob) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", blob.path, f'If-None-Match: "{blob.digest}"'))
        response = read_response(reader)
        sock.sendall(request_bytes("GET", "/v2/"))
        after = read_response(reader)

    assert response.status == 304
    assert "content-length" not in response.headers
    assert after.status == 200


def test_keep_alive_after_zero_copy_body(serve: ServeProcess, blob: Blob) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", blob.path))
        first = read_response(reader)
        sock.sendall(request_bytes("GET", blob.path, "Range: bytes=10-19"))
        second = read_response(reader)

    assert first.body == blob.data
    assert second.status == 206
    assert second.body == blob.data[10:20]


def test_pipelined_requests_after_zero_copy_body(
    serve: ServeProcess, blob: Blob
) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(
            request_bytes("GET", blob.path)
            + request_bytes("GET", blob.path, "Range: bytes=-100")
            + request_bytes("HEAD", blob.path)
            + request_bytes("GET", "/v2/")
        )
        responses = [
            read_response(reader),
            read_response(reader),
            read_response(reader, "HEAD"),
            read_response(reader),
        ]

    assert [response.status for response in responses] == [200, 206, 200, 200]
    assert responses[0].body == blob.data
    assert responses[1].body == blob.data[-100:]
    assert responses[2].body == b""
    assert responses[3].body == b"{}"


def test_slow_reader_gets_every_byte(serve: ServeProcess, blob: Blob) -> None:
    # Pauses longer than THREAD_WRITABLE_WAIT_MS, so the event loop waits for
    # the socket between sendfile calls.
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", blob.path))
        status_line = reader.readline()
        while reader.readline() != b"\r\n":
            pass
        body = bytearray()
        for _ in range(4):
            time.sleep(0.3)
            body += reader.read(1024 * 1024)
        body += reader.read(BLOB_SIZE - len(body))

    assert status_line.startswith(b"HTTP/1.1 200")
    assert len(body) == BLOB_SIZE
    assert body == blob.data


def test_client_closing_mid_body(serve: ServeProcess, large_blob: Blob) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", large_blob.path))
        assert reader.readline().startswith(b"HTTP/1.1 200")
        while reader.readline() != b"\r\n":
            pass
        assert len(reader.read(4 * 1024 * 1024)) == 4 * 1024 * 1024
    # Closing with unread bytes in the receive buffer sends a reset.

    record = _wait_for_request_log(serve, large_blob.path, 499)
    after = get(serve.url, large_blob.path)

    # The log counts what the kernel took, which is at least what was read.
    assert record["bytes_out"] >= 4 * 1024 * 1024
    assert record["bytes_out"] < LARGE_BLOB_SIZE
    assert after.status == 200
    assert hashlib.sha256(after.body).hexdigest() == large_blob.digest.encoded
    assert serve.process.poll() is None
    assert "Traceback" not in serve.log_path.read_text()


@pytest.fixture
def own_serve(tmp_path: Path) -> Iterator[ServeProcess]:
    """A `cairn serve` for one test only, because the truncated blob that it
    serves logs a traceback, and other tests check that the module's shared
    server logged none."""
    (tmp_path / "data").mkdir()
    process = start_serve(
        tmp_path / "data", f"sqlite:///{tmp_path / 'cairn.db'}", tmp_path / "serve.log"
    )
    try:
        yield process
    finally:
        process.kill()


def test_truncated_blob_file_ends_body_early(own_serve: ServeProcess) -> None:
    """A blob file cut short while its response is sent ends the body early.

    A file already short when the request comes gets 404 instead, so the
    file is cut once the headers have arrived. The client reads nothing
    more until then, so the server can have sent only what the socket
    buffers and its copy buffer hold, a few MiB, far less than kept_size.
    """
    serve = own_serve
    truncated = _push(serve.url, os.urandom(LARGE_BLOB_SIZE))
    kept_size = 32 * 1024 * 1024
    data_dir = serve.log_path.parent / "data"
    encoded = truncated.digest.encoded
    blob_file = data_dir / "blobs" / "sha256" / encoded[:2] / encoded

    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", truncated.path))
        status_line = reader.readline()
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        os.truncate(blob_file, kept_size)
        body = reader.read()

    record = _wait_for_request_log(serve, truncated.path, 200)

    assert status_line.startswith(b"HTTP/1.1 200")
    assert headers["content-length"] == str(LARGE_BLOB_SIZE)
    assert body == truncated.data[:kept_size]
    assert record["bytes_out"] == kept_size
    assert "response_failed" in serve.log_path.read_text()
    assert serve.process.poll() is None


def _wait_for_request_log(
    serve: ServeProcess, path: str, status: int, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in serve.log_path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if (
                record.get("event") == "request_finished"
                and record.get("path") == path
                and record.get("status") == status
            ):
                return dict(record)
        time.sleep(0.1)
    raise AssertionError(f"no request_finished with status {status} for {path}")


# ---- requests that httptools rejects --------------------------------------------


REJECTED = [
    pytest.param(
        b"BREW /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "unsupported HTTP method",
        {"part": "method", "value": "BREW", "reason": "Invalid method encountered"},
        id="unknown-method",
    ),
    pytest.param(
        b"PUT /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12abc\r\n\r\n",
        "invalid Content-Length header",
        {"part": "header", "header": "Content-Length", "value": "12abc"},
        id="malformed-content-length",
    ),
    pytest.param(
        b"PUT /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        "invalid Content-Length header",
        {"part": "header", "header": "Content-Length", "value": "-1"},
        id="negative-content-length",
    ),
    pytest.param(
        b"PUT /v2/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "invalid Content-Length header",
        {"part": "header", "header": "Content-Length", "value": "1, 2"},
        id="duplicate-content-length",
    ),
    pytest.param(
        b"GET /v2/\xc3\xa9/tags/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid characters in the request path",
        {"part": "path", "value": "/v2/\\xc3\\xa9/tags/list"},
        id="non-ascii-path",
    ),
    pytest.param(
        b"GET /v2/_catalog?n=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid characters in the request query",
        {"part": "query", "value": "/v2/_catalog?n=\\xff"},
        id="non-ascii-query",
    ),
    pytest.param(
        b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: 1\r\n\r\n",
        "invalid header",
        {"part": "header", "header": "Bad Header", "reason": "Invalid header token"},
        id="space-in-header-name",
    ),
    pytest.param(
        b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x01b\r\n\r\n",
        "invalid header",
        {"part": "header", "header": "X-Note", "value": "a\\x01b"},
        id="control-character-in-header-value",
    ),
    pytest.param(
        b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nNoColon\r\n\r\n",
        "invalid header",
        {"part": "header", "header": "NoColon"},
        id="header-without-colon",
    ),
    pytest.param(
        b"GET /v2/ HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid HTTP version",
        {"part": "version", "value": "HTTP/9.9"},
        id="unknown-version",
    ),
    pytest.param(
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "invalid request target",
        {"part": "target", "value": "127.0.0.1:443"},
        id="authority-form-target",
    ),
]


@pytest.mark.parametrize(("raw", "message", "detail"), REJECTED)
def test_rejected_request_gets_oci_400(
    serve: ServeProcess, raw: bytes, message: str, detail: dict[str, str]
) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(raw)
        response = read_response(reader)
        # The server closes the connection after the 400.
        assert reader.read() == b""

    assert response.status == 400
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    errors = json.loads(response.body)["errors"]
    assert len(errors) == 1
    assert errors[0]["code"] == "UNSUPPORTED"
    assert errors[0]["message"] == message
    assert errors[0]["detail"]["reason"]
    for key, value in detail.items():
        assert errors[0]["detail"].get(key) == value, key


def test_rejected_request_is_logged(serve: ServeProcess) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(b"BREW /v2/logged HTTP/1.1\r\n\r\n")
        assert read_response(reader).status == 400

    def brew_records() -> list[dict[str, Any]]:
        lines = serve.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if (r.get("detail") or {}).get("value") == "BREW"]

    deadline = time.monotonic() + 30
    while not brew_records():
        assert time.monotonic() < deadline, "no request_rejected log line"
        time.sleep(0.1)
    records = brew_records()
    assert records[-1]["event"] == "request_rejected"
    assert records[-1]["level"] == "warning"


def _log_records(serve: ServeProcess, event: str) -> list[dict[str, Any]]:
    records = []
    for line in serve.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                records.append(record)
    return records


def test_tls_handshake_logged_at_info(serve: ServeProcess) -> None:
    # The start of a TLS 1.2 ClientHello record.
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    rejected_before = len(_log_records(serve, "request_rejected"))
    with connection(serve.url) as (sock, reader):
        sock.sendall(client_hello)
        assert read_response(reader).status == 400

    deadline = time.monotonic() + 30
    while not (records := _log_records(serve, "tls_handshake_rejected")):
        assert time.monotonic() < deadline, "no tls_handshake_rejected log line"
        time.sleep(0.1)
    assert records[-1]["level"] == "info"
    assert records[-1]["remote"] == "127.0.0.1"
    assert len(_log_records(serve, "request_rejected")) == rejected_before


def test_invalid_chunk_in_request_body(serve: ServeProcess) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(
            b"PUT /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        response = read_response(reader)
        assert reader.read() == b""

    assert response.status == 400
    error = json.loads(response.body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"] == "invalid chunked request body"
    assert error["detail"]["part"] == "body"


def test_body_of_one_byte_chunks(serve: ServeProcess) -> None:
    # Each chunk reaches the app as its own piece of body, so the server
    # stops reading after MAX_PENDING_PARTS of them until the app takes them.
    data = os.urandom(3 * MAX_PENDING_PARTS + 7)
    started = httpx.post(f"{serve.url}/v2/library/tiny/blobs/uploads/", timeout=30)
    assert started.status_code == 202
    location = httpx.URL(serve.url).join(started.headers["Location"])
    target = location.raw_path.decode()
    chunks = b"".join(b"1\r\n" + data[i : i + 1] + b"\r\n" for i in range(len(data)))
    with connection(serve.url) as (sock, reader):
        sock.sendall(
            request_bytes("PATCH", target, "Transfer-Encoding: chunked")
            + chunks
            + b"0\r\n\r\n"
        )
        patched = read_response(reader, "PATCH")

    assert patched.status == 202, patched.body
    assert patched.headers["range"] == f"0-{len(data) - 1}"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    # The Location names the Host header's 127.0.0.1 without the port.
    next_path = httpx.URL(patched.headers["location"]).raw_path.decode()
    finished = httpx.put(
        f"{serve.url}{next_path}", params={"digest": digest}, timeout=30
    )
    assert finished.status_code == 201, finished.text
    pulled = httpx.get(f"{serve.url}/v2/library/tiny/blobs/{digest}", timeout=30)
    assert pulled.content == data


def _assert_headers_too_large(response: RawResponse) -> None:
    assert response.status == 431
    error = json.loads(response.body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"] == "request headers too large"
    assert error["detail"]["part"] == "header"
    assert error["detail"]["reason"] == "request headers exceed 65536 bytes"
    assert error["detail"]["limit"] == 65536


def test_many_headers_rejected(serve: ServeProcess) -> None:
    headers = [f"X-Filler-{i}: {'a' * 1000}" for i in range(100)]
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", "/v2/", *headers))
        response = read_response(reader)
        assert reader.read() == b""
    _assert_headers_too_large(response)


def test_endless_header_rejected(serve: ServeProcess) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        # One header value arrives in pieces and never ends.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(64):
                sock.sendall(b"a" * 65536)
                time.sleep(0.01)
        response = read_response(reader)
    _assert_headers_too_large(response)


def test_headers_under_limit_accepted(serve: ServeProcess) -> None:
    headers = [f"X-Filler-{i}: {'a' * 1000}" for i in range(60)]
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", "/v2/", *headers))
        assert read_response(reader).status == 200


# httptools.parse_url, which uvicorn runs on every target, rejects a longer
# one.
TARGET_LIMIT = 65535


def _assert_target_too_long(response: RawResponse) -> dict[str, Any]:
    assert response.status == 414
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    errors = json.loads(response.body)["errors"]
    assert len(errors) == 1
    assert errors[0]["code"] == "UNSUPPORTED"
    assert errors[0]["message"] == "request target too long"
    detail: dict[str, Any] = errors[0]["detail"]
    assert detail["part"] == "target"
    assert detail["reason"] == f"request target exceeds {TARGET_LIMIT} bytes"
    assert detail["limit"] == TARGET_LIMIT
    return detail


def test_long_target_rejected(serve: ServeProcess) -> None:
    path = "/v2/" + "a" * (TARGET_LIMIT - len("/v2/") + 1)
    with connection(serve.url) as (sock, reader):
        sock.sendall(request_bytes("GET", path))
        response = read_response(reader)
        assert reader.read() == b""

    detail = _assert_target_too_long(response)
    assert detail["value"] == path[:200] + "..."


def test_endless_target_rejected(serve: ServeProcess) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(b"GET /v2/_catalog?n=1&pad=")
        # The target arrives in pieces and never ends.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(64):
                sock.sendall(b"a" * 16384)
                time.sleep(0.01)
        response = read_response(reader)
    _assert_target_too_long(response)


def test_target_at_limit_accepted(serve: ServeProcess) -> None:
    query = "?pad=" + "a" * (TARGET_LIMIT - len("/v2/_catalog?pad="))
    path = "/v2/_catalog" + query
    assert len(path) == TARGET_LIMIT

    response = get(serve.url, path)

    assert response.status == 200, response.body[:500]
    assert "repositories" in json.loads(response.body)


def test_rejection_waits_for_pipelined_responses(
    serve: ServeProcess, blob: Blob
) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(
            request_bytes("GET", blob.path)
            + request_bytes("GET", "/v2/")
            + b"BREW /v2/ HTTP/1.1\r\n\r\n"
        )
        first = read_response(reader)
        second = read_response(reader)
        rejected = read_response(reader)
        assert reader.read() == b""

    assert first.status == 200
    assert first.body == blob.data
    assert second.body == b"{}"
    assert rejected.status == 400
    assert json.loads(rejected.body)["errors"][0]["detail"]["part"] == "method"


def test_server_still_serves_after_rejections(serve: ServeProcess, blob: Blob) -> None:
    for raw in (b"BREW / HTTP/1.1\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n"):
        with connection(serve.url) as (sock, reader):
            sock.sendall(raw)
            assert read_response(reader).status == 400

    response = get(serve.url, blob.path, "Range: bytes=0-99")

    assert response.status == 206
    assert response.body == blob.data[:100]


# ---- the protocol in-process ---------------------------------------------------


class SendfileProtocol(CairnHttpProtocol):
    """The protocol as it serves a client on another host: with sendfile."""

    copy_on_loopback = False


@contextmanager
def protocol_server(
    app: Any, protocol: type[CairnHttpProtocol] = SendfileProtocol
) -> Iterator[str]:
    """Serve ``app`` with ``protocol`` on 127.0.0.1 from a thread."""
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app,
        loop="none",
        http=protocol,
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
    )
    server = uvicorn.Server(config)

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the in-process server exited during start-up"
        assert time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the byte count that each os.sendfile call sent."""
    calls: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: Any, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    return calls


def test_app_sends_blob_by_sendfile(
    registry: Registry, sendfile_calls: list[int]
) -> None:
    data = os.urandom(BLOB_SIZE)
    with protocol_server(create_app(registry)) as url:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            digest = push_blob(client, REPOSITORY, data)
        path = f"/v2/{REPOSITORY}/blobs/{digest}"
        whole = get(url, path)
        ranged = get(url, path, "Range: bytes=1000-1999")

    assert whole.body == data
    assert ranged.body == data[1000:2000]
    assert sum(sendfile_calls) == BLOB_SIZE + 1000


def test_loopback_client_gets_copied_body(
    registry: Registry, sendfile_calls: list[int]
) -> None:
    data = os.urandom(BLOB_SIZE)
    with protocol_server(create_app(registry), CairnHttpProtocol) as url:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            digest = push_blob(client, REPOSITORY, data)
        path = f"/v2/{REPOSITORY}/blobs/{digest}"
        whole = get(url, path)
        ranged = get(url, path, "Range: bytes=1000-1999")

    assert whole.body == data
    assert ranged.body == data[1000:2000]
    assert sendfile_calls == []


def _file_app(
    path: Path, send_body: Callable[[Any, BinaryIO], Any], headers: list[Any]
) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "http.response.zerocopysend" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with open(path, "rb") as file:
            await send_body(send, file)

    return app


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "payload"
    path.write_bytes(data)
    return path, data


def test_zerocopy_mixed_with_body_messages(
    payload: tuple[Path, bytes], sendfile_calls: list[int]
) -> None:
    path, data = payload
    # More than the socket takes at once, so the transport still buffers part
    # of it when the zero-copy send starts, and that part must go first.
    head = os.urandom(16 * 1024 * 1024)
    expected = head + data[10:2_000_010] + b"tail"

    async def send_body(send: Any, file: BinaryIO) -> None:
        await send({"type": "http.response.body", "body": head, "more_body": True})
        await send(
            {
                "type": "http.response.zerocopysend",
                "file": file,
                "offset": 10,
                "count": 2_000_000,
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b"tail"})

    headers = [(b"content-length", str(len(expected)).encode())]
    with protocol_server(_file_app(path, send_body, headers)) as url:
        response = get(url, "/")

    assert len(response.body) == len(expected)
    assert response.body == expected
    assert sum(sendfile_calls) == 2_000_000


def test_zerocopy_defaults_to_file_position_and_end(
    payload: tuple[Path, bytes], sendfile_calls: list[int]
) -> None:
    path, data = payload

    async def send_body(send: Any, file: BinaryIO) -> None:
        file.seek(100)
        await send(
            {"type": "http.response.zerocopysend", "file": file, "more_body": True}
        )
        # Without an offset the send starts at, and moves, the file position.
        assert file.tell() == len(data)
        await send({"type": "http.response.body", "body": b""})

    headers = [(b"content-length", str(len(data) - 100).encode())]
    with protocol_server(_file_app(path, send_body, headers)) as url:
        response = get(url, "/")

    assert response.body == data[100:]
    assert sum(sendfile_calls) == len(data) - 100


def test_zerocopy_with_chunked_encoding(payload: tuple[Path, bytes]) -> None:
    path, data = payload

    async def send_body(send: Any, file: BinaryIO) -> None:
        for offset in (0, 1_000_000):
            await send(
                {
                    "type": "http.response.zerocopysend",
                    "file": file.fileno(),
                    "offset": offset,
                    "count": 1_000_000,
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})

    with protocol_server(_file_app(path, send_body, [])) as url:
        response = get(url, "/")

    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == data[:2_000_000]


def test_zerocopy_longer_than_content_length_fails(
    payload: tuple[Path, bytes], sendfile_calls: list[int]
) -> None:
    path, _ = payload
    errors: list[BaseException] = []

    async def send_body(send: Any, file: BinaryIO) -> None:
        try:
            await send({"type": "http.response.zerocopysend", "file": file})
        except RuntimeError as error:
            errors.append(error)
            raise

    headers = [(b"content-length", b"10")]
    with (
        protocol_server(_file_app(path, send_body, headers)) as url,
        connection(url) as (sock, reader),
    ):
        sock.sendall(request_bytes("GET", "/"))
        status_line = reader.readline()
        while reader.readline() not in (b"\r\n", b""):
            pass
        rest = reader.read()

    assert status_line.startswith(b"HTTP/1.1 200")
    assert rest == b""
    assert [str(error) for error in errors] == [
        "Response content longer than Content-Length"
    ]
    assert sendfile_calls == []
