"""Every OCI error code the server produces, and that bad input stores nothing.

Each case sends a bad request, checks the code, the status and that the
detail names the offending value, then checks that the log, the blob links,
the tags, the catalog and the blob files are exactly as before.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import structlog

from engine.api.app import RegistryApp, create_app
from engine.api.feed import MAX_LIMIT
from engine.api.http import MAX_INT64
from engine.blobs.store import BlobStore
from engine.db import Database, is_database_unavailable, unavailable_reason
from engine.domain.digest import Digest
from engine.domain.manifests import MAX_MANIFEST_SIZE, OCI_MANIFEST
from engine.registry import Registry
from tests.images import encode, make_image
from tests.server import (
    ServerThread,
    committed_blob_files,
    push_blob,
    push_image,
    running,
    stored_state,
    upload_rows,
)
from tests.test_api_blob_size import chunked, exchange, request_head

UNKNOWN_DIGEST = str(Digest.of(b"never pushed"))


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1
    return errors[0]


def _mentions(detail: Any, value: object) -> bool:
    return str(value) in json.dumps(detail)


@pytest.fixture
def unchanged(registry: Registry) -> Iterator[Callable[[], None]]:
    """Return a check that storage equals its state when the check was made."""
    before: dict[str, Any] = {}

    def snapshot() -> None:
        before.update(
            state=stored_state(registry), files=committed_blob_files(registry)
        )

    def check() -> None:
        assert stored_state(registry) == before["state"]
        assert committed_blob_files(registry) == before["files"]

    snapshot()
    check.snapshot = snapshot  # type: ignore[attr-defined]
    yield check


def _resnapshot(unchanged: Callable[[], None]) -> None:
    unchanged.snapshot()  # type: ignore[attr-defined]


# ---- NAME_INVALID and NAME_UNKNOWN ---------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/Library/App/blobs/uploads/"),
        ("PUT", "/v2/Library/App/manifests/v1"),
        ("GET", "/v2/Library/App/tags/list"),
        ("GET", f"/v2/Library/App/blobs/{UNKNOWN_DIGEST}"),
        ("GET", f"/v2/Library/App/referrers/{UNKNOWN_DIGEST}"),
    ],
)
def test_name_invalid(
    api: httpx.Client, unchanged: Callable[[], None], method: str, path: str
) -> None:
    response = api.request(method, path, content=b"{}")

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "NAME_INVALID"
    assert error["detail"]["name"] == "Library/App"
    unchanged()


def test_name_too_long(api: httpx.Client, unchanged: Callable[[], None]) -> None:
    name = "a" * 300

    response = api.post(f"/v2/{name}/blobs/uploads/")

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "NAME_INVALID"
    assert error["detail"]["length"] == 300
    unchanged()


def test_name_unknown(api: httpx.Client, unchanged: Callable[[], None]) -> None:
    response = api.get("/v2/library/nothing-here/tags/list")

    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "NAME_UNKNOWN"
    assert error["detail"]["name"] == "library/nothing-here"
    unchanged()


# ---- blobs and uploads -----------------------------------------------------------


def test_blob_unknown(api: httpx.Client, unchanged: Callable[[], None]) -> None:
    for method in ("GET", "DELETE"):
        response = api.request(method, f"/v2/library/app/blobs/{UNKNOWN_DIGEST}")

        assert response.status_code == 404
        error = _error(response)
        assert error["code"] == "BLOB_UNKNOWN"
        assert error["detail"]["digest"] == UNKNOWN_DIGEST
    head = api.head(f"/v2/library/app/blobs/{UNKNOWN_DIGEST}")
    assert head.status_code == 404
    assert head.content == b""
    unchanged()


INVALID_DIGESTS = [
    "sha256:short",
    "sha256:zz",
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "sha256:" + "A" * 64,
]


@pytest.mark.parametrize("digest", INVALID_DIGESTS)
def test_referrers_digest_invalid(
    api: httpx.Client, unchanged: Callable[[], None], digest: str
) -> None:
    response = api.get(f"/v2/library/app/referrers/{digest}")

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert _mentions(error["detail"], digest)
    unchanged()


@pytest.mark.parametrize("digest", INVALID_DIGESTS)
def test_blob_digest_invalid_unknown(
    api: httpx.Client, unchanged: Callable[[], None], digest: str
) -> None:
    push_image(api, "library/app", make_image(), "v1")
    _resnapshot(unchanged)

    for method in ("GET", "HEAD", "DELETE"):
        response = api.request(method, f"/v2/library/app/blobs/{digest}")

        assert response.status_code == 404, method
        if method == "HEAD":
            assert response.content == b""
            continue
        error = _error(response)
        assert error["code"] == "BLOB_UNKNOWN"
        assert repr(digest) in error["message"]
        assert error["detail"]["digest"] == digest
        assert error["detail"]["repository"] == "library/app"
        assert "digest" in error["detail"]["reason"]
    unchanged()


@pytest.mark.parametrize(
    "reference",
    ["-bad", ".bad", "a" * 129, "bad!tag", *INVALID_DIGESTS],
)
def test_manifest_reference_invalid_unknown(
    api: httpx.Client, unchanged: Callable[[], None], reference: str
) -> None:
    push_image(api, "library/app", make_image(), "v1")
    _resnapshot(unchanged)

    for method in ("GET", "HEAD", "DELETE"):
        response = api.request(method, f"/v2/library/app/manifests/{reference}")

        assert response.status_code == 404, method
        if method == "HEAD":
            assert response.content == b""
            continue
        error = _error(response)
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert repr(reference) in error["message"]
        assert error["detail"]["reference"] == reference
        assert error["detail"]["repository"] == "library/app"
        assert error["detail"]["reason"]
    unchanged()


def test_manifest_put_digest_invalid(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "library/app", blob)
    _resnapshot(unchanged)

    response = api.put(
        "/v2/library/app/manifests/sha256:zz",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"]["digest"] == "sha256:zz"
    unchanged()


def test_upload_digest_mismatch(
    api: httpx.Client, registry: Registry, unchanged: Callable[[], None]
) -> None:
    started = api.post("/v2/library/app/blobs/uploads/")
    location = started.headers["Location"]
    api.patch(location, content=b"some bytes")
    _resnapshot(unchanged)

    response = api.put(location, params={"digest": UNKNOWN_DIGEST}, content=b"more")

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"]["expected"] == UNKNOWN_DIGEST
    assert error["detail"]["actual"] == str(Digest.of(b"some bytesmore"))
    unchanged()
    assert "library/app" not in stored_state(registry)["repositories"]
    # The upload is discarded, as after a cancel.
    assert api.get(location).status_code == 404
    assert upload_rows(registry) == 0


def test_monolithic_post_digest_mismatch(
    api: httpx.Client, registry: Registry, unchanged: Callable[[], None]
) -> None:
    response = api.post(
        "/v2/library/app/blobs/uploads/",
        params={"digest": UNKNOWN_DIGEST},
        content=b"not what the digest says",
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"]["expected"] == UNKNOWN_DIGEST
    unchanged()
    assert list((registry.blob_store.paths.staging_dir).iterdir()) == []


def test_finish_upload_without_digest(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]

    response = api.put(location, content=b"data")

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"] == {"digest": None}
    unchanged()


@pytest.mark.parametrize(
    "upload_id", ["9b2f5c1e-0000-4000-8000-000000000000", "not-a-uuid", "%2E%2E"]
)
def test_blob_upload_unknown(
    api: httpx.Client, unchanged: Callable[[], None], upload_id: str
) -> None:
    path = f"/v2/library/app/blobs/uploads/{upload_id}"
    for method, kwargs in [
        ("GET", {}),
        ("PATCH", {"content": b"chunk"}),
        ("PUT", {"params": {"digest": UNKNOWN_DIGEST}, "content": b"x"}),
        ("DELETE", {}),
    ]:
        response = api.request(method, path, **kwargs)

        assert response.status_code == 404, method
        error = _error(response)
        assert error["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert error["detail"]["upload"] in (upload_id, "..")
    unchanged()


def _other_spellings(upload_id: str) -> list[str]:
    """Return spellings of ``upload_id`` that uuid.UUID parses as the same UUID."""
    return [
        upload_id.upper(),
        "{" + upload_id + "}",
        "urn:uuid:" + upload_id,
        upload_id.replace("-", ""),
    ]


def test_upload_id_other_spelling_unknown(
    api: httpx.Client, registry: Registry, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]
    written = api.patch(location, content=b"first chunk")
    assert written.status_code == 202
    upload_id = location.rstrip("/").rsplit("/", 1)[1]
    staging = registry.blob_store.paths.staging(upload_id)
    _resnapshot(unchanged)

    # The test holds the staging file's lock, as a request still writing to
    # the upload would, so a request that takes the lock never gets a reply.
    with open(staging, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for spelling in _other_spellings(upload_id):
            path = f"/v2/library/app/blobs/uploads/{spelling}"
            for method, kwargs in [
                ("GET", {}),
                ("PATCH", {"content": b"chunk"}),
                ("PUT", {"params": {"digest": UNKNOWN_DIGEST}, "content": b"x"}),
                ("DELETE", {}),
            ]:
                try:
                    response = api.request(method, path, timeout=5, **kwargs)
                except httpx.ReadTimeout:
                    pytest.fail(f"{method} {spelling} waited for the upload's lock")

                assert response.status_code == 404, (method, spelling)
                error = _error(response)
                assert error["code"] == "BLOB_UPLOAD_UNKNOWN"
                assert error["detail"]["upload"] == spelling

    unchanged()
    assert staging.read_bytes() == b"first chunk"
    assert upload_rows(registry) == 1
    assert list(registry.blob_store.paths.staging_dir.iterdir()) == [staging]
    status = api.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{len(b'first chunk') - 1}"


def test_blob_upload_invalid_out_of_order(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]

    response = api.put(
        location,
        params={"digest": UNKNOWN_DIGEST},
        content=b"late chunk",
        headers={"Content-Range": "100-109"},
    )

    assert response.status_code == 416
    assert response.headers["Range"] == "0-0"
    error = _error(response)
    assert error["code"] == "BLOB_UPLOAD_INVALID"
    assert error["detail"]["start"] == 100
    unchanged()


def test_size_invalid_content_range_length(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]

    response = api.patch(location, content=b"12345", headers={"Content-Range": "0-9"})

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"content_range": "0-9", "content_length": 5}
    assert api.get(location).headers["Range"] == "0-0"
    unchanged()


def test_size_invalid_chunked_body_longer_than_range(
    api: httpx.Client, server: ServerThread, unchanged: Callable[[], None]
) -> None:
    location = httpx.URL(api.post("/v2/library/app/blobs/uploads/").headers["Location"])
    head = request_head(
        "PATCH",
        location.raw_path.decode(),
        "Content-Range: 0-99",
        "Transfer-Encoding: chunked",
    )

    # One byte more than the range, and no last chunk, so the server stops
    # reading when that byte arrives.
    reply = exchange(server.port, head + chunked(101))

    assert reply.status == 400
    error = reply.error()
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"content_range_length": 100, "received": 101}
    assert api.get(location).headers["Range"] == "0-0"
    unchanged()


def test_size_invalid_chunked_body_shorter_than_range(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]

    def body() -> Iterator[bytes]:
        yield b"only six"

    response = api.patch(location, content=body(), headers={"Content-Range": "0-99"})

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"content_range_length": 100, "received": 8}
    # The partial chunk was not committed: the upload is still empty.
    assert api.get(location).headers["Range"] == "0-0"
    unchanged()


# ---- manifests ---------------------------------------------------------------------


def test_manifest_unknown(api: httpx.Client, unchanged: Callable[[], None]) -> None:
    push_image(api, "library/app", make_image(), "v1")
    _resnapshot(unchanged)

    for reference in ("v2", UNKNOWN_DIGEST):
        for method in ("GET", "DELETE"):
            response = api.request(method, f"/v2/library/app/manifests/{reference}")

            assert response.status_code == 404
            error = _error(response)
            assert error["code"] == "MANIFEST_UNKNOWN"
            assert _mentions(error["detail"], reference)
    unchanged()


@pytest.mark.parametrize(
    ("body", "offending"),
    [
        (b"{not json", "error"),
        (b"[]", "list"),
        (encode({"schemaVersion": 2, "mediaType": "text/plain"}), "text/plain"),
        (encode({"schemaVersion": 1, "name": "x", "tag": "y"}), "schema"),
        (
            encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
            "config",
        ),
    ],
)
def test_manifest_invalid(
    api: httpx.Client, unchanged: Callable[[], None], body: bytes, offending: str
) -> None:
    response = api.put(
        "/v2/library/app/manifests/v1",
        content=body,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert offending in json.dumps(error).lower()
    unchanged()


def test_manifest_invalid_tag(api: httpx.Client, unchanged: Callable[[], None]) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "library/app", blob)
    _resnapshot(unchanged)

    response = api.put(
        "/v2/library/app/manifests/-bad-tag",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"]["tag"] == "-bad-tag"
    unchanged()


def test_manifest_digest_mismatch(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "library/app", blob)
    _resnapshot(unchanged)

    response = api.put(
        f"/v2/library/app/manifests/{UNKNOWN_DIGEST}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"]["expected"] == UNKNOWN_DIGEST
    assert error["detail"]["actual"] == str(image.digest)
    unchanged()


def test_manifest_blob_unknown(
    api: httpx.Client, registry: Registry, unchanged: Callable[[], None]
) -> None:
    image = make_image(2)
    push_blob(api, "library/app", image.config)
    _resnapshot(unchanged)

    response = api.put(
        "/v2/library/app/manifests/v1",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "MANIFEST_BLOB_UNKNOWN"
    missing = {entry["digest"] for entry in error["detail"]["missing"]}
    assert missing == {str(Digest.of(layer)) for layer in image.layers}
    unchanged()
    assert api.get("/v2/library/app/tags/list").json()["tags"] == []


def test_manifest_too_large_by_content_length(
    server: ServerThread, unchanged: Callable[[], None]
) -> None:
    # A raw socket: the server must respond from the headers alone, before the
    # client has sent a byte of the body.
    size = MAX_MANIFEST_SIZE + 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"PUT /v2/library/app/manifests/v1 HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
        )
        reply = _read_response(sock)

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head.lower()
    error = json.loads(body)["errors"][0]
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {"size": size, "limit": MAX_MANIFEST_SIZE}
    unchanged()


def test_manifest_too_large_chunked(
    api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(10):
            sent += 1024 * 1024
            yield b" " * (1024 * 1024)

    # The server reads and discards the rest of the body after its early
    # 413, so the client finishes sending and gets the response.
    response = api.put(
        "/v2/library/app/manifests/v1",
        content=body(),
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"]["limit"] == MAX_MANIFEST_SIZE
    assert sent == 10 * 1024 * 1024
    unchanged()


def test_manifest_too_large_streamed_detail(
    server: ServerThread, unchanged: Callable[[], None]
) -> None:
    # A chunked body one byte past the limit, without its last chunk, so the
    # server stops reading when that byte arrives.
    head = request_head(
        "PUT",
        "/v2/library/app/manifests/v1",
        f"Content-Type: {OCI_MANIFEST}",
        "Transfer-Encoding: chunked",
    )

    reply = exchange(server.port, head + chunked(MAX_MANIFEST_SIZE + 1))

    assert reply.status == 413
    error = reply.error()
    assert error["code"] == "SIZE_INVALID"
    assert error["detail"] == {
        "received": MAX_MANIFEST_SIZE + 1,
        "limit": MAX_MANIFEST_SIZE,
    }
    unchanged()


def _read_response(sock: socket.socket) -> bytes:
    """Read one response whose body has a Content-Length."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        lengths = [
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ]
        if sep and lengths and len(body) >= lengths[0]:
            return data


