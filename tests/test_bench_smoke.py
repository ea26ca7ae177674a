"""The benchmark harness still runs end to end; no figure is checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_completes(tmp_path: Path) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")
    results = tmp_path / "results"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--workloads",
            "big-blob,small-blobs,manifests,listing",
            "--tmp-dir",
            str(tmp_path),
            "--results-dir",
            str(results),
            "--cairn",
            str(Path(sys.executable).parent / "cairn"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    (result_file,) = results.glob("*.json")
    document = json.loads(result_file.read_text())
    assert document["quick"] is True
    workloads = {workload["name"]: workload for workload in document["workloads"]}
    assert set(workloads) == {"big-blob", "small-blobs", "manifests", "listing"}
    for name, workload in workloads.items():
        assert workload["errors"] == {}, name
        for figure in workload["figures"]:
            # Both targets have a value, so the ratio exists.
            assert set(figure["targets"]) == {"distribution", "cairn"}, figure["key"]
            assert "cairn/distribution" in figure["ratios"], figure["key"]
