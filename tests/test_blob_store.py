"""The content-addressed blob store: staging, commit and what gets synced."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from engine.blobs.store import BlobStore, StagedBlob
from engine.domain.digest import Digest


def _stage(store: BlobStore, data: bytes) -> tuple[str, StagedBlob, Digest]:
    upload_id = str(uuid.uuid4())
    staged = store.stage(upload_id)
    staged.write(data)
    return upload_id, staged, Digest("sha256", hashlib.sha256(data).hexdigest())


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every descriptor passed to os.fsync, then sync it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_new_blob_syncs_file_then_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = b"a new blob"
    upload_id, staged, digest = _stage(store, data)
    synced = _record_fsyncs(monkeypatch)

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
    synced = _record_fsyncs(monkeypatch)

    assert store.commit(staged, digest) == len(data)

    assert synced == [str(store.path(digest).parent)]
    assert store.path(digest).read_bytes() == data
    assert not store.paths.staging(second_id).exists()
