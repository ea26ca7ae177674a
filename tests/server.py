"""Helpers for the HTTP tests: a real uvicorn server and a `cairn serve` process.

Every server listens on 127.0.0.1 on a port the kernel picks, and every
request goes there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
import uvloop

from engine import log as event_log
from engine.api.protocol import CairnHttpProtocol
from engine.api.server import bind_socket
from engine.domain.digest import Digest
from engine.registry import Registry
from engine.tables import blob_links, repositories, tags, uploads
from tests.images import Image

START_TIMEOUT_S = 60.0

# The pull user and the push user of the users files that auth tests create,
# as (name, password).
READER = ("reader", "reader-secret")
WRITER = ("writer", "writer-secret")


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 from a background thread.

    ``app`` is usually a RegistryApp, but any ASGI app works, and
    ``protocol`` may be CairnHttpProtocol configured with other timeouts, or
    another protocol that uvicorn can create, such as HttpsPortProtocol.
    The server runs on uvloop unless ``loop_factory`` creates another loop.
    """

    def __init__(
        self,
        app: Any,
        protocol: type[asyncio.Protocol] = CairnHttpProtocol,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
    ) -> None:
        self._sock = bind_socket("127.0.0.1", 0)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            loop="none",
            http=protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._loop_factory = loop_factory
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


@contextmanager
def running(
    app: Any,
    protocol: type[asyncio.Protocol] = CairnHttpProtocol,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
) -> Iterator[ServerThread]:
    server = ServerThread(app, protocol, loop_factory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class ServeProcess:
    """A `cairn serve` subprocess and where it listens."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process (by its PID) and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def start_serve(
    data_dir: Path,
    database_url: str,
    log_path: Path,
    *extra: str,
    embedded_nats: bool = False,
    wait_until_up: bool = True,
) -> ServeProcess:
    """Start `cairn serve` on a kernel-chosen 127.0.0.1 port and wait for it.

    The server runs with --no-nats unless ``embedded_nats`` is set. Without
    ``wait_until_up``, this returns once the server has printed its address.
    """
    argv = [
        sys.executable,
        "-m",
        "engine.cli",
        "--log-format",
        "json",
        "serve",
        "--data-dir",
        str(data_dir),
        "--database",
        database_url,
        "--listen",
        "127.0.0.1:0",
        *(() if embedded_nats else ("--no-nats",)),
        *extra,
    ]

    log_file: IO[bytes] = open(log_path, "ab")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL, env=env
    )
    log_file.close()

    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while url is None:
        line = process.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"cairn serve exited early; see {log_path}")
        match = re.search(r"listening on (https?://127\.0\.0\.1:\d+)", line)
        if match:
            url = match.group(1)
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("cairn serve did not report its address")

    served = ServeProcess(process, url, log_path)
    if wait_until_up:
        _wait_until_up(served)
    return served


def serve_cairn(directory: Path, *extra: str) -> ServeProcess:
    """Start `cairn serve` on SQLite in ``directory``, with ``extra`` options."""
    directory.mkdir(parents=True)
    data_dir = directory / "data"
    data_dir.mkdir()
    return start_serve(
        data_dir,
        f"sqlite:///{directory / 'cairn.db'}",
        directory / "serve.log",
        *extra,
    )


def log_records(log_path: Path, event: str, **fields: object) -> list[dict[str, Any]]:
    """Return the JSON log records of ``event`` with ``fields``, in order."""
    records = []
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") == event and all(
            record.get(name) == value for name, value in fields.items()
        ):
            records.append(record)
    return records


def wait_for_log_record(
    log_path: Path, event: str, timeout: float = 30, **fields: object
) -> dict[str, Any]:
    """Wait until the log has a record of ``event`` with ``fields``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        records = log_records(log_path, event, **fields)
        if records:
            return records[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} record with {fields} in {log_path}")
        time.sleep(0.05)


def _wait_until_up(served: ServeProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            # A server started with --auth-file returns 401 here. Whether a
            # server started with --tls-cert is trusted is for its test to
            # check, not for this wait.
            status = httpx.get(f"{served.url}/v2/", timeout=5, verify=False).status_code
            if status in (200, 401):
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"cairn serve at {served.url} does not answer /v2/")


# ---- pushing content ---------------------------------------------------------


def push_blob(client: httpx.Client, repository: str, data: bytes) -> Digest:
    """Push ``data`` with POST then PUT and return its digest."""
    digest = Digest.of(data)
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    # Merge into the Location's own query, which some registries use for
    # upload state; httpx's params= would replace it.
    location = httpx.URL(started.headers["Location"])
    finished = client.put(
        location.copy_merge_params({"digest": str(digest)}), content=data
    )
    assert finished.status_code == 201, finished.text
    return digest


def push_image(
    client: httpx.Client, repository: str, image: Image, tag: str | None = None
) -> httpx.Response:
    """Push an image's blobs and manifest; return the manifest PUT response."""
    for blob in image.blobs:
        push_blob(client, repository, blob)
    reference = tag or str(image.digest)
    response = client.put(
        f"/v2/{repository}/manifests/{reference}",
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )
    assert response.status_code == 201, response.text
    return response


# ---- what the storage contains ------------------------------------------------


def log_position(registry: Registry) -> int:
    with registry.database.read() as conn:
        return event_log.head(conn)[0]


def stored_state(registry: Registry) -> dict[str, object]:
    """Return everything a bad request must leave untouched."""
    with registry.database.read() as conn:
        return {
            "position": event_log.head(conn)[0],
            "repositories": sorted(
                conn.execute(sa.select(repositories.c.name)).scalars()
            ),
            "blob_links": sorted(
                tuple(row)
                for row in conn.execute(
                    sa.select(blob_links.c.repository, blob_links.c.digest)
                )
            ),
            "tags": sorted(
                tuple(row)
                for row in conn.execute(sa.select(tags.c.repository, tags.c.tag))
            ),
        }


def upload_rows(registry: Registry) -> int:
    with registry.database.read() as conn:
        return len(conn.execute(sa.select(uploads.c.id)).all())


def committed_blob_files(registry: Registry) -> list[str]:
    return sorted(str(digest) for digest, _ in registry.blob_store.iter_blobs())


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every descriptor passed to os.fsync, then sync it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
