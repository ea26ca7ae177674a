"""Real registry clients against cairn: skopeo, oras (Python SDK) and podman.

Each client runs with its configuration in a temporary directory, so the
tests read and write nothing of the machine's container set-up, and every
registry address is the in-process server on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.api.app import create_app
from engine.domain.manifests import OCI_INDEX, OCI_MANIFEST
from engine.registry import Registry
from tests.images import make_artifact, make_image
from tests.server import ServerThread, push_image, running

pytestmark = pytest.mark.clients

SKOPEO = shutil.which("skopeo")
PODMAN = shutil.which("podman")
CLIENT_TIMEOUT_S = 300


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def host(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (Path(env["XDG_RUNTIME_DIR"])).mkdir(exist_ok=True)
    result = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"{' '.join(argv)} failed ({result.returncode}):\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result


# ---- an OCI image layout on disk -----------------------------------------------


def make_layer(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """Return (gzipped tar, uncompressed tar) holding ``files``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(content))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, mtime=0), uncompressed


def _write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_oci_layout(layout: Path, tag: str) -> str:
    """Write a two-layer linux/amd64 image as an OCI layout; return its digest."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layers = [
        make_layer({"etc/cairn-test": b"hello from cairn\n"}),
        make_layer({"data/random.bin": os.urandom(200_000)}),
    ]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [
                    "sha256:" + hashlib.sha256(raw).hexdigest() for _, raw in layers
                ],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                **_write_blob(layout, config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **_write_blob(layout, compressed),
                }
                for compressed, _ in layers
            ],
        },
        indent=2,
    ).encode()
    descriptor = {"mediaType": OCI_MANIFEST, **_write_blob(layout, manifest)}
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(
        json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
        )
    )
    return descriptor["digest"]


def _blob_files(layout: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes() for path in (layout / "blobs" / "sha256").iterdir()
    }


# ---- skopeo --------------------------------------------------------------------


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_skopeo_round_trip(
    host: str, server: ServerThread, client_env: dict[str, str], tmp_path: Path
) -> None:
    assert SKOPEO is not None
    source = tmp_path / "source"
    digest = build_oci_layout(source, "v1")
    skopeo = [SKOPEO, "--policy", client_env["POLICY"]]

    _run(
        [
            *skopeo,
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{source}:v1",
            f"docker://{host}/library/skopeo-test:v1",
        ],
        client_env,
    )
    copied_back = tmp_path / "copied-back"
    _run(
        [
            *skopeo,
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{host}/library/skopeo-test:v1",
            f"oci:{copied_back}:v1",
        ],
        client_env,
    )

    assert _blob_files(copied_back) == _blob_files(source)
    index = json.loads((copied_back / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest

    tags = _run(
        [
            *skopeo,
            "list-tags",
            "--tls-verify=false",
            f"docker://{host}/library/skopeo-test",
        ],
        client_env,
    )
    assert json.loads(tags.stdout)["Tags"] == ["v1"]

    inspected = _run(
        [
            *skopeo,
            "inspect",
            "--tls-verify=false",
            f"docker://{host}/library/skopeo-test:v1",
        ],
        client_env,
    )
    details = json.loads(inspected.stdout)
    assert details["Digest"] == digest
    assert details["Architecture"] == "amd64"
    assert len(details["Layers"]) == 2

    _run(
        [
            *skopeo,
            "delete",
            "--tls-verify=false",
            f"docker://{host}/library/skopeo-test:v1",
        ],
        client_env,
    )
    deleted = httpx.get(f"{server.url}/v2/library/skopeo-test/manifests/{digest}")
    assert deleted.status_code == 404
    assert (
        httpx.get(f"{server.url}/v2/library/skopeo-test/tags/list").json()["tags"] == []
    )


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_skopeo_copy_between_repositories_mounts(
    host: str, server: ServerThread, client_env: dict[str, str], tmp_path: Path
) -> None:
    assert SKOPEO is not None
    source = tmp_path / "source"
    build_oci_layout(source, "v1")
    skopeo = [SKOPEO, "--policy", client_env["POLICY"]]
    _run(
        [
            *skopeo,
            "copy",
            "--dest-tls-verify=false",
            f"oci:{source}:v1",
            f"docker://{host}/team/first:v1",
        ],
        client_env,
    )

    _run(
        [
            *skopeo,
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{host}/team/first:v1",
            f"docker://{host}/team/second:v1",
        ],
        client_env,
    )

    events = httpx.get(
        f"{server.url}/_cairn/events", params={"repository": "team/second"}
    ).json()["events"]
    kinds = [event["type"] for event in events]
    assert kinds.count("blob.mounted") + kinds.count("blob.pushed") == 3
    assert "manifest.pushed" in kinds


# ---- oras ----------------------------------------------------------------------


def test_oras_push_with_subject_and_referrers(
    host: str, server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oras.client
    import oras.oci

    subject_layout = tmp_path / "subject"
    build_oci_layout(subject_layout, "v1")
    index = json.loads((subject_layout / "index.json").read_text())
    subject_descriptor = index["manifests"][0]
    with httpx.Client(base_url=server.url) as http:
        for name, data in _blob_files(subject_layout).items():
            if f"sha256:{name}" == subject_descriptor["digest"]:
                continue
            http.post(
                "/v2/library/app/blobs/uploads/",
                params={"digest": f"sha256:{name}"},
                content=data,
            )
        manifest = (
            subject_layout / "blobs" / "sha256" / subject_descriptor["digest"][7:]
        ).read_bytes()
        pushed = http.put(
            "/v2/library/app/manifests/v1",
            content=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert pushed.status_code == 201

    # oras resolves file paths against the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sbom.json").write_text('{"packages": []}')
    (tmp_path / "config.json").write_text("{}")
    client = oras.client.OrasClient(hostname=host, insecure=True)
    subject = oras.oci.Subject(
        mediaType=OCI_MANIFEST,
        digest=subject_descriptor["digest"],
        size=subject_descriptor["size"],
    )
    response = client.push(
        target=f"{host}/library/app:sbom",
        files=["sbom.json:application/spdx+json"],
        manifest_config="config.json:application/vnd.example.sbom.v1",
        subject=subject,
        do_chunked=True,
        chunk_size=7,
    )
    assert response.status_code == 201
    assert response.headers["OCI-Subject"] == subject_descriptor["digest"]

    with httpx.Client(base_url=server.url) as http:
        referrers = http.get(
            f"/v2/library/app/referrers/{subject_descriptor['digest']}"
        ).json()
        filtered = http.get(
            f"/v2/library/app/referrers/{subject_descriptor['digest']}",
            params={"artifactType": "application/vnd.example.nothing"},
        ).json()
        sbom_manifest = http.get("/v2/library/app/manifests/sbom")

    assert [m["digest"] for m in referrers["manifests"]] == [
        sbom_manifest.headers["Docker-Content-Digest"]
    ]
    assert (
        referrers["manifests"][0]["artifactType"] == "application/vnd.example.sbom.v1"
    )
    assert filtered["manifests"] == []

    assert client.get_tags(f"{host}/library/app") == ["sbom", "v1"]
    pulled = tmp_path / "pulled"
    files = client.pull(target=f"{host}/library/app:sbom", outdir=str(pulled))
    assert [Path(f).read_text() for f in files] == ['{"packages": []}']


def test_oras_follows_referrers_pages(host: str, server: ServerThread) -> None:
    """oras-py has no discover command, so this walks the referrers API with
    the Link-following loop that its get_tags uses, as discover would."""
    import oras.client

    image = make_image()
    artifacts = [
        make_artifact(
            image,
            "application/vnd.example.sbom.v1",
            f"sbom {number}".encode(),
            # Two of these fill most of a 1 MiB page, so the third starts
            # the second page.
            annotations={"org.example.padding": "x" * 400_000},
        )
        for number in range(4)
    ] + [
        make_artifact(image, "application/vnd.example.sig.v1", f"sig {n}".encode())
        for n in range(3)
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        push_image(http, "library/app", image, "v1")
        for artifact in artifacts:
            push_image(http, "library/app", artifact)
    expected = [str(artifact.digest) for artifact in artifacts]

    client = oras.client.OrasClient(hostname=host, insecure=True)
    referrers_url = f"http://{host}/v2/library/app/referrers/{image.digest}"
    for url, page_count in [(referrers_url, 2), (f"{referrers_url}?n=2", 4)]:
        pages: list[list[str]] = []

        def collect(response: Any, pages: list[list[str]] = pages) -> bool:
            assert response.headers["Content-Type"] == OCI_INDEX
            pages.append([m["digest"] for m in response.json()["manifests"]])
            return True

        client._do_paginated_request(url, callable=collect)

        assert len(pages) == page_count, url
        assert [digest for page in pages for digest in page] == expected, url


# ---- podman --------------------------------------------------------------------


def _podman_usable(env: dict[str, str], storage: list[str]) -> str | None:
    """Return why podman cannot run here, or None when it can."""
    if PODMAN is None:
        return "podman is not installed"
    probe = subprocess.run(
        [PODMAN, *storage, "info", "--format", "{{.Store.GraphDriverName}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    if probe.returncode != 0:
        return f"podman info failed: {probe.stderr.strip()[-500:]}"
    return None


def _podman_storage(tmp_path: Path, runroot: Path) -> list[str]:
    return [
        "--root",
        str(tmp_path / "storage-root"),
        "--runroot",
        str(runroot),
        "--storage-driver",
        "vfs",
        "--events-backend",
        "none",
        "--cgroup-manager",
        "cgroupfs",
        "--tmpdir",
        str(tmp_path / "podman-tmp"),
    ]


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_podman_pull(
    host: str, client_env: dict[str, str], tmp_path: Path, runroot: Path
) -> None:
    assert SKOPEO is not None
    (tmp_path / "podman-tmp").mkdir()
    Path(client_env["XDG_RUNTIME_DIR"]).mkdir(exist_ok=True)
    storage = _podman_storage(tmp_path, runroot)
    reason = _podman_usable(client_env, storage)
    if reason is not None:
        pytest.skip(reason)
    assert PODMAN is not None
    source = tmp_path / "source"
    digest = build_oci_layout(source, "v1")
    _run(
        [
            SKOPEO,
            "--policy",
            client_env["POLICY"],
            "copy",
            "--dest-tls-verify=false",
            f"oci:{source}:v1",
            f"docker://{host}/library/podman-test:v1",
        ],
        client_env,
    )

    podman = [PODMAN, *storage]
    _run(
        [
            *podman,
            "pull",
            "--tls-verify=false",
            "--signature-policy",
            client_env["POLICY"],
            f"{host}/library/podman-test:v1",
        ],
        client_env,
    )

    listed = _run([*podman, "images", "--digests", "--format", "json"], client_env)
    images = json.loads(listed.stdout)
    assert [image["Digest"] for image in images] == [digest]
    assert f"{host}/library/podman-test:v1" in images[0]["Names"]
