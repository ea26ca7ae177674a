"""The relay against a real nats-server: delivery, outages, health, pulls."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import nats
import nats.errors
import pytest
import sqlalchemy as sa
import structlog
from nats.js.api import StorageType

from engine.bus import Bus, BusSettings
from engine.bus import checkpoint as store
from engine.bus.connection import JETSTREAM_DISABLED
from engine.bus.publisher import AckPublisher
from engine.db import Database
from engine.domain.events import Actor
from engine.migrate import upgrade
from engine.registry import Registry
from tests.conftest import reset_postgres
from tests.nats import (
    BusThread,
    NatsServer,
    assert_stream_matches_log,
    checkpoint_of,
    fast_settings,
    push_image,
    run,
    stream_messages,
    stream_size,
    wait_for_stream_size,
    wait_until,
)
from tests.test_schema import role_url


def test_events_published_in_order(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        push_image(registry, "library/alpine", "3.20")
        push_image(registry, "my.org/web_app", "latest")
        wait_for_stream_size(nats_server.url, 8)
        wait_until(lambda: checkpoint_of(registry) == 8)
    assert_stream_matches_log(nats_server.url, registry)


def test_events_carry_registry_id(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        push_image(registry, "library/alpine", "3.20")
        wait_until(lambda: checkpoint_of(registry) == 4)

    messages = stream_messages(nats_server.url)
    assert len(messages) == 4
    for message in messages:
        headers = message.headers or {}
        assert headers.get("Cairn-Registry-Id") == registry.registry_id()


def test_relay_names_other_registry_on_stream(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    """A relay that finds another registry's event at the stream's tail logs
    an error with both registry ids."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Registry.open(other_dir / "data", f"sqlite:///{other_dir / 'cairn.db'}")
    try:
        upgrade(other.database)
        settings = fast_settings(nats_server.url)
        with BusThread(Bus(settings, other.database, other_dir / "data")):
            push_image(other, "other/app", "v1")
            wait_until(lambda: checkpoint_of(other) == 4)
        other_id = other.registry_id()
    finally:
        other.database.dispose()

    bus = Bus(settings, registry.database, data_dir)
    with structlog.testing.capture_logs() as logs, BusThread(bus) as thread:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: thread.health()["checkpoint"] == 4)

    errors = [
        entry for entry in logs if entry["event"] == "relay_stream_tail_other_registry"
    ]
    assert errors, logs
    assert errors[0]["log_level"] == "error"
    assert errors[0]["registry_id"] == registry.registry_id()
    assert errors[0]["other_registry_id"] == other_id
    assert errors[0]["position"] == 4
    assert "--stream" in errors[0]["hint"]
    assert stream_size(nats_server.url) == 8


def test_backlog_published_when_nats_starts(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    nats_server.stop()
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus) as thread:
        for index in range(3):
            push_image(registry, f"team/app{index}", "v1")
        health = wait_until(lambda: (h := thread.health())["lag_events"] == 12 and h)
        assert health["state"] == "connecting"
        assert health["leader"] is True
        assert health["log_head"] == 12
        assert health["checkpoint"] == 0
        assert health["lag_seconds"] is not None

        nats_server.start()
        wait_until(lambda: thread.health()["state"] == "caught_up")
        health = thread.health()
        assert health["lag_events"] == 0
        assert health["lag_seconds"] == 0.0
        assert health["checkpoint"] == 12
    assert_stream_matches_log(nats_server.url, registry)


def test_nats_restart_mid_stream(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus) as thread:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: thread.health()["checkpoint"] == 4)

        nats_server.stop()
        push_image(registry, "library/alpine", "2")
        push_image(registry, "library/busybox", "1")
        nats_server.start()
        push_image(registry, "library/busybox", "2")

        wait_until(lambda: thread.health()["checkpoint"] == 16)
    assert_stream_matches_log(nats_server.url, registry)


