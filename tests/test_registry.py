"""The storage contract: every test runs against SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from engine import log as event_log
from engine.blobs.store import accepts_direct_io
from engine.domain.digest import Digest
from engine.domain.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestMismatch,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    TagInvalid,
)
from engine.domain.events import EventType
from engine.projections.rebuild import rebuild_projections, snapshot_projections
from engine.registry import Registry, Repository
from engine.tables import (
    blob_links,
    manifest_contents,
    repositories,
    tags,
    uploads,
)
from engine.verify import (
    check_manifest_contents_present,
    check_stored_manifests,
    verify,
)
from tests.images import Image, make_artifact, make_image, make_index


def push_image(repo: Repository, image: Image, tag: str | None = "latest") -> None:
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    repo.manifests.put(image.manifest, image.media_type, tag=tag)


def event_types(registry: Registry) -> list[str]:
    with registry.database.read() as conn:
        return [str(e.type) for e in event_log.read_all(conn)]


def count(registry: Registry, table: sa.Table) -> int:
    with registry.database.read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def assert_nothing_stored(registry: Registry) -> None:
    assert event_types(registry) == []
    assert count(registry, blob_links) == 0
    assert count(registry, tags) == 0
    assert count(registry, repositories) == 0
    assert registry.catalog() == []


# ---- blobs ------------------------------------------------------------------


def test_blob_push_stat_and_read(registry: Registry) -> None:
    repo = registry.repository("library/alpine")
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = Digest.of(data)
    info = repo.blobs.push(digest, [data[:1000], data[1000:]])
    assert info.size == len(data)
    assert repo.blobs.stat(digest).size == len(data)
    assert b"".join(repo.blobs.open(digest)) == data
    assert b"".join(repo.blobs.open(digest, 10, 20)) == data[10:20]
    assert event_types(registry) == ["blob.pushed"]


def test_zero_byte_blob(registry: Registry) -> None:
    repo = registry.repository("empty")
    digest = Digest.of(b"")
    assert repo.blobs.push(digest, []).size == 0
    assert b"".join(repo.blobs.open(digest)) == b""


def test_sha512_blob(registry: Registry) -> None:
    repo = registry.repository("sha")
    data = os.urandom(5000)
    digest = Digest.of(data, "sha512")
    repo.blobs.push(digest, [data])
    assert repo.blobs.stat(digest).size == 5000
    assert registry.blob_store.path(digest).parts[-3] == "sha512"


def test_blob_digest_mismatch_stores_nothing(registry: Registry) -> None:
    repo = registry.repository("bad")
    wrong = Digest.of(b"something else")
    with pytest.raises(DigestMismatch) as caught:
        repo.blobs.push(wrong, [b"content"])
    assert caught.value.detail["expected"] == str(wrong)
    assert not registry.blob_store.exists(wrong)
    assert list(registry.blob_store.paths.staging_dir.iterdir()) == []
    assert_nothing_stored(registry)


def test_blob_stored_once_for_many_repositories(registry: Registry) -> None:
    data = os.urandom(100)
    digest = Digest.of(data)
    for name in ("a", "b", "c"):
        registry.repository(name).blobs.push(digest, [data])
    files = [path for _, path in registry.blob_store.iter_blobs()]
    assert files == [registry.blob_store.path(digest)]
    assert count(registry, blob_links) == 3


def test_blob_push_twice_appends_once(registry: Registry) -> None:
    repo = registry.repository("twice")
    data = b"abc"
    repo.blobs.push(Digest.of(data), [data])
    repo.blobs.push(Digest.of(data), [data])
    assert event_types(registry) == ["blob.pushed"]


def test_blob_unknown_and_delete(registry: Registry) -> None:
    repo = registry.repository("del")
    data = b"to delete"
    digest = Digest.of(data)
    with pytest.raises(BlobUnknown):
        repo.blobs.stat(digest)
    repo.blobs.push(digest, [data])
    repo.blobs.delete(digest)
    with pytest.raises(BlobUnknown):
        repo.blobs.stat(digest)
    with pytest.raises(BlobUnknown):
        repo.blobs.delete(digest)
    assert event_types(registry) == ["blob.pushed", "blob.deleted"]


def _descriptors_of(path: Path) -> int:
    """Count this process's open file descriptors on ``path``."""
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry) == str(path):
                count += 1
        except FileNotFoundError:
            continue
    return count


def test_chunk_write_releases_direct_io(registry: Registry) -> None:
    if not registry.blob_store.direct_io:
        pytest.skip("the file system does not take O_DIRECT")
    repo = registry.repository("chunks")
    data = os.urandom(3 * 1024 * 1024)
    upload = repo.blobs.create_upload()

    repo.blobs.write_upload(upload.id, [data[: 2 * 1024 * 1024]], start=0)

    # Between chunks only the buffered descriptor stays open, for the
    # running hash; the O_DIRECT one and its 1 MiB buffer are released.
    staging = registry.blob_store.paths.staging(upload.id)
    assert _descriptors_of(staging) == 1
    repo.blobs.write_upload(upload.id, [data[2 * 1024 * 1024 :]], start=2 * 1024 * 1024)
    info = repo.blobs.commit_upload(upload.id, Digest.of(data))
    assert info.size == len(data)
    assert b"".join(repo.blobs.open(Digest.of(data))) == data


