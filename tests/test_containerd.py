"""containerd's `ctr` pulling from and pushing to cairn.

The module starts its own containerd with a private configuration, root,
state directory and socket in pytest's temporary directory. That containerd
runs without the CRI plugin, the task runtimes and the snapshotters that
need overlayfs or special file systems, and it listens on its Unix sockets
alone. Each test works in its own containerd namespace against an
in-process cairn on 127.0.0.1.

containerd 1.6 keeps one content store for all namespaces (its default
content_sharing_policy is "shared"), and a fetch of a blob that the store
already contains downloads nothing. So every test builds images with fresh
random layers, and the bytes that containerd returns after a pull can only
have come from cairn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.domain.digest import Digest
from engine.domain.manifests import OCI_INDEX
from tests.images import Image, make_image, make_index
from tests.server import READER, START_TIMEOUT_S, WRITER, ServerThread, push_image
from tests.test_clients import CLIENT_TIMEOUT_S, build_oci_layout

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(
        CONTAINERD is None or CTR is None,
        reason="containerd and ctr are not installed: apt-get install containerd",
    ),
]

# Plugins that touch the machine outside the private directories or that
# the tests do not need: CRI, the task runtimes with their cgroup monitor
# (the tests run no container), /opt/containerd, and the snapshotters other
# than native.
DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.internal.v1.restart",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
]

LINUX_AMD64 = {"architecture": "amd64", "os": "linux"}
LINUX_ARM64 = {"architecture": "arm64", "os": "linux"}


@dataclass
class Containerd:
    """A containerd process started by this module, and `ctr` run against it."""

    process: subprocess.Popen[bytes]
    address: Path
    log_path: Path
    env: dict[str, str]

    def run(
        self, namespace: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `ctr` in ``namespace``. With ``check``, a failure fails the test."""
        assert CTR is not None
        command = [CTR, "--address", str(self.address), "--namespace", namespace]
        result = subprocess.run(
            [*command, *argv],
            env=self.env,
            capture_output=True,
            timeout=CLIENT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert result.returncode == 0, (
                f"ctr {' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')}\n"
                f"{result.stderr.decode(errors='replace')}"
            )
        return result

    def content_digests(self, namespace: str) -> set[str]:
        listed = self.run(namespace, "content", "ls", "--quiet")
        return set(listed.stdout.decode().split())

    def content(self, namespace: str, digest: str) -> bytes:
        return self.run(namespace, "content", "get", digest).stdout

    def image_digests(self, namespace: str) -> dict[str, str]:
        """Return the manifest or index digest of each image, by reference."""
        listed = self.run(namespace, "images", "ls").stdout.decode()
        # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS, after a header line.
        rows = [line.split() for line in listed.splitlines()[1:]]
        return {row[0]: row[2] for row in rows}


def _config_toml(directory: Path, address: Path) -> str:
    # JSON strings are valid TOML basic strings, quotes and backslashes
    # included.
    disabled = ", ".join(json.dumps(name) for name in DISABLED_PLUGINS)
    # An empty address turns the debug and metrics listeners off, and
    # tcp_address is empty so that gRPC is served on the Unix socket alone.
    return (
        "version = 2\n"
        f"root = {json.dumps(str(directory / 'root'))}\n"
        f"state = {json.dumps(str(directory / 'state'))}\n"
        f"temp = {json.dumps(str(directory / 'tmp'))}\n"
        f"disabled_plugins = [{disabled}]\n"
        "\n"
        "[grpc]\n"
        f"  address = {json.dumps(str(address))}\n"
        '  tcp_address = ""\n'
        "\n"
        "[debug]\n"
        '  address = ""\n'
        "\n"
        "[metrics]\n"
        '  address = ""\n'
    )


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A containerd of this module alone, ended by its PID at the module's end."""
    with start_containerd(tmp_path_factory.mktemp("containerd")) as started:
        yield started


@contextmanager
def start_containerd(directory: Path) -> Iterator[Containerd]:
    """Start containerd with its configuration, root, state directory, socket
    and log in the empty directory ``directory``, and end it by its PID on exit."""
    assert CONTAINERD is not None
    (directory / "tmp").mkdir()
    address = directory / "containerd.sock"
    config = directory / "config.toml"
    config.write_text(_config_toml(directory, address))
    log_path = directory / "containerd.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "TMPDIR": str(directory / "tmp"),
    }

    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [CONTAINERD, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    started = Containerd(process, address, log_path, env)
    try:
        _wait_until_serving(started)
        yield started
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def wait_for_socket(
    name: str, process: subprocess.Popen[bytes], socket: Path, log_path: Path
) -> None:
    """Wait until ``process`` creates ``socket``, for at most START_TIMEOUT_S.

    Raises RuntimeError with the end of its log when it exits first.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while not socket.is_socket():
        status = process.poll()
        if status is not None:
            log = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{name} exited with status {status}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not create {socket} within {START_TIMEOUT_S} s; "
                f"see {log_path}"
            )
        time.sleep(0.05)


def _wait_until_serving(containerd: Containerd) -> None:
    wait_for_socket(
        "containerd", containerd.process, containerd.address, containerd.log_path
    )
    containerd.run("default", "version")


def _new_namespace() -> str:
    return f"cairn-{uuid.uuid4().hex[:12]}"


# ---- images ---------------------------------------------------------------------


def _layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _layout_image(layout: Path) -> Image:
    """Read the image of the only manifest in the OCI layout ``layout``."""
    index = json.loads((layout / "index.json").read_text())
    manifest = _layout_blob(layout, index["manifests"][0]["digest"])
    document = json.loads(manifest)
    return Image(
        config=_layout_blob(layout, document["config"]["digest"]),
        layers=[_layout_blob(layout, layer["digest"]) for layer in document["layers"]],
        manifest=manifest,
    )


def build_image(tmp_path: Path) -> tuple[Path, Image]:
    """Write a two-layer linux/amd64 image with real tar layers as an OCI
    layout tagged v1, and return the layout and the image."""
    layout = tmp_path / "layout"
    digest = build_oci_layout(layout, "v1")
    image = _layout_image(layout)
    assert str(image.digest) == digest
    return layout, image


def _archive(layout: Path) -> Path:
    """Pack ``layout`` into the tar file that `ctr images import` reads."""
    path = layout.with_suffix(".tar")
    with tarfile.open(path, "w") as archive:
        for member in sorted(layout.rglob("*")):
            archive.add(member, arcname=str(member.relative_to(layout)))
    return path


def _digests(image: Image) -> set[str]:
    return {str(Digest.of(blob)) for blob in [image.manifest, *image.blobs]}


def _chain_id(config: bytes) -> str:
    """Return the chain ID of an image's layers, as the OCI image spec
    (config.md, "Layer ChainID") derives it from the config's diff IDs."""
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def _assert_serves(
    client: httpx.Client, repository: str, tag: str, image: Image
) -> None:
    """Check that cairn serves ``image`` at ``tag`` byte for byte."""
    manifest = client.get(
        f"/v2/{repository}/manifests/{tag}",
        headers={"Accept": image.media_type},
    )
    assert manifest.status_code == 200, manifest.text
    assert manifest.headers["Docker-Content-Digest"] == str(image.digest)
    assert manifest.content == image.manifest
    for blob in image.blobs:
        served = client.get(f"/v2/{repository}/blobs/{Digest.of(blob)}")
        assert served.status_code == 200, served.text
        assert served.content == blob


def event_types(client: httpx.Client, repository: str) -> list[str]:
    page = client.get("/_cairn/events", params={"repository": repository})
    assert page.status_code == 200, page.text
    return [event["type"] for event in page.json()["events"]]


# ---- pull -----------------------------------------------------------------------


def test_pull_by_tag_unpacks(
    containerd: Containerd, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    _, image = build_image(tmp_path)
    push_image(app_client, "library/app", image, "v1")
    namespace = _new_namespace()
    reference = f"{host}/library/app:v1"

    pulled = containerd.run(
        namespace,
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        "--platform",
        "linux/amd64",
        "--print-chainid",
        reference,
    )

    assert containerd.image_digests(namespace) == {reference: str(image.digest)}
    assert containerd.content_digests(namespace) == _digests(image)
    for blob in [image.manifest, *image.blobs]:
        assert containerd.content(namespace, str(Digest.of(blob))) == blob
    # containerd checks each unpacked layer against its diff ID, so the
    # snapshot named by the chain ID exists only after a correct unpack.
    chain_id = _chain_id(image.config)
    assert f"image chain ID: {chain_id}" in pulled.stdout.decode()
    snapshots = containerd.run(namespace, "snapshots", "--snapshotter", "native", "ls")
    assert chain_id in snapshots.stdout.decode().split()


def test_pull_by_digest_hosts_dir(
    containerd: Containerd, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    """Pull through a hosts.toml that names cairn's plain-HTTP address, as
    containerd is configured for a registry without TLS."""
    _, image = build_image(tmp_path)
    push_image(app_client, "library/app", image, "v1")
    hosts_dir = tmp_path / "hosts"
    (hosts_dir / host).mkdir(parents=True)
    (hosts_dir / host / "hosts.toml").write_text(
        f'server = "http://{host}"\n'
        "\n"
        f'[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
    )
    namespace = _new_namespace()
    reference = f"{host}/library/app@{image.digest}"

    containerd.run(
        namespace,
        "images",
        "pull",
        "--hosts-dir",
        str(hosts_dir),
        "--snapshotter",
        "native",
        "--platform",
        "linux/amd64",
        reference,
    )

    assert containerd.image_digests(namespace) == {reference: str(image.digest)}
    assert containerd.content_digests(namespace) == _digests(image)
    for blob in [image.manifest, *image.blobs]:
        assert containerd.content(namespace, str(Digest.of(blob))) == blob


# ---- push -----------------------------------------------------------------------


def test_push_imported_image(
    containerd: Containerd, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    layout, image = build_image(tmp_path)
    namespace = _new_namespace()
    reference = f"{host}/team/pushed:v1"
    containerd.run(
        namespace,
        "images",
        "import",
        "--base-name",
        f"{host}/team/pushed",
        "--no-unpack",
        str(_archive(layout)),
    )
    assert containerd.image_digests(namespace) == {reference: str(image.digest)}

    containerd.run(namespace, "images", "push", "--plain-http", reference)

    _assert_serves(app_client, "team/pushed", "v1", image)
    tags = app_client.get("/v2/team/pushed/tags/list")
    assert tags.json()["tags"] == ["v1"]
    types = event_types(app_client, "team/pushed")
    assert types.count("blob.pushed") == 3
    assert types.count("manifest.pushed") == 1


def test_push_pulled_image_mounts(
    containerd: Containerd, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    """containerd labels pulled blobs with their source repository, and
    requests cross-repository mounts when it pushes them to another one."""
    _, image = build_image(tmp_path)
    push_image(app_client, "library/app", image, "v1")
    namespace = _new_namespace()
    source = f"{host}/library/app:v1"
    containerd.run(
        namespace,
        "content",
        "fetch",
        "--plain-http",
        "--platform",
        "linux/amd64",
        source,
    )

    containerd.run(
        namespace, "images", "push", "--plain-http", f"{host}/team/copy:v2", source
    )

    _assert_serves(app_client, "team/copy", "v2", image)
    types = event_types(app_client, "team/copy")
    assert types.count("blob.mounted") == 3
    assert types.count("blob.pushed") == 0
    assert types.count("manifest.pushed") == 1


# ---- multi-platform index -------------------------------------------------------


def test_multi_platform_index(
    containerd: Containerd, host: str, app_client: httpx.Client
) -> None:
    # These layers are random bytes, not tar files, so the test fetches
    # content without unpacking it.
    amd64 = make_image()
    arm64 = make_image()
    index = make_index([amd64, arm64], [LINUX_AMD64, LINUX_ARM64])
    index_digest = str(Digest.of(index))
    for child in (amd64, arm64):
        push_image(app_client, "library/multi", child)
    put = app_client.put(
        "/v2/library/multi/manifests/v1",
        content=index,
        headers={"Content-Type": OCI_INDEX},
    )
    assert put.status_code == 201, put.text
    reference = f"{host}/library/multi:v1"

    one_platform = _new_namespace()
    containerd.run(
        one_platform,
        "content",
        "fetch",
        "--plain-http",
        "--platform",
        "linux/arm64",
        reference,
    )
    assert containerd.image_digests(one_platform) == {reference: index_digest}
    assert containerd.content_digests(one_platform) == {index_digest} | _digests(arm64)

    all_platforms = _new_namespace()
    containerd.run(
        all_platforms, "content", "fetch", "--plain-http", "--all-platforms", reference
    )
    expected = {index_digest} | _digests(amd64) | _digests(arm64)
    assert containerd.content_digests(all_platforms) == expected
    assert containerd.content(all_platforms, index_digest) == index
    for child in (amd64, arm64):
        for blob in [child.manifest, *child.blobs]:
            assert containerd.content(all_platforms, str(Digest.of(blob))) == blob

    copy = f"{host}/library/multi-copy:v1"
    containerd.run(all_platforms, "images", "push", "--plain-http", copy, reference)

    served = app_client.get(
        "/v2/library/multi-copy/manifests/v1", headers={"Accept": OCI_INDEX}
    )
    assert served.status_code == 200, served.text
    assert served.headers["Docker-Content-Digest"] == index_digest
    assert served.content == index
    for child in (amd64, arm64):
        _assert_serves(app_client, "library/multi-copy", str(child.digest), child)


# ---- credentials ----------------------------------------------------------------


def test_push_with_credentials(
    containerd: Containerd, auth_server: ServerThread, tmp_path: Path
) -> None:
    layout, image = build_image(tmp_path)
    host = f"127.0.0.1:{auth_server.port}"
    namespace = _new_namespace()
    reference = f"{host}/library/private:v1"
    containerd.run(
        namespace,
        "images",
        "import",
        "--base-name",
        f"{host}/library/private",
        "--no-unpack",
        str(_archive(layout)),
    )
    push = ["images", "push", "--plain-http"]

    anonymous = containerd.run(namespace, *push, reference, check=False)
    reader = containerd.run(
        namespace, *push, "--user", ":".join(READER), reference, check=False
    )

    assert anonymous.returncode != 0
    assert b"401 Unauthorized" in anonymous.stderr
    assert reader.returncode != 0
    assert b"403 Forbidden" in reader.stderr
    with httpx.Client(base_url=auth_server.url, auth=READER, timeout=60) as client:
        missing = client.get("/v2/library/private/manifests/v1")
        assert missing.status_code == 404

        containerd.run(namespace, *push, "--user", ":".join(WRITER), reference)

        _assert_serves(client, "library/private", "v1", image)
        events = client.get(
            "/_cairn/events", params={"repository": "library/private"}
        ).json()["events"]
    assert {event["actor"]["user"] for event in events} == {WRITER[0]}

    # The import already stored these blobs, so the fetches below download
    # nothing but resolve the tag, which needs the reader's credentials.
    pull = ["content", "fetch", "--plain-http", "--platform", "linux/amd64"]
    denied = containerd.run(_new_namespace(), *pull, reference, check=False)
    allowed = _new_namespace()
    containerd.run(allowed, *pull, "--user", ":".join(READER), reference)

    assert denied.returncode != 0
    assert b"401 Unauthorized" in denied.stderr
    assert containerd.image_digests(allowed) == {reference: str(image.digest)}
