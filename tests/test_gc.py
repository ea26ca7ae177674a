"""`cairn gc` on real SQLite and PostgreSQL databases and real blob files.

The race tests run gc at the moment a push is most exposed to it: after the
blob file is in place and before the transaction that links it, or inside
BlobStore.commit, between the steps that create the blob's prefix directory,
rename the file into it and fsync it. A wrapper around BlobStore.commit or
around one of those system calls runs gc there, so each interleaving
happens every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from engine import log as event_log
from engine.api.app import create_app
from engine.blobs import BlobStore
from engine.domain.digest import Digest
from engine.domain.errors import BlobCollected, BlobUploadUnknown
from engine.gc import (
    BlobLink,
    GcReport,
    _blob_files,
    collect_garbage,
    delete_links,
    remove_blobs,
    remove_empty_directories,
    scan_blobs,
    scan_unreferenced_links,
)
from engine.identity import bind_data_dir
from engine.registry import Registry
from engine.tables import blob_links, uploads
from engine.verify import verify
from tests.images import OCI_CONFIG, OCI_LAYER, Image, descriptor, encode
from tests.server import (
    ServerThread,
    push_blob,
    push_image,
    record_fsyncs,
    running,
)
from tests.test_cli_errors import _unprivileged_prefix

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
NO_GRACE = timedelta(0)
EXPIRY = timedelta(days=1)


def make_image_of(layers: list[bytes]) -> Image:
    """Build an OCI image whose layers are exactly ``layers``."""
    config = encode({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    manifest = encode(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        }
    )
    return Image(config, layers, manifest)


def age(path: Path, hours: float = 2) -> None:
    """Set the mtime of ``path`` to ``hours`` ago."""
    moment = time.time() - hours * 3600
    os.utime(path, (moment, moment))


def age_all_blobs(registry: Registry) -> None:
    for _, path in registry.blob_store.iter_blobs():
        age(path)


def blob_file(registry: Registry, data: bytes) -> Path:
    return registry.blob_store.path(Digest.of(data))


def links(registry: Registry, digest: Digest) -> list[str]:
    with registry.database.read() as conn:
        return sorted(
            conn.execute(
                sa.select(blob_links.c.repository).where(
                    blob_links.c.digest == str(digest)
                )
            ).scalars()
        )


def log_position(registry: Registry) -> int:
    with registry.database.read() as conn:
        return event_log.head(conn)[0]


def push(registry: Registry, repository: str, data: bytes) -> Digest:
    digest = Digest.of(data)
    registry.repository(repository).blobs.push(digest, [data])
    return digest


def data_with_prefix(prefix: str) -> bytes:
    """Return random bytes whose sha256 starts with the hex digits ``prefix``,
    so that their blob file goes into the prefix directory ``prefix``."""
    while True:
        data = os.urandom(64)
        if Digest.of(data).encoded.startswith(prefix):
            return data


def prefix_directory(registry: Registry, prefix: str) -> Path:
    return registry.blob_store.paths.root / "blobs" / "sha256" / prefix


def unlinked_blob(registry: Registry, data: bytes) -> Digest:
    """Store ``data`` as a blob file that no repository links, two hours old."""
    digest = push(registry, "scratch/unlinked", data)
    registry.repository("scratch/unlinked").blobs.delete(digest)
    age(registry.blob_store.path(digest))
    return digest


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


# ---- what gc removes -------------------------------------------------------------


def test_gc_removes_only_unlinked_blobs(registry: Registry, api: httpx.Client) -> None:
    shared = os.urandom(3000)
    only_one = os.urandom(2000)
    only_two = os.urandom(1000)
    first = make_image_of([shared, only_one])
    second = make_image_of([shared, only_two])
    push_image(api, "team/one", first, tag="v1")
    push_image(api, "team/two", second, tag="v1")
    loose = push_blob(api, "team/one", os.urandom(500))

    deleted = api.delete(f"/v2/team/one/manifests/{first.digest}")
    assert deleted.status_code == 202
    for blob in first.blobs:
        response = api.delete(f"/v2/team/one/blobs/{Digest.of(blob)}")
        assert response.status_code == 202
    assert api.delete(f"/v2/team/one/blobs/{loose}").status_code == 202
    age_all_blobs(registry)
    position = log_position(registry)

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    unlinked = {Digest.of(first.config), Digest.of(only_one), loose}
    assert {blob.digest for blob in report.blobs} == unlinked
    assert report.bytes == len(first.config) + len(only_one) + 500
    for digest in unlinked:
        assert not registry.blob_store.exists(digest)
    for blob in second.blobs:
        assert blob_file(registry, blob).read_bytes() == blob
    assert log_position(registry) == position
    assert verify(registry) == []

    manifest = api.get(
        "/v2/team/two/manifests/v1", headers={"Accept": second.media_type}
    )
    assert manifest.status_code == 200
    assert manifest.content == second.manifest
    for blob in second.blobs:
        pulled = api.get(f"/v2/team/two/blobs/{Digest.of(blob)}")
        assert pulled.status_code == 200
        assert pulled.content == blob


def test_gc_keeps_blob_a_manifest_references(
    registry: Registry, api: httpx.Client
) -> None:
    layer = os.urandom(2000)
    image = make_image_of([layer])
    push_image(api, "team/app", image, tag="v1")
    response = api.delete(f"/v2/team/app/blobs/{Digest.of(layer)}")
    assert response.status_code == 202
    age_all_blobs(registry)

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    assert report.blobs == []
    assert blob_file(registry, layer).read_bytes() == layer

    deleted = api.delete(f"/v2/team/app/manifests/{image.digest}")
    assert deleted.status_code == 202
    again = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)
    assert [blob.digest for blob in again.blobs] == [Digest.of(layer)]
    assert verify(registry) == []


# ---- unreferenced links ------------------------------------------------------


def unreferenced_setup(registry: Registry, api: httpx.Client) -> dict[str, bytes]:
    """Push two images sharing a layer to team/app and delete one of them.

    team/app also links a blob that no manifest uses, and team/other
    references the deleted image's second layer from its own image.
    """
    shared, dropped, standalone = os.urandom(900), os.urandom(901), os.urandom(902)
    deleted_image = make_image_of([shared, dropped])
    kept_image = make_image_of([shared])
    push_image(api, "team/app", deleted_image, tag="old")
    push_image(api, "team/app", kept_image, tag="new")
    push_image(api, "team/other", make_image_of([dropped]), tag="v1")
    push_blob(api, "team/app", standalone)
    response = api.delete(f"/v2/team/app/manifests/{deleted_image.digest}")
    assert response.status_code == 202, response.text
    age_all_blobs(registry)
    return {
        "shared": shared,
        "dropped": dropped,
        "standalone": standalone,
        "deleted_config": deleted_image.config,
        "kept_config": kept_image.config,
    }


def test_gc_unlinks_unreferenced_links(registry: Registry, api: httpx.Client) -> None:
    blobs = unreferenced_setup(registry, api)
    position = log_position(registry)

    report = collect_garbage(
        registry,
        grace_period=NO_GRACE,
        upload_expiry=EXPIRY,
        unlink_unreferenced=True,
    )

    unlinked = {(link.repository, link.digest) for link in report.unlinked}
    assert unlinked == {
        ("team/app", str(Digest.of(blobs["dropped"]))),
        ("team/app", str(Digest.of(blobs["standalone"]))),
        ("team/app", str(Digest.of(blobs["deleted_config"]))),
    }
    # Files that another link or manifest still needs stay.
    removed = {blob.digest for blob in report.blobs}
    assert removed == {
        Digest.of(blobs["standalone"]),
        Digest.of(blobs["deleted_config"]),
    }
    for name in ("shared", "dropped", "kept_config"):
        assert blob_file(registry, blobs[name]).read_bytes() == blobs[name]
    assert links(registry, Digest.of(blobs["dropped"])) == ["team/other"]
    assert links(registry, Digest.of(blobs["shared"])) == ["team/app"]

    with registry.database.read() as conn:
        appended = event_log.read(conn, after=position)
    assert [event.type for event in appended] == ["blob.deleted"] * 3
    [request_id] = {event.request_id for event in appended}
    assert request_id is not None
    assert request_id.startswith("gc-")
    assert all(event.actor.user is None for event in appended)
    # The log still rebuilds to the projections, and every link has its file.
    assert verify(registry) == []
    manifest = api.get(
        "/v2/team/app/manifests/new",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert manifest.status_code == 200


def test_gc_without_unlink_keeps_links(registry: Registry, api: httpx.Client) -> None:
    blobs = unreferenced_setup(registry, api)

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    assert report.unlinked == []
    assert report.blobs == []
    assert links(registry, Digest.of(blobs["standalone"])) == ["team/app"]


def test_gc_unlink_keeps_young_links(registry: Registry, api: httpx.Client) -> None:
    blobs = unreferenced_setup(registry, api)

    report = collect_garbage(
        registry,
        grace_period=timedelta(hours=1),
        upload_expiry=EXPIRY,
        unlink_unreferenced=True,
    )

    assert report.unlinked == []
    assert links(registry, Digest.of(blobs["standalone"])) == ["team/app"]


def test_gc_unlink_dry_run_changes_nothing(
    registry: Registry, api: httpx.Client
) -> None:
    blobs = unreferenced_setup(registry, api)
    position = log_position(registry)

    report = collect_garbage(
        registry,
        grace_period=NO_GRACE,
        upload_expiry=EXPIRY,
        dry_run=True,
        unlink_unreferenced=True,
    )

    assert len(report.unlinked) == 3
    # The files the unlinks would free are listed too.
    assert {blob.digest for blob in report.blobs} == {
        Digest.of(blobs["standalone"]),
        Digest.of(blobs["deleted_config"]),
    }
    assert log_position(registry) == position
    assert links(registry, Digest.of(blobs["standalone"])) == ["team/app"]
    assert blob_file(registry, blobs["standalone"]).exists()


def age_links(registry: Registry, hours: float = 2) -> None:
    """Set every link's creation time to ``hours`` ago."""
    with registry.database.transaction() as conn:
        conn.execute(
            sa.update(blob_links).values(
                linked_at=datetime.now(UTC) - timedelta(hours=hours)
            )
        )


