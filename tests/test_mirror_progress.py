"""The mirror's progress: the rates in its line, and the head and lag that
`cairn mirror --progress log` reports from its start."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
import structlog.testing
from nats.aio.msg import Msg

from consumers.mirror import progress as progress_module
from consumers.mirror.copier import Stats
from consumers.mirror.live import LiveEvents
from consumers.mirror.progress import Progress
from engine.bus.messages import REGISTRY_ID
from tests.images import make_image
from tests.server import ServeProcess, push_blob, push_image, serve_cairn
from tests.test_mirror import (
    head_position,
    log_events,
    run_mirror,
    run_mirror_status,
)

# Bound at import, before any test of this module changes the processors.
_EARLY_LOGGER = structlog.get_logger("progress-test-early").bind()

_RATES = re.compile(r"  (\S+(?: \S+)?)/s  (\S+) events/s  ")


@pytest.fixture(autouse=True)
def restore_log_processors() -> Iterator[None]:
    """Undo the processor that a line-mode Progress adds to structlog.

    The list is restored in place: cached loggers keep a reference to it,
    and structlog.testing.capture_logs in later tests changes that list.
    """
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    yield
    processors[:] = saved
    structlog.configure(processors=processors)


def test_line_mode_clears_for_cached_logger() -> None:
    logger = structlog.get_logger("progress-test").bind()
    stream = io.StringIO()
    progress = Progress(Stats(), "line", stream)
    progress.update(0, force=True)

    logger.warning("something happened")

    assert stream.getvalue().endswith("\r\x1b[K"), repr(stream.getvalue())


def test_capture_logs_after_line_mode() -> None:
    # Runs after a line-mode Progress of another test in this module, with
    # a logger bound before any of them, as module loggers are.
    with structlog.testing.capture_logs() as logs:
        _EARLY_LOGGER.warning("captured")
    assert [entry["event"] for entry in logs] == ["captured"]


def _rates(stream: io.StringIO) -> tuple[str, float]:
    """Return the byte rate text and the event rate of the last line drawn."""
    last_line = stream.getvalue().split("\r\x1b[K")[-1]
    found = _RATES.search(last_line)
    assert found is not None, last_line
    return found.group(1), float(found.group(2))


def test_first_copy_counts_in_rate() -> None:
    stats = Stats()
    stream = io.StringIO()
    progress = Progress(stats, "line", stream)
    time.sleep(0.2)
    # A blob copied before the runner's first update, as the first event of
    # a run is.
    stats.bytes_sent = 1_000_000
    stats.applied = 1

    progress.update(1, force=True)

    byte_rate, event_rate = _rates(stream)
    assert byte_rate.endswith("MiB"), byte_rate
    assert event_rate > 0


def test_copy_inside_window_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "RATE_WINDOW", 0.5)
    stats = Stats()
    stream = io.StringIO()
    progress = Progress(stats, "line", stream)
    progress.update(0, force=True)
    time.sleep(0.3)
    stats.bytes_sent = 1_000_000
    stats.applied = 1
    progress.update(1)
    time.sleep(0.3)

    # The window began after the first sample and before the copy ended.
    progress.update(1, force=True)

    byte_rate, event_rate = _rates(stream)
    assert byte_rate.endswith("MiB"), byte_rate
    assert event_rate > 0


def test_rate_zero_after_idle_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "RATE_WINDOW", 0.2)
    stats = Stats()
    stream = io.StringIO()
    progress = Progress(stats, "line", stream)
    stats.bytes_sent = 1_000_000
    stats.applied = 1
    progress.update(1)
    time.sleep(0.3)
    progress.update(1)
    time.sleep(0.3)

    progress.update(1, force=True)

    byte_rate, event_rate = _rates(stream)
    assert byte_rate == "0 B"
    assert event_rate == 0.0


def test_live_events_keep_highest_position() -> None:
    """The head that progress reports take while the mirror follows NATS is
    the highest position received, also while those events still wait."""

    async def receive() -> tuple[int, int]:
        live = LiveEvents("nats://127.0.0.1:4222", "CAIRN", "cairn")
        for position in (5, 3, 9, 7):
            body = json.dumps({"position": position}).encode()
            await live._on_message(Msg(None, data=body))
        return live.highest_position, live.queue.qsize()

    assert asyncio.run(receive()) == (9, 4)


def test_live_events_head_ignores_other_registry() -> None:
    """Once the source's registry id is known, a message whose header names
    another registry does not move the head of progress reports."""

    async def receive() -> int:
        live = LiveEvents("nats://127.0.0.1:4222", "CAIRN", "cairn")
        live.source_registry_id = "source"
        for position, registry_id in ((4, "source"), (90, "other"), (5, None)):
            body = json.dumps({"position": position}).encode()
            headers = {REGISTRY_ID: registry_id} if registry_id else None
            await live._on_message(Msg(None, data=body, headers=headers))
        return live.highest_position

    assert asyncio.run(receive()) == 5


def test_mirror_reports_head_from_start(
    source: ServeProcess, target: ServeProcess
) -> None:
    with httpx.Client(base_url=source.url, timeout=60) as client:
        for number in range(3):
            push_image(client, "library/app", make_image(layer_count=2), f"v{number}")
    head = head_position(source.url)

    result = run_mirror(source.url, target.url)

    reports = [
        line for line in log_events(result.stderr) if line["event"] == "mirror_progress"
    ]
    for report in reports:
        assert report["head"] == head, report
        assert report["lag"] == head - report["position"], report
    # The first report comes before the first event is applied.
    assert reports[0]["position"] == 0
    assert reports[-1]["position"] == head


def test_rejected_blob_not_counted_as_copied(
    tmp_path: Path, source: ServeProcess
) -> None:
    # The target takes blobs of at most 1 MiB, so it rejects this one with
    # 413 after the mirror has sent it: sent, but not copied.
    target = serve_cairn(tmp_path / "small-target", "--max-blob-size", "1MiB")
    try:
        data = os.urandom(2 * 1024 * 1024)
        with httpx.Client(base_url=source.url, timeout=60) as client:
            digest = push_blob(client, "demo/big", data)

        result = run_mirror_status(source.url, target.url, "--progress", "log")

        assert result.returncode == 1, result.stderr[-4000:]
        stopped = [
            line
            for line in log_events(result.stderr)
            if line["event"] == "mirror_stopped"
        ]
        assert stopped[0]["applied"] == 0
        assert stopped[0]["bytes_copied"] == 0
        assert stopped[0]["bytes_sent"] > 0
        response = httpx.head(f"{target.url}/v2/demo/big/blobs/{digest}")
        assert response.status_code == 404
    finally:
        target.kill()


def test_copied_blob_counts_its_bytes(
    source: ServeProcess, target: ServeProcess
) -> None:
    data = os.urandom(300_000)
    with httpx.Client(base_url=source.url, timeout=60) as client:
        push_blob(client, "demo/blob", data)

    result = run_mirror(source.url, target.url, "--progress", "log")

    stopped = [
        line for line in log_events(result.stderr) if line["event"] == "mirror_stopped"
    ]
    assert stopped[0]["bytes_copied"] == len(data)
    assert stopped[0]["bytes_sent"] == len(data)
