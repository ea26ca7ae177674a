"""The embedded nats-server that the Bus starts when no NATS URL is given."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from engine.bus import Bus, BusSettings, EmbeddedNatsError, NatsServerNotFound
from engine.bus.embedded import (
    MAX_PAYLOAD,
    StoreInUse,
    StoreLock,
    find_nats_server,
)
from engine.bus.subjects import event_subject
from engine.registry import Registry
from tests.images import make_image
from tests.nats import (
    BusThread,
    assert_stream_matches_log,
    checkpoint_of,
    push_image,
    run,
    stream_messages,
    wait_until,
)
from tests.server import (
    ServeProcess,
    log_records,
    start_serve,
    wait_for_log_record,
)
from tests.server import push_image as push_image_over_http

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
        assert run(_max_payload(url)) == MAX_PAYLOAD
    wait_until(lambda: not pid_alive(pid))


async def _max_payload(url: str) -> int:
    client = await nats.connect(url)
    try:
        return int(client.max_payload)
    finally:
        await client.close()


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


def test_port_in_use_is_a_clear_error(registry: Registry, data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bus = Bus(BusSettings(embedded_port=port), registry.database, data_dir)

        with pytest.raises(EmbeddedNatsError) as caught:
            run(bus.start())

    message = str(caught.value)
    assert "nats-server exited with code" in message
    assert "address already in use" in message
    assert "(no output)" not in message


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


@sqlite_only
def test_second_embedded_server_rejected(registry: Registry, data_dir: Path) -> None:
    settings = BusSettings(poll_interval=0.2)
    first = Bus(settings, registry.database, data_dir)
    with BusThread(first):
        url = first.nats_url
        assert url is not None
        config = (data_dir / "nats" / "nats-server.conf").read_text()

        second = Bus(settings, registry.database, data_dir)
        with pytest.raises(StoreInUse) as raised:
            run(second.start())

        message = str(raised.value)
        assert isinstance(raised.value, EmbeddedNatsError)
        assert f"{data_dir / 'nats'} is in use" in message
        assert f"PID {os.getpid()}" in message
        assert f"--nats {url}" in message
        assert "--no-nats" in message
        assert second.embedded_server_pid is None
        assert (data_dir / "nats" / "nats-server.conf").read_text() == config

        pid = first.embedded_server_pid
        assert pid is not None
        assert pid_alive(pid)
        push_image(registry, "library/alpine", "latest")
        wait_until(lambda: checkpoint_of(registry) == 4)
        assert_stream_matches_log(url, registry)

    # Once the first server has stopped, the store is free again.
    third = Bus(settings, registry.database, data_dir)
    with BusThread(third):
        assert third.embedded_server_pid is not None


def process_state(pid: int) -> str:
    """Return the state letter from /proc/PID/stat, or "" once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rpartition(")")[2].split()[0]


@sqlite_only
def test_store_lock_outlives_cairn(registry: Registry, data_dir: Path) -> None:
    program = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_PROGRAM, registry.database.url, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert program.stdout is not None
    server_pid = int(program.stdout.readline())
    try:
        # A stopped nats-server keeps its parent-death SIGTERM pending, so
        # it outlives cairn until it is continued.
        os.kill(server_pid, signal.SIGSTOP)
        wait_until(lambda: process_state(server_pid) == "T")
        os.kill(program.pid, signal.SIGKILL)
        program.wait(10)

        with pytest.raises(StoreInUse) as raised:
            StoreLock(data_dir / "nats").acquire()
        assert raised.value.holder_alive is False
        assert f"nats-server PID {server_pid}" in str(raised.value)
        assert f"cairn process (PID {program.pid})" in str(raised.value)

        # The next start waits for the orphaned server to exit.
        os.kill(server_pid, signal.SIGCONT)
        bus = Bus(BusSettings(poll_interval=0.2), registry.database, data_dir)
        with BusThread(bus):
            assert bus.embedded_server_pid is not None
            # Exited, though its parent may not have reaped it yet.
            assert process_state(server_pid) in ("", "Z")
    finally:
        if program.poll() is None:
            os.kill(program.pid, signal.SIGKILL)
            program.wait(10)
        if pid_alive(server_pid):
            os.kill(server_pid, signal.SIGCONT)


def bus_health(served: ServeProcess) -> dict[str, Any]:
    response = httpx.get(f"{served.url}/_cairn/health", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    bus: dict[str, Any] = response.json()["bus"]
    return bus


def kill_and_hold_port(log_path: Path, port: int) -> tuple[int, socket.socket]:
    """Kill the embedded nats-server and listen on its port in its place.

    Returns the killed PID and the listening socket. cairn restarts the
    server within a fraction of a second, so when the restart takes the port
    first, the restarted server is killed in turn.
    """
    for _ in range(5):
        pid = log_records(log_path, "nats_server_started")[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The killed server's connections leave the port in TIME_WAIT.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                holder.bind(("127.0.0.1", port))
            except OSError:
                if log_records(log_path, "nats_server_started")[-1]["pid"] != pid:
                    break  # the restarted server has the port
                time.sleep(0.005)
                continue
            holder.listen()
            return pid, holder
        holder.close()
        wait_until(lambda killed=pid: not pid_alive(killed))
    raise AssertionError(f"could not listen on port {port} in nats-server's place")


@sqlite_only
def test_embedded_server_restarted_after_kill(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    served = start_serve(data_dir, database_url, log_path, embedded_nats=True)
    try:
        first = wait_for_log_record(log_path, "nats_server_started")
        url = first["url"]
        port = int(url.rpartition(":")[2])
        wait_until(lambda: bus_health(served)["state"] == "caught_up")

        # While the test listens on the port, every restart fails.
        killed, holder = kill_and_hold_port(log_path, port)
        try:
            exited = wait_for_log_record(log_path, "nats_server_exited", pid=killed)
            assert exited["level"] == "error"
            assert exited["signal"] == "SIGKILL"
            assert exited["log_path"] == str(data_dir / "nats" / "nats-server.log")
            wait_for_log_record(log_path, "nats_server_restart_failed")

            down = bus_health(served)
            assert down["state"] == "connecting"
            assert down["last_error"] is not None
            assert "nats-server" in down["last_error"]

            with httpx.Client(base_url=served.url, timeout=30) as client:
                push_image_over_http(client, "library/app", make_image(), "v1")
        finally:
            holder.close()

        def restarted() -> dict[str, Any] | None:
            records = log_records(log_path, "nats_server_started")
            return records[-1] if records[-1]["pid"] != killed else None

        restart = wait_until(restarted)
        assert restart["url"] == url
        assert pid_alive(restart["pid"])
        wait_until(lambda: bus_health(served)["state"] == "caught_up")
        assert bus_health(served)["last_error"] is None

        subjects = [message.subject for message in stream_messages(url)]
        pushed = event_subject("cairn", "manifest.pushed", "library/app")
        assert pushed in subjects
        assert served.stop() == 0
    finally:
        served.kill()
