"""The content-addressed blob store: staging, commit and what gets synced."""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blobs import directories
from engine.blobs import store as store_module
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


def _needs_direct_io(path: Path) -> None:
    if not store_module.accepts_direct_io(path):
        pytest.skip("the file system does not take O_DIRECT")


_LARGE = store_module.PARALLEL_WRITE_BYTES
_WRITE_SIZES = [
    1,
    4095,
    4096,
    4097,
    _LARGE - 1,
    _LARGE,
    _LARGE + 4097,
    store_module.DIRECT_BUFFER_BYTES + 12_345,
    2 * store_module.DIRECT_BUFFER_BYTES,
]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(_WRITE_SIZES), min_size=1, max_size=5),
    reopen=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_direct_writes_keep_every_byte(sizes: list[int], reopen: list[bool]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = BlobStore(Path(directory))
        _needs_direct_io(store.paths.staging_dir)
        assert store.direct_io
        upload_id = str(uuid.uuid4())
        staged = store.stage(upload_id)
        expected = bytearray()
        wrote_direct = False
        for size, close_after in zip(sizes, reopen, strict=False):
            data = os.urandom(size)
            staged.write(data)
            expected += data
            wrote_direct = wrote_direct or staged.wrote_direct
            if close_after:
                # A later chunk of the upload opens the file again at its
                # offset, which need not be block-aligned.
                staged.close()
                staged = store.stage(upload_id, len(expected))

        staged.flush()
        assert store.paths.staging(upload_id).read_bytes() == expected
        wrote_direct = wrote_direct or staged.wrote_direct
        assert wrote_direct == any(size >= _LARGE for size in sizes)
        digest = Digest.of(bytes(expected))
        assert store.commit(staged, digest) == len(expected)
        assert store.path(digest).read_bytes() == expected


def test_rejected_direct_write_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    _needs_direct_io(store.paths.staging_dir)
    # Two-byte alignment makes the kernel reject the O_DIRECT write with
    # EINVAL, as a device with larger blocks than DIRECT_ALIGNMENT would.
    monkeypatch.setattr(store_module, "DIRECT_ALIGNMENT", 2)
    data = os.urandom(_LARGE + 2)
    upload_id = str(uuid.uuid4())
    staged = store.stage(upload_id)

    with structlog.testing.capture_logs() as logs:
        staged.write(data)
        staged.write(data)

    if staged.wrote_direct:
        pytest.skip("the file system took an O_DIRECT write of 2-byte alignment")
    assert [entry["event"] for entry in logs] == ["direct_io_rejected"]
    assert store.paths.staging(upload_id).read_bytes() == data + data
    digest = Digest.of(data + data)
    assert store.commit(staged, digest) == 2 * len(data)
    assert store.path(digest).read_bytes() == data + data


def _cached_bytes(path: Path) -> int:
    fincore = shutil.which("fincore")
    if fincore is None:
        pytest.skip("fincore (util-linux) is not installed")
    output = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(output.strip())


def test_direct_blob_read_into_cache(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    _needs_direct_io(store.paths.staging_dir)
    data = os.urandom(4 * store_module.DIRECT_BUFFER_BYTES)
    upload_id, staged, digest = _stage(store, data)
    assert staged.wrote_direct
    # O_DIRECT writes leave the blocks they wrote out of the page cache.
    assert _cached_bytes(store.paths.staging(upload_id)) < len(data)

    store.commit(staged, digest)
    store_module.WARMER.join()

    assert _cached_bytes(store.path(digest)) == len(data)


def test_page_cache_warmer_runs_at_low_priority(tmp_path: Path) -> None:
    warmer = store_module.PageCacheWarmer()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 10)
    warmer.submit(blob)
    warmer.join()

    threads = [t for t in threading.enumerate() if t.name == "cairn-blob-warm"]
    niceness = {
        os.getpriority(os.PRIO_PROCESS, t.native_id)
        for t in threads
        if t.native_id is not None
    }
    assert store_module.WARM_NICE in niceness


def test_page_cache_warmer_survives_removed_blob(tmp_path: Path) -> None:
    warmer = store_module.PageCacheWarmer()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 10)
    warmer.submit(tmp_path / "collected")
    warmer.submit(blob)

    # join returns once the thread has read both, which it cannot do if the
    # missing file ended it.
    joiner = threading.Thread(target=warmer.join, daemon=True)
    joiner.start()
    joiner.join(30)
    assert not joiner.is_alive()


