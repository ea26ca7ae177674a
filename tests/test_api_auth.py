"""Basic authentication, pull and push roles, and per-address rate limits.

In-process servers run over SQLite and PostgreSQL. One `cairn serve
--auth-file` subprocess is driven by skopeo with credentials, and `cairn
users add` writes the users file that the servers read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from engine.api.app import create_app
from engine.api.auth import (
    Authenticator,
    PasswordHash,
    Role,
    _FailureLog,
    add_user,
    load_users,
    parse_user,
)
from engine.api.forwarded import InvalidForwardedLog
from engine.api.ratelimit import RateLimiter
from engine.domain.digest import Digest
from engine.domain.manifests import OCI_MANIFEST
from engine.registry import Registry
from tests.images import make_image
from tests.server import (
    READER,
    WRITER,
    ServerThread,
    committed_blob_files,
    log_records,
    push_image,
    running,
    start_serve,
    stored_state,
    upload_rows,
)
from tests.test_api_blob_size import exchange, request_head
from tests.test_clients import build_oci_layout

SKOPEO = shutil.which("skopeo")

UNKNOWN_DIGEST = str(Digest.of(b"never pushed"))


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, READER[0], Role.PULL, READER[1])
    add_user(path, WRITER[0], Role.PUSH, WRITER[1])
    return path


@pytest.fixture
def server(registry: Registry, auth_file: Path) -> Iterator[ServerThread]:
    app = create_app(registry, authenticator=Authenticator.from_file(auth_file))
    with running(app) as server:
        yield server


@pytest.fixture
def anonymous(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def reader(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, auth=READER) as client:
        yield client


@pytest.fixture
def writer(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, auth=WRITER) as client:
        yield client


@pytest.fixture
def unchanged(registry: Registry) -> Callable[[], None]:
    """Return a check that storage equals its state when the check was made."""
    state = stored_state(registry)
    files = committed_blob_files(registry)
    uploads = upload_rows(registry)

    def check() -> None:
        assert stored_state(registry) == state
        assert committed_blob_files(registry) == files
        assert upload_rows(registry) == uploads

    return check


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1
    return errors[0]


def _basic(credentials: str) -> dict[str, str]:
    encoded = base64.b64encode(credentials.encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


# ---- UNAUTHORIZED ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/"),
        ("HEAD", "/v2/"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v2/library/app/tags/list"),
        ("GET", f"/v2/library/app/blobs/{UNKNOWN_DIGEST}"),
        ("POST", "/v2/library/app/blobs/uploads/"),
        ("PUT", "/v2/library/app/manifests/v1"),
        ("DELETE", "/v2/library/app/manifests/v1"),
        ("GET", "/v2/no/such/endpoint"),
        ("GET", "/_cairn/events"),
        ("GET", "/_cairn/api/v1/repositories"),
        ("GET", "/_cairn/ui/"),
        ("GET", "/metrics"),
    ],
)
def test_no_credentials_unauthorized(
    anonymous: httpx.Client, unchanged: Callable[[], None], method: str, path: str
) -> None:
    response = anonymous.request(method, path, content=b"{}")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="cairn"'
    if method != "HEAD":
        error = _error(response)
        assert error["code"] == "UNAUTHORIZED"
        assert error["detail"]["realm"] == "cairn"
    unchanged()


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("writer", "wrong-secret"),
        ("writer", ""),
        ("reader", WRITER[1]),
        ("nobody", "writer-secret"),
    ],
)
def test_wrong_credentials_unauthorized(
    server: ServerThread,
    unchanged: Callable[[], None],
    user: str,
    password: str,
) -> None:
    image = make_image()
    with httpx.Client(base_url=server.url, auth=(user, password)) as client:
        probe = client.get("/v2/")
        started = client.post(
            "/v2/library/app/blobs/uploads/",
            params={"digest": str(Digest.of(image.config))},
            content=image.config,
        )
        manifest = client.put(
            "/v2/library/app/manifests/v1",
            content=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )

    for response in (probe, started, manifest):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="cairn"'
        error = _error(response)
        assert error["code"] == "UNAUTHORIZED"
        assert error["detail"]["user"] == user
        if password:
            assert password not in response.text
    unchanged()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer some-token", "Bearer"),
        ("Basic !!!not-base64", "base64"),
        (_basic(":")["Authorization"], "authentication required"),
        (_basic("writer")["Authorization"], "':'"),
    ],
)
def test_malformed_authorization_unauthorized(
    anonymous: httpx.Client, unchanged: Callable[[], None], header: str, reason: str
) -> None:
    response = anonymous.post(
        "/v2/library/app/blobs/uploads/", headers={"Authorization": header}
    )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="cairn"'
    error = _error(response)
    assert error["code"] == "UNAUTHORIZED"
    assert reason in error["message"]
    unchanged()


# The Transfer-Encoding check runs before authentication, as in
# Distribution 2.8.2, whose Go HTTP server returns its 501 before any handler
# runs. The 501 depends on that header alone, so it reveals nothing about
# the registry to an unauthenticated client, and no body byte is stored
# either way.
@pytest.mark.parametrize(
    ("credentials", "coding", "status"),
    [
        (None, "gzip, chunked", 501),
        (WRITER, "gzip, chunked", 501),
        (None, "chunked", 401),
        (("writer", "wrong-secret"), "chunked", 401),
    ],
)
def test_transfer_coding_checked_before_auth(
    server: ServerThread,
    unchanged: Callable[[], None],
    credentials: tuple[str, str] | None,
    coding: str,
    status: int,
) -> None:
    body = b"bytes that must not be stored"
    headers = [f"Transfer-Encoding: {coding}"]
    if credentials is not None:
        headers.append(
            "Authorization: " + _basic(":".join(credentials))["Authorization"]
        )
    head = request_head(
        "POST", f"/v2/library/app/blobs/uploads/?digest={Digest.of(body)}", *headers
    )

    reply = exchange(
        server.port, head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    )

    assert reply.status == status
    error = reply.error()
    if status == 501:
        assert error["code"] == "UNSUPPORTED"
        assert error["detail"]["value"] == coding
        assert "www-authenticate" not in reply.headers
    else:
        assert error["code"] == "UNAUTHORIZED"
        assert reply.headers["www-authenticate"] == 'Basic realm="cairn"'
    unchanged()


def test_health_open_without_credentials(anonymous: httpx.Client) -> None:
    response = anonymous.get("/_cairn/health")

    assert response.status_code == 200
    assert "WWW-Authenticate" not in response.headers


def test_password_with_colon_accepted(
    registry: Registry, auth_file: Path, tmp_path: Path
) -> None:
    add_user(auth_file, "colon", Role.PULL, "pass:word:with:colons")
    app = create_app(registry, authenticator=Authenticator.from_file(auth_file))

    with running(app) as server:
        response = httpx.get(
            f"{server.url}/v2/", headers=_basic("colon:pass:word:with:colons")
        )

    assert response.status_code == 200


def test_verified_password_remembered(
    registry: Registry, auth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    verify = PasswordHash.verify

    def counting_verify(self: PasswordHash, password: str) -> bool:
        checks.append(password)
        return verify(self, password)

    monkeypatch.setattr(PasswordHash, "verify", counting_verify)
    app = create_app(registry, authenticator=Authenticator.from_file(auth_file))

    with running(app) as server, httpx.Client(base_url=server.url) as client:
        right = [client.get("/v2/", auth=WRITER).status_code for _ in range(3)]
        wrong = [client.get("/v2/", auth=("writer", "x")).status_code for _ in range(2)]

    assert right == [200, 200, 200]
    assert wrong == [401, 401]
    assert checks == [WRITER[1], "x", "x"]


def test_auth_failed_logged_once_per_interval() -> None:
    clock = ManualClock()
    failures = _FailureLog(60.0, clock)

    with structlog.testing.capture_logs() as logs:
        failures.record("writer", "192.0.2.1", "invalid credentials")
        failures.record("writer", "192.0.2.1", "invalid credentials")
        failures.record("admin", "192.0.2.1", "invalid credentials")
        failures.record("writer", "192.0.2.2", "invalid credentials")
        clock.now += 60.0
        failures.flush()

    assert [(line["event"], line.get("remote")) for line in logs] == [
        ("auth_failed", "192.0.2.1"),
        ("auth_failed", "192.0.2.2"),
        ("auth_failures_suppressed", "192.0.2.1"),
    ]
    assert logs[2]["failures"] == 2
    assert all("password" not in line for line in logs)


# ---- DENIED --------------------------------------------------------------------------


def test_pull_user_push_denied(
    reader: httpx.Client, unchanged: Callable[[], None]
) -> None:
    image = make_image()
    blob = image.blobs[0]
    digest = str(Digest.of(blob))
    attempts = [
        ("POST", "/v2/library/app/blobs/uploads/", {"digest": digest}, blob),
        ("POST", "/v2/library/app/blobs/uploads/", {}, b""),
        ("PATCH", "/v2/library/app/blobs/uploads/some-upload", {}, blob),
        ("PUT", "/v2/library/app/blobs/uploads/some-upload", {"digest": digest}, blob),
        ("DELETE", "/v2/library/app/blobs/uploads/some-upload", {}, b""),
        ("PUT", "/v2/library/app/manifests/v1", {}, image.manifest),
        ("DELETE", "/v2/library/app/manifests/v1", {}, b""),
        ("DELETE", f"/v2/library/app/blobs/{digest}", {}, b""),
    ]

    for method, path, params, body in attempts:
        response = reader.request(
            method,
            path,
            params=params,
            content=body,
            headers={"Content-Type": OCI_MANIFEST},
        )

        assert response.status_code == 403, (method, path)
        error = _error(response)
        assert error["code"] == "DENIED"
        assert error["detail"]["user"] == "reader"
        assert error["detail"]["repository"] == "library/app"
        assert "reader" in error["message"]
        assert "library/app" in error["message"]
    unchanged()

    events = reader.get("/_cairn/events").json()["events"]
    assert events == []
    assert reader.get("/v2/_catalog").json()["repositories"] == []


def test_pull_user_reads(writer: httpx.Client, reader: httpx.Client) -> None:
    image = make_image()
    push_image(writer, "library/app", image, "v1")

    assert reader.get("/v2/").status_code == 200
    assert reader.get("/v2/_catalog").json()["repositories"] == ["library/app"]
    assert reader.get("/v2/library/app/tags/list").json()["tags"] == ["v1"]
    manifest = reader.get("/v2/library/app/manifests/v1")
    assert manifest.status_code == 200
    assert manifest.content == image.manifest
    for blob in image.blobs:
        pulled = reader.get(f"/v2/library/app/blobs/{Digest.of(blob)}")
        assert pulled.content == blob
    assert reader.get("/_cairn/api/v1/repositories").status_code == 200
    assert reader.get("/_cairn/events").status_code == 200


# ---- the actor -----------------------------------------------------------------------


def test_push_user_recorded_as_actor(writer: httpx.Client) -> None:
    image = make_image(layer_count=2)

    push_image(writer, "library/app", image, "v1")
    deleted = writer.delete("/v2/library/app/manifests/v1")

    assert deleted.status_code == 202
    events = writer.get("/_cairn/events").json()["events"]
    kinds = [event["type"] for event in events]
    assert "blob.pushed" in kinds
    assert "manifest.pushed" in kinds
    assert "tag.deleted" in kinds
    for event in events:
        assert event["actor"] == {"user": "writer", "address": "127.0.0.1"}


def test_open_registry_records_no_user(registry: Registry) -> None:
    app = create_app(registry)
    with running(app) as server, httpx.Client(base_url=server.url) as client:
        push_image(client, "library/app", make_image(), "v1")
        events = client.get("/_cairn/events").json()["events"]

    assert events
    for event in events:
        assert event["actor"]["user"] is None


# ---- TOOMANYREQUESTS -----------------------------------------------------------------


class ManualClock:
    """A clock that moves only when the test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_after_burst(
    registry: Registry, unchanged: Callable[[], None]
) -> None:
    clock = ManualClock()
    limiter = RateLimiter(2, clock=clock)
    app = create_app(registry, rate_limiter=limiter)

    with running(app) as server, httpx.Client(base_url=server.url) as client:
        burst = [client.get("/v2/") for _ in range(4)]
        limited = client.post("/v2/library/app/blobs/uploads/")
        health = client.get("/_cairn/health")
        clock.now += 0.5
        after_refill = client.get("/v2/")

    assert [response.status_code for response in burst] == [200, 200, 200, 200]
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    error = _error(limited)
    assert error["code"] == "TOOMANYREQUESTS"
    assert error["detail"]["address"] == "127.0.0.1"
    assert error["detail"]["retry_after"] == 1
    assert health.status_code == 200
    assert after_refill.status_code == 200
    unchanged()


