"""The Host header: one valid value per request, and one in every HTTP/1.1
request (RFC 9112 section 3.2), checked by a real `cairn serve` over raw
sockets on 127.0.0.1, on plain HTTP and over TLS."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api.app import create_app
from engine.api.auth import Role, add_user
from engine.registry import Registry
from engine.tables import uploads
from tests.server import ServeProcess, serve_cairn, wait_for_log_record
from tests.test_api_zerocopy import RawResponse, connection, read_response
from tests.test_tls import make_certificate, open_tls, start_https

UPLOADS_PATH = "/v2/library/app/blobs/uploads/"

MISSING_HOST = "missing Host header"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = serve_cairn(tmp_path_factory.mktemp("host") / "serve")
    try:
        yield process
    finally:
        process.kill()


def database_url(served: ServeProcess) -> str:
    return f"sqlite:///{served.log_path.parent / 'cairn.db'}"


def upload_sessions(served: ServeProcess) -> int:
    engine = sa.create_engine(database_url(served))
    try:
        with engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(uploads)
            ).scalar_one()
    finally:
        engine.dispose()


def send(served: ServeProcess, head: str, method: str = "GET") -> RawResponse:
    """Send one request of ``head`` lines and return the response."""
    with connection(served.url) as (sock, reader):
        sock.sendall(("\r\n".join(head.splitlines()) + "\r\n\r\n").encode("latin-1"))
        return read_response(reader, method)


def host_error(response: RawResponse) -> dict[str, Any]:
    """Return the one OCI error of a Host rejection, checking its shape."""
    assert response.status == 400, response.body
    assert response.headers["content-type"] == "application/json"
    errors = json.loads(response.body)["errors"]
    assert len(errors) == 1
    error: dict[str, Any] = errors[0]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["header"] == "Host"
    return error


def test_missing_host_rejected(serve: ServeProcess) -> None:
    error = host_error(send(serve, "GET /v2/ HTTP/1.1"))

    assert error["message"].startswith(MISSING_HOST)
    assert error["detail"]["values"] == []


def test_missing_host_opens_no_upload(serve: ServeProcess) -> None:
    before = upload_sessions(serve)

    error = host_error(
        send(serve, f"POST {UPLOADS_PATH} HTTP/1.1\nContent-Length: 0", "POST")
    )

    assert error["message"].startswith(MISSING_HOST)
    assert upload_sessions(serve) == before


def test_duplicate_host_rejected(serve: ServeProcess) -> None:
    before = upload_sessions(serve)

    error = host_error(
        send(
            serve,
            f"POST {UPLOADS_PATH} HTTP/1.1\nHost: a.example\nHost: b.example\n"
            "Content-Length: 0",
            "POST",
        )
    )

    assert error["message"] == (
        "the Host header is given 2 times ('a.example', 'b.example'), but a "
        "request may give it once"
    )
    assert error["detail"]["values"] == ["a.example", "b.example"]
    assert upload_sessions(serve) == before


def test_duplicate_host_rejected_in_http10(serve: ServeProcess) -> None:
    error = host_error(
        send(serve, "GET /v2/ HTTP/1.0\nHost: 127.0.0.1\nHost: 127.0.0.1")
    )

    assert error["detail"]["values"] == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x:1:2",
        "[::1",
        "[::1]]",
        "[::1]:5000]",
        "a]b",
        "[zz]",
        "[not-ipv6]:5000",
        "x:+5",
        "a b",
        "a.example/path",
        "a.example:port",
        "a.example:65536",
        "user@a.example",
        "r\xe9gistry.example",
    ],
)
def test_invalid_host_rejected(serve: ServeProcess, value: str) -> None:
    before = upload_sessions(serve)

    error = host_error(
        send(
            serve,
            f"POST {UPLOADS_PATH} HTTP/1.1\nHost: {value}\nContent-Length: 0",
            "POST",
        )
    )

    assert error["message"].startswith(f"invalid Host header {value!r}: ")
    assert error["detail"]["values"] == [value]
    assert upload_sessions(serve) == before


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", "localhost:5000", "registry.example", "[::1]:5000", "[::1]"],
)
def test_valid_host_accepted(serve: ServeProcess, value: str) -> None:
    response = send(
        serve, f"POST {UPLOADS_PATH} HTTP/1.1\nHost: {value}\nContent-Length: 0", "POST"
    )

    assert response.status == 202, response.body
    assert response.headers["location"].startswith(f"http://{value}{UPLOADS_PATH}")


def test_http10_without_host_accepted(serve: ServeProcess) -> None:
    response = send(serve, f"POST {UPLOADS_PATH} HTTP/1.0\nContent-Length: 0", "POST")

    assert response.status == 202, response.body
    # The URL names the address that the connection reached.
    assert response.headers["location"].startswith(f"{serve.url}{UPLOADS_PATH}")


def test_http10_without_host_names_ipv6_address(registry: Registry) -> None:
    # The app is called as an ASGI server listening on ::1 would call it, so
    # that the test needs no IPv6 socket.
    scope = {
        "type": "http",
        "http_version": "1.0",
        "method": "POST",
        "path": UPLOADS_PATH,
        "raw_path": UPLOADS_PATH.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"0")],
        "client": ("::1", 40000),
        "server": ("::1", 5443),
        "scheme": "http",
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(create_app(registry)(scope, receive, send))

    assert sent[0]["status"] == 202
    headers = {name.decode(): value.decode() for name, value in sent[0]["headers"]}
    assert headers["location"].startswith(f"http://[::1]:5443{UPLOADS_PATH}")


def test_host_rejection_logged(serve: ServeProcess) -> None:
    send(serve, "GET /v2/_catalog HTTP/1.1")

    # The server logs the request after it has sent the response.
    finished = wait_for_log_record(
        serve.log_path, "request_finished", path="/v2/_catalog"
    )
    assert finished["status"] == 400


def test_host_checked_before_authentication(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "writer", Role.PUSH, "writer-password")
    served = serve_cairn(tmp_path / "serve", "--auth-file", str(users))
    try:
        missing = send(served, "GET /v2/ HTTP/1.1")
        duplicate = send(served, "GET /v2/ HTTP/1.1\nHost: a.example\nHost: b.example")
        valid = send(served, "GET /v2/ HTTP/1.1\nHost: a.example")
    finally:
        served.kill()

    assert host_error(missing)["message"].startswith(MISSING_HOST)
    assert host_error(duplicate)["detail"]["values"] == ["a.example", "b.example"]
    assert valid.status == 401


def test_missing_host_rejected_over_tls(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path / "tls", "127.0.0.1")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    served = start_https(
        data_dir, f"sqlite:///{tmp_path / 'cairn.db'}", tmp_path, certificate
    )
    responses = []
    try:
        for head in (b"GET /v2/ HTTP/1.1", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1"):
            with open_tls(served, certificate) as sock:
                sock.sendall(head + b"\r\n\r\n")
                with sock.makefile("rb") as reader:
                    responses.append(read_response(reader))
    finally:
        served.kill()

    missing, valid = responses
    assert host_error(missing)["message"].startswith(MISSING_HOST)
    assert valid.status == 200
    assert valid.body == b"{}"


def test_keep_alive_after_host_rejection(serve: ServeProcess) -> None:
    with connection(serve.url) as (sock, reader):
        sock.sendall(
            b"GET /v2/ HTTP/1.1\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        rejected = read_response(reader)
        served = read_response(reader)
        sock.shutdown(socket.SHUT_WR)

    assert rejected.status == 400
    assert served.status == 200
    assert served.body == b"{}"