def test_unlink_keeps_blob_pushed_again(registry: Registry) -> None:
    grace = timedelta(hours=1)
    pushed_again, idle = os.urandom(700), os.urandom(701)
    for data in (pushed_again, idle):
        push(registry, "team/app", data)
    age_links(registry)
    age_all_blobs(registry)

    # A client uploads one blob again, which its repository already links:
    # no event, but the upload touches the file.
    push(registry, "team/app", pushed_again)
    scan = scan_unreferenced_links(registry, grace)

    assert [link.digest for link in scan.links] == [str(Digest.of(idle))]

    # Between the scan and the unlinks the idle blob is pushed again too.
    push(registry, "team/app", idle)
    assert list(delete_links(registry, scan, "gc-test", grace)) == []
    assert links(registry, Digest.of(idle)) == ["team/app"]
    assert links(registry, Digest.of(pushed_again)) == ["team/app"]


def test_unlink_skips_links_used_after_scan(registry: Registry) -> None:
    referenced, unlinked_meanwhile, garbage = (os.urandom(800) for _ in range(3))
    for data in (referenced, unlinked_meanwhile, garbage):
        push(registry, "team/app", data)
    scan = scan_unreferenced_links(registry, NO_GRACE)
    assert len(scan.links) == 3

    # Between the scan and the unlinks: a manifest that references one blob
    # is pushed, and another link is deleted through the API.
    image = make_image_of([referenced])
    repo = registry.repository("team/app")
    push(registry, "team/app", image.config)
    repo.manifests.put(image.manifest, image.media_type, tag="v1")
    repo.blobs.delete(Digest.of(unlinked_meanwhile))

    deleted = list(delete_links(registry, scan, "gc-test", NO_GRACE))

    assert deleted == [
        BlobLink("team/app", str(Digest.of(garbage)), len(garbage)),
    ]
    assert links(registry, Digest.of(referenced)) == ["team/app"]
    assert verify(registry) == []


