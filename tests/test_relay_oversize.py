"""Events larger than NATS accepts: the relay's stand-ins and the consumers
that read the full event from the feed, against a real nats-server whose
max_payload is small."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import StreamConfig

import tests.nats
import tests.test_webhook
from consumers.webhook.dead_letters import DeadLetter, DeadLetterStore
from engine.bus import Bus
from engine.bus.embedded import find_nats_server
from engine.bus.messages import PAYLOAD_OMITTED, POSITION, message_size
from engine.bus.subjects import stream_subjects
from engine.domain.digest import Digest
from engine.domain.events import Actor, EventType
from engine.registry import Registry
from tests.images import Image, make_image
from tests.nats import (
    BusThread,
    NatsServer,
    RelayProcess,
    checkpoint_of,
    fast_settings,
    log_events,
    run,
    stream_messages,
    wait_until,
)
from tests.server import push_image as push_over_http
from tests.test_mirror import log_events as mirror_log_lines
from tests.test_mirror import start_mirror
from tests.test_webhook import Receiver, cairn_cli, cairn_on_nats, write_config

# The webhook tests' fixtures, bound here so that pytest finds them.
receiver = tests.test_webhook.receiver
start_webhook = tests.test_webhook.start_webhook

MAX_PAYLOAD = 8192
WAIT = 60.0


@pytest.fixture(name="nats_server")
def small_payload_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NatsServer]:
    """A nats-server whose max_payload is MAX_PAYLOAD bytes instead of 1 MiB.

    It overrides the ``nats_server`` fixture for this module, so the webhook
    fixtures imported above use it too. NatsServer starts the binary that
    ``tests.nats.find_nats_server`` returns, here a script that adds the
    configuration file to nats-server's arguments.
    """
    config = tmp_path / "small-payload.conf"
    config.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    binary = shlex.quote(str(find_nats_server()))
    wrapper = tmp_path / "nats-server-small-payload"
    wrapper.write_text(
        f'#!/bin/sh\nexec {binary} --config {shlex.quote(str(config))} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(tests.nats, "find_nats_server", lambda: wrapper)
    server = NatsServer(tmp_path / "nats-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def large_image(annotation_size: int = 3 * MAX_PAYLOAD // 2) -> Image:
    """An image whose manifest.pushed event is larger than MAX_PAYLOAD."""
    return make_image(annotations={"org.example.notes": "x" * annotation_size})


def push(registry: Registry, repository: str, image: Image, tag: str) -> None:
    target = registry.repository(repository, actor=Actor("tester", "127.0.0.1"))
    for blob in image.blobs:
        target.blobs.push(Digest.of(blob), [blob])
    target.manifests.put(image.manifest, image.media_type, tag=tag)


def head(registry: Registry) -> int:
    return log_events(registry)[-1].position


def assert_stream_has_stand_in(url: str, registry: Registry, large: Image) -> int:
    """Check every event is in the stream in log order, the large manifest's
    as a stand-in; return that stand-in's position."""
    events = log_events(registry)
    messages = stream_messages(url)
    assert [int((m.headers or {})[POSITION]) for m in messages] == [
        event.position for event in events
    ]
    stand_in_positions = []
    for message, event in zip(messages, events, strict=True):
        headers = message.headers or {}
        body = json.loads(message.data)
        is_large = event.type == EventType.MANIFEST_PUSHED and event.payload[
            "digest"
        ] == str(large.digest)
        if not is_large:
            assert PAYLOAD_OMITTED not in headers
            assert body == event.to_json()
            continue
        stand_in_positions.append(event.position)
        assert headers[PAYLOAD_OMITTED] == "true"
        assert headers["Nats-Msg-Id"] == str(event.id)
        assert headers["Cairn-Registry-Id"] == registry.registry_id()
        assert body["payload"] is None
        assert body["payload_omitted"] is True
        expected = event.to_json()
        expected["payload"] = None
        expected["payload_omitted"] = True
        assert body == expected
        assert len(message.data) < MAX_PAYLOAD
    assert len(stand_in_positions) == 1
    return stand_in_positions[0]