def test_chunked_upload_resumes_after_restart(registry: Registry, data_dir) -> None:  # type: ignore[no-untyped-def]
    repo = registry.repository("chunks")
    data = os.urandom(300_000)
    upload = repo.blobs.create_upload()
    status = repo.blobs.write_upload(upload.id, [data[:100_000]], start=0)
    assert status.offset == 100_000

    restarted = Registry.open(data_dir, registry.database.url)
    again = restarted.repository("chunks")
    assert again.blobs.upload_status(upload.id).offset == 100_000
    with pytest.raises(RangeInvalid) as caught:
        again.blobs.write_upload(upload.id, [data[50_000:]], start=50_000)
    assert caught.value.offset == 100_000
    again.blobs.write_upload(upload.id, [data[100_000:200_000]], start=100_000)
    info = again.blobs.commit_upload(upload.id, Digest.of(data), [data[200_000:]])
    assert info.size == len(data)
    assert b"".join(again.blobs.open(Digest.of(data))) == data
    with pytest.raises(BlobUploadUnknown):
        again.blobs.upload_status(upload.id)
    restarted.database.dispose()


def test_upload_unknown_ids(registry: Registry) -> None:
    repo = registry.repository("uploads")
    for upload_id in (
        "not-a-uuid",
        "../../etc/passwd",
        "00000000-0000-0000-0000-000000000000",
    ):
        with pytest.raises(BlobUploadUnknown) as caught:
            repo.blobs.upload_status(upload_id)
        assert caught.value.detail["upload"] == upload_id
    other = registry.repository("other").blobs.create_upload()
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(other.id)


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct-io", "buffered"])
def test_upload_removed_during_write_unknown(
    registry: Registry, direct_io: bool
) -> None:
    staging = registry.blob_store.paths.staging_dir
    if direct_io and not accepts_direct_io(staging):
        pytest.skip("the file system does not take O_DIRECT")
    registry.blob_store.direct_io = direct_io
    repo = registry.repository("uploads")
    upload = repo.blobs.create_upload()

    def chunks() -> Iterator[bytes]:
        # What `cairn gc` in another process does to an upload whose client
        # stalled before the first bytes reached the staging file.
        with registry.database.transaction() as conn:
            conn.execute(sa.delete(uploads).where(uploads.c.id == upload.id))
        (staging / upload.id).unlink()
        yield os.urandom(2 * 1024 * 1024)

    with pytest.raises(BlobUploadUnknown) as caught:
        repo.blobs.write_upload(upload.id, chunks())

    assert "deleted while this request wrote to it" in caught.value.message
    assert caught.value.detail == {"upload": upload.id}
    assert list(staging.iterdir()) == []
    assert_nothing_stored(registry)


def test_upload_cancel(registry: Registry) -> None:
    repo = registry.repository("cancel")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"partial"])
    repo.blobs.cancel_upload(upload.id)
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(upload.id)
    assert list(registry.blob_store.paths.staging_dir.iterdir()) == []
    assert_nothing_stored(registry)


def test_upload_commit_mismatch_discards(registry: Registry) -> None:
    repo = registry.repository("mismatch")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"abc"])
    with pytest.raises(DigestMismatch):
        repo.blobs.commit_upload(upload.id, Digest.of(b"abd"))
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(upload.id)
    assert_nothing_stored(registry)


def test_mount(registry: Registry) -> None:
    data = b"shared layer"
    digest = Digest.of(data)
    registry.repository("src").blobs.push(digest, [data])
    target = registry.repository("dst")
    assert target.blobs.mount(digest, "src") is not None
    assert target.blobs.stat(digest).size == len(data)
    assert registry.repository("any").blobs.mount(digest, None) is not None
    assert registry.repository("none").blobs.mount(digest, "missing") is None
    assert registry.repository("none").blobs.mount(Digest.of(b"x"), None) is None
    with pytest.raises(NameInvalid):
        target.blobs.mount(digest, "Bad Name")
    with registry.database.read() as conn:
        mounted = [
            e for e in event_log.read_all(conn) if e.type is EventType.BLOB_MOUNTED
        ]
    assert [e.payload["from"] for e in mounted] == ["src", "src"]


# ---- manifests and tags -------------------------------------------------------


def test_manifest_put_get_and_tag(registry: Registry) -> None:
    repo = registry.repository("library/app")
    image = make_image(layer_count=2)
    push_image(repo, image, tag="v1")
    info, content = repo.manifests.get(image.digest)
    assert content == image.manifest
    assert info.media_type == image.media_type
    assert repo.tags.get("v1").digest == image.digest
    assert repo.tags.lookup(image.digest) == ["v1"]
    assert event_types(registry)[-2:] == ["manifest.pushed", "tag.set"]


def test_manifest_put_is_idempotent(registry: Registry) -> None:
    repo = registry.repository("idem")
    image = make_image()
    push_image(repo, image)
    before = event_types(registry)
    result = repo.manifests.put(image.manifest, image.media_type, tag="latest")
    assert result.events == []
    assert event_types(registry) == before