def test_gc_dry_run_removes_nothing(registry: Registry) -> None:
    digest = unlinked_blob(registry, b"unlinked bytes")
    orphan = (
        registry.blob_store.paths.staging_dir / "00000000-0000-4000-8000-00000000000a"
    )
    orphan.write_bytes(b"staged")
    age(orphan, hours=48)
    empty = prefix_directory(registry, "ff" if digest.encoded[:2] != "ff" else "fe")
    empty.mkdir()
    position = log_position(registry)

    report = collect_garbage(
        registry, grace_period=NO_GRACE, upload_expiry=EXPIRY, dry_run=True
    )

    assert [blob.digest for blob in report.blobs] == [digest]
    assert [staged.path for staged in report.staging_files] == [orphan]
    # The blob's directory would be left empty, and the other one is.
    assert sorted(report.directories) == sorted(
        [registry.blob_store.path(digest).parent, empty]
    )
    assert report.bytes == len(b"unlinked bytes") + len(b"staged")
    assert registry.blob_store.exists(digest)
    assert orphan.exists()
    assert empty.is_dir()
    assert log_position(registry) == position


def test_gc_removes_emptied_prefix_directories(registry: Registry) -> None:
    linked = push(registry, "team/app", data_with_prefix("a1"))
    unlinked_beside_linked = unlinked_blob(registry, data_with_prefix("a1"))
    alone = unlinked_blob(registry, data_with_prefix("b2"))
    # An empty directory that an earlier gc or a crashed commit left behind.
    leftover = prefix_directory(registry, "c3")
    leftover.mkdir()

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    assert {blob.digest for blob in report.blobs} == {unlinked_beside_linked, alone}
    assert report.directories == [prefix_directory(registry, "b2"), leftover]
    assert not prefix_directory(registry, "b2").exists()
    assert not leftover.exists()
    assert registry.blob_store.path(linked).is_file()
    assert prefix_directory(registry, "a1").is_dir()
    assert verify(registry) == []

    # A push into a removed directory creates it again.
    data = data_with_prefix("b2")
    digest = push(registry, "team/app", data)
    assert registry.blob_store.path(digest).read_bytes() == data
    assert verify(registry) == []


def test_gc_grace_period_keeps_young_files(registry: Registry) -> None:
    young = push(registry, "scratch/young", b"pushed a moment ago")
    registry.repository("scratch/young").blobs.delete(young)
    old = unlinked_blob(registry, b"pushed two hours ago")

    report = collect_garbage(
        registry, grace_period=timedelta(hours=1), upload_expiry=EXPIRY
    )

    assert [blob.digest for blob in report.blobs] == [old]
    assert registry.blob_store.exists(young)
    assert not registry.blob_store.exists(old)


