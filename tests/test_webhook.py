"""`cairn webhook` end to end: a cairn publishing to a real nats-server, the
webhook as a subprocess, and HTTP receivers in this process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import structlog

from consumers.webhook import dead_letters, worker
from consumers.webhook.config import load_config
from consumers.webhook.positions import PositionStore, StoredPosition
from consumers.webhook.service import cancel_workers
from engine.api.app import create_app
from engine.api.auth import Authenticator, Role, add_user, load_users
from engine.bus import Bus
from engine.bus.settings import DEFAULT_DUPLICATE_WINDOW
from engine.bus.stream import ensure_stream
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import make_image
from tests.nats import (
    BusThread,
    NatsServer,
    fast_settings,
    run,
    wait_for_stream_size,
    wait_until,
)
from tests.server import push_image, running

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-for-tests-only"
WAIT = 60.0


# ---- a cairn that publishes to NATS ------------------------------------------


@contextmanager
def cairn_on_nats(
    directory: Path, nats_url: str, authenticator: Authenticator | None = None
) -> Iterator[str]:
    """Serve a cairn on 127.0.0.1 whose relay publishes to ``nats_url``.

    A second call with the same ``directory`` serves the same registry again.
    """
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry.open(data_dir, f"sqlite:///{directory / 'cairn.db'}")
    upgrade(registry.database)
    bus = Bus(fast_settings(nats_url), registry.database, data_dir)
    try:
        app = create_app(registry, bus, authenticator=authenticator)
        with BusThread(bus), running(app) as server:
            yield server.url
    finally:
        registry.database.dispose()


@pytest.fixture
def cairn(tmp_path: Path, nats_server: NatsServer) -> Iterator[str]:
    with cairn_on_nats(tmp_path / "cairn", nats_server.url) as url:
        yield url


def feed_events(cairn_url: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{cairn_url}/_cairn/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["events"]


def tag_set_events(cairn_url: str) -> list[dict[str, Any]]:
    """Return the tag.set events in the feed of ``cairn_url``."""
    return [e for e in feed_events(cairn_url) if e["type"] == "tag.set"]


def distribution_notified(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the events that an endpoint in Distribution format, receiving
    every type, sends: all but manifest.pushed by tag, whose tag.set
    follows."""
    return [
        e
        for e in events
        if not (e["type"] == "manifest.pushed" and e["payload"].get("tag"))
    ]


# ---- an HTTP receiver ----------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return self.headers["idempotency-key"]

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST.

    ``plan[path]`` lists the statuses to respond with first. After them, and
    for paths without a plan, ``default_status`` applies. A request to a
    path in ``gates`` waits until its gate is set, except the first
    ``gate_after[path]`` requests to that path.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: dict[str, list[int]] = {}
        self.default_status: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}
        self.gate_after: dict[str, int] = {}
        self.delay = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                    planned = receiver.plan.get(self.path)
                    status = (
                        planned.pop(0)
                        if planned
                        else receiver.default_status.get(self.path, 200)
                    )
                    count = sum(r.path == self.path for r in receiver.requests)
                    ungated = receiver.gate_after.get(self.path, 0)
                gate = receiver.gates.get(self.path)
                if gate is not None and count > ungated:
                    gate.wait(WAIT)
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def of(self, path: str) -> list[Received]:
        with self.lock:
            return [request for request in self.requests if request.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    try:
        yield server
    finally:
        for gate in server.gates.values():
            gate.set()
        server.server.shutdown()
        server.server.server_close()


# ---- the webhook process -------------------------------------------------------


class WebhookProcess:
    """`cairn webhook` as a subprocess whose JSON log lines go to a file."""

    def __init__(self, config: Path, nats_url: str, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "engine.cli",
                    "--log-format",
                    "json",
                    "webhook",
                    "--config",
                    str(config),
                    "--nats",
                    nats_url,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=REPO_ROOT,
                env=env,
            )

    def log_events(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def records(self, event: str) -> list[dict[str, Any]]:
        """Return the log lines of ``event``, in order."""
        return [line for line in self.log_events() if line.get("event") == event]

    def count(self, event: str) -> int:
        return len(self.records(event))

    def wait_subscribed(self, endpoints: int) -> None:
        def subscribed() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"cairn webhook exited: {self.log_path.read_text()[-2000:]}"
                )
            return self.count("endpoint_subscribed") >= endpoints

        wait_until(subscribed, WAIT)

    def kill(self) -> None:
        """SIGKILL the webhook by its PID, as a crash would end it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(30)


@pytest.fixture
def start_webhook(tmp_path: Path, nats_server: NatsServer) -> Iterator[Any]:
    started: list[WebhookProcess] = []

    def start(config: Path) -> WebhookProcess:
        process = WebhookProcess(
            config, nats_server.url, tmp_path / f"webhook-{len(started)}.log"
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


def toml_value(value: Any) -> str:
    """Encode strings, numbers, lists and flat tables; JSON strings are TOML's."""
    if isinstance(value, dict):
        pairs = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{ " + pairs + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def write_config(path: Path, endpoints: list[dict[str, Any]], extra: str = "") -> Path:
    lines = [extra]
    for endpoint in endpoints:
        lines.append("[[endpoints]]")
        for key, value in endpoint.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def delete_stream(nats_url: str) -> None:
    """Delete the CAIRN stream, which also deletes its consumers."""

    async def delete() -> None:
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().delete_stream("CAIRN")
        finally:
            await client.close()

    run(delete())


def create_stream(nats_url: str) -> None:
    """Create the CAIRN stream as the relay of cairn serve does."""

    async def create() -> None:
        client = await nats.connect(nats_url)
        try:
            await ensure_stream(
                client.jetstream(), "CAIRN", "cairn", DEFAULT_DUPLICATE_WINDOW
            )
        finally:
            await client.close()

    run(create())


def cairn_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-format", "json", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=WAIT,
    )


def run_dead_letters(
    command: str, config: Path, nats_url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """Run `cairn webhook dead-letters COMMAND` for ``config`` on ``nats_url``."""
    return cairn_cli(
        "webhook",
        "dead-letters",
        command,
        "--config",
        str(config),
        "--nats",
        nats_url,
        *extra,
    )


# ---- tests ----------------------------------------------------------------------


def test_webhook_delivers_both_formats(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "distribution",
                "url": receiver.url("/distribution"),
                "format": "distribution",
                "secret": SECRET,
                "headers": {"Authorization": "Bearer token-for-tests"},
                "repositories": ["library/*"],
                "start": "all",
            },
            {
                "name": "manifests",
                "url": receiver.url("/manifests"),
                "format": "distribution",
                "event_types": ["manifest.pushed"],
                "repositories": ["library/*"],
                "start": "all",
            },
            {
                "name": "cloudevents",
                "url": receiver.url("/cloudevents"),
                "format": "cloudevents",
                "event_types": ["manifest.*", "tag.*"],
                "ignore_media_types": ["application/vnd.docker.*"],
                "start": "all",
            },
        ],
        extra=f'[registry]\nurl = "{cairn}"\n',
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(3)

    image = make_image(layer_count=2)
    docker_image = make_image(docker=True)
    untagged = make_image()
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", image, "v1")
        push_image(client, "library/app", docker_image, "docker")
        push_image(client, "library/app", untagged)
        push_image(client, "other/app", make_image(), "v1")
    events = feed_events(cairn)
    # A manifest pushed by tag gets one push notification, the tag.set's, as
    # in Distribution.
    library = [
        e for e in distribution_notified(events) if e["repository"] == "library/app"
    ]
    pushed_by_tag = [
        e for e in events if e["type"] == "manifest.pushed" and e["payload"].get("tag")
    ]
    assert len(pushed_by_tag) == 3
    wanted_cloud = [
        e
        for e in events
        if e["type"] in ("manifest.pushed", "tag.set")
        and not (
            e["type"] == "manifest.pushed"
            and e["payload"]["media_type"].startswith("application/vnd.docker.")
        )
        and not (e["type"] == "tag.set" and e["payload"]["tag"] == "docker")
    ]

    wait_until(lambda: len(receiver.of("/distribution")) >= len(library), WAIT)
    wait_until(lambda: len(receiver.of("/cloudevents")) >= len(wanted_cloud), WAIT)
    wait_until(lambda: len(receiver.of("/manifests")) >= 3, WAIT)

    distribution = receiver.of("/distribution")
    assert [r.event_id for r in distribution] == [e["id"] for e in library]
    for request, event in zip(distribution, library, strict=True):
        assert request.headers["content-type"] == (
            "application/vnd.docker.distribution.events.v1+json"
        )
        assert request.headers["cairn-event-id"] == event["id"]
        assert request.headers["cairn-event-type"] == event["type"]
        assert request.headers["authorization"] == "Bearer token-for-tests"
        expected = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["cairn-signature"] == f"sha256={expected}"
        envelope = request.json()
        assert len(envelope["events"]) == 1
        notification = envelope["events"][0]
        assert notification["id"] == event["id"]
        assert notification["timestamp"] == event["time"]
        assert notification["target"]["repository"] == "library/app"
        assert notification["request"]["id"] == event["request_id"]
        assert notification["request"]["addr"] == event["actor"]["address"]
        assert notification["source"]["addr"] == cairn.removeprefix("http://")

    by_type = {
        (r.json()["events"][0]["action"], event["type"])
        for r, event in zip(distribution, library, strict=True)
    }
    assert ("push", "blob.pushed") in by_type
    assert ("push", "manifest.pushed") in by_type
    assert ("push", "tag.set") in by_type

    manifest_pushes = [
        r.json()["events"][0]
        for r, e in zip(distribution, library, strict=True)
        if e["type"] == "manifest.pushed"
    ]
    assert len(manifest_pushes) == 1
    manifest_push = manifest_pushes[0]
    assert "tag" not in manifest_push["target"]
    assert manifest_push["target"]["mediaType"] == untagged.media_type
    assert manifest_push["target"]["digest"] == str(untagged.digest)
    assert manifest_push["target"]["size"] == len(untagged.manifest)
    assert manifest_push["target"]["length"] == len(untagged.manifest)
    assert manifest_push["target"]["url"] == (
        f"{cairn}/v2/library/app/manifests/{untagged.digest}"
    )
    tag_push = next(
        r.json()["events"][0]
        for r, e in zip(distribution, library, strict=True)
        if e["type"] == "tag.set" and e["payload"]["tag"] == "v1"
    )
    assert tag_push["target"]["tag"] == "v1"
    assert tag_push["target"]["digest"] == str(image.digest)
    # The webhook looked up what a tag event does not carry.
    assert tag_push["target"]["mediaType"] == image.media_type
    assert tag_push["target"]["size"] == len(image.manifest)
    assert tag_push["target"]["length"] == len(image.manifest)
    assert tag_push["target"]["url"] == (
        f"{cairn}/v2/library/app/manifests/{image.digest}"
    )

    cloud = receiver.of("/cloudevents")
    assert [r.event_id for r in cloud] == [e["id"] for e in wanted_cloud]
    for request, event in zip(cloud, wanted_cloud, strict=True):
        assert request.headers["content-type"] == "application/cloudevents+json"
        assert "cairn-signature" not in request.headers
        document = request.json()
        assert document["specversion"] == "1.0"
        assert document["id"] == event["id"]
        assert document["type"] == "io.cairn." + event["type"]
        assert document["source"] == f"{cairn}/v2/{event['repository']}"
        assert document["time"] == event["time"]
        assert document["datacontenttype"] == "application/json"
        assert document["data"] == event
    subjects = [r.json()["subject"] for r in cloud]
    assert subjects[:2] == [str(image.digest), "v1"]
    assert len(subjects) == 5

    # Without tag.set, a Distribution-format endpoint gets the push by tag
    # from manifest.pushed, with the tag.
    manifests_only = receiver.of("/manifests")
    targets = [r.json()["events"][0]["target"] for r in manifests_only]
    assert [t["digest"] for t in targets] == [
        str(image.digest),
        str(docker_image.digest),
        str(untagged.digest),
    ]
    assert [t.get("tag") for t in targets] == ["v1", "docker", None]

    assert SECRET not in webhook.log_path.read_text()
    assert webhook.stop() == 0
    assert webhook.count("webhook_stopped") == 1


def test_registry_credentials_only_in_lookups(
    tmp_path: Path, nats_server: NatsServer, receiver: Receiver, start_webhook: Any
) -> None:
    users = tmp_path / "users"
    add_user(users, "hook", Role.PULL, "hook-password-1")
    add_user(users, "pusher", Role.PUSH, "pusher-password-1")
    authenticator = Authenticator(load_users(users))
    image = make_image()

    with cairn_on_nats(tmp_path / "cairn", nats_server.url, authenticator) as cairn:
        with_credentials = cairn.replace("http://", "http://hook:hook-password-1@")
        config = write_config(
            tmp_path / "webhook.toml",
            [{"name": "ci", "url": receiver.url("/ci"), "start": "all"}],
            extra=f'[registry]\nurl = "{with_credentials}"\n',
        )
        webhook = start_webhook(config)
        webhook.wait_subscribed(1)
        with httpx.Client(
            base_url=cairn, auth=("pusher", "pusher-password-1")
        ) as client:
            push_image(client, "library/app", image, "v1")

        wait_until(lambda: len(receiver.of("/ci")) >= 3, WAIT)

    requests = receiver.of("/ci")
    for request in requests:
        assert b"hook-password-1" not in request.body
        assert "hook-password-1" not in json.dumps(request.headers)
    tag_push = requests[-1].json()["events"][0]
    assert tag_push["target"]["tag"] == "v1"
    assert (
        tag_push["target"]["url"] == f"{cairn}/v2/library/app/manifests/{image.digest}"
    )
    assert tag_push["source"]["addr"] == cairn.removeprefix("http://")
    # The look-up of the tag's manifest used the credentials.
    assert tag_push["target"]["mediaType"] == image.media_type
    assert tag_push["target"]["size"] == len(image.manifest)


def test_webhook_retries_until_receiver_recovers(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    receiver.plan["/flaky"] = [500, 503, 500]
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "flaky",
                "url": receiver.url("/flaky"),
                "event_types": ["manifest.pushed"],
                "backoff_initial": "50ms",
                "backoff_max": "200ms",
                "max_attempts": 10,
                "start": "all",
            }
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    first, second = make_image(), make_image()
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", first)
        push_image(client, "library/app", second)
    pushed = [e["id"] for e in feed_events(cairn) if e["type"] == "manifest.pushed"]

    wait_until(lambda: len(receiver.of("/flaky")) >= 5, WAIT)

    requests = receiver.of("/flaky")
    assert [r.event_id for r in requests] == [pushed[0]] * 4 + [pushed[1]]
    assert [r.headers["cairn-delivery-attempt"] for r in requests] == [
        "1",
        "2",
        "3",
        "4",
        "1",
    ]
    # The receiver records a request before the webhook reads its response
    # and logs the delivery.
    wait_until(lambda: webhook.count("event_delivered") >= 2, WAIT)
    assert webhook.count("delivery_failed") == 3
    assert webhook.count("event_delivered") == 2


def test_webhook_restart_loses_nothing(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    receiver.delay = 0.05
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "steady",
                "url": receiver.url("/steady"),
                "timeout": "1s",
                "ack_wait": "2s",
                "start": "all",
            }
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        for index in range(4):
            push_image(client, f"library/app{index}", make_image(), "v1")

        wait_until(lambda: len(receiver.of("/steady")) >= 3, WAIT)
        webhook.kill()
        for index in range(4, 6):
            push_image(client, f"library/app{index}", make_image(), "v1")

    # The restart also changes the ack wait, which updates the consumer.
    config.write_text(config.read_text().replace('ack_wait = "2s"', 'ack_wait = "3s"'))
    restarted = start_webhook(config)
    expected = [e["id"] for e in distribution_notified(feed_events(cairn))]
    wait_until(
        lambda: {r.event_id for r in receiver.of("/steady")} >= set(expected), WAIT
    )

    received = [r.event_id for r in receiver.of("/steady")]
    assert set(received) == set(expected)
    # At most the event in flight at the kill is delivered twice.
    assert len(received) - len(expected) <= 1
    first_seen = list(dict.fromkeys(received))
    assert first_seen == expected
    assert restarted.count("consumer_updated") == 1
    assert restarted.stop() == 0


def test_webhook_survives_nats_restart(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "steady",
                "url": receiver.url("/steady"),
                "event_types": ["tag.set"],
            }
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "before")
        wait_until(lambda: len(receiver.of("/steady")) >= 1, WAIT)

        nats_server.stop()
        push_image(client, "library/app", make_image(), "during")
        nats_server.start()
        push_image(client, "library/app", make_image(), "after")

    tags = [e["id"] for e in tag_set_events(cairn)]
    wait_until(lambda: {r.event_id for r in receiver.of("/steady")} >= set(tags), WAIT)
    assert list(dict.fromkeys(r.event_id for r in receiver.of("/steady"))) == tags
    assert webhook.process.poll() is None


@pytest.mark.parametrize("status_after_restart", [200, 500])
def test_attempt_cut_off_by_stop_not_counted(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
    status_after_restart: int,
) -> None:
    """A stop during the last attempt hands the event back uncounted, so
    the restarted webhook makes that attempt again."""
    # Attempts 1 and 2 get 500, and attempt 3 waits at the gate until the
    # webhook stops.
    receiver.plan["/slow"] = [500, 500, 500]
    receiver.gates["/slow"] = threading.Event()
    receiver.gate_after["/slow"] = 2
    receiver.default_status["/slow"] = status_after_restart
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "slow",
                "url": receiver.url("/slow"),
                "event_types": ["tag.set"],
                "timeout": "30s",
                "backoff_initial": "50ms",
                "backoff_max": "100ms",
                "max_attempts": 3,
            }
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "v1")
    tag = tag_set_events(cairn)[0]
    wait_until(lambda: len(receiver.of("/slow")) >= 3, WAIT)
    assert webhook.stop() == 0
    receiver.gates["/slow"].set()

    restarted = start_webhook(config)
    wait_until(
        lambda: (
            len(receiver.of("/slow")) >= 4
            or restarted.count("event_dead_lettered") >= 1
        ),
        WAIT,
    )

    requests = receiver.of("/slow")
    assert [r.event_id for r in requests] == [tag["id"]] * 4
    assert [r.headers["cairn-delivery-attempt"] for r in requests] == [
        "1",
        "2",
        "3",
        "3",
    ]
    if status_after_restart == 200:
        wait_until(lambda: restarted.count("event_delivered") >= 1, WAIT)
        assert restarted.count("event_dead_lettered") == 0
        listed = run_dead_letters("list", config, nats_server.url, "--json")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout == ""
    else:
        # The dead letter records the failure of the attempt made after
        # the restart.
        wait_until(lambda: restarted.count("event_dead_lettered") >= 1, WAIT)
        dead = restarted.records("event_dead_lettered")[0]
        assert dead["attempts"] == 3
        assert dead["status"] == 500
        assert dead["error"] == "HTTP 500"
        listed = run_dead_letters("list", config, nats_server.url, "--json")
        assert listed.returncode == 0, listed.stderr
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        assert len(letters) == 1
        assert letters[0]["attempts"] == 3
        assert letters[0]["status"] == 500
        assert letters[0]["error"] == "HTTP 500"
    assert restarted.stop() == 0


