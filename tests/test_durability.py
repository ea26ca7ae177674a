"""Concurrent appends from several processes, and crashes during blob commits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import sqlalchemy as sa

from engine import log as event_log
from engine.domain.digest import Digest
from engine.registry import Registry
from engine.tables import streams
from engine.verify import verify, verify_blobs, verify_chain

WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from engine.domain.digest import Digest
    from engine.registry import Registry

    data_dir, url, worker = sys.argv[1], sys.argv[2], sys.argv[3]
    count = int(sys.argv[4])
    registry = Registry.open(Path(data_dir), url)
    for i in range(count):
        # Half the pushes go to a shared repository, so both processes race
        # for the same stream version as well as the same log position.
        name = "shared" if i % 2 else f"own{worker}"
        data = f"{worker}-{i}".encode()
        registry.repository(name).blobs.push(Digest.of(data), [data])
    """
)


def test_two_processes_append_without_gaps(registry: Registry, data_dir: Path) -> None:
    count = 60
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(data_dir),
                registry.database.url,
                str(w),
                str(count),
            ]
        )
        for w in range(2)
    ]
    for writer in writers:
        assert writer.wait(timeout=300) == 0

    with registry.database.read() as conn:
        events = list(event_log.read_all(conn))
        versions = dict(
            conn.execute(sa.select(streams.c.repository, streams.c.version)).all()
        )
    assert [e.position for e in events] == list(range(1, 2 * count + 1))
    assert len({e.id for e in events}) == 2 * count
    assert verify_chain(registry) == []
    for repository in ("shared", "own0", "own1"):
        stream = [e.version for e in events if e.repository == repository]
        assert stream == list(range(1, len(stream) + 1))
        assert versions[repository] == len(stream)
    assert verify(registry) == []


CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from engine.domain.digest import Digest
    from engine.registry import Registry

    registry = Registry.open(Path(sys.argv[1]), sys.argv[2])
    repo = registry.repository("crash")
    print("ready", flush=True)
    while True:
        data = os.urandom(4 * 1024 * 1024)
        chunks = [data[j:j + 65536] for j in range(0, len(data), 65536)]
        repo.blobs.push(Digest.of(data), chunks)
    """
)


def test_kill_during_blob_commits(registry: Registry, data_dir: Path) -> None:
    rng = random.Random(1234)
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(data_dir), registry.database.url],
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

        # Every blob file is whole and correct, and every event's blob exists.
        assert verify_blobs(registry) == []
        assert verify_chain(registry) == []
    restarted = Registry.open(data_dir, registry.database.url)
    assert verify(restarted) == []
    with restarted.database.read() as conn:
        pushed = list(event_log.read_all(conn))
    for event in pushed:
        assert restarted.blob_store.exists(Digest.parse(event.payload["digest"]))
    restarted.database.dispose()
