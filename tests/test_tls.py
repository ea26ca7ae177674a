"""HTTPS: `cairn certificate` and `cairn serve --tls-cert --tls-key`."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.api.https_port import configured_https_protocol, https_url
from engine.api.protocol import configured_protocol
from engine.api.tls import parse_host, self_signed_certificate, server_context
from engine.domain.digest import Digest
from tests.images import make_image
from tests.nats import wait_until
from tests.server import (
    ServeProcess,
    ServerThread,
    log_records,
    push_blob,
    push_image,
    running,
    start_serve,
)
from tests.test_clients import build_oci_layout
from tests.test_mirror import REPO_ROOT, mirror_argv

SKOPEO = shutil.which("skopeo")


@dataclass
class Certificate:
    cert: Path
    key: Path

    def trusted(self) -> ssl.SSLContext:
        """Return a client context that trusts this certificate alone."""
        return ssl.create_default_context(cafile=self.cert)


def cairn(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


def make_certificate(directory: Path, *hosts: str) -> Certificate:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Certificate(directory / "cert.pem", directory / "key.pem")
    host_options = [option for host in hosts for option in ("--host", host)]
    result = cairn(
        "certificate", *host_options, "--cert", str(pair.cert), "--key", str(pair.key)
    )
    assert result.returncode == 0, result.stderr
    return pair


def start_https(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    certificate: Certificate,
    *extra: str,
    embedded_nats: bool = False,
) -> ServeProcess:
    """Start `cairn serve` with ``certificate``, logging to tmp_path/serve.log."""
    return start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        "--tls-cert",
        str(certificate.cert),
        "--tls-key",
        str(certificate.key),
        *extra,
        embedded_nats=embedded_nats,
    )


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path / "tls", "localhost", "127.0.0.1")


@pytest.fixture
def https_serve(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> Iterator[ServeProcess]:
    process = start_https(data_dir, database_url, tmp_path, certificate)
    try:
        yield process
    finally:
        process.kill()


# ---- cairn certificate -------------------------------------------------------


def test_certificate_names_hosts(certificate: Certificate) -> None:
    parsed = x509.load_pem_x509_certificate(certificate.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["127.0.0.1"]
    constraints = parsed.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365, hours=1)


def test_certificate_key_private(certificate: Certificate) -> None:
    assert stat.S_IMODE(certificate.key.stat().st_mode) == 0o600
    # The key belongs to the certificate.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)


def test_certificate_keeps_existing_files(
    tmp_path: Path, certificate: Certificate
) -> None:
    cert_before = certificate.cert.read_bytes()
    other_key = tmp_path / "other-key.pem"

    result = cairn(
        "certificate",
        "--host",
        "localhost",
        "--cert",
        str(certificate.cert),
        "--key",
        str(other_key),
    )

    assert result.returncode == 1
    assert f"cannot write {certificate.cert}: File exists" in result.stderr
    assert certificate.cert.read_bytes() == cert_before
    # The key written before the certificate failed is removed again.
    assert not other_key.exists()


def test_certificate_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = cairn(
        "certificate",
        "--host",
        "localhost",
        "--cert",
        str(missing / "cert.pem"),
        "--key",
        str(missing / "key.pem"),
    )

    assert result.returncode == 1
    message = f"cannot write {missing / 'key.pem'}: No such file or directory\n"
    assert result.stderr.endswith(message)
    assert not missing.exists()


@pytest.mark.parametrize(
    "host",
    ["bad_host", "-registry.example", "a..b", "", "x" * 64 + ".example", "300.1.1.1"],
)
def test_certificate_rejects_invalid_host(tmp_path: Path, host: str) -> None:
    result = cairn("certificate", f"--host={host}", cwd=tmp_path)

    assert result.returncode == 2
    assert f"invalid host {host!r}" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("days", ["0", "36501", "100000000"])
def test_certificate_rejects_days(tmp_path: Path, days: str) -> None:
    result = cairn("certificate", "--host", "localhost", "--days", days, cwd=tmp_path)

    assert result.returncode == 2
    assert f"invalid number of days '{days}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_certificate_rejects_one_file_for_both(tmp_path: Path) -> None:
    same = tmp_path / "same.pem"

    result = cairn(
        "certificate", "--host", "localhost", "--cert", str(same), "--key", str(same)
    )

    assert result.returncode == 2
    assert f"--cert and --key are both {same}" in result.stderr
    assert not same.exists()


def test_certificate_drops_repeated_host(tmp_path: Path) -> None:
    pair = make_certificate(tmp_path, "127.0.0.1", "localhost", "127.0.0.1")

    parsed = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["127.0.0.1"]
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_certificate_accepts_wildcard(tmp_path: Path) -> None:
    pair = make_certificate(tmp_path, "*.registry.example", "::1")

    parsed = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["*.registry.example"]
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["::1"]


# ---- cairn serve over HTTPS --------------------------------------------------


def test_serve_https_blob_round_trip(
    https_serve: ServeProcess, certificate: Certificate
) -> None:
    assert https_serve.url.startswith("https://127.0.0.1:")
    # Larger than one read of a file body, so the body takes several writes
    # through TLS, which cannot use sendfile.
    data = os.urandom(3 * 1024 * 1024 + 17)

    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        started = client.post("/v2/library/app/blobs/uploads/")
        assert started.status_code == 202, started.text
        assert started.headers["location"].startswith(f"{https_serve.url}/v2/")
        client.delete(started.headers["location"])

        digest = push_blob(client, "library/app", data)
        pulled = client.get(f"/v2/library/app/blobs/{digest}")

    assert pulled.status_code == 200
    assert pulled.content == data
    assert Digest.of(pulled.content) == digest


def test_serve_https_rejects_untrusted_client(https_serve: ServeProcess) -> None:
    # The default trust store does not contain the self-signed certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_serve.url}/v2/")


def read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    """Read from ``sock`` until the server closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_serve_https_plain_http_request(
    https_serve: ServeProcess, certificate: Certificate
) -> None:
    host, port = https_serve.url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n\r\n"
        )
        response = read_until_closed(raw)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nconnection: close" in head
    assert b"\r\ncontent-type: application/json" in head
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert f"use {https_serve.url}" in error["message"]
    assert error["detail"] == {"url": https_serve.url}

    # httpx sends Host: localhost:PORT, which the URL keeps.
    plain = httpx.get(f"http://localhost:{port}/v2/", timeout=10)
    assert plain.status_code == 400
    assert plain.json()["errors"][0]["detail"] == {"url": f"https://localhost:{port}"}

    # The server still serves TLS clients afterwards.
    response = httpx.get(f"{https_serve.url}/v2/", verify=certificate.trusted())
    assert response.status_code == 200

    assert https_serve.stop() == 0
    records = log_records(https_serve.log_path, "plain_http_request_rejected")
    assert [record["remote"] for record in records] == ["127.0.0.1", "127.0.0.1"]
    assert [record["url"] for record in records] == [
        https_serve.url,
        f"https://localhost:{port}",
    ]


