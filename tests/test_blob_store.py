"""The content-addressed blob store: staging, commit and what gets synced."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from engine.blobs import directories
from engine.blobs.store import BlobStore, StagedBlob
from engine.domain.digest import Digest
from tests.server import record_fsyncs


def _stage(store: BlobStore, data: bytes) -> tuple[str, StagedBlob, Digest]:
    upload_id = str(uuid.uuid4())
    staged = store.stage(upload_id)
    staged.write(data)
    return upload_id, staged, Digest("sha256", hashlib.sha256(data).hexdigest())


def test_new_blob_syncs_file_then_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = b"a new blob"
    upload_id, staged, digest = _stage(store, data)
    synced = record_fsyncs(monkeypatch)

    assert store.commit(staged, digest) == len(data)

    target = store.path(digest)
    assert synced[0] == str(store.paths.staging(upload_id))
    assert str(target.parent) in synced[1:]
    assert target.read_bytes() == data
    assert not store.paths.staging(upload_id).exists()


def test_stored_blob_skips_data_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = b"the same bytes twice"
    _, first, digest = _stage(store, data)
    store.commit(first, digest)
    second_id, staged, _ = _stage(store, data)
    synced = record_fsyncs(monkeypatch)

    assert store.commit(staged, digest) == len(data)

    assert synced == [str(store.path(digest).parent)]
    assert store.path(digest).read_bytes() == data
    assert not store.paths.staging(second_id).exists()


def _needs_generations(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if directories._identity(fd) is None:
            pytest.skip("the file system gives no inode generation")
    finally:
        os.close(fd)


def _blob_in_new_directory(store: BlobStore) -> bytes:
    """Return bytes whose blob directory does not exist yet."""
    for number in range(10_000):
        data = f"blob {number}".encode()
        if not store.path(Digest.of(data)).parent.exists():
            return data
    raise AssertionError("no free blob directory")


def test_known_directory_skips_parent_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_generations(tmp_path)
    store = BlobStore(tmp_path)
    first = b"first blob"
    store.commit(_stage(store, first)[1], Digest.of(first))
    second = first
    while True:
        second += b"!"
        if Digest.of(second).encoded[:2] == Digest.of(first).encoded[:2]:
            break
    staged = _stage(store, second)[1]
    synced = record_fsyncs(monkeypatch)

    store.commit(staged, Digest.of(second))

    directory = store.path(Digest.of(second)).parent
    assert str(directory) in synced
    assert str(directory.parent) not in synced
    assert str(directory.parent.parent) not in synced


def test_directory_made_elsewhere_syncs_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process created the directory after this store's first
    # commit and may not have synced its entry yet.
    _needs_generations(tmp_path)
    store = BlobStore(tmp_path)
    first = b"first blob"
    store.commit(_stage(store, first)[1], Digest.of(first))
    data = _blob_in_new_directory(store)
    directory = store.path(Digest.of(data)).parent
    directory.mkdir()
    staged = _stage(store, data)[1]
    synced = record_fsyncs(monkeypatch)

    store.commit(staged, Digest.of(data))

    assert str(directory) in synced
    assert str(directory.parent) in synced
    assert str(directory.parent.parent) in synced


def test_recreated_directory_syncs_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc removed the directory and another process made it again, possibly
    # with the same inode number.
    _needs_generations(tmp_path)
    store = BlobStore(tmp_path)
    data = b"a blob that gc removes"
    store.commit(_stage(store, data)[1], Digest.of(data))
    target = store.path(Digest.of(data))
    target.unlink()
    target.parent.rmdir()
    target.parent.mkdir()
    staged = _stage(store, data)[1]
    synced = record_fsyncs(monkeypatch)

    store.commit(staged, Digest.of(data))

    assert str(target.parent.parent) in synced
    assert str(target.parent.parent.parent) in synced
    assert target.read_bytes() == data
