"""Idle timeouts: request bodies that stop arriving, clients that stop reading.

Most tests drive one `cairn serve` process, started with read and write
idle timeouts of 1 s, over raw sockets on 127.0.0.1, and check what the
server did: that it closed the connection, what it logged and what it
stored. Every wait has a bound of 30 s, far above the timeouts, and no test
checks how soon a timeout fired. The tests that need an app which waits
before it reads, or which streams its body, run CairnHttpProtocol
in-process with a test app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.api.app import IDLE_TIMEOUT
from engine.api.options import DEFAULT_READ_IDLE_TIMEOUT, DEFAULT_WRITE_IDLE_TIMEOUT
from engine.api.protocol import configured_protocol
from engine.cli import build_parser
from engine.domain.digest import Digest
from tests.server import (
    ServeProcess,
    log_records,
    push_blob,
    running,
    start_serve,
    wait_for_log_record,
)

IDLE_TIMEOUT_S = "1"
BOUND_S = 30.0
MIB = 1024 * 1024
# More than the socket buffers of both ends take at once, so a client that
# stops reading leaves the server with bytes it cannot send.
LARGE_BLOB_SIZE = 64 * MIB


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("timeouts")
    (root / "data").mkdir()
    process = start_serve(
        root / "data",
        f"sqlite:///{root / 'cairn.db'}",
        root / "serve.log",
        "--read-idle-timeout",
        IDLE_TIMEOUT_S,
        "--write-idle-timeout",
        IDLE_TIMEOUT_S,
    )
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def client(serve: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.url, timeout=120, trust_env=False) as client:
        yield client


def _data_dir(serve: ServeProcess) -> Path:
    return serve.log_path.parent / "data"


def _staging_files(serve: ServeProcess) -> set[str]:
    return {path.name for path in (_data_dir(serve) / "uploads").iterdir()}


def _events(client: httpx.Client, repository: str) -> list[dict[str, Any]]:
    response = client.get("/_cairn/events", params={"repository": repository})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


# ---- a raw HTTP/1.1 client -------------------------------------------------------


@contextmanager
def connection(serve: ServeProcess) -> Iterator[socket.socket]:
    port = int(serve.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    try:
        yield sock
    finally:
        sock.close()


def request_head(method: str, path: str, request_id: str, *headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"X-Request-Id: {request_id}",
        *headers,
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Read until the server closes the connection; return what it sent."""
    received = bytearray()
    try:
        while chunk := sock.recv(1024 * 1024):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(
            f"the server kept the connection open for {BOUND_S:g} s"
        ) from None
    return bytes(received)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head; return it and the body bytes read with it."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the response head: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


def _assert_408(sent_back: bytes, message: str) -> dict[str, Any]:
    """Check that ``sent_back`` is a 408 that closes the connection, with an
    OCI error body; return the error's detail."""
    head, _, body = sent_back.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "UNKNOWN"
    assert error["message"] == message
    assert error["detail"]["idle_timeout_s"] == float(IDLE_TIMEOUT_S)
    detail: dict[str, Any] = error["detail"]
    return detail


def _assert_body_408(
    sent_back: bytes, received: int, content_length: int | None
) -> None:
    detail = _assert_408(
        sent_back, "timed out waiting for the rest of the request body"
    )
    assert detail["bytes_received"] == received
    assert detail.get("content_length") == content_length


def _assert_body_timed_out(
    serve: ServeProcess, request_id: str, method: str, path: str, received: int
) -> None:
    timed_out = wait_for_log_record(
        serve.log_path, "request_body_timed_out", request_id=request_id
    )
    finished = wait_for_log_record(
        serve.log_path, "request_finished", request_id=request_id
    )

    assert timed_out["level"] == "warning"
    assert timed_out["method"] == method
    assert timed_out["path"] == path
    assert timed_out["bytes_received"] == received
    assert timed_out["timeout_s"] == float(IDLE_TIMEOUT_S)
    assert finished["status"] == 408
    assert finished["bytes_in"] == received


# ---- request bodies that stop arriving ------------------------------------------