def test_serve_https_stops_with_open_connections(
    https_serve: ServeProcess, certificate: Certificate
) -> None:
    host, port = https_serve.url.removeprefix("https://").split(":")
    address = (host, int(port))
    with (
        socket.create_connection(address, timeout=30) as silent,
        socket.create_connection(address, timeout=30) as partial_tls,
        socket.create_connection(address, timeout=30) as partial_plain,
    ):
        partial_tls.sendall(b"\x16\x03\x01\x00")
        partial_plain.sendall(b"GET /v2/ HTTP/1.1\r\nHost: loc")
        # The connections wait at the server before it stops.
        response = httpx.get(f"{https_serve.url}/v2/", verify=certificate.trusted())
        assert response.status_code == 200

        started = time.monotonic()
        assert https_serve.stop() == 0
        assert time.monotonic() - started < 10
        for sock in (silent, partial_tls, partial_plain):
            assert read_until_closed(sock, timeout=5) == b""
    log = https_serve.log_path.read_text()
    assert "Traceback" not in log
    assert "plain_http_request_rejected" not in log


# Seconds that `cairn serve` may take to exit after SIGTERM in the tests
# below. asyncio waits up to 30 s for a TLS client's close_notify, so a
# server that waits for an idle client exceeds it.
STOP_BOUND_S = 10


