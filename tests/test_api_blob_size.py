"""The maximum blob size, over real HTTP on SQLite and PostgreSQL.

Every way a blob's bytes arrive gets 413 SIZE_INVALID once the blob would
exceed the maximum. A declared Content-Length or Content-Range, its end or
its total, is checked before any byte of the body is read. The exception is
a Content-Length of at most 1 MiB that only the upload's offset takes past
the maximum, which is rejected once that body is read. A body of
undeclared length is rejected as soon as the received bytes pass the
maximum. Each rejection discards the upload and stores nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engine.api.app import create_app
from engine.api.options import parse_byte_size
from engine.blobs.limits import check_received_size
from engine.cli import build_parser
from engine.domain.digest import Digest
from engine.domain.errors import BlobTooLarge
from engine.registry import Registry
from tests.server import (
    ServerThread,
    committed_blob_files,
    running,
    stored_state,
    upload_rows,
)

LIMIT = 256 * 1024
# Large enough for the body to go through the worker-thread pipe, not the
# single read of bodies up to 1 MiB.
BIG_LIMIT = 3 * 1024 * 1024
DIGEST = Digest.of(b"the digest of a blob that is never stored")


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    registry.max_blob_size = LIMIT
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        errors = json.loads(self.body)["errors"]
        assert len(errors) == 1
        return dict(errors[0])


def exchange(port: int, request: bytes) -> Reply:
    """Send raw request bytes and read one response with a Content-Length.

    A request that declares more body than it carries tests that the server
    responds from what it has received, without waiting for the rest.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            headers = _headers(head)
            length = headers.get("content-length")
            if sep and length is not None and len(body) >= int(length):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return Reply(status, _headers(head), body)


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def request_head(method: str, target: str, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


def chunked(size: int, piece: int = 64 * 1024) -> bytes:
    """Encode ``size`` bytes as chunked transfer coding, without the final
    zero-length chunk, so the body has no declared end."""
    parts = []
    remaining = size
    while remaining:
        length = min(piece, remaining)
        parts.append(f"{length:x}\r\n".encode() + b"x" * length + b"\r\n")
        remaining -= length
    return b"".join(parts)


def start_upload(api: httpx.Client, first_chunk: int = 0) -> str:
    """Start an upload, send ``first_chunk`` bytes, return its URL path."""
    started = api.post("/v2/demo/app/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    if first_chunk:
        sent = api.patch(
            location,
            content=b"a" * first_chunk,
            headers={"Content-Range": f"0-{first_chunk - 1}"},
        )
        assert sent.status_code == 202, sent.text
        location = sent.headers["Location"]
    return httpx.URL(location).raw_path.decode()


def staging_files(registry: Registry) -> list[str]:
    return sorted(path.name for path in registry.blob_store.paths.staging_dir.iterdir())


def assert_nothing_stored(registry: Registry, before: dict[str, object]) -> None:
    assert stored_state(registry) == before
    assert committed_blob_files(registry) == []
    assert upload_rows(registry) == 0
    assert staging_files(registry) == []


# ---- sizes declared in headers --------------------------------------------------

# Each case starts what it needs and returns the request bytes and the blob
# size the headers declare. The bytes are the head alone, declaring a body
# that is never sent, except for the cases in SENDS_BODY.
DeclaredCase = Callable[[httpx.Client], tuple[bytes, int]]


def _post_content_length(api: httpx.Client) -> tuple[bytes, int]:
    target = f"/v2/demo/app/blobs/uploads/?digest={DIGEST}"
    return request_head("POST", target, f"Content-Length: {LIMIT + 1}"), LIMIT + 1


def _patch_content_range(api: httpx.Client) -> tuple[bytes, int]:
    path = start_upload(api, 1000)
    headers = (f"Content-Range: 1000-{LIMIT + 1000}", f"Content-Length: {LIMIT + 1}")
    return request_head("PATCH", path, *headers), LIMIT + 1001


def _patch_content_length(api: httpx.Client) -> tuple[bytes, int]:
    path = start_upload(api)
    return request_head("PATCH", path, f"Content-Length: {LIMIT + 1}"), LIMIT + 1


def _patch_content_length_after_chunk(api: httpx.Client) -> tuple[bytes, int]:
    # A body this small is read before the registry adds the upload's
    # offset to its length, so the request carries it.
    path = start_upload(api, LIMIT - 10)
    return request_head("PATCH", path, "Content-Length: 11") + b"x" * 11, LIMIT + 1


def _put_content_length_after_chunk(api: httpx.Client) -> tuple[bytes, int]:
    path = start_upload(api, LIMIT)
    target = f"{path}?digest={DIGEST}"
    return request_head("PUT", target, "Content-Length: 1") + b"x", LIMIT + 1


def _patch_content_range_total(api: httpx.Client) -> tuple[bytes, int]:
    # The chunk is small, and the total after the slash declares the blob's size.
    path = start_upload(api)
    headers = (f"Content-Range: 0-9/{LIMIT + 1}", "Content-Length: 10")
    return request_head("PATCH", path, *headers), LIMIT + 1


def _put_content_range_total(api: httpx.Client) -> tuple[bytes, int]:
    path = start_upload(api, 10)
    target = f"{path}?digest={DIGEST}"
    headers = ("Content-Range: bytes 10-19/5000000", "Content-Length: 10")
    return request_head("PUT", target, *headers), 5000000


SENDS_BODY = {_patch_content_length_after_chunk, _put_content_length_after_chunk}


def _put_content_range(api: httpx.Client) -> tuple[bytes, int]:
    path = start_upload(api, 10)
    target = f"{path}?digest={DIGEST}"
    headers = (f"Content-Range: 10-{LIMIT + 10}", f"Content-Length: {LIMIT + 1}")
    return request_head("PUT", target, *headers), LIMIT + 11


@pytest.mark.parametrize(
    "case",
    [
        _post_content_length,
        _patch_content_range,
        _patch_content_length,
        _patch_content_length_after_chunk,
        _put_content_length_after_chunk,
        _put_content_range,
        _patch_content_range_total,
        _put_content_range_total,
    ],
    ids=[
        "post-content-length",
        "patch-content-range",
        "patch-content-length",
        "patch-content-length-after-chunk",
        "put-content-length-after-chunk",
        "put-content-range",
        "patch-content-range-total",
        "put-content-range-total",
    ],
)
def test_declared_size_over_limit_rejected(
    api: httpx.Client, server: ServerThread, registry: Registry, case: DeclaredCase
) -> None:
    head, size = case(api)
    before = stored_state(registry)

    reply = exchange(server.port, head)

    assert reply.status == 413
    if case in SENDS_BODY:
        # The whole request was read, so the connection stays open.
        assert "connection" not in reply.headers
    else:
        assert reply.headers["connection"] == "close"
    error = reply.error()
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"size": size, "limit": LIMIT}
    assert str(LIMIT) in error["message"]
    assert_nothing_stored(registry, before)


def test_declared_size_unknown_upload_404(
    server: ServerThread, registry: Registry
) -> None:
    target = "/v2/demo/app/blobs/uploads/00000000-0000-4000-8000-000000000000"
    headers = (f"Content-Range: 0-{LIMIT}", f"Content-Length: {LIMIT + 1}")

    reply = exchange(server.port, request_head("PATCH", target, *headers))

    assert reply.status == 404
    assert reply.error()["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_out_of_order_chunk_over_limit_416(
    api: httpx.Client, server: ServerThread
) -> None:
    path = start_upload(api, 1000)
    headers = (f"Content-Range: 5000-{LIMIT + 5000}", f"Content-Length: {LIMIT + 1}")

    reply = exchange(server.port, request_head("PATCH", path, *headers))

    assert reply.status == 416
    assert reply.headers["range"] == "0-999"
    assert reply.error()["code"] == "BLOB_UPLOAD_INVALID"
    status = api.get(path)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-999"


def test_early_413_lets_client_finish_sending(
    server: ServerThread, registry: Registry
) -> None:
    # A client that reads the response only after it has sent its body: a
    # server that closed at once, with body bytes unread, would reset the
    # connection under the client's writes.
    before = stored_state(registry)
    target = f"/v2/demo/app/blobs/uploads/?digest={DIGEST}"
    request = request_head("POST", target, _CHUNKED)
    body = chunked(8 * LIMIT) + b"0\r\n\r\n"
    send_errors: list[OSError] = []

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:

        def send() -> None:
            try:
                sock.sendall(request + body)
            except OSError as error:
                send_errors.append(error)

        sender = threading.Thread(target=send)
        sender.start()
        sender.join(30)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk

    assert not sender.is_alive()
    assert send_errors == []
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"SIZE_INVALID" in data
    assert_nothing_stored(registry, before)


# ---- bodies without a declared length -----------------------------------------

# Each case returns the request head, with chunked transfer coding, and the
# upload offset at which its body starts.
StreamedCase = Callable[[httpx.Client], tuple[bytes, int]]
_CHUNKED = "Transfer-Encoding: chunked"


def _post_streamed(api: httpx.Client) -> tuple[bytes, int]:
    target = f"/v2/demo/app/blobs/uploads/?digest={DIGEST}"
    return request_head("POST", target, _CHUNKED), 0


def _patch_streamed(api: httpx.Client) -> tuple[bytes, int]:
    return request_head("PATCH", start_upload(api), _CHUNKED), 0


def _patch_streamed_after_chunk(api: httpx.Client) -> tuple[bytes, int]:
    return request_head("PATCH", start_upload(api, 5000), _CHUNKED), 5000


def _put_streamed_after_chunk(api: httpx.Client) -> tuple[bytes, int]:
    target = f"{start_upload(api, 5000)}?digest={DIGEST}"
    return request_head("PUT", target, _CHUNKED), 5000


STREAMED_CASES = [
    _post_streamed,
    _patch_streamed,
    _patch_streamed_after_chunk,
    _put_streamed_after_chunk,
]
STREAMED_IDS = ["post", "patch", "patch-after-chunk", "put-after-chunk"]


@pytest.mark.parametrize("case", STREAMED_CASES, ids=STREAMED_IDS)
def test_streamed_body_over_limit_rejected(
    api: httpx.Client, server: ServerThread, registry: Registry, case: StreamedCase
) -> None:
    head, offset = case(api)
    before = stored_state(registry)

    # One byte past the maximum, and no end of the body: the server must
    # stop reading there and respond.
    reply = exchange(server.port, head + chunked(LIMIT - offset + 1))

    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    error = reply.error()
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"received": LIMIT + 1, "limit": LIMIT}
    assert_nothing_stored(registry, before)


