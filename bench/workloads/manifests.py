"""Manifest PUTs under distinct tags, sequential and from concurrent clients."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import partial

from bench.payload import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    Descriptor,
    image_config,
    image_manifest,
    sha256_digest,
)
from bench.procmem import CpuMeter
from bench.registry import (
    http_client,
    push_blob,
    raw_connection,
    raw_open,
    raw_put_manifest,
    run_concurrent,
)
from bench.targets import Target
from bench.workloads import (
    Context,
    Figure,
    Sizes,
    Workload,
    cpu_figures,
    cpu_values,
)

REPO = "bench/manifests"


@dataclass(frozen=True)
class ManifestState:
    config: Descriptor
    layer: Descriptor


class ManifestPuts(Workload):
    name = "manifests"
    description = (
        "PUT of distinct small OCI image manifests, each under a new tag, all "
        "referencing one config and one layer pushed during setup, sent over a "
        "raw HTTP/1.1 connection"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        count = sizes.manifest_count
        figures = []
        for key, mode in (("sequential", "sequential"), ("concurrent", "")):
            mode = mode or f"{sizes.clients} clients"
            figures += [
                Figure(f"{key}", f"{count} PUTs, {mode}", "PUT/s", True),
                Figure(f"{key}-p50", f"{count} PUTs, {mode}, p50", "ms", False),
                Figure(f"{key}-p99", f"{count} PUTs, {mode}, p99", "ms", False),
                *cpu_figures(key, f"{count} PUTs, {mode}", "PUT"),
            ]
        return tuple(figures)

    def setup(self, context: Context, target: Target) -> ManifestState:
        layer_data = os.urandom(1024)
        layer = Descriptor(OCI_LAYER_TAR, sha256_digest(layer_data), len(layer_data))
        config_data = image_config([layer.digest])
        config = Descriptor(OCI_CONFIG, sha256_digest(config_data), len(config_data))
        with http_client(target.base_url) as client:
            push_blob(client, REPO, layer_data, layer.digest)
            push_blob(client, REPO, config_data, config.digest)
        return ManifestState(config, layer)

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        assert isinstance(state, ManifestState)
        count = context.sizes.manifest_count
        results: dict[str, float] = {}

        base_url = target.base_url
        sequential = _manifests(state, f"{label}-s", count)
        latencies = []
        sequential_cpu = CpuMeter(target.pid)
        with raw_connection(base_url) as connection:
            raw_open(connection)
            sequential_cpu.start()
            start = time.perf_counter()
            for tag, body in sequential:
                put_start = time.perf_counter()
                raw_put_manifest(connection, base_url, REPO, tag, body)
                latencies.append(time.perf_counter() - put_start)
            wall = time.perf_counter() - start
            sequential_cpu.stop()
        results.update(_summary("sequential", count, wall, latencies))
        results.update(cpu_values("sequential", sequential_cpu, count))

        concurrent = _manifests(state, f"{label}-c", count)
        concurrent_cpu = CpuMeter(target.pid)
        result = run_concurrent(
            context.sizes.clients,
            concurrent,
            partial(raw_connection, base_url),
            lambda connection, item: raw_put_manifest(
                connection, base_url, REPO, item[0], item[1]
            ),
            concurrent_cpu,
        )
        results.update(_summary("concurrent", count, result.wall_s, result.latencies_s))
        results.update(cpu_values("concurrent", concurrent_cpu, count))
        return results


def _manifests(
    state: ManifestState, prefix: str, count: int
) -> list[tuple[str, bytes]]:
    """Return (tag, manifest) pairs whose manifests differ only in an annotation."""
    items = []
    for index in range(count):
        tag = f"{prefix}{index:06d}"
        body = image_manifest(state.config, [state.layer], {"bench.sequence": tag})
        items.append((tag, body))
    return items


def _summary(
    key: str, count: int, wall_s: float, latencies_s: list[float]
) -> dict[str, float]:
    return {
        key: count / wall_s,
        f"{key}-p50": percentile(latencies_s, 50) * 1000,
        f"{key}-p99": percentile(latencies_s, 99) * 1000,
    }


def percentile(values: list[float], percent: float) -> float:
    """Return the percentile by linear interpolation between closest ranks."""
    if len(values) == 1:
        return values[0]
    cut_points = statistics.quantiles(values, n=100, method="inclusive")
    return cut_points[int(percent) - 1]
