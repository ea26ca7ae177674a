"""One large random blob: monolithic push, chunked push and pull, in MiB/s."""

from __future__ import annotations

import time
from pathlib import Path

from bench.payload import write_random_file
from bench.rawhttp import FileBody, RawConnection
from bench.registry import (
    raw_finish_upload,
    raw_patch,
    raw_pull_blob,
    raw_put_blob,
    raw_start_upload,
)
from bench.targets import Target
from bench.workloads import MIB, Context, Figure, Sizes, Workload, size_label

PUSH_BOUND = ("sha256", "loopback", "disk-fsync")


class BigBlob(Workload):
    name = "big-blob"
    description = (
        "one random blob streamed from a file: POST + PUT ?digest=, POST + PATCH "
        "chunks + PUT, and GET with the body discarded"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        blob = size_label(sizes.big_blob)
        chunked = f"{blob} chunked push ({size_label(sizes.chunk)} PATCHes)"
        return (
            Figure(
                "monolithic-push", f"{blob} monolithic push", "MiB/s", True, PUSH_BOUND
            ),
            Figure("chunked-push", chunked, "MiB/s", True, PUSH_BOUND),
            Figure("pull", f"{blob} pull", "MiB/s", True, ("loopback",)),
        )

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        size = context.sizes.big_blob
        path, digest = _round_blob(context, label)
        chunk = context.sizes.chunk
        base = target.base_url
        mono_repo = f"bench/big-mono-{label}"
        chunk_repo = f"bench/big-chunked-{label}"
        with RawConnection(base) as connection:
            start = time.perf_counter()
            raw_put_blob(connection, base, mono_repo, FileBody(path, 0, size), digest)
            mono_s = time.perf_counter() - start

            start = time.perf_counter()
            push_chunked(connection, base, chunk_repo, path, size, chunk, digest)
            chunked_s = time.perf_counter() - start

            start = time.perf_counter()
            received = raw_pull_blob(connection, base, mono_repo, digest)
            pull_s = time.perf_counter() - start
        if received != size:
            raise RuntimeError(f"pull returned {received} bytes, expected {size}")
        mib = size / MIB
        return {
            "monolithic-push": mib / mono_s,
            "chunked-push": mib / chunked_s,
            "pull": mib / pull_s,
        }


def _round_blob(context: Context, label: str) -> tuple[Path, str]:
    """Return the random blob file of this round, writing it on first use.

    Every round pushes new bytes, so no server can skip the write because it
    already stores the digest. All targets get the same bytes in one round.
    """
    cached = context.shared.get("big-blob")
    if isinstance(cached, tuple) and cached[0] == label:
        return cached[1], cached[2]
    path = context.scratch / "big-blob.bin"
    digest = write_random_file(path, context.sizes.big_blob)
    context.shared["big-blob"] = (label, path, digest)
    return path, digest


def push_chunked(
    connection: RawConnection,
    base_url: str,
    repo: str,
    path: Path,
    size: int,
    chunk: int,
    digest: str,
) -> None:
    """Push path with POST, one PATCH per chunk bytes, then PUT ?digest=."""
    upload_url = raw_start_upload(connection, base_url, repo)
    for offset in range(0, size, chunk):
        body = FileBody(path, offset, min(chunk, size - offset))
        upload_url = raw_patch(connection, base_url, upload_url, body, offset)
    raw_finish_upload(connection, upload_url, digest)
