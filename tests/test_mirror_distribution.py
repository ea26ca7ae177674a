"""`cairn mirror` into Distribution (Debian's docker-registry 2.8.2), where
the target differs from cairn: it cannot delete a tag alone, and it stores
sha512 blobs under their sha256 digest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from engine.domain.digest import Digest
from engine.domain.manifests import OCI_MANIFEST
from tests.images import OCI_CONFIG, OCI_LAYER, make_image
from tests.server import ServeProcess, push_image
from tests.test_mirror import (
    docker_registry,
    log_events,
    manifest_status,
    mount_blob,
    needs_docker_registry,
    put_manifest,
    run_mirror_status,
)


def registry_tags(url: str, repository: str) -> list[str]:
    response = httpx.get(f"{url}/v2/{repository}/tags/list")
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return sorted(response.json().get("tags") or [])


def mirror_once(
    source_url: str, registry_url: str, checkpoint: Path
) -> tuple[int, list[dict[str, Any]]]:
    result = run_mirror_status(
        source_url,
        registry_url,
        "--propagate-deletes",
        "--checkpoint",
        str(checkpoint),
    )
    assert "Traceback" not in result.stderr
    return result.returncode, log_events(result.stderr)


def lines_of(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


def saved_not_copied(checkpoint: Path) -> list[tuple[str, str | None]]:
    document = json.loads(checkpoint.read_text())
    return [(entry["type"], entry["tag"]) for entry in document["not_copied"]]


def delete(url: str, repository: str, reference: str) -> None:
    response = httpx.delete(f"{url}/v2/{repository}/manifests/{reference}")
    assert response.status_code == 202, response.text


@needs_docker_registry
def test_mirror_tag_delete_not_copied(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    image = make_image()
    doomed = make_image()
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", image, "keep")
        put_manifest(client, "library/app", "drop", image)
        push_image(client, "library/app", doomed, "doomed")
    checkpoint = tmp_path / "checkpoint.json"

    with docker_registry(tmp_path / "registry") as registry_url:
        status, _ = mirror_once(source.url, registry_url, checkpoint)
        assert status == 0
        assert registry_tags(registry_url, "library/app") == ["doomed", "drop", "keep"]

        # A tag deleted alone, and a tag deleted with its manifest, which
        # Distribution removes together with the manifest.
        delete(source.url, "library/app", "drop")
        delete(source.url, "library/app", str(doomed.digest))

        status, lines = mirror_once(source.url, registry_url, checkpoint)

        assert status == 3
        unsupported = lines_of(lines, "tag_delete_unsupported")
        assert len(unsupported) == 1
        assert unsupported[0]["level"] == "warning"
        assert unsupported[0]["tag"] == "drop"
        assert unsupported[0]["digest"] == str(image.digest)
        superseded = lines_of(lines, "tag_delete_superseded")
        assert [line["tag"] for line in superseded] == ["doomed"]
        stopped = lines_of(lines, "mirror_stopped")
        assert stopped[0]["not_copied"] == 1
        assert stopped[0]["status"] == 3
        assert registry_tags(registry_url, "library/app") == ["drop", "keep"]
        assert manifest_status(registry_url, "library/app", str(doomed.digest)) == 404
        assert saved_not_copied(checkpoint) == [("tag.deleted", "drop")]

        # Nothing changed: every run retries the event and reports it again.
        status, lines = mirror_once(source.url, registry_url, checkpoint)

        assert status == 3
        assert lines_of(lines, "not_copied_retrying")[0]["count"] == 1
        assert len(lines_of(lines, "tag_delete_unsupported")) == 1
        assert saved_not_copied(checkpoint) == [("tag.deleted", "drop")]

        # The source deletes the manifest, and the target drops both tags.
        delete(source.url, "library/app", str(image.digest))

        status, lines = mirror_once(source.url, registry_url, checkpoint)

        assert status == 0
        resolved = lines_of(lines, "not_copied_resolved")
        assert len(resolved) == 1
        assert resolved[0]["tag"] == "drop"
        assert resolved[0]["outcome"] == "superseded"
        assert not lines_of(lines, "tag_delete_unsupported")
        assert registry_tags(registry_url, "library/app") == []
        assert manifest_status(registry_url, "library/app", str(image.digest)) == 404
        assert saved_not_copied(checkpoint) == []


@needs_docker_registry
def test_mirror_replay_skips_deleted_tag(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    """A replay does not create a tag that the source deleted before the
    mirror ran, which Distribution could not delete again."""
    image = make_image()
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", image, "keep")
        put_manifest(client, "library/app", "old", image)
    delete(source.url, "library/app", "old")
    checkpoint = tmp_path / "checkpoint.json"

    with docker_registry(tmp_path / "registry") as registry_url:
        status, lines = mirror_once(source.url, registry_url, checkpoint)

        assert status == 0
        assert registry_tags(registry_url, "library/app") == ["keep"]
        [skipped] = lines_of(lines, "tag_skipped")
        assert skipped["tag"] == "old"
        assert skipped["source_digest"] is None
        assert not lines_of(lines, "tag_delete_unsupported")
        assert saved_not_copied(checkpoint) == []


def push_sha512_blob(client: httpx.Client, repository: str, data: bytes) -> str:
    digest = str(Digest.of(data, "sha512"))
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = httpx.URL(started.headers["Location"])
    finished = client.put(location.copy_merge_params({"digest": digest}), content=data)
    assert finished.status_code == 201, finished.text
    return digest


def sha512_image(client: httpx.Client, repository: str) -> tuple[bytes, list[bytes]]:
    """Push a config and a layer under sha512 digests, and a manifest that
    references them; return the manifest and the blobs."""
    layer = os.urandom(4096)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": push_sha512_blob(client, repository, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": OCI_LAYER,
                    "digest": push_sha512_blob(client, repository, layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return manifest, [config, layer]


@needs_docker_registry
def test_mirror_sha512_blobs_first_run(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    with httpx.Client(base_url=source.url) as client:
        manifest, blobs = sha512_image(client, "library/app")
        put_manifest(client, "library/app", "v1", manifest)
        # Mounted blobs: Distribution answers 201 to a mount of a sha512
        # blob but does not link it into the repository.
        for blob in blobs:
            mount_blob(client, "team/app", Digest.of(blob, "sha512"), "library/app")
        put_manifest(client, "team/app", "v1", manifest)

    with docker_registry(tmp_path / "registry") as registry_url:
        result = run_mirror_status(source.url, registry_url)

        assert result.returncode == 0, result.stderr[-4000:]
        assert "Traceback" not in result.stderr
        ineffective = lines_of(log_events(result.stderr), "blob_mount_without_effect")
        assert len(ineffective) == len(blobs)
        for repository in ("library/app", "team/app"):
            for blob in blobs:
                digest = Digest.of(blob, "sha512")
                response = httpx.get(f"{registry_url}/v2/{repository}/blobs/{digest}")
                assert response.status_code == 200, (repository, digest)
                assert response.content == blob
            assert manifest_status(registry_url, repository, "v1") == 200

        result = run_mirror_status(source.url, registry_url)

        assert result.returncode == 0, result.stderr[-4000:]
        stopped = lines_of(log_events(result.stderr), "mirror_stopped")
        assert stopped[0]["bytes_copied"] == 0


def target_blob_file(storage: Path, digest: Digest) -> Path:
    """Return the data file of a blob in Distribution's filesystem storage."""
    return (
        storage
        / "docker/registry/v2/blobs"
        / digest.algorithm
        / digest.encoded[:2]
        / digest.encoded
        / "data"
    )


