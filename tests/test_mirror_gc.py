"""Garbage collection of an OCI layout mirror target's blobs/ after deletes."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from consumers.mirror.layout import REF_NAME, LayoutTarget
from consumers.mirror.registry import BlobStream
from engine.domain.digest import Digest
from tests.images import (
    OCI_CONFIG,
    OCI_LAYER,
    Image,
    descriptor,
    encode,
    make_artifact,
    make_image,
    make_index,
)
from tests.server import ServeProcess, push_image
from tests.test_mirror import run_mirror

T = TypeVar("T")

REPOSITORY = "library/app"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def image_with_layers(layers: list[bytes]) -> Image:
    """Build an OCI image of the given layers, so that images can share one."""
    config = encode(
        {"architecture": "amd64", "os": "linux", "seed": os.urandom(8).hex()}
    )
    manifest = encode(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        }
    )
    return Image(config, layers, manifest)


def blob_file(layout: Path, data: bytes) -> Path:
    digest = Digest.of(data)
    return layout / REPOSITORY / "blobs" / digest.algorithm / digest.encoded


def listed_digests(layout: Path) -> set[str]:
    index = json.loads((layout / REPOSITORY / "index.json").read_text())
    return {entry["digest"] for entry in index["manifests"]}


async def put_blob(target: LayoutTarget, data: bytes) -> None:
    @asynccontextmanager
    async def open_blob() -> AsyncIterator[BlobStream]:
        async def chunks() -> AsyncIterator[bytes]:
            yield data

        yield BlobStream(len(data), chunks())

    await target.put_blob(REPOSITORY, str(Digest.of(data)), open_blob, None)


async def put_image(target: LayoutTarget, image: Image, tag: str | None) -> None:
    """Copy an image in the order the mirror does: blobs, manifest, tag."""
    for blob in image.blobs:
        await put_blob(target, blob)
    await target.put_manifest(
        REPOSITORY, str(image.digest), image.media_type, image.manifest
    )
    if tag is not None:
        await target.set_tag(REPOSITORY, tag, str(image.digest))


async def delete_image(target: LayoutTarget, image: Image | bytes, tag: str) -> None:
    """Delete as cairn's events do: the tag first, then the manifest."""
    raw = image.manifest if isinstance(image, Image) else image
    await target.delete_tag(REPOSITORY, tag)
    await target.delete_manifest(REPOSITORY, str(Digest.of(raw)))


def test_delete_removes_only_unreferenced_blobs(tmp_path: Path) -> None:
    shared = os.urandom(512)
    doomed = image_with_layers([shared, os.urandom(512)])
    surviving = image_with_layers([shared, os.urandom(512)])
    target = LayoutTarget(tmp_path)

    async def scenario() -> None:
        await put_image(target, doomed, "old")
        await put_image(target, surviving, "new")
        await delete_image(target, doomed, "old")

    run(scenario())

    assert listed_digests(tmp_path) == {str(surviving.digest)}
    assert not blob_file(tmp_path, doomed.manifest).exists()
    assert not blob_file(tmp_path, doomed.config).exists()
    assert not blob_file(tmp_path, doomed.layers[1]).exists()
    assert blob_file(tmp_path, shared).read_bytes() == shared
    for data in (surviving.manifest, *surviving.blobs):
        assert blob_file(tmp_path, data).read_bytes() == data


def test_index_keeps_its_children(tmp_path: Path) -> None:
    """A child manifest that only an index still lists keeps its blobs."""
    first, second = make_image(), make_image()
    index = make_index([first, second])
    target = LayoutTarget(tmp_path)

    async def scenario() -> None:
        await put_image(target, first, None)
        await put_image(target, second, None)
        await target.put_manifest(
            REPOSITORY, str(Digest.of(index)), json.loads(index)["mediaType"], index
        )
        await target.set_tag(REPOSITORY, "multi", str(Digest.of(index)))
        await target.delete_manifest(REPOSITORY, str(first.digest))

    run(scenario())

    assert str(first.digest) not in listed_digests(tmp_path)
    for data in (index, first.manifest, *first.blobs, second.manifest):
        assert blob_file(tmp_path, data).read_bytes() == data

    async def delete_index() -> None:
        await delete_image(target, index, "multi")

    run(delete_index())

    for data in (index, first.manifest, *first.blobs):
        assert not blob_file(tmp_path, data).exists()
    for data in (second.manifest, *second.blobs):
        assert blob_file(tmp_path, data).read_bytes() == data


