"""Requests that wait for 100 Continue, and HEAD requests with a Range.

A client that sends `Expect: 100-continue` waits before it sends the body.
When the method, target and headers already decide the outcome, RFC 9110
(section 10.1.1) wants that final status at once instead of 100 Continue,
so the client never sends a body that is thrown away. A HEAD of a blob
ignores Range, because RFC 9110 (section 14.2) defines it for GET alone.
"""

from __future__ import annotations

import httpx
import pytest

from tests.server import ServerThread, push_blob
from tests.test_api_blob_size import exchange, request_head

UNKNOWN_UPLOAD = "/v2/demo/app/blobs/uploads/00000000-0000-4000-8000-000000000000"


def _upload_with_chunk(api: httpx.Client, size: int) -> str:
    started = api.post("/v2/demo/app/blobs/uploads/")
    assert started.status_code == 202, started.text
    sent = api.patch(
        started.headers["Location"],
        content=b"a" * size,
        headers={"Content-Range": f"0-{size - 1}"},
    )
    assert sent.status_code == 202, sent.text
    return httpx.URL(sent.headers["Location"]).raw_path.decode()


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_wrong_offset_416_before_body(
    app_client: httpx.Client, app_server: ServerThread, method: str
) -> None:
    path = _upload_with_chunk(app_client, 1000)
    if method == "PUT":
        path += "&" if "?" in path else "?"
        path += "digest=sha256:" + "0" * 64
    headers = ("Content-Range: 5-14", "Content-Length: 10", "Expect: 100-continue")

    # No body is sent: the response must follow from the head alone.
    reply = exchange(app_server.port, request_head(method, path, *headers))

    assert reply.status == 416
    assert reply.headers["range"] == "0-999"
    assert reply.error()["code"] == "BLOB_UPLOAD_INVALID"
    assert reply.error()["detail"]["start"] == 5
    status = app_client.get(path.split("?")[0])
    assert status.headers["Range"] == "0-999"


@pytest.mark.parametrize(
    "headers",
    [
        ("Content-Length: 1000",),
        ("Content-Range: 0-999", "Content-Length: 1000"),
    ],
    ids=["content-length", "content-range"],
)
def test_unknown_upload_404_before_body(
    app_server: ServerThread, headers: tuple[str, ...]
) -> None:
    head = request_head("PATCH", UNKNOWN_UPLOAD, *headers, "Expect: 100-continue")

    reply = exchange(app_server.port, head)

    assert reply.status == 404
    assert reply.error()["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_right_offset_chunk_stored(app_client: httpx.Client) -> None:
    path = _upload_with_chunk(app_client, 1000)

    sent = app_client.patch(
        path,
        content=b"b" * 10,
        headers={"Content-Range": "1000-1009", "Expect": "100-continue"},
    )

    assert sent.status_code == 202, sent.text
    assert sent.headers["Range"] == "0-1009"


@pytest.mark.parametrize("range_header", ["bytes=0-9", "bytes=900-", "bytes=-5"])
def test_head_of_blob_ignores_range(
    app_client: httpx.Client, range_header: str
) -> None:
    data = bytes(range(256)) * 2
    digest = push_blob(app_client, "demo/app", data)
    path = f"/v2/demo/app/blobs/{digest}"

    head = app_client.head(path, headers={"Range": range_header})
    get = app_client.get(path, headers={"Range": range_header})

    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert "Content-Range" not in head.headers
    assert get.status_code in (206, 416)