def test_manifest_requires_blobs(registry: Registry) -> None:
    repo = registry.repository("missing")
    image = make_image()
    with pytest.raises(ManifestBlobUnknown) as caught:
        repo.manifests.put(image.manifest, tag="latest")
    missing = {entry["digest"] for entry in caught.value.detail["missing"]}
    assert missing == {str(Digest.of(blob)) for blob in image.blobs}
    assert_nothing_stored(registry)


def test_manifest_checks_every_layer_of_many(registry: Registry) -> None:
    repo = registry.repository("wide")
    # More layers than one batch of the reference check holds.
    image = make_image(layer_count=1200, layer_size=16)
    for blob in image.blobs[:-1]:
        repo.blobs.push(Digest.of(blob), [blob])
    with pytest.raises(ManifestBlobUnknown) as caught:
        repo.manifests.put(image.manifest, image.media_type, tag="v1")
    missing = [entry["digest"] for entry in caught.value.detail["missing"]]
    assert missing == [str(Digest.of(image.blobs[-1]))]

    last = image.blobs[-1]
    repo.blobs.push(Digest.of(last), [last])
    result = repo.manifests.put(image.manifest, image.media_type, tag="v1")
    assert result.manifest.digest == image.digest


def test_manifest_blobs_must_be_in_this_repository(registry: Registry) -> None:
    image = make_image()
    push_image(registry.repository("one"), image)
    with pytest.raises(ManifestBlobUnknown):
        registry.repository("two").manifests.put(image.manifest)


def test_manifest_digest_must_match_url(registry: Registry) -> None:
    repo = registry.repository("digest")
    image = make_image()
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    wrong = Digest.of(b"not the manifest")
    with pytest.raises(ManifestInvalid) as caught:
        repo.manifests.put(image.manifest, digest=wrong)
    assert caught.value.detail["expected"] == str(wrong)
    sha512 = Digest.of(image.manifest, "sha512")
    assert repo.manifests.put(image.manifest, digest=sha512).manifest.digest == sha512


def test_invalid_tag_stores_nothing(registry: Registry) -> None:
    repo = registry.repository("tags")
    with pytest.raises(TagInvalid):
        repo.manifests.put(make_image().manifest, tag="-bad")
    assert_nothing_stored(registry)


def test_index_requires_child_manifests(registry: Registry) -> None:
    repo = registry.repository("multi")
    amd64, arm64 = make_image(), make_image()
    push_image(repo, amd64, tag=None)
    index = make_index([amd64, arm64])
    with pytest.raises(ManifestBlobUnknown) as caught:
        repo.manifests.put(index, tag="latest")
    assert caught.value.detail["missing"] == [
        {"kind": "manifest", "digest": str(arm64.digest)}
    ]
    push_image(repo, arm64, tag=None)
    result = repo.manifests.put(index, tag="latest")
    assert result.manifest.media_type == "application/vnd.oci.image.index.v1+json"


def test_retag_records_previous_digest(registry: Registry) -> None:
    repo = registry.repository("retag")
    first, second = make_image(), make_image()
    push_image(repo, first)
    push_image(repo, second)
    with registry.database.read() as conn:
        tag_events = event_log.read(conn, types=["tag.set"])
    assert [e.payload["previous"] for e in tag_events] == [None, str(first.digest)]
    assert repo.tags.get("latest").digest == second.digest


def test_manifest_delete_removes_its_tags(registry: Registry) -> None:
    repo = registry.repository("delete")
    image = make_image()
    push_image(repo, image, tag="a")
    repo.tags.tag("b", image.digest)
    stored = repo.manifests.delete(image.digest)
    assert [(str(e.type), e.payload.get("tag")) for e in stored] == [
        ("tag.deleted", "a"),
        ("tag.deleted", "b"),
        ("manifest.deleted", None),
    ]
    assert repo.tags.list() == []
    with pytest.raises(ManifestUnknown):
        repo.manifests.get(image.digest)
    with pytest.raises(ManifestUnknown):
        repo.manifests.delete(image.digest)


def test_untag_keeps_manifest(registry: Registry) -> None:
    repo = registry.repository("untag")
    image = make_image()
    push_image(repo, image)
    repo.tags.untag("latest")
    assert repo.manifests.exists(image.digest)
    with pytest.raises(ManifestUnknown):
        repo.tags.get("latest")
    with pytest.raises(ManifestUnknown):
        repo.tags.untag("latest")
    with pytest.raises(ManifestUnknown):
        repo.tags.tag("x", Digest.of(b"unknown"))


def test_tag_listing_pages(registry: Registry) -> None:
    repo = registry.repository("pages")
    image = make_image()
    push_image(repo, image, tag=None)
    names = sorted(f"t{i:03d}" for i in range(25))
    for name in names:
        repo.tags.tag(name, image.digest)
    assert repo.tags.list() == names
    assert repo.tags.list(n=10) == names[:10]
    assert repo.tags.list(n=10, last=names[9]) == names[10:20]
    assert repo.tags.list(last=names[-1]) == []
    assert list(repo.tags.iter_all(page_size=7)) == names


def test_tags_of_unknown_repository(registry: Registry) -> None:
    with pytest.raises(NameUnknown) as caught:
        registry.repository("nobody").tags.list()
    assert caught.value.detail["name"] == "nobody"


