"""Registry servers under test, each started on a free 127.0.0.1 port.

A target is one server program. Adding another registry means adding a Target
subclass and listing it in TARGETS. The workloads use only its base URL and PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO

import httpx

from bench.urls import loopback_host_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class TargetUnavailable(Exception):
    """The target's program is missing or failed to start, so the run skips it."""


def free_loopback_port() -> int:
    # NOTE: another process could take the port between this close and the
    # server's bind. The start then fails with the server's own error message.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Target(ABC):
    name: str

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self._log_file: IO[bytes] | None = None

    @abstractmethod
    def find_program(self) -> Path:
        """Return the server executable, or raise TargetUnavailable."""

    @abstractmethod
    def command(self, program: Path, work_dir: Path, port: int) -> list[str]:
        """Return the server's argv, after writing any config it needs to work_dir."""

    def version(self, program: Path) -> str:
        return ""

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def start(self, work_dir: Path) -> None:
        """Start the server with its data under work_dir and wait for GET /v2/.

        The server is ready when GET /v2/ returns 200 or 401. Raises
        TargetUnavailable with the server's log tail if it exits or does not
        respond within START_TIMEOUT_S.
        """
        program = self.find_program()
        work_dir.mkdir(parents=True, exist_ok=True)
        port = free_loopback_port()
        argv = self.command(program, work_dir, port)
        self.base_url = f"http://127.0.0.1:{port}"
        loopback_host_port(self.base_url)
        self.log_path = work_dir / "server.log"
        log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._log_file = log_file
        # A new session makes the server the leader of its own process group,
        # so stop() can signal it and any workers it forks, and nothing else.
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = ""
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.stop()
                    raise TargetUnavailable(
                        f"{self.name} exited with code {code} during start-up; "
                        f"log:\n{self.log_tail()}"
                    )
                try:
                    response = client.get(f"{self.base_url}/v2/")
                    if response.status_code in (200, 401):
                        return
                    last_error = f"GET /v2/ returned {response.status_code}"
                except httpx.TransportError as error:
                    last_error = f"GET /v2/ failed: {error!r}"
                time.sleep(0.05)
        self.stop()
        raise TargetUnavailable(
            f"{self.name} did not respond to GET /v2/ within {START_TIMEOUT_S:.0f} s "
            f"({last_error}); log:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the process group this target started: SIGTERM, then SIGKILL."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"


class DistributionTarget(Target):
    """CNCF Distribution (docker-registry) with filesystem storage."""

    name = "distribution"

    def __init__(self, program: str | None = None) -> None:
        super().__init__()
        self.program = program

    def find_program(self) -> Path:
        candidate = self.program or shutil.which("docker-registry")
        if not candidate or not os.access(candidate, os.X_OK):
            raise TargetUnavailable(
                "distribution: docker-registry not found (looked for "
                f"{self.program or 'docker-registry on PATH'}); install Debian's "
                "docker-registry package or pass --distribution PATH"
            )
        # Absolute for the same reason as cairn's program below.
        return Path(candidate).resolve()

    def command(self, program: Path, work_dir: Path, port: int) -> list[str]:
        self.data_dir = work_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = work_dir / "config.yml"
        config.write_text(distribution_config(self.data_dir, port))
        return [str(program), "serve", str(config)]

    def version(self, program: Path) -> str:
        result = subprocess.run(
            [str(program), "--version"], capture_output=True, text=True, timeout=30
        )
        return result.stdout.strip()


def distribution_config(data_dir: Path, port: int) -> str:
    """Return a Distribution 2.x config.yml for an unauthenticated local server.

    The blob descriptor cache is in memory, as in Debian's packaged config.
    """
    return f"""\
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data_dir}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


class CairnTarget(Target):
    name = "cairn"

    def __init__(self, program: str | None = None) -> None:
        super().__init__()
        self.program = program

    def find_program(self) -> Path:
        venv_script = REPO_ROOT / ".venv" / "bin" / "cairn"
        candidates = [self.program] if self.program else [str(venv_script)]
        if not self.program and (on_path := shutil.which("cairn")):
            candidates.append(on_path)
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                # The server starts in its run directory, so a path relative
                # to the caller's directory would not be found there.
                return Path(candidate).resolve()
        raise TargetUnavailable(
            f"cairn: executable not found (looked for {', '.join(map(str, candidates))}"
            f"{'' if self.program else ' and cairn on PATH'}); install the project "
            "into the venv with `.venv/bin/pip install -e .` or pass --cairn PATH"
        )

    def command(self, program: Path, work_dir: Path, port: int) -> list[str]:
        self.data_dir = work_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Warnings and errors only, as the Distribution config above logs:
        # at info cairn writes a line for every request.
        return [
            str(program),
            "--log-level",
            "warning",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--no-nats",
        ]

    def version(self, program: Path) -> str:
        try:
            result = subprocess.run(
                [str(program), "--version"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""


TARGETS: dict[str, type[Target]] = {
    DistributionTarget.name: DistributionTarget,
    CairnTarget.name: CairnTarget,
}
