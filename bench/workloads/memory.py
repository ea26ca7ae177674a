"""Peak resident memory of the server while it receives large uploads."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench.payload import stamped_chunks, stamped_digest
from bench.procmem import RssSampler, tree_rss_kib
from bench.rawhttp import RawConnection, StreamBody
from bench.registry import raw_put_blob
from bench.targets import Target
from bench.workloads import MIB, Context, Figure, Sizes, Workload, size_label

BIG_SEED = 1
CONCURRENT_SEED = 1000


class Memory(Workload):
    name = "memory"
    description = (
        "peak RSS of the server's process tree (VmRSS summed and sampled every "
        "20 ms, and VmHWM after a reset) while it receives one large blob and many "
        "concurrent blobs; bodies come from a generator, not a file"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        big = f"1 x {size_label(sizes.memory_big_blob)}"
        many = (
            f"{sizes.memory_concurrent_blobs} x "
            f"{size_label(sizes.memory_concurrent_size)} concurrent"
        )
        bound = ("sha256", "loopback", "disk-fsync")
        return (
            Figure("idle-rss", "RSS before the uploads", "MiB", False),
            Figure("big-peak-rss", f"{big}, peak RSS", "MiB", False),
            Figure("big-rate", f"{big}, push rate", "MiB/s", True, bound),
            Figure("concurrent-peak-rss", f"{many}, peak RSS", "MiB", False),
            Figure("concurrent-rate", f"{many}, push rate", "MiB/s", True, bound),
        )

    def prepare(self, context: Context) -> None:
        """Hash the generated bodies once, because every round and target sends them."""
        sizes = context.sizes
        many = size_label(sizes.memory_concurrent_size)
        context.log(
            f"hashing generated bodies: {size_label(sizes.memory_big_blob)} and "
            f"{sizes.memory_concurrent_blobs} x {many}"
        )
        context.shared["memory-big"] = stamped_digest(BIG_SEED, sizes.memory_big_blob)
        context.shared["memory-concurrent"] = [
            stamped_digest(CONCURRENT_SEED + index, sizes.memory_concurrent_size)
            for index in range(sizes.memory_concurrent_blobs)
        ]

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        # NOTE: the same bytes go to a new repository every round, so a server
        # that stores blobs by digest keeps one copy of each across rounds.
        sizes = context.sizes
        base = target.base_url
        repo = f"bench/memory-{label}"
        results: dict[str, float] = {"idle-rss": tree_rss_kib(target.pid) / 1024}

        big_digest = str(context.shared["memory-big"])
        body = StreamBody(
            stamped_chunks(BIG_SEED, sizes.memory_big_blob), sizes.memory_big_blob
        )
        with RssSampler(target.pid) as sampler, RawConnection(base) as connection:
            start = time.perf_counter()
            raw_put_blob(connection, base, repo, body, big_digest)
            elapsed = time.perf_counter() - start
        results["big-peak-rss"] = sampler.peak_kib / 1024
        results["big-rate"] = sizes.memory_big_blob / MIB / elapsed

        digests: list[str] = context.shared["memory-concurrent"]  # type: ignore[assignment]
        size = sizes.memory_concurrent_size

        def push(index: int) -> None:
            chunks = stamped_chunks(CONCURRENT_SEED + index, size)
            with RawConnection(base) as connection:
                raw_put_blob(
                    connection, base, repo, StreamBody(chunks, size), digests[index]
                )

        with (
            RssSampler(target.pid) as sampler,
            ThreadPoolExecutor(len(digests)) as pool,
        ):
            start = time.perf_counter()
            for future in [pool.submit(push, index) for index in range(len(digests))]:
                future.result()
            elapsed = time.perf_counter() - start
        results["concurrent-peak-rss"] = sampler.peak_kib / 1024
        results["concurrent-rate"] = len(digests) * size / MIB / elapsed
        return results