def test_dead_letter_after_restart_keeps_failure(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    """An event whose stored failures already use up max_attempts at a
    restart, here because max_attempts was lowered, is dead-lettered with
    the last failure and without a new attempt."""
    receiver.plan["/slow"] = [503, 503]
    receiver.gates["/slow"] = threading.Event()
    receiver.gate_after["/slow"] = 2
    endpoint = {
        "name": "slow",
        "url": receiver.url("/slow"),
        "event_types": ["tag.set"],
        "timeout": "30s",
        "backoff_initial": "50ms",
        "backoff_max": "100ms",
        "max_attempts": 5,
    }
    config = write_config(tmp_path / "webhook.toml", [endpoint])
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "v1")
    wait_until(lambda: len(receiver.of("/slow")) >= 3, WAIT)
    assert webhook.stop() == 0

    write_config(config, [{**endpoint, "max_attempts": 2}])
    restarted = start_webhook(config)
    wait_until(lambda: restarted.count("event_dead_lettered") >= 1, WAIT)

    assert len(receiver.of("/slow")) == 3
    listed = run_dead_letters("list", config, nats_server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(letters) == 1
    assert letters[0]["attempts"] == 2
    assert letters[0]["status"] == 503
    assert letters[0]["error"] == "HTTP 503"
    assert restarted.stop() == 0


def test_webhook_slow_endpoint_delays_no_other(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    receiver.gates["/stuck"] = threading.Event()
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {"name": "stuck", "url": receiver.url("/stuck"), "timeout": "30s"},
            {"name": "fast", "url": receiver.url("/fast")},
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(2)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "v1")
        push_image(client, "library/app", make_image(), "v2")
    expected = [e["id"] for e in distribution_notified(feed_events(cairn))]

    wait_until(lambda: len(receiver.of("/fast")) >= len(expected), WAIT)

    assert [r.event_id for r in receiver.of("/fast")] == expected
    # The stuck endpoint is still waiting for its first response.
    assert [r.event_id for r in receiver.of("/stuck")] == expected[:1]
    receiver.gates["/stuck"].set()
    wait_until(lambda: len(receiver.of("/stuck")) >= len(expected), WAIT)
    assert [r.event_id for r in receiver.of("/stuck")] == expected


def test_webhook_dead_letters_and_redelivery(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    receiver.default_status["/down"] = 500
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "down",
                "url": receiver.url("/down"),
                "secret": SECRET,
                "event_types": ["tag.set"],
                "backoff_initial": "50ms",
                "backoff_max": "100ms",
                "max_attempts": 2,
                "start": "all",
            }
        ],
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "v1")
        push_image(client, "library/app", make_image(), "v2")
    tag_events = tag_set_events(cairn)

    wait_until(lambda: webhook.count("event_dead_lettered") >= 2, WAIT)
    assert len(receiver.of("/down")) == 4

    listed = run_dead_letters("list", config, nats_server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [letter["event"]["id"] for letter in letters] == [
        e["id"] for e in tag_events
    ]
    assert {letter["endpoint"] for letter in letters} == {"down"}
    assert {letter["attempts"] for letter in letters} == {2}
    assert {letter["status"] for letter in letters} == {500}

    # Still down: the redelivery fails and keeps both records.
    failed = run_dead_letters("redeliver", config, nats_server.url)
    assert failed.returncode == 1
    assert "0 redelivered, 2 kept" in failed.stdout

    receiver.default_status["/down"] = 204
    only_first = run_dead_letters(
        "redeliver", config, nats_server.url, "--event-id", tag_events[0]["id"]
    )
    assert only_first.returncode == 0, only_first.stdout + only_first.stderr
    assert "1 redelivered, 0 kept" in only_first.stdout
    # That dead letter is gone, so asking for it again is an error.
    again = run_dead_letters(
        "redeliver", config, nats_server.url, "--event-id", tag_events[0]["id"]
    )
    assert again.returncode == 1
    assert f"not found {tag_events[0]['id']}: no dead letter" in again.stdout
    assert "0 redelivered, 0 kept, 1 not found" in again.stdout
    rest = run_dead_letters("redeliver", config, nats_server.url)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "1 redelivered, 0 kept" in rest.stdout

    delivered = [r for r in receiver.of("/down")][-2:]
    assert [r.event_id for r in delivered] == [e["id"] for e in tag_events]
    for request in delivered:
        expected = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["cairn-signature"] == f"sha256={expected}"
        assert request.headers["cairn-delivery-attempt"] == "3"

    empty = run_dead_letters("list", config, nats_server.url)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "0 dead letter(s)"
    assert SECRET not in webhook.log_path.read_text()


# Marks a field that dead_letter_event leaves out.
MISSING = object()


def dead_letter_event(event_id: str, **changes: Any) -> dict[str, Any]:
    """Return a tag.set event as a dead letter records it, with ``changes``."""
    event = {
        "id": event_id,
        "position": 1,
        "type": "tag.set",
        "repository": "library/app",
        "time": "2024-05-01T12:00:00.000000Z",
        "schema_version": 1,
        "actor": {"user": None, "address": "127.0.0.1"},
        "payload": {"tag": "v1", "digest": "sha256:" + "a" * 64, "previous": None},
    }
    event.update(changes)
    return {key: value for key, value in event.items() if value is not MISSING}


# (stored record, expected problem), published on the subject of endpoint "up".
INVALID_DEAD_LETTERS = [
    (
        {
            "endpoint": "up",
            "attempts": 3,
            "status": 500,
            "error": "HTTP 500",
            "failed_at": "2024-05-01T12:00:01.000000Z",
            "event": dead_letter_event("no-time", time=MISSING),
        },
        "event field 'time' is missing",
    ),
    (
        {
            "endpoint": "up",
            "attempts": "many",
            "status": 500,
            "error": "HTTP 500",
            "failed_at": "2024-05-01T12:00:01.000000Z",
            "event": dead_letter_event("text-attempts"),
        },
        "field 'attempts' is 'many', expected a whole number, 0 or more",
    ),
    (
        {
            "endpoint": "up",
            "attempts": 3,
            "status": None,
            "error": None,
            "failed_at": "2024-05-01T12:00:01.000000Z",
            "event": "not an event",
        },
        "the event is a JSON string, expected a JSON object",
    ),
    ([1, 2], "the record is [1, 2], expected a JSON object"),
    ("{not json", "the record is not JSON"),
]


def test_invalid_dead_letters_reported(
    tmp_path: Path, receiver: Receiver, nats_server: NatsServer
) -> None:
    config = write_config(
        tmp_path / "webhook.toml",
        [{"name": "up", "url": receiver.url("/up")}],
        extra=f'[nats]\nurl = "{nats_server.url}"\n',
    )
    valid = {
        "endpoint": "up",
        "attempts": 3,
        "status": 500,
        "error": "HTTP 500",
        "failed_at": "2024-05-01T12:00:01.000000Z",
        "event": dead_letter_event("valid"),
    }
    # Valid, but of a type that a newer cairn might publish.
    unknown_type = {**valid, "event": dead_letter_event("new-type", type="repo.moved")}

    async def record() -> None:
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            store = dead_letters.DeadLetterStore(
                js, "CAIRN_WEBHOOK_DEAD_LETTERS", "cairn-webhook-dead-letters"
            )
            await store.ensure()
            stored = [record for record, _problem in INVALID_DEAD_LETTERS]
            for document in [*stored, unknown_type, valid]:
                data = document if isinstance(document, str) else json.dumps(document)
                await js.publish("cairn-webhook-dead-letters.up", data.encode())
        finally:
            await client.close()

    asyncio.run(record())

    listed = cairn_cli("webhook", "dead-letters", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    lines = listed.stdout.splitlines()
    for sequence, (_record, problem) in enumerate(INVALID_DEAD_LETTERS, start=1):
        line = lines[sequence - 1]
        assert line.split()[0] == str(sequence)
        assert f"invalid: {problem}" in line
    assert "new-type" in lines[len(INVALID_DEAD_LETTERS)]
    assert "valid" in lines[len(INVALID_DEAD_LETTERS) + 1]
    assert lines[-1] == "7 dead letter(s), 5 invalid, which redeliver keeps"
    warnings = [
        json.loads(line)
        for line in listed.stderr.splitlines()
        if '"dead_letter_invalid"' in line
    ]
    assert [warning["sequence"] for warning in warnings] == [1, 2, 3, 4, 5]

    as_json = cairn_cli(
        "webhook", "dead-letters", "list", "--json", "--config", str(config)
    )
    assert as_json.returncode == 0, as_json.stderr
    documents = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert documents[0]["problem"] == "event field 'time' is missing"
    assert documents[0]["event"]["id"] == "no-time"
    assert "problem" not in documents[-1]

    redelivered = cairn_cli(
        "webhook", "dead-letters", "redeliver", "--config", str(config)
    )
    assert redelivered.returncode == 1, redelivered.stderr
    assert "Traceback" not in redelivered.stderr
    output = redelivered.stdout
    for sequence, (_record, problem) in enumerate(INVALID_DEAD_LETTERS, start=1):
        assert f"kept dead letter {sequence}: invalid: {problem}" in output
    assert "nats stream rmm CAIRN_WEBHOOK_DEAD_LETTERS 1`" in output
    assert "kept new-type: event type 'repo.moved' is unknown" in output
    assert "delivered valid to up" in output
    assert output.splitlines()[-1] == "1 redelivered, 6 kept"
    assert [request.event_id for request in receiver.of("/up")] == ["valid"]

    again = cairn_cli("webhook", "dead-letters", "list", "--config", str(config))
    assert again.stdout.splitlines()[-1] == (
        "6 dead letter(s), 5 invalid, which redeliver keeps"
    )


def test_webhook_rejects_invalid_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "webhook.toml",
        [{"name": "bad name", "url": "http://127.0.0.1:1/hook"}],
    )

    result = cairn_cli("webhook", "--config", str(config))

    assert result.returncode == 2
    assert "invalid name 'bad name'" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["webhook"],
        ["webhook", "dead-letters", "list"],
        ["webhook", "dead-letters", "redeliver"],
    ],
    ids=" ".join,
)
def test_webhook_usage_requires_config(command: list[str]) -> None:
    shown = cairn_cli(*command, "--help")
    missing = cairn_cli(*command)

    assert shown.returncode == 0, shown.stderr
    usage = " ".join(shown.stdout.partition("\n\n")[0].split())
    assert usage.startswith(f"usage: cairn {' '.join(command)} ")
    assert " --config FILE " in usage
    assert "[--config" not in usage
    assert missing.returncode == 2
    assert f"cairn {' '.join(command)}: --config FILE is required" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_webhook_usage_lists_optional_command() -> None:
    shown = cairn_cli("webhook", "--help")

    assert shown.stdout.startswith(
        "usage: cairn webhook [-h] --config FILE [--nats NATS_URL] [COMMAND ...]\n"
    )


