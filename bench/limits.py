"""Physical limits of this machine, measured in the same run as the workloads.

A blob push cannot beat the slowest of: hashing the bytes on one core (the server
must verify the digest), receiving them over loopback TCP, and writing them
durably. These figures put each workload's throughput in proportion.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
FSYNC_PROBE_PREFIX = "fsync-probe-"


@dataclass(frozen=True)
class Limit:
    name: str
    label: str
    mib_per_s: float
    detail: str


def sha256_throughput(total_bytes: int) -> Limit:
    chunk = os.urandom(MIB)
    digest = hashlib.sha256()
    count = max(1, total_bytes // MIB)
    start = time.perf_counter()
    for _ in range(count):
        digest.update(chunk)
    digest.hexdigest()
    elapsed = time.perf_counter() - start
    return Limit(
        "sha256",
        "sha256 on one core",
        count / elapsed,
        f"hashlib.sha256, {count} x 1 MiB updates",
    )


def fsync_write_throughput(directory: Path, total_bytes: int) -> Limit:
    """Write total_bytes in 1 MiB chunks to a new file in directory, then fsync.

    The time includes the fsync, so the figure is the rate of durable writes to
    that directory's filesystem, not of the page cache. The file is left in
    place: the caller removes it once every try has run, so that no try writes
    into page-cache memory that an earlier try freed. A registry keeps the blobs
    it writes, and on a virtual machine writing into memory the guest has not
    touched before can be several times slower than reusing freed pages.
    """
    chunk = os.urandom(MIB)
    count = max(1, total_bytes // MIB)
    fd, _ = tempfile.mkstemp(prefix=FSYNC_PROBE_PREFIX, dir=directory)
    start = time.perf_counter()
    try:
        for _ in range(count):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    return Limit(
        "disk-fsync",
        "disk write + fsync",
        count / elapsed,
        f"{count} MiB written in 1 MiB chunks to a new file then fsync, in {directory}",
    )


# The sender runs as a separate interpreter, so the probe does not depend on how
# the harness itself was started (multiprocessing's spawn re-imports __main__).
_SENDER = """
import os, socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
chunk = os.urandom(1 << 20)
with socket.create_connection(("127.0.0.1", port)) as sock:
    for _ in range(total // len(chunk)):
        sock.sendall(chunk)
"""
LOOPBACK_TIMEOUT_S = 60.0


def loopback_tcp_throughput(total_bytes: int) -> Limit:
    """Stream total_bytes from a child process to this one over 127.0.0.1."""
    count = max(1, total_bytes // MIB)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(LOOPBACK_TIMEOUT_S)
        port = server.getsockname()[1]
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(port), str(count * MIB)],
            stdin=subprocess.DEVNULL,
        )
        received = 0
        try:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(LOOPBACK_TIMEOUT_S)
                buffer = memoryview(bytearray(MIB))
                start = time.perf_counter()
                while received < count * MIB:
                    size = connection.recv_into(buffer)
                    if size == 0:
                        break
                    received += size
                elapsed = time.perf_counter() - start
        except TimeoutError as error:
            sender.kill()
            raise RuntimeError(
                f"loopback probe timed out after {LOOPBACK_TIMEOUT_S:.0f} s with "
                f"{received} of {count * MIB} bytes received"
            ) from error
        finally:
            exit_code = sender.wait(LOOPBACK_TIMEOUT_S)
    if received != count * MIB:
        raise RuntimeError(
            f"loopback probe received {received} of {count * MIB} bytes, and "
            f"the sender exited with code {exit_code}"
        )
    return Limit(
        "loopback",
        "loopback TCP",
        count / elapsed,
        f"{count} MiB, sendall/recv_into with 1 MiB buffers between two processes",
    )


def measure_limits(data_dir: Path, quick: bool) -> dict[str, Limit]:
    """Measure each limit three times (once with quick) and keep the median.

    The disk and loopback rates of a shared virtual machine move between tries,
    so the detail also gives the range.
    """
    scale = 1 if quick else 8
    tries = 1 if quick else 3
    probes: list[Callable[[], Limit]] = [
        lambda: sha256_throughput(128 * MIB * scale),
        lambda: fsync_write_throughput(data_dir, 64 * MIB * scale),
        lambda: loopback_tcp_throughput(512 * MIB * scale),
    ]
    limits = {}
    for probe in probes:
        try:
            results = sorted(
                (probe() for _ in range(tries)), key=lambda limit: limit.mib_per_s
            )
        finally:
            for path in data_dir.glob(f"{FSYNC_PROBE_PREFIX}*"):
                path.unlink()
        median = results[len(results) // 2]
        detail = median.detail
        if tries > 1:
            low, high = results[0].mib_per_s, results[-1].mib_per_s
            detail += f" (median of {tries} tries, {low:.0f}-{high:.0f} MiB/s)"
        limits[median.name] = Limit(median.name, median.label, median.mib_per_s, detail)
    return limits