def test_referrer_keeps_its_subject(tmp_path: Path) -> None:
    subject = make_image()
    signature = make_artifact(subject, "application/vnd.example.signature", b"sig")
    target = LayoutTarget(tmp_path)

    async def scenario() -> None:
        await put_image(target, subject, "v1")
        await put_image(target, signature, None)
        await delete_image(target, subject, "v1")

    run(scenario())

    assert listed_digests(tmp_path) == {str(signature.digest)}
    for data in (subject.manifest, *subject.blobs, signature.manifest):
        assert blob_file(tmp_path, data).read_bytes() == data


def test_collects_leftovers_of_earlier_runs(tmp_path: Path) -> None:
    """A new process collects what an earlier one left, temporary files too."""
    doomed, surviving = make_image(), make_image()
    stray = os.urandom(256)

    async def first_run() -> None:
        target = LayoutTarget(tmp_path)
        await put_image(target, doomed, "old")
        await put_image(target, surviving, "new")
        await put_blob(target, stray)
        # As the mirror does before it saves its checkpoint.
        await target.flush()

    run(first_run())
    stray_file = blob_file(tmp_path, stray)
    partial = stray_file.with_name(f".partial-{stray_file.name}-{uuid.uuid4().hex}")
    partial.write_bytes(b"half a blob")
    foreign = stray_file.with_name("README")
    foreign.write_text("not a blob")
    # Named like a partial file, but not as the mirror names them.
    foreign_partial = stray_file.with_name(".partial-abc-123")
    foreign_partial.write_text("not the mirror's")

    async def second_run() -> None:
        await delete_image(LayoutTarget(tmp_path), doomed, "old")

    run(second_run())

    assert not blob_file(tmp_path, doomed.manifest).exists()
    assert not blob_file(tmp_path, stray).exists()
    assert not partial.exists()
    assert foreign.read_text() == "not a blob"
    assert foreign_partial.read_text() == "not the mirror's"
    for data in (surviving.manifest, *surviving.blobs):
        assert blob_file(tmp_path, data).read_bytes() == data


def test_index_written_at_flush(tmp_path: Path) -> None:
    """Tags change index.json once per flush, not once each."""
    image = make_image()
    target = LayoutTarget(tmp_path)
    index_path = tmp_path / REPOSITORY / "index.json"

    def listed_tags() -> list[str]:
        manifests = json.loads(index_path.read_text())["manifests"]
        return sorted(entry["annotations"][REF_NAME] for entry in manifests)

    async def tag_then_flush() -> tuple[list[str], list[str]]:
        await put_image(target, image, "v0")
        for number in range(1, 4):
            await target.set_tag(REPOSITORY, f"v{number}", str(image.digest))
        before = listed_tags()
        await target.flush()
        return before, listed_tags()

    before, after = run(tag_then_flush())

    assert before == []
    assert after == ["v0", "v1", "v2", "v3"]


def test_repeated_delete_collects_again(tmp_path: Path) -> None:
    """Replaying a delete after a crash between index.json and the removal."""
    doomed, surviving = make_image(), make_image()

    async def copy() -> None:
        target = LayoutTarget(tmp_path)
        await put_image(target, doomed, None)
        await put_image(target, surviving, None)
        await target.flush()

    run(copy())
    # What the crash left: index.json without the manifest, its files still there.
    index_path = tmp_path / REPOSITORY / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"] = [
        entry for entry in index["manifests"] if entry["digest"] != str(doomed.digest)
    ]
    index_path.write_text(json.dumps(index))

    async def replay() -> None:
        await LayoutTarget(tmp_path).delete_manifest(REPOSITORY, str(doomed.digest))

    run(replay())

    for data in (doomed.manifest, *doomed.blobs):
        assert not blob_file(tmp_path, data).exists()
    for data in (surviving.manifest, *surviving.blobs):
        assert blob_file(tmp_path, data).exists()