def test_redeliver_rejects_unknown_endpoint(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {"name": "down", "url": "http://127.0.0.1:1/down"},
            {"name": "up", "url": "http://127.0.0.1:1/up"},
        ],
    )
    with socket.socket() as unused:
        # Bound but not listening, so a connection to NATS would fail.
        unused.bind(("127.0.0.1", 0))
        nats_url = f"nats://127.0.0.1:{unused.getsockname()[1]}"
        common = ["--config", str(config), "--nats", nats_url, "--endpoint", "nope"]

        redelivered = cairn_cli("webhook", "dead-letters", "redeliver", *common)
        listed = cairn_cli("webhook", "dead-letters", "list", *common)

    assert redelivered.returncode == 2, redelivered.stderr
    assert f"endpoint 'nope' not found in {config}" in redelivered.stderr
    assert "it defines down, up" in redelivered.stderr
    assert "Traceback" not in redelivered.stderr
    # list accepts the name, since the dead letters of an endpoint removed
    # from the configuration stay listed, and fails only on NATS.
    assert listed.returncode == 1, listed.stderr
    assert "not found in" not in listed.stderr


def test_dead_letter_stream_created_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = structlog.testing.CapturingLogger()
    monkeypatch.setattr(
        dead_letters,
        "log",
        structlog.wrap_logger(
            captured, processors=[], wrapper_class=structlog.BoundLogger
        ),
    )

    async def ensure_from_three_workers() -> None:
        client = await nats.connect(nats_server.url)
        try:
            store = dead_letters.DeadLetterStore(
                client.jetstream(), "DEADLETTERS", "dead"
            )
            await asyncio.gather(*(store.ensure() for _ in range(3)))
            info = await client.jetstream().stream_info("DEADLETTERS")
            assert info.config.subjects == ["dead.>"]
        finally:
            await client.close()

    asyncio.run(ensure_from_three_workers())

    events = [call.kwargs.get("event") for call in captured.calls]
    assert events.count("dead_letter_stream_created") == 1