def test_referrers(registry: Registry) -> None:
    repo = registry.repository("signed")
    image = make_image()
    push_image(repo, image)
    sbom = make_artifact(image, "application/vnd.example.sbom", b"sbom")
    signature = make_artifact(image, "application/vnd.example.sig", b"sig")
    for artifact in (sbom, signature):
        push_image(repo, artifact, tag=None)
    found = repo.manifests.referrers(image.digest)
    assert [d.digest for d in found] == [sbom.digest, signature.digest]
    assert found[0].artifact_type == "application/vnd.example.sbom"
    assert found[0].annotations == {
        "org.opencontainers.image.created": "2026-01-01T00:00:00Z"
    }
    only = repo.manifests.referrers(image.digest, "application/vnd.example.sig")
    assert [d.digest for d in only] == [signature.digest]
    repo.manifests.delete(sbom.digest)
    assert [d.digest for d in repo.manifests.referrers(image.digest)] == [
        signature.digest
    ]


def test_referrers_after_pages(registry: Registry) -> None:
    repo = registry.repository("signed")
    image = make_image()
    push_image(repo, image)
    kinds = ["sbom", "sig", "sbom", "sig", "sbom"]
    artifacts = [
        make_artifact(image, f"application/vnd.example.{kind}", str(i).encode())
        for i, kind in enumerate(kinds)
    ]
    for artifact in artifacts:
        push_image(repo, artifact, tag=None)

    first = repo.manifests.referrers_after(image.digest, limit=2)
    rest = repo.manifests.referrers_after(image.digest, after=first[-1][0])
    sboms = repo.manifests.referrers_after(
        image.digest, "application/vnd.example.sbom", after=first[0][0], limit=1
    )

    assert [d.digest for _, d in first] == [a.digest for a in artifacts[:2]]
    assert [d.digest for _, d in rest] == [a.digest for a in artifacts[2:]]
    positions = [position for position, _ in first + rest]
    assert positions == sorted(set(positions))
    assert [d.digest for _, d in sboms] == [artifacts[2].digest]


def test_referrer_before_subject(registry: Registry) -> None:
    repo = registry.repository("early")
    subject = make_image()
    artifact = make_artifact(subject, "application/vnd.example.sig", b"sig")
    push_image(repo, artifact, tag=None)
    assert [d.digest for d in repo.manifests.referrers(subject.digest)] == [
        artifact.digest
    ]


def test_catalog_and_enumeration(registry: Registry) -> None:
    names = ["a/x", "b", "c/y/z"]
    for name in names:
        push_image(registry.repository(name), make_image())
    assert registry.catalog() == names
    assert registry.catalog(n=2) == names[:2]
    assert registry.catalog(n=2, last="b") == names[2:]
    assert list(registry.iter_repositories(page_size=1)) == names
    assert [repo for repo, _ in registry.iter_manifests(page_size=2)] == names


# Names and tags whose byte order differs from the order of en-US collation,
# which puts "_" before "-" and digits, and "B" after "ab".
ODD_TAGS = ["9", "B", "Z9", "_x", "a", "a-b", "a.b", "a_b", "ab"]
ODD_NAMES = ["9", "a-b", "a.b", "a/c", "a_b", "ab", "b"]


def test_listings_in_byte_order(registry: Registry) -> None:
    for name in reversed(ODD_NAMES):
        push_image(registry.repository(name), make_image(), tag=None)
    repo = registry.repository("ab")
    for tag in reversed(ODD_TAGS):
        push_image(repo, make_image(), tag=tag)

    assert registry.catalog() == ODD_NAMES
    assert registry.catalog(n=3, last="a-b") == ODD_NAMES[2:5]
    assert repo.tags.list() == ODD_TAGS
    assert repo.tags.list(n=3, last="Z9") == ODD_TAGS[3:6]


