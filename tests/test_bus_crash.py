"""A relay killed between JetStream's ack and its checkpoint write.

The relay runs in a subprocess that SIGKILLs itself right after the batch
holding a chosen position is acknowledged, before the checkpoint moves. A
fresh relay then takes over. A consumer that drops repeated message ids must
see every event once, in log order, with none missing.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import nats
import pytest

from engine.bus.messages import EVENT_ID, MSG_ID, POSITION, REGISTRY_ID
from engine.registry import Registry
from tests.nats import (
    NatsServer,
    RelayProcess,
    checkpoint_of,
    log_events,
    push_image,
    run,
    stream_messages,
    wait_for_stream_size,
    wait_until,
)

BATCH_SIZE = 4


def relay_config(
    registry: Registry, nats_server: NatsServer, data_dir: Path, **extra: object
) -> dict[str, object]:
    return {
        "database_url": registry.database.url,
        "nats_url": nats_server.url,
        "data_dir": str(data_dir),
        "batch_size": BATCH_SIZE,
        **extra,
    }


def deduplicated(url: str) -> list[tuple[str, int]]:
    """Read the stream as a consumer that drops repeated message ids would."""
    seen: set[str] = set()
    delivered: list[tuple[str, int]] = []
    for message in stream_messages(url):
        headers = message.headers or {}
        if POSITION not in headers:
            continue  # not an event: the foreign message some tests publish
        if headers[MSG_ID] in seen:
            continue
        seen.add(headers[MSG_ID])
        delivered.append((headers[MSG_ID], int(headers[POSITION])))
    return delivered


def crash_relay(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> int:
    """Run a relay that dies once positions 5-8 are acknowledged; return the
    checkpoint it left."""
    for index in range(3):
        push_image(registry, "library/alpine", f"v{index}")
    relay = RelayProcess(
        relay_config(registry, nats_server, data_dir, crash_at=6),
        tmp_path / "crashed-relay.log",
    )
    returncode = relay.process.wait(60)
    assert returncode == -signal.SIGKILL, relay.log_path.read_text()
    return checkpoint_of(registry)


def test_crash_after_ack_no_duplicate(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    checkpoint = crash_relay(registry, nats_server, data_dir, tmp_path)
    # Positions 5-8 were acknowledged as one batch, but no checkpoint write
    # covers them (the one for 1-4 may or may not have happened).
    assert checkpoint in (0, 4)
    wait_for_stream_size(nats_server.url, 8)

    push_image(registry, "library/busybox", "latest")
    relay = RelayProcess(
        relay_config(registry, nats_server, data_dir), tmp_path / "relay.log"
    )
    try:
        wait_until(lambda: checkpoint_of(registry) == 16)
    finally:
        relay.stop()
    assert relay.logged("relay_checkpoint_advanced")

    events = log_events(registry)
    raw = stream_messages(nats_server.url)
    assert len(raw) == 16  # nothing was stored twice
    assert deduplicated(nats_server.url) == [
        (str(event.id), event.position) for event in events
    ]


def publish(
    nats_server: NatsServer,
    subject: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    """Publish ``body`` to the stream as a publisher other than the relay."""

    async def send() -> None:
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().publish(subject, body, headers=headers)
        finally:
            await client.close()

    run(send())


def relay_after_push(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> RelayProcess:
    """Push one more image and run a relay until it has published all 16
    events; return the stopped relay."""
    push_image(registry, "library/busybox", "latest")
    relay = RelayProcess(
        relay_config(registry, nats_server, data_dir), tmp_path / "relay.log"
    )
    try:
        wait_until(lambda: checkpoint_of(registry) == 16)
    finally:
        relay.stop()
    return relay


def test_tail_event_undone_by_restore_named(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    """The stream ends with an event of this registry that its log lacks, as
    after a restore of the database from an older backup."""
    checkpoint = crash_relay(registry, nats_server, data_dir, tmp_path)
    assert checkpoint in (0, 4)
    undone = str(uuid.uuid4())
    headers = {
        MSG_ID: undone,
        EVENT_ID: undone,
        POSITION: "13",
        REGISTRY_ID: registry.registry_id(),
    }
    publish(nats_server, "cairn.tag.set.library.alpine", b"{}", headers)

    relay = relay_after_push(registry, nats_server, data_dir, tmp_path)

    (unknown,) = [
        line
        for line in relay.log_events()
        if line.get("event") == "relay_stream_tail_unknown"
    ]
    assert unknown["event_id"] == undone
    assert "restore of the database from an older backup" in unknown["reason"]
    assert "cairn events republish --from 1" in unknown["hint"]


def test_crash_duplicates_dropped_by_msg_id(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    """With the stream's last message unknown, the message ids stop duplicates.

    A message from another publisher ends the stream, so the new relay cannot
    tell where the log's part ends and resends from its checkpoint; JetStream
    drops the resent events because their ids are inside the duplicate window.
    """
    checkpoint = crash_relay(registry, nats_server, data_dir, tmp_path)
    assert checkpoint in (0, 4)
    publish(nats_server, "cairn.tag.set.other", b"not an event")

    relay = relay_after_push(registry, nats_server, data_dir, tmp_path)
    assert relay.logged("relay_duplicate_dropped")
    assert relay.logged("relay_stream_tail_unknown")

    events = log_events(registry)
    raw = stream_messages(nats_server.url)
    assert len(raw) == 17  # 16 events and the foreign message, no duplicates
    assert deduplicated(nats_server.url) == [
        (str(event.id), event.position) for event in events
    ]


@pytest.mark.parametrize("crash_at", [1, 12])
def test_crash_at_batch_edges(
    registry: Registry,
    nats_server: NatsServer,
    data_dir: Path,
    tmp_path: Path,
    crash_at: int,
) -> None:
    for index in range(3):
        push_image(registry, "library/alpine", f"v{index}")
    crashed = RelayProcess(
        relay_config(registry, nats_server, data_dir, crash_at=crash_at),
        tmp_path / "crashed-relay.log",
    )
    assert crashed.process.wait(60) == -signal.SIGKILL

    relay = RelayProcess(
        relay_config(registry, nats_server, data_dir), tmp_path / "relay.log"
    )
    try:
        wait_until(lambda: checkpoint_of(registry) == 12)
    finally:
        relay.stop()
    events = log_events(registry)
    assert len(stream_messages(nats_server.url)) == 12
    assert deduplicated(nats_server.url) == [
        (str(event.id), event.position) for event in events
    ]
