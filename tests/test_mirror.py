"""`cairn mirror` end to end: real cairn servers, Distribution's
docker-registry and skopeo, every one on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from consumers.mirror.checkpoint import Checkpoint, CheckpointError
from consumers.mirror.identity import normalise_url
from engine.api.app import create_app
from engine.bus import Bus
from engine.bus.messages import REGISTRY_ID, event_message
from engine.domain.digest import Digest
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import Image, make_artifact, make_image, make_index
from tests.nats import BusThread, NatsServer, fast_settings, wait_until
from tests.nats import log_events as stored_events
from tests.nats import push_image as push_to_registry
from tests.nats import run as run_async
from tests.server import ServeProcess, push_blob, push_image, running

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
WAIT = 60.0

needs_skopeo = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed"
)
needs_docker_registry = pytest.mark.skipif(
    not DOCKER_REGISTRY.exists(), reason="Debian's docker-registry is not installed"
)


# ---- servers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def docker_registry(directory: Path) -> Iterator[str]:
    """Run Distribution's registry with filesystem storage and deletes enabled."""
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {directory / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with (directory / "registry.log").open("ab") as log_file:
        process = subprocess.Popen(
            [str(DOCKER_REGISTRY), "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError((directory / "registry.log").read_text()[-2000:])
        try:
            return httpx.get(f"{url}/v2/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, WAIT)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FeedReads:
    """An ASGI wrapper that counts the requests to the event feed of ``app``."""

    def __init__(self) -> None:
        self.count = 0
        self._app: Any = None

    def wrap(self, app: Any) -> FeedReads:
        self._app = app
        return self

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/_cairn/events":
            self.count += 1
        await self._app(scope, receive, send)


class BlobGate:
    """An ASGI wrapper that delays every blob GET to ``app`` until ``open``
    is called, and counts the delayed requests."""

    def __init__(self) -> None:
        self.delayed = 0
        self._open = threading.Event()
        self._app: Any = None

    def wrap(self, app: Any) -> BlobGate:
        self._app = app
        return self

    def open(self) -> None:
        self._open.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and "/blobs/" in scope["path"]
        ):
            self.delayed += 1
            while not self._open.is_set():
                await asyncio.sleep(0.02)
        await self._app(scope, receive, send)


@contextmanager
def cairn_on_nats(
    directory: Path, nats_url: str, wrapper: FeedReads | BlobGate | None = None
) -> Iterator[str]:
    """Serve a cairn on 127.0.0.1 whose relay publishes to ``nats_url``,
    behind ``wrapper`` when one is given."""
    data_dir = directory / "data"
    data_dir.mkdir(parents=True)
    registry = Registry.open(data_dir, f"sqlite:///{directory / 'cairn.db'}")
    upgrade(registry.database)
    bus = Bus(fast_settings(nats_url), registry.database, data_dir)
    app: Any = create_app(registry, bus)
    if wrapper is not None:
        app = wrapper.wrap(app)
    try:
        with BusThread(bus), running(app) as server:
            yield server.url
    finally:
        registry.database.dispose()


# ---- the mirror -----------------------------------------------------------------


def mirror_argv(source: str, target: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "--log-format",
        "json",
        "mirror",
        "--source",
        source,
        "--target",
        target,
        "--progress",
        "log",
        *extra,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}


def run_mirror(
    source: str, target: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        mirror_argv(source, target, "--once", *extra),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    return result


def start_mirror(
    source: str, target: str, log_path: Path, *extra: str
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            mirror_argv(source, target, *extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            cwd=REPO_ROOT,
            env=clean_env(),
        )


def start_nats_mirror(
    source_url: str,
    target_url: str,
    nats_url: str,
    log_path: Path,
    poll: str,
    *extra: str,
) -> subprocess.Popen[bytes]:
    """Start a mirror on ``nats_url`` that polls every ``poll`` seconds without NATS."""
    return start_mirror(
        source_url,
        target_url,
        log_path,
        "--nats",
        nats_url,
        "--poll-interval",
        poll,
        *extra,
    )


@contextmanager
def stopped_on_exit(mirror: subprocess.Popen[bytes]) -> Iterator[None]:
    """Terminate ``mirror`` after the block and assert that it exits with status 0."""
    try:
        yield
    finally:
        mirror.terminate()
        status = mirror.wait(30)
    assert status == 0


@contextmanager
def following_mirror(
    source_url: str, target_url: str, nats_url: str, log_path: Path, poll: str
) -> Iterator[None]:
    """Push library/app:v1, then run a mirror that follows NATS during the block."""
    push_new_image(source_url, "library/app", "v1")
    mirror = start_nats_mirror(source_url, target_url, nats_url, log_path, poll)
    # The block begins once the mirror has copied v1 and follows NATS.
    try:
        wait_for_manifest(target_url, "library/app", "v1")
        wait_for_logged(log_path, "nats_following")
    except BaseException:
        mirror.kill()
        mirror.wait(30)
        raise
    with stopped_on_exit(mirror):
        yield


def log_events(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def logged_events(log_path: Path) -> list[str]:
    return [line["event"] for line in log_events(log_path.read_text())]


def logged_records(log_path: Path, event: str) -> list[dict[str, Any]]:
    """Return the log lines of ``event`` in ``log_path``, in order."""
    return [line for line in log_events(log_path.read_text()) if line["event"] == event]


def wait_for_logged(log_path: Path, event: str, timeout: float = WAIT) -> None:
    """Wait until the log at ``log_path`` has a line of ``event``."""
    wait_until(lambda: event in logged_events(log_path), timeout)


# ---- skopeo ---------------------------------------------------------------------


def skopeo(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["skopeo", *argv], capture_output=True, timeout=120, stdin=subprocess.DEVNULL
    )


def docker_ref(url: str, repository: str, tag: str | None = None) -> str:
    host = url.removeprefix("http://")
    return f"docker://{host}/{repository}" + (f":{tag}" if tag else "")


def list_tags(url: str, repository: str) -> list[str]:
    result = skopeo("list-tags", "--tls-verify=false", docker_ref(url, repository))
    assert result.returncode == 0, result.stderr.decode()
    return sorted(json.loads(result.stdout)["Tags"])


def raw_manifest(url: str, repository: str, tag: str) -> bytes:
    result = skopeo(
        "inspect", "--raw", "--tls-verify=false", docker_ref(url, repository, tag)
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_same_tags(source: str, target: str, repositories: list[str]) -> None:
    """Assert that skopeo lists the same tags on both sides, with the same digests."""
    for repository in repositories:
        tags = list_tags(source, repository)
        assert list_tags(target, repository) == tags, repository
        for tag in tags:
            expected = raw_manifest(source, repository, tag)
            copied = raw_manifest(target, repository, tag)
            assert sha256(copied) == sha256(expected), f"{repository}:{tag}"


def manifest_status(url: str, repository: str, reference: str) -> int:
    response = httpx.head(
        f"{url}/v2/{repository}/manifests/{reference}",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.oci.image.index.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json"
        },
    )
    return response.status_code


def push_new_image(url: str, repository: str, tag: str) -> None:
    """Push a new image to the registry at ``url`` as ``repository:tag``."""
    with httpx.Client(base_url=url) as client:
        push_image(client, repository, make_image(), tag)


def wait_for_manifest(
    url: str, repository: str, reference: str, timeout: float = WAIT
) -> None:
    """Wait until ``url`` serves the manifest ``repository:reference``."""
    wait_until(lambda: manifest_status(url, repository, reference) == 200, timeout)


def head_position(url: str) -> int:
    return int(httpx.get(f"{url}/_cairn/events", params={"limit": 1}).json()["head"])


# ---- content on the source ------------------------------------------------------


def put_manifest(
    client: httpx.Client, repository: str, reference: str, image: Image | bytes
) -> None:
    raw = image.manifest if isinstance(image, Image) else image
    media_type = (
        image.media_type if isinstance(image, Image) else json.loads(raw)["mediaType"]
    )
    response = client.put(
        f"/v2/{repository}/manifests/{reference}",
        content=raw,
        headers={"Content-Type": media_type},
    )
    assert response.status_code == 201, response.text


def mount_blob(
    client: httpx.Client, repository: str, digest: Digest, origin: str
) -> None:
    response = client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"mount": str(digest), "from": origin},
    )
    assert response.status_code == 201, response.text


def populate(url: str) -> dict[str, Any]:
    """Push, mount, retag and delete on the source; return what was pushed."""
    first = make_image(layer_count=2, layer_size=4096)
    docker = make_image(docker=True)
    arm = make_image()
    index = make_index([first, arm])
    doomed = make_image()
    with httpx.Client(base_url=url) as client:
        push_image(client, "library/app", first, "v1")
        push_image(client, "library/app", docker, "v2")
        push_image(client, "library/app", arm)
        put_manifest(client, "library/app", "multi", index)
        # Retag: v1 moves to the Docker image, stable keeps the first one.
        put_manifest(client, "library/app", "stable", first)
        put_manifest(client, "library/app", "v1", docker)
        # A second repository whose blobs arrive by cross-repository mount.
        for blob in first.blobs:
            mount_blob(client, "team/app", Digest.of(blob), "library/app")
        put_manifest(client, "team/app", "latest", first)
        # Pushed, tagged, then deleted: a manifest the mirror must skip.
        push_image(client, "library/app", doomed, "doomed")
        response = client.delete(f"/v2/library/app/manifests/{doomed.digest}")
        assert response.status_code == 202, response.text
    return {"first": first, "docker": docker, "index": index, "doomed": doomed}


# ---- tests ----------------------------------------------------------------------


@needs_skopeo
def test_mirror_cairn_to_cairn(source: ServeProcess, target: ServeProcess) -> None:
    pushed = populate(source.url)

    result = run_mirror(source.url, target.url, "--propagate-deletes")

    assert_same_tags(source.url, target.url, ["library/app", "team/app"])
    assert list_tags(target.url, "library/app") == ["multi", "stable", "v1", "v2"]
    assert (
        manifest_status(target.url, "library/app", str(pushed["doomed"].digest)) == 404
    )
    index_digest = sha256(pushed["index"])
    assert manifest_status(target.url, "library/app", index_digest) == 200
    events = [line["event"] for line in log_events(result.stderr)]
    assert "mirror_caught_up" in events
    assert "manifest_skipped" in events


@needs_skopeo
@needs_docker_registry
def test_mirror_cairn_to_docker_registry(tmp_path: Path, source: ServeProcess) -> None:
    pushed = populate(source.url)

    with docker_registry(tmp_path / "registry") as registry_url:
        run_mirror(source.url, registry_url, "--propagate-deletes")

        assert_same_tags(source.url, registry_url, ["library/app", "team/app"])
        doomed = str(pushed["doomed"].digest)
        assert manifest_status(registry_url, "library/app", doomed) == 404
        # A second run finds everything in place and changes nothing.
        run_mirror(source.url, registry_url, "--propagate-deletes")
        assert_same_tags(source.url, registry_url, ["library/app", "team/app"])


@needs_skopeo
def test_mirror_propagates_tag_deletes(
    source: ServeProcess, target: ServeProcess, tmp_path: Path
) -> None:
    image = make_image()
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", image, "keep")
        put_manifest(client, "library/app", "drop", image)
    checkpoint = tmp_path / "checkpoint.json"
    run_mirror(source.url, target.url, "--checkpoint", str(checkpoint))
    assert list_tags(target.url, "library/app") == ["drop", "keep"]

    response = httpx.delete(f"{source.url}/v2/library/app/manifests/drop")
    assert response.status_code == 202, response.text
    run_mirror(source.url, target.url, "--checkpoint", str(checkpoint))
    # Without --propagate-deletes the target keeps the tag.
    assert list_tags(target.url, "library/app") == ["drop", "keep"]

    checkpoint.unlink()
    run_mirror(
        source.url, target.url, "--checkpoint", str(checkpoint), "--propagate-deletes"
    )
    assert list_tags(target.url, "library/app") == ["keep"]
    saved = json.loads(checkpoint.read_text())
    assert saved["position"] == head_position(source.url)
    assert saved["source"] == source.url
    assert saved["target"] == target.url


def test_mirror_filters_repositories(
    source: ServeProcess, target: ServeProcess
) -> None:
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", make_image(), "v1")
        push_image(client, "private/app", make_image(), "v1")

    run_mirror(source.url, target.url, "--repositories", "library/*")

    assert manifest_status(target.url, "library/app", "v1") == 200
    assert manifest_status(target.url, "private/app", "v1") == 404


@needs_skopeo
def test_mirror_converges_after_kill(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    images = [make_image(layer_count=2, layer_size=8 * 1024 * 1024) for _ in range(3)]
    with httpx.Client(base_url=source.url, timeout=60) as client:
        for number, image in enumerate(images):
            push_image(client, "library/big", image, f"v{number}")
    head = head_position(source.url)
    checkpoint = tmp_path / "checkpoint.json"

    mirror = start_mirror(
        source.url,
        target.url,
        tmp_path / "mirror-killed.log",
        "--once",
        "--checkpoint",
        str(checkpoint),
    )
    try:
        first_blobs = [
            f"{target.url}/v2/library/big/blobs/{Digest.of(blob)}"
            for blob in images[0].blobs
        ]

        def started_copying() -> bool:
            if mirror.poll() is not None:
                return True
            return any(httpx.head(url).status_code == 200 for url in first_blobs)

        wait_until(started_copying, WAIT, interval=0.01)
    finally:
        if mirror.poll() is None:
            os.kill(mirror.pid, signal.SIGKILL)
        mirror.wait(10)
    # The kill landed before the mirror finished: the copy was interrupted.
    assert mirror.returncode == -signal.SIGKILL
    killed_at = json.loads(checkpoint.read_text())["position"]
    assert killed_at < head

    run_mirror(source.url, target.url, "--checkpoint", str(checkpoint))

    assert json.loads(checkpoint.read_text())["position"] == head
    assert_same_tags(source.url, target.url, ["library/big"])
    for image in images:
        for blob in image.blobs:
            response = httpx.head(
                f"{target.url}/v2/library/big/blobs/{Digest.of(blob)}"
            )
            assert response.status_code == 200
            assert int(response.headers["Content-Length"]) == len(blob)


@needs_skopeo
def test_mirror_to_oci_layout(tmp_path: Path, source: ServeProcess) -> None:
    pushed = populate(source.url)
    layout = tmp_path / "layout"

    run_mirror(source.url, f"oci:{layout}", "--propagate-deletes")

    app = layout / "library" / "app"
    assert json.loads((app / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index = json.loads((app / "index.json").read_text())
    tags = {
        entry["annotations"]["org.opencontainers.image.ref.name"]: entry["digest"]
        for entry in index["manifests"]
        if "annotations" in entry
    }
    assert tags == {
        "v1": str(pushed["docker"].digest),
        "v2": str(pushed["docker"].digest),
        "stable": str(pushed["first"].digest),
        "multi": sha256(pushed["index"]),
    }
    assert str(pushed["doomed"].digest) not in {e["digest"] for e in index["manifests"]}

    copied = tmp_path / "copied"
    result = skopeo("copy", f"oci:{app}:stable", f"dir:{copied}")
    assert result.returncode == 0, result.stderr.decode()
    assert (copied / "manifest.json").read_bytes() == pushed["first"].manifest
    for blob in pushed["first"].blobs:
        assert (copied / Digest.of(blob).encoded).read_bytes() == blob
    # skopeo 1.9 reads only OCI media types from a layout, so the Docker
    # image under v1 and v2 is checked by its bytes instead.
    docker_digest = Digest.parse(tags["v2"])
    blob_file = app / "blobs" / "sha256" / docker_digest.encoded
    assert blob_file.read_bytes() == pushed["docker"].manifest
    result = skopeo("inspect", "--raw", f"oci:{app}:multi")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == pushed["index"]
    team = layout / "team" / "app"
    result = skopeo("inspect", "--raw", f"oci:{team}:latest")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == pushed["first"].manifest


@needs_skopeo
def test_mirror_layout_of_blobs_only(tmp_path: Path, source: ServeProcess) -> None:
    image = make_image()
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", image, "v1")
        blob = push_blob(client, "library/blobs", b"a blob without a manifest")
    layout = tmp_path / "layout"

    run_mirror(source.url, f"oci:{layout}")

    blobs_only = layout / "library" / "blobs"
    assert (blobs_only / "blobs" / "sha256" / blob.encoded).is_file()
    assert json.loads((blobs_only / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    assert json.loads((blobs_only / "index.json").read_text()) == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }
    # skopeo reads index.json before it adds an image to an existing layout.
    result = skopeo(
        "copy",
        f"oci:{layout / 'library' / 'app'}:v1",
        f"oci:{blobs_only}:copied",
    )
    assert result.returncode == 0, result.stderr.decode()
    index = json.loads((blobs_only / "index.json").read_text())
    names = [
        entry["annotations"]["org.opencontainers.image.ref.name"]
        for entry in index["manifests"]
    ]
    assert names == ["copied"]
    result = skopeo("inspect", "--raw", f"oci:{blobs_only}:copied")
    assert result.returncode == 0, result.stderr.decode()


def test_mirror_follows_by_polling(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    push_new_image(source.url, "library/app", "v1")
    log_path = tmp_path / "mirror.log"
    # Nothing listens on this port: the mirror polls the feed meanwhile.
    unreachable = f"nats://127.0.0.1:{free_port()}"
    mirror = start_mirror(
        source.url,
        target.url,
        log_path,
        "--poll-interval",
        "0.1",
        "--nats",
        unreachable,
    )
    with stopped_on_exit(mirror):
        wait_for_manifest(target.url, "library/app", "v1")
        later = make_image()
        with httpx.Client(base_url=source.url) as client:
            push_image(client, "library/app", later, "v2")
        wait_for_manifest(target.url, "library/app", "v2")
    assert "mirror_stopped" in logged_events(log_path)


@needs_skopeo
@pytest.mark.parametrize("server_fixture", ["nats_server", "debian_nats_server"])
def test_mirror_follows_nats(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    server_fixture: str,
    target: ServeProcess,
) -> None:
    """The mirror follows the newest server and the oldest supported, 2.9."""
    nats_server: NatsServer = request.getfixturevalue(server_fixture)
    with cairn_on_nats(tmp_path / "source", nats_server.url) as source_url:
        log_path = tmp_path / "mirror.log"
        # A long poll interval, so that only NATS can make the mirror prompt.
        with following_mirror(source_url, target.url, nats_server.url, log_path, "300"):
            artifact = make_artifact(
                make_image(), "application/vnd.example+json", b"{}"
            )
            with httpx.Client(base_url=source_url) as client:
                push_image(client, "library/app", make_image(), "v2")
                push_image(client, "library/app", artifact, "signature")
                response = client.delete("/v2/library/app/manifests/v1")
                assert response.status_code == 202, response.text
            wait_for_manifest(target.url, "library/app", "signature")
        # Deletes stay on the source without --propagate-deletes.
        assert manifest_status(target.url, "library/app", "v1") == 200
        assert list_tags(target.url, "library/app") == ["signature", "v1", "v2"]


def test_mirror_ignores_other_registry_on_stream(
    tmp_path: Path, nats_server: NatsServer, target: ServeProcess
) -> None:
    """Events that another registry publishes to the same stream are never
    taken for the source's, even at the position after the mirror's."""
    with (
        cairn_on_nats(tmp_path / "source", nats_server.url) as source_url,
        cairn_on_nats(tmp_path / "other", nats_server.url) as other_url,
    ):
        log_path = tmp_path / "mirror.log"
        with following_mirror(source_url, target.url, nats_server.url, log_path, "300"):
            # The other registry's second image has the positions after the
            # mirror's, and the source's next image has them too.
            with httpx.Client(base_url=other_url) as client:
                push_image(client, "other/app", make_image(), "v1")
                push_image(client, "other/app", make_image(), "v2")
            wait_for_logged(log_path, "nats_event_not_from_source")
            push_new_image(source_url, "library/app", "v2")
            wait_for_manifest(target.url, "library/app", "v2")
    warnings = logged_records(log_path, "nats_event_not_from_source")
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["repository"] == "other/app"
    assert manifest_status(target.url, "other/app", "v2") == 404


def test_mirror_hash_check_without_header(
    tmp_path: Path, nats_server: NatsServer, target: ServeProcess
) -> None:
    """A message without Cairn-Registry-Id, as a cairn older than the header
    publishes, is checked by its previous_hash alone."""
    other = Registry.open(tmp_path / "other", f"sqlite:///{tmp_path / 'other.db'}")
    try:
        upgrade(other.database)
        push_to_registry(other, "other/app", "v1")
        push_to_registry(other, "other/app", "v2")
        other_events = stored_events(other)
    finally:
        other.database.dispose()
    # Position 5, the one after the mirror's once the source has v1.
    foreign = other_events[4]
    subject, body, headers = event_message("cairn", foreign, "unused")
    del headers[REGISTRY_ID]

    async def publish_foreign() -> None:
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().publish(subject, body, headers=headers)
        finally:
            await client.close()

    with cairn_on_nats(tmp_path / "source", nats_server.url) as source_url:
        log_path = tmp_path / "mirror.log"
        with following_mirror(source_url, target.url, nats_server.url, log_path, "300"):
            run_async(publish_foreign())
            wait_for_logged(log_path, "nats_event_not_from_source")
            push_new_image(source_url, "library/app", "v2")
            wait_for_manifest(target.url, "library/app", "v2")
    warnings = logged_records(log_path, "nats_event_not_from_source")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["position"] == 5
    assert warnings[0]["event_id"] == str(foreign.id)
    assert warnings[0]["registry_id"] is None
    assert "previous_hash" in warnings[0]["note"]
    assert "another registry may publish" in warnings[0]["note"]
    assert manifest_status(target.url, "other/app", "v2") == 404


def test_mirror_checks_registry_id_at_start(
    tmp_path: Path, nats_server: NatsServer, target: ServeProcess
) -> None:
    """At position 0, the registry id header distinguishes the source's
    events from another registry's on the same stream. The other's event at
    position 1 is not applied, and the source's is applied without reading
    the feed."""
    feed_reads = FeedReads()
    with (
        cairn_on_nats(tmp_path / "source", nats_server.url, feed_reads) as source_url,
        cairn_on_nats(tmp_path / "other", nats_server.url) as other_url,
    ):
        source_id = httpx.get(f"{source_url}/_cairn/registry").json()["registry_id"]
        other_id = httpx.get(f"{other_url}/_cairn/registry").json()["registry_id"]
        log_path = tmp_path / "mirror.log"
        checkpoint = tmp_path / "checkpoint.json"
        mirror = start_nats_mirror(
            source_url,
            target.url,
            nats_server.url,
            log_path,
            "300",
            "--checkpoint",
            str(checkpoint),
        )
        with stopped_on_exit(mirror):
            wait_for_logged(log_path, "nats_following")
            wait_for_logged(log_path, "mirror_caught_up")
            push_new_image(other_url, "other/app", "v1")
            wait_for_logged(log_path, "nats_event_not_from_source", 20)
            reads_before = feed_reads.count
            push_new_image(source_url, "library/app", "v1")
            wait_for_manifest(target.url, "library/app", "v1")
            reads_after = feed_reads.count
            source_head = head_position(source_url)
    assert reads_after == reads_before
    warnings = logged_records(log_path, "nats_event_not_from_source")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["position"] == 1
    assert warnings[0]["repository"] == "other/app"
    assert warnings[0]["registry_id"] == other_id
    assert warnings[0]["source_registry_id"] == source_id
    assert manifest_status(target.url, "other/app", "v1") == 404
    assert json.loads(checkpoint.read_text())["position"] == source_head


@pytest.mark.parametrize("server_fixture", ["nats_server", "debian_nats_server"])
def test_mirror_polls_while_nats_down(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    server_fixture: str,
    target: ServeProcess,
) -> None:
    nats_server: NatsServer = request.getfixturevalue(server_fixture)
    with cairn_on_nats(tmp_path / "source", nats_server.url) as source_url:
        log_path = tmp_path / "mirror.log"
        with following_mirror(source_url, target.url, nats_server.url, log_path, "0.2"):
            nats_server.kill()
            wait_for_logged(log_path, "mirror_polling")
            push_new_image(source_url, "library/app", "v2")
            # Shorter than the mirror's 30 s resync of the feed while it
            # follows NATS, so only polling can copy v2 in time.
            wait_for_manifest(target.url, "library/app", "v2", 20)

            nats_server.start()
            wait_for_logged(log_path, "mirror_following_nats")
            push_new_image(source_url, "library/app", "v3")
            wait_for_manifest(target.url, "library/app", "v3")
        events = logged_events(log_path)
        assert events.count("mirror_polling") == 1
        assert events.count("mirror_following_nats") == 1
        assert events.index("mirror_polling") < events.index("mirror_following_nats")
        assert list_tags(target.url, "library/app") == ["v1", "v2", "v3"]


def test_mirror_polls_when_prefix_not_stored(
    tmp_path: Path, nats_server: NatsServer, target: ServeProcess
) -> None:
    """A subject prefix that the stream does not store gets a warning, and
    the mirror polls instead of following a consumer that receives nothing."""
    with cairn_on_nats(tmp_path / "source", nats_server.url) as source_url:
        push_new_image(source_url, "library/app", "v1")
        log_path = tmp_path / "mirror.log"
        mirror = start_nats_mirror(
            source_url,
            target.url,
            nats_server.url,
            log_path,
            "0.2",
            "--subject-prefix",
            "other",
        )
        with stopped_on_exit(mirror):
            wait_for_logged(log_path, "nats_subject_not_stored")
            wait_for_manifest(target.url, "library/app", "v1")
            push_new_image(source_url, "library/app", "v2")
            # Shorter than the mirror's 30 s resync of the feed while it
            # follows NATS, so only polling can copy v2 in time.
            wait_for_manifest(target.url, "library/app", "v2", 20)
    [warning] = logged_records(log_path, "nats_subject_not_stored")
    assert warning["level"] == "warning"
    assert warning["stream"] == "CAIRN"
    assert warning["subject_prefix"] == "other"
    assert warning["error"] == (
        "stream CAIRN stores no subject under the subject prefix 'other', only "
        "cairn.blob.>, cairn.manifest.>, cairn.tag.>; set --subject-prefix to "
        "the subject prefix of the cairn serve that publishes to it"
    )
    assert "nats_following" not in logged_events(log_path)


def test_mirror_polls_when_nats_drops_during_catch_up(
    tmp_path: Path, nats_server: NatsServer, target: ServeProcess
) -> None:
    # The mirror follows NATS while it still copies v1, whose blobs the
    # gate holds, and NATS stops before the copy ends.
    gate = BlobGate()
    with cairn_on_nats(tmp_path / "source", nats_server.url, gate) as source_url:
        push_new_image(source_url, "library/app", "v1")
        log_path = tmp_path / "mirror.log"
        mirror = start_nats_mirror(
            source_url, target.url, nats_server.url, log_path, "0.2"
        )
        with stopped_on_exit(mirror):
            wait_until(lambda: gate.delayed, WAIT)
            wait_for_logged(log_path, "nats_following")
            nats_server.kill()
            gate.open()
            wait_for_logged(log_path, "mirror_polling")
            push_new_image(source_url, "library/app", "v2")
            wait_for_manifest(target.url, "library/app", "v2", 20)
        events = logged_events(log_path)
        assert events.index("nats_following") < events.index("mirror_caught_up")
        assert events.index("mirror_caught_up") < events.index("mirror_polling")
        assert list_tags(target.url, "library/app") == ["v1", "v2"]


def test_mirror_reports_index_missing_child(
    source: ServeProcess, target: ServeProcess
) -> None:
    kept_child = make_image()
    deleted_child = make_image()
    index = make_index([kept_child, deleted_child])
    index_digest = sha256(index)
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", kept_child)
        push_image(client, "library/app", deleted_child)
        put_manifest(client, "library/app", "multi", index)
        response = client.delete(f"/v2/library/app/manifests/{deleted_child.digest}")
        assert response.status_code == 202, response.text
    assert manifest_status(source.url, "library/app", "multi") == 200

    result = subprocess.run(
        mirror_argv(source.url, target.url, "--once"),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=300,
    )

    assert result.returncode == 3, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    lines = log_events(result.stderr)
    # One line for the index, though its manifest.pushed and its tag.set
    # event both find it incomplete.
    line = only_line(lines, "manifest_not_copied")
    assert line["level"] == "warning"
    assert line["repository"] == "library/app"
    assert line["digest"] == index_digest
    assert line["missing"] == str(deleted_child.digest)
    assert "no longer on the source" in line["reason"]
    tag_lines = [line for line in lines if line["event"] == "tag_not_copied"]
    assert len(tag_lines) == 1
    assert tag_lines[0]["level"] == "warning"
    assert tag_lines[0]["tag"] == "multi"
    assert tag_lines[0]["digest"] == index_digest
    assert "is no longer on the source" not in tag_lines[0]["reason"]
    assert not [line for line in lines if line["event"] == "tag_skipped"]
    stopped = [line for line in lines if line["event"] == "mirror_stopped"]
    assert len(stopped) == 1
    # The index's manifest.pushed and its tag.set event.
    assert stopped[0]["not_copied"] == 2
    assert stopped[0]["skipped"] == 0
    assert stopped[0]["status"] == 3
    assert manifest_status(target.url, "library/app", "multi") == 404
    assert manifest_status(target.url, "library/app", str(kept_child.digest)) == 200


def push_index_missing_child(url: str) -> dict[str, Any]:
    """Push an index tagged multi whose second child is then deleted, so the
    source serves the index but not all of its content."""
    kept_child = make_image()
    deleted_child = make_image()
    index = make_index([kept_child, deleted_child])
    with httpx.Client(base_url=url) as client:
        push_image(client, "library/app", kept_child)
        push_image(client, "library/app", deleted_child)
        put_manifest(client, "library/app", "multi", index)
        response = client.delete(f"/v2/library/app/manifests/{deleted_child.digest}")
        assert response.status_code == 202, response.text
    return {"kept": kept_child, "deleted": deleted_child, "index": sha256(index)}


def mirror_once_with_checkpoint(
    source: str, target: str, checkpoint: Path
) -> tuple[int, list[dict[str, Any]]]:
    """Run the mirror with --once and ``checkpoint``; return its exit status
    and log lines."""
    result = run_mirror_status(source, target, "--checkpoint", str(checkpoint))
    assert "Traceback" not in result.stderr
    return result.returncode, log_events(result.stderr)


def only_line(lines: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = [line for line in lines if line["event"] == event]
    assert len(found) == 1, (event, found)
    return found[0]


def saved_not_copied(checkpoint: Path) -> list[tuple[str, str | None]]:
    """Return the checkpoint's not-copied events as (type, tag) pairs."""
    document = json.loads(checkpoint.read_text())
    return [(entry["type"], entry["tag"]) for entry in document["not_copied"]]


def test_mirror_rerun_copies_restored_content(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    pushed = push_index_missing_child(source.url)
    checkpoint = tmp_path / "checkpoint.json"

    status, _ = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 3
    assert manifest_status(target.url, "library/app", "multi") == 404
    assert saved_not_copied(checkpoint) == [
        ("manifest.pushed", None),
        ("tag.set", "multi"),
    ]
    head = head_position(source.url)
    assert json.loads(checkpoint.read_text())["position"] == head

    # The child comes back, by digest and untagged: no event names the index.
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", pushed["deleted"])

    status, lines = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 0
    assert only_line(lines, "not_copied_retrying")["count"] == 2
    resolved = [line for line in lines if line["event"] == "not_copied_resolved"]
    assert [line["type"] for line in resolved] == ["manifest.pushed", "tag.set"]
    assert [line["outcome"] for line in resolved] == ["copied", "tagged"]
    stopped = only_line(lines, "mirror_stopped")
    assert stopped["not_copied"] == 0
    assert stopped["status"] == 0
    assert manifest_status(target.url, "library/app", "multi") == 200
    assert raw_manifest(target.url, "library/app", "multi") == raw_manifest(
        source.url, "library/app", "multi"
    )
    assert saved_not_copied(checkpoint) == []

    status, lines = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 0
    assert not [line for line in lines if line["event"] == "not_copied_retrying"]


def test_mirror_rerun_retries_until_settled(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    pushed = push_index_missing_child(source.url)
    checkpoint = tmp_path / "checkpoint.json"
    first_status, _ = mirror_once_with_checkpoint(source.url, target.url, checkpoint)
    assert first_status == 3

    # Nothing changed on the source: the rerun tries again and fails again.
    status, lines = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 3
    assert only_line(lines, "not_copied_retrying")["count"] == 2
    assert only_line(lines, "mirror_stopped")["not_copied"] == 2
    assert only_line(lines, "manifest_not_copied")["digest"] == pushed["index"]
    assert only_line(lines, "tag_not_copied")["tag"] == "multi"
    assert manifest_status(target.url, "library/app", "multi") == 404
    assert len(saved_not_copied(checkpoint)) == 2

    # The tag moves to a complete image. Its old entry is dropped without
    # setting the tag back, and the index itself is still incomplete.
    with httpx.Client(base_url=source.url) as client:
        put_manifest(client, "library/app", "multi", pushed["kept"])

    status, lines = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 3
    resolved = only_line(lines, "not_copied_resolved")
    assert resolved["tag"] == "multi"
    assert resolved["outcome"] == "gone"
    assert only_line(lines, "mirror_stopped")["not_copied"] == 1
    assert saved_not_copied(checkpoint) == [("manifest.pushed", None)]
    kept_digest = str(pushed["kept"].digest)
    assert sha256(raw_manifest(target.url, "library/app", "multi")) == kept_digest

    # The source deletes the index, so nothing is left to copy.
    with httpx.Client(base_url=source.url) as client:
        response = client.delete(f"/v2/library/app/manifests/{pushed['index']}")
        assert response.status_code == 202, response.text

    status, lines = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 0
    resolved = only_line(lines, "not_copied_resolved")
    assert resolved["digest"] == pushed["index"]
    assert resolved["outcome"] == "gone"
    assert saved_not_copied(checkpoint) == []
    assert sha256(raw_manifest(target.url, "library/app", "multi")) == kept_digest


def test_mirror_reads_older_checkpoint(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    push_new_image(source.url, "library/app", "v1")
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(
        json.dumps({"source": source.url, "target": target.url, "position": 0})
    )

    status, _ = mirror_once_with_checkpoint(source.url, target.url, checkpoint)

    assert status == 0
    assert saved_not_copied(checkpoint) == []
    assert list_tags(target.url, "library/app") == ["v1"]


@pytest.mark.parametrize(
    "entry",
    [
        {"position": 1, "type": "blob.pushed", "repository": "a", "digest": "d"},
        {"position": 1, "type": "tag.set", "repository": "a", "digest": "d"},
        {"position": "x", "type": "manifest.pushed", "repository": "a", "digest": "d"},
        "not an object",
    ],
    ids=["blob-event", "tag-without-tag", "bad-position", "not-an-object"],
)
def test_mirror_rejects_bad_not_copied(tmp_path: Path, entry: object) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    document = {
        "source": "http://127.0.0.1:1",
        "target": "http://127.0.0.1:2",
        "position": 3,
        "not_copied": [entry],
    }
    checkpoint.write_text(json.dumps(document))

    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Checkpoint.load(checkpoint, "http://127.0.0.1:1", "http://127.0.0.1:2")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"schemaVersion": 2, "layers": []}, "the key 'position' is missing"),
        ({"position": 3, "target": "x"}, "the key 'source' is missing"),
        ([1, 2], "it is not a JSON object"),
    ],
)
def test_mirror_names_checkpoint_problem(
    tmp_path: Path, document: object, reason: str
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(json.dumps(document))

    with pytest.raises(CheckpointError) as raised:
        Checkpoint.load(checkpoint, "http://127.0.0.1:1", "http://127.0.0.1:2")

    assert str(raised.value).startswith(
        f"cannot read checkpoint {checkpoint}: {reason}. "
    )


VALID_HASH = "0" * 64
# Positions are signed 64-bit integers in cairn's event log.
POSITION_RANGE = "an integer from 0 to 9223372036854775807"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"position": -3}, f"invalid position -3: expected {POSITION_RANGE}"),
        ({"position": True}, f"invalid position True: expected {POSITION_RANGE}"),
        ({"position": 2.5}, f"invalid position 2.5: expected {POSITION_RANGE}"),
        ({"position": "12"}, f"invalid position '12': expected {POSITION_RANGE}"),
        (
            {"position": 2**70},
            f"invalid position {2**70}: expected {POSITION_RANGE}",
        ),
        (
            {"position": 2**63},
            f"invalid position {2**63}: expected {POSITION_RANGE}",
        ),
        ({"source": 5}, "invalid source 5: expected a string"),
        ({"target": None}, "invalid target None: expected a string"),
        (
            {"position_hash": "abc"},
            "invalid position_hash 'abc': expected the SHA-256 hash of an event, "
            "64 lowercase hexadecimal digits",
        ),
        (
            {"position_hash": VALID_HASH.upper().replace("0", "A")},
            f"invalid position_hash {'A' * 64!r}: expected the SHA-256 hash of an "
            "event, 64 lowercase hexadecimal digits",
        ),
        ({"position_hash": 7}, "invalid position_hash 7: expected a string"),
        (
            {"propagate_deletes": 1},
            "invalid propagate_deletes 1: expected true or false",
        ),
        ({"not_copied": {}}, "invalid not_copied {}: expected a list"),
        ({"not_copied": "abc"}, "invalid not_copied 'abc': expected a list"),
        (
            {"not_copied": ["abc"]},
            "invalid not_copied[0] 'abc': expected a JSON object",
        ),
    ],
)
def test_mirror_rejects_invalid_checkpoint_field(
    tmp_path: Path, changes: dict[str, object], reason: str
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    document = {
        "source": "http://127.0.0.1:1",
        "target": "http://127.0.0.1:2",
        "position": 3,
        "position_hash": VALID_HASH,
        **changes,
    }
    checkpoint.write_text(json.dumps(document))

    with pytest.raises(CheckpointError) as raised:
        Checkpoint.load(checkpoint, "http://127.0.0.1:1", "http://127.0.0.1:2")

    assert str(raised.value).startswith(
        f"cannot read checkpoint {checkpoint}: {reason}. "
    )


VALID_NOT_COPIED = {
    "position": 1,
    "type": "manifest.pushed",
    "repository": "library/app",
    "digest": "sha256:" + VALID_HASH,
}


def write_not_copied(checkpoint: Path, entries: list[dict[str, object]]) -> None:
    document = {
        "source": "http://127.0.0.1:1",
        "target": "http://127.0.0.1:2",
        "position": 3,
        "not_copied": entries,
    }
    checkpoint.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"position": 0}, "invalid not_copied[1].position 0"),
        ({"position": -1}, "invalid not_copied[1].position -1"),
        ({"position": True}, "invalid not_copied[1].position True"),
        ({"position": "2"}, "invalid not_copied[1].position '2'"),
        (
            {"position": 2**70},
            f"invalid not_copied[1].position {2**70}: expected an integer from 1 "
            "to 9223372036854775807",
        ),
        ({"repository": 5}, "invalid not_copied[1].repository 5: expected a string"),
        ({"digest": None}, "invalid not_copied[1].digest None: expected a string"),
        ({"position": None}, "invalid not_copied[1].position None"),
        ({"type": "tag.set"}, "not_copied[1] is a tag.set entry without a tag"),
    ],
)
def test_mirror_rejects_invalid_not_copied_field(
    tmp_path: Path, changes: dict[str, object], reason: str
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    entry = {
        "position": 2,
        "type": "manifest.pushed",
        "repository": "library/app",
        "digest": "sha256:" + VALID_HASH,
        **changes,
    }
    write_not_copied(checkpoint, [VALID_NOT_COPIED, entry])

    with pytest.raises(CheckpointError) as raised:
        Checkpoint.load(checkpoint, "http://127.0.0.1:1", "http://127.0.0.1:2")

    assert str(raised.value).startswith(f"cannot read checkpoint {checkpoint}: ")
    assert reason in str(raised.value)


@pytest.mark.parametrize("key", ["position", "type", "repository", "digest"])
def test_not_copied_missing_key_named(tmp_path: Path, key: str) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    entry = dict(VALID_NOT_COPIED)
    del entry[key]
    write_not_copied(checkpoint, [VALID_NOT_COPIED, entry])

    with pytest.raises(CheckpointError) as raised:
        Checkpoint.load(checkpoint, "http://127.0.0.1:1", "http://127.0.0.1:2")

    assert str(raised.value).startswith(
        f"cannot read checkpoint {checkpoint}: the key {key!r} is missing from "
        "not_copied[1]. "
    )


@pytest.mark.parametrize("position", [-3, 2**63, 2**70])
def test_mirror_exits_2_on_invalid_position(tmp_path: Path, position: int) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    source, target = "http://127.0.0.1:1", "http://127.0.0.1:2"
    checkpoint.write_text(
        json.dumps({"source": source, "target": target, "position": position})
    )

    result = run_mirror_status(source, target, "--checkpoint", str(checkpoint))

    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.startswith(
        f"cairn mirror: cannot read checkpoint {checkpoint}: invalid position "
        f"{position}: expected {POSITION_RANGE}. "
    )
    assert "mirror_started" not in result.stderr
    assert json.loads(checkpoint.read_text())["position"] == position


def run_mirror_status(
    source: str, target: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mirror_argv(source, target, "--once", *extra),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=120,
    )


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000/", True),
        ("http://127.0.0.1:5000", "HTTP://LocalHost:5000//", True),
        ("http://127.0.0.1:5000", "http://[::1]:5000", True),
        ("http://Registry.Example:80/", "http://registry.example", True),
        ("https://registry.example", "https://registry.example:443/", True),
        ("http://registry.example/a", "http://registry.example/a/", True),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001", False),
        ("http://127.0.0.1:5000", "http://127.0.0.2:5000", False),
        ("http://registry.example", "https://registry.example", False),
        ("http://registry.example/a", "http://registry.example/b", False),
    ],
)
def test_mirror_normalise_url(first: str, second: str, same: bool) -> None:
    assert (normalise_url(first) == normalise_url(second)) is same


def test_mirror_rejects_own_source_url(source: ServeProcess) -> None:
    populate(source.url)
    head = head_position(source.url)
    port = source.url.rsplit(":", 1)[1]
    targets = [
        source.url,
        source.url + "/",
        f"HTTP://LOCALHOST:{port}",
        f"http://[::1]:{port}/",
    ]

    for target in targets:
        result = run_mirror_status(source.url, target)

        assert result.returncode == 2, (target, result.stderr[-2000:])
        assert f"--target {target} is the source registry" in result.stderr
        assert "Traceback" not in result.stderr
    assert head_position(source.url) == head


def test_mirror_rejects_target_not_base_url(source: ServeProcess) -> None:
    populate(source.url)
    head = head_position(source.url)
    port = source.url.rsplit(":", 1)[1]
    targets = [
        f"{source.url}/v2/",
        f"{source.url}/mirror",
        f"{source.url}/?tenant=a",
        f"http://127.000.000.001:{port}",
        "http://[::1",
        "http://127.0.0.1:99999",
    ]

    for target in targets:
        result = run_mirror_status(source.url, target)

        assert result.returncode == 2, (target, result.stderr[-2000:])
        assert f"invalid --target {target!r}: " in result.stderr
        assert "Traceback" not in result.stderr
    assert head_position(source.url) == head


def test_mirror_rejects_own_source_by_id(
    source: ServeProcess, target: ServeProcess
) -> None:
    populate(source.url)
    head = head_position(source.url)
    # A second server on the source's database and blobs: one registry
    # behind two URLs that the URL comparison cannot tell apart.
    directory = source.log_path.parent
    registry = Registry.open(directory / "data", f"sqlite:///{directory / 'cairn.db'}")
    try:
        with running(create_app(registry)) as second:
            source_id = httpx.get(f"{source.url}/_cairn/registry").json()
            second_id = httpx.get(f"{second.url}/_cairn/registry").json()
            target_id = httpx.get(f"{target.url}/_cairn/registry").json()
            assert source_id == second_id
            assert source_id != target_id

            result = run_mirror_status(source.url, second.url, "--propagate-deletes")
    finally:
        registry.database.dispose()

    assert result.returncode == 2, result.stderr[-2000:]
    assert "reach the same registry" in result.stderr
    assert source_id["registry_id"] in result.stderr
    assert head_position(source.url) == head


def test_mirror_rejects_foreign_checkpoint(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(
        json.dumps(
            {"source": "http://127.0.0.1:1", "target": target.url, "position": 3}
        )
    )

    result = subprocess.run(
        mirror_argv(source.url, target.url, "--once", "--checkpoint", str(checkpoint)),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=60,
    )

    assert result.returncode == 2
    assert "belongs to the mirror from http://127.0.0.1:1" in result.stderr
