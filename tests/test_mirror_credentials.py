"""`cairn mirror` between cairn servers that require HTTP Basic credentials,
given in the URLs, as options, in variables or in files. No password may
reach a log line, an error message or the checkpoint."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.images import make_image
from tests.server import ServeProcess, push_image, serve_cairn
from tests.test_mirror import (
    REPO_ROOT,
    clean_env,
    log_events,
    mirror_argv,
)

# Each password has a colon and an at sign, which a URL must percent-encode,
# and a marker that no other text contains, to look for leaks.
SOURCE_PASSWORD = "pull:@pw-6c1f0a9e"
TARGET_PASSWORD = "push:@pw-93d7b2e4"
MARKERS = ("6c1f0a9e", "93d7b2e4")
READER = ("reader", SOURCE_PASSWORD)
WRITER = ("writer", TARGET_PASSWORD)


def add_user(auth_file: Path, name: str, role: str, password: str) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "engine.cli", "users", "add"),
            *("--auth-file", str(auth_file), name, "--role", role),
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """A source where reader may pull and a target where writer may push."""
    source_users = tmp_path / "source-users"
    add_user(source_users, "reader", "pull", SOURCE_PASSWORD)
    add_user(source_users, "publisher", "push", "publisher-password")
    target_users = tmp_path / "target-users"
    add_user(target_users, "writer", "push", TARGET_PASSWORD)
    source = serve_cairn(tmp_path / "source", "--auth-file", str(source_users))
    try:
        target = serve_cairn(tmp_path / "target", "--auth-file", str(target_users))
        try:
            yield source, target
        finally:
            target.kill()
    finally:
        source.kill()


def with_userinfo(url: str, user: str, password: str) -> str:
    return url.replace("://", f"://{user}:{quote(password, safe='')}@", 1)


def run_mirror(
    source: str, target: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mirror_argv(source, target, "--once", *extra),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**clean_env(), **(env or {})},
        timeout=300,
    )


def assert_no_password(text: str) -> None:
    for marker in MARKERS:
        assert marker not in text


def target_tag_status(target: ServeProcess, tag: str) -> int:
    response = httpx.head(
        f"{target.url}/v2/library/app/manifests/{tag}",
        auth=WRITER,
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    return response.status_code


def push_source_image(source: ServeProcess, tag: str) -> None:
    with httpx.Client(
        base_url=source.url, auth=("publisher", "publisher-password")
    ) as client:
        push_image(client, "library/app", make_image(), tag)


def test_mirror_credentials_in_urls(
    tmp_path: Path, secured: tuple[ServeProcess, ServeProcess]
) -> None:
    source, target = secured
    push_source_image(source, "v1")
    checkpoint = tmp_path / "checkpoint.json"

    result = run_mirror(
        with_userinfo(source.url, *READER),
        with_userinfo(target.url, *WRITER),
        "--checkpoint",
        str(checkpoint),
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert target_tag_status(target, "v1") == 200
    assert_no_password(result.stdout + result.stderr)
    started = [e for e in log_events(result.stderr) if e["event"] == "mirror_started"]
    assert started[0]["source"] == source.url
    assert started[0]["target"] == target.url
    text = checkpoint.read_text()
    assert_no_password(text)
    saved = json.loads(text)
    assert saved["source"] == source.url
    assert saved["target"] == target.url
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600


def test_mirror_credentials_from_variable_and_file(
    tmp_path: Path, secured: tuple[ServeProcess, ServeProcess]
) -> None:
    source, target = secured
    push_source_image(source, "v1")
    # A checkpoint that an older mirror wrote with the URLs it was given.
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(
        json.dumps(
            {
                "source": with_userinfo(source.url, *READER),
                "target": with_userinfo(target.url, *WRITER),
                "position": 0,
            }
        )
    )
    checkpoint.chmod(0o644)
    creds_file = tmp_path / "target-creds"
    creds_file.write_text(f"writer:{TARGET_PASSWORD}\n")

    result = run_mirror(
        source.url,
        target.url,
        "--checkpoint",
        str(checkpoint),
        "--target-creds-file",
        str(creds_file),
        env={"CAIRN_MIRROR_SOURCE_CREDS": f"reader:{SOURCE_PASSWORD}"},
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert target_tag_status(target, "v1") == 200
    assert_no_password(result.stdout + result.stderr)
    text = checkpoint.read_text()
    assert_no_password(text)
    saved = json.loads(text)
    assert saved["source"] == source.url
    assert saved["position"] == head_position_as(source)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600


def head_position_as(source: ServeProcess) -> int:
    response = httpx.get(
        f"{source.url}/_cairn/events", params={"limit": 1}, auth=READER
    )
    assert response.status_code == 200, response.text
    return int(response.json()["head"])


def test_mirror_rejected_credentials_not_logged(
    secured: tuple[ServeProcess, ServeProcess],
) -> None:
    source, target = secured
    push_source_image(source, "v1")

    result = run_mirror(
        source.url,
        with_userinfo(target.url, "writer", "wrong:@pw-93d7b2e4"),
        "--source-creds",
        f"reader:{SOURCE_PASSWORD}",
        "--retries",
        "1",
    )

    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert_no_password(result.stdout + result.stderr)
    failed = [e for e in log_events(result.stderr) if e["event"] == "mirror_failed"]
    assert len(failed) == 1
    assert "HTTP 401" in failed[0]["error"]
    assert failed[0]["error"].startswith("target ")
    assert "--target-creds" in failed[0]["error"]
    assert "--source-creds" not in failed[0]["error"]


def test_mirror_source_without_credentials(
    secured: tuple[ServeProcess, ServeProcess],
) -> None:
    source, target = secured

    result = run_mirror(source.url, target.url, "--retries", "1")

    assert result.returncode == 1, result.stderr[-4000:]
    failed = [e for e in log_events(result.stderr) if e["event"] == "mirror_failed"]
    assert len(failed) == 1
    assert "HTTP 401" in failed[0]["error"]
    assert "--source-creds" in failed[0]["error"]
    assert "--target-creds" not in failed[0]["error"]


@pytest.mark.parametrize(
    ("source", "extra", "env", "message"),
    [
        (
            with_userinfo("http://127.0.0.1:1", *READER),
            ["--source-creds", f"reader:{SOURCE_PASSWORD}"],
            {},
            "the source credentials are given more than once, by the --source "
            "URL and --source-creds",
        ),
        (
            "http://127.0.0.1:1",
            [],
            {"CAIRN_MIRROR_SOURCE_CREDS": SOURCE_PASSWORD.replace(":", "")},
            "argument --source-creds: invalid credentials: expected USER:PASSWORD, "
            "a user name and a colon before the password (from environment "
            "variable CAIRN_MIRROR_SOURCE_CREDS)",
        ),
        (
            "http://127.0.0.1:1",
            ["--source-creds-file", "/nonexistent/creds"],
            {},
            "cannot read credentials file /nonexistent/creds",
        ),
        (
            "http://127.0.0.1:1",
            ["--source-creds-file", ""],
            {},
            "argument --source-creds-file: invalid file name '': expected the "
            "path of a file\n",
        ),
        (
            "http://127.0.0.1:1",
            [],
            {"CAIRN_MIRROR_SOURCE_CREDS_FILE": ""},
            "argument --source-creds-file: invalid file name '': expected the "
            "path of a file (from environment variable "
            "CAIRN_MIRROR_SOURCE_CREDS_FILE)",
        ),
        (
            "http://127.0.0.1:1",
            [],
            {"CAIRN_MIRROR_TARGET_CREDS_FILE": ""},
            "argument --target-creds-file: invalid file name '': expected the "
            "path of a file (from environment variable "
            "CAIRN_MIRROR_TARGET_CREDS_FILE)",
        ),
    ],
    ids=[
        "url-and-option",
        "no-colon",
        "missing-file",
        "empty-file-option",
        "empty-file-variable",
        "empty-target-file-variable",
    ],
)
def test_mirror_rejects_bad_credentials(
    tmp_path: Path, source: str, extra: list[str], env: dict[str, str], message: str
) -> None:
    result = run_mirror(source, f"oci:{tmp_path / 'layout'}", *extra, env=env)

    assert result.returncode == 2, result.stderr[-4000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_password(result.stdout + result.stderr)


def test_mirror_invalid_url_message_hides_password() -> None:
    source = with_userinfo("http://[::1", *READER)

    result = run_mirror(source, with_userinfo("http://127.0.0.1:2", *WRITER))

    assert result.returncode == 2, result.stderr[-4000:]
    assert "invalid --source 'http://[::1'" in result.stderr
    assert_no_password(result.stdout + result.stderr)