# ---- the limit itself ----------------------------------------------------------


def test_message_size_matches_server_limit(nats_server: NatsServer) -> None:
    """A message of exactly max_payload bytes passes and one byte more fails."""
    headers = {"Nats-Msg-Id": "a", "Cairn-Position": "1"}

    async def publish(extra: int) -> bool:
        errors: list[Exception] = []

        async def on_error(error: Exception) -> None:
            errors.append(error)

        client = await nats.connect(
            nats_server.url, allow_reconnect=False, error_cb=on_error
        )
        try:
            subscription = await client.subscribe("probe")
            body = b"x" * (MAX_PAYLOAD - message_size(b"", headers) + extra)
            assert message_size(body, headers) == MAX_PAYLOAD + extra
            await client.publish("probe", body, headers=headers)
            try:
                await subscription.next_msg(timeout=3)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                return False
            return not errors
        finally:
            if not client.is_closed:
                await client.close()

    assert run(publish(0)) is True
    assert run(publish(1)) is False


# ---- the relay -----------------------------------------------------------------


def test_oversized_event_published_as_stand_in(
    registry: Registry, nats_server: NatsServer, data_dir: Path, tmp_path: Path
) -> None:
    large = large_image()
    push(registry, "library/alpine", make_image(), "1")
    push(registry, "library/alpine", large, "big")
    push(registry, "library/alpine", make_image(), "2")
    relay = RelayProcess(
        {
            "nats_url": nats_server.url,
            "database_url": registry.database.url,
            "data_dir": str(data_dir),
        },
        tmp_path / "relay.log",
    )
    try:
        wait_until(lambda: checkpoint_of(registry) == head(registry), WAIT)
    finally:
        relay.stop()

    position = assert_stream_has_stand_in(nats_server.url, registry, large)
    warnings = [
        line
        for line in relay.log_events()
        if line.get("event") == "relay_payload_omitted"
    ]
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning["level"] == "warning"
    assert warning["position"] == position
    assert warning["type"] == "manifest.pushed"
    assert warning["repository"] == "library/alpine"
    assert warning["size"] > MAX_PAYLOAD
    assert warning["limit"] == MAX_PAYLOAD
    assert not relay.logged("relay_publish_failed")


def test_stream_max_msg_size_also_limits(
    registry: Registry, nats_server: NatsServer, data_dir: Path
) -> None:
    """A stream whose max_msg_size is below the server's max_payload."""
    limit = 3000

    async def create_stream() -> None:
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().add_stream(
                StreamConfig(
                    name="CAIRN",
                    subjects=stream_subjects("cairn"),
                    max_msg_size=limit,
                    duplicate_window=120.0,
                )
            )
        finally:
            await client.close()

    run(create_stream())
    # Below the server's limit, above the stream's.
    large = large_image(annotation_size=limit)
    bus = Bus(fast_settings(nats_server.url), registry.database, data_dir)
    with BusThread(bus):
        push(registry, "library/alpine", large, "big")
        push(registry, "library/alpine", make_image(), "small")
        wait_until(lambda: checkpoint_of(registry) == head(registry), WAIT)

    assert_stream_has_stand_in(nats_server.url, registry, large)


# ---- the consumers -------------------------------------------------------------


def manifest_event(cairn_url: str, image: Image) -> dict[str, Any]:
    response = httpx.get(f"{cairn_url}/_cairn/events", params={"limit": 1000})
    for event in response.json()["events"]:
        if event["type"] == "manifest.pushed" and event["payload"]["digest"] == str(
            image.digest
        ):
            return event
    raise AssertionError(f"no manifest.pushed event for {image.digest}")


