"""Manifests that an earlier cairn stored and the current checks reject:
`cairn verify` warns about each, and a rebuild replays them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.domain.digest import Digest
from engine.domain.manifests import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from engine.migrate import upgrade
from engine.projections.rebuild import rebuild_projections, snapshot_projections
from engine.registry import Registry
from engine.verify import check_stored_manifests, verify
from tests.images import make_image
from tests.older_manifests import (
    OlderManifest,
    descriptor_manifests,
    docker_without_media_type,
    image_manifests,
    index_manifests,
    store_as_earlier_cairn,
)
from tests.test_registry import push_image

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# The part of each rule's rejection that names the reason.
REASONS = {
    "other-kind-field": "manifests is a field of an index",
    "repeated-key": "repeats the key 'digest'",
    "key-in-other-case": "'Layers' differs from the field 'layers' only in letter case",
    "nan": "manifest is not valid JSON",
    "deep-nesting": "nests deeper than 64 levels",
    "docker-without-media-type": "must name its mediaType in the body",
    "index-other-kind-field": "layers is a field of an image manifest",
    "index-nan-platform": "manifest is not valid JSON",
    "index-child-media-type": "its manifest descriptor of sha256:",
    "index-child-size": "its manifest descriptor of sha256:",
    "subject-media-type": "its subject descriptor of sha256:",
    "layer-size": "its layer descriptor of sha256:",
}


def store_older_manifests(registry: Registry) -> list[OlderManifest]:
    """Push an OCI and a Docker image, then store one older manifest of each
    rule beside them in ``team/app``. Return the older manifests."""
    image = make_image(layer_count=2)
    docker = make_image(docker=True)
    repo = registry.repository("team/app")
    push_image(repo, image, tag="plain")
    push_image(repo, docker, tag="docker")
    older = [
        *image_manifests(image).values(),
        docker_without_media_type(docker),
        *index_manifests(image).values(),
        *descriptor_manifests(image).values(),
    ]
    if not registry.database.is_sqlite:
        # jsonb has no NaN, so an earlier cairn on PostgreSQL failed to
        # append this manifest's event and stored nothing.
        older = [m for m in older if m.rule != "index-nan-platform"]
    for manifest in older:
        store_as_earlier_cairn(registry, "team/app", manifest, tag=manifest.rule)
    return older


def test_verify_warns_about_older_manifests(registry: Registry) -> None:
    older = store_older_manifests(registry)

    assert verify(registry) == []
    warnings = check_stored_manifests(registry)

    expected = sorted(older, key=lambda manifest: str(manifest.digest))
    assert len(warnings) == len(expected)
    for warning, manifest in zip(warnings, expected, strict=True):
        assert warning.startswith(
            f"manifest team/app@{manifest.digest} ({manifest.media_type}) is "
            "rejected by the checks on new pushes: "
        )
        assert REASONS[manifest.rule] in warning


def test_verify_names_descriptor_mismatches(registry: Registry) -> None:
    image = make_image(layer_count=2)
    repo = registry.repository("team/app")
    push_image(repo, image, tag="plain")
    older = descriptor_manifests(image)
    for manifest in older.values():
        store_as_earlier_cairn(registry, "team/app", manifest, tag=manifest.rule)
    layer = json.loads(image.manifest)["layers"][0]

    assert verify(registry) == []
    warnings = check_stored_manifests(registry)

    def warning(rule: str, reason: str) -> str:
        manifest = older[rule]
        return (
            f"manifest team/app@{manifest.digest} ({manifest.media_type}) is "
            f"rejected by the checks on new pushes: {reason}"
        )

    assert sorted(warnings) == sorted(
        [
            warning(
                "index-child-media-type",
                f"its manifest descriptor of {image.digest} gives mediaType "
                f"{OCI_INDEX}, but the repository stores that manifest as "
                f"{OCI_MANIFEST}",
            ),
            warning(
                "index-child-size",
                f"its manifest descriptor of {image.digest} gives size "
                f"{len(image.manifest) + 1}, but the repository stores "
                f"{len(image.manifest)} bytes under that digest",
            ),
            warning(
                "subject-media-type",
                f"its subject descriptor of {image.digest} gives mediaType "
                f"{DOCKER_MANIFEST}, but the repository stores that manifest as "
                f"{OCI_MANIFEST}",
            ),
            warning(
                "layer-size",
                f"its layer descriptor of {layer['digest']} gives size "
                f"{layer['size'] + 1}, but the repository stores {layer['size']} "
                "bytes under that digest",
            ),
        ]
    )


def test_verify_skips_subject_not_stored(registry: Registry) -> None:
    image = make_image()
    referrer = descriptor_manifests(image)["subject-media-type"]
    repo = registry.repository("team/app")
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    store_as_earlier_cairn(registry, "team/app", referrer, tag="referrer")

    assert check_stored_manifests(registry) == []

    # Once the subject is stored, its descriptor is compared with it.
    push_image(repo, image, tag="plain")

    warnings = check_stored_manifests(registry)

    assert len(warnings) == 1
    assert warnings[0].startswith(f"manifest team/app@{referrer.digest} ")
    assert f"gives mediaType {DOCKER_MANIFEST}" in warnings[0]


def test_rebuild_replays_older_manifests(registry: Registry) -> None:
    store_older_manifests(registry)
    with registry.database.read() as conn:
        live = snapshot_projections(conn)

    rebuild_projections(registry.database)

    with registry.database.read() as conn:
        assert snapshot_projections(conn) == live
    assert verify(registry) == []


def test_rebuild_keeps_nan_in_sqlite_json(registry: Registry) -> None:
    if not registry.database.is_sqlite:
        pytest.skip("PostgreSQL's jsonb cannot hold NaN")
    store_older_manifests(registry)
    query = 'SELECT digest, "references" FROM manifests ORDER BY digest'
    with registry.database.read() as conn:
        live = conn.exec_driver_sql(query).all()

    rebuild_projections(registry.database)

    with registry.database.read() as conn:
        assert conn.exec_driver_sql(query).all() == live
    assert any('"variant": NaN' in references for _, references in live)


def run_verify(data_dir: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "--log-format",
            "json",
            "verify",
            "--data-dir",
            str(data_dir),
            "--database",
            database_url,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=REPOSITORY_ROOT,
        timeout=120,
    )


def test_verify_command_exit_status(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    database_url = f"sqlite:///{tmp_path / 'cairn.db'}"
    registry = Registry.open(data_dir, database_url)
    upgrade(registry.database)
    older = store_older_manifests(registry)
    registry.database.dispose()

    clean = run_verify(data_dir, database_url)

    assert clean.returncode == 0, clean.stdout + clean.stderr
    lines = clean.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("warning: manifest ")]
    assert len(warnings) == len(older)
    assert not [line for line in lines if line.startswith("problem: ")]
    assert lines[-1] == (
        "log, blobs and projections verified: no problems found, "
        f"{len(older)} warning(s)"
    )

    # A damaged blob is a problem beside the warnings, and sets status 1.
    config = Digest.parse(older[0].references[0]["digest"])
    registry.blob_store.path(config).write_bytes(b"damaged")

    damaged = run_verify(data_dir, database_url)

    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    lines = damaged.stdout.splitlines()
    assert len([line for line in lines if line.startswith("warning: ")]) == len(older)
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 1
    assert f"blob {config}: content hashes to" in problems[0]
    assert lines[-1] == f"1 problem(s) found, {len(older)} warning(s)"
