"""Writes onto a full disk, on SQLite and PostgreSQL.

The first two tests give `cairn serve` a data directory on a small tmpfs
that they mount themselves, and skip when they cannot mount one. The first
fills it with blobs. The second keeps the SQLite database there too and
sends a manifest that the database cannot store. The others make fsync or
fdatasync of staging files fail, because on tmpfs only write() runs out
of space, or make the creation of a staging file fail. In every case the
client gets 507 with an OCI error body, and no event, blob link, blob
file, upload session or staging file remains. A write to an upload
without a session gets 404 BLOB_UPLOAD_UNKNOWN even on a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import structlog

from engine.api.app import create_app
from engine.api.body import BUFFER_SIZE
from engine.blobs import store
from engine.db import is_database_full
from engine.domain.digest import Digest
from engine.domain.errors import InsufficientStorage
from engine.registry import Registry
from tests.server import (
    ServeProcess,
    committed_blob_files,
    log_records,
    push_blob,
    running,
    start_serve,
    stored_state,
    upload_rows,
)

TMPFS_SIZE = 256 * 1024
# Room for an empty SQLite database and its write-ahead log, but not for a
# manifest of twice this size, which is still under the 4 MiB manifest limit.
DATABASE_DISK_SIZE = 1536 * 1024
# Larger than the tmpfs, and at most 1 MiB, so the server reads the whole
# body before it writes and can respond before it closes the connection.
BODY_SIZE = 512 * 1024
# Large enough for the body to go through the worker-thread pipe.
LARGE_BODY_SIZE = 4 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Return a directory with a tmpfs of TMPFS_SIZE bytes mounted on it,
    and unmount it after the test."""
    with mounted_tmpfs(tmp_path / "small-disk", TMPFS_SIZE) as path:
        yield path


@contextmanager
def mounted_tmpfs(path: Path, size: int) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir()
    options = f"size={size},mode=0700"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def staging_files(registry: Registry) -> list[str]:
    return sorted(path.name for path in registry.blob_store.paths.staging_dir.iterdir())


def assert_nothing_stored(registry: Registry, before: dict[str, object]) -> None:
    assert stored_state(registry) == before
    assert committed_blob_files(registry) == []
    assert upload_rows(registry) == 0
    assert staging_files(registry) == []


def assert_insufficient_storage(
    status: int, error: dict[str, Any], reason: str
) -> None:
    assert status == 507
    assert error["code"] == "UNKNOWN"
    assert "storage is full" in error["message"]
    assert error["detail"] == {"reason": reason}


# ---- a real full disk ------------------------------------------------------------

# Each case sends one upload that cannot fit on the tmpfs and returns the
# response status and its error.
DiskCase = Callable[[httpx.Client, ServeProcess], tuple[int, dict[str, Any]]]


