"""Blob and upload routes over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator

import httpx
import pytest

from engine.api.app import create_app
from engine.domain.digest import Digest
from engine.registry import Registry
from tests.server import (
    ServerThread,
    committed_blob_files,
    push_blob,
    running,
    stored_state,
    upload_rows,
)


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _upload(api: httpx.Client, repository: str = "library/app") -> str:
    response = api.post(f"/v2/{repository}/blobs/uploads/")
    assert response.status_code == 202
    return response.headers["Location"]


# ---- reading blobs -------------------------------------------------------------


def test_blob_head_and_get(api: httpx.Client) -> None:
    data = os.urandom(3000)
    digest = push_blob(api, "library/app", data)

    head = api.head(f"/v2/library/app/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "3000"
    assert head.headers["Docker-Content-Digest"] == str(digest)
    assert head.headers["ETag"] == f'"{digest}"'
    assert head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert head.content == b""

    get = api.get(f"/v2/library/app/blobs/{digest}")
    assert get.status_code == 200
    assert get.content == data
    assert get.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=2990-", 2990, 3000),
        ("bytes=-5", 2995, 3000),
        ("bytes=0-999999", 0, 3000),
        ("bytes=0-0", 0, 1),
        ("bytes=0-18446744073709551616", 0, 3000),
        ("bytes=-99999999999999999999999", 0, 3000),
        # Range unit names are case-insensitive (RFC 9110 section 14.1).
        ("Bytes=10-19", 10, 20),
        ("BYTES=-5", 2995, 3000),
        # Whitespace around "=" and "-" separates tokens, as Distribution
        # 2.8 reads it.
        ("bytes= 10-19", 10, 20),
        ("bytes=10 - 19", 10, 20),
        ("bytes=- 5", 2995, 3000),
    ],
)
def test_blob_range(api: httpx.Client, header: str, start: int, end: int) -> None:
    data = os.urandom(3000)
    digest = push_blob(api, "library/app", data)

    response = api.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})

    assert response.status_code == 206
    assert response.content == data[start:end]
    assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/3000"
    assert response.headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=3000-",
        "bytes=5000-6000",
        "bytes=-0",
        "bytes=18446744073709551616-",
        "bytes=99999999999999999999999-",
    ],
)
def test_blob_range_unsatisfiable(api: httpx.Client, header: str) -> None:
    digest = push_blob(api, "library/app", os.urandom(3000))

    response = api.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})

    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */3000"
    assert response.json()["errors"][0]["detail"]["range"] == header


@pytest.mark.parametrize(
    "header",
    [
        "items=0-1",
        "bytes=0-1,5-6",
        "bytes=9-3",
        # Whitespace inside a number or the unit does not join its parts.
        "bytes=1 0-20",
        "bytes=0-1 0",
        "b ytes=0-1",
    ],
)
def test_blob_range_ignored_when_malformed(api: httpx.Client, header: str) -> None:
    data = os.urandom(100)
    digest = push_blob(api, "library/app", data)

    response = api.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})

    assert response.status_code == 200
    assert response.content == data


def test_blob_if_range(api: httpx.Client) -> None:
    data = os.urandom(100)
    digest = push_blob(api, "library/app", data)
    path = f"/v2/library/app/blobs/{digest}"

    matching = api.get(path, headers={"Range": "bytes=0-0", "If-Range": f'"{digest}"'})
    assert matching.status_code == 206
    assert matching.content == data[:1]

    for validator in ('"other"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        other = api.get(path, headers={"Range": "bytes=0-0", "If-Range": validator})
        assert other.status_code == 200, validator
        assert other.content == data


def test_blob_if_none_match(api: httpx.Client) -> None:
    digest = push_blob(api, "library/app", b"cached")

    response = api.get(
        f"/v2/library/app/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'}
    )

    assert response.status_code == 304
    assert response.content == b""


def test_blob_larger_than_read_buffer(api: httpx.Client) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    digest = push_blob(api, "library/app", data)

    with api.stream("GET", f"/v2/library/app/blobs/{digest}") as response:
        received = hashlib.sha256()
        for chunk in response.iter_bytes():
            received.update(chunk)

    assert response.status_code == 200
    assert received.hexdigest() == digest.encoded


def test_blob_delete_unlinks(api: httpx.Client) -> None:
    digest = push_blob(api, "library/app", b"to be deleted")
    push_blob(api, "library/other", b"to be deleted")

    deleted = api.delete(f"/v2/library/app/blobs/{digest}")

    assert deleted.status_code == 202
    assert api.head(f"/v2/library/app/blobs/{digest}").status_code == 404
    assert api.head(f"/v2/library/other/blobs/{digest}").status_code == 200
    again = api.delete(f"/v2/library/app/blobs/{digest}")
    assert again.status_code == 404
    assert again.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_blob_not_readable_from_other_repository(api: httpx.Client) -> None:
    digest = push_blob(api, "library/app", b"private")

    response = api.get(f"/v2/library/elsewhere/blobs/{digest}")

    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_sha512_blob(api: httpx.Client) -> None:
    data = os.urandom(2048)
    digest = Digest.of(data, "sha512")
    location = _upload(api)

    finished = api.put(location, params={"digest": str(digest)}, content=data)

    assert finished.status_code == 201
    assert finished.headers["Docker-Content-Digest"] == str(digest)
    fetched = api.get(f"/v2/library/app/blobs/{digest}")
    assert fetched.status_code == 200
    assert fetched.content == data
    ranged = api.get(
        f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=100-199"}
    )
    assert ranged.content == data[100:200]


# ---- uploads -------------------------------------------------------------------


def test_upload_start_headers(api: httpx.Client, server: ServerThread) -> None:
    response = api.post("/v2/library/app/blobs/uploads/")

    assert response.status_code == 202
    upload_id = response.headers["Docker-Upload-UUID"]
    assert response.headers["Location"] == (
        f"{server.url}/v2/library/app/blobs/uploads/{upload_id}"
    )
    assert response.headers["Range"] == "0-0"
    assert response.headers["Content-Length"] == "0"


def test_monolithic_post(api: httpx.Client, registry: Registry) -> None:
    data = os.urandom(4096)
    digest = Digest.of(data)

    response = api.post(
        "/v2/library/app/blobs/uploads/", params={"digest": str(digest)}, content=data
    )

    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == str(digest)
    assert response.headers["Location"].endswith(f"/v2/library/app/blobs/{digest}")
    assert api.get(response.headers["Location"]).content == data
    assert upload_rows(registry) == 0


@pytest.mark.parametrize("directory", ["uploads", "blobs"])
def test_upload_after_directory_removed(
    api: httpx.Client, registry: Registry, directory: str
) -> None:
    """A blob or staging directory removed while cairn runs is created again."""
    shutil.rmtree(registry.blob_store.paths.root / directory)
    single, chunked = os.urandom(4096), os.urandom(4096)

    posted = api.post(
        "/v2/library/app/blobs/uploads/",
        params={"digest": str(Digest.of(single))},
        content=single,
    )
    put = api.put(
        _upload(api), params={"digest": str(Digest.of(chunked))}, content=chunked
    )

    assert posted.status_code == 201, posted.text
    assert put.status_code == 201, put.text
    assert api.get(posted.headers["Location"]).content == single
    assert api.get(put.headers["Location"]).content == chunked
    assert upload_rows(registry) == 0


@pytest.mark.parametrize("stored", [b"", b"cut short"], ids=["empty", "short"])
@pytest.mark.parametrize("size", [4096, 3 * 1024 * 1024], ids=["small", "large"])
def test_damaged_blob_file_replaced_by_push(
    api: httpx.Client, registry: Registry, stored: bytes, size: int
) -> None:
    """A stored blob file of the wrong size, as an interrupted restore
    leaves it, reads as unknown, and pushing the blob again replaces it."""
    data = os.urandom(size)
    digest = str(push_blob(api, "library/app", data))
    path = registry.blob_store.path(Digest.parse(digest))
    path.write_bytes(stored)

    head = api.head(f"/v2/library/app/blobs/{digest}")
    get = api.get(f"/v2/library/app/blobs/{digest}")
    pushed = api.post(
        "/v2/library/app/blobs/uploads/", params={"digest": digest}, content=data
    )

    assert head.status_code == 404
    assert get.status_code == 404
    assert get.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert get.json()["errors"][0]["detail"]["digest"] == digest
    assert pushed.status_code == 201, pushed.text
    assert path.read_bytes() == data
    assert api.get(f"/v2/library/app/blobs/{digest}").content == data


def test_monolithic_put_of_empty_blob(api: httpx.Client) -> None:
    digest = Digest.of(b"")
    location = _upload(api)

    response = api.put(location, params={"digest": str(digest)})

    assert response.status_code == 201
    head = api.head(f"/v2/library/app/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "0"


def test_chunked_upload_with_content_range(api: httpx.Client) -> None:
    data = os.urandom(300_000)
    digest = Digest.of(data)
    location = _upload(api)
    chunks = [data[:100_000], data[100_000:250_000], data[250_000:]]

    offset = 0
    for chunk in chunks:
        response = api.patch(
            location,
            content=chunk,
            headers={
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert response.status_code == 202, response.text
        offset += len(chunk)
        assert response.headers["Range"] == f"0-{offset - 1}"
        location = response.headers["Location"]

    status = api.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{len(data) - 1}"

    finished = api.put(location, params={"digest": str(digest)})
    assert finished.status_code == 201
    assert api.get(f"/v2/library/app/blobs/{digest}").content == data


def test_chunked_upload_without_content_range(api: httpx.Client) -> None:
    data = os.urandom(70_000)
    digest = Digest.of(data)
    location = _upload(api)

    first = api.patch(location, content=data[:30_000])
    assert first.status_code == 202
    assert first.headers["Range"] == "0-29999"

    finished = api.put(
        first.headers["Location"], params={"digest": str(digest)}, content=data[30_000:]
    )
    assert finished.status_code == 201
    assert api.get(f"/v2/library/app/blobs/{digest}").content == data


def test_chunked_transfer_encoding_body(api: httpx.Client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = Digest.of(data)
    location = _upload(api)

    def body() -> Iterator[bytes]:
        for start in range(0, len(data), 65_536):
            yield data[start : start + 65_536]

    patched = api.patch(location, content=body())
    assert patched.status_code == 202
    assert patched.headers["Range"] == f"0-{len(data) - 1}"
    finished = api.put(patched.headers["Location"], params={"digest": str(digest)})
    assert finished.status_code == 201


def test_out_of_order_chunk_gets_416(api: httpx.Client, registry: Registry) -> None:
    location = _upload(api)
    api.patch(location, content=b"a" * 10, headers={"Content-Range": "0-9"})
    before = stored_state(registry)

    response = api.patch(
        location, content=b"b" * 10, headers={"Content-Range": "20-29"}
    )

    assert response.status_code == 416
    assert response.headers["Range"] == "0-9"
    assert response.headers["Location"] == location
    error = response.json()["errors"][0]
    assert error["code"] == "BLOB_UPLOAD_INVALID"
    assert error["detail"]["start"] == 20
    assert error["detail"]["offset"] == 10
    assert stored_state(registry) == before
    resumed = api.patch(location, content=b"b" * 10, headers={"Content-Range": "10-19"})
    assert resumed.status_code == 202
    assert resumed.headers["Range"] == "0-19"


@pytest.mark.parametrize(
    "header",
    [
        "zero-2",
        # RFC 9110 section 14.4: a complete length at or below the last
        # byte position makes the field invalid.
        "bytes 0-2/2",
        "bytes 0-2/0",
        "0-2/1",
    ],
)
def test_malformed_content_range_gets_416(
    api: httpx.Client, registry: Registry, header: str
) -> None:
    location = _upload(api)
    before = stored_state(registry)

    response = api.patch(location, content=b"abc", headers={"Content-Range": header})

    assert response.status_code == 416
    assert response.headers["Range"] == "0-0"
    error = response.json()["errors"][0]
    assert error["code"] == "BLOB_UPLOAD_INVALID"
    assert error["detail"]["content_range"] == header
    assert api.get(location).headers["Range"] == "0-0"
    assert stored_state(registry) == before


@pytest.mark.parametrize("header", ["bytes 0-2/3", "bytes 0-2/*", "0-2/100"])
def test_content_range_complete_length_accepted(api: httpx.Client, header: str) -> None:
    location = _upload(api)

    response = api.patch(location, content=b"abc", headers={"Content-Range": header})

    assert response.status_code == 202
    assert response.headers["Range"] == "0-2"


def test_upload_cancel(api: httpx.Client, registry: Registry) -> None:
    location = _upload(api)
    api.patch(location, content=b"partial")

    cancelled = api.delete(location)

    assert cancelled.status_code == 204
    assert upload_rows(registry) == 0
    status = api.get(location)
    assert status.status_code == 404
    assert status.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_upload_belongs_to_its_repository(api: httpx.Client) -> None:
    location = _upload(api, "library/app")
    upload_id = location.rsplit("/", 1)[1]

    response = api.get(f"/v2/library/other/blobs/uploads/{upload_id}")

    assert response.status_code == 404
    assert response.json()["errors"][0]["detail"]["upload"] == upload_id


def test_concurrent_uploads(api: httpx.Client, server: ServerThread) -> None:
    blobs = [os.urandom(200_000 + i) for i in range(6)]

    import concurrent.futures

    def push(data: bytes) -> Digest:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return push_blob(client, "library/app", data)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        digests = list(pool.map(push, blobs))

    for data, digest in zip(blobs, digests, strict=True):
        assert api.get(f"/v2/library/app/blobs/{digest}").content == data


# ---- mounts --------------------------------------------------------------------


def test_mount_from_repository(api: httpx.Client, registry: Registry) -> None:
    digest = push_blob(api, "library/source", b"shared layer")

    response = api.post(
        "/v2/library/target/blobs/uploads/",
        params={"mount": str(digest), "from": "library/source"},
    )

    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == str(digest)
    assert response.headers["Location"].endswith(f"/v2/library/target/blobs/{digest}")
    assert api.get(f"/v2/library/target/blobs/{digest}").content == b"shared layer"
    assert upload_rows(registry) == 0


def test_mount_without_from(api: httpx.Client) -> None:
    digest = push_blob(api, "library/source", b"discoverable layer")

    response = api.post(
        "/v2/library/target/blobs/uploads/", params={"mount": str(digest)}
    )

    assert response.status_code == 201
    assert api.head(f"/v2/library/target/blobs/{digest}").status_code == 200


@pytest.mark.parametrize(
    "source",
    ["library/source-without-blob", "library/unknown", ""],
)
def test_mount_falls_back_to_upload(
    api: httpx.Client, registry: Registry, source: str
) -> None:
    digest = push_blob(api, "library/source", b"only in source")
    api.post("/v2/library/source-without-blob/blobs/uploads/")

    response = api.post(
        "/v2/library/target/blobs/uploads/",
        params={"mount": str(digest), "from": source},
    )

    if source == "":
        # An empty from means any repository, and library/source has it.
        assert response.status_code == 201
        return
    assert response.status_code == 202
    assert "/v2/library/target/blobs/uploads/" in response.headers["Location"]
    assert api.head(f"/v2/library/target/blobs/{digest}").status_code == 404
    assert "library/target" not in stored_state(registry)["repositories"]


def test_mount_of_absent_blob_falls_back(api: httpx.Client) -> None:
    push_blob(api, "library/source", b"another blob")

    response = api.post(
        "/v2/library/target/blobs/uploads/",
        params={"mount": str(Digest.of(b"absent")), "from": "library/source"},
    )

    assert response.status_code == 202


@pytest.mark.parametrize(
    "mount",
    ["sha256:zz", "sha256:nothex", "", "sha256:" + "A" * 64, "md5:" + "0" * 32],
)
def test_mount_of_invalid_digest_rejected(
    api: httpx.Client, registry: Registry, mount: str
) -> None:
    push_blob(api, "library/source", b"shared layer")
    before = stored_state(registry)

    response = api.post(
        "/v2/library/target/blobs/uploads/",
        params={"mount": mount, "from": "library/source"},
    )

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "DIGEST_INVALID"
    assert error["detail"]["parameter"] == "mount"
    assert error["detail"]["digest"] == mount
    assert upload_rows(registry) == 0
    assert stored_state(registry) == before


@pytest.mark.parametrize("source", ["Bad//Name", "Invalid Name", "lib/", "a" * 300])
def test_mount_from_invalid_name_rejected(
    api: httpx.Client, registry: Registry, source: str
) -> None:
    digest = push_blob(api, "library/source", b"shared layer")
    before = stored_state(registry)

    response = api.post(
        "/v2/library/target/blobs/uploads/",
        params={"mount": str(digest), "from": source},
    )

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "NAME_INVALID"
    assert error["detail"]["parameter"] == "from"
    assert error["detail"]["name"] == source
    assert upload_rows(registry) == 0
    assert stored_state(registry) == before


# ---- Location headers ------------------------------------------------------------


def test_location_behind_reverse_proxy(api: httpx.Client) -> None:
    response = api.post(
        "/v2/library/app/blobs/uploads/",
        headers={
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "registry.example.test",
        },
    )

    assert response.headers["Location"].startswith(
        "https://registry.example.test/v2/library/app/blobs/uploads/"
    )


def test_location_from_forwarded_header(api: httpx.Client) -> None:
    response = api.post(
        "/v2/library/app/blobs/uploads/",
        headers={"Forwarded": 'for=192.0.2.1;proto=https;host="cr.example.test:8443"'},
    )

    assert response.headers["Location"].startswith(
        "https://cr.example.test:8443/v2/library/app/blobs/uploads/"
    )


def test_location_uses_host_header(api: httpx.Client) -> None:
    response = api.post(
        "/v2/library/app/blobs/uploads/", headers={"Host": "cairn.internal:5000"}
    )

    assert response.headers["Location"].startswith(
        "http://cairn.internal:5000/v2/library/app/blobs/uploads/"
    )


def test_location_relative_when_host_is_unusable(api: httpx.Client) -> None:
    response = api.post(
        "/v2/library/app/blobs/uploads/",
        headers={"X-Forwarded-Host": "bad host/with/slashes"},
    )

    assert response.headers["Location"].startswith("/v2/library/app/blobs/uploads/")


def test_location_relative_urls_option(registry: Registry) -> None:
    with (
        running(create_app(registry, relative_urls=True)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        started = client.post("/v2/library/app/blobs/uploads/")
        location = started.headers["Location"]
        finished = client.put(
            location, params={"digest": str(Digest.of(b"x"))}, content=b"x"
        )

    assert location.startswith("/v2/library/app/blobs/uploads/")
    assert finished.status_code == 201
    assert finished.headers["Location"] == f"/v2/library/app/blobs/{Digest.of(b'x')}"


def test_nothing_committed_by_upload_start(
    api: httpx.Client, registry: Registry
) -> None:
    before = stored_state(registry)

    _upload(api, "library/never-finished")

    assert stored_state(registry) == before
    assert committed_blob_files(registry) == []


def test_sha512_monolithic_mount_and_delete(api: httpx.Client) -> None:
    data = os.urandom(1500)
    digest = Digest.of(data, "sha512")

    pushed = api.post(
        "/v2/library/app/blobs/uploads/", params={"digest": str(digest)}, content=data
    )
    mounted = api.post(
        "/v2/library/copy/blobs/uploads/",
        params={"mount": str(digest), "from": "library/app"},
    )
    deleted = api.delete(f"/v2/library/app/blobs/{digest}")

    assert pushed.status_code == 201
    assert mounted.status_code == 201
    assert mounted.headers["Docker-Content-Digest"] == str(digest)
    assert deleted.status_code == 202
    assert api.head(f"/v2/library/app/blobs/{digest}").status_code == 404
    assert api.get(f"/v2/library/copy/blobs/{digest}").content == data