def test_listings_byte_order_en_us_collation(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        test_listings_in_byte_order(registry)
    finally:
        registry.database.dispose()


def test_manifest_tags_in_byte_order(registry: Registry) -> None:
    image = make_image()
    repo = registry.repository("app")
    push_image(repo, image, tag=None)
    for tag in reversed(ODD_TAGS):
        repo.tags.tag(tag, image.digest)

    assert repo.tags.lookup(image.digest) == ODD_TAGS

    deleted = repo.manifests.delete(image.digest)
    deleted_tags = [
        event.payload["tag"] for event in deleted if event.type is EventType.TAG_DELETED
    ]
    assert deleted_tags == ODD_TAGS


def test_manifest_tags_byte_order_en_us_collation(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        test_manifest_tags_in_byte_order(registry)
    finally:
        registry.database.dispose()


def test_log_positions_filters_and_chain(registry: Registry) -> None:
    push_image(registry.repository("one"), make_image())
    push_image(registry.repository("two"), make_image())
    with registry.database.read() as conn:
        everything = event_log.read(conn)
        two = event_log.read(conn, repository="two")
        tag_sets = event_log.read(conn, types=["tag.set"])
        page = event_log.read(conn, after=3, limit=2)
    assert [e.position for e in everything] == list(range(1, 9))
    assert [e.version for e in two] == [1, 2, 3, 4]
    assert {e.repository for e in two} == {"two"}
    assert [e.repository for e in tag_sets] == ["one", "two"]
    assert [e.position for e in page] == [4, 5]
    for previous, event in itertools.pairwise(everything):
        assert event.previous_hash == previous.hash
        assert event.expected_hash() == event.hash


def test_actor_and_request_id_recorded(registry: Registry) -> None:
    from engine.domain.events import Actor

    repo = registry.repository(
        "who", actor=Actor("alice", "127.0.0.1"), request_id="req-1"
    )
    repo.blobs.push(Digest.of(b"x"), [b"x"])
    with registry.database.read() as conn:
        (event,) = event_log.read(conn)
    assert event.actor == Actor("alice", "127.0.0.1")
    assert event.request_id == "req-1"


# ---- rebuild and verify -------------------------------------------------------


def test_rebuild_equals_live(registry: Registry) -> None:
    repo = registry.repository("rebuild")
    image = make_image()
    push_image(repo, image)
    push_image(
        repo, make_artifact(image, "application/vnd.example.sig", b"s"), tag="sig"
    )
    repo.tags.tag("other", image.digest)
    repo.tags.untag("other")
    registry.repository("mounted").blobs.mount(Digest.of(image.layers[0]), "rebuild")
    with registry.database.read() as conn:
        live = snapshot_projections(conn)
    rebuild_projections(registry.database)
    with registry.database.read() as conn:
        assert snapshot_projections(conn) == live
    assert verify(registry) == []


def test_verify_finds_tampered_event(registry: Registry) -> None:
    push_image(registry.repository("tamper"), make_image())
    with registry.database.transaction() as conn:
        conn.execute(
            sa.text("UPDATE events SET repository = 'elsewhere' WHERE position = 2")
        )
    problems = verify(registry)
    assert any("position 2" in p and "hash" in p for p in problems)


def test_verify_finds_corrupt_and_missing_blobs(registry: Registry) -> None:
    image = make_image()
    push_image(registry.repository("blobs"), image)
    config_path = registry.blob_store.path(Digest.of(image.config))
    config_path.write_bytes(b"corrupt")
    registry.blob_store.path(Digest.of(image.layers[0])).unlink()
    problems = verify(registry)
    assert any(str(Digest.of(image.config)) in p and "hashes to" in p for p in problems)
    assert any("missing on disk" in p for p in problems)


def test_verify_skips_blob_removed_meanwhile(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = registry.blob_store.stage(str(uuid.uuid4()))
    orphan.write(b"unlinked")
    registry.blob_store.commit(orphan, Digest.of(b"unlinked"))
    listed = registry.blob_store.iter_blobs

    def listed_then_removed() -> Iterator[tuple[Digest, Path]]:
        # gc removes the unlinked file after the listing found it.
        for digest, path in listed():
            path.unlink()
            yield digest, path

    monkeypatch.setattr(registry.blob_store, "iter_blobs", listed_then_removed)
    assert verify(registry) == []


def _unlinked_blob_path(registry: Registry, data: bytes) -> Path:
    """Return the blob path of ``data``, with its prefix directory created."""
    path = registry.blob_store.path(Digest.of(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_verify_reports_entries_that_are_not_files(registry: Registry) -> None:
    image = make_image()
    push_image(registry.repository("blobs"), image)
    directory = _unlinked_blob_path(registry, b"a directory")
    directory.mkdir()
    fifo = _unlinked_blob_path(registry, b"a fifo")
    os.mkfifo(fifo)
    dangling = _unlinked_blob_path(registry, b"a dangling link")
    dangling.symlink_to(dangling.parent / "missing")
    # A corrupt blob beside them is still found.
    corrupt = registry.blob_store.path(Digest.of(image.config))
    corrupt.write_bytes(b"corrupt")

    problems = verify(registry)

    assert sorted(problems) == sorted(
        [
            f"blob {Digest.of(b'a directory')}: {directory} is a directory, "
            "not a regular file",
            f"blob {Digest.of(b'a fifo')}: {fifo} is a fifo, not a regular file",
            f"blob {Digest.of(b'a dangling link')}: {dangling} is a symbolic "
            "link to a missing file",
            f"blob {Digest.of(image.config)}: content hashes to "
            f"{Digest.of(b'corrupt')} ({corrupt})",
        ]
    )


def test_verify_skips_entries_outside_layout(registry: Registry) -> None:
    blobs = registry.blob_store.paths.root / "blobs"
    (blobs / "README").write_text("not cairn's")
    (blobs / "sha256").mkdir(exist_ok=True)
    (blobs / "sha256" / "README").write_text("not cairn's")
    unknown_algorithm = blobs / "md4" / "ab" / "abcd"
    unknown_algorithm.parent.mkdir(parents=True)
    unknown_algorithm.write_text("not cairn's")

    assert verify(registry) == []


def test_verify_warns_about_missing_contents(registry: Registry) -> None:
    repo = registry.repository("gone")
    image = make_image()
    child = make_image()
    push_image(repo, image)
    push_image(repo, child, tag=None)
    index = make_index([child])
    repo.manifests.put(index, tag="multi")
    assert check_manifest_contents_present(registry) == []

    layer = Digest.of(image.layers[0])
    repo.blobs.delete(layer)
    repo.manifests.delete(child.digest)

    warnings = check_manifest_contents_present(registry)

    assert verify(registry) == []
    assert sorted(warnings) == sorted(
        [
            f"manifest gone@{image.digest} references layer {layer}, which the "
            "repository no longer contains, so pulls of it fail",
            f"manifest gone@{Digest.of(index)} references manifest "
            f"{child.digest}, which the repository no longer contains, so pulls "
            "of it fail",
        ]
    )


def test_verify_damaged_manifest_not_warned(registry: Registry) -> None:
    image = make_image()
    push_image(registry.repository("damaged"), image)
    with registry.database.transaction() as conn:
        conn.execute(
            sa.update(manifest_contents)
            .where(manifest_contents.c.digest == str(image.digest))
            .values(content=b"{}")
        )

    problems = verify(registry)

    assert any(f"manifest {image.digest}: stored bytes" in p for p in problems)
    assert check_stored_manifests(registry) == []


def test_verify_finds_projection_drift(registry: Registry) -> None:
    push_image(registry.repository("drift"), make_image())
    with registry.database.transaction() as conn:
        conn.execute(sa.text("DELETE FROM tags"))
    problems = verify(registry)
    assert any(p.startswith("projection tags:") for p in problems)
    # verify must leave the tables exactly as it found them
    assert count(registry, tags) == 0


def test_verify_replay_lets_writes_commit(registry: Registry) -> None:
    repo = registry.repository("busy")
    image = make_image()
    push_image(repo, image)
    with registry.database.scratch() as conn:
        before = snapshot_projections(conn)
        writer = threading.Thread(target=repo.tags.tag, args=("later", image.digest))
        writer.start()
        writer.join(20)

        assert not writer.is_alive()
        assert snapshot_projections(conn) == before

    assert repo.tags.list() == ["later", "latest"]
    assert verify(registry) == []


def _expire_upload(registry: Registry, upload_id: str) -> None:
    """Make an upload look idle for three days: its session and its staging
    file."""
    with registry.database.transaction() as conn:
        conn.execute(
            sa.update(uploads)
            .where(uploads.c.id == upload_id)
            .values(updated_at=datetime.now(UTC) - timedelta(days=3))
        )
    staging = registry.blob_store.paths.staging(upload_id)
    if staging.exists():
        old = time.time() - 3 * 24 * 3600
        os.utime(staging, (old, old))


def test_purge_stale_uploads(registry: Registry) -> None:
    repo = registry.repository("purge")
    stale = repo.blobs.create_upload()
    repo.blobs.write_upload(stale.id, [b"old"])
    fresh = repo.blobs.create_upload()
    orphan = (
        registry.blob_store.paths.staging_dir / "00000000-0000-4000-8000-000000000000"
    )
    orphan.write_bytes(b"left by a crash")
    old = time.time() - 3 * 24 * 3600
    os.utime(orphan, (old, old))
    _expire_upload(registry, stale.id)

    purge = registry.purge_uploads(timedelta(days=1))
    assert purge.sessions == [stale.id]
    assert len(purge.staging_files) == 2

    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(stale.id)
    assert not orphan.exists()
    assert repo.blobs.upload_status(fresh.id).offset == 0


def test_purge_skips_entries_that_are_not_files(registry: Registry) -> None:
    staging = registry.blob_store.paths.staging_dir
    orphan = staging / "00000000-0000-4000-8000-000000000001"
    orphan.write_bytes(b"left by a crash")
    directory = staging / "a-directory"
    directory.mkdir()
    (directory / "inside").write_bytes(b"kept")
    fifo = staging / "a-fifo"
    os.mkfifo(fifo)
    target = registry.blob_store.paths.root / "elsewhere"
    target.write_bytes(b"not a staging file")
    link = staging / "a-link"
    link.symlink_to(target)
    old = time.time() - 3 * 24 * 3600
    for path in (orphan, directory, fifo, link):
        os.utime(path, (old, old), follow_symlinks=False)

    with structlog.testing.capture_logs() as logs:
        dry_run = registry.purge_uploads(timedelta(days=1), dry_run=True)
        purge = registry.purge_uploads(timedelta(days=1))

    assert dry_run.staging_files == purge.staging_files
    assert [staged.path for staged in purge.staging_files] == [orphan]
    assert not orphan.exists()
    assert (directory / "inside").read_bytes() == b"kept"
    assert fifo.exists()
    assert link.is_symlink()
    assert target.read_bytes() == b"not a staging file"
    skipped = [
        (log["path"], log["file_type"])
        for log in logs
        if log["event"] == "staging_entry_skipped"
    ]
    assert skipped == 2 * [
        (str(directory), "directory"),
        (str(fifo), "fifo"),
        (str(link), "symbolic link"),
    ]


def test_purge_keeps_upload_being_written(registry: Registry) -> None:
    repo = registry.repository("purge-streaming")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])
    _expire_upload(registry, upload.id)
    # A PATCH that has streamed for days moves updated_at only when it
    # ends, but each write moves the staging file's mtime.
    os.utime(registry.blob_store.paths.staging(upload.id))

    purge = registry.purge_uploads(timedelta(days=1))

    assert purge.sessions == []
    assert purge.staging_files == []
    assert repo.blobs.upload_status(upload.id).offset == 4096


def test_purge_keeps_upload_written_during_purge(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = registry.repository("purge-race")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])
    _expire_upload(registry, upload.id)
    check_staging = registry._staging_written_since

    def write_then_check(upload_id: str, cutoff: datetime) -> bool:
        # A PATCH that ends after purge found the session old, but before
        # the purge deletes it.
        written_since = check_staging(upload_id, cutoff)
        repo.blobs.write_upload(upload_id, [b"b" * 4096])
        return written_since

    monkeypatch.setattr(registry, "_staging_written_since", write_then_check)
    purge = registry.purge_uploads(timedelta(days=1))

    assert purge.sessions == []
    assert purge.staging_files == []
    assert repo.blobs.upload_status(upload.id).offset == 8192


def _open_deleted_files(directory: Path) -> list[str]:
    """Return the deleted files under ``directory`` that this process has open."""
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    prefix = f"{directory}/"
    return [t for t in targets if t.startswith(prefix) and t.endswith(" (deleted)")]


def test_purge_closes_externally_purged_upload(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    repo = registry.repository("purged-elsewhere")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"x" * 4096])
    _expire_upload(registry, upload.id)
    # cairn gc, a process of its own, expires the session and unlinks the
    # staging file that this registry still has open.
    gc_registry = Registry.open(data_dir, database_url)
    try:
        assert gc_registry.purge_uploads(timedelta(days=1)).sessions == [upload.id]
    finally:
        gc_registry.database.dispose()
    staging_dir = registry.blob_store.paths.staging_dir
    assert _open_deleted_files(staging_dir) != []

    # The hourly purge of cairn serve, with its own longer expiry.
    registry.purge_uploads(timedelta(days=7))

    assert _open_deleted_files(staging_dir) == []


def _chunks_purged_midway(
    registry: Registry,
    upload_id: str,
    database_url: str,
    first: bytes,
    rest: bytes,
) -> Iterator[bytes]:
    """Yield ``first``, stall for three days, let a cairn gc of its own expire
    the upload, then yield ``rest``."""
    yield first
    _expire_upload(registry, upload_id)
    gc_registry = Registry.open(registry.blob_store.paths.root, database_url)
    try:
        assert gc_registry.purge_uploads(timedelta(days=1)).sessions == [upload_id]
    finally:
        gc_registry.database.dispose()
    yield rest


def test_upload_write_rejects_session_purged_midway(
    registry: Registry, database_url: str
) -> None:
    repo = registry.repository("purged-during-write")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])

    chunks = _chunks_purged_midway(
        registry, upload.id, database_url, b"b" * 4096, b"c" * 4096
    )
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.write_upload(upload.id, chunks, start=4096)

    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(upload.id)
    assert _open_deleted_files(registry.blob_store.paths.staging_dir) == []


