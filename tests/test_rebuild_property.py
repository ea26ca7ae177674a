"""Property: any sequence of registry operations, then a rebuild, gives back
exactly the live projections."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.db import Database
from engine.domain.digest import Digest
from engine.domain.errors import RegistryError
from engine.migrate import upgrade
from engine.projections.rebuild import rebuild_projections, snapshot_projections
from engine.registry import Registry
from engine.verify import verify
from tests.conftest import reset_postgres
from tests.images import make_artifact, make_image

REPOSITORIES = ["a", "b/c", "d.e"]
TAGS = ["latest", "v1", "v2"]
IMAGES = [make_image(seed=bytes([i])) for i in range(3)]
ARTIFACTS = [make_artifact(IMAGES[0], "application/vnd.example.sig", b"sig")]
ALL_IMAGES = IMAGES + ARTIFACTS

operation = st.one_of(
    st.tuples(
        st.just("push"),
        st.sampled_from(REPOSITORIES),
        st.integers(0, len(ALL_IMAGES) - 1),
        st.sampled_from([*TAGS, None]),
    ),
    st.tuples(
        st.just("tag"),
        st.sampled_from(REPOSITORIES),
        st.integers(0, 2),
        st.sampled_from(TAGS),
    ),
    st.tuples(
        st.just("untag"),
        st.sampled_from(REPOSITORIES),
        st.just(0),
        st.sampled_from(TAGS),
    ),
    st.tuples(
        st.just("delete_manifest"),
        st.sampled_from(REPOSITORIES),
        st.integers(0, 3),
        st.none(),
    ),
    st.tuples(
        st.just("delete_blob"),
        st.sampled_from(REPOSITORIES),
        st.integers(0, 2),
        st.none(),
    ),
    st.tuples(
        st.just("mount"),
        st.sampled_from(REPOSITORIES),
        st.integers(0, 2),
        st.sampled_from(REPOSITORIES),
    ),
)


def apply(registry: Registry, op: tuple[str, str, int, str | None]) -> None:
    kind, name, index, extra = op
    repo = registry.repository(name)
    image = ALL_IMAGES[index]
    try:
        if kind == "push":
            for blob in image.blobs:
                repo.blobs.push(Digest.of(blob), [blob])
            repo.manifests.put(image.manifest, tag=extra)
        elif kind == "tag":
            repo.tags.tag(str(extra), image.digest)
        elif kind == "untag":
            repo.tags.untag(str(extra))
        elif kind == "delete_manifest":
            repo.manifests.delete(image.digest)
        elif kind == "delete_blob":
            repo.blobs.delete(Digest.of(image.layers[0]))
        elif kind == "mount":
            repo.blobs.mount(Digest.of(image.layers[0]), extra)
    except RegistryError:
        pass  # rejected operations are part of the sequence too


def _run(
    data_dir: Path, database_url: str, ops: list[tuple[str, str, int, str | None]]
) -> None:
    registry = Registry.open(data_dir, database_url)
    try:
        for op in ops:
            apply(registry, op)
        with registry.database.read() as conn:
            live = snapshot_projections(conn)
        rebuild_projections(registry.database)
        with registry.database.read() as conn:
            rebuilt = snapshot_projections(conn)
        assert rebuilt == live
        assert verify(registry) == []
    finally:
        registry.database.dispose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(operation, max_size=25))
def test_rebuild_equals_live_after_any_operations(
    tmp_path_factory,
    database_url: str,
    ops: list[tuple[str, str, int, str | None]],  # type: ignore[no-untyped-def]
) -> None:
    data_dir = tmp_path_factory.mktemp("data")
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{data_dir / 'cairn.db'}"
        database = Database(database_url)
        upgrade(database)
        database.dispose()
    else:
        reset_postgres(database_url)
    _run(data_dir, database_url, ops)