def test_rate_limit_applies_before_authentication(
    registry: Registry, auth_file: Path
) -> None:
    clock = ManualClock()
    app = create_app(
        registry,
        authenticator=Authenticator.from_file(auth_file),
        rate_limiter=RateLimiter(1, clock=clock),
    )

    guessed = ("writer", "guess")
    with (
        running(app) as server,
        httpx.Client(base_url=server.url, auth=guessed) as client,
    ):
        guesses = [client.get("/v2/").status_code for _ in range(3)]

    assert guesses == [401, 401, 429]


def test_rate_limit_retry_after_rounds_up() -> None:
    clock = ManualClock()
    limiter = RateLimiter(1, burst=1, clock=clock)

    assert limiter.acquire("192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") == 1
    clock.now += 0.25
    assert limiter.acquire("192.0.2.1") == 1
    clock.now += 0.75
    assert limiter.acquire("192.0.2.1") is None

    slow = RateLimiter(0.1, burst=1, clock=clock)
    assert slow.acquire("192.0.2.1") is None
    assert slow.acquire("192.0.2.1") == 10


def test_rate_limit_buckets_per_address() -> None:
    clock = ManualClock()
    limiter = RateLimiter(1, clock=clock)

    assert limiter.acquire("192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") == 1
    assert limiter.acquire("192.0.2.2") is None
    assert limiter.acquire(None) is None


