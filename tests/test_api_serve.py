"""`cairn serve` as a subprocess: start-up, clean shutdown, restart mid-upload."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.domain.digest import Digest
from tests.conftest import reset_postgres
from tests.server import ServeProcess, log_records, start_serve


@pytest.fixture
def serve(data_dir: Path, database_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    process = start_serve(data_dir, database_url, tmp_path / "serve.log")
    try:
        yield process
    finally:
        process.kill()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_serve_stops_cleanly(serve: ServeProcess, sig: int) -> None:
    assert httpx.get(f"{serve.url}/v2/").status_code == 200

    status = serve.stop(sig)

    assert status == 0
    log = serve.log_path.read_text()
    assert "server_started" in log
    assert "server_stopped" in log
    assert "Traceback" not in log


def test_serve_finishes_in_flight_request(serve: ServeProcess) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = Digest.of(data)
    first_chunk_sent = threading.Event()

    def body() -> Iterator[bytes]:
        yield data[: 1024 * 1024]
        first_chunk_sent.set()
        # Hold the request open until SIGTERM has been sent.
        while serve.process.poll() is None and not stop_sent.is_set():
            stop_sent.wait(0.05)
        yield data[1024 * 1024 :]

    stop_sent = threading.Event()
    result: dict[str, httpx.Response] = {}

    def push() -> None:
        result["response"] = httpx.post(
            f"{serve.url}/v2/library/app/blobs/uploads/",
            params={"digest": str(digest)},
            content=body(),
            timeout=60,
        )

    pusher = threading.Thread(target=push)
    pusher.start()
    assert first_chunk_sent.wait(30)
    serve.process.send_signal(signal.SIGTERM)
    stop_sent.set()
    pusher.join(60)

    assert result["response"].status_code == 201
    assert serve.process.wait(timeout=30) == 0


def test_upload_resumes_after_restart(
    serve: ServeProcess, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = Digest.of(data)
    with httpx.Client(base_url=serve.url, timeout=60) as client:
        location = client.post("/v2/library/app/blobs/uploads/").headers["Location"]
        path = location.removeprefix(serve.url)
        first = client.patch(
            location,
            content=data[: 2 * 1024 * 1024],
            headers={"Content-Range": f"0-{2 * 1024 * 1024 - 1}"},
        )
        assert first.status_code == 202
    serve.kill()

    restarted = start_serve(data_dir, database_url, tmp_path / "restarted.log")
    try:
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            status = client.get(path)
            assert status.status_code == 204
            assert status.headers["Range"] == f"0-{2 * 1024 * 1024 - 1}"
            rest = client.patch(
                path,
                content=data[2 * 1024 * 1024 :],
                headers={"Content-Range": f"{2 * 1024 * 1024}-{len(data) - 1}"},
            )
            assert rest.status_code == 202
            finished = client.put(path, params={"digest": str(digest)})
            assert finished.status_code == 201
            assert client.get(f"/v2/library/app/blobs/{digest}").content == data
    finally:
        assert restarted.stop() == 0


def test_upload_killed_mid_chunk_resumes(
    serve: ServeProcess, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = Digest.of(data)
    with httpx.Client(base_url=serve.url, timeout=60) as client:
        location = client.post("/v2/library/app/blobs/uploads/").headers["Location"]
        path = location.removeprefix(serve.url)
        client.patch(location, content=data[:1000])

    # Half a chunk reaches the server, which is then killed outright.
    host, port = serve.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {len(data) - 1000}\r\n\r\n".encode()
            + data[1000:500_000]
        )
        serve.kill()

    restarted = start_serve(data_dir, database_url, tmp_path / "restarted.log")
    try:
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            assert client.get(path).headers["Range"] == "0-999"
            rest = client.put(
                path,
                params={"digest": str(digest)},
                content=data[1000:],
                headers={"Content-Range": f"1000-{len(data) - 1}"},
            )
            assert rest.status_code == 201
            assert client.get(f"/v2/library/app/blobs/{digest}").content == data
    finally:
        restarted.stop()


def test_large_upload_memory_stays_flat(serve: ServeProcess) -> None:
    chunk = os.urandom(1024 * 1024)
    total_mib = 256
    digest = Digest.of(chunk * total_mib)
    before = _peak_rss_kib(serve.process.pid)

    def body() -> Iterator[bytes]:
        for _ in range(total_mib):
            yield chunk

    response = httpx.post(
        f"{serve.url}/v2/library/app/blobs/uploads/",
        params={"digest": str(digest)},
        content=body(),
        timeout=300,
    )

    assert response.status_code == 201
    grown_mib = (_peak_rss_kib(serve.process.pid) - before) / 1024
    # The pipeline keeps a handful of 1 MiB buffers, and 64 MiB leaves room for
    # the allocator and the database driver, far below the 256 MiB sent.
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_idle_upload_expires_on_restart(
    serve: ServeProcess, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    with httpx.Client(base_url=serve.url, timeout=60) as client:
        location = client.post("/v2/library/app/blobs/uploads/").headers["Location"]
        path = location.removeprefix(serve.url)
        assert client.patch(location, content=b"partial").status_code == 202
    serve.kill()
    time.sleep(0.5)

    # 0.0001 hours is 0.36 s, so the upload is idle past its expiry by now.
    restarted = start_serve(
        data_dir, database_url, tmp_path / "restarted.log", "--upload-expiry", "0.0001"
    )
    try:
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            deadline = time.monotonic() + 30
            status = client.get(path)
            while status.status_code == 204 and time.monotonic() < deadline:
                time.sleep(0.1)
                status = client.get(path)
            assert status.status_code == 404
            assert status.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        # The purge deletes the session before the staging file, so the
        # 404 can come a moment before the file is gone.
        staging = data_dir / "uploads"
        while list(staging.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(staging.iterdir()) == []
    finally:
        assert restarted.stop() == 0


def test_serve_accepts_once_address_printed(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    # The embedded NATS server starts after the address is printed, so a
    # client that connects at once must wait in the backlog, not be refused.
    served = start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        embedded_nats=True,
        wait_until_up=False,
    )
    try:
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status_line = sock.makefile("rb").readline()
        assert status_line.startswith(b"HTTP/1.1 200 ")
        assert served.stop() == 0
    finally:
        served.kill()


def test_serve_hides_query_string_password(
    postgres_url: str, data_dir: Path, tmp_path: Path
) -> None:
    # psycopg takes a password from the query string as well as from the
    # user information.
    reset_postgres(postgres_url)
    log_path = tmp_path / "serve.log"
    served = start_serve(data_dir, f"{postgres_url}?password=hunter2", log_path)
    try:
        assert served.stop() == 0
        assert served.process.stdout is not None
        printed = served.process.stdout.read().decode()
    finally:
        served.kill()

    assert "password=***" in printed
    assert "hunter2" not in printed
    [started] = log_records(log_path, "server_started")
    assert "password=***" in started["database"]
    assert "hunter2" not in log_path.read_text()


def test_download_cut_at_shutdown_is_logged(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    serve = start_serve(
        data_dir,
        database_url,
        log_path,
        "--shutdown-timeout",
        "0.5",
        "--write-idle-timeout",
        "0",
    )
    try:
        data = os.urandom(32 * 1024 * 1024)
        digest = Digest.of(data)
        pushed = httpx.post(
            f"{serve.url}/v2/library/app/blobs/uploads/",
            params={"digest": str(digest)},
            content=data,
            timeout=60,
        )
        assert pushed.status_code == 201
        port = int(serve.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                f"GET /v2/library/app/blobs/{digest} HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\n\r\n".encode()
            )
            # Read a little, then stop, so that the download is still
            # running when the shutdown timeout ends.
            assert sock.recv(65536)
            time.sleep(0.5)
            assert serve.stop(signal.SIGTERM) == 0
    finally:
        serve.kill()

    finished = log_records(
        log_path, "request_finished", path=f"/v2/library/app/blobs/{digest}"
    )
    assert len(finished) == 1, finished
    assert finished[0]["cancelled"] is True
    assert 0 < finished[0]["bytes_out"] < len(data)
    # The request_finished line reports the cancellation, so uvicorn's
    # error record with the CancelledError traceback is left out.
    assert "Exception in ASGI application" not in log_path.read_text()


def _read_reply(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """Read one response until the server closes the connection; return its
    status line, its headers with lower-case names, and its body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, body