def test_stalled_single_request_push_stores_nothing(
    serve: ServeProcess, client: httpx.Client
) -> None:
    repository = "stalled/single"
    data = os.urandom(2 * MIB)
    digest = Digest.of(data)
    path = f"/v2/{repository}/blobs/uploads/"
    staged_before = _staging_files(serve)

    with connection(serve) as sock:
        sock.sendall(
            request_head(
                "POST",
                f"{path}?digest={digest}",
                "stalled-single",
                f"Content-Length: {len(data)}",
            )
            + data[:300_000]
        )
        sent_back = read_until_closed(sock)

    _assert_body_408(sent_back, 300_000, len(data))
    _assert_body_timed_out(serve, "stalled-single", "POST", path, 300_000)
    assert client.head(f"/v2/{repository}/blobs/{digest}").status_code == 404
    assert _events(client, repository) == []
    assert _staging_files(serve) == staged_before
    assert "Traceback" not in serve.log_path.read_text()


def test_stalled_monolithic_put_stores_nothing(
    serve: ServeProcess, client: httpx.Client
) -> None:
    repository = "stalled/monolithic"
    data = os.urandom(2 * MIB)
    digest = Digest.of(data)
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202
    path = httpx.URL(started.headers["Location"]).path

    with connection(serve) as sock:
        sock.sendall(
            request_head(
                "PUT",
                f"{path}?digest={digest}",
                "stalled-monolithic",
                f"Content-Length: {len(data)}",
            )
            + data[:500_000]
        )
        sent_back = read_until_closed(sock)

    _assert_body_408(sent_back, 500_000, len(data))
    _assert_body_timed_out(serve, "stalled-monolithic", "PUT", path, 500_000)
    assert client.head(f"/v2/{repository}/blobs/{digest}").status_code == 404
    assert _events(client, repository) == []
    # The session is still there, at offset 0, so the client can start again.
    status = client.get(path)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-0"


def test_stalled_chunk_keeps_earlier_chunks(
    serve: ServeProcess, client: httpx.Client
) -> None:
    repository = "stalled/chunked"
    data = os.urandom(3 * MIB)
    digest = Digest.of(data)
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    path = httpx.URL(started.headers["Location"]).path
    first = client.patch(
        path, content=data[:MIB], headers={"Content-Range": f"0-{MIB - 1}"}
    )
    assert first.status_code == 202

    with connection(serve) as sock:
        sock.sendall(
            request_head(
                "PATCH",
                path,
                "stalled-chunk",
                f"Content-Length: {MIB}",
                f"Content-Range: {MIB}-{2 * MIB - 1}",
            )
            + data[MIB : MIB + 100_000]
        )
        sent_back = read_until_closed(sock)

    _assert_body_408(sent_back, 100_000, MIB)
    _assert_body_timed_out(serve, "stalled-chunk", "PATCH", path, 100_000)
    status = client.get(path)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{MIB - 1}"
    rest = client.put(
        path,
        params={"digest": str(digest)},
        content=data[MIB:],
        headers={"Content-Range": f"{MIB}-{len(data) - 1}"},
    )
    assert rest.status_code == 201, rest.text
    assert client.get(f"/v2/{repository}/blobs/{digest}").content == data


def test_stalled_chunked_encoding_body(
    serve: ServeProcess, client: httpx.Client
) -> None:
    repository = "stalled/transfer-encoding"
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    path = httpx.URL(started.headers["Location"]).path
    chunk = os.urandom(40_000)

    with connection(serve) as sock:
        sock.sendall(
            request_head("PATCH", path, "stalled-te", "Transfer-Encoding: chunked")
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n"
        )
        sent_back = read_until_closed(sock)

    _assert_body_408(sent_back, len(chunk), None)
    _assert_body_timed_out(serve, "stalled-te", "PATCH", path, len(chunk))
    assert client.get(path).headers["Range"] == "0-0"


