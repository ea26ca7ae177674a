"""Which commits wait for the disk, and which state a read transaction reads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.domain.digest import Digest
from engine.registry import Registry
from tests.images import make_image


@pytest.fixture
def wal_syncs(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], int]]:
    """Count the fdatasync calls that reach the SQLite write-ahead log."""
    if not registry.database.is_sqlite:
        pytest.skip("the write-ahead log is SQLite's")
    wal = Path(sa.make_url(registry.database.url).database or "").name + "-wal"
    real = os.fdatasync
    calls: list[str] = []

    def spy(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    yield lambda: sum(1 for path in calls if path.endswith(wal))


def test_sqlite_synchronous_is_normal(
    registry: Registry,
) -> None:
    if not registry.database.is_sqlite:
        pytest.skip("a SQLite setting")
    with registry.database.write() as conn:
        # 1 is NORMAL: SQLite syncs only at checkpoints.
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1


def test_upload_session_skips_log_sync(
    registry: Registry, wal_syncs: Callable[[], int]
) -> None:
    blobs = registry.repository("app").blobs
    status = blobs.create_upload()
    blobs.write_upload(status.id, [b"first half "])
    assert wal_syncs() == 0

    info = blobs.commit_upload(status.id, Digest.of(b"first half second"), [b"second"])
    assert info.size == len(b"first half second")
    assert wal_syncs() == 1


def test_cancelled_upload_skips_log_sync(
    registry: Registry, wal_syncs: Callable[[], int]
) -> None:
    blobs = registry.repository("app").blobs
    status = blobs.create_upload()
    blobs.cancel_upload(status.id)
    assert wal_syncs() == 0


def test_event_commits_sync_log(
    registry: Registry, wal_syncs: Callable[[], int]
) -> None:
    repository = registry.repository("app")
    image = make_image(layer_count=1)
    for blob in image.blobs:
        repository.blobs.push(Digest.of(blob), [blob])
    repository.manifests.put(image.manifest, image.media_type, tag="v1")
    repository.tags.untag("v1")
    assert wal_syncs() == len(image.blobs) + 2


def test_postgresql_bookkeeping_commits_async(registry: Registry) -> None:
    if registry.database.is_sqlite:
        pytest.skip("a PostgreSQL setting")
    show = "SHOW synchronous_commit"
    with registry.database.transaction(durable=False) as conn:
        assert conn.exec_driver_sql(show).scalar() == "off"
    with registry.database.transaction() as conn:
        assert conn.exec_driver_sql(show).scalar() == "on"
    with registry.database.write() as conn:
        assert conn.exec_driver_sql(show).scalar() == "on"


def test_read_sees_one_state(registry: Registry) -> None:
    repository = registry.repository("app")
    repository.blobs.push(Digest.of(b"first"), [b"first"])
    head = sa.text("SELECT position FROM log_head WHERE id = 1")
    with registry.database.read() as conn:
        before = conn.execute(head).scalar_one()
        # Another writer commits while the read is open.
        repository.blobs.push(Digest.of(b"second"), [b"second"])
        assert conn.execute(head).scalar_one() == before
    with registry.database.read() as conn:
        assert conn.execute(head).scalar_one() == before + 1


def test_postgresql_reads_are_read_only(registry: Registry) -> None:
    if registry.database.is_sqlite:
        pytest.skip("a PostgreSQL setting")
    with (
        pytest.raises(sa.exc.InternalError, match="read-only transaction"),
        registry.database.read() as conn,
    ):
        conn.execute(sa.text("UPDATE log_head SET position = position"))
