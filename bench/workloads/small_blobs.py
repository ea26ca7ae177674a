"""Many small blobs, pushed over one connection and from concurrent clients."""

from __future__ import annotations

import os
import time
from functools import partial

from bench.payload import sha256_digest
from bench.procmem import CpuMeter
from bench.registry import raw_connection, raw_open, raw_put_blob, run_concurrent
from bench.targets import Target
from bench.workloads import (
    Context,
    Figure,
    Sizes,
    Workload,
    cpu_figures,
    cpu_values,
    size_label,
)


class SmallBlobs(Workload):
    name = "small-blobs"
    description = (
        "small random blobs, each pushed as POST + PUT ?digest= over a raw "
        "HTTP/1.1 connection, "
        "sequentially over one connection and from concurrent clients"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        blobs = f"{sizes.small_blob_count} x {size_label(sizes.small_blob_size)}"
        sequential = f"{blobs}, sequential"
        concurrent = f"{blobs}, {sizes.clients} clients"
        return (
            Figure("sequential", sequential, "blobs/s", True),
            *cpu_figures("sequential", sequential, "blob"),
            Figure("concurrent", concurrent, "blobs/s", True),
            *cpu_figures("concurrent", concurrent, "blob"),
        )

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        sizes = context.sizes
        # Fresh random blobs every round, made before the clock starts.
        sequential = _blobs(sizes.small_blob_count, sizes.small_blob_size)
        concurrent = _blobs(sizes.small_blob_count, sizes.small_blob_size)
        repo = f"bench/small-{label}"

        base_url = target.base_url
        sequential_cpu = CpuMeter(target.pid)
        with raw_connection(base_url) as connection:
            raw_open(connection)
            sequential_cpu.start()
            start = time.perf_counter()
            for data, digest in sequential:
                raw_put_blob(connection, base_url, repo, data, digest)
            sequential_s = time.perf_counter() - start
            sequential_cpu.stop()

        concurrent_cpu = CpuMeter(target.pid)
        result = run_concurrent(
            sizes.clients,
            concurrent,
            partial(raw_connection, base_url),
            lambda connection, blob: raw_put_blob(
                connection, base_url, repo, blob[0], blob[1]
            ),
            concurrent_cpu,
        )
        return {
            "sequential": len(sequential) / sequential_s,
            **cpu_values("sequential", sequential_cpu, len(sequential)),
            "concurrent": len(concurrent) / result.wall_s,
            **cpu_values("concurrent", concurrent_cpu, len(concurrent)),
        }


def _blobs(count: int, size: int) -> list[tuple[bytes, str]]:
    blobs = []
    for _ in range(count):
        data = os.urandom(size)
        blobs.append((data, sha256_digest(data)))
    return blobs
