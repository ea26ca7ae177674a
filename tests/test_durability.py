"""Concurrent appends from several processes, and crashes during blob commits."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from engine import log as event_log
from engine.domain.digest import Digest
from engine.domain.errors import ManifestBlobUnknown
from engine.registry import Registry
from engine.tables import streams
from engine.verify import verify, verify_blobs, verify_chain
from tests.images import make_image

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


PUSH_2GIB = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from engine.domain.digest import Digest
    from engine.logs import configure_logging
    from engine.registry import Registry

    configure_logging("warning")
    chunk = bytes(range(256)) * 4096  # 1 MiB
    count = 2048
    hasher = hashlib.sha256()
    for _ in range(count):
        hasher.update(chunk)
    digest = Digest("sha256", hasher.hexdigest())
    registry = Registry.open(Path(sys.argv[1]), sys.argv[2])

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    baseline = status("VmRSS:")
    upload = registry.repository("big").blobs.create_upload()
    registry.repository("big").blobs.write_upload(
        upload.id, (chunk for _ in range(count // 2))
    )
    registry.repository("big").blobs.commit_upload(
        upload.id, digest, (chunk for _ in range(count // 2))
    )
    print(status("VmHWM:") - baseline)
    """
)


def test_two_gib_upload_memory_stays_flat(registry: Registry, data_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PUSH_2GIB, str(data_dir), registry.database.url],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    growth_kib = int(result.stdout.strip())
    assert growth_kib < 64 * 1024, f"peak RSS grew by {growth_kib} KiB"
    blob = registry.repository("big").blobs
    with registry.database.read() as conn:
        (event,) = event_log.read(conn, repository="big")
    assert event.payload["size"] == 2 * 1024**3
    assert blob.stat(Digest.parse(event.payload["digest"])).size == 2 * 1024**3


def test_concurrent_writers_share_commits_safely(registry: Registry) -> None:
    """Writers in many threads, half of them failing: every success is
    committed once and no failure leaves anything behind."""
    images = [make_image(seed=bytes([i])) for i in range(8)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        repo = registry.repository(f"threads/r{index % 3}")
        image = images[index]
        try:
            for blob in image.blobs:
                repo.blobs.push(Digest.of(blob), [blob])
            for round_number in range(10):
                repo.manifests.put(image.manifest, tag=f"t{index}-{round_number}")
                with contextlib.suppress(ManifestBlobUnknown):
                    repo.manifests.put(images[(index + 1) % 8].manifest, tag="bad")
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert verify(registry) == []
    with registry.database.read() as conn:
        tag_sets = event_log.read(conn, types=["tag.set"], limit=10_000)
    pushed_tags = {(e.repository, e.payload["tag"]) for e in tag_sets}
    for index in range(8):
        for round_number in range(10):
            assert (f"threads/r{index % 3}", f"t{index}-{round_number}") in pushed_tags