def test_unreadable_manifest_stops_collection(tmp_path: Path) -> None:
    doomed, broken = make_image(), make_image()
    target = LayoutTarget(tmp_path)

    async def copy() -> None:
        await put_image(target, doomed, "old")
        await put_image(target, broken, "broken")

    run(copy())
    blob_file(tmp_path, broken.manifest).write_bytes(b"not a manifest")

    async def delete() -> None:
        await delete_image(target, doomed, "old")

    run(delete())

    assert str(doomed.digest) not in listed_digests(tmp_path)
    for data in (doomed.manifest, *doomed.blobs, *broken.blobs):
        assert blob_file(tmp_path, data).exists()


def test_blob_delete_keeps_referenced_blob(tmp_path: Path) -> None:
    image = make_image()
    loose = os.urandom(256)
    target = LayoutTarget(tmp_path)

    async def scenario() -> None:
        await put_image(target, image, "v1")
        await put_blob(target, loose)
        await target.delete_blob(REPOSITORY, str(Digest.of(image.layers[0])))
        await target.delete_blob(REPOSITORY, str(Digest.of(loose)))

    run(scenario())

    assert blob_file(tmp_path, image.layers[0]).exists()
    assert not blob_file(tmp_path, loose).exists()


def test_blob_delete_sees_new_manifests(tmp_path: Path) -> None:
    """The cached closure is recomputed once index.json changes."""
    first, second = make_image(), make_image()
    target = LayoutTarget(tmp_path)

    async def scenario() -> None:
        await put_image(target, first, "v1")
        await target.delete_blob(REPOSITORY, str(Digest.of(os.urandom(8))))
        await put_image(target, second, "v2")
        await target.delete_blob(REPOSITORY, str(Digest.of(second.layers[0])))

    run(scenario())

    assert blob_file(tmp_path, second.layers[0]).exists()


def test_mirror_collects_layout_after_delete(
    tmp_path: Path,
    source: ServeProcess,
) -> None:
    shared = os.urandom(2048)
    doomed = image_with_layers([shared, os.urandom(2048)])
    surviving = image_with_layers([shared, os.urandom(2048)])
    layout = tmp_path / "layout"
    with httpx.Client(base_url=source.url) as client:
        push_image(client, REPOSITORY, doomed, "old")
        push_image(client, REPOSITORY, surviving, "new")

    checkpoint = tmp_path / "checkpoint.json"
    run_mirror(
        source.url,
        f"oci:{layout}",
        "--propagate-deletes",
        "--checkpoint",
        str(checkpoint),
    )
    assert blob_file(layout, doomed.layers[1]).exists()
    with httpx.Client(base_url=source.url) as client:
        response = client.delete(f"/v2/{REPOSITORY}/manifests/{doomed.digest}")
        assert response.status_code == 202, response.text

    # The second run starts at the checkpoint, so it applies only the deletes.
    run_mirror(
        source.url,
        f"oci:{layout}",
        "--propagate-deletes",
        "--checkpoint",
        str(checkpoint),
    )

    assert listed_digests(layout) == {str(surviving.digest)}
    for data in (doomed.manifest, doomed.config, doomed.layers[1]):
        assert not blob_file(layout, data).exists()
    for data in (surviving.manifest, *surviving.blobs):
        assert blob_file(layout, data).read_bytes() == data
    remaining = {
        path.name for path in (layout / REPOSITORY / "blobs" / "sha256").iterdir()
    }
    expected = {
        Digest.of(data).encoded for data in (surviving.manifest, *surviving.blobs)
    }
    assert remaining == expected
