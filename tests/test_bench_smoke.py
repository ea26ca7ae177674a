"""The benchmark harness still runs end to end; no figure is checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import parse_args

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


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bench_rejects_bad_tmp_dir(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_dir = tmp_path / "missing"
    if kind == "file":
        tmp_dir = tmp_path / "file"
        tmp_dir.write_text("not a directory\n")
    results = tmp_path / "results"

    with pytest.raises(SystemExit) as exited:
        parse_args(
            ["--quick", "--tmp-dir", str(tmp_dir), "--results-dir", str(results)]
        )

    assert exited.value.code == 2
    assert (
        f"--tmp-dir {tmp_dir} is not an existing directory" in capsys.readouterr().err
    )
    assert not results.exists()
    assert kind == "file" or not tmp_dir.exists()


def test_bench_rejects_bad_results_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regular_file = tmp_path / "file"
    regular_file.write_text("not a directory\n")
    results = regular_file / "results"

    with pytest.raises(SystemExit) as exited:
        parse_args(
            ["--quick", "--tmp-dir", str(tmp_path), "--results-dir", str(results)]
        )

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"cannot create --results-dir {results}: Not a directory" in error


def test_bench_accepts_existing_dirs(tmp_path: Path) -> None:
    results = tmp_path / "new" / "results"

    args = parse_args(
        ["--quick", "--tmp-dir", str(tmp_path), "--results-dir", str(results)]
    )

    assert args.tmp_dir == tmp_path
    assert results.is_dir()