@pytest.fixture
def https_sqlite_serve(
    data_dir: Path, tmp_path: Path, certificate: Certificate
) -> Iterator[ServeProcess]:
    """`cairn serve` with TLS on SQLite, for tests that do not need PostgreSQL."""
    database_url = f"sqlite:///{tmp_path / 'cairn.db'}"
    process = start_https(data_dir, database_url, tmp_path, certificate)
    try:
        yield process
    finally:
        process.kill()


def open_tls(served: ServeProcess, certificate: Certificate) -> ssl.SSLSocket:
    """Connect to ``served`` over TLS.

    recv raises SSLEOFError when the server closes the connection without
    sending close_notify, instead of returning b"".
    """
    host, port = served.url.removeprefix("https://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=30)
    return certificate.trusted().wrap_socket(
        raw, server_hostname=host, suppress_ragged_eofs=False
    )


def exchange(sock: ssl.SSLSocket, request: bytes) -> bytes:
    """Send ``request`` and return the response head and body."""
    sock.sendall(request)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the response head: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    assert match is not None, head
    while len(body) < int(match.group(1)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return head + b"\r\n\r\n" + body


def wait_until_refused(served: ServeProcess) -> None:
    """Wait until ``served`` refuses connections.

    uvicorn closes the listening socket and calls shutdown() on every
    connection in one step, so each connection's shutdown() has run by then.
    """
    host, port = served.url.removeprefix("https://").split(":")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{served.url} still accepts connections after SIGTERM")


def stop_within_bound(served: ServeProcess) -> None:
    """Send SIGTERM and check that the server exits with 0 within STOP_BOUND_S."""
    started = time.monotonic()
    try:
        status = served.stop(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"cairn serve took more than {STOP_BOUND_S} s to exit after SIGTERM"
        ) from None
    assert status == 0
    assert time.monotonic() - started < STOP_BOUND_S


def test_serve_https_stops_with_idle_keep_alive(
    https_sqlite_serve: ServeProcess, certificate: Certificate
) -> None:
    with open_tls(https_sqlite_serve, certificate) as idle:
        response = exchange(idle, b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")

        stop_within_bound(https_sqlite_serve)
        # b"" rather than SSLEOFError: the server sent close_notify.
        assert read_until_closed(idle, timeout=5) == b""
    assert "Traceback" not in https_sqlite_serve.log_path.read_text()


def test_serve_https_stops_after_keep_alive_timeout(
    https_sqlite_serve: ServeProcess, certificate: Certificate
) -> None:
    with open_tls(https_sqlite_serve, certificate) as idle:
        response = exchange(idle, b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        # uvicorn's keep-alive timeout (5 s by default in 0.55) closes the
        # idle connection, and the server then waits for the client's
        # close_notify, which this client never sends.
        assert read_until_closed(idle, timeout=30) == b""

        stop_within_bound(https_sqlite_serve)
    assert "Traceback" not in https_sqlite_serve.log_path.read_text()


# Seconds within which a TLS connection that the server closes while idle
# must be gone, counted from the close_notify. A server that waits for the
# client's close_notify keeps it for asyncio's ssl_shutdown_timeout (30 s).
CLOSE_BOUND_S = 15


def open_descriptors(served: ServeProcess) -> int:
    """Return the number of file descriptors that ``served`` has open."""
    return len(os.listdir(f"/proc/{served.process.pid}/fd"))


def read_tcp_until_closed(sock: ssl.SSLSocket, timeout: float) -> bytes:
    """Read the TCP connection under ``sock`` until the server's FIN.

    Call it once ``sock`` has read the server's close_notify, after which the
    server sends no TLS record. Read without TLS, the FIN returns b"".
    """
    with socket.socket(fileno=os.dup(sock.fileno())) as tcp:
        return read_until_closed(tcp, timeout)


def test_serve_https_keep_alive_timeout_closes_tcp(
    https_sqlite_serve: ServeProcess, certificate: Certificate
) -> None:
    # A first connection, closed by the client, lets the server open what it
    # keeps across requests.
    with open_tls(https_sqlite_serve, certificate) as first:
        response = exchange(first, b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        with_first = open_descriptors(https_sqlite_serve)
    wait_until(lambda: open_descriptors(https_sqlite_serve) < with_first)
    before = open_descriptors(https_sqlite_serve)

    with open_tls(https_sqlite_serve, certificate) as idle:
        response = exchange(idle, b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert open_descriptors(https_sqlite_serve) == before + 1
        # uvicorn's keep-alive timeout (5 s by default in 0.55) closes the
        # idle connection. b"" rather than SSLEOFError: close_notify came.
        assert read_until_closed(idle, timeout=30) == b""
        notified = time.monotonic()
        # The client never sends its own close_notify.
        assert read_tcp_until_closed(idle, timeout=CLOSE_BOUND_S + 5) == b""
        assert time.monotonic() - notified < CLOSE_BOUND_S
        wait_until(
            lambda: open_descriptors(https_sqlite_serve) == before,
            timeout=CLOSE_BOUND_S,
        )
    assert "Traceback" not in https_sqlite_serve.log_path.read_text()


def test_serve_https_stops_after_last_response(
    https_sqlite_serve: ServeProcess, certificate: Certificate
) -> None:
    with open_tls(https_sqlite_serve, certificate) as client:
        started = exchange(
            client,
            b"POST /v2/library/app/blobs/uploads/ HTTP/1.1\r\n"
            b"Host: localhost\r\nContent-Length: 0\r\n\r\n",
        )
        assert started.startswith(b"HTTP/1.1 202 Accepted\r\n"), started
        match = re.search(rb"location: https://[^/]+(/\S+)", started, re.IGNORECASE)
        assert match is not None, started
        location = match.group(1)

        # SIGTERM arrives while the server waits for the rest of the body.
        client.sendall(
            b"PATCH " + location + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 8\r\n\r\nfirst"
        )
        https_sqlite_serve.process.send_signal(signal.SIGTERM)
        wait_until_refused(https_sqlite_serve)
        client.sendall(b"end")
        response = exchange(client, b"")
        assert response.startswith(b"HTTP/1.1 202 Accepted\r\n"), response
        assert b"connection: close\r\n" in response.lower()

        # The client keeps the connection open after the last response.
        stop_within_bound(https_sqlite_serve)
        assert read_until_closed(client, timeout=5) == b""
    assert "Traceback" not in https_sqlite_serve.log_path.read_text()


# ---- the HTTPS port in-process, with a short handshake timeout ---------------

HANDSHAKE_TIMEOUT_S = 1.0


async def scheme_app(scope: Any, receive: Any, send: Any) -> None:
    """Return the request's scheme and path, such as "https /v2/"."""
    body = f"{scope['scheme']} {scope['path']}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def https_port(certificate: Certificate) -> Iterator[ServerThread]:
    """An HTTPS port served in-process on asyncio's loop, as `cairn serve` does."""
    context = server_context(certificate.cert, certificate.key)
    protocol = configured_https_protocol(
        configured_protocol(read_idle_timeout=1, write_idle_timeout=1),
        context,
        handshake_timeout=HANDSHAKE_TIMEOUT_S,
    )
    with running(scheme_app, protocol, asyncio.new_event_loop) as server:
        yield server


def test_https_port_closes_silent_client(https_port: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", https_port.port)) as silent:
        started = time.monotonic()
        assert read_until_closed(silent) == b""
        waited = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT_S * 0.9 < waited < HANDSHAKE_TIMEOUT_S + 5


def test_https_port_closes_partial_tls_record(
    https_port: ServerThread, certificate: Certificate
) -> None:
    url = f"https://127.0.0.1:{https_port.port}"
    with socket.create_connection(("127.0.0.1", https_port.port)) as partial:
        # The first bytes of a TLS record header, then nothing.
        partial.sendall(b"\x16\x03\x01")
        started = time.monotonic()
        assert read_until_closed(partial) == b""
        waited = time.monotonic() - started
    assert waited < HANDSHAKE_TIMEOUT_S + 5

    response = httpx.get(f"{url}/v2/", verify=certificate.trusted())
    assert response.text == "https /v2/"


def test_https_port_closes_non_tls_bytes(https_port: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", https_port.port)) as garbage:
        # Neither a TLS record nor an HTTP method: the handshake fails.
        garbage.sendall(b"\x00\x01\x02\x03" * 64)
        assert read_until_closed(garbage) == b""


def test_https_port_slow_plain_head(https_port: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", https_port.port)) as slow:
        slow.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry.example:5443\r\n")
        response = read_until_closed(slow)
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    body = json.loads(response.partition(b"\r\n\r\n")[2])
    assert body["errors"][0]["detail"] == {"url": "https://registry.example:5443"}


def test_https_port_plain_request_with_body(https_port: ServerThread) -> None:
    # The 400 reaches a client that is still sending a request body.
    url = f"http://127.0.0.1:{https_port.port}"
    response = httpx.put(
        f"{url}/v2/library/app/blobs/uploads/x", content=os.urandom(1 << 20)
    )
    assert response.status_code == 400
    assert response.headers["connection"] == "close"


def request_with_client_finished(
    port: int, context: ssl.SSLContext, request: bytes
) -> bytes:
    """Send ``request`` in the same write as the client's last handshake
    message, and return the response bytes up to the server's close."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls.write(request)
        raw.sendall(outgoing.read())
        response = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                received = raw.recv(65536)
                if not received:
                    return response
                incoming.write(received)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return response
            if not chunk:
                return response
            response += chunk


def test_https_port_requests_with_handshake(
    https_port: ServerThread, certificate: Certificate
) -> None:
    # The requests arrive in one read with the handshake's end, so the TLS
    # layer decrypts them before the HTTP protocol has the connection.
    response = request_with_client_finished(
        https_port.port,
        certificate.trusted(),
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert response.index(b"https /first") < response.index(b"https /second")


def test_https_port_keeps_idle_timeout(
    https_port: ServerThread, certificate: Certificate
) -> None:
    context = certificate.trusted()
    raw = socket.create_connection(("127.0.0.1", https_port.port), timeout=30)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert read_until_closed(tls).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        waited = time.monotonic() - started
    # The read idle timeout of 1 s, not the handshake timeout.
    assert waited < 10


@pytest.mark.parametrize(
    ("request_bytes", "response_start"),
    [
        # The read idle timeout (1 s) ends a connection without a request,
        (b"", b""),
        # and one with half a request head, after a 408.
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 408 Request Timeout\r\n"),
        # A response to a request with "Connection: close" ends it.
        (
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
        ),
    ],
    ids=["no-request", "partial-head", "connection-close"],
)
def test_https_port_closes_tcp_after_close_notify(
    https_port: ServerThread,
    certificate: Certificate,
    request_bytes: bytes,
    response_start: bytes,
) -> None:
    context = certificate.trusted()
    raw = socket.create_connection(("127.0.0.1", https_port.port), timeout=30)
    with context.wrap_socket(
        raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False
    ) as tls:
        tls.sendall(request_bytes)
        # b"" rather than SSLEOFError at the end: close_notify came.
        response = read_until_closed(tls)
        assert response.startswith(response_start)
        notified = time.monotonic()
        # The client never sends its own close_notify.
        assert read_tcp_until_closed(tls, timeout=CLOSE_BOUND_S + 5) == b""
        assert time.monotonic() - notified < CLOSE_BOUND_S


@pytest.mark.parametrize(
    ("head", "sockname", "url"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: registry.example:5443\r\n\r\n",
            ("10.0.0.1", 5000),
            "https://registry.example:5443",
        ),
        (
            b"GET / HTTP/1.1\r\nhost:  registry.example \r\n\r\n",
            ("10.0.0.1", 5000),
            "https://registry.example:5000",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: [::1]:5443\r\n\r\n",
            ("::1", 5000, 0, 0),
            "https://[::1]:5443",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            ("::1", 5000, 0, 0),
            "https://[::1]:5000",
        ),
        (b"GET / HTTP/1.0\r\n\r\n", ("10.0.0.1", 5000), "https://10.0.0.1:5000"),
        (b"GET / HTTP/1.0\r\n\r\n", ("::1", 5000, 0, 0), "https://[::1]:5000"),
        (
            b'GET / HTTP/1.1\r\nHost: a"<b>\r\n\r\n',
            ("10.0.0.1", 5000),
            "https://10.0.0.1:5000",
        ),
        (b"GET /host:x HTTP/1.1\r\n\r\n", ("10.0.0.1", 5000), "https://10.0.0.1:5000"),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            ("10.0.0.1", 5000),
            "https://10.0.0.1:5000",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: registry.example:99999\r\n\r\n",
            ("10.0.0.1", 5000),
            "https://10.0.0.1:5000",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: registry.example:65535\r\n\r\n",
            ("10.0.0.1", 5000),
            "https://registry.example:65535",
        ),
    ],
)
def test_https_url(head: bytes, sockname: tuple[object, ...], url: str) -> None:
    assert https_url(head, sockname) == url


def write_certificate(
    directory: Path, now: datetime.datetime, days: int
) -> Certificate:
    """Write a certificate for localhost issued at ``now``, valid ``days``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = self_signed_certificate([parse_host("localhost")], days, now)
    pair = Certificate(directory / "cert.pem", directory / "key.pem")
    pair.cert.write_bytes(cert_pem)
    pair.key.write_bytes(key_pem)
    return pair


@pytest.mark.parametrize(
    ("issued_days_ago", "days", "event"),
    [
        (400, 365, "tls_certificate_expired"),
        (-2, 365, "tls_certificate_not_yet_valid"),
        (350, 365, "tls_certificate_expires_soon"),
        (0, 365, None),
    ],
)
def test_serve_https_warns_about_validity(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    issued_days_ago: int,
    days: int,
    event: str | None,
) -> None:
    issued = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        days=issued_days_ago
    )
    pair = write_certificate(tmp_path / "tls", issued, days)

    served = start_https(data_dir, database_url, tmp_path, pair)
    try:
        assert served.stop() == 0
    finally:
        served.kill()

    events = [
        json.loads(line)["event"]
        for line in served.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    warnings = [name for name in events if name.startswith("tls_certificate_")]
    assert warnings == ([event] if event else [])


def test_serve_https_read_idle_timeout(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> None:
    served = start_https(
        data_dir, database_url, tmp_path, certificate, "--read-idle-timeout", "1"
    )
    try:
        host, port = served.url.removeprefix("https://").split(":")
        raw = socket.create_connection((host, int(port)), timeout=30)
        with certificate.trusted().wrap_socket(raw, server_hostname=host) as tls:
            # Half a request head, then nothing.
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n")
            started = time.monotonic()
            response = read_until_closed(tls)
            waited = time.monotonic() - started
        assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert waited < 20
        assert served.stop() == 0
    finally:
        served.kill()
    log = served.log_path.read_text()
    assert "Traceback" not in log


def test_serve_https_publishes_to_embedded_nats(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> None:
    served = start_https(
        data_dir, database_url, tmp_path, certificate, embedded_nats=True
    )
    try:
        with httpx.Client(base_url=served.url, verify=certificate.trusted()) as client:
            push_image(client, "library/app", make_image(), "v1")

            def caught_up() -> bool:
                health = client.get("/_cairn/health").json()
                return bool(health["bus"]["state"] == "caught_up")

            wait_until(caught_up)
        assert served.stop() == 0
    finally:
        served.kill()


def serve_until_exit(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return cairn(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--no-nats",
        *argv,
    )


@pytest.mark.parametrize("option", ["--tls-cert", "--tls-key"])
def test_serve_tls_option_alone(
    tmp_path: Path, certificate: Certificate, option: str
) -> None:
    other = "--tls-key" if option == "--tls-cert" else "--tls-cert"

    result = serve_until_exit(tmp_path, option, str(certificate.cert))

    assert result.returncode == 2
    assert f"{option} needs {other}" in result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_tls_missing_file(tmp_path: Path, certificate: Certificate) -> None:
    missing = tmp_path / "missing.pem"

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(missing), "--tls-key", str(certificate.key)
    )

    assert result.returncode == 1
    assert f"TLS file {missing} not found" in result.stderr


def test_serve_tls_key_of_other_certificate(
    tmp_path: Path, certificate: Certificate
) -> None:
    other = make_certificate(tmp_path / "other", "localhost")

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(other.key)
    )

    assert result.returncode == 1
    assert f"cannot use certificate {certificate.cert} with key {other.key}" in (
        result.stderr
    )


def test_serve_tls_key_encrypted(tmp_path: Path, certificate: Certificate) -> None:
    private_key = serialization.load_pem_private_key(
        certificate.key.read_bytes(), password=None
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(encrypted)
    )

    assert result.returncode == 1
    assert f"key {encrypted} is encrypted" in result.stderr
    assert "pass phrase" not in result.stderr + result.stdout


def test_serve_tls_file_is_directory(tmp_path: Path, certificate: Certificate) -> None:
    result = serve_until_exit(
        tmp_path, "--tls-cert", str(tmp_path), "--tls-key", str(certificate.key)
    )

    assert result.returncode == 1
    assert f"TLS file {tmp_path} is a directory" in result.stderr


def test_serve_tls_key_not_pem(tmp_path: Path, certificate: Certificate) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(garbage)
    )

    assert result.returncode == 1
    assert f"with key {garbage}" in result.stderr


# ---- skopeo verifies the certificate -----------------------------------------


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_skopeo_copy_over_https(
    https_serve: ServeProcess,
    certificate: Certificate,
    client_env: dict[str, str],
    tmp_path: Path,
) -> None:
    assert SKOPEO is not None
    source = tmp_path / "source"
    digest = build_oci_layout(source, "v1")
    cert_dir = tmp_path / "certs.d"
    cert_dir.mkdir()
    shutil.copy(certificate.cert, cert_dir / "ca.crt")
    host = https_serve.url.removeprefix("https://")
    skopeo = [SKOPEO, "--policy", client_env["POLICY"]]

    untrusted = subprocess.run(
        [*skopeo, "copy", f"oci:{source}:v1", f"docker://{host}/library/tls:v1"],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr

    for argv in (
        [
            "copy",
            "--preserve-digests",
            "--dest-cert-dir",
            str(cert_dir),
            f"oci:{source}:v1",
            f"docker://{host}/library/tls:v1",
        ],
        [
            "copy",
            "--preserve-digests",
            "--src-cert-dir",
            str(cert_dir),
            f"docker://{host}/library/tls:v1",
            f"oci:{tmp_path / 'copied-back'}:v1",
        ],
    ):
        result = subprocess.run(
            [*skopeo, *argv],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr

    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        response = client.head(f"/v2/library/tls/manifests/{digest}")
    assert response.status_code == 200


# ---- the mirror reads an HTTPS source ----------------------------------------


def test_mirror_from_https_source(
    https_serve: ServeProcess, certificate: Certificate, tmp_path: Path
) -> None:
    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        push_image(client, "library/app", make_image(), "v1")
    layout = tmp_path / "layout"
    argv = mirror_argv(https_serve.url, f"oci:{layout}", "--once", "--retries", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.pop("SSL_CERT_DIR", None)

    untrusted = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**env, "SSL_CERT_FILE": ""},
        timeout=300,
    )
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr

    trusted = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**env, "SSL_CERT_FILE": str(certificate.cert)},
        timeout=300,
    )
    assert trusted.returncode == 0, trusted.stderr[-4000:]
    index = json.loads((layout / "library" / "app" / "index.json").read_text())
    tags = [
        entry["annotations"]["org.opencontainers.image.ref.name"]
        for entry in index["manifests"]
    ]
    assert tags == ["v1"]