@pytest.mark.parametrize("case", STREAMED_CASES, ids=STREAMED_IDS)
def test_streamed_body_over_large_limit_rejected(
    api: httpx.Client, server: ServerThread, registry: Registry, case: StreamedCase
) -> None:
    registry.max_blob_size = BIG_LIMIT
    head, offset = case(api)
    before = stored_state(registry)

    reply = exchange(server.port, head + chunked(BIG_LIMIT - offset + 1))

    assert reply.status == 413
    error = reply.error()
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"received": BIG_LIMIT + 1, "limit": BIG_LIMIT}
    assert_nothing_stored(registry, before)


# ---- blobs at the limit --------------------------------------------------------


def test_blob_at_limit_accepted(api: httpx.Client) -> None:
    data = os.urandom(LIMIT)
    digest = Digest.of(data)

    monolithic = api.post(
        "/v2/demo/app/blobs/uploads/", params={"digest": str(digest)}, content=data
    )
    location = api.post("/v2/demo/other/blobs/uploads/").headers["Location"]
    chunk = api.patch(
        location, content=data[:-1], headers={"Content-Range": f"0-{LIMIT - 2}"}
    )
    finished = api.put(
        chunk.headers["Location"],
        params={"digest": str(digest)},
        content=data[-1:],
        headers={"Content-Range": f"{LIMIT - 1}-{LIMIT - 1}"},
    )

    assert monolithic.status_code == 201, monolithic.text
    assert chunk.status_code == 202, chunk.text
    assert finished.status_code == 201, finished.text
    assert api.get(f"/v2/demo/other/blobs/{digest}").content == data


