"""`cairn` commands whose standard output is a pipe that nothing reads.

Each command runs as a subprocess whose standard output is the write end of
a pipe with its read end already closed, as after `cairn ... | head -0`.
It must stop with status 141 and print no traceback and no "Exception
ignored" line. Python buffers standard output on a pipe unless
PYTHONUNBUFFERED is set, and the error then comes at a different write, so
the commands run both ways.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.bus import Bus
from engine.registry import Registry
from tests.nats import (
    BusThread,
    NatsServer,
    checkpoint_of,
    fast_settings,
    push_image,
    wait_until,
)
from tests.server import START_TIMEOUT_S

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
STDOUT_CLOSED_STATUS = 141

# Unbuffered, the first write fails; buffered, the first flush does.
BUFFERING = ["buffered", "unbuffered"]


def _logged(log_path: Path, event: str) -> dict[str, Any] | None:
    """Return the first JSON log line of ``event`` in ``log_path``, if any."""
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            return dict(record)
    return None


@dataclass
class Result:
    status: int
    stderr: str

    @property
    def plain_lines(self) -> list[str]:
        """The lines of standard error that are not JSON log lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]


def _environment(buffering: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CAIRN_") and name != "PYTHONUNBUFFERED"
    }
    if buffering == "unbuffered":
        environment["PYTHONUNBUFFERED"] = "1"
    return environment


@pytest.fixture
def closed_stdout() -> Iterator[int]:
    """The write end of a pipe whose read end is closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


def run_cairn(
    stdout: int, *args: str, buffering: str = "buffered", stdin_text: str = ""
) -> Result:
    completed = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-format", "json", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        input=stdin_text,
        text=True,
        cwd=REPOSITORY_ROOT,
        env=_environment(buffering),
        timeout=START_TIMEOUT_S,
    )
    return Result(completed.returncode, completed.stderr)


def assert_stopped_quietly(result: Result) -> None:
    assert result.status == STDOUT_CLOSED_STATUS, result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert result.plain_lines == [], result.stderr


@pytest.fixture
def upgraded_data_dir(tmp_path: Path) -> Path:
    """A data directory with an up-to-date SQLite database."""
    directory = tmp_path / "upgraded"
    command = [sys.executable, "-m", "engine.cli", "db", "upgrade"]
    upgraded = subprocess.run(
        [*command, "--data-dir", str(directory)],
        capture_output=True,
        cwd=REPOSITORY_ROOT,
        env=_environment("buffered"),
        timeout=START_TIMEOUT_S,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    return directory


# Arguments after `cairn` for each command that prints to standard output,
# with {data} for the data directory and {tmp} for a scratch directory.
STORAGE_COMMANDS = {
    "db-upgrade": ["db", "upgrade", "--data-dir", "{data}"],
    "rebuild": ["projections", "rebuild", "--data-dir", "{data}"],
    "verify": ["verify", "--data-dir", "{data}"],
    "gc": ["gc", "--data-dir", "{data}"],
    "gc-dry-run": ["gc", "--dry-run", "--data-dir", "{data}"],
    "republish": ["events", "republish", "--data-dir", "{data}", "--from", "1"],
    "certificate": [
        "certificate",
        "--host",
        "registry.example",
        "--cert",
        "{tmp}/cert.pem",
        "--key",
        "{tmp}/key.pem",
    ],
}


@pytest.mark.parametrize("buffering", BUFFERING)
@pytest.mark.parametrize("command", list(STORAGE_COMMANDS))
def test_command_stops_quietly(
    command: str,
    buffering: str,
    closed_stdout: int,
    upgraded_data_dir: Path,
    tmp_path: Path,
) -> None:
    arguments = [
        argument.format(data=upgraded_data_dir, tmp=tmp_path)
        for argument in STORAGE_COMMANDS[command]
    ]

    result = run_cairn(closed_stdout, *arguments, buffering=buffering)

    assert_stopped_quietly(result)


@pytest.mark.parametrize("buffering", BUFFERING)
def test_users_add_stops_quietly(
    buffering: str, closed_stdout: int, tmp_path: Path
) -> None:
    users = tmp_path / "users"

    result = run_cairn(
        closed_stdout,
        "users",
        "add",
        "--auth-file",
        str(users),
        "alice",
        buffering=buffering,
        stdin_text="password\n",
    )

    assert_stopped_quietly(result)
    assert users.read_text().startswith("alice:pull:")


def test_verify_stops_quietly_on_socket(upgraded_data_dir: Path) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with ours:
        result = run_cairn(
            ours.fileno(), "verify", "--data-dir", str(upgraded_data_dir)
        )

    assert_stopped_quietly(result)


@pytest.mark.parametrize("buffering", BUFFERING)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_events_tail_stops_quietly(
    buffering: str,
    closed_stdout: int,
    registry: Registry,
    nats_server: NatsServer,
    data_dir: Path,
) -> None:
    with BusThread(Bus(fast_settings(nats_server.url), registry.database, data_dir)):
        push_image(registry, "library/alpine", "3.20")
        wait_until(lambda: checkpoint_of(registry) == 4)

    result = run_cairn(
        closed_stdout,
        "events",
        "tail",
        "--nats",
        nats_server.url,
        "--from",
        "1",
        buffering=buffering,
    )

    assert_stopped_quietly(result)


@pytest.mark.parametrize("buffering", BUFFERING)
def test_webhook_dead_letters_stop_quietly(
    buffering: str, closed_stdout: int, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = tmp_path / "webhook.toml"
    config.write_text(
        "[[endpoints]]\n"
        'name = "ci"\n'
        'url = "http://127.0.0.1:9/hook"\n'
        'secret = "webhook-secret"\n'
    )

    result = run_cairn(
        closed_stdout,
        "webhook",
        "dead-letters",
        "list",
        "--config",
        str(config),
        "--nats",
        nats_server.url,
        buffering=buffering,
    )

    assert_stopped_quietly(result)


@pytest.mark.parametrize("buffering", BUFFERING)
def test_serve_keeps_serving(
    buffering: str, closed_stdout: int, upgraded_data_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "engine.cli", "--log-format", "json", "serve"]
    options = ["--data-dir", str(upgraded_data_dir), "--no-nats"]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [*command, *options, "--listen", "127.0.0.1:0"],
            stdout=closed_stdout,
            stderr=log_file,
            cwd=REPOSITORY_ROOT,
            env=_environment(buffering),
        )
    try:
        started = wait_until(lambda: _logged(log_path, "server_started"))
        health = httpx.get(f"{started['url']}/_cairn/health", timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=START_TIMEOUT_S)

    stderr = log_path.read_text()
    assert health.status_code == 200
    assert status == 0, stderr
    assert _logged(log_path, "stdout_closed") is not None
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr
