"""Log output: structlog events and standard-library records alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# uvicorn and nats-py log through the standard library. This script logs
# such a record with a traceback, then a structlog event.
_SCRIPT = """
import logging, sys
import structlog
from engine.logs import configure_logging

configure_logging("info", json=sys.argv[1] == "json")
try:
    raise RuntimeError("boom")
except RuntimeError:
    logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
logging.getLogger("nats.aio.client").info("below the standard-library level")
structlog.get_logger("cairn").info("server_started", port=5000)
"""


def _stderr_lines(log_format: str) -> list[str]:
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, log_format],
        capture_output=True,
        text=True,
        cwd=REPOSITORY_ROOT,
        timeout=60,
        check=True,
    )
    return completed.stderr.splitlines()


def test_json_format_renders_stdlib_records_as_json() -> None:
    lines = _stderr_lines("json")

    records = [json.loads(line) for line in lines]
    assert len(records) == 2, lines
    stdlib, own = records
    assert stdlib["event"] == "Exception in ASGI application"
    assert stdlib["level"] == "error"
    assert stdlib["logger"] == "uvicorn.error"
    assert "RuntimeError: boom" in stdlib["exception"]
    assert "timestamp" in stdlib
    assert own["event"] == "server_started"
    assert own["port"] == 5000


def test_console_format_renders_stdlib_records() -> None:
    lines = _stderr_lines("console")

    first = lines[0]
    assert "Exception in ASGI application" in first
    assert "uvicorn.error" in first
    assert any("RuntimeError: boom" in line for line in lines)
    assert any("server_started" in line for line in lines)
