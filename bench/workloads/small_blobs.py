"""Many small blobs, pushed over one connection and from concurrent clients."""

from __future__ import annotations

import os
import time
from functools import partial

from bench.payload import sha256_digest
from bench.registry import http_client, push_blob, run_concurrent
from bench.targets import Target
from bench.workloads import Context, Figure, Sizes, Workload, size_label


class SmallBlobs(Workload):
    name = "small-blobs"
    description = (
        "small random blobs, each pushed with httpx as POST + PUT ?digest=, "
        "sequentially over one connection and from concurrent clients"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        blobs = f"{sizes.small_blob_count} x {size_label(sizes.small_blob_size)}"
        return (
            Figure("sequential", f"{blobs}, sequential", "blobs/s", True),
            Figure("concurrent", f"{blobs}, {sizes.clients} clients", "blobs/s", True),
        )

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        sizes = context.sizes
        # Fresh random blobs every round, made before the clock starts.
        sequential = _blobs(sizes.small_blob_count, sizes.small_blob_size)
        concurrent = _blobs(sizes.small_blob_count, sizes.small_blob_size)
        repo = f"bench/small-{label}"

        with http_client(target.base_url) as client:
            client.get("/v2/")
            start = time.perf_counter()
            for data, digest in sequential:
                push_blob(client, repo, data, digest)
            sequential_s = time.perf_counter() - start

        result = run_concurrent(
            sizes.clients,
            concurrent,
            partial(http_client, target.base_url),
            lambda client, blob: push_blob(client, repo, blob[0], blob[1]),
        )
        return {
            "sequential": len(sequential) / sequential_s,
            "concurrent": len(concurrent) / result.wall_s,
        }


def _blobs(count: int, size: int) -> list[tuple[bytes, str]]:
    blobs = []
    for _ in range(count):
        data = os.urandom(size)
        blobs.append((data, sha256_digest(data)))
    return blobs