def test_failed_position_write_logged_as_error(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = structlog.testing.CapturingLogger()
    monkeypatch.setattr(
        worker,
        "log",
        structlog.wrap_logger(
            captured, processors=[], wrapper_class=structlog.BoundLogger
        ),
    )
    config = load_config(
        write_config(
            tmp_path / "webhook.toml",
            [{"name": "steady", "url": "http://127.0.0.1:1/steady"}],
        )
    )

    async def write_after_close() -> None:
        client = await nats.connect(nats_server.url)
        js = client.jetstream()
        endpoint_worker = worker.EndpointWorker(
            config.endpoints[0],
            config,
            js,
            dead_letters.DeadLetterStore(js, "DEADLETTERS", "dead"),
            PositionStore(js),
            None,
        )
        endpoint_worker.last_settled = StoredPosition(7, "event-7", "new")
        await client.close()
        await endpoint_worker.write_position()

    asyncio.run(write_after_close())

    failed = [
        c for c in captured.calls if c.kwargs.get("event") == "position_write_failed"
    ]
    assert len(failed) == 1
    assert failed[0].method_name == "error"
    assert failed[0].kwargs["position"] == 7
    assert failed[0].kwargs["endpoint"] == "steady"


def test_tag_push_of_deleted_manifest_keeps_facts(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    # Replayed from the start, the tag's push is delivered after its manifest
    # was deleted, so the registry no longer serves it: the facts come from
    # the manifest.pushed event read before it.
    image = make_image()
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/gone", image, "v1")
        deleted = client.delete(f"/v2/library/gone/manifests/{image.digest}")
        assert deleted.status_code == 202, deleted.text
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {
                "name": "distribution",
                "url": receiver.url("/distribution"),
                "format": "distribution",
                "event_types": ["tag.set"],
                "start": "all",
            },
        ],
        extra=f'[registry]\nurl = "{cairn}"\n',
    )
    webhook = start_webhook(config)

    wait_until(lambda: len(receiver.of("/distribution")) >= 1, WAIT)

    target = receiver.of("/distribution")[0].json()["events"][0]["target"]
    assert target["tag"] == "v1"
    assert target["mediaType"] == image.media_type
    assert target["size"] == len(image.manifest)
    assert webhook.stop() == 0


def tag_endpoint(receiver: Receiver, **settings: str) -> dict[str, Any]:
    """Return an endpoint of tag.set events in CloudEvents at /tags."""
    return {
        "name": "tags",
        "url": receiver.url("/tags"),
        "format": "cloudevents",
        "event_types": ["tag.set"],
        **settings,
    }


def start_tag_webhook(
    start_webhook: Any, tmp_path: Path, receiver: Receiver, **settings: str
) -> WebhookProcess:
    """Start a webhook with one tag_endpoint and wait until it subscribes."""
    config = write_config(
        tmp_path / "webhook.toml", [tag_endpoint(receiver, **settings)]
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    return webhook


def wait_delivered(receiver: Receiver, path: str, event_id: str) -> None:
    """Wait until ``receiver`` has a request for ``event_id`` at ``path``."""
    wait_until(lambda: event_id in {r.event_id for r in receiver.of(path)}, WAIT)


def check_tags_delivered(
    cairn: str, receiver: Receiver, expected: list[str]
) -> list[dict[str, Any]]:
    """Check that ``expected`` tags were set and that /tags got each once, in order."""
    tags = tag_set_events(cairn)
    assert [e["payload"]["tag"] for e in tags] == expected
    wait_delivered(receiver, "/tags", tags[-1]["id"])
    assert [r.event_id for r in receiver.of("/tags")] == [e["id"] for e in tags]
    return tags


def test_webhook_warns_of_unstored_prefix(
    tmp_path: Path, cairn: str, receiver: Receiver, start_webhook: Any
) -> None:
    """A subject prefix that the stream does not store is logged, and the
    endpoint's consumer, which has no subject filter, still delivers."""
    config = write_config(
        tmp_path / "webhook.toml",
        [tag_endpoint(receiver)],
        extra='[nats]\nsubject_prefix = "other"\n',
    )
    webhook = start_webhook(config)
    webhook.wait_subscribed(1)
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "v1")
    check_tags_delivered(cairn, receiver, ["v1"])

    [warning] = webhook.records("stream_subject_not_stored")
    assert warning["level"] == "warning"
    assert warning["endpoint"] == "tags"
    assert warning["stream"] == "CAIRN"
    assert warning["subject_prefix"] == "other"
    assert warning["error"] == (
        "stream CAIRN stores no subject under the subject prefix 'other', only "
        "cairn.blob.>, cairn.manifest.>, cairn.tag.>; set [nats] subject_prefix "
        "to the subject prefix of the cairn serve that publishes to it"
    )


def test_webhook_resumes_after_stream_deleted(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    webhook = start_tag_webhook(start_webhook, tmp_path, receiver, start="new")
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "before")
        wait_until(lambda: len(receiver.of("/tags")) >= 1, WAIT)

        # The relay creates the stream again and publishes these events at
        # once, while the webhook only notices the loss of its consumer when
        # its current fetch ends.
        delete_stream(nats_server.url)
        push_image(client, "library/app", make_image(), "after")
        wait_for_stream_size(nats_server.url, 4)
        wait_until(lambda: webhook.count("endpoint_subscribed") >= 2, WAIT)
        push_image(client, "library/app", make_image(), "later")

    tags = check_tags_delivered(cairn, receiver, ["before", "after", "later"])
    recreated = webhook.records("consumer_recreated")
    assert len(recreated) == 1
    assert recreated[0]["level"] == "warning"
    assert recreated[0]["consumer"] == "cairn-webhook-tags"
    assert recreated[0]["after_position"] == tags[0]["position"]
    assert webhook.count("consumer_created") == 1


def test_webhook_skips_republished_events(
    tmp_path: Path, receiver: Receiver, start_webhook: Any, nats_server: NatsServer
) -> None:
    directory = tmp_path / "cairn"
    config = write_config(
        tmp_path / "webhook.toml",
        [{"name": "steady", "url": receiver.url("/steady"), "start": "all"}],
    )
    with cairn_on_nats(directory, nats_server.url) as cairn:
        webhook = start_webhook(config)
        webhook.wait_subscribed(1)
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "v1")
            push_image(client, "library/app", make_image(), "v2")
        delivered = [e["id"] for e in distribution_notified(feed_events(cairn))]
        wait_until(lambda: len(receiver.of("/steady")) >= len(delivered), WAIT)

    # A republish into a new stream, as `cairn events republish --help`
    # advises. The webhook re-creates its consumer on the empty stream
    # before the relay refills it with the eight events delivered above.
    delete_stream(nats_server.url)
    create_stream(nats_server.url)
    wait_until(lambda: webhook.count("endpoint_subscribed") >= 2, WAIT)
    republish_from_start(directory)
    with cairn_on_nats(directory, nats_server.url) as cairn:
        wait_for_stream_size(nats_server.url, 8)
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "v3")
        expected = [e["id"] for e in distribution_notified(feed_events(cairn))]

    wait_delivered(receiver, "/steady", expected[-1])
    assert [r.event_id for r in receiver.of("/steady")] == expected
    recreated = webhook.records("consumer_recreated")
    assert len(recreated) == 1
    assert recreated[0]["after_position"] == 8
    assert recreated[0]["start_sequence"] == 1
    skipped = webhook.records("handled_events_skipped")
    assert len(skipped) == 1
    assert skipped[0]["count"] == 8
    assert skipped[0]["through_position"] == 8


def republish_from_start(directory: Path) -> None:
    """Make the cairn served from ``directory`` publish its log again from
    position 1 when it is served next."""
    result = cairn_cli(
        "events",
        "republish",
        "--data-dir",
        str(directory / "data"),
        "--database",
        f"sqlite:///{directory / 'cairn.db'}",
        "--from",
        "1",
    )
    assert result.returncode == 0, result.stderr


