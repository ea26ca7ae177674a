"""Reads that overlap a projection rebuild see the old state or the new one,
never tables that the rebuild has emptied."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from engine.projections.rebuild import rebuild_projections
from engine.registry import Registry
from engine.tables import manifests, tags
from tests.images import make_image
from tests.test_registry import push_image

pytestmark = pytest.mark.timeout(120)


def _rebuild_waits_for_lock(registry: Registry) -> bool:
    """Return True once some session of this database waits for a lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with registry.database.engine.connect() as conn:
        return bool(conn.exec_driver_sql(query).scalar())


def test_read_during_rebuild_sees_rows(registry: Registry) -> None:
    if registry.database.is_sqlite:
        pytest.skip("only PostgreSQL's rebuild empties tables with TRUNCATE")
    push_image(registry.repository("team/app"), make_image(), tag="v1")
    errors: list[BaseException] = []

    def rebuild() -> None:
        try:
            rebuild_projections(registry.database)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=rebuild)
    with registry.database.read() as conn:
        # The first query takes the read's snapshot, before the rebuild.
        assert conn.execute(sa.select(sa.func.count()).select_from(tags)).scalar() == 1
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and not _rebuild_waits_for_lock(registry):
            assert time.monotonic() < deadline, "the rebuild neither ran nor waited"
            time.sleep(0.01)
        # Had the rebuild truncated and committed meanwhile, this snapshot
        # would find manifests empty.
        count = conn.execute(sa.select(sa.func.count()).select_from(manifests))
        assert count.scalar() == 1
    thread.join(60)
    assert not thread.is_alive()
    assert errors == []
    with registry.database.read() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(manifests)).scalar()
            == 1
        )