# ---- UNSUPPORTED -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/v1/", "/v2/library/app", "/v2/library/app/blobs", "/_cairn/x"]
)
def test_unknown_route(api: httpx.Client, path: str) -> None:
    response = api.get(path)

    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["path"] == path


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v2/", "GET, HEAD"),
        ("PATCH", "/v2/library/app/manifests/v1", "DELETE, GET, HEAD, PUT"),
        ("PUT", f"/v2/library/app/blobs/{UNKNOWN_DIGEST}", "DELETE, GET, HEAD"),
        ("DELETE", "/v2/library/app/tags/list", "GET, HEAD"),
        ("POST", "/_cairn/events", "GET, HEAD"),
    ],
)
def test_method_not_allowed(
    api: httpx.Client,
    unchanged: Callable[[], None],
    method: str,
    path: str,
    allowed: str,
) -> None:
    response = api.request(method, path, content=b"ignored")

    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    error = _error(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["method"] == method
    unchanged()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/v2/library/app/tags/list?n=-1", "-1"),
        ("/v2/_catalog?n=ten", "ten"),
        ("/_cairn/events?after=x", "x"),
        ("/_cairn/events?limit=0", "0"),
        ("/_cairn/events?limit=-1", "-1"),
        ("/_cairn/events?type=blob.exploded", "blob.exploded"),
    ],
)
def test_invalid_query_parameter(
    api: httpx.Client, unchanged: Callable[[], None], path: str, value: str
) -> None:
    response = api.get(path)

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "UNSUPPORTED"
    assert str(error["detail"]["value"]) == value
    unchanged()