def test_rate_limit_drops_idle_buckets() -> None:
    clock = ManualClock()
    limiter = RateLimiter(10, clock=clock)
    for number in range(100):
        limiter.acquire(f"192.0.2.{number}")
    assert len(limiter) == 100

    clock.now += limiter.idle_after
    limiter.acquire("198.51.100.1")

    assert len(limiter) == 1


def test_rate_limit_invalid_rate() -> None:
    with pytest.raises(ValueError, match="invalid rate 0"):
        RateLimiter(0)


# ---- the users file ------------------------------------------------------------------


def _users_add(
    auth_file: Path, name: str, password: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "users",
            "add",
            "--auth-file",
            str(auth_file),
            name,
            *extra,
        ],
        input=f"{password}\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_users_add_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "users"

    added = _users_add(path, "alice", "first secret", "--role", "push")
    other = _users_add(path, "bob", "bob's secret")
    replaced = _users_add(path, "alice", "second secret", "--role", "pull")

    assert added.returncode == 0, added.stderr
    assert "user alice added" in added.stdout
    assert other.returncode == 0, other.stderr
    assert replaced.returncode == 0, replaced.stderr
    assert "user alice replaced" in replaced.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users"]

    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    assert "secret" not in path.read_text()
    users = load_users(path)
    assert users["alice"].role is Role.PULL
    assert users["bob"].role is Role.PULL
    assert users["alice"].password.verify("second secret")
    assert not users["alice"].password.verify("first secret")
    assert users["bob"].password.verify("bob's secret")