def test_rejected_publish_reports_reason(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """A message from another publisher makes JetStream reject the relay's
    next publish. The relay receives the rejection at once, not after its ack
    timeout, and logs JetStream's reason."""

    async def publish_foreign() -> None:
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().publish("cairn.tag.set.foreign", b"not an event")
        finally:
            await client.close()

    settings = fast_settings(nats_server.url, ack_timeout=20.0)
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus) as thread, structlog.testing.capture_logs() as logs:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: thread.health()["checkpoint"] == 4)
        run(publish_foreign())

        push_image(registry, "library/alpine", "2")
        wait_until(lambda: thread.health()["checkpoint"] == 8, timeout=10)

    failures = [entry for entry in logs if entry["event"] == "relay_publish_failed"]
    assert failures, logs
    assert "wrong last sequence" in failures[0]["error"]
    assert failures[0]["position"] == 5
    positions = [
        (message.headers or {}).get("Cairn-Position")
        for message in stream_messages(nats_server.url)
    ]
    assert positions == ["1", "2", "3", "4", None, "5", "6", "7", "8"]


def test_stream_configuration(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus) as thread:
        wait_until(lambda: thread.health()["state"] == "caught_up")

    async def read_config() -> object:
        client = await nats.connect(nats_server.url)
        try:
            return (await client.jetstream().stream_info("CAIRN")).config
        finally:
            await client.close()

    config = run(read_config())
    assert sorted(config.subjects) == [
        "cairn.blob.>",
        "cairn.manifest.>",
        "cairn.tag.>",
    ]
    assert config.storage == StorageType.FILE
    assert config.duplicate_window == 120.0


def test_append_wakes_relay_before_poll(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    # With an hour between polls, only the append listener can have woken it.
    settings = fast_settings(nats_server.url, poll_interval=3600.0)
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus) as thread:
        wait_until(lambda: thread.health()["state"] == "caught_up")
        push_image(registry, "library/alpine", "latest")
        wait_for_stream_size(nats_server.url, 4)
    assert_stream_matches_log(nats_server.url, registry)


def test_lost_checkpoint_write_not_republished(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """A checkpoint that fell behind the stream does not cause duplicates.

    Setting the checkpoint back to 0 stands for a relay that died before it
    could write its checkpoint, longer ago than the duplicate window.
    """
    settings = fast_settings(nats_server.url, duplicate_window=1.0)
    with BusThread(Bus(settings, registry.database, data_dir)) as thread:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: thread.health()["checkpoint"] == 4)
    with registry.database.transaction() as conn:
        store.set_checkpoint(conn, "CAIRN", 0)

    with BusThread(Bus(settings, registry.database, data_dir)) as thread:
        push_image(registry, "library/alpine", "2")
        wait_until(lambda: thread.health()["checkpoint"] == 8)
    assert stream_size(nats_server.url) == 8
    assert_stream_matches_log(nats_server.url, registry)


