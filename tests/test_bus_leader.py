"""One active relay per database: election, standby, and take-over."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine.bus import Bus
from engine.bus.leader import FileLeadership, PostgresLeadership
from engine.registry import Registry
from tests.nats import (
    BusThread,
    NatsServer,
    RelayProcess,
    assert_stream_matches_log,
    checkpoint_of,
    fast_settings,
    push_image,
    wait_until,
)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_failover(
    registry: Registry, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = {
        "database_url": registry.database.url,
        "nats_url": nats_server.url,
        "batch_size": 3,
    }
    relays = [
        RelayProcess(
            {**config, "data_dir": str(tmp_path / f"data{n}")},
            tmp_path / f"relay{n}.log",
        )
        for n in (1, 2)
    ]
    try:
        wait_until(lambda: any(r.logged("relay_leader_elected") for r in relays))
        wait_until(lambda: any(r.logged("relay_standby") for r in relays))
        leader = next(r for r in relays if r.logged("relay_leader_elected"))
        standby = next(r for r in relays if r is not leader)
        assert not standby.logged("relay_leader_elected")

        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)

        # Kill the leader while pushes keep coming in from another thread.
        pushing = threading.Thread(
            target=lambda: [
                push_image(registry, "library/busybox", f"v{n}") for n in range(4)
            ]
        )
        pushing.start()
        leader.kill()
        pushing.join(60)

        wait_until(lambda: standby.logged("relay_leader_elected"))
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: checkpoint_of(registry) == 24)
    finally:
        for relay in relays:
            relay.stop()
    assert_stream_matches_log(nats_server.url, registry)


def test_postgres_advisory_lock_is_exclusive(postgres_url: str) -> None:
    from engine.db import normalise_url

    url = normalise_url(postgres_url)
    first = PostgresLeadership(url, "lock-test")
    second = PostgresLeadership(url, "lock-test")
    other = PostgresLeadership(url, "another-stream")
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        assert other.try_acquire()
        assert first.check()
        first.release()
        assert second.try_acquire()
        assert not first.try_acquire()
    finally:
        for leadership in (first, second, other):
            leadership.release()


def test_file_lock_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "relay.lock"
    first = FileLeadership(path)
    second = FileLeadership(path)
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        first.release()
        assert second.try_acquire()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def test_file_lock_lost_when_file_deleted(tmp_path: Path) -> None:
    path = tmp_path / "relay.lock"
    first = FileLeadership(path)
    second = FileLeadership(path)
    try:
        assert first.try_acquire()
        assert first.check()
        path.unlink()
        assert not first.check()
        # A new relay locks a new file at the same path.
        assert second.try_acquire()
        assert second.check()
        first.release()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def test_file_lock_lost_when_file_replaced(tmp_path: Path) -> None:
    path = tmp_path / "relay.lock"
    leadership = FileLeadership(path)
    try:
        assert leadership.try_acquire()
        replacement = tmp_path / "replacement"
        replacement.write_text("")
        replacement.replace(path)
        assert not leadership.check()
    finally:
        leadership.release()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_lock_file_deleted(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    settings = fast_settings(nats_server.url)
    first = BusThread(Bus(settings, registry.database, data_dir))
    with first:
        wait_until(lambda: first.health()["leader"])
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)

        (lock_file,) = data_dir.parent.glob("*.relay-*.lock")
        lock_file.unlink()
        second = BusThread(Bus(settings, registry.database, data_dir))
        with second:
            wait_until(lambda: second.health()["leader"])
            wait_until(lambda: not first.health()["leader"])
            push_image(registry, "library/alpine", "2")
            wait_until(lambda: checkpoint_of(registry) == 8)
            assert second.health()["leader"]
            assert not first.health()["leader"]
    assert_stream_matches_log(nats_server.url, registry)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_one_relay_takes_over(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    settings = fast_settings(nats_server.url)
    first = BusThread(Bus(settings, registry.database, data_dir))
    second = BusThread(Bus(settings, registry.database, data_dir))
    with first, second:
        wait_until(lambda: first.health()["leader"] or second.health()["leader"])
        leader, standby = (
            (first, second) if first.health()["leader"] else (second, first)
        )
        assert not standby.health()["leader"]

        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)

        leader.stop()
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: standby.health()["leader"])
        wait_until(lambda: checkpoint_of(registry) == 8)
    assert_stream_matches_log(nats_server.url, registry)
