"""Manifests that an earlier cairn stored and the current checks reject:
a rebuild replays them."""

from __future__ import annotations

import pytest

from engine.projections.rebuild import rebuild_projections, snapshot_projections
from engine.registry import Registry
from engine.verify import verify
from tests.images import make_image
from tests.older_manifests import (
    OlderManifest,
    docker_without_media_type,
    image_manifests,
    index_manifests,
    store_as_earlier_cairn,
)
from tests.test_registry import push_image


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
    ]
    if not registry.database.is_sqlite:
        # jsonb has no NaN, so an earlier cairn on PostgreSQL failed to
        # append this manifest's event and stored nothing.
        older = [m for m in older if m.rule != "index-nan-platform"]
    for manifest in older:
        store_as_earlier_cairn(registry, "team/app", manifest, tag=manifest.rule)
    return older


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