def test_webhook_delivers_full_event(
    tmp_path: Path,
    nats_server: NatsServer,
    receiver: Receiver,
    start_webhook: Any,
) -> None:
    with cairn_on_nats(tmp_path / "cairn", nats_server.url) as cairn:
        config = write_config(
            tmp_path / "webhook.toml",
            [
                {
                    "name": "cloud",
                    "url": receiver.url("/cloud"),
                    "format": "cloudevents",
                    "event_types": ["manifest.pushed"],
                    "start": "all",
                },
                {
                    "name": "distribution",
                    "url": receiver.url("/distribution"),
                    "event_types": ["manifest.pushed"],
                    "start": "all",
                },
            ],
            extra=f'[registry]\nurl = "{cairn}"\n',
        )
        webhook = start_webhook(config)
        webhook.wait_subscribed(2)
        large, small = large_image(), make_image()
        with httpx.Client(base_url=cairn) as client:
            push_over_http(client, "library/app", large, "big")
            push_over_http(client, "library/app", small, "small")

        wait_until(lambda: len(receiver.of("/cloud")) >= 2, WAIT)
        wait_until(lambda: len(receiver.of("/distribution")) >= 2, WAIT)
        expected = [manifest_event(cairn, large), manifest_event(cairn, small)]

    cloud = [request.json()["data"] for request in receiver.of("/cloud")]
    assert cloud == expected
    assert "payload_omitted" not in cloud[0]
    notification = receiver.of("/distribution")[0].json()["events"][0]
    assert notification["target"]["digest"] == str(large.digest)
    assert notification["target"]["size"] == len(large.manifest)
    assert webhook.count("event_read_from_feed") == 2
    assert webhook.count("event_payload_omitted") == 0


def test_webhook_without_registry_delivers_stand_in(
    tmp_path: Path,
    nats_server: NatsServer,
    receiver: Receiver,
    start_webhook: Any,
) -> None:
    with cairn_on_nats(tmp_path / "cairn", nats_server.url) as cairn:
        config = write_config(
            tmp_path / "webhook.toml",
            [
                {
                    "name": "cloud",
                    "url": receiver.url("/cloud"),
                    "format": "cloudevents",
                    "event_types": ["manifest.pushed"],
                    "start": "all",
                }
            ],
        )
        webhook = start_webhook(config)
        webhook.wait_subscribed(1)
        large = large_image()
        with httpx.Client(base_url=cairn) as client:
            push_over_http(client, "library/app", large, "big")

        wait_until(lambda: len(receiver.of("/cloud")) >= 1, WAIT)
        event = manifest_event(cairn, large)

    data = receiver.of("/cloud")[0].json()["data"]
    assert data["id"] == event["id"]
    assert data["position"] == event["position"]
    assert data["payload"] is None
    assert data["payload_omitted"] is True
    assert webhook.count("event_payload_omitted") == 1


def test_dead_letter_keeps_stand_in(
    tmp_path: Path,
    nats_server: NatsServer,
    receiver: Receiver,
    start_webhook: Any,
) -> None:
    """The dead letter is the small stand-in; redelivery reads the full event."""
    receiver.default_status["/down"] = 500
    with cairn_on_nats(tmp_path / "cairn", nats_server.url) as cairn:
        config = write_config(
            tmp_path / "webhook.toml",
            [
                {
                    "name": "down",
                    "url": receiver.url("/down"),
                    "format": "cloudevents",
                    "event_types": ["manifest.pushed"],
                    "max_attempts": 1,
                    "start": "all",
                }
            ],
            extra=f'[registry]\nurl = "{cairn}"\n',
        )
        webhook = start_webhook(config)
        webhook.wait_subscribed(1)
        large = large_image()
        with httpx.Client(base_url=cairn) as client:
            push_over_http(client, "library/app", large, "big")
        wait_until(lambda: webhook.count("event_dead_lettered") >= 1, WAIT)
        assert webhook.stop() == 0

        listed = cairn_cli(
            "webhook",
            "dead-letters",
            "list",
            "--config",
            str(config),
            "--nats",
            nats_server.url,
            "--json",
        )
        assert listed.returncode == 0, listed.stderr
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        assert len(letters) == 1
        assert letters[0]["event"]["payload_omitted"] is True

        receiver.default_status["/down"] = 200
        redelivered = cairn_cli(
            "webhook",
            "dead-letters",
            "redeliver",
            "--config",
            str(config),
            "--nats",
            nats_server.url,
        )
        assert redelivered.returncode == 0, redelivered.stderr + redelivered.stdout
        event = manifest_event(cairn, large)

    requests = receiver.of("/down")
    assert len(requests) == 2
    assert requests[0].json()["data"]["payload"] == event["payload"]
    assert requests[1].json()["data"] == event