def test_gc_removes_expired_staging_files(registry: Registry) -> None:
    staging = registry.blob_store.paths.staging_dir
    old_orphan = staging / "00000000-0000-4000-8000-000000000001"
    young_orphan = staging / "00000000-0000-4000-8000-000000000002"
    for path in (old_orphan, young_orphan):
        path.write_bytes(b"left by a crash")
    age(old_orphan, hours=48)
    repo = registry.repository("scratch/uploads")
    session = repo.blobs.create_upload()
    repo.blobs.write_upload(session.id, [b"first chunk"])
    session_file = staging / session.id
    # The session was active an hour ago, its file was last written earlier.
    age(session_file, hours=48)
    with registry.database.transaction() as conn:
        conn.execute(
            sa.update(uploads)
            .where(uploads.c.id == session.id)
            .values(updated_at=datetime.now(UTC) - timedelta(hours=1))
        )

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    assert [staged.path for staged in report.staging_files] == [old_orphan]
    assert not old_orphan.exists()
    assert young_orphan.exists()
    assert session_file.exists()
    assert repo.blobs.upload_status(session.id).offset == len(b"first chunk")


def test_gc_skips_files_that_are_not_blobs(registry: Registry) -> None:
    stray = registry.blob_store.paths.root / "blobs" / "sha256" / "ab" / "notes.txt"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("not a blob")
    age(stray)

    report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    assert report.blobs == []
    assert stray.exists()


def test_gc_skips_entries_that_are_not_files(registry: Registry) -> None:
    blob = unlinked_blob(registry, os.urandom(100))
    directory = blob_file(registry, b"a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir()
    fifo = blob_file(registry, b"a fifo")
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    outside = registry.blob_store.paths.root / "outside"
    outside.write_bytes(b"a symlinked file")
    link = blob_file(registry, b"a symlinked file")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    staging = registry.blob_store.paths.staging_dir
    staging_directory = staging / "a-directory"
    staging_directory.mkdir()
    orphan = staging / "00000000-0000-4000-8000-000000000001"
    orphan.write_bytes(b"left by a crash")
    for path in (directory, fifo, link, outside, staging_directory, orphan):
        moment = time.time() - 48 * 3600
        os.utime(path, (moment, moment), follow_symlinks=False)

    with structlog.testing.capture_logs() as logs:
        dry_run = collect_garbage(
            registry, grace_period=NO_GRACE, upload_expiry=EXPIRY, dry_run=True
        )
        report = collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)

    for run in (dry_run, report):
        assert [removed.digest for removed in run.blobs] == [blob]
        assert [staged.path for staged in run.staging_files] == [orphan]
    assert not registry.blob_store.path(blob).exists()
    assert not orphan.exists()
    assert directory.is_dir()
    assert fifo.exists()
    assert link.is_symlink()
    assert outside.exists()
    assert staging_directory.is_dir()
    skipped = {
        (log["event"], log["path"], log["file_type"])
        for log in logs
        if log["event"] in ("gc_unknown_file_skipped", "staging_entry_skipped")
    }
    assert skipped == {
        ("gc_unknown_file_skipped", str(directory), "directory"),
        ("gc_unknown_file_skipped", str(fifo), "fifo"),
        ("gc_unknown_file_skipped", str(link), "symbolic link"),
        ("staging_entry_skipped", str(staging_directory), "directory"),
    }


# ---- races with pushes and mounts ---------------------------------------------------


def run_after_store_commit(
    monkeypatch: pytest.MonkeyPatch, registry: Registry, action: Callable[[], Any]
) -> None:
    """Run ``action`` after every BlobStore.commit of ``registry``, before the
    transaction that links the blob."""
    store = registry.blob_store
    commit = BlobStore.commit

    def commit_then_act(staged: Any, expected: Digest) -> int:
        size = commit(store, staged, expected)
        action()
        return size

    monkeypatch.setattr(store, "commit", commit_then_act)


def gc_now(registry: Registry, grace_period: timedelta) -> Callable[[], Any]:
    return lambda: collect_garbage(
        registry, grace_period=grace_period, upload_expiry=EXPIRY
    )