def test_stream_behind_checkpoint_republishes(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """Events the stream lost after acknowledging them are published again."""
    settings = fast_settings(nats_server.url)
    with BusThread(Bus(settings, registry.database, data_dir)) as thread:
        push_image(registry, "library/alpine", "1")
        wait_until(lambda: thread.health()["checkpoint"] == 4)

    async def recreate_with_first_two() -> None:
        # Keep positions 1 and 2 only, as if the server lost the rest.
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            first_two = [await js.get_msg("CAIRN", sequence) for sequence in (1, 2)]
            config = (await js.stream_info("CAIRN")).config
            await js.delete_stream("CAIRN")
            await js.add_stream(config)
            for message in first_two:
                await js.publish(message.subject, message.data, headers=message.headers)
        finally:
            await client.close()

    run(recreate_with_first_two())
    with BusThread(Bus(settings, registry.database, data_dir)) as thread:
        wait_until(lambda: thread.health()["state"] == "caught_up")
        wait_for_stream_size(nats_server.url, 4)
    assert_stream_matches_log(nats_server.url, registry)


def test_disabled_bus(registry: Registry, data_dir: Path) -> None:
    bus = Bus(BusSettings(enabled=False), registry.database, data_dir)
    with BusThread(bus) as thread:
        push_image(registry, "library/alpine", "1")
        health = thread.health()
    assert health["state"] == "disabled"
    assert health["nats_url"] is None
    assert bus.nats_url is None
    assert registry.database.append_listeners == []


def test_health_is_json(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    url = nats_server.url.replace("nats://", "nats://user:secret@")
    bus = Bus(fast_settings(url), registry.database, data_dir)
    with BusThread(bus) as thread:
        health = thread.health()
    text = json.dumps(health)
    assert "secret" not in text
    assert health["nats_url"].startswith("nats://***@127.0.0.1:")


def test_pull_notifications(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    settings = fast_settings(nats_server.url, publish_pulls=True)
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus) as thread:
        wait_until(lambda: thread.health()["state"] == "caught_up")

        async def pull_once() -> nats.aio.msg.Msg:
            client = await nats.connect(nats_server.url)
            try:
                subscription = await client.subscribe("cairn.pull.>")
                await client.flush()
                # Core NATS delivers at most once, and a subscription can miss
                # messages sent just after it is made, so notify until one
                # arrives.
                for _ in range(100):
                    bus.notify_pull(
                        "library/alpine",
                        "latest",
                        "sha256:" + "a" * 64,
                        Actor("reader", "10.0.0.1"),
                        "request-1",
                    )
                    try:
                        return await subscription.next_msg(timeout=0.1)
                    except nats.errors.TimeoutError:
                        continue
                raise AssertionError("no pull notification arrived")
            finally:
                await client.close()

        message = thread.call(pull_once())
    assert message.subject == "cairn.pull.library.alpine"
    body = json.loads(message.data)
    assert body["repository"] == "library/alpine"
    assert body["reference"] == "latest"
    assert body["digest"] == "sha256:" + "a" * 64
    assert body["actor"] == {"user": "reader", "address": "10.0.0.1"}
    assert body["request_id"] == "request-1"
    assert stream_size(nats_server.url) == 0


def test_notify_pull_never_raises(registry: Registry, data_dir: Path) -> None:
    # Nothing listens on port 9, so the notifications are dropped, not raised.
    settings = fast_settings("nats://127.0.0.1:9", publish_pulls=True)
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus) as thread:

        async def notify() -> None:
            bus.notify_pull("library/alpine", "latest", "sha256:x", Actor(), None)
            bus.notify_pull("", "latest", "sha256:x", Actor(), None)
            await asyncio.sleep(0)

        thread.call(notify())
        wait_until(lambda: thread.health()["pulls_dropped"] == 2)


def test_checkpoint_only_moves_forward(registry: Registry) -> None:
    with registry.database.transaction() as conn:
        generation = store.claim_checkpoint(conn, "relay").generation
        store.advance_checkpoint(conn, "relay", 5, generation)
        store.advance_checkpoint(conn, "relay", 3, generation)
        assert store.read_checkpoint(conn, "relay") == 5
        store.rewind_checkpoint(conn, "relay", 2, generation)
        assert store.read_checkpoint(conn, "relay") == 2
        assert store.read_checkpoint(conn, "other") == 0


def test_checkpoint_claim_starts_generation(registry: Registry) -> None:
    with registry.database.transaction() as conn:
        first = store.claim_checkpoint(conn, "relay")
        store.advance_checkpoint(conn, "relay", 4, first.generation)
        second = store.claim_checkpoint(conn, "relay")
    assert first == store.Claim(position=0, generation=1)
    assert second == store.Claim(position=4, generation=2)


def test_checkpoint_old_generation_rejected(registry: Registry) -> None:
    with registry.database.transaction() as conn:
        old = store.claim_checkpoint(conn, "relay").generation
        store.advance_checkpoint(conn, "relay", 4, old)
        new = store.claim_checkpoint(conn, "relay").generation

    for write in (store.advance_checkpoint, store.rewind_checkpoint):
        with (
            pytest.raises(store.CheckpointFenced) as raised,
            registry.database.transaction() as conn,
        ):
            write(conn, "relay", 9, old)
        assert raised.value.generation == old
        assert raised.value.current == new
        assert "has generation 2, not the generation 1" in str(raised.value)

    with registry.database.read() as conn:
        assert store.read_checkpoint(conn, "relay") == 4
        assert store.read_generation(conn, "relay") == new


def test_checkpoint_reset_fences_leader(registry: Registry) -> None:
    with registry.database.transaction() as conn:
        leader = store.claim_checkpoint(conn, "relay").generation
        store.advance_checkpoint(conn, "relay", 8, leader)
        reset = store.set_checkpoint(conn, "relay", 0)

    assert reset == leader + 1
    with (
        pytest.raises(store.CheckpointFenced),
        registry.database.transaction() as conn,
    ):
        store.advance_checkpoint(conn, "relay", 9, leader)
    with registry.database.transaction() as conn:
        store.advance_checkpoint(conn, "relay", 3, reset)
        assert store.read_checkpoint(conn, "relay") == 3


def test_checkpoint_write_to_missing_row_rejected(registry: Registry) -> None:
    with (
        pytest.raises(store.CheckpointFenced) as raised,
        registry.database.transaction() as conn,
    ):
        store.advance_checkpoint(conn, "relay", 4, 1)
    assert raised.value.current is None
    assert "is missing" in str(raised.value)
    with registry.database.read() as conn:
        assert store.read_generation(conn, "relay") is None


@pytest.mark.parametrize("position", [1, 3])
def test_event_id_lookup(registry: Registry, position: int) -> None:
    push_image(registry, "library/alpine", "1")
    with registry.database.read() as conn:
        expected = conn.execute(
            sa.text("SELECT id FROM events WHERE position = :p"), {"p": position}
        ).scalar_one()
        assert store.event_id_at(conn, position) == uuid.UUID(str(expected))
        assert store.event_id_at(conn, 99) is None


def test_ack_publisher_drops_unsent_message(nats_server: NatsServer) -> None:
    """A message that the client does not send leaves no pending ack."""

    async def publish_too_large() -> int:
        client = await nats.connect(nats_server.url)
        publisher = AckPublisher(client)
        try:
            await publisher.start()
            with pytest.raises(nats.errors.MaxPayloadError):
                await publisher.publish(
                    "cairn.tag.set.large", b"x" * (client.max_payload + 1), {}
                )
            # The done callback that removes the future runs on the loop.
            await asyncio.sleep(0)
            return len(publisher._futures)
        finally:
            await publisher.close()
            await client.close()

    assert run(publish_too_large()) == 0


def test_prefix_change_on_stored_stream_warns(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """Events stored under the old prefix keep it, so the change is a warning."""
    with BusThread(Bus(fast_settings(nats_server.url), registry.database, data_dir)):
        push_image(registry, "library/alpine", "1")
        wait_for_stream_size(nats_server.url, 4)

    settings = fast_settings(nats_server.url, subject_prefix="other")
    bus = Bus(settings, registry.database, data_dir)
    with BusThread(bus), structlog.testing.capture_logs() as logs:
        push_image(registry, "library/alpine", "2")
        wait_for_stream_size(nats_server.url, 8)

    (warning,) = [
        entry for entry in logs if entry["event"] == "stream_subjects_changed"
    ]
    assert warning["log_level"] == "warning"
    assert warning["stored_messages"] == 4
    assert "cairn.tag.>" in warning["previous_subjects"]
    assert "other.tag.>" in warning["subjects"]
    subjects = [message.subject for message in stream_messages(nats_server.url)]
    assert subjects[3] == "cairn.tag.set.library.alpine"
    assert subjects[7] == "other.tag.set.library.alpine"


def test_relay_reports_jetstream_disabled(
    registry: Registry, nats_server_without_jetstream: NatsServer, data_dir: Path
) -> None:
    url = nats_server_without_jetstream.url
    bus = Bus(fast_settings(url), registry.database, data_dir)
    with BusThread(bus) as thread:
        push_image(registry, "library/alpine", "1")
        health = wait_until(lambda: (h := thread.health())["last_error"] and h)

    assert health["last_error"] == JETSTREAM_DISABLED
    assert health["checkpoint"] == 0
    assert health["state"] == "failing"


def test_relay_reports_lock_denied(
    tmp_path: Path, postgres_url: str, nats_server: NatsServer
) -> None:
    reset_postgres(postgres_url)
    registry = Registry.open(tmp_path / "data", postgres_url)
    push_image(registry, "library/alpine", "1")
    with role_url(postgres_url, "SELECT, INSERT, UPDATE, DELETE") as url:
        admin = sa.create_engine(postgres_url)
        with admin.begin() as conn:
            role = sa.make_url(url).username
            conn.exec_driver_sql(f'REVOKE UPDATE ON relay_checkpoints FROM "{role}"')
        admin.dispose()
        database = Database(url)
        bus = Bus(fast_settings(nats_server.url), database, tmp_path / "data")
        try:
            with BusThread(bus) as thread:
                health = wait_until(lambda: (h := thread.health())["last_error"] and h)
        finally:
            database.dispose()
    registry.database.dispose()

    assert health["state"] == "failing"
    assert health["last_error"].startswith("relay lock failed: ")
    assert "permission denied for table relay_checkpoints" in health["last_error"]
    assert health["leader"] is False