def stored_positions(nats_url: str, endpoints: list[str]) -> dict[str, int | None]:
    """Return each endpoint's position in the position bucket, None where
    none is stored."""

    async def read() -> dict[str, int | None]:
        client = await nats.connect(nats_url)
        try:
            store = PositionStore(client.jetstream())
            found: dict[str, int | None] = {}
            for endpoint in endpoints:
                stored = await store.read("CAIRN", endpoint)
                found[endpoint] = stored.position if stored is not None else None
            return found
        finally:
            await client.close()

    return run(read())


def test_position_bucket_recreated_after_store_loss(
    tmp_path: Path, receiver: Receiver, start_webhook: Any, nats_server: NatsServer
) -> None:
    """A webhook that runs while the NATS server loses its whole store
    creates the position bucket again, so a later restart without consumers
    resumes after the last event delivered."""
    directory = tmp_path / "cairn"
    endpoints = ["first", "second"]
    config = write_config(
        tmp_path / "webhook.toml",
        [
            {"name": name, "url": receiver.url(f"/{name}"), "start": "all"}
            for name in endpoints
        ],
    )
    with cairn_on_nats(directory, nats_server.url) as cairn:
        webhook = start_webhook(config)
        webhook.wait_subscribed(2)
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "v1")
        before = distribution_notified(feed_events(cairn))
        for name in endpoints:
            wait_delivered(receiver, f"/{name}", before[-1]["id"])
    # Stored before NATS stops, so that no write fails while it is down.
    first_stored = {name: before[-1]["position"] for name in endpoints}
    wait_until(lambda: stored_positions(nats_server.url, endpoints) == first_stored)

    # The NATS server starts again with an empty store, the cairn publishes
    # its log again into the new stream, and one more tag follows.
    nats_server.stop()
    shutil.rmtree(nats_server.directory / "jetstream")
    nats_server.start()
    republish_from_start(directory)
    with cairn_on_nats(directory, nats_server.url) as cairn:
        wait_for_stream_size(nats_server.url, 4)
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "v2")
        expected = distribution_notified(feed_events(cairn))
        for name in endpoints:
            wait_delivered(receiver, f"/{name}", expected[-1]["id"])
    assert webhook.stop() == 0

    assert webhook.count("position_write_failed") == 0
    last = expected[-1]["position"]
    assert stored_positions(nats_server.url, endpoints) == {
        "first": last,
        "second": last,
    }

    # Without consumers, a restart resumes after the stored positions, so
    # the endpoints receive only the tag pushed next.
    delete_stream(nats_server.url)
    with cairn_on_nats(directory, nats_server.url) as cairn:
        restarted = start_webhook(config)
        restarted.wait_subscribed(2)
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "v3")
        expected = distribution_notified(feed_events(cairn))
        for name in endpoints:
            wait_delivered(receiver, f"/{name}", expected[-1]["id"])
    for name in endpoints:
        received = [r.event_id for r in receiver.of(f"/{name}")]
        assert received == [e["id"] for e in expected]
    assert restarted.stop() == 0


def push_across_lost_stream(cairn: str, receiver: Receiver, nats_url: str) -> None:
    """Push tags first, second and third, and delete the stream that
    contains "second"."""
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "first")
        wait_until(lambda: len(receiver.of("/tags")) >= 1, WAIT)
        # While the webhook waits for the response about "first", which the
        # caller's gate on /tags holds, the relay publishes "second" and the
        # stream is deleted with it. The relay then creates a stream that
        # begins after "second".
        push_image(client, "library/app", make_image(), "second")
        wait_for_stream_size(nats_url, 8)
        delete_stream(nats_url)
        push_image(client, "library/app", make_image(), "third")
        wait_for_stream_size(nats_url, 4)


def test_webhook_logs_events_missing_from_stream(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    receiver.gates["/tags"] = threading.Event()
    webhook = start_tag_webhook(start_webhook, tmp_path, receiver, timeout="30s")
    push_across_lost_stream(cairn, receiver, nats_server.url)
    receiver.gates["/tags"].set()

    tags = tag_set_events(cairn)
    assert [e["payload"]["tag"] for e in tags] == ["first", "second", "third"]
    wait_delivered(receiver, "/tags", tags[-1]["id"])
    assert [r.event_id for r in receiver.of("/tags")] == [
        tags[0]["id"],
        tags[2]["id"],
    ]
    missing = webhook.records("events_missing_from_stream")
    assert len(missing) == 1
    assert missing[0]["level"] == "error"
    assert missing[0]["first_missing"] == tags[0]["position"] + 1
    assert missing[0]["last_missing"] == tags[1]["position"]
    assert f"after={tags[0]['position']}" in missing[0]["note"]
    assert "set [registry] url" in missing[0]["note"]


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_webhook_resumes_consumer_deleted_while_stopped(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
    ending: str,
) -> None:
    webhook = start_tag_webhook(start_webhook, tmp_path, receiver, start="new")
    with httpx.Client(base_url=cairn) as client:
        push_image(client, "library/app", make_image(), "before")
        wait_until(lambda: len(receiver.of("/tags")) >= 1, WAIT)
        if ending == "stop":
            assert webhook.stop() == 0
        else:
            # A crash loses no more than the last second's position.
            time.sleep(2.5)
            webhook.kill()

        # The stream and the consumer go while no webhook runs, and the
        # relay publishes "during" into a new stream before the restart.
        delete_stream(nats_server.url)
        push_image(client, "library/app", make_image(), "during")
        wait_for_stream_size(nats_server.url, 4)
        restarted = start_webhook(webhook.config)
        restarted.wait_subscribed(1)
        push_image(client, "library/app", make_image(), "after")

    tags = check_tags_delivered(cairn, receiver, ["before", "during", "after"])
    recreated = restarted.records("consumer_recreated")
    assert len(recreated) == 1
    assert recreated[0]["after_position"] == tags[0]["position"]
    assert restarted.count("consumer_created") == 0
    assert restarted.stop() == 0


def deliver_and_stop(
    start_webhook: Any,
    tmp_path: Path,
    receiver: Receiver,
    cairn: str,
    tags: list[str],
) -> WebhookProcess:
    """Start a tag webhook from the stream's start, deliver ``tags``, then stop it."""
    webhook = start_tag_webhook(start_webhook, tmp_path, receiver, start="all")
    with httpx.Client(base_url=cairn) as client:
        for tag in tags:
            push_image(client, "library/app", make_image(), tag)
    wait_until(lambda: len(receiver.of("/tags")) >= len(tags), WAIT)
    assert webhook.stop() == 0
    return webhook


def test_stored_position_of_other_registry_ignored(
    tmp_path: Path, receiver: Receiver, start_webhook: Any, nats_server: NatsServer
) -> None:
    with cairn_on_nats(tmp_path / "first", nats_server.url) as cairn:
        webhook = deliver_and_stop(start_webhook, tmp_path, receiver, cairn, ["old"])
        old = tag_set_events(cairn)

    # Another registry publishes into a new stream, with other events at
    # the positions that the first one used.
    delete_stream(nats_server.url)
    with cairn_on_nats(tmp_path / "second", nats_server.url) as cairn:
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "new")
        wait_for_stream_size(nats_server.url, 4)
        new = tag_set_events(cairn)
        assert new[0]["position"] == old[0]["position"]

        restarted = start_webhook(webhook.config)
        wait_until(lambda: len(receiver.of("/tags")) >= 2, WAIT)

    assert [r.event_id for r in receiver.of("/tags")] == [
        old[0]["id"],
        new[0]["id"],
    ]
    other = restarted.records("stored_position_from_other_log")
    assert len(other) == 1
    assert other[0]["level"] == "error"
    assert other[0]["stored_event_id"] == old[0]["id"]
    assert other[0]["stream_event_id"] == new[0]["id"]
    assert restarted.count("consumer_created") == 1
    assert restarted.count("consumer_recreated") == 0
    assert restarted.stop() == 0