def _error(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    errors = response.json()["errors"]
    assert len(errors) == 1
    return response.status_code, errors[0]


def _post(api: httpx.Client, serve: ServeProcess) -> tuple[int, dict[str, Any]]:
    data = os.urandom(BODY_SIZE)
    return _error(
        api.post(
            "/v2/demo/app/blobs/uploads/",
            params={"digest": str(Digest.of(data))},
            content=data,
        )
    )


def _patch(api: httpx.Client, serve: ServeProcess) -> tuple[int, dict[str, Any]]:
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    return _error(
        api.patch(
            location,
            content=os.urandom(BODY_SIZE),
            headers={"Content-Range": f"0-{BODY_SIZE - 1}"},
        )
    )


def _patch_after_chunk(
    api: httpx.Client, serve: ServeProcess
) -> tuple[int, dict[str, Any]]:
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    first = api.patch(location, content=b"a" * 65536)
    assert first.status_code == 202, first.text
    return _error(api.patch(first.headers["Location"], content=os.urandom(BODY_SIZE)))


def _put(api: httpx.Client, serve: ServeProcess) -> tuple[int, dict[str, Any]]:
    data = os.urandom(BODY_SIZE)
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    return _error(
        api.put(
            httpx.URL(location).copy_merge_params({"digest": str(Digest.of(data))}),
            content=data,
        )
    )


def _post_large(api: httpx.Client, serve: ServeProcess) -> tuple[int, dict[str, Any]]:
    """POST a body that goes through the worker-thread pipe.

    The client sends the first BUFFER_SIZE bytes of the declared body, which
    the server reads and fails to write, and then sends nothing more: the
    response must come without further body bytes. Every byte sent has been
    read, so closing the connection sends no reset, which could discard the
    response before the client reads it.
    """
    data = os.urandom(LARGE_BODY_SIZE)
    port = httpx.URL(serve.url).port
    assert port is not None
    head = (
        f"POST /v2/demo/app/blobs/uploads/?digest={Digest.of(data)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    # Under the server's read idle timeout (60 s), which would also end the
    # request and send the error.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head + data[:BUFFER_SIZE])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk

    head_bytes, _, body = reply.partition(b"\r\n\r\n")
    assert b"connection: close" in head_bytes.lower()
    response = httpx.Response(int(head_bytes.split(b" ", 2)[1]), content=body)
    return _error(response)


DISK_CASES: list[tuple[str, DiskCase]] = [
    ("post", _post),
    ("patch", _patch),
    ("patch-after-chunk", _patch_after_chunk),
    ("put", _put),
    ("post-large", _post_large),
]


def test_full_disk_stores_nothing(
    small_disk: Path, database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    serve = start_serve(small_disk, database_url, log_path)
    registry = Registry.open(small_disk, database_url)
    try:
        with httpx.Client(base_url=serve.url, timeout=60) as api:
            for name, send in DISK_CASES:
                before = stored_state(registry)

                status, error = send(api, serve)

                assert status == 507, name
                assert_insufficient_storage(status, error, "No space left on device")
                assert_nothing_stored(registry, before)

            # The failed uploads freed their space, so a small blob fits.
            small = os.urandom(4096)
            push_blob(api, "demo/app", small)

        assert committed_blob_files(registry) == [str(Digest.of(small))]
        assert serve.stop() == 0
    finally:
        serve.kill()
        registry.database.dispose()

    records = log_records(log_path, "blob_storage_full")
    assert len(records) == len(DISK_CASES)
    assert all("No space left on device" in record["error"] for record in records)
    assert all(record["level"] == "error" for record in records)
    assert all(record["repository"] == "demo/app" for record in records)
    assert all(record["data_dir"] == str(small_disk) for record in records)
    assert [record["upload"] is None for record in records] == [
        name.startswith("post") for name, _ in DISK_CASES
    ]


def test_full_database_disk_stores_nothing(tmp_path: Path) -> None:
    # The SQLite database lives on the tmpfs too. It fits in DATABASE_DISK_SIZE
    # when empty, and a manifest larger than that cannot be written to it.
    with mounted_tmpfs(tmp_path / "disk", DATABASE_DISK_SIZE) as disk:
        _fill_database_disk(disk, tmp_path / "serve.log")

    records = log_records(tmp_path / "serve.log", "database_storage_full")
    assert len(records) == 1
    assert records[0]["level"] == "error"


def _fill_database_disk(disk: Path, log_path: Path) -> None:
    database_url = f"sqlite:///{disk / 'cairn.db'}"
    serve = start_serve(disk, database_url, log_path)
    registry = Registry.open(disk, database_url)
    try:
        with httpx.Client(base_url=serve.url, timeout=60) as api:
            config = b"{}"
            push_blob(api, "demo/app", config)
            before = stored_state(registry)

            response = api.put(
                "/v2/demo/app/manifests/big",
                content=_manifest(config, padding=2 * DATABASE_DISK_SIZE),
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )

            assert response.status_code == 507, response.text
            _, error = _error(response)
            assert error["code"] == "UNKNOWN"
            assert "database is full" in error["message"]
            assert "full" in error["detail"]["reason"]
            assert stored_state(registry) == before

            # The failed write freed its space, so a small manifest fits.
            small = api.put(
                "/v2/demo/app/manifests/small",
                content=_manifest(config, padding=0),
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
            assert small.status_code == 201, small.text
        assert serve.stop() == 0
    finally:
        serve.kill()
        registry.database.dispose()


def test_postgres_disk_full_recognised() -> None:
    error = psycopg.errors.DiskFull("could not extend file")
    wrapped = sa.exc.OperationalError("INSERT", {}, error)

    assert is_database_full(wrapped)
    assert is_database_full(error)
    assert not is_database_full(psycopg.errors.QueryCanceled("canceled"))


def _manifest(config: bytes, padding: int) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(Digest.of(config)),
            "size": len(config),
        },
        "layers": [],
        "annotations": {"padding": os.urandom(padding // 2).hex()},
    }
    return json.dumps(document).encode()


# ---- failures at fsync -----------------------------------------------------------


def fail_for_staging_files(
    monkeypatch: pytest.MonkeyPatch, registry: Registry, name: str, code: int
) -> None:
    """Make ``os.<name>`` raise OSError ``code`` for staging files only."""
    staging_dir = registry.blob_store.paths.staging_dir.resolve()
    real = getattr(os, name)

    def failing(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == staging_dir:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, name, failing)


def fail_to_create_staging_files(
    monkeypatch: pytest.MonkeyPatch, registry: Registry, code: int
) -> None:
    """Make ``os.open`` raise OSError ``code`` when it creates a staging file."""
    staging_dir = registry.blob_store.paths.staging_dir.resolve()
    real = os.open

    def failing(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(path).resolve().parent == staging_dir:
            raise OSError(code, os.strerror(code))
        return real(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", failing)


@pytest.fixture
def api(registry: Registry) -> Iterator[httpx.Client]:
    with (
        running(create_app(registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_fsync_disk_full_at_commit(
    api: httpx.Client,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    fail_for_staging_files(monkeypatch, registry, "fsync", code)
    data = os.urandom(4096)
    digest = str(Digest.of(data))
    before = stored_state(registry)

    monolithic = api.post(
        "/v2/demo/app/blobs/uploads/", params={"digest": digest}, content=data
    )
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    chunk = api.patch(location, content=data)
    finished = api.put(chunk.headers["Location"], params={"digest": digest})

    assert chunk.status_code == 202
    for response in (monolithic, finished):
        status, error = _error(response)
        assert_insufficient_storage(status, error, os.strerror(code))
    assert_nothing_stored(registry, before)


def test_other_fsync_error_is_500(
    api: httpx.Client, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_for_staging_files(monkeypatch, registry, "fsync", errno.EIO)
    data = os.urandom(4096)
    before = stored_state(registry)

    response = api.post(
        "/v2/demo/app/blobs/uploads/",
        params={"digest": str(Digest.of(data))},
        content=data,
    )

    assert response.status_code == 500
    assert response.json()["errors"][0]["code"] == "UNKNOWN"
    assert_nothing_stored(registry, before)


def test_background_sync_error_fails_commit(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed writeback is reported to one fsync of a descriptor only, so
    # the commit must raise the error that the background fdatasync got.
    monkeypatch.setattr(store, "BACKGROUND_SYNC_BYTES", 1024)
    fail_for_staging_files(monkeypatch, registry, "fdatasync", errno.ENOSPC)
    blobs = registry.repository("demo/app").blobs
    data = os.urandom(4096)
    before = stored_state(registry)

    with pytest.raises(InsufficientStorage) as raised:
        blobs.push(Digest.of(data), iter([data[:2048], data[2048:]]))

    assert raised.value.detail == {"reason": os.strerror(errno.ENOSPC)}
    assert_nothing_stored(registry, before)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_staging_file_creation_disk_full(
    api: httpx.Client,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    code: int,
) -> None:
    # The first write to an upload creates its staging file when it takes
    # the file's lock.
    data = os.urandom(4096)
    before = stored_state(registry)
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    upload_id = httpx.URL(location).path.rsplit("/", 1)[1]
    fail_to_create_staging_files(monkeypatch, registry, code)

    with structlog.testing.capture_logs() as logs:
        response = api.request(
            method,
            location,
            params={"digest": str(Digest.of(data))} if method == "PUT" else None,
            content=data,
        )

    status, error = _error(response)
    assert_insufficient_storage(status, error, os.strerror(code))
    full = [entry for entry in logs if entry["event"] == "blob_storage_full"]
    assert len(full) == 1
    assert full[0]["log_level"] == "error"
    assert full[0]["upload"] == upload_id
    assert full[0]["repository"] == "demo/app"
    assert os.strerror(code) in full[0]["error"]
    assert_nothing_stored(registry, before)
    monkeypatch.undo()
    assert api.get(location).status_code == 404


def test_full_disk_unknown_upload_404(
    api: httpx.Client, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id = str(uuid.uuid4())
    fail_to_create_staging_files(monkeypatch, registry, errno.ENOSPC)

    with structlog.testing.capture_logs() as logs:
        response = api.patch(
            f"/v2/demo/app/blobs/uploads/{upload_id}", content=b"chunk"
        )

    status, error = _error(response)
    assert status == 404
    assert error["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert error["detail"] == {"upload": upload_id}
    assert [entry for entry in logs if entry["event"] == "blob_storage_full"] == []
    assert staging_files(registry) == []