def test_request_cut_at_shutdown_gets_503(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    serve = start_serve(data_dir, database_url, log_path, "--shutdown-timeout", "0.5")
    port = int(serve.url.rsplit(":", 1)[1])
    blob = os.urandom(20 * 1024 * 1024)
    blob_path = f"/v2/library/app/blobs/uploads/?digest={Digest.of(blob)}"
    manifest_path = "/v2/library/app/manifests/v1"
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as upload,
            socket.create_connection(("127.0.0.1", port), timeout=30) as manifest,
        ):
            # Two requests whose bodies stop part of the way, so that they
            # still run when the shutdown timeout ends: a blob large enough
            # to be streamed to a worker thread, and a manifest.
            upload.sendall(
                f"POST {blob_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/octet-stream\r\n"
                f"Content-Length: {len(blob)}\r\n\r\n".encode()
                + blob[: 2 * 1024 * 1024]
            )
            manifest.sendall(
                f"PUT {manifest_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                "Content-Length: 1000\r\n\r\n{".encode()
            )
            # The upload's staging file appears once its first bytes reach
            # the worker thread, so both requests are running by then.
            staging = data_dir / "uploads"
            deadline = time.monotonic() + 30
            while not any(staging.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            serve.process.send_signal(signal.SIGTERM)
            replies = [_read_reply(upload), _read_reply(manifest)]
        assert serve.process.wait(timeout=30) == 0
    finally:
        serve.kill()

    for status_line, headers, body in replies:
        assert status_line == "HTTP/1.1 503 Service Unavailable"
        assert headers["content-type"] == "application/json"
        assert headers["docker-distribution-api-version"] == "registry/2.0"
        assert headers["retry-after"].isdigit()
        assert headers["connection"] == "close"
        errors = json.loads(body)["errors"]
        assert len(errors) == 1
        assert errors[0]["code"] == "UNAVAILABLE"
        assert errors[0]["message"].startswith("the server is shutting down")
        assert errors[0]["detail"] == {"request_id": headers["x-request-id"]}
    for path in (blob_path.split("?")[0], manifest_path):
        finished = log_records(log_path, "request_finished", path=path)
        assert len(finished) == 1, finished
        assert finished[0]["status"] == 503
        assert finished[0]["cancelled"] is True
    assert "Exception in ASGI application" not in log_path.read_text()
    # Neither request stored anything.
    assert list((data_dir / "uploads").iterdir()) == []
    assert not list((data_dir / "blobs").rglob("*/*/*"))
