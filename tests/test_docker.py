"""The docker command-line client pulling from and pushing to cairn.

The module starts its own dockerd, backed by a containerd that it starts
as tests/test_containerd.py does. dockerd keeps its data root, exec root,
PID file, configuration file, trust key and API socket in pytest's
temporary directory, and it serves its API on that Unix socket alone. It
uses the vfs storage driver and runs without a bridge network, iptables
rules or IP forwarding. The tests run no container.

dockerd 20.10 on Linux creates /run/docker/plugins whatever its exec root
is (moby's getPluginExecRoot returns that fixed path), and it bind-mounts
its data root onto itself to make the mount shared. So dockerd runs in a
private mount namespace with an empty tmpfs on /run, and that directory
and that mount go away with the namespace when dockerd exits.

dockerd talks plain HTTP to registries on 127.0.0.0/8 without any
--insecure-registry option, so every reference names cairn's 127.0.0.1
address. Each test has its own cairn on a new port and its own docker
client configuration (DOCKER_CONFIG), but all tests share dockerd's image
store. The first layer of build_image has fixed content, so a later test
may find it in that store, while the second layer is random and always
comes from cairn.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.domain.digest import Digest
from engine.domain.manifests import DOCKER_MANIFEST, OCI_MANIFEST
from tests.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    Image,
    encode,
    make_image,
    make_index,
)
from tests.server import READER, WRITER, ServerThread, push_image
from tests.test_clients import CLIENT_TIMEOUT_S, make_layer
from tests.test_containerd import (
    CONTAINERD,
    CTR,
    LINUX_AMD64,
    LINUX_ARM64,
    build_image,
    event_types,
    start_containerd,
    wait_for_socket,
)

DOCKER = shutil.which("docker")
DOCKERD = shutil.which("dockerd")
UNSHARE = shutil.which("unshare")

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(
        None in (DOCKER, DOCKERD, CONTAINERD, CTR, UNSHARE),
        reason="docker, dockerd, containerd, ctr or unshare is not installed: "
        "apt-get install docker.io containerd util-linux",
    ),
]

# This shell runs in the new mount namespace. `mount -n` writes no
# /run/mount/utab, so nothing outside the namespace changes, and exec keeps
# the PID that the fixture ends.
IN_PRIVATE_RUN = 'mount -n -t tmpfs -o mode=0755 tmpfs /run && exec "$@"'

PUSHED = re.compile(r": digest: (sha256:[0-9a-f]{64}) size: (\d+)")


@dataclass
class DockerCli:
    """The docker CLI with its own configuration directory, run against one
    dockerd's API socket."""

    socket: Path
    env: dict[str, str]

    def run(
        self, *argv: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker`. With ``check``, a failure fails the test."""
        assert DOCKER is not None
        result = subprocess.run(
            [DOCKER, "--host", f"unix://{self.socket}", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        if check:
            assert result.returncode == 0, (
                f"docker {' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def inspect(self, reference: str) -> dict[str, Any]:
        output = self.run("image", "inspect", reference).stdout
        [image] = json.loads(output)
        assert isinstance(image, dict)
        return image

    def login(
        self, host: str, credentials: tuple[str, str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        user, password = credentials
        return self.run(
            "login",
            "--username",
            user,
            "--password-stdin",
            host,
            check=check,
            stdin=password,
        )


def _cli(socket: Path, directory: Path) -> DockerCli:
    """Return a DockerCli whose configuration and home are in ``directory``."""
    home = directory / "home"
    home.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DOCKER_CONFIG": str(directory / "docker-config"),
    }
    return DockerCli(socket, env)


@dataclass
class Dockerd:
    """A dockerd process started by this module."""

    process: subprocess.Popen[bytes]
    socket: Path
    log_path: Path


def _dockerd_argv(directory: Path, containerd_address: Path) -> list[str]:
    assert DOCKERD is not None
    # A configuration file of its own keeps dockerd from reading
    # /etc/docker/daemon.json, and the trust key would otherwise be created
    # as /etc/docker/key.json.
    config = directory / "daemon.json"
    config.write_text(json.dumps({"deprecated-key-path": str(directory / "key.json")}))
    return [
        DOCKERD,
        "--data-root",
        str(directory / "data"),
        "--exec-root",
        str(directory / "exec"),
        "--pidfile",
        str(directory / "dockerd.pid"),
        "--host",
        f"unix://{directory / 'docker.sock'}",
        "--config-file",
        str(config),
        "--containerd",
        str(containerd_address),
        "--storage-driver",
        "vfs",
        "--bridge",
        "none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
    ]


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A dockerd and containerd of this module alone, ended by their PIDs at
    the module's end."""
    assert UNSHARE is not None
    directory = tmp_path_factory.mktemp("dockerd")
    (directory / "containerd").mkdir()
    log_path = directory / "dockerd.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory)}

    with start_containerd(directory / "containerd") as containerd:
        argv = [
            UNSHARE,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            IN_PRIVATE_RUN,
            "sh",
            *_dockerd_argv(directory, containerd.address),
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        started = Dockerd(process, directory / "docker.sock", log_path)
        try:
            _wait_until_serving(started, directory / "probe")
            yield started
        finally:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _wait_until_serving(dockerd: Dockerd, cli_directory: Path) -> None:
    wait_for_socket("dockerd", dockerd.process, dockerd.socket, dockerd.log_path)
    _cli(dockerd.socket, cli_directory).run("version")


@pytest.fixture
def docker(dockerd: Dockerd, tmp_path: Path) -> DockerCli:
    """The docker CLI with a configuration of this test alone."""
    return _cli(dockerd.socket, tmp_path / "docker")


# ---- images ---------------------------------------------------------------------


def _docker_schema2(image: Image) -> Image:
    """Return ``image`` with a Docker schema 2 manifest of the same blobs."""
    document = json.loads(image.manifest)
    document["mediaType"] = DOCKER_MANIFEST
    document["config"]["mediaType"] = DOCKER_CONFIG
    for layer in document["layers"]:
        layer["mediaType"] = DOCKER_LAYER
    return Image(image.config, image.layers, encode(document), DOCKER_MANIFEST)


def _import(docker: DockerCli, tmp_path: Path, reference: str) -> bytes:
    """Create ``reference`` from a new one-layer tar with `docker import`, which
    reads a local file and contacts no registry, and return that tar."""
    _, rootfs = make_layer({"data/random.bin": os.urandom(100_000)})
    path = tmp_path / "rootfs.tar"
    path.write_bytes(rootfs)
    docker.run("import", str(path), reference)
    return rootfs


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    assert member is not None, f"{name} is not a file in the archive"
    return member.read()


def _saved(
    docker: DockerCli, reference: str, tmp_path: Path
) -> tuple[bytes, list[bytes]]:
    """Export ``reference`` with `docker save` and return its config and its
    layers as uncompressed tars, as dockerd stores them."""
    path = tmp_path / "saved.tar"
    docker.run("save", "--output", str(path), reference)
    with tarfile.open(path) as archive:
        [entry] = json.loads(_member(archive, "manifest.json"))
        config = _member(archive, entry["Config"])
        layers = [_member(archive, name) for name in entry["Layers"]]
    return config, layers


def _config_digest(image: Image) -> str:
    return str(Digest.of(image.config))


def _pushed_digest(push: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    """Return the manifest digest and size that `docker push` printed."""
    match = PUSHED.search(push.stdout)
    assert match is not None, push.stdout
    return match.group(1), int(match.group(2))


@dataclass
class ServedManifest:
    """A manifest as cairn serves it, after a check of its digest."""

    digest: str
    content: bytes
    document: dict[str, Any]


def _served_manifest(
    client: httpx.Client, repository: str, reference: str
) -> ServedManifest:
    response = client.get(
        f"/v2/{repository}/manifests/{reference}",
        headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"},
    )
    assert response.status_code == 200, response.text
    digest = response.headers["Docker-Content-Digest"]
    assert digest == str(Digest.of(response.content))
    document = json.loads(response.content)
    assert isinstance(document, dict)
    assert response.headers["Content-Type"] == document["mediaType"]
    return ServedManifest(digest, response.content, document)


def _served_blob(client: httpx.Client, repository: str, digest: str) -> bytes:
    response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200, response.text
    assert str(Digest.of(response.content)) == digest
    return response.content


# ---- pull -----------------------------------------------------------------------


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_pull_by_tag(
    docker: DockerCli,
    host: str,
    app_client: httpx.Client,
    tmp_path: Path,
    media_type: str,
) -> None:
    _, image = build_image(tmp_path)
    if media_type == DOCKER_MANIFEST:
        image = _docker_schema2(image)
    push_image(app_client, "library/app", image, "v1")
    reference = f"{host}/library/app:v1"

    pulled = docker.run("pull", reference)

    assert f"Digest: {image.digest}" in pulled.stdout
    inspected = docker.inspect(reference)
    assert inspected["RepoTags"] == [reference]
    assert inspected["RepoDigests"] == [f"{host}/library/app@{image.digest}"]
    # dockerd names an image by its config digest.
    assert inspected["Id"] == _config_digest(image)
    # dockerd checks each unpacked layer against the config's diff IDs, and
    # `docker save` rebuilds the uncompressed layers byte for byte.
    config, layers = _saved(docker, reference, tmp_path)
    assert config == image.config
    assert layers == [gzip.decompress(layer) for layer in image.layers]


def test_pull_by_digest(
    docker: DockerCli, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    _, image = build_image(tmp_path)
    push_image(app_client, "library/app", image)
    reference = f"{host}/library/app@{image.digest}"

    pulled = docker.run("pull", reference)

    assert f"Digest: {image.digest}" in pulled.stdout
    inspected = docker.inspect(reference)
    assert inspected["RepoTags"] == []
    assert inspected["RepoDigests"] == [reference]
    assert inspected["Id"] == _config_digest(image)
    config, layers = _saved(docker, reference, tmp_path)
    assert config == image.config
    assert layers == [gzip.decompress(layer) for layer in image.layers]


def test_pull_index_selects_platform(
    docker: DockerCli, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    amd64 = build_image(tmp_path)[1]
    # dockerd never fetches this child's layers, so they need not be tars.
    arm64 = make_image()
    index = make_index([amd64, arm64], [LINUX_AMD64, LINUX_ARM64])
    index_digest = str(Digest.of(index))
    for child in (amd64, arm64):
        push_image(app_client, "library/multi", child)
    put = app_client.put(
        "/v2/library/multi/manifests/v1",
        content=index,
        headers={"Content-Type": json.loads(index)["mediaType"]},
    )
    assert put.status_code == 201, put.text
    reference = f"{host}/library/multi:v1"

    pulled = docker.run("pull", "--platform", "linux/amd64", reference)

    assert f"Digest: {index_digest}" in pulled.stdout
    inspected = docker.inspect(reference)
    assert inspected["RepoDigests"] == [f"{host}/library/multi@{index_digest}"]
    assert inspected["Id"] == _config_digest(amd64)


def test_pull_missing_tag_fails(docker: DockerCli, host: str) -> None:
    pulled = docker.run("pull", f"{host}/library/absent:v1", check=False)

    assert pulled.returncode != 0
    assert "manifest unknown" in pulled.stderr


# ---- push -----------------------------------------------------------------------


def test_push_pulled_image_mounts(
    docker: DockerCli, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    """docker records where it pulled each layer from, and requests
    cross-repository mounts when it pushes those layers to another
    repository of the same registry."""
    _, image = build_image(tmp_path)
    push_image(app_client, "library/app", image, "v1")
    docker.run("pull", f"{host}/library/app:v1")
    target = f"{host}/team/copy:v2"
    docker.run("tag", f"{host}/library/app:v1", target)

    pushed = docker.run("push", target)

    # When a mount fails, dockerd uploads the layers compressed anew, so
    # their digests change and the checks below fail too.
    types = event_types(app_client, "team/copy")
    assert types.count("blob.mounted") == len(image.layers)
    assert types.count("manifest.pushed") == 1
    digest, size = _pushed_digest(pushed)
    served = _served_manifest(app_client, "team/copy", "v2")
    assert served.digest == digest
    assert len(served.content) == size
    # dockerd 20.10.24 pushes a Docker schema 2 manifest whatever manifest
    # it pulled, but the config and the layers stay the same blobs.
    original = json.loads(image.manifest)
    assert served.document["config"]["digest"] == original["config"]["digest"]
    assert served.document["config"]["size"] == original["config"]["size"]
    layers = served.document["layers"]
    assert [(layer["digest"], layer["size"]) for layer in layers] == [
        (layer["digest"], layer["size"]) for layer in original["layers"]
    ]
    for blob in image.blobs:
        assert _served_blob(app_client, "team/copy", str(Digest.of(blob))) == blob
    assert sorted(docker.inspect(target)["RepoDigests"]) == [
        f"{host}/library/app@{image.digest}",
        f"{host}/team/copy@{digest}",
    ]


def test_push_imported_image_round_trip(
    docker: DockerCli, host: str, app_client: httpx.Client, tmp_path: Path
) -> None:
    reference = f"{host}/team/imported:v1"
    rootfs = _import(docker, tmp_path, reference)
    image_id = docker.inspect(reference)["Id"]

    pushed = docker.run("push", reference)

    digest, _ = _pushed_digest(pushed)
    served = _served_manifest(app_client, "team/imported", "v1")
    assert served.digest == digest
    config_digest = served.document["config"]["digest"]
    config = _served_blob(app_client, "team/imported", config_digest)
    assert config_digest == image_id
    [layer] = served.document["layers"]
    compressed = _served_blob(app_client, "team/imported", layer["digest"])
    assert len(compressed) == layer["size"]
    assert gzip.decompress(compressed) == rootfs
    diff_id = "sha256:" + hashlib.sha256(rootfs).hexdigest()
    assert json.loads(config)["rootfs"]["diff_ids"] == [diff_id]
    types = event_types(app_client, "team/imported")
    assert types.count("blob.pushed") == 2
    assert types.count("blob.mounted") == 0
    assert types.count("manifest.pushed") == 1

    # With the image gone from dockerd, only cairn can supply it again.
    docker.run("image", "rm", reference)
    by_digest = f"{host}/team/imported@{digest}"
    docker.run("pull", by_digest)

    assert docker.inspect(by_digest)["Id"] == image_id
    _, layers = _saved(docker, by_digest, tmp_path)
    assert layers == [rootfs]


# ---- credentials ----------------------------------------------------------------


def test_login_push_and_pull(
    docker: DockerCli, auth_server: ServerThread, tmp_path: Path
) -> None:
    host = f"127.0.0.1:{auth_server.port}"
    reference = f"{host}/library/private:v1"
    rootfs = _import(docker, tmp_path, reference)

    anonymous = docker.run("push", reference, check=False)
    wrong_password = docker.login(host, (WRITER[0], "wrong"), check=False)
    docker.login(host, READER)
    reader_push = docker.run("push", reference, check=False)

    assert anonymous.returncode != 0
    assert "no basic auth credentials" in anonymous.stderr
    assert wrong_password.returncode != 0
    assert "401 Unauthorized" in wrong_password.stderr
    assert reader_push.returncode != 0
    assert "denied" in reader_push.stderr
    with httpx.Client(base_url=auth_server.url, auth=READER, timeout=60) as client:
        missing = client.get("/v2/library/private/manifests/v1")
        assert missing.status_code == 404

        docker.login(host, WRITER)
        digest, _ = _pushed_digest(docker.run("push", reference))

        served = _served_manifest(client, "library/private", "v1")
        assert served.digest == digest
        events = client.get(
            "/_cairn/events", params={"repository": "library/private"}
        ).json()["events"]
    assert {event["actor"]["user"] for event in events} == {WRITER[0]}
    # The credentials are in this test's configuration directory.
    stored = json.loads((Path(docker.env["DOCKER_CONFIG"]) / "config.json").read_text())
    assert list(stored["auths"]) == [host]

    docker.run("image", "rm", reference)
    docker.run("logout", host)
    denied = docker.run("pull", reference, check=False)
    docker.login(host, READER)
    docker.run("pull", reference)

    assert denied.returncode != 0
    assert "no basic auth credentials" in denied.stderr
    _, layers = _saved(docker, reference, tmp_path)
    assert layers == [rootfs]
