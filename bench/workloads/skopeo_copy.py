"""skopeo copy of whole images between OCI layout directories and the registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.payload import (
    OCI_LAYER_TAR,
    OciLayoutWriter,
    read_layout_manifest_digest,
    small_tar_layer,
)
from bench.targets import Target
from bench.urls import loopback_host_port
from bench.workloads import MIB, Context, Figure, Sizes, Workload, size_label

SKOPEO = "/usr/bin/skopeo"
# skopeo remembers which registry already stores a blob and then skips the upload.
# Removing this cache before a copy makes every copy transfer every blob.
BLOB_INFO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
SKOPEO_TIMEOUT_S = 1800
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")


class SkopeoCopy(Workload):
    name = "skopeo"
    description = (
        "skopeo copy --preserve-digests of a one-big-layer image and of a "
        "many-small-layers image, from an OCI layout to the registry and back"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        big = f"1 x {size_label(sizes.skopeo_big_layer)} layer"
        small = (
            f"{sizes.skopeo_small_layers} x "
            f"{size_label(sizes.skopeo_small_layer_size)} layers"
        )
        push_bound = ("sha256", "loopback", "disk-fsync")
        return (
            Figure("big-push", f"{big}, push", "s", False),
            Figure("big-pull", f"{big}, pull", "s", False),
            Figure("small-push", f"{small}, push", "s", False),
            Figure("small-pull", f"{small}, pull", "s", False),
            Figure("big-push-rate", f"{big}, push rate", "MiB/s", True, push_bound),
            Figure(
                "big-pull-rate",
                f"{big}, pull rate",
                "MiB/s",
                True,
                ("sha256", "loopback"),
            ),
        )

    def unavailable_reason(self) -> str | None:
        if not os.access(SKOPEO, os.X_OK):
            return f"{SKOPEO} not found; install Debian's skopeo package"
        return None

    def prepare(self, context: Context) -> None:
        sizes = context.sizes
        root = context.scratch / "skopeo"
        root.mkdir(exist_ok=True)
        context.log(
            f"building OCI layouts: 1 x {size_label(sizes.skopeo_big_layer)}, "
            f"{sizes.skopeo_small_layers} x {size_label(sizes.skopeo_small_layer_size)}"
        )
        big = OciLayoutWriter(root / "big-image")
        big.finish([big.add_big_tar_layer(sizes.skopeo_big_layer)], "latest")
        small = OciLayoutWriter(root / "small-image")
        layers = [
            small.add_bytes(
                OCI_LAYER_TAR, small_tar_layer(sizes.skopeo_small_layer_size)
            )
            for _ in range(sizes.skopeo_small_layers)
        ]
        small.finish(layers, "latest")

        # Private skopeo configuration: accept any image, no mirrors or search
        # registries, no signature lookups, temporary files under scratch.
        (root / "policy.json").write_text(
            '{"default": [{"type": "insecureAcceptAnything"}]}'
        )
        (root / "registries.conf").write_text("unqualified-search-registries = []\n")
        (root / "registries.d").mkdir(exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        root = context.scratch / "skopeo"
        host, port = loopback_host_port(target.base_url)
        results: dict[str, float] = {}
        for image in ("big", "small"):
            layout = root / f"{image}-image"
            remote = f"docker://{host}:{port}/bench/skopeo-{image}-{label}:latest"
            pulled = root / f"pulled-{image}"
            shutil.rmtree(pulled, ignore_errors=True)

            results[f"{image}-push"] = _copy(
                root, f"oci:{layout}:latest", remote, "--dest-tls-verify=false"
            )
            results[f"{image}-pull"] = _copy(
                root, remote, f"oci:{pulled}:latest", "--src-tls-verify=false"
            )
            expected = read_layout_manifest_digest(layout)
            received = read_layout_manifest_digest(pulled)
            if received != expected:
                raise RuntimeError(
                    f"pulled manifest {received} differs from pushed {expected}"
                )
            shutil.rmtree(pulled)
        big_mib = context.sizes.skopeo_big_layer / MIB
        results["big-push-rate"] = big_mib / results["big-push"]
        results["big-pull-rate"] = big_mib / results["big-pull"]
        return results


def _copy(root: Path, source: str, destination: str, tls_flag: str) -> float:
    """Run one skopeo copy and return its wall time in seconds."""
    BLOB_INFO_CACHE.unlink(missing_ok=True)

    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in PROXY_VARIABLES
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["CONTAINERS_REGISTRIES_CONF"] = str(root / "registries.conf")
    env["TMPDIR"] = str(root / "tmp")

    argv = [
        SKOPEO,
        "--policy",
        str(root / "policy.json"),
        "--registries.d",
        str(root / "registries.d"),
        "--tmpdir",
        str(root / "tmp"),
        "copy",
        "--quiet",
        "--preserve-digests",
        tls_flag,
        source,
        destination,
    ]

    start = time.perf_counter()
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT_S
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"skopeo copy {source} {destination} failed with exit code "
            f"{result.returncode}: {result.stderr.strip()[-800:]}"
        )
    return elapsed