def blob_length(url: str, repository: str, digest: Digest) -> int:
    response = httpx.head(f"{url}/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200, response.text
    return int(response.headers["Content-Length"])


@needs_docker_registry
def test_mirror_stops_on_target_blob_size(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    image = make_image()
    # The same config and layer under a second manifest digest.
    relabelled = json.loads(image.manifest)
    relabelled["annotations"] = {"org.opencontainers.image.ref.name": "v2"}
    second = json.dumps(relabelled).encode()
    layer = Digest.of(image.layers[0])
    with httpx.Client(base_url=source.url) as client:
        push_image(client, "library/app", image, "v1")
    checkpoint = tmp_path / "checkpoint.json"

    with docker_registry(tmp_path / "registry") as registry_url:
        status, _ = mirror_once(source.url, registry_url, checkpoint)
        assert status == 0
        # A damaged copy on the target: the same digest, with more bytes.
        data = target_blob_file(tmp_path / "registry" / "storage", layer)
        original = data.read_bytes()
        data.write_bytes(original + b"damage")
        assert blob_length(registry_url, "library/app", layer) == len(original) + 6
        with httpx.Client(base_url=source.url) as client:
            put_manifest(client, "library/app", "v2", second)

        for _ in range(2):
            status, lines = mirror_once(source.url, registry_url, checkpoint)

            assert status == 1
            mismatch = lines_of(lines, "blob_size_mismatch")
            assert len(mismatch) == 1
            assert mismatch[0]["level"] == "error"
            assert mismatch[0]["repository"] == "library/app"
            assert mismatch[0]["digest"] == str(layer)
            assert mismatch[0]["expected_size"] == len(original)
            assert mismatch[0]["target_size"] == len(original) + 6
            assert mismatch[0]["source_size"] == len(original)
            failed = lines_of(lines, "mirror_failed")
            assert len(failed) == 1
            assert str(layer) in failed[0]["error"]
            assert f"{len(original) + 6} bytes" in failed[0]["error"]
            assert registry_tags(registry_url, "library/app") == ["v1"]

        # A replay from the start stops at the layer's blob.pushed event.
        status, lines = mirror_once(source.url, registry_url, tmp_path / "replay.json")

        assert status == 1
        mismatch = lines_of(lines, "blob_size_mismatch")
        assert len(mismatch) == 1
        assert mismatch[0]["digest"] == str(layer)
        assert mismatch[0]["expected_size"] == len(original)
        assert mismatch[0]["described_by"] == "the source's event"

        # Once the target's copy is repaired, the next run copies the event.
        data.write_bytes(original)

        status, lines = mirror_once(source.url, registry_url, checkpoint)

        assert status == 0
        assert not lines_of(lines, "blob_size_mismatch")
        assert registry_tags(registry_url, "library/app") == ["v1", "v2"]
