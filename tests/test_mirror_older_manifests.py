"""`cairn mirror` with manifests that an earlier cairn stored and the current
checks reject: copied unchanged, and a target's rejection stops the mirror."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from engine.domain.digest import Digest
from engine.registry import Registry
from tests.images import Image, make_image
from tests.older_manifests import (
    OlderManifest,
    descriptor_manifests,
    docker_without_media_type,
    image_manifests,
    index_manifests,
    store_as_earlier_cairn,
)
from tests.server import ServeProcess, push_image
from tests.test_mirror import (
    REPO_ROOT,
    clean_env,
    docker_registry,
    log_events,
    manifest_status,
    mirror_argv,
    needs_docker_registry,
    run_mirror,
)

# The rules of descriptor_manifests that the mirror detects.
MIRROR_DESCRIPTOR_RULES = (
    "index-child-media-type",
    "index-child-size",
    "subject-media-type",
    "layer-size",
)

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def store_on_source(
    tmp_path: Path, repository: str, older: list[OlderManifest]
) -> None:
    """Store ``older`` in the database of the ``source`` fixture's cairn, as
    an earlier cairn did, each tagged with its rule."""
    directory = tmp_path / "source"
    registry = Registry.open(directory / "data", f"sqlite:///{directory / 'cairn.db'}")
    try:
        for manifest in older:
            store_as_earlier_cairn(registry, repository, manifest, tag=manifest.rule)
    finally:
        registry.database.dispose()


def push_images(url: str, repository: str, *images: Image) -> None:
    with httpx.Client(base_url=url) as client:
        for number, image in enumerate(images):
            push_image(client, repository, image, f"image-{number}")


def failed_mirror(source_url: str, target_url: str, *extra: str) -> dict[str, Any]:
    """Run the mirror once, expect status 1, and return its mirror_failed record."""
    result = subprocess.run(
        mirror_argv(source_url, target_url, "--once", *extra),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    failures = [
        line for line in log_events(result.stderr) if line["event"] == "mirror_failed"
    ]
    assert len(failures) == 1, result.stderr[-4000:]
    return failures[0]


def fetch_manifest(url: str, repository: str, reference: str) -> httpx.Response:
    response = httpx.get(
        f"{url}/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT}
    )
    assert response.status_code == 200, response.text
    return response


def test_mirror_copies_older_manifests_to_layout(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    image = make_image(layer_count=2)
    docker = make_image(docker=True)
    doomed = make_image()
    push_images(source.url, "library/app", image, docker, doomed)
    descriptors = descriptor_manifests(image)
    older = [
        *image_manifests(image).values(),
        docker_without_media_type(docker),
        *index_manifests(image).values(),
        *[descriptors[rule] for rule in MIRROR_DESCRIPTOR_RULES],
    ]
    store_on_source(tmp_path, "library/app", older)
    response = httpx.delete(f"{source.url}/v2/library/app/manifests/{doomed.digest}")
    assert response.status_code == 202, response.text
    layout = tmp_path / "layout"

    result = run_mirror(source.url, f"oci:{layout}", "--propagate-deletes")

    app = layout / "library" / "app"
    index = json.loads((app / "index.json").read_text())
    tagged = {
        entry["annotations"]["org.opencontainers.image.ref.name"]: entry
        for entry in index["manifests"]
        if "annotations" in entry
    }
    for manifest in older:
        entry = tagged[manifest.rule]
        assert entry["digest"] == str(manifest.digest)
        assert entry["mediaType"] == manifest.media_type
        assert entry["size"] == len(manifest.raw)
        blob = app / "blobs" / "sha256" / manifest.digest.encoded
        assert blob.read_bytes() == manifest.raw
    for data in [*image.blobs, image.manifest, *docker.blobs]:
        assert (app / "blobs" / "sha256" / Digest.of(data).encoded).is_file()
    # The delete's garbage collection read every older manifest, and removed
    # only what no listed manifest reaches.
    for data in [*doomed.blobs, doomed.manifest]:
        assert not (app / "blobs" / "sha256" / Digest.of(data).encoded).exists()
    warned = {
        line["digest"]
        for line in log_events(result.stderr)
        if line["event"] == "manifest_fails_current_checks"
    }
    assert warned == {str(manifest.digest) for manifest in older}


@needs_docker_registry
def test_mirror_older_manifests_to_docker_registry(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    image = make_image(layer_count=2)
    push_images(source.url, "accepted/app", image)
    push_images(source.url, "rejected/app", image)
    by_rule = image_manifests(image)
    accepted = [by_rule[rule] for rule in ("repeated-key", "key-in-other-case")]
    accepted.append(by_rule["deep-nesting"])
    rejected = by_rule["nan"]
    store_on_source(tmp_path, "accepted/app", accepted)
    store_on_source(tmp_path, "rejected/app", [rejected])

    with docker_registry(tmp_path / "registry") as registry_url:
        run_mirror(source.url, registry_url, "--repositories", "accepted/*")

        for manifest in accepted:
            copied = fetch_manifest(registry_url, "accepted/app", manifest.rule)
            assert copied.content == manifest.raw
            assert copied.headers["Docker-Content-Digest"] == str(manifest.digest)
        for blob in image.blobs:
            response = httpx.head(
                f"{registry_url}/v2/accepted/app/blobs/{Digest.of(blob)}"
            )
            assert response.status_code == 200

        failure = failed_mirror(source.url, registry_url)

        error = failure["error"]
        assert f"PUT manifest {rejected.digest} in rejected/app: HTTP 400" in error
        assert "MANIFEST_INVALID" in error
        assert "current checks reject it too: " in error
        assert "manifest is not valid JSON" in error
        status = manifest_status(registry_url, "rejected/app", str(rejected.digest))
        assert status == 404


def test_mirror_stops_where_cairn_rejects(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    image = make_image()
    push_images(source.url, "library/app", image)
    older = image_manifests(image)["repeated-key"]
    store_on_source(tmp_path, "library/app", [older])

    failure = failed_mirror(source.url, target.url)

    error = failure["error"]
    assert f"PUT manifest {older.digest} in library/app: HTTP 400" in error
    assert "repeats the key 'digest'" in error
    assert "current checks reject it too: " in error
    assert "Delete it on the source" in error
    assert manifest_status(target.url, "library/app", "image-0") == 200
    assert manifest_status(target.url, "library/app", str(older.digest)) == 404

    # After a delete on the source, the mirror skips the manifest and its tag.
    response = httpx.delete(f"{source.url}/v2/library/app/manifests/{older.digest}")
    assert response.status_code == 202, response.text
    run_mirror(source.url, target.url)

    assert manifest_status(target.url, "library/app", "image-0") == 200
    assert manifest_status(target.url, "library/app", older.rule) == 404


def test_mirror_stops_on_child_media_type(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    image = make_image()
    push_images(source.url, "library/app", image)
    older = descriptor_manifests(image)["index-child-media-type"]
    store_on_source(tmp_path, "library/app", [older])

    failure = failed_mirror(source.url, target.url)

    error = failure["error"]
    assert f"PUT manifest {older.digest} in library/app: HTTP 400" in error
    assert "MANIFEST_INVALID" in error
    assert "current checks reject it too: " in error
    assert (
        f"its manifest descriptor of {image.digest} gives mediaType "
        "application/vnd.oci.image.index.v1+json, but the source serves that "
        "manifest as application/vnd.oci.image.manifest.v1+json"
    ) in error
    assert "Delete it on the source" in error
    assert manifest_status(target.url, "library/app", "image-0") == 200
    assert manifest_status(target.url, "library/app", str(older.digest)) == 404