def test_stalled_manifest_put_stores_nothing(
    serve: ServeProcess, client: httpx.Client
) -> None:
    repository = "stalled/manifest"
    path = f"/v2/{repository}/manifests/v1"

    with connection(serve) as sock:
        sock.sendall(
            request_head(
                "PUT",
                path,
                "stalled-manifest",
                "Content-Type: application/vnd.oci.image.manifest.v1+json",
                "Content-Length: 2000",
            )
            + b'{"schemaVersion": 2, '
        )
        sent_back = read_until_closed(sock)

    _assert_body_408(sent_back, 21, 2000)
    _assert_body_timed_out(serve, "stalled-manifest", "PUT", path, 21)
    assert client.get(path).status_code == 404
    assert client.get(f"/v2/{repository}/tags/list").status_code == 404
    assert _events(client, repository) == []


def test_slow_steady_body_is_not_cut(serve: ServeProcess) -> None:
    # Pieces 0.4 s apart, for 3.2 s in all: well past the 1 s timeout, but
    # never 1 s without a byte.
    pieces = [os.urandom(10_000) for _ in range(8)]
    data = b"".join(pieces)
    digest = Digest.of(data)
    path = f"/v2/slow/steady/blobs/uploads/?digest={digest}"

    with connection(serve) as sock:
        sock.sendall(
            request_head("POST", path, "slow-steady", f"Content-Length: {len(data)}")
        )
        for piece in pieces:
            time.sleep(0.4)
            sock.sendall(piece)
        head, _ = read_head(sock)

    assert head.startswith(b"HTTP/1.1 201 "), head
    timed_out = log_records(
        serve.log_path, "request_body_timed_out", request_id="slow-steady"
    )
    assert timed_out == []


@pytest.fixture
def limited_serve(tmp_path: Path) -> Iterator[ServeProcess]:
    """A `cairn serve` with a 1 KiB maximum blob size and a 1 s read idle timeout."""
    (tmp_path / "data").mkdir()
    process = start_serve(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'cairn.db'}",
        tmp_path / "serve.log",
        "--read-idle-timeout",
        IDLE_TIMEOUT_S,
        "--max-blob-size",
        "1KiB",
    )
    try:
        yield process
    finally:
        process.kill()


# One piece of a chunked body: 500 bytes, so three pass the 1 KiB maximum.
_BODY_PIECE = b"1f4\r\n" + b"x" * 500 + b"\r\n"


def _start_oversized_push(sock: socket.socket, request_id: str) -> None:
    digest = Digest.of(b"a blob that is never stored")
    path = f"/v2/drained/body/blobs/uploads/?digest={digest}"
    sock.sendall(request_head("POST", path, request_id, "Transfer-Encoding: chunked"))