def test_streamed_blob_at_limit_accepted(api: httpx.Client) -> None:
    data = os.urandom(LIMIT)
    digest = Digest.of(data)
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]

    # A generator body goes out with chunked transfer coding.
    chunk = api.patch(location, content=iter([data[: LIMIT // 2], data[LIMIT // 2 :]]))
    finished = api.put(chunk.headers["Location"], params={"digest": str(digest)})

    assert chunk.status_code == 202, chunk.text
    assert finished.status_code == 201, finished.text


def test_limit_lowered_during_upload(
    api: httpx.Client, server: ServerThread, registry: Registry
) -> None:
    data = os.urandom(LIMIT)
    path = start_upload(api)
    sent = api.patch(path, content=data, headers={"Content-Range": f"0-{LIMIT - 1}"})
    assert sent.status_code == 202
    registry.max_blob_size = LIMIT - 1
    before = stored_state(registry)

    finished = api.put(path, params={"digest": str(Digest.of(data))})

    assert finished.status_code == 413
    error = finished.json()["errors"][0]
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"size": LIMIT, "limit": LIMIT - 1}
    assert "already uploaded" in error["message"]
    assert_nothing_stored(registry, before)


def test_no_limit_when_none(api: httpx.Client, registry: Registry) -> None:
    registry.max_blob_size = None
    data = os.urandom(LIMIT + 1)
    digest = Digest.of(data)

    response = api.post(
        "/v2/demo/app/blobs/uploads/", params={"digest": str(digest)}, content=data
    )

    assert response.status_code == 201, response.text


# ---- the registry without HTTP ----------------------------------------------------


def test_registry_push_over_limit_stores_nothing(registry: Registry) -> None:
    registry.max_blob_size = 100
    blobs = registry.repository("demo/app").blobs
    data = b"x" * 101
    before = stored_state(registry)

    with pytest.raises(BlobTooLarge) as raised:
        blobs.push(Digest.of(data), iter([data[:60], data[60:]]))

    assert raised.value.detail == {"received": 101, "limit": 100}
    assert_nothing_stored(registry, before)


def test_write_upload_over_limit_discards(registry: Registry) -> None:
    registry.max_blob_size = 100
    blobs = registry.repository("demo/app").blobs
    upload = blobs.create_upload()
    blobs.write_upload(upload.id, [b"x" * 60])
    before = stored_state(registry)

    with pytest.raises(BlobTooLarge):
        blobs.write_upload(upload.id, [b"x" * 41])

    assert_nothing_stored(registry, before)


def test_check_received_size_at_limit() -> None:
    check_received_size(100, 100)
    check_received_size(10**12, None)
    with pytest.raises(BlobTooLarge):
        check_received_size(101, 100)


# ---- the option ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1048576", 1048576),
        ("64GiB", 64 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        ("1kib", 1024),
        ("2TiB", 2 * 1024**4),
        ("0", None),
        ("0GiB", None),
    ],
)
def test_parse_byte_size(value: str, size: int | None) -> None:
    assert parse_byte_size(value) == size


@pytest.mark.parametrize(
    "value",
    [
        "10GB",
        "10G",
        "1.5GiB",
        "-1",
        "GiB",
        "",
        "many",
        "9999999999TiB",
        "  10MiB ",
        " 10MiB",
        "10MiB ",
        "10 ",
        "10\n",
        "\t0",
        "10\tMiB",
        "10\u00a0MiB",
        "10  MiB",
    ],
)
def test_parse_byte_size_rejects(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        parse_byte_size(value)

    assert f"invalid size {value!r}" in str(raised.value)


def test_max_blob_size_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAIRN_MAX_BLOB_SIZE", raising=False)
    default = build_parser().parse_args(["serve"])
    from_flag = build_parser().parse_args(["serve", "--max-blob-size", "1MiB"])
    monkeypatch.setenv("CAIRN_MAX_BLOB_SIZE", "0")
    from_environment = build_parser().parse_args(["serve"])

    assert default.max_blob_size == 64 * 1024**3
    assert from_flag.max_blob_size == 1024**2
    assert from_environment.max_blob_size is None


@pytest.mark.parametrize("value", ["10GB", "  10MiB "])
def test_invalid_max_blob_size_exits(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--max-blob-size", value])

    assert exited.value.code == 2
    assert f"argument --max-blob-size: invalid size {value!r}" in (
        capsys.readouterr().err
    )
