"""`cairn mirror` stopped by SIGINT or SIGTERM: a `--once` run that has not
caught up exits with 130 or 143, and a mirror that follows the source exits
with 0. Real cairn servers on 127.0.0.1, one of them paused with SIGSTOP so
that the mirror cannot catch up before the signal arrives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.images import make_image
from tests.nats import wait_until
from tests.server import ServeProcess, push_image, wait_for_log_record
from tests.test_mirror import (
    WAIT,
    head_position,
    log_events,
    manifest_status,
    run_mirror,
    start_mirror,
)

SIGNALS = [
    pytest.param(signal.SIGINT, 130, id="SIGINT"),
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
]


@contextmanager
def paused(served: ServeProcess) -> Iterator[None]:
    """Stop ``served`` with SIGSTOP, and let it go on at the end."""
    os.kill(served.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(served.process.pid, signal.SIGCONT)


def stop_mirror(mirror: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    mirror.send_signal(sig)
    try:
        return mirror.wait(WAIT)
    except subprocess.TimeoutExpired:
        mirror.kill()
        mirror.wait()
        raise


def only_event(log_path: Path, event: str) -> dict[str, Any]:
    lines = [
        line for line in log_events(log_path.read_text()) if line["event"] == event
    ]
    assert len(lines) == 1, lines
    return lines[0]


def push_images(url: str) -> int:
    """Push six images of two 1 MiB layers; return the log's head."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for number in range(6):
            image = make_image(layer_count=2, layer_size=1024 * 1024)
            push_image(client, "library/app", image, f"v{number}")
    return head_position(url)


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_once_interrupted_while_copying(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
    sig: signal.Signals,
    status: int,
) -> None:
    head = push_images(source.url)
    checkpoint = tmp_path / "checkpoint.json"
    log_path = tmp_path / "mirror.log"
    mirror = start_mirror(
        source.url, target.url, log_path, "--once", "--checkpoint", str(checkpoint)
    )
    try:

        def paused_mid_copy() -> bool:
            # The source is paused before the target is read, so the mirror
            # cannot catch up between the check and the signal.
            os.kill(source.process.pid, signal.SIGSTOP)
            first = manifest_status(target.url, "library/app", "v0") == 200
            last = manifest_status(target.url, "library/app", "v5") == 200
            if first and not last and mirror.poll() is None:
                return True
            os.kill(source.process.pid, signal.SIGCONT)
            assert not last, "the mirror caught up before it was paused"
            assert mirror.poll() is None, "the mirror exited before it was paused"
            return False

        wait_until(paused_mid_copy, WAIT, interval=0.01)
        try:
            returncode = stop_mirror(mirror, sig)
        finally:
            os.kill(source.process.pid, signal.SIGCONT)
    finally:
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait()

    assert returncode == status, log_path.read_text()[-4000:]
    stopped = only_event(log_path, "mirror_stopped")
    assert stopped["status"] == status
    assert stopped["position"] < head
    # The position reached is checkpointed as the mirror stops.
    assert json.loads(checkpoint.read_text())["position"] == stopped["position"]
    assert only_event(log_path, "mirror_interrupted")["signal"] == sig.name
    assert "Traceback" not in log_path.read_text()

    # A rerun with the checkpoint goes on from there and catches up.
    run_mirror(source.url, target.url, "--checkpoint", str(checkpoint))
    assert json.loads(checkpoint.read_text())["position"] == head


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_once_interrupted_while_checking(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
    sig: signal.Signals,
    status: int,
) -> None:
    log_path = tmp_path / "mirror.log"
    with paused(target):
        mirror = start_mirror(source.url, target.url, log_path, "--once")
        try:
            # The mirror reads the source's registry id, then waits for the
            # target's.
            wait_for_log_record(
                source.log_path, "request_finished", WAIT, path="/_cairn/registry"
            )
            returncode = stop_mirror(mirror, sig)
        finally:
            if mirror.poll() is None:
                mirror.kill()
                mirror.wait()

    assert returncode == status, log_path.read_text()[-4000:]
    interrupted = only_event(log_path, "mirror_interrupted")
    assert interrupted["signal"] == sig.name
    assert interrupted["status"] == status
    assert "Traceback" not in log_path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_following_mirror_stops_with_zero(
    tmp_path: Path, source: ServeProcess, target: ServeProcess, sig: signal.Signals
) -> None:
    push_images(source.url)
    log_path = tmp_path / "mirror.log"
    mirror = start_mirror(source.url, target.url, log_path, "--poll-interval", "0.2")
    try:
        wait_until(
            lambda: (
                mirror.poll() is not None or "mirror_caught_up" in log_path.read_text()
            ),
            WAIT,
        )
        returncode = stop_mirror(mirror, sig)
    finally:
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait()

    assert returncode == 0, log_path.read_text()[-4000:]
    assert only_event(log_path, "mirror_stopped")["status"] == 0
    assert only_event(log_path, "mirror_interrupted")["signal"] == sig.name