def _open_modes(path: Path) -> list[int]:
    """Return the access mode (os.O_RDONLY, os.O_WRONLY or os.O_RDWR) of each
    descriptor of this process that is open on ``path``."""
    modes = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            with open(f"/proc/self/fdinfo/{name}") as info:
                fields = dict(line.split(":", 1) for line in info if ":" in line)
        except FileNotFoundError:
            continue
        if target == str(path):
            modes.append(int(fields["flags"], 8) & os.O_ACCMODE)
    return modes


@pytest.mark.parametrize("existing", [False, True])
def test_staging_lock_opens_for_writing(tmp_path: Path, existing: bool) -> None:
    # Linux's NFS client emulates flock with an fcntl byte-range lock,
    # and an exclusive one needs a file open for writing (flock(2), NOTES).
    store = BlobStore(tmp_path)
    upload_id = str(uuid.uuid4())
    path = store.paths.staging(upload_id)
    if existing:
        path.write_bytes(b"staged")

    with store.lock_staging(upload_id) as lock:
        modes = _open_modes(path)

    assert lock.created is not existing
    assert modes == [os.O_RDWR]
    assert _open_modes(path) == []


def test_staging_path_only_for_upload_ids(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    upload_id = str(uuid.uuid4())
    assert store.paths.staging(upload_id) == tmp_path / "uploads" / upload_id

    for spelling in (
        upload_id.upper(),
        "{" + upload_id + "}",
        "urn:uuid:" + upload_id,
        upload_id.replace("-", ""),
        "../" + upload_id,
    ):
        with pytest.raises(ValueError, match="invalid upload id"):
            store.paths.staging(spelling)


class _RecordingBuffers(store_module._AlignedBuffers):
    """An aligned buffer pool that records the id of each buffer acquired
    and released."""

    def __init__(self) -> None:
        super().__init__()
        self.acquired: list[int] = []
        self.released: list[int] = []

    def acquire(self) -> mmap.mmap:
        buffer = super().acquire()
        self.acquired.append(id(buffer))
        return buffer

    def release(self, buffer: mmap.mmap) -> None:
        self.released.append(id(buffer))
        super().release(buffer)


def test_chunks_of_an_upload_reuse_one_aligned_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each PATCH of a chunked upload releases its aligned buffer and the next
    # one takes it again, so the pages of a new mapping are touched once.
    store = BlobStore(tmp_path)
    _needs_direct_io(store.paths.staging_dir)
    buffers = _RecordingBuffers()
    monkeypatch.setattr(store_module, "_DIRECT_BUFFERS", buffers)
    staged = store.stage(str(uuid.uuid4()))
    data = b""
    for _ in range(3):
        chunk = os.urandom(2 * store_module.DIRECT_BUFFER_BYTES)
        staged.write(chunk)
        staged.release_direct_io()
        data += chunk

    assert store.commit(staged, Digest.of(data)) == len(data)
    assert len(buffers.acquired) == 3
    assert len(set(buffers.acquired)) == 1
    assert store.path(Digest.of(data)).read_bytes() == data


def test_aligned_buffers_kept_between_uploads_are_bounded() -> None:
    buffers = store_module._AlignedBuffers()
    first = [buffers.acquire() for _ in range(store_module.IDLE_DIRECT_BUFFERS + 3)]
    for buffer in first:
        buffers.release(buffer)

    again = [buffers.acquire() for _ in range(store_module.IDLE_DIRECT_BUFFERS + 1)]

    first_ids = {id(buffer) for buffer in first}
    reused = sum(id(buffer) in first_ids for buffer in again)
    assert reused == store_module.IDLE_DIRECT_BUFFERS
    assert all(len(buffer) == store_module.DIRECT_BUFFER_BYTES for buffer in again)


def test_closed_upload_keeps_buffer_from_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The purge of an expired upload closes its staged blob from another
    # thread, maybe while a write still copies into the aligned buffer. A
    # close therefore never hands the buffer to another upload.
    store = BlobStore(tmp_path)
    _needs_direct_io(store.paths.staging_dir)
    buffers = _RecordingBuffers()
    monkeypatch.setattr(store_module, "_DIRECT_BUFFERS", buffers)
    staged = store.stage(str(uuid.uuid4()))
    staged.write(os.urandom(2 * store_module.DIRECT_BUFFER_BYTES))
    staged.close()

    assert len(buffers.acquired) == 1
    assert buffers.released == []