@pytest.mark.parametrize("value", ["0", "-1", "x", str(MAX_INT64 + 1)])
def test_event_limit_range_message(api: httpx.Client, value: str) -> None:
    response = api.get("/_cairn/events", params={"limit": value})

    assert response.status_code == 400
    error = _error(response)
    assert error["message"] == (
        f"limit must be an integer from 1 to {MAX_INT64}. "
        f"A page has at most {MAX_LIMIT} events, however large the limit"
    )
    assert error["detail"]["max_page_size"] == MAX_LIMIT
    assert error["detail"]["value"] == value


@pytest.mark.parametrize(
    "coding", ["gzip, chunked", "identity, chunked", "x-custom,chunked"]
)
def test_unknown_transfer_coding_501(
    api: httpx.Client,
    server: ServerThread,
    registry: Registry,
    unchanged: Callable[[], None],
    coding: str,
) -> None:
    location = httpx.URL(api.post("/v2/library/app/blobs/uploads/").headers["Location"])
    _resnapshot(unchanged)
    body = b"not the bytes that the coding would give"
    patch = request_head(
        "PATCH", location.raw_path.decode(), f"Transfer-Encoding: {coding}"
    )
    push = request_head(
        "POST",
        f"/v2/library/app/blobs/uploads/?digest={Digest.of(body)}",
        f"Transfer-Encoding: {coding}",
    )

    for head in (patch, push):
        reply = exchange(
            server.port, head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        )

        assert reply.status == 501
        error = reply.error()
        assert error["code"] == "UNSUPPORTED"
        assert error["detail"]["header"] == "Transfer-Encoding"
        assert error["detail"]["value"] == coding
    assert api.get(location).headers["Range"] == "0-0"
    assert upload_rows(registry) == 1
    unchanged()