def test_stored_position_past_other_registry_stream(
    tmp_path: Path, receiver: Receiver, start_webhook: Any, nats_server: NatsServer
) -> None:
    """Another registry's stream that ends before the stored position is
    recognised by the registry id on its messages."""
    with cairn_on_nats(tmp_path / "first", nats_server.url) as cairn:
        first_id = httpx.get(f"{cairn}/_cairn/registry").json()["registry_id"]
        webhook = deliver_and_stop(
            start_webhook, tmp_path, receiver, cairn, ["old1", "old2", "old3"]
        )
        old_head = max(e["position"] for e in feed_events(cairn))

    delete_stream(nats_server.url)
    with cairn_on_nats(tmp_path / "second", nats_server.url) as cairn:
        second_id = httpx.get(f"{cairn}/_cairn/registry").json()["registry_id"]
        with httpx.Client(base_url=cairn) as client:
            push_image(client, "library/app", make_image(), "new")
        new = tag_set_events(cairn)
        new_head = max(e["position"] for e in feed_events(cairn))
        wait_for_stream_size(nats_server.url, new_head)
        assert new_head < old_head

        restarted = start_webhook(webhook.config)
        wait_until(lambda: len(receiver.of("/tags")) >= 4, WAIT)

    assert receiver.of("/tags")[-1].event_id == new[0]["id"]
    other = restarted.records("stored_position_from_other_log")
    assert len(other) == 1
    assert other[0]["level"] == "error"
    assert other[0]["stored_registry_id"] == first_id
    assert other[0]["stream_registry_id"] == second_id
    assert restarted.count("consumer_created") == 1
    assert restarted.stop() == 0


def test_stop_cancels_task_that_swallowed_cancel() -> None:
    """A worker cancelled where nats-py catches CancelledError still ends."""

    async def swallows_first_cancel() -> None:
        # As nats-py does while it flushes.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await asyncio.sleep(60)

    async def stop() -> tuple[bool, float]:
        task = asyncio.create_task(swallows_first_cancel())
        await asyncio.sleep(0)
        started = time.monotonic()
        await cancel_workers({task: "stubborn"})
        return task.cancelled(), time.monotonic() - started

    cancelled, seconds = asyncio.run(stop())

    assert cancelled
    assert seconds < 5


class FlakyFeed:
    """An HTTP proxy on 127.0.0.1 in front of a cairn, whose first
    ``failures`` requests to the event feed get 503. The cairn serves the
    other requests."""

    def __init__(self, cairn_url: str, failures: int) -> None:
        self.failures = failures
        self.feed_requests = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with proxy.lock:
                    feed = self.path.startswith("/_cairn/events")
                    proxy.feed_requests += feed
                    fail = feed and proxy.feed_requests <= proxy.failures
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                response = httpx.get(cairn_url + self.path)
                self.send_response(response.status_code)
                content_type = response.headers.get("Content-Type")
                if content_type is not None:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_delivers_events_missing_from_stream(
    tmp_path: Path,
    cairn: str,
    receiver: Receiver,
    start_webhook: Any,
    nats_server: NatsServer,
) -> None:
    # "first" is delivered, "second" is dead-lettered after two failed
    # attempts, and the later requests get the default 200.
    receiver.plan["/tags"] = [200, 500, 500]
    receiver.gates["/tags"] = threading.Event()
    feed = FlakyFeed(cairn, failures=2)
    endpoint = {
        **tag_endpoint(receiver, timeout="30s"),
        "max_attempts": 2,
        "backoff_initial": "50ms",
        "backoff_max": "100ms",
    }
    config = write_config(
        tmp_path / "webhook.toml",
        [endpoint],
        extra=f'[registry]\nurl = "{feed.url}"\n',
    )
    try:
        webhook = start_webhook(config)
        webhook.wait_subscribed(1)
        push_across_lost_stream(cairn, receiver, nats_server.url)
        receiver.gates["/tags"].set()

        tags = tag_set_events(cairn)
        assert [e["payload"]["tag"] for e in tags] == ["first", "second", "third"]
        wait_delivered(receiver, "/tags", tags[-1]["id"])
    finally:
        feed.close()

    requests = receiver.of("/tags")
    assert [r.event_id for r in requests] == [
        tags[0]["id"],
        tags[1]["id"],
        tags[1]["id"],
        tags[2]["id"],
    ]
    assert [r.headers["cairn-delivery-attempt"] for r in requests] == [
        "1",
        "1",
        "2",
        "1",
    ]
    assert requests[1].json()["id"] == tags[1]["id"]
    assert requests[1].json()["type"] == "io.cairn.tag.set"
    assert requests[1].headers["cairn-event-type"] == "tag.set"
    missing = webhook.records("events_missing_from_stream")
    assert len(missing) == 1
    assert missing[0]["level"] == "warning"
    assert missing[0]["first_missing"] == tags[0]["position"] + 1
    assert missing[0]["last_missing"] == tags[1]["position"]
    assert webhook.count("missing_events_read_failed") == 2
    assert webhook.count("missing_events_delivered") == 1
    dead = webhook.records("event_dead_lettered")
    assert [line["event_id"] for line in dead] == [tags[1]["id"]]
    assert webhook.stop() == 0

    listed = run_dead_letters("list", config, nats_server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [letter["event"]["id"] for letter in letters] == [tags[1]["id"]]
    assert letters[0]["attempts"] == 2