def test_upload_commit_rejects_session_purged_midway(
    registry: Registry, database_url: str
) -> None:
    repo = registry.repository("purged-during-commit")
    content = b"a" * 4096 + b"b" * 4096 + b"c" * 4096
    digest = Digest.of(content)
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [content[:4096]])

    chunks = _chunks_purged_midway(
        registry, upload.id, database_url, content[4096:8192], content[8192:]
    )
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.commit_upload(upload.id, digest, chunks, start=4096)

    with pytest.raises(BlobUnknown):
        repo.blobs.stat(digest)
    assert not registry.blob_store.exists(digest)
    assert "blob.pushed" not in event_types(registry)


def _chunks_waiting_for(
    first: bytes, rest: bytes, event: threading.Event
) -> Iterator[bytes]:
    """Yield ``first``, wait up to two seconds for ``event``, then yield ``rest``."""
    yield first
    event.wait(timeout=2)
    yield rest


class _Request(threading.Thread):
    """Run one upload call in a thread of its own and keep its outcome."""

    def __init__(self, call: Any) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.call()
        except BaseException as error:
            self.error = error
        finally:
            self.done.set()


def test_upload_with_lost_staging_file(registry: Registry) -> None:
    repo = registry.repository("lost-staging")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])
    staging = registry.blob_store.paths.staging(upload.id)
    staging.unlink()

    with pytest.raises(BlobUploadUnknown, match="staging file is gone"):
        repo.blobs.write_upload(upload.id, [b"b" * 4096], start=4096)
    with pytest.raises(BlobUploadUnknown, match="staging file is gone"):
        repo.blobs.commit_upload(upload.id, Digest.of(b"a" * 4096))

    assert not staging.exists()


