"""The embedded nats-server that the Bus starts when no NATS URL is given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bus import Bus, BusSettings, NatsServerNotFound
from engine.bus.embedded import find_nats_server
from engine.registry import Registry
from tests.nats import (
    BusThread,
    assert_stream_matches_log,
    checkpoint_of,
    push_image,
    run,
    wait_until,
)

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_binary_from_package() -> None:
    binary = find_nats_server()
    assert binary.name == "nats-server"
    assert binary.is_file()
    assert not str(binary).startswith("/usr/")


@sqlite_only
def test_embedded_server_lifecycle(registry: Registry, data_dir: Path) -> None:
    bus = Bus(BusSettings(poll_interval=0.2), registry.database, data_dir)
    with BusThread(bus) as thread:
        url = bus.nats_url
        assert url is not None
        assert url.startswith("nats://127.0.0.1:")
        pid = bus.embedded_server_pid
        assert pid is not None
        assert pid_alive(pid)
        assert (data_dir / "nats" / "jetstream").is_dir()

        push_image(registry, "library/alpine", "latest")
        wait_until(lambda: checkpoint_of(registry) == 4)
        health = thread.health()
        assert health["embedded"] is True
        assert health["nats_url"] == url
        assert_stream_matches_log(url, registry)
    wait_until(lambda: not pid_alive(pid))


@sqlite_only
def test_embedded_server_keeps_stream_across_restarts(
    registry: Registry, data_dir: Path
) -> None:
    settings = BusSettings(poll_interval=0.2)
    with BusThread(Bus(settings, registry.database, data_dir)):
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus) as thread:
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: thread.health()["checkpoint"] == 8)
        url = bus.nats_url
        assert url is not None
        assert_stream_matches_log(url, registry)


@sqlite_only
def test_missing_binary_is_a_clear_error(registry: Registry, data_dir: Path) -> None:
    settings = BusSettings(nats_server_binary=data_dir / "no-such-nats-server")
    bus = Bus(settings, registry.database, data_dir)
    with pytest.raises(NatsServerNotFound, match="nats-server binary not found"):
        run(bus.start())


# Starts a Bus with an embedded server, prints the server's PID, then waits
# to be killed.
EMBEDDED_PROGRAM = """
import asyncio, sys
from pathlib import Path

from engine.bus import Bus, BusSettings
from engine.db import Database
from engine.logs import configure_logging

configure_logging("warning", json=True)

async def main():
    bus = Bus(BusSettings(), Database(sys.argv[1]), Path(sys.argv[2]))
    await bus.start()
    print(bus.embedded_server_pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@sqlite_only
def test_embedded_server_dies_with_cairn(registry: Registry, data_dir: Path) -> None:
    program = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_PROGRAM, registry.database.url, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert program.stdout is not None
        server_pid = int(program.stdout.readline())
        assert pid_alive(server_pid)
    finally:
        os.kill(program.pid, signal.SIGKILL)
        program.wait(10)
    wait_until(lambda: not pid_alive(server_pid))