def test_body_drained_after_413_is_not_idle(limited_serve: ServeProcess) -> None:
    # Pieces 0.4 s apart: the third passes the maximum and gets the 413,
    # and the server then drains the body for up to LINGER_SECONDS. The
    # client sends for 3.2 s more, well past the 1 s read idle timeout but
    # within the linger, and reads only after it has sent the whole body.
    send_errors: list[OSError] = []

    with connection(limited_serve) as sock:
        _start_oversized_push(sock, "drained-body")
        try:
            for _ in range(11):
                sock.sendall(_BODY_PIECE)
                time.sleep(0.4)
            sock.sendall(b"0\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            send_errors.append(error)
        sent_back = read_until_closed(sock)

    finished = wait_for_log_record(
        limited_serve.log_path, "request_finished", request_id="drained-body"
    )
    assert send_errors == []
    assert sent_back.startswith(b"HTTP/1.1 413 "), sent_back
    assert b"SIZE_INVALID" in sent_back
    assert finished["status"] == 413
    assert log_records(limited_serve.log_path, "request_body_timed_out") == []


def test_drain_after_413_ends_when_client_stops(
    limited_serve: ServeProcess,
) -> None:
    # The request has its 413, so a client that then stops sending ends the
    # drain after the read idle timeout, before LINGER_SECONDS, without a
    # request_body_timed_out warning for that request.
    send_errors: list[OSError] = []

    with connection(limited_serve) as sock:
        _start_oversized_push(sock, "stopped-body")
        for _ in range(3):
            sock.sendall(_BODY_PIECE)
        # This returns at the server's FIN, which follows the response.
        sent_back = read_until_closed(sock)
        time.sleep(2.5)
        # The first send to a closed connection gets a reset back, and a
        # later one fails.
        for _ in range(10):
            try:
                sock.sendall(_BODY_PIECE)
            except OSError as error:
                send_errors.append(error)
                break
            time.sleep(0.1)

    finished = wait_for_log_record(
        limited_serve.log_path, "request_finished", request_id="stopped-body"
    )
    assert sent_back.startswith(b"HTTP/1.1 413 "), sent_back
    assert len(send_errors) == 1
    assert finished["status"] == 413
    assert log_records(limited_serve.log_path, "request_body_timed_out") == []


def _body_counting_app(wait_s: float, outcome: dict[str, Any]) -> Any:
    """Return an app that waits ``wait_s`` before it reads the body, then
    responds with 200 and the number of body bytes it read."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(wait_s)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                outcome["disconnected"] = True
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        outcome["size"] = size
        body = str(size).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_wait_for_100_continue_is_not_idle() -> None:
    outcome: dict[str, Any] = {}
    app = _body_counting_app(2.0, outcome)
    protocol = configured_protocol(read_idle_timeout=0.5, write_idle_timeout=None)

    with (
        running(app, protocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S) as sock,
    ):
        sock.sendall(
            request_head(
                "PUT",
                "/",
                "expect-continue",
                "Content-Length: 5",
                "Expect: 100-continue",
            )
        )
        interim, _ = read_head(sock)
        sock.sendall(b"hello")
        head, body = read_head(sock)

    assert interim == b"HTTP/1.1 100 Continue"
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert body == b"5"
    assert "disconnected" not in outcome


def test_full_body_buffer_is_not_idle() -> None:
    # The server stops reading after 1 MiB that the app has not taken, so
    # the client cannot send the rest, however long the app waits.
    outcome: dict[str, Any] = {}
    app = _body_counting_app(2.0, outcome)
    protocol = configured_protocol(read_idle_timeout=0.5, write_idle_timeout=None)
    data = os.urandom(16 * MIB)

    with (
        running(app, protocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S) as sock,
    ):
        sender = threading.Thread(
            target=sock.sendall,
            args=(
                request_head("PUT", "/", "full-buffer", f"Content-Length: {len(data)}")
                + data,
            ),
        )
        sender.start()
        head, body = read_head(sock)
        sender.join(BOUND_S)

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert body == str(len(data)).encode()
    assert "disconnected" not in outcome


# ---- requests whose head never ends ---------------------------------------------


def test_partial_head_times_out(serve: ServeProcess) -> None:
    before = len(log_records(serve.log_path, "request_head_timed_out"))

    with connection(serve) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: ")
        sent_back = read_until_closed(sock)

    _assert_408(sent_back, "timed out waiting for the rest of the request head")
    records = wait_for_records(serve, "request_head_timed_out", before + 1)
    assert records[-1]["partial_head"] is True
    assert records[-1]["remote"] == "127.0.0.1"


def test_silent_connection_times_out(serve: ServeProcess) -> None:
    before = len(log_records(serve.log_path, "request_head_timed_out"))

    with connection(serve) as sock:
        sent_back = read_until_closed(sock)

    assert sent_back == b""
    records = wait_for_records(serve, "request_head_timed_out", before + 1)
    assert records[-1]["partial_head"] is False


def wait_for_records(
    serve: ServeProcess, event: str, count: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + BOUND_S
    records = log_records(serve.log_path, event)
    while len(records) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        records = log_records(serve.log_path, event)
    assert len(records) == count, records
    return records


# ---- clients that stop reading --------------------------------------------------


def _open_files(pid: int) -> set[str]:
    """Return the paths of the files that process ``pid`` has open."""
    paths = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return paths


def test_client_not_reading_blob_is_cut_off(
    serve: ServeProcess, client: httpx.Client
) -> None:
    data = os.urandom(LARGE_BLOB_SIZE)
    digest = push_blob(client, "stalled/reader", data)
    path = f"/v2/stalled/reader/blobs/{digest}"
    blob_file = os.path.realpath(
        _data_dir(serve) / "blobs" / "sha256" / digest.encoded[:2] / digest.encoded
    )

    with connection(serve) as sock:
        sock.sendall(request_head("GET", path, "stalled-reader"))
        head, body = read_head(sock)
        timed_out = wait_for_log_record(
            serve.log_path, "response_timed_out", request_id="stalled-reader"
        )
        finished = wait_for_log_record(
            serve.log_path, "request_finished", request_id="stalled-reader"
        )
        body += read_until_closed(sock)

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert timed_out["level"] == "warning"
    assert timed_out["method"] == "GET"
    assert timed_out["path"] == path
    assert timed_out["timeout_s"] == float(IDLE_TIMEOUT_S)
    assert finished["status"] == 499
    # Whatever reached the socket buffers before the timeout arrives, and
    # the server counts exactly that.
    assert 0 < len(body) < LARGE_BLOB_SIZE
    assert finished["bytes_out"] == len(body)
    assert body == data[: len(body)]
    assert blob_file not in _open_files(serve.process.pid)
    assert client.get("/v2/").status_code == 200


def test_slow_steady_reader_gets_every_byte(
    serve: ServeProcess, client: httpx.Client
) -> None:
    # More than the socket buffers take at once. Reading about 1 MB/s, the
    # client frees the space that makes the server's socket writable again
    # only every second or two, so the server must see progress in its send
    # queue between sendfile calls.
    data = os.urandom(6 * MIB)
    digest = push_blob(client, "slow/reader", data)

    with connection(serve) as sock:
        sock.sendall(
            request_head("GET", f"/v2/slow/reader/blobs/{digest}", "slow-reader")
        )
        head, body = read_head(sock)
        while len(body) < len(data):
            time.sleep(0.4)
            chunk = sock.recv(MIB)
            assert chunk, f"connection closed after {len(body)} body bytes"
            body += chunk

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert body == data
    timed_out = log_records(
        serve.log_path, "response_timed_out", request_id="slow-reader"
    )
    assert timed_out == []


def test_client_not_reading_streamed_body_is_cut_off() -> None:
    chunk = b"x" * MIB
    total = 1024 * MIB
    outcome: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        details = scope["extensions"][IDLE_TIMEOUT]
        headers = [(b"content-length", str(total).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for sent in range(0, total, len(chunk)):
            # After the connection closes, uvicorn drops body messages.
            if "timed_out" in details:
                outcome["timed_out"] = details["timed_out"]
                outcome["sent"] = sent
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        outcome["sent"] = total

    protocol = configured_protocol(read_idle_timeout=None, write_idle_timeout=0.5)
    with (
        running(app, protocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S) as sock,
    ):
        sock.sendall(request_head("GET", "/", "stalled-stream"))
        head, body = read_head(sock)
        deadline = time.monotonic() + BOUND_S
        while "sent" not in outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        body += read_until_closed(sock)

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert outcome.get("timed_out") == "write"
    assert outcome["sent"] < total
    assert len(body) < total


# ---- the options ----------------------------------------------------------------


def _parse_serve(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_idle_timeout_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAIRN_READ_IDLE_TIMEOUT", raising=False)
    monkeypatch.delenv("CAIRN_WRITE_IDLE_TIMEOUT", raising=False)

    args = _parse_serve()

    assert args.read_idle_timeout == DEFAULT_READ_IDLE_TIMEOUT
    assert args.write_idle_timeout == DEFAULT_WRITE_IDLE_TIMEOUT


def test_idle_timeouts_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAIRN_READ_IDLE_TIMEOUT", "2.5")
    monkeypatch.setenv("CAIRN_WRITE_IDLE_TIMEOUT", "0")

    from_environment = _parse_serve()
    from_flags = _parse_serve("--read-idle-timeout", "0", "--write-idle-timeout", "9")

    assert from_environment.read_idle_timeout == 2.5
    assert from_environment.write_idle_timeout is None
    assert from_flags.read_idle_timeout is None
    assert from_flags.write_idle_timeout == 9.0


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_invalid_idle_timeout_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parse_serve("--read-idle-timeout", value)

    assert exited.value.code == 2
    assert f"invalid timeout {value!r}" in capsys.readouterr().err
