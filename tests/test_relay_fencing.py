"""A relay that lost its leader lock without noticing cannot write its
checkpoint over a reset or over the next leader's claim.

The stale relay is a Bus whose poll interval is an hour, so it does not
check its lock during the test. Its checkpoint interval is an hour too, so
after its first checkpoint write the positions it acknowledges stay in
memory until the test makes it save them. Its lock is broken for real. On
PostgreSQL the test ends the lock's session with pg_terminate_backend, and
on SQLite it deletes the lock file, after which a lock on a new file
succeeds. Both tests run against real nats-servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from engine.bus import Bus, BusSettings
from engine.bus import checkpoint as store
from engine.bus.leader import FileLeadership, PostgresLeadership, leadership_for
from engine.bus.relay import Relay
from engine.bus.reset import reset_checkpoint
from engine.db import Database
from engine.registry import Registry
from tests.nats import (
    BusThread,
    NatsServer,
    assert_stream_matches_log,
    checkpoint_of,
    fast_settings,
    push_image,
    wait_until,
)

RELAY = "CAIRN"


def stale_settings(url: str) -> BusSettings:
    return fast_settings(url, poll_interval=3600.0, checkpoint_interval=3600.0)


def relay_of(thread: BusThread) -> Relay:
    relay = thread.bus._relay
    assert relay is not None
    return relay


def generation_of(registry: Registry) -> int | None:
    with registry.database.read() as conn:
        return store.read_generation(conn, RELAY)


def lock_sessions(database: Database) -> list[int]:
    """Return the PIDs of this database's backends opened for the relay's lock."""
    query = sa.text(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = :name"
    )
    with database.read() as conn:
        return list(conn.execute(query, {"name": f"cairn relay {RELAY}"}).scalars())


def break_lock(database: Database, data_dir: Path) -> None:
    """End the leader's hold on the relay's lock without telling the leader."""
    if database.is_sqlite:
        leadership = leadership_for(database, data_dir, RELAY)
        assert isinstance(leadership, FileLeadership)
        leadership.path.unlink()
        return

    [pid] = lock_sessions(database)
    with database.engine.begin() as conn:
        terminated = conn.execute(
            sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
        ).scalar_one()
    assert terminated is True
    wait_until(lambda: pid not in lock_sessions(database))

    # The server frees the lock as the session ends, so wait until it has.
    probe = PostgresLeadership(database.url, RELAY)
    try:
        wait_until(probe.try_acquire)
    finally:
        probe.release()


def fenced_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == "relay_checkpoint_fenced"]


def test_reset_survives_stale_relay_write(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    database = registry.database
    push_image(registry, "library/alpine", "1")
    with BusThread(Bus(stale_settings(nats_server.url), database, data_dir)) as stale:
        wait_until(lambda: checkpoint_of(registry) == 4)
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: stale.health()["checkpoint"] == 8)
        assert checkpoint_of(registry) == 4
        claimed = generation_of(registry)
        assert claimed is not None

        break_lock(database, data_dir)
        reset = reset_checkpoint(database, data_dir, RELAY, 1)
        assert reset.previous == 4
        assert reset.generation == claimed + 1

        # The next leader's lock, which keeps the stale relay in standby.
        next_leader = leadership_for(database, data_dir, RELAY)
        assert next_leader.try_acquire()
        try:
            with structlog.testing.capture_logs() as logs:
                relay_of(stale).save_checkpoint()

            assert checkpoint_of(registry) == 0
            assert generation_of(registry) == reset.generation
            [fenced] = fenced_lines(logs)
            assert fenced["relay"] == RELAY
            assert fenced["generation"] == claimed
            assert fenced["row_generation"] == reset.generation
            assert fenced["position"] == 8
            wait_until(lambda: not stale.health()["leader"])
        finally:
            next_leader.release()

        # Elected again, the relay claims a new generation, reads the reset
        # checkpoint and resumes after the stream's last event.
        wait_until(lambda: stale.health()["leader"])
        push_image(registry, "library/alpine", "3")
        wait_until(lambda: stale.health()["checkpoint"] == 12)

    assert checkpoint_of(registry) == 12
    assert generation_of(registry) == reset.generation + 1
    assert_stream_matches_log(nats_server.url, registry)


def test_new_leader_fences_stale_relay(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    database = registry.database
    # The new leader's NATS server is down, so the new leader claims the
    # checkpoint at position 4 and stays there.
    down = NatsServer(tmp_path / "down-nats-server")
    down.start()
    down.stop()
    push_image(registry, "library/alpine", "1")
    with BusThread(Bus(stale_settings(nats_server.url), database, data_dir)) as stale:
        wait_until(lambda: checkpoint_of(registry) == 4)
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: stale.health()["checkpoint"] == 8)
        claimed = generation_of(registry)
        assert claimed is not None

        break_lock(database, data_dir)
        with BusThread(Bus(fast_settings(down.url), database, data_dir)) as leader:
            wait_until(lambda: leader.health()["leader"])
            assert generation_of(registry) == claimed + 1

            with structlog.testing.capture_logs() as logs:
                relay_of(stale).save_checkpoint()

            assert checkpoint_of(registry) == 4
            assert generation_of(registry) == claimed + 1
            [fenced] = fenced_lines(logs)
            assert fenced["generation"] == claimed
            assert fenced["row_generation"] == claimed + 1
            wait_until(lambda: not stale.health()["leader"])
            health = leader.health()
            assert health["leader"] is True
            assert health["checkpoint"] == 4

        # The new leader stopped, so the stale relay is elected again.
        wait_until(lambda: stale.health()["leader"])
        wait_until(lambda: stale.health()["state"] == "caught_up")
        assert stale.health()["checkpoint"] == 8

    assert checkpoint_of(registry) == 8
    assert generation_of(registry) == claimed + 2
    assert_stream_matches_log(nats_server.url, registry)