def test_lost_staging_file_closed(registry: Registry) -> None:
    # The session stays until it expires, so the request that finds its
    # file gone must close the copy this process has open, which would keep
    # the file's disk space.
    repo = registry.repository("lost-staging")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])
    staging_dir = registry.blob_store.paths.staging_dir
    registry.blob_store.paths.staging(upload.id).unlink()
    assert _open_deleted_files(staging_dir) != []

    with pytest.raises(BlobUploadUnknown, match="staging file is gone"):
        repo.blobs.write_upload(upload.id, [b"b" * 4096], start=4096)

    assert _open_deleted_files(staging_dir) == []


def test_upload_with_lost_empty_staging_file(registry: Registry) -> None:
    # An empty PATCH leaves the staging file open in this process. When the
    # file is lost, the next write must go to the new file at the path.
    repo = registry.repository("lost-staging")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [])
    staging = registry.blob_store.paths.staging(upload.id)
    staging.unlink()

    status = repo.blobs.write_upload(upload.id, [b"a" * 4096], start=0)

    assert status.offset == 4096
    assert staging.stat().st_size == 4096
    assert repo.blobs.upload_status(upload.id).offset == 4096
    info = repo.blobs.commit_upload(upload.id, Digest.of(b"a" * 4096))
    assert info.size == 4096