def test_new_blob_young_survives_gc_before_link(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_after_store_commit(monkeypatch, registry, gc_now(registry, timedelta(hours=1)))
    data = os.urandom(1000)

    digest = push(registry, "team/app", data)

    assert links(registry, digest) == ["team/app"]
    assert registry.blob_store.path(digest).read_bytes() == data
    assert verify(registry) == []


def test_new_blob_collected_before_link_fails(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_after_store_commit(monkeypatch, registry, gc_now(registry, NO_GRACE))
    data = os.urandom(1000)
    repo = registry.repository("team/app")
    upload = repo.blobs.create_upload()
    repo.blobs.write_upload(upload.id, [data])
    position = log_position(registry)

    with pytest.raises(BlobCollected):
        repo.blobs.commit_upload(upload.id, Digest.of(data))

    assert links(registry, Digest.of(data)) == []
    assert not registry.blob_store.exists(Digest.of(data))
    assert log_position(registry) == position
    with registry.database.read() as conn:
        assert conn.execute(sa.select(uploads.c.id)).all() == []
    assert verify(registry) == []

    monkeypatch.undo()
    assert push(registry, "team/app", data) == Digest.of(data)
    assert links(registry, Digest.of(data)) == ["team/app"]
    assert verify(registry) == []


def test_stored_blob_reused_survives_gc_before_link(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1000)
    digest = unlinked_blob(registry, data)
    run_after_store_commit(monkeypatch, registry, gc_now(registry, timedelta(hours=1)))

    push(registry, "team/app", data)

    assert links(registry, digest) == ["team/app"]
    assert registry.blob_store.path(digest).read_bytes() == data
    assert verify(registry) == []


def test_stored_blob_collected_before_link_fails(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1000)
    digest = unlinked_blob(registry, data)
    run_after_store_commit(monkeypatch, registry, gc_now(registry, NO_GRACE))
    position = log_position(registry)

    with pytest.raises(BlobCollected):
        push(registry, "team/app", data)

    assert links(registry, digest) == []
    assert log_position(registry) == position
    assert verify(registry) == []


def test_http_push_collected_before_link(
    registry: Registry, api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_after_store_commit(monkeypatch, registry, gc_now(registry, NO_GRACE))
    data = os.urandom(1000)
    digest = Digest.of(data)

    response = api.post(f"/v2/team/app/blobs/uploads/?digest={digest}", content=data)

    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert api.head(f"/v2/team/app/blobs/{digest}").status_code == 404
    monkeypatch.undo()
    assert push_blob(api, "team/app", data) == digest
    assert api.get(f"/v2/team/app/blobs/{digest}").content == data


def run_at_os_call(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    path: Path,
    action: Callable[[], Any],
    *,
    after: bool,
) -> None:
    """Run ``action`` once, before or after the first call of ``os.<name>``
    that takes ``path`` as an argument."""
    real = getattr(os, name)
    pending = [action]

    def hooked(*args: Any, **kwargs: Any) -> Any:
        paths = [Path(arg) for arg in args[:2] if isinstance(arg, str | Path)]
        if not pending or path not in paths:
            return real(*args, **kwargs)
        run = pending.pop()
        if not after:
            run()
        result = real(*args, **kwargs)
        if after:
            run()
        return result

    monkeypatch.setattr(os, name, hooked)


def test_commit_recreates_directory_gc_removed(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc empties and removes the prefix directory after the commit found it
    and before the rename into it."""
    old = unlinked_blob(registry, data_with_prefix("d4"))
    data = data_with_prefix("d4")
    target = registry.blob_store.path(Digest.of(data))
    reports: list[GcReport] = []

    def collect() -> None:
        reports.append(
            collect_garbage(
                registry, grace_period=timedelta(hours=1), upload_expiry=EXPIRY
            )
        )

    run_at_os_call(monkeypatch, "replace", target, collect, after=False)
    synced = record_fsyncs(monkeypatch)

    digest = push(registry, "team/app", data)

    [report] = reports
    assert [blob.digest for blob in report.blobs] == [old]
    assert report.directories == [target.parent]
    assert links(registry, digest) == ["team/app"]
    assert target.read_bytes() == data
    # The commit created the directory again, so it synced the new entry.
    assert str(target.parent) in synced
    assert str(target.parent.parent) in synced
    assert verify(registry) == []


def test_new_blob_directory_collected_before_sync(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = data_with_prefix("e5")
    target = registry.blob_store.path(Digest.of(data))
    run_at_os_call(
        monkeypatch, "replace", target, gc_now(registry, NO_GRACE), after=True
    )
    position = log_position(registry)

    with pytest.raises(BlobCollected):
        push(registry, "team/app", data)

    assert not target.parent.exists()
    assert links(registry, Digest.of(data)) == []
    assert log_position(registry) == position
    assert verify(registry) == []


def test_stored_blob_directory_collected_before_sync(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = data_with_prefix("f6")
    digest = unlinked_blob(registry, data)
    target = registry.blob_store.path(digest)
    run_at_os_call(monkeypatch, "utime", target, gc_now(registry, NO_GRACE), after=True)
    position = log_position(registry)

    with pytest.raises(BlobCollected):
        push(registry, "team/app", data)

    assert not target.parent.exists()
    assert links(registry, digest) == []
    assert log_position(registry) == position
    assert verify(registry) == []


def test_listings_skip_directory_removed_meanwhile(registry: Registry) -> None:
    digest = unlinked_blob(registry, data_with_prefix("00"))
    empty = prefix_directory(registry, "ff")
    empty.mkdir()
    scan = _blob_files(registry)
    listing = registry.blob_store.iter_blobs()
    # Both list the prefix directories before they yield the first blob.
    assert next(scan)[0].digest == digest
    assert next(listing)[0] == digest

    # Another gc run removes the empty directory.
    assert list(remove_empty_directories(registry)) == [empty]

    assert list(scan) == []
    assert list(listing) == []


def test_links_made_after_scan_keep_files(registry: Registry) -> None:
    mounted = os.urandom(1000)
    referenced = os.urandom(1000)
    garbage = os.urandom(1000)
    for data in (mounted, referenced, garbage):
        unlinked_blob(registry, data)
    scan = scan_blobs(registry, NO_GRACE)
    assert len(scan.blobs) == 3

    # Between the scan and the removal: one blob is pushed to a repository
    # and mounted into another, then its first link is deleted.
    push(registry, "team/one", mounted)
    assert registry.repository("team/two").blobs.mount(Digest.of(mounted), "team/one")
    registry.repository("team/one").blobs.delete(Digest.of(mounted))
    # Another is pushed with a manifest that references it, then unlinked.
    image = make_image_of([referenced])
    repo = registry.repository("team/three")
    for blob in image.blobs:
        push(registry, "team/three", blob)
    repo.manifests.put(image.manifest, image.media_type, tag="v1")
    repo.blobs.delete(Digest.of(referenced))
    # The pushes set the mtimes to now; only the links may keep the files.
    age_all_blobs(registry)

    removed = list(remove_blobs(registry, scan, NO_GRACE))

    assert [blob.digest for blob in removed] == [Digest.of(garbage)]
    assert blob_file(registry, mounted).read_bytes() == mounted
    assert blob_file(registry, referenced).read_bytes() == referenced
    assert verify(registry) == []


def test_file_reused_after_scan_is_kept(registry: Registry) -> None:
    data = os.urandom(1000)
    digest = unlinked_blob(registry, data)
    scan = scan_blobs(registry, timedelta(hours=1))
    assert [blob.digest for blob in scan.blobs] == [digest]

    # A push of the same bytes reuses the file, and its link is deleted
    # again before gc removes anything.
    push(registry, "team/app", data)
    registry.repository("team/app").blobs.delete(digest)

    assert list(remove_blobs(registry, scan, timedelta(hours=1))) == []
    assert registry.blob_store.exists(digest)


def test_gc_beside_another_process_pushing(
    data_dir: Path, database_url: str, registry: Registry
) -> None:
    """A second Registry on the same data directory and database stands for a
    second `cairn serve` process. It pushes and deletes one blob over and
    over while gc runs without a grace period; every link must keep its file.
    """
    data = os.urandom(4000)
    digest = Digest.of(data)
    pusher = Registry.open(data_dir, database_url)
    stop = threading.Event()
    collected = 0
    errors: list[BaseException] = []

    def collect() -> None:
        try:
            while not stop.is_set():
                collect_garbage(registry, grace_period=NO_GRACE, upload_expiry=EXPIRY)
        except BaseException as error:
            errors.append(error)

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        repo = pusher.repository("team/app")
        for _ in range(40):
            try:
                repo.blobs.push(digest, [data])
            except BlobCollected:
                collected += 1
                continue
            assert pusher.blob_store.path(digest).read_bytes() == data
            repo.blobs.delete(digest)
            with contextlib.suppress(FileNotFoundError):
                age(pusher.blob_store.path(digest))
    finally:
        stop.set()
        collector.join()
        pusher.database.dispose()

    assert errors == []
    assert collected < 40
    assert verify(registry) == []


# ---- the command line -------------------------------------------------------------


def cairn(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY_ROOT,
        timeout=120,
    )


def log_events(stderr: str, name: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [record for record in records if record.get("event") == name]


def test_gc_command(
    registry: Registry, data_dir: Path, database_url: str, api: httpx.Client
) -> None:
    digest = unlinked_blob(registry, b"an unlinked blob")
    # The linked blob goes to another directory, which gc keeps.
    linked = os.urandom(700)
    while Digest.of(linked).encoded[:2] == digest.encoded[:2]:
        linked = os.urandom(700)
    push_blob(api, "team/app", linked)
    emptied = registry.blob_store.path(digest).parent
    stray = data_dir / "blobs" / "sha256" / "not-a-prefix"
    stray.mkdir()
    # An expired upload session that never received a byte has no file.
    repo = registry.repository("team/app")
    session = repo.blobs.create_upload()
    with registry.database.transaction() as conn:
        conn.execute(
            sa.update(uploads)
            .where(uploads.c.id == session.id)
            .values(updated_at=datetime.now(UTC) - timedelta(hours=48))
        )
    storage = ["--data-dir", str(data_dir), "--database", database_url]

    dry_run = cairn("gc", *storage, "--dry-run", "--grace-period", "0")

    assert dry_run.returncode == 0, dry_run.stderr
    assert dry_run.stdout.splitlines() == [
        f"would remove blob {digest} (16 bytes)",
        f"would remove upload session {session.id}",
        f"would remove empty directory {emptied}",
        "dry run: would remove 1 blob file(s), 0 staging file(s), 1 expired "
        "upload session(s) and 1 empty blob directory(ies), freeing 16 bytes",
    ]
    assert emptied.is_dir()
    assert registry.blob_store.exists(digest)
    assert repo.blobs.upload_status(session.id).offset == 0

    result = cairn("gc", *storage, "--grace-period", "0")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "removed 1 blob file(s), 0 staging file(s), 1 expired upload "
        "session(s) and 1 empty blob directory(ies), freed 16 bytes"
    ]
    assert not emptied.exists()
    assert stray.is_dir()
    [record] = log_events(result.stderr, "blobs_collected")
    assert record["blobs"] == 1
    assert record["upload_sessions"] == 1
    assert record["bytes"] == 16
    assert not registry.blob_store.exists(digest)
    with pytest.raises(BlobUploadUnknown):
        repo.blobs.upload_status(session.id)
    verified = cairn("verify", *storage)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert api.get(f"/v2/team/app/blobs/{Digest.of(linked)}").content == linked


def test_gc_command_unlink_unreferenced(
    registry: Registry, data_dir: Path, database_url: str, api: httpx.Client
) -> None:
    blobs = unreferenced_setup(registry, api)
    storage = ["--data-dir", str(data_dir), "--database", database_url]
    standalone = Digest.of(blobs["standalone"])

    dry_run = cairn(
        "gc", *storage, "--unlink-unreferenced", "--grace-period", "0", "--dry-run"
    )

    assert dry_run.returncode == 0, dry_run.stderr
    lines = dry_run.stdout.splitlines()
    assert f"would delete the link of {standalone} in team/app" in lines
    assert (
        "dry run: would delete 3 unreferenced blob link(s) in 1 repository(ies)"
        in lines
    )
    assert links(registry, standalone) == ["team/app"]

    result = cairn("gc", *storage, "--unlink-unreferenced", "--grace-period", "0")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "deleted 3 unreferenced blob link(s) in 1 repository(ies)"
    assert lines[1].startswith("removed 2 blob file(s)")
    [record] = log_events(result.stderr, "blobs_collected")
    assert record["unlinked"] == 3
    assert record["request_id"].startswith("gc-")
    assert not registry.blob_store.exists(standalone)
    verified = cairn("verify", *storage)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_gc_command_default_grace_keeps_new_blob(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    digest = push(registry, "team/app", b"just unlinked")
    registry.repository("team/app").blobs.delete(digest)

    result = cairn("gc", "--data-dir", str(data_dir), "--database", database_url)

    assert result.returncode == 0, result.stderr
    assert "removed 0 blob file(s)" in result.stdout
    assert registry.blob_store.exists(digest)


def test_gc_command_rejects_negative_grace_period(data_dir: Path) -> None:
    result = cairn("gc", "--data-dir", str(data_dir), "--grace-period", "-5")

    assert result.returncode == 2
    assert "invalid duration '-5'" in result.stderr


def test_gc_command_skips_directory_under_uploads(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    digest = unlinked_blob(registry, b"an unlinked blob")
    staging = registry.blob_store.paths.staging_dir
    directory = staging / "somedir"
    directory.mkdir()
    orphan = staging / "orphan-file"
    orphan.write_bytes(b"x\n")
    age(directory, hours=72)
    age(orphan, hours=72)
    storage = ["--data-dir", str(data_dir), "--database", database_url]

    dry_run = cairn("gc", *storage, "--dry-run", "--grace-period", "0")
    result = cairn("gc", *storage, "--grace-period", "0")

    assert dry_run.returncode == 0, dry_run.stderr
    assert f"would remove staging file {orphan} (2 bytes)" in dry_run.stdout
    assert str(directory) not in dry_run.stdout
    assert dry_run.stdout.splitlines()[-1] == (
        "dry run: would remove 1 blob file(s), 1 staging file(s), 0 expired "
        "upload session(s) and 1 empty blob directory(ies), freeing 18 bytes"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "removed 1 blob file(s), 1 staging file(s), 0 expired upload "
        "session(s) and 1 empty blob directory(ies), freed 18 bytes"
    ]
    for run in (dry_run, result):
        [skipped] = log_events(run.stderr, "staging_entry_skipped")
        assert skipped["path"] == str(directory)
        assert skipped["file_type"] == "directory"
    assert directory.is_dir()
    assert not orphan.exists()
    assert not registry.blob_store.exists(digest)


def test_verify_command_reports_directory_at_blob_path(
    registry: Registry, data_dir: Path, database_url: str
) -> None:
    data = b"a directory in place of a blob"
    directory = blob_file(registry, data)
    directory.mkdir(parents=True)
    storage = ["--data-dir", str(data_dir), "--database", database_url]

    result = cairn("verify", *storage)

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"problem: blob {Digest.of(data)}: {directory} is a directory, not a "
        "regular file",
        "1 problem(s) found",
    ]
    assert "cairn:" not in result.stderr


def _unprivileged() -> list[str]:
    """Return the command prefix that runs a command as the user `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("only root can set up files that another account cannot change")
    return _unprivileged_prefix()


@pytest.fixture
def nobody_data_dir() -> Iterator[Path]:
    """A data directory with a SQLite database, in a directory that the user
    `nobody` can enter, unlike pytest's own temporary directories."""
    root = Path(tempfile.mkdtemp(prefix="cairn-gc-"))
    root.chmod(0o755)
    data_dir = root / "data"
    upgraded = cairn("db", "upgrade", "--data-dir", str(data_dir))
    assert upgraded.returncode == 0, upgraded.stderr
    try:
        yield data_dir
    finally:
        shutil.rmtree(root)


def cairn_as(prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `cairn ARGS` after the command ``prefix``, such as setpriv's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "engine.cli", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY_ROOT,
        timeout=120,
    )


def _give_to_nobody(directory: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)


def test_gc_command_reports_removals_before_error(nobody_data_dir: Path) -> None:
    prefix = _unprivileged()
    registry = Registry.open(nobody_data_dir)
    try:
        bind_data_dir(
            nobody_data_dir, registry.registry_id(), adopt=True, require=False
        )
        digest = unlinked_blob(registry, b"an unlinked blob")
        emptied = registry.blob_store.path(digest).parent
    finally:
        registry.database.dispose()
    _give_to_nobody(nobody_data_dir)
    # Everyone may write to uploads/, but its sticky bit lets only root, the
    # owner of this expired staging file, remove it, so gc's last step fails.
    staging = nobody_data_dir / "uploads"
    os.chown(staging, 0, 0)
    staging.chmod(0o1777)
    stuck = staging / "00000000-0000-4000-8000-000000000001"
    stuck.write_bytes(b"left by a crash")
    age(stuck, hours=72)

    result = cairn_as(
        prefix, "gc", "--data-dir", str(nobody_data_dir), "--grace-period", "0"
    )

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "removed 1 blob file(s), 0 staging file(s), 0 expired upload session(s) "
        "and 1 empty blob directory(ies), freed 16 bytes before an error "
        "stopped the run"
    ]
    messages = [line for line in result.stderr.splitlines() if line.startswith("cairn")]
    assert messages == [
        f"cairn: cannot use data directory {nobody_data_dir}: Operation not "
        f"permitted: {stuck}"
    ]
    assert "Traceback" not in result.stderr
    assert not emptied.exists()
    assert stuck.exists()


def test_gc_error_kept_when_stdout_closed(nobody_data_dir: Path) -> None:
    prefix = _unprivileged()
    # As in the test above: gc's last step fails on a staging file that
    # only root may remove.
    staging = nobody_data_dir / "uploads"
    _give_to_nobody(nobody_data_dir)
    os.chown(staging, 0, 0)
    staging.chmod(0o1777)
    stuck = staging / "00000000-0000-4000-8000-000000000001"
    stuck.write_bytes(b"left by a crash")
    age(stuck, hours=72)
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    # Unbuffered, so that the report's first line meets the closed pipe.
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "engine.cli", "--log-format", "json", "gc"]
    try:
        result = subprocess.run(
            [*prefix, *argv, "--data-dir", str(nobody_data_dir)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPOSITORY_ROOT,
            timeout=120,
        )
    finally:
        os.close(write_end)

    # The error that stopped gc is reported, not the closed standard output.
    assert result.returncode == 1, result.stderr
    messages = [line for line in result.stderr.splitlines() if line.startswith("cairn")]
    assert messages == [
        f"cairn: cannot use data directory {nobody_data_dir}: Operation not "
        f"permitted: {stuck}"
    ]
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert stuck.exists()


def test_verify_command_reports_unreadable_blob(nobody_data_dir: Path) -> None:
    prefix = _unprivileged()
    registry = Registry.open(nobody_data_dir)
    try:
        bind_data_dir(
            nobody_data_dir, registry.registry_id(), adopt=True, require=False
        )
        unreadable = push(registry, "team/app", b"a blob nobody may read")
        corrupt = push(registry, "team/app", b"a blob that changes")
    finally:
        registry.database.dispose()
    _give_to_nobody(nobody_data_dir)
    unreadable_path = registry.blob_store.path(unreadable)
    os.chown(unreadable_path, 0, 0)
    unreadable_path.chmod(0o600)
    corrupt_path = registry.blob_store.path(corrupt)
    corrupt_path.write_bytes(b"changed")

    result = cairn_as(prefix, "verify", "--data-dir", str(nobody_data_dir))

    assert result.returncode == 1, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        [
            f"problem: blob {unreadable}: cannot read {unreadable_path}: "
            "Permission denied",
            f"problem: blob {corrupt}: content hashes to {Digest.of(b'changed')} "
            f"({corrupt_path})",
            "2 problem(s) found",
        ]
    )
    assert "Traceback" not in result.stderr