def _call_app(
    app: RegistryApp, method: str, path: str, transfer_encodings: list[str]
) -> tuple[int, dict[str, str], bytes, int]:
    """Call the app as an ASGI server would, with one Transfer-Encoding header
    line per element of ``transfer_encodings``, and a chunked body already
    decoded. Return the status, headers, body and the number of times the
    app called receive for the request body."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")]
        + [(b"transfer-encoding", value.encode()) for value in transfer_encodings],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }
    body_reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_reads
        body_reads += 1
        return {"type": "http.request", "body": b"pushed bytes", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], headers, body, body_reads


# llhttp, under cairn serve, rejects most of these before the app receives
# them, so the test calls the app directly, as another ASGI server could.
@pytest.mark.parametrize(
    ("header_lines", "status", "problem", "unsupported"),
    [
        (["chunked, chunked"], 400, "lists chunked more than once", None),
        (["chunked", "chunked"], 400, "lists chunked more than once", None),
        (["gzip, chunked, chunked"], 400, "lists chunked more than once", None),
        (["chunked, gzip"], 400, "does not end with chunked", None),
        (["gzip"], 400, "does not end with chunked", None),
        (["chunked", "gzip"], 400, "does not end with chunked", None),
        ([""], 400, "lists no transfer coding", None),
        ([" , ,"], 400, "lists no transfer coding", None),
        (["gzip, chunked"], 501, "lists gzip, which cairn does not decode", ["gzip"]),
        (
            ["x-custom, , deflate,chunked"],
            501,
            "lists x-custom, deflate, which cairn does not decode",
            ["x-custom", "deflate"],
        ),
        (["GZIP", "Chunked"], 501, "lists gzip, which cairn does not decode", ["gzip"]),
    ],
)
def test_transfer_coding_error_message(
    registry: Registry,
    unchanged: Callable[[], None],
    header_lines: list[str],
    status: int,
    problem: str,
    unsupported: list[str] | None,
) -> None:
    value = ", ".join(header_lines)
    app = create_app(registry)

    response_status, headers, body, body_reads = _call_app(
        app, "POST", "/v2/library/app/blobs/uploads/", header_lines
    )

    assert response_status == status
    assert headers["connection"] == "close"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"].startswith(f"Transfer-Encoding {value!r} {problem}")
    assert error["message"].endswith(
        "send the body with chunked alone or with a Content-Length"
    )
    assert error["detail"]["header"] == "Transfer-Encoding"
    assert error["detail"]["value"] == value
    assert error["detail"]["supported"] == ["chunked"]
    assert error["detail"].get("unsupported") == unsupported
    assert body_reads == 0
    unchanged()


@pytest.mark.parametrize(
    "header_lines", [["chunked"], ["CHUNKED"], [", chunked"], ["chunked", ""]]
)
def test_transfer_coding_chunked_accepted(
    registry: Registry, header_lines: list[str]
) -> None:
    app = create_app(registry)

    status, _, body, _ = _call_app(
        app, "POST", "/v2/library/app/blobs/uploads/", header_lines
    )

    assert status == 202, body
    assert upload_rows(registry) == 1


# ---- UNAVAILABLE -------------------------------------------------------------------

# How long the registry of these tests waits for a lock that another
# connection holds, in seconds on SQLite and in milliseconds on PostgreSQL.
LOCK_WAIT_S = 0.2


@pytest.fixture
def impatient_registry(data_dir: Path, database_url: str) -> Iterator[Registry]:
    """A registry that gives up on another connection's lock after 0.2 s.

    SQLite takes that from the busy timeout. cairn sets no lock timeout on
    PostgreSQL, where an operator may set one in the URL, as here.
    """
    if database_url.startswith("sqlite"):
        database = Database(database_url, busy_timeout=LOCK_WAIT_S)
    else:
        url = sa.make_url(database_url).update_query_dict(
            {"options": f"-c lock_timeout={round(LOCK_WAIT_S * 1000)}"}
        )
        database = Database(url.render_as_string(hide_password=False))
    registry = Registry(database, BlobStore(data_dir))
    yield registry
    database.dispose()


@contextmanager
def _write_lock_held(database_url: str) -> Iterator[None]:
    """Hold the database's write lock from another connection, as a long
    `cairn projections rebuild` does, and roll back at the end.

    On PostgreSQL, where upload sessions change without the log's lock,
    the uploads table is locked too.
    """
    if database_url.startswith("sqlite"):
        path = sa.make_url(database_url).database
        assert path is not None
        sqlite = sqlite3.connect(path, isolation_level=None)
        try:
            sqlite.execute("BEGIN IMMEDIATE")
            yield
            sqlite.execute("ROLLBACK")
        finally:
            sqlite.close()
        return
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            conn.exec_driver_sql(
                "LOCK TABLE log_head, uploads IN ACCESS EXCLUSIVE MODE"
            )
            yield
            transaction.rollback()
    finally:
        engine.dispose()


def _check_unavailable(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    error = _error(response)
    assert error["code"] == "UNAVAILABLE"
    assert error["detail"]["request_id"] == response.headers["X-Request-Id"]
    assert "Traceback" not in response.text
    return error


def test_database_locked_is_unavailable(
    impatient_registry: Registry, database_url: str
) -> None:
    registry = impatient_registry
    image = make_image()
    first_chunk = os.urandom(1000)
    layer = os.urandom(500)
    with (
        running(create_app(registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for blob in image.blobs:
            push_blob(client, "library/app", blob)
        started = client.post("/v2/library/app/blobs/uploads/")
        location = started.headers["Location"]
        patched = client.patch(location, content=first_chunk)
        assert patched.status_code == 202, patched.text
        before = stored_state(registry)
        files_before = committed_blob_files(registry)
        uploads_before = upload_rows(registry)

        with structlog.testing.capture_logs() as logs, _write_lock_held(database_url):
            responses = {
                "manifest": client.put(
                    "/v2/library/app/manifests/v1",
                    content=image.manifest,
                    headers={"Content-Type": image.media_type},
                ),
                "monolithic": client.post(
                    "/v2/library/app/blobs/uploads/",
                    params={"digest": str(Digest.of(layer))},
                    content=layer,
                ),
                "chunk": client.patch(
                    location,
                    content=b"more",
                    headers={"Content-Range": f"{len(first_chunk)}-1003"},
                ),
                "start": client.post("/v2/library/app/blobs/uploads/"),
                "delete": client.delete(
                    f"/v2/library/app/blobs/{Digest.of(image.blobs[0])}"
                ),
            }
        after = stored_state(registry)
        files_after = committed_blob_files(registry)
        uploads_after = upload_rows(registry)
        upload_id = httpx.URL(location).path.rsplit("/", 1)[1]
        staging_dir = registry.blob_store.paths.staging_dir
        staging_files = [path.name for path in staging_dir.iterdir()]

        # The chunk that failed is not counted, and the client sends it again.
        status = client.get(location)
        resent = client.patch(
            location,
            content=b"more",
            headers={"Content-Range": f"{len(first_chunk)}-1003"},
        )
        retried = client.put(
            "/v2/library/app/manifests/v1",
            content=image.manifest,
            headers={"Content-Type": image.media_type},
        )

    for name, response in responses.items():
        error = _check_unavailable(response)
        assert error["detail"]["reason"], name
        if database_url.startswith("sqlite"):
            assert error["detail"]["reason"] == "database is locked", name
        else:
            assert "lock timeout" in error["detail"]["reason"], name
    # Nothing of the failed requests was stored: no event, link, tag or
    # upload session. The monolithic upload's blob file stays unlinked
    # until cairn gc removes it.
    assert after == before
    assert uploads_after == uploads_before
    assert set(files_after) - set(files_before) <= {str(Digest.of(layer))}
    assert staging_files == [upload_id]
    warnings = [line for line in logs if line["event"] == "database_unavailable"]
    assert len(warnings) == len(responses)
    assert [line["log_level"] for line in warnings] == ["warning"] * len(responses)
    assert {line["request_id"] for line in warnings} == {
        response.headers["X-Request-Id"] for response in responses.values()
    }
    assert not [line for line in logs if line["event"] == "request_failed"]

    assert status.headers["Range"] == f"0-{len(first_chunk) - 1}"
    assert resent.status_code == 202, resent.text
    assert retried.status_code == 201, retried.text


def test_database_unreachable_is_unavailable(data_dir: Path) -> None:
    # Nothing listens on the port, as while PostgreSQL restarts.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = Database(f"postgresql://cairn@127.0.0.1:{port}/cairn")
    registry = Registry(database, BlobStore(data_dir))
    try:
        with (
            structlog.testing.capture_logs() as logs,
            running(create_app(registry)) as server,
            httpx.Client(base_url=server.url, timeout=60) as client,
        ):
            listed = client.get("/v2/library/app/tags/list")
            started = client.post("/v2/library/app/blobs/uploads/")
    finally:
        database.dispose()

    for response in (listed, started):
        error = _check_unavailable(response)
        assert error["detail"]["reason"] == "cannot connect to the database server"
        # libpq's message names the database server, which clients must
        # not learn; only the log keeps it.
        assert str(port) not in response.text
        assert "Connection refused" not in response.text
    warnings = [line for line in logs if line["event"] == "database_unavailable"]
    assert len(warnings) == 2
    assert str(port) in warnings[0]["error"]
    assert "Connection refused" in warnings[0]["error"]


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("no such table: tags"), False),
        (psycopg.errors.LockNotAvailable("lock timeout"), True),
        (psycopg.errors.SerializationFailure("could not serialize"), True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.CannotConnectNow("the database system is starting"), True),
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (psycopg.errors.UndefinedTable("relation does not exist"), False),
        (psycopg.errors.QueryCanceled("canceling statement"), False),
    ],
)
def test_database_unavailable_errors(error: Exception, unavailable: bool) -> None:
    if isinstance(error, sqlite3.OperationalError):
        code = sqlite3.SQLITE_BUSY if unavailable else sqlite3.SQLITE_ERROR
        error.sqlite_errorcode = code  # type: ignore[attr-defined]
    wrapped = sa.exc.DBAPIError.instance("SELECT 1", None, error, type(error))

    assert is_database_unavailable(wrapped) is unavailable


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (psycopg.errors.LockNotAvailable("lock timeout"), "lock timeout"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "deadlock detected"),
        (
            psycopg.OperationalError(
                'connection failed: connection to server at "10.0.0.5", port 5433 '
                "failed: FATAL:  sorry, too many clients already"
            ),
            "cannot connect to the database server",
        ),
    ],
)
def test_unavailable_reason_hides_driver_message(error: Exception, reason: str) -> None:
    wrapped = sa.exc.DBAPIError.instance("SELECT 1", None, error, type(error))

    assert unavailable_reason(wrapped) == reason


def test_pool_timeout_is_unavailable() -> None:
    # What SQLAlchemy raises when every pooled connection stays in use for
    # longer than the pool's timeout.
    error = sa.exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached")

    assert is_database_unavailable(error)


# ---- no request of any shape gets a 500 ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("GET", "/v2/../../etc/passwd", {}, b""),
        ("GET", "/v2/library/app/manifests/%00", {}, b""),
        ("GET", "/v2/library/app/manifests/" + "a" * 5000, {}, b""),
        ("GET", "/v2/library/app/blobs/sha256:%ff%fe", {}, b""),
        ("GET", "/v2/_catalog?last=%ff%fe&n=2", {}, b""),
        ("GET", "/v2/library/app/tags/list?n=99999999999999999999999", {}, b""),
        ("GET", "/v2/library/app/tags/list?last=%00", {}, b""),
        ("GET", "/v2/_catalog?last=a%00b", {}, b""),
        (
            "GET",
            f"/v2/library/app/referrers/{UNKNOWN_DIGEST}?artifactType=%00",
            {},
            b"",
        ),
        ("GET", "/_cairn/events?after=99999999999999999999999", {}, b""),
        ("GET", "/_cairn/events?repository=%00", {}, b""),
        ("POST", "/v2/library/app/blobs/uploads/?mount=%00&from=%00", {}, b""),
        ("OPTIONS", "/v2/", {}, b""),
        ("TRACE", "/v2/", {}, b""),
        ("PUT", "/v2/library/app/manifests/v1", {"Content-Type": "x/y"}, b"\xff" * 9),
        ("PUT", "/v2/library/app/manifests/v1", {"Content-Type": ";;;"}, b"{}"),
        (
            "PATCH",
            "/v2/library/app/blobs/uploads/x",
            {"Content-Range": "9-1"},
            b"",
        ),
        ("GET", "/v2/library/app/blobs/uploads/", {}, b""),
        ("POST", "/v2/library/app/blobs/uploads/?digest=nope", {}, b"x"),
        ("POST", "/v2/library/app/blobs/uploads/?mount=&from=", {}, b""),
        ("GET", "/v2/library/app/referrers/sha256:abc?artifactType=%00", {}, b""),
        ("GET", "/_cairn/events?repository=UPPER", {}, b""),
        ("GET", "/v2/", {"X-Request-Id": "x" * 500}, b""),
        ("GET", "/v2/", {"Range": "bytes=---"}, b""),
        ("GET", "/v2/", {"Forwarded": "proto=gopher;host=@@@"}, b""),
    ],
)
def test_no_server_error(
    api: httpx.Client,
    unchanged: Callable[[], None],
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    response = api.request(method, path, headers=headers, content=body)

    assert response.status_code < 500
    assert "X-Request-Id" in response.headers
    if response.status_code >= 400:
        assert _error(response)["code"]
    unchanged()


def test_request_id_echoed(api: httpx.Client) -> None:
    sane = api.get("/v2/", headers={"X-Request-Id": "build-42.step:7"})
    insane = api.get("/v2/", headers={"X-Request-Id": "bad id with spaces"})

    assert sane.headers["X-Request-Id"] == "build-42.step:7"
    assert insane.headers["X-Request-Id"] != "bad id with spaces"
    assert len(insane.headers["X-Request-Id"]) == 32


def test_request_id_recorded_in_events(api: httpx.Client) -> None:
    data = os.urandom(64)
    digest = Digest.of(data)

    api.post(
        "/v2/library/app/blobs/uploads/",
        params={"digest": str(digest)},
        content=data,
        headers={"X-Request-Id": "push-0001"},
    )

    events = api.get("/_cairn/events").json()["events"]
    assert events[-1]["request_id"] == "push-0001"
    assert events[-1]["actor"] == {"user": None, "address": "127.0.0.1"}


def test_internal_error_is_generic(tmp_path: Path) -> None:
    # A database without cairn's schema makes every query fail inside the
    # engine: the client must see a plain 500, never the exception.
    registry = Registry.open(tmp_path / "unmigrated")
    try:
        with (
            running(create_app(registry)) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            response = client.get("/v2/library/app/tags/list")
    finally:
        registry.database.dispose()

    assert response.status_code == 500
    error = _error(response)
    assert error["code"] == "UNKNOWN"
    assert error["detail"] == {"request_id": response.headers["X-Request-Id"]}
    assert "Traceback" not in response.text
    assert "sqlite" not in response.text.lower()


def test_client_disconnect_mid_upload(
    server: ServerThread, api: httpx.Client, unchanged: Callable[[], None]
) -> None:
    location = api.post("/v2/library/app/blobs/uploads/").headers["Location"]
    path = location.removeprefix(server.url)
    api.patch(location, content=b"0123456789")
    _resnapshot(unchanged)

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 10000000\r\n\r\n".encode()
            + os.urandom(3 * 1024 * 1024)
        )

    # The aborted chunk leaves the upload where the last complete one ended.
    status = api.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-9"
    resumed = api.patch(location, content=b"abc", headers={"Content-Range": "10-12"})
    assert resumed.status_code == 202
    unchanged()
