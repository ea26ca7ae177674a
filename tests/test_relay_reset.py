"""`cairn events republish` against real nats-servers, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from engine.bus import Bus
from engine.bus.messages import POSITION
from engine.registry import Registry
from tests.nats import (
    BusThread,
    NatsServer,
    assert_stream_matches_log,
    checkpoint_of,
    fast_settings,
    log_events,
    push_image,
    run,
    stream_messages,
    stream_size,
    wait_for_stream_size,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def second_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A second, empty nats-server, standing for a replaced NATS deployment."""
    server = NatsServer(tmp_path / "second-nats-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def republish(
    database_url: str, data_dir: Path, *argv: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "--log-format",
            "json",
            "events",
            "republish",
            "--data-dir",
            str(data_dir),
            "--database",
            database_url,
            *argv,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )


def publish_two_images(registry: Registry, url: str, data_dir: Path) -> None:
    """Publish eight events to the server at ``url``, then stop the relay."""
    with BusThread(Bus(fast_settings(url), registry.database, data_dir)):
        push_image(registry, "library/alpine", "1")
        push_image(registry, "library/busybox", "1")
        wait_until(lambda: checkpoint_of(registry) == 8)


def stream_positions(url: str) -> list[int]:
    return [int((m.headers or {})[POSITION]) for m in stream_messages(url)]


def purge(url: str) -> None:
    async def purge_stream() -> None:
        client = await nats.connect(url)
        try:
            await client.jetstream().purge_stream("CAIRN")
        finally:
            await client.close()

    run(purge_stream())


def test_republish_fills_new_server(
    registry: Registry,
    database_url: str,
    nats_server: NatsServer,
    second_server: NatsServer,
    data_dir: Path,
) -> None:
    publish_two_images(registry, nats_server.url, data_dir)

    result = republish(database_url, data_dir, "--from", "1")

    assert result.returncode == 0, result.stderr
    assert "set from 8 to 0" in result.stdout
    assert checkpoint_of(registry) == 0
    bus = Bus(fast_settings(second_server.url), registry.database, data_dir)
    with BusThread(bus):
        wait_for_stream_size(second_server.url, 8)
        push_image(registry, "library/alpine", "2")
        wait_for_stream_size(second_server.url, 12)
        wait_until(lambda: checkpoint_of(registry) == 12)
    assert_stream_matches_log(second_server.url, registry)


def test_new_server_without_republish_gets_new_events(
    registry: Registry,
    nats_server: NatsServer,
    second_server: NatsServer,
    data_dir: Path,
) -> None:
    """The case the command is for: the checkpoint alone skips the history."""
    publish_two_images(registry, nats_server.url, data_dir)

    bus = Bus(fast_settings(second_server.url), registry.database, data_dir)
    with BusThread(bus):
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: checkpoint_of(registry) == 12)

    assert stream_positions(second_server.url) == [9, 10, 11, 12]


def test_republish_from_middle(
    registry: Registry,
    database_url: str,
    nats_server: NatsServer,
    second_server: NatsServer,
    data_dir: Path,
) -> None:
    publish_two_images(registry, nats_server.url, data_dir)

    result = republish(database_url, data_dir, "--from", "5")

    assert result.returncode == 0, result.stderr
    assert checkpoint_of(registry) == 4
    bus = Bus(fast_settings(second_server.url), registry.database, data_dir)
    with BusThread(bus):
        wait_until(lambda: checkpoint_of(registry) == 8)
    assert stream_positions(second_server.url) == [5, 6, 7, 8]
    expected = {event.position: str(event.id) for event in log_events(registry)}
    for message in stream_messages(second_server.url):
        headers = message.headers or {}
        assert headers["Nats-Msg-Id"] == expected[int(headers[POSITION])]


def test_republish_rejected_while_relay_runs(
    registry: Registry, database_url: str, nats_server: NatsServer, data_dir: Path
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus) as thread:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)
        wait_until(lambda: thread.health()["leader"])

        result = republish(database_url, data_dir, "--from", "1")

        assert result.returncode == 1
        assert "the relay of stream CAIRN is running in" in result.stderr
        assert "stop every cairn serve that uses this database" in result.stderr
        assert "Traceback" not in result.stderr
        assert checkpoint_of(registry) == 4
        # The relay keeps its lock and goes on publishing.
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: checkpoint_of(registry) == 8)
        assert thread.health()["leader"] is True

    result = republish(database_url, data_dir, "--from", "1")
    assert result.returncode == 0, result.stderr
    assert checkpoint_of(registry) == 0


def test_republish_into_stream_with_events(
    registry: Registry, database_url: str, nats_server: NatsServer, data_dir: Path
) -> None:
    """The relay resumes after the stream's last event: no event twice."""
    publish_two_images(registry, nats_server.url, data_dir)

    result = republish(database_url, data_dir, "--from", "1")

    assert result.returncode == 0, result.stderr
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        wait_until(lambda: checkpoint_of(registry) == 8)
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: checkpoint_of(registry) == 12)
    assert stream_size(nats_server.url) == 12
    assert_stream_matches_log(nats_server.url, registry)


def test_republish_after_purge_drops_recent_ids(
    registry: Registry, database_url: str, nats_server: NatsServer, data_dir: Path
) -> None:
    """Within the duplicate window, JetStream drops the republished events."""
    publish_two_images(registry, nats_server.url, data_dir)
    purge(nats_server.url)

    result = republish(database_url, data_dir, "--from", "1")

    assert result.returncode == 0, result.stderr
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: checkpoint_of(registry) == 12)
    assert stream_positions(nats_server.url) == [9, 10, 11, 12]


def test_republish_after_purge_and_window(
    registry: Registry, database_url: str, nats_server: NatsServer, data_dir: Path
) -> None:
    settings = fast_settings(nats_server.url, duplicate_window=1.0)
    with BusThread(Bus(settings, registry.database, data_dir)):
        push_image(registry, "library/alpine", "1")
        push_image(registry, "library/busybox", "1")
        wait_until(lambda: checkpoint_of(registry) == 8)
    purge(nats_server.url)
    time.sleep(1.5)

    result = republish(database_url, data_dir, "--from", "1")

    assert result.returncode == 0, result.stderr
    with BusThread(Bus(settings, registry.database, data_dir)):
        wait_until(lambda: checkpoint_of(registry) == 8)
        wait_for_stream_size(nats_server.url, 8)
    assert stream_positions(nats_server.url) == list(range(1, 9))


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--from", "0"], 2, "invalid position '0': expected a whole number"),
        (["--from", "6"], 1, "position 6 is after the relay's next position 5"),
        (["--from", "1", "--stream", "bad.name"], 2, "invalid stream name"),
    ],
)
def test_republish_rejects_invalid_input(
    registry: Registry,
    database_url: str,
    nats_server: NatsServer,
    data_dir: Path,
    argv: list[str],
    status: int,
    message: str,
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: checkpoint_of(registry) == 4)

    result = republish(database_url, data_dir, *argv)

    assert result.returncode == status
    assert message in result.stderr
    assert checkpoint_of(registry) == 4
