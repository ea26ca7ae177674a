"""Workloads: each measures one kind of registry traffic and returns figures.

A workload builds its payloads once per run (prepare), makes any per-server
state once per target (setup), then runs one measurement per round against one
target (run_round). The runner alternates targets within each round, so a new
workload only has to subclass Workload and be listed in all_workloads().
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procmem import CpuMeter
from bench.targets import Target

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class Figure:
    """One measured quantity of a workload.

    bound names the limits (from bench.limits) that cap a throughput figure,
    and the report divides the figure by the smallest of them. higher_is_better is
    None for a count that describes the run rather than its speed.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool | None
    bound: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sizes:
    big_blob: int
    chunk: int
    small_blob_count: int
    small_blob_size: int
    clients: int
    skopeo_big_layer: int
    skopeo_small_layers: int
    skopeo_small_layer_size: int
    manifest_count: int
    listing_tags: int
    listing_repos: int
    page_size: int
    memory_big_blob: int
    memory_concurrent_blobs: int
    memory_concurrent_size: int


FULL_SIZES = Sizes(
    big_blob=256 * MIB,
    chunk=8 * MIB,
    small_blob_count=200,
    small_blob_size=64 * KIB,
    clients=8,
    skopeo_big_layer=256 * MIB,
    skopeo_small_layers=200,
    skopeo_small_layer_size=64 * KIB,
    manifest_count=1000,
    listing_tags=10_000,
    listing_repos=10_000,
    page_size=1000,
    memory_big_blob=4 * GIB,
    memory_concurrent_blobs=32,
    memory_concurrent_size=64 * MIB,
)

QUICK_SIZES = Sizes(
    big_blob=8 * MIB,
    chunk=1 * MIB,
    small_blob_count=20,
    small_blob_size=64 * KIB,
    clients=8,
    skopeo_big_layer=4 * MIB,
    skopeo_small_layers=5,
    skopeo_small_layer_size=64 * KIB,
    manifest_count=20,
    listing_tags=50,
    listing_repos=30,
    page_size=10,
    memory_big_blob=64 * MIB,
    memory_concurrent_blobs=8,
    memory_concurrent_size=1 * MIB,
)


@dataclass
class Context:
    """Inputs shared by every workload: sizes, a scratch directory and a log function.

    scratch is on the same filesystem as the servers' data, and is shared by all
    targets, so payload files are written once per run.
    """

    sizes: Sizes
    scratch: Path
    log: Callable[[str], None]
    shared: dict[str, object] = field(default_factory=dict)


class Workload(ABC):
    name: str
    description: str

    @abstractmethod
    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        """Return the figures run_round reports, labelled for these sizes."""

    def unavailable_reason(self) -> str | None:
        """Return why this workload cannot run on this machine, or None."""
        return None

    def prepare(self, context: Context) -> None:  # noqa: B027 (optional hook)
        """Build payloads shared by all targets. Runs once per run."""

    def setup(self, context: Context, target: Target) -> object:
        """Create per-target state reused by every round. Runs once per target."""
        return None

    @abstractmethod
    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        """Measure once against target and return {figure key: value}.

        label is unique per round ("warmup1", "r1", ...). Workloads put it in
        repository names so that no round finds the blobs of an earlier one.
        """


def all_workloads() -> list[Workload]:
    from bench.workloads.big_blob import BigBlob
    from bench.workloads.listing import Listing
    from bench.workloads.manifests import ManifestPuts
    from bench.workloads.memory import Memory
    from bench.workloads.skopeo_copy import SkopeoCopy
    from bench.workloads.small_blobs import SmallBlobs

    return [BigBlob(), SmallBlobs(), SkopeoCopy(), ManifestPuts(), Listing(), Memory()]


def size_label(size: int) -> str:
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


def cpu_figures(key: str, label: str, per: str) -> tuple[Figure, Figure]:
    """Return the figures for the CPU time that the server and the harness
    spend per operation while measuring figure ``key``."""
    return (
        Figure(f"{key}-server-cpu", f"{label}, server CPU per {per}", "ms", False),
        Figure(f"{key}-client-cpu", f"{label}, harness CPU per {per}", "ms", False),
    )


def cpu_values(key: str, meter: CpuMeter, count: int) -> dict[str, float]:
    """Return the values of cpu_figures(key, ...) for ``count`` operations."""
    return {
        f"{key}-server-cpu": meter.server_s / count * 1000,
        f"{key}-client-cpu": meter.client_s / count * 1000,
    }
