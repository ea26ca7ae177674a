"""`cairn events tail` in a subprocess, against a stream the relay filled."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig, RetentionPolicy

from consumers.natsclient import connect_once
from engine.bus import Bus
from engine.registry import Registry
from tests.nats import (
    BusThread,
    NatsServer,
    checkpoint_of,
    fast_settings,
    log_events,
    push_image,
    run,
    wait_until,
)

# The tail reads NATS only, so one database backend is enough.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def cairn_tail(url: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "events", "tail", "--nats", url, *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_tail(url: str, *options: str) -> subprocess.Popen[str]:
    """Start `cairn events tail` with pipes for its output, for tests that
    read it while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "events", "tail", "--nats", url, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def publish_log(registry: Registry, nats_server: NatsServer, data_dir: Path) -> None:
    with BusThread(Bus(fast_settings(nats_server.url), registry.database, data_dir)):
        push_image(registry, "library/alpine", "3.20")
        push_image(registry, "team/web.app", "latest")
        wait_until(lambda: checkpoint_of(registry) == 8)


@sqlite_only
def test_tail_prints_json_lines(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    publish_log(registry, nats_server, data_dir)
    result = cairn_tail(nats_server.url, "--from", "1", "--count", "8")
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed == [event.to_json() for event in log_events(registry)]
    assert result.stderr == ""


@sqlite_only
def test_tail_filters_type_and_repository(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    publish_log(registry, nats_server, data_dir)
    events = log_events(registry)

    tags = cairn_tail(
        nats_server.url, "--from", "1", "--type", "tag.set", "--count", "2"
    )
    assert tags.returncode == 0, tags.stderr
    assert [json.loads(line)["position"] for line in tags.stdout.splitlines()] == [
        e.position for e in events if e.type == "tag.set"
    ]

    web = cairn_tail(
        nats_server.url, "--from", "1", "--repository", "team/web.app", "--count", "4"
    )
    assert web.returncode == 0, web.stderr
    assert [json.loads(line)["position"] for line in web.stdout.splitlines()] == [
        e.position for e in events if e.repository == "team/web.app"
    ]

    manifests = cairn_tail(
        nats_server.url,
        "--from",
        "1",
        "--type",
        "manifest",
        "--repository",
        "library/",
        "--count",
        "1",
    )
    assert manifests.returncode == 0, manifests.stderr
    [line] = manifests.stdout.splitlines()
    assert json.loads(line)["type"] == "manifest.pushed"
    assert json.loads(line)["repository"] == "library/alpine"


@sqlite_only
def test_tail_on_debian_nats_server(
    registry: Registry, debian_nats_server: NatsServer, data_dir: Path
) -> None:
    """Every filter works on the oldest supported server, 2.9, which rejects
    consumer filters that span several of the stream's subjects."""
    publish_log(registry, debian_nats_server, data_dir)
    events = log_events(registry)
    url = debian_nats_server.url

    everything = cairn_tail(url, "--from", "1", "--count", "8")
    assert everything.returncode == 0, everything.stderr
    printed = [json.loads(line) for line in everything.stdout.splitlines()]
    assert printed == [event.to_json() for event in events]

    library = cairn_tail(url, "--from", "1", "--repository", "library/", "--count", "4")
    assert library.returncode == 0, library.stderr
    assert [json.loads(line)["position"] for line in library.stdout.splitlines()] == [
        e.position for e in events if e.repository == "library/alpine"
    ]

    web = cairn_tail(url, "--from", "6", "--repository", "team/web.app", "--count", "3")
    assert web.returncode == 0, web.stderr
    assert [json.loads(line)["position"] for line in web.stdout.splitlines()] == [
        6,
        7,
        8,
    ]

    tags = cairn_tail(
        url, "--from", "1", "--type", "tag", "--repository", "library/", "--count", "1"
    )
    assert tags.returncode == 0, tags.stderr
    [line] = tags.stdout.splitlines()
    assert json.loads(line)["type"] == "tag.set"
    assert json.loads(line)["repository"] == "library/alpine"


@sqlite_only
def test_tail_from_position_when_sequences_differ(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """A foreign first message shifts every sequence; --from still finds the
    position by its header."""

    async def publish_foreign() -> None:
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            await js.add_stream(name="CAIRN", subjects=["cairn.tag.>"])
            await js.publish("cairn.tag.set.other", b"not an event")
        finally:
            await client.close()

    run(publish_foreign())
    publish_log(registry, nats_server, data_dir)
    result = cairn_tail(nats_server.url, "--from", "6", "--count", "3")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["position"] for line in result.stdout.splitlines()] == [
        6,
        7,
        8,
    ]


@sqlite_only
def test_tail_names_positions_purged(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    publish_log(registry, nats_server, data_dir)
    head = len(log_events(registry))

    async def purge_all_but_two() -> None:
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().purge_stream("CAIRN", keep=2)
        finally:
            await client.close()

    run(purge_all_but_two())
    earliest = head - 1
    gap = cairn_tail(nats_server.url, "--from", "2", "--count", "1")
    no_gap = cairn_tail(nats_server.url, "--from", str(earliest), "--count", "1")

    assert gap.returncode == 0, gap.stderr
    assert json.loads(gap.stdout)["position"] == earliest
    assert gap.stderr == (
        f"cairn events tail: stream CAIRN begins at position {earliest}, so "
        f"positions 2 to {earliest - 1} are not in it; read them from GET "
        "/_cairn/events?after=1\n"
    )
    assert no_gap.returncode == 0, no_gap.stderr
    assert json.loads(no_gap.stdout)["position"] == earliest
    assert no_gap.stderr == ""


def test_tail_reports_unknown_type() -> None:
    result = cairn_tail("nats://127.0.0.1:9", "--type", "tags")
    assert result.returncode == 2
    assert "unknown event type 'tags'" in result.stderr


def test_tail_reports_unreachable_server() -> None:
    result = cairn_tail("nats://127.0.0.1:9", "--from", "1")
    assert result.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:9" in result.stderr


def test_tail_reports_silent_server() -> None:
    # The kernel accepts the connection into the backlog, but nothing ever
    # sends NATS's INFO line.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        result = cairn_tail(url, "--from", "1")

    assert result.returncode == 1
    assert f"cannot connect to NATS at {url}: timed out" in result.stderr


def test_connect_once_names_timeout() -> None:
    async def connect(url: str) -> None:
        await connect_once(url, "cairn test", timeout=0.5)

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ConnectionError) as raised:
            asyncio.run(connect(url))

    assert str(raised.value) == (
        f"cannot connect to NATS at {url}: timed out: the server sent no response"
    )


@sqlite_only
def test_tail_past_end_says_waiting(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    publish_log(registry, nats_server, data_dir)
    notices = []
    for options in (("--from", "100"), ("--from", "100", "--type", "tag")):
        tail = start_tail(nats_server.url, *options)
        try:
            assert tail.stderr is not None
            # Without the notice the tail prints nothing and waits for events.
            readable, _, _ = select.select([tail.stderr], [], [], 30)
            notices.append(tail.stderr.readline() if readable else "")
        finally:
            tail.kill()
            tail.wait()
    assert notices[0] == (
        "cairn events tail: stream CAIRN has no event at or after position 100 "
        "yet; waiting for new events\n"
    )
    assert notices[1] == (
        "cairn events tail: stream CAIRN has no event that matches the filter "
        "at or after position 100 yet; waiting for new events\n"
    )


def test_tail_reports_jetstream_disabled(
    nats_server_without_jetstream: NatsServer,
) -> None:
    result = cairn_tail(nats_server_without_jetstream.url)
    assert result.returncode == 1
    assert "JetStream is not enabled on this NATS server" in result.stderr
    assert "nats-server with -js" in result.stderr


def test_tail_reports_missing_stream(nats_server: NatsServer) -> None:
    result = cairn_tail(nats_server.url, "--stream", "NOPE")
    assert result.returncode == 1
    assert "stream NOPE not found" in result.stderr


@sqlite_only
@pytest.mark.parametrize("server", ["nats_server", "debian_nats_server"])
def test_tail_reports_unstored_prefix(
    registry: Registry, data_dir: Path, server: str, request: pytest.FixtureRequest
) -> None:
    """A prefix that the stream does not store ends the tail at once, on a
    server that accepts the filter and on one (2.9) that the tail reads
    unfiltered."""
    nats_server: NatsServer = request.getfixturevalue(server)
    publish_log(registry, nats_server, data_dir)

    for options in (
        ("--subject-prefix", "other"),
        ("--subject-prefix", "other", "--type", "tag"),
    ):
        result = cairn_tail(nats_server.url, "--from", "1", "--count", "1", *options)
        assert result.returncode == 1, options
        assert result.stdout == "", options
        prefix = options[1]
        assert result.stderr == (
            "cairn events tail: stream CAIRN stores no subject under the subject "
            f"prefix {prefix!r}, only cairn.blob.>, cairn.manifest.>, cairn.tag.>; "
            "set --subject-prefix to the subject prefix of the cairn serve that "
            "publishes to it\n"
        ), options

    # A prefix that lies inside the stored subjects is a valid filter.
    tags = cairn_tail(
        nats_server.url, "--from", "1", "--count", "1", "--subject-prefix", "cairn.tag"
    )
    assert tags.returncode == 0, tags.stderr
    assert json.loads(tags.stdout)["type"] == "tag.set"


@sqlite_only
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_tail_reports_server_gone(
    registry: Registry, nats_server: NatsServer, data_dir: Path, signal_number: int
) -> None:
    publish_log(registry, nats_server, data_dir)
    tail = start_tail(nats_server.url, "--from", "1")
    try:
        assert tail.stdout is not None
        printed = [tail.stdout.readline() for _ in range(8)]
        assert json.loads(printed[-1])["position"] == 8
        nats_server.kill(signal_number)
        returncode = tail.wait(30)
        stderr = tail.stderr.read() if tail.stderr is not None else ""
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert returncode == 1
    assert stderr == f"cairn events tail: connection to {nats_server.url} closed\n"


def test_tail_reports_rejected_subscription(nats_server: NatsServer) -> None:
    # A work-queue stream allows one unfiltered consumer, so the server
    # rejects the tail's consumer once another one exists.
    async def create_work_queue() -> None:
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            await js.add_stream(
                name="QUEUE", subjects=["cairn.>"], retention=RetentionPolicy.WORK_QUEUE
            )
            await js.add_consumer("QUEUE", ConsumerConfig(durable_name="worker"))
        finally:
            await client.close()

    asyncio.run(create_work_queue())

    result = cairn_tail(nats_server.url, "--stream", "QUEUE")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"cairn events tail: NATS at {nats_server.url} rejected the subscription "
        "to stream QUEUE: "
    )
    assert len(result.stderr.splitlines()) == 1