def test_upload_ordered_across_processes(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    # A second Registry on the same data directory and database stands for
    # a second cairn serve process. Its request at the same offset must
    # wait for the first one and then find the offset moved.
    repo = registry.repository("two-replicas")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [b"a" * 4096])
    other = Registry.open(data_dir, database_url)
    try:
        other_repo = other.repository("two-replicas")
        retried: _Request = _Request(
            lambda: other_repo.blobs.write_upload(upload.id, [b"x" * 4096], start=4096)
        )
        chunks = _chunks_waiting_for(b"b" * 4096, b"c" * 4096, retried.done)

        def start_retry_after_first_chunk() -> Iterator[bytes]:
            for index, chunk in enumerate(chunks):
                yield chunk
                if index == 0:
                    retried.start()

        repo.blobs.write_upload(upload.id, start_retry_after_first_chunk(), start=4096)
        retried.join(timeout=30)
    finally:
        other.database.dispose()

    assert isinstance(retried.error, RangeInvalid)
    assert repo.blobs.upload_status(upload.id).offset == 3 * 4096
    content = b"a" * 4096 + b"b" * 4096 + b"c" * 4096
    info = repo.blobs.commit_upload(upload.id, Digest.of(content))
    assert info.size == len(content)


def test_upload_waiter_after_commit_elsewhere(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    repo = registry.repository("two-replicas")
    upload = repo.blobs.create_upload()
    content = b"a" * 4096 + b"b" * 4096
    other = Registry.open(data_dir, database_url)
    try:
        other_repo = other.repository("two-replicas")
        waiting: _Request = _Request(
            lambda: other_repo.blobs.write_upload(upload.id, [b"x" * 4096], start=0)
        )
        chunks = _chunks_waiting_for(content[:4096], content[4096:], waiting.done)

        def start_waiter_after_first_chunk() -> Iterator[bytes]:
            for index, chunk in enumerate(chunks):
                yield chunk
                if index == 0:
                    waiting.start()

        repo.blobs.commit_upload(
            upload.id, Digest.of(content), start_waiter_after_first_chunk(), start=0
        )
        waiting.join(timeout=30)
    finally:
        other.database.dispose()

    assert isinstance(waiting.error, BlobUploadUnknown)
    assert list(registry.blob_store.paths.staging_dir.iterdir()) == []
    assert repo.blobs.stat(Digest.of(content)).size == len(content)


def test_catalog_counts_and_sizes(registry: Registry) -> None:
    from engine.domain.events import Actor

    repo = registry.repository("sizes", actor=Actor("bob", None))
    shared = make_image(layer_count=2, layer_size=1000)
    push_image(repo, shared, tag="a")
    second = make_image(layer_count=1, layer_size=500)
    push_image(repo, second, tag="b")
    repo.tags.tag("c", shared.digest)
    repo.tags.tag("c", second.digest)

    with registry.database.read() as conn:
        row = conn.execute(sa.select(repositories)).one()
    blob_bytes = sum(len(b) for b in shared.blobs + second.blobs)
    assert row.tag_count == 3
    assert row.manifest_count == 2
    assert row.blob_bytes == blob_bytes
    assert row.pushed_bytes == blob_bytes + len(shared.manifest) + len(second.manifest)
    assert row.last_actor == "bob"

    repo.manifests.delete(second.digest)
    repo.blobs.delete(Digest.of(second.layers[0]))
    with registry.database.read() as conn:
        row = conn.execute(sa.select(repositories)).one()
    assert row.tag_count == 1
    assert row.manifest_count == 1
    assert row.blob_bytes == blob_bytes - len(second.layers[0])
    assert row.pushed_bytes == sum(len(b) for b in shared.blobs) + len(shared.manifest)


def test_old_events_are_upcast_on_read(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.domain import events as domain_events

    image = make_image()
    push_image(registry.repository("old"), image)
    monkeypatch.setitem(domain_events.CURRENT_SCHEMA_VERSION, EventType.TAG_SET, 2)
    monkeypatch.setitem(
        domain_events._UPCASTERS,
        (EventType.TAG_SET, 1),
        lambda payload: {**payload, "source": "upcast"},
    )
    with registry.database.read() as conn:
        (current,) = event_log.read(conn, types=["tag.set"])
        (stored,) = event_log.read(conn, types=["tag.set"], upcast_payload=False)
    assert current.schema_version == 2
    assert current.payload["source"] == "upcast"
    assert stored.schema_version == 1
    assert "source" not in stored.payload
    assert stored.expected_hash() == stored.hash
    rebuild_projections(registry.database)
    assert registry.repository("old").tags.get("latest").digest == image.digest