def test_dead_letter_near_limit_omits_payload(nats_server: NatsServer) -> None:
    """An event that fits on NATS alone, but not inside its dead letter."""
    large = {
        "id": "6f0c2a8e-0000-4000-8000-000000000001",
        "position": 7,
        "type": "manifest.pushed",
        "repository": "library/app",
        "time": "2026-12-05T00:00:00.000000Z",
        "schema_version": 1,
        "payload": {"notes": "x" * (MAX_PAYLOAD - 400)},
    }
    small = {**large, "id": "6f0c2a8e-0000-4000-8000-000000000002", "payload": {}}
    assert len(json.dumps(large)) < MAX_PAYLOAD

    async def record() -> list[DeadLetter]:
        client = await nats.connect(nats_server.url)
        try:
            store = DeadLetterStore(
                client.jetstream(),
                "DEAD",
                "dead",
                max_payload=lambda: client.max_payload,
            )
            await store.ensure()
            await store.add("down", large, 3, 500, "HTTP 500: " + "y" * 200)
            await store.add("down", small, 3, 500, "HTTP 500")
            return [letter async for letter in store.list()]
        finally:
            await client.close()

    letters = run(record())

    assert [letter.event_id for letter in letters] == [large["id"], small["id"]]
    assert letters[0].event == {**large, "payload": None, "payload_omitted": True}
    assert letters[0].error == "HTTP 500: " + "y" * 200
    assert letters[1].event == small


def test_mirror_follows_past_stand_in(tmp_path: Path, nats_server: NatsServer) -> None:
    layout = tmp_path / "layout"
    with cairn_on_nats(tmp_path / "cairn", nats_server.url) as cairn:
        with httpx.Client(base_url=cairn) as client:
            push_over_http(client, "library/app", make_image(), "v1")
        log_path = tmp_path / "mirror.log"
        # A long poll interval, so that only NATS can make the mirror prompt.
        mirror = start_mirror(
            cairn,
            f"oci:{layout}",
            log_path,
            "--nats",
            nats_server.url,
            "--poll-interval",
            "300",
        )
        try:

            def following() -> bool:
                assert mirror.poll() is None, log_path.read_text()[-2000:]
                lines = mirror_log_lines(log_path.read_text())
                return "nats_following" in {line["event"] for line in lines}

            wait_until(following, WAIT)
            large = large_image()
            pushed_at = time.monotonic()
            with httpx.Client(base_url=cairn) as client:
                push_over_http(client, "library/app", large, "big")

            def tagged() -> bool:
                assert mirror.poll() is None, log_path.read_text()[-2000:]
                index_path = layout / "library" / "app" / "index.json"
                if not index_path.exists():
                    return False
                index = json.loads(index_path.read_text())
                return any(
                    entry["digest"] == str(large.digest)
                    and (entry.get("annotations") or {}).get(
                        "org.opencontainers.image.ref.name"
                    )
                    == "big"
                    for entry in index["manifests"]
                )

            wait_until(tagged, WAIT)
            # Sooner than the mirror's 30 s resync of the feed.
            assert time.monotonic() - pushed_at < 20
        finally:
            mirror.terminate()
            status = mirror.wait(30)
    assert status == 0
    blob = layout / "library" / "app" / "blobs" / "sha256" / large.digest.encoded
    assert blob.read_bytes() == large.manifest