def test_users_add_keeps_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# operators\n\ncarol:push:" + PasswordHash.create("c").format())
    path.chmod(0o644)

    result = _users_add(path, "dave", "d")

    assert result.returncode == 0, result.stderr
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# operators", ""]
    assert lines[2].startswith("carol:push:scrypt$")
    assert lines[3].startswith("dave:pull:scrypt$")
    # Password hashes are not for other users, whatever the mode was.
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("bad:name", "secret", "invalid user name 'bad:name'"),
        ("", "secret", "invalid user name ''"),
        ("erin", "", "the password is empty"),
    ],
)
def test_users_add_rejects_invalid_input(
    tmp_path: Path, name: str, password: str, message: str
) -> None:
    path = tmp_path / "users"

    result = _users_add(path, name, password)

    assert result.returncode == 1
    assert message in result.stderr
    assert not path.exists()


def test_users_add_names_path_on_error(tmp_path: Path) -> None:
    directory = tmp_path / "users"
    directory.mkdir()

    result = _users_add(directory, "alice", "secret")

    assert result.returncode == 1
    assert f"cannot add user alice to {directory}: Is a directory" in result.stderr


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "expected name:role:scrypt$"),
        ("alice:admin:scrypt$2$1$1$AA==$" + "A" * 24, "unknown role 'admin'"),
        ("alice:pull:bcrypt$x", "expected scrypt$"),
        ("alice:pull:scrypt$3$8$1$AA==$" + "A" * 24, "power of 2"),
        ("alice:pull:scrypt$1048576$8$1$AA==$" + "A" * 24, "more than"),
        ("alice:pull:scrypt$16$8$1$%%$" + "A" * 24, "invalid scrypt parameters"),
    ],
)
def test_users_file_invalid_line(line: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_user(line)

    assert message in str(raised.value)


def test_users_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    good = "alice:pull:" + PasswordHash.create("a").format()
    path.write_text(f"{good}\n# comment\nbroken\n")

    with pytest.raises(ValueError, match=f"users file {path} line 3"):
        load_users(path)

    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(ValueError, match="user alice is listed twice"):
        load_users(path)


# ---- `cairn serve --auth-file` with skopeo -------------------------------------------


def _skopeo(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    Path(env["XDG_RUNTIME_DIR"]).mkdir(exist_ok=True)
    return subprocess.run(
        [SKOPEO, "--policy", env["POLICY"], *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.clients
@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_serve_auth_file_with_skopeo(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    auth_file: Path,
    client_env: dict[str, str],
) -> None:
    source = tmp_path / "source"
    digest = build_oci_layout(source, "v1")
    log_path = tmp_path / "serve.log"
    serve = start_serve(
        data_dir,
        database_url,
        log_path,
        "--auth-file",
        str(auth_file),
        "--rate-limit",
        "1000",
    )
    try:
        host = serve.url.removeprefix("http://")
        target = f"docker://{host}/library/skopeo-auth:v1"

        anonymous = _skopeo(
            client_env, "copy", "--dest-tls-verify=false", f"oci:{source}:v1", target
        )
        denied = _skopeo(
            client_env,
            "copy",
            "--dest-tls-verify=false",
            f"--dest-creds={READER[0]}:{READER[1]}",
            f"oci:{source}:v1",
            target,
        )
        wrong = _skopeo(
            client_env,
            "inspect",
            "--tls-verify=false",
            "--creds=writer:not-the-password",
            target,
        )
        pushed = _skopeo(
            client_env,
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"--dest-creds={WRITER[0]}:{WRITER[1]}",
            f"oci:{source}:v1",
            target,
        )
        inspected = _skopeo(
            client_env,
            "inspect",
            "--tls-verify=false",
            f"--creds={READER[0]}:{READER[1]}",
            target,
        )
        events = httpx.get(f"{serve.url}/_cairn/events", auth=READER).json()
        health = httpx.get(f"{serve.url}/_cairn/health")
    finally:
        assert serve.stop() == 0

    assert anonymous.returncode != 0
    assert "401" in anonymous.stderr or "authentication" in anonymous.stderr.lower()
    assert denied.returncode != 0
    assert "denied" in denied.stderr.lower()
    assert wrong.returncode != 0
    assert pushed.returncode == 0, pushed.stderr
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == digest
    assert health.status_code == 200

    assert events["events"]
    kinds = {event["type"] for event in events["events"]}
    assert "manifest.pushed" in kinds
    for event in events["events"]:
        assert event["actor"]["user"] == "writer"

    log_text = log_path.read_text()
    assert "auth_enabled" in log_text
    assert "rate_limit_enabled" in log_text
    failures = [
        json.loads(line) for line in log_text.splitlines() if "auth_failed" in line
    ]
    assert [(line["user"], line["remote"]) for line in failures] == [
        ("writer", "127.0.0.1")
    ]
    assert "not-the-password" not in log_text
    assert READER[1] not in log_text
    assert WRITER[1] not in log_text
    assert "scrypt$" not in log_text


def test_serve_invalid_auth_file(tmp_path: Path) -> None:
    auth_file = tmp_path / "users"
    auth_file.write_text("alice:admin:scrypt$16$8$1$AA==$" + "A" * 24 + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    missing = tmp_path / "missing"

    invalid = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--auth-file", str(auth_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    absent = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--auth-file", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )

    assert invalid.returncode == 1
    assert f"users file {auth_file} line 1: unknown role 'admin'" in invalid.stderr
    assert absent.returncode == 1
    assert f"cannot read users file {missing}" in absent.stderr
    assert not (tmp_path / "cairn-data").exists()


def _statuses(url: str, forwarded_for: list[str]) -> list[int]:
    with httpx.Client(base_url=url, trust_env=False) as client:
        return [
            client.get("/v2/", headers={"X-Forwarded-For": address}).status_code
            for address in forwarded_for
        ]


def test_forwarded_for_ignored_by_default(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    serve = start_serve(
        data_dir, database_url, tmp_path / "serve.log", "--rate-limit", "1"
    )
    try:
        # Each request claims another address, but all come from one.
        statuses = _statuses(serve.url, [f"192.0.2.{i}" for i in range(1, 6)])
    finally:
        assert serve.stop() == 0
    assert 429 in statuses


def test_forwarded_for_from_trusted_proxy(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    serve = start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        "--rate-limit",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
    )
    try:
        distinct = _statuses(serve.url, [f"192.0.2.{i}" for i in range(1, 6)])
        repeated = _statuses(serve.url, ["198.51.100.7"] * 5)
    finally:
        assert serve.stop() == 0
    assert distinct == [200] * 5
    assert 429 in repeated


@pytest.mark.parametrize(
    ("forwarded_for", "recorded", "spellings"),
    [
        ("0:0::1", "::1", ("::1", "0:0::1", "0000:0000::0001")),
        # An IPv4 client of a dual-stack socket, in both of Python's
        # spellings, and as the plain IPv4 address.
        ("::ffff:192.0.2.7", "192.0.2.7", ("192.0.2.7", "::ffff:c000:207")),
    ],
)
def test_forwarded_address_standard_spelling(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    forwarded_for: str,
    recorded: str,
    spellings: tuple[str, ...],
) -> None:
    serve = start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        "--trusted-proxies",
        "127.0.0.1",
    )
    data = b"pushed through a proxy"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        with httpx.Client(base_url=serve.url) as client:
            forwarded = {"X-Forwarded-For": forwarded_for}
            started = client.post("/v2/proxied/blobs/uploads/", headers=forwarded)
            assert started.status_code == 202, started.text
            pushed = client.put(
                started.headers["Location"],
                params={"digest": digest},
                content=data,
                headers=forwarded,
            )
            assert pushed.status_code == 201, pushed.text
            pages = {
                spelling: client.get(
                    "/_cairn/api/v1/events", params={"address": spelling}
                )
                for spelling in (*spellings, forwarded_for)
            }
    finally:
        assert serve.stop() == 0
    for spelling, page in pages.items():
        assert page.status_code == 200, (spelling, page.text)
        events = page.json()["events"]
        assert [event["type"] for event in events] == ["blob.pushed"], spelling
        assert events[0]["actor"]["address"] == recorded


# X-Forwarded-For values that name no IP address, and the values that
# uvicorn's proxy header handling takes from them as the client.
INVALID_FORWARDED_FOR = [
    ("garbage", "garbage"),
    ("unknown", "unknown"),
    ("192.0.2.1, garbage", "garbage"),
    ("garbage:8080", "garbage"),
    ("[2001:db8::1", "[2001:db8::1"),
    ("_hidden", "_hidden"),
]


def test_forwarded_for_not_an_address(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    serve = start_serve(
        data_dir, database_url, log_path, "--trusted-proxies", "127.0.0.1"
    )
    sent = [header for header, _ in INVALID_FORWARDED_FOR] + ["192.0.2.7"]
    try:
        with httpx.Client(base_url=serve.url, trust_env=False) as client:
            for number, header in enumerate(sent):
                data = f"pushed through a proxy {number}".encode()
                pushed = client.post(
                    "/v2/proxied/blobs/uploads/",
                    params={"digest": str(Digest.of(data))},
                    content=data,
                    headers={"X-Forwarded-For": header},
                )
                assert pushed.status_code == 201, pushed.text
            events = client.get(
                "/_cairn/events", params={"repository": "proxied"}
            ).json()["events"]
    finally:
        assert serve.stop() == 0

    # The proxy's own address in place of each invalid value.
    addresses = [event["actor"]["address"] for event in events]
    assert addresses == ["127.0.0.1"] * len(INVALID_FORWARDED_FOR) + ["192.0.2.7"]
    finished = log_records(log_path, "request_finished", method="POST")
    assert [line["remote"] for line in finished] == addresses
    # One warning for the proxy, and the repeats within a minute are counted.
    warnings = log_records(log_path, "forwarded_address_invalid")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["proxy"] == "127.0.0.1"
    assert warnings[0]["value"] == "garbage"
    assert warnings[0]["request_id"] == finished[0]["request_id"]


def test_forwarded_for_not_an_address_rate_limited(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    serve = start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        "--rate-limit",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
    )
    try:
        # Each request names another invalid value, and all of them count
        # against the proxy's own address.
        statuses = _statuses(serve.url, [f"unknown-{i}" for i in range(1, 6)])
    finally:
        assert serve.stop() == 0
    assert 429 in statuses


def test_invalid_forwarded_logged_once_per_interval() -> None:
    clock = ManualClock()
    warnings = InvalidForwardedLog(60.0, clock)

    with structlog.testing.capture_logs() as logs:
        warnings.record("192.0.2.1", "garbage", "request-1")
        warnings.record("192.0.2.1", "unknown", "request-2")
        warnings.record("192.0.2.1", "garbage", "request-3")
        warnings.record("192.0.2.2", "unknown", "request-4")
        clock.now += 60.0
        warnings.record("192.0.2.2", "garbage", "request-5")

    assert [(line["event"], line["proxy"]) for line in logs] == [
        ("forwarded_address_invalid", "192.0.2.1"),
        ("forwarded_address_invalid", "192.0.2.2"),
        ("forwarded_addresses_invalid_suppressed", "192.0.2.1"),
        ("forwarded_address_invalid", "192.0.2.2"),
    ]
    assert logs[0]["value"] == "garbage"
    assert logs[0]["request_id"] == "request-1"
    assert logs[2]["values"] == 2
    assert logs[3]["request_id"] == "request-5"
