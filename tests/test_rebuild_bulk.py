"""The bulk path of a projection rebuild: paging through the log, dropping and
recreating indexes, atomicity under failure and SIGKILL, and PostgreSQL
session settings."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from engine import log as event_log
from engine.db import Database
from engine.domain.digest import Digest
from engine.domain.events import Actor, EventType, NewEvent
from engine.projections import ALL_PROJECTIONS, apply_events, rebuild
from engine.projections.rebuild import (
    ReplayError,
    rebuild_projections,
    snapshot_projections,
)
from engine.registry import Registry
from engine.verify import verify
from tests.images import make_artifact, make_image
from tests.test_registry import push_image


def fill(registry: Registry) -> None:
    """Push, retag, untag, mount and delete, so that every projection has rows
    and some rows are replaced or removed."""
    images = [make_image(seed=bytes([i])) for i in range(3)]
    app = registry.repository("team/app")
    for i, image in enumerate(images):
        push_image(app, image, tag=f"v{i}")
    push_image(app, make_artifact(images[0], "application/vnd.example.sig", b"s"))
    app.tags.tag("v0", images[1].digest)
    app.tags.untag("v2")
    app.manifests.delete(images[2].digest)
    app.blobs.delete(Digest.of(images[2].layers[0]))
    registry.repository("other").blobs.mount(Digest.of(images[0].layers[0]), "team/app")


def snapshot(registry: Registry) -> dict[str, list[tuple[Any, ...]]]:
    with registry.database.read() as conn:
        return snapshot_projections(conn)


def index_definitions(database: Database) -> list[tuple[str, str | None]]:
    """Every index of the database with its definition (None for SQLite's
    automatic indexes of primary keys and unique constraints)."""
    if database.is_sqlite:
        query = "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
    else:
        query = (
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema()"
        )
    with database.read() as conn:
        return sorted(tuple(row) for row in conn.execute(sa.text(query)))


def test_rebuild_in_small_pages_equals_live(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(registry)
    live = snapshot(registry)
    # Pages of two events split each push across pages. PostgreSQL's fetches
    # of five rows end in the middle of a page.
    monkeypatch.setattr(rebuild, "REPLAY_PAGE_SIZE", 2)
    monkeypatch.setattr(rebuild, "POSTGRESQL_FETCH_SIZE", 5)
    position = rebuild_projections(registry.database)
    assert snapshot(registry) == live
    assert position == len(event_types(registry))
    assert verify(registry) == []


def event_types(registry: Registry) -> list[str]:
    with registry.database.read() as conn:
        return [str(event.type) for event in event_log.read_all(conn)]


def test_rebuild_keeps_index_definitions(registry: Registry) -> None:
    fill(registry)
    before = index_definitions(registry.database)
    phases: dict[str, float] = {}
    rebuild_projections(registry.database, phases=phases)
    assert index_definitions(registry.database) == before
    assert set(phases) == set(rebuild.PHASES)
    assert all(seconds >= 0 for seconds in phases.values())


def test_failed_rebuild_keeps_old_projections(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(registry)
    live = snapshot(registry)
    indexes = index_definitions(registry.database)
    written: list[str] = []
    original = rebuild._BulkWriter.write

    def write_then_fail(self: Any, rows: Any, *args: Any) -> None:
        original(self, rows, *args)
        written.append(rows.table.name)
        if len(written) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(rebuild._BulkWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        rebuild_projections(registry.database)

    assert len(written) == 3
    assert snapshot(registry) == live
    assert index_definitions(registry.database) == indexes
    assert gc.isenabled()
    monkeypatch.undo()
    assert verify(registry) == []


def test_failed_index_creation_keeps_old_projections(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement that fails in the helper thread fails the rebuild."""
    fill(registry)
    live = snapshot(registry)
    indexes = index_definitions(registry.database)
    original = rebuild._secondary_indexes

    def with_broken_index(conn: Any, tables: Any) -> Any:
        # The index is dropped as usual, and creating it again fails.
        found = original(conn, tables)
        name, _definition = found["tags"][0]
        found["tags"][0] = (name, "CREATE INDEX ix_broken ON no_such_table (x)")
        return found

    monkeypatch.setattr(rebuild, "_secondary_indexes", with_broken_index)
    driver_error = registry.database.engine.dialect.loaded_dbapi.Error
    with pytest.raises(driver_error, match="no_such_table"):
        rebuild_projections(registry.database)

    assert snapshot(registry) == live
    assert index_definitions(registry.database) == indexes
    assert gc.isenabled()
    monkeypatch.undo()
    assert verify(registry) == []


def test_rebuild_restores_sqlite_cache_size(registry: Registry) -> None:
    if not registry.database.is_sqlite:
        pytest.skip("SQLite's page cache only")
    fill(registry)
    with registry.database.write() as conn:
        before = conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
    rebuild_projections(registry.database)
    with registry.database.write() as conn:
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == before


def test_rebuild_keeps_sqlite_json_text(registry: Registry) -> None:
    """The JSON columns hold the same text as live writes left, not only the
    same values."""
    if not registry.database.is_sqlite:
        pytest.skip("PostgreSQL stores jsonb parsed")
    fill(registry)
    query = (
        'SELECT repository, digest, "references" FROM manifests '
        "UNION ALL SELECT repository, digest, annotations FROM referrers "
        "ORDER BY 1, 2, 3"
    )
    with registry.database.read() as conn:
        live = conn.exec_driver_sql(query).all()
    rebuild_projections(registry.database)
    with registry.database.read() as conn:
        assert conn.exec_driver_sql(query).all() == live
    assert live


KILLED_REBUILDER = textwrap.dedent(
    """
    import sys, time
    from engine.db import Database
    from engine.projections import rebuild

    original = rebuild._BulkWriter.write
    written = []

    def write_then_stall(self, rows, *args):
        original(self, rows, *args)
        written.append(rows.table.name)
        if len(written) == 2:
            print("loading", flush=True)
            time.sleep(120)

    rebuild._BulkWriter.write = write_then_stall
    rebuild.rebuild_projections(Database(sys.argv[1]))
    """
)


def test_killed_rebuild_keeps_old_projections(registry: Registry) -> None:
    fill(registry)
    live = snapshot(registry)
    indexes = index_definitions(registry.database)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_REBUILDER, registry.database.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        # The child has deleted the old rows and written two tables when it
        # prints this, so the kill lands in the middle of the load.
        assert child.stdout.readline() == "loading\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        if child.stdout is not None:
            child.stdout.close()

    assert snapshot(registry) == live
    assert index_definitions(registry.database) == indexes
    assert verify(registry) == []
    rebuild_projections(registry.database)
    assert snapshot(registry) == live


def test_replay_error_names_bad_event(registry: Registry) -> None:
    fill(registry)
    live = snapshot(registry)
    with registry.database.write() as conn:
        # Appended without applying the projections, as a log written by a
        # faulty version could hold it: blob.pushed needs a size.
        (bad,) = event_log.append(
            conn,
            [NewEvent(EventType.BLOB_PUSHED, "team/app", {"digest": "sha256:00"})],
            actor=Actor("alice", "127.0.0.1"),
        )

    with pytest.raises(ReplayError) as raised:
        rebuild_projections(registry.database)
    assert raised.value.position == bad.position
    assert f"position {bad.position} (blob.pushed)" in str(raised.value)
    assert snapshot(registry) == live
    assert any(
        problem.startswith(f"projections: replay fails at position {bad.position}")
        for problem in verify(registry)
    )


def test_rebuild_under_other_postgresql_time_zone(
    registry: Registry,
) -> None:
    """Timestamps and activity hours survive a rebuild whose connections
    default to another time zone."""
    if registry.database.is_sqlite:
        pytest.skip("PostgreSQL session settings only")
    url = sa.make_url(registry.database.url).update_query_dict(
        {"options": "-c TimeZone=America/New_York"}
    )
    database = Database(url.render_as_string(hide_password=False))
    try:
        # Around midnight UTC, which is the previous evening in New York.
        start = datetime(2026, 3, 1, 23, 59, 59, 999_999, tzinfo=UTC)
        for i in range(3):
            digest = str(Digest.of(f"blob-{i}".encode()))
            with database.write() as conn:
                stored = event_log.append(
                    conn,
                    [
                        NewEvent(
                            EventType.BLOB_PUSHED,
                            "zone",
                            {"digest": digest, "size": 10 + i},
                        )
                    ],
                    actor=Actor("alice", "127.0.0.1"),
                    now=start + timedelta(microseconds=i),
                )
                apply_events(conn, ALL_PROJECTIONS, stored)
        live = snapshot(registry)
        rebuild_projections(database)
        assert snapshot(registry) == live
        with database.read() as conn:
            hours = conn.execute(
                sa.text("SELECT hour, events FROM activity ORDER BY hour")
            ).all()
        first_hour = int(start.timestamp()) // 3600
        assert [tuple(row) for row in hours] == [(first_hour, 1), (first_hour + 1, 2)]
    finally:
        database.dispose()
