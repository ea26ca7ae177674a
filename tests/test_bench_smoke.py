"""The benchmark harness still runs end to end; no figure is checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench.queries
import bench.rebuild
import bench.relay
from bench.cli import parse_args
from bench.targets import CairnTarget

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
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert document["source"]["commit"] == head
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


# ---- number options of bench.rebuild, bench.queries and bench.relay -----------

BENCH_PARSERS = {
    "rebuild": bench.rebuild.parse_args,
    "queries": bench.queries.parse_args,
    "relay": bench.relay.parse_args,
}


@pytest.mark.parametrize(
    ("module", "option", "value", "message"),
    [
        ("rebuild", "--events", "0", "invalid count '0'"),
        ("rebuild", "--events", "-5", "invalid count '-5'"),
        ("rebuild", "--rounds", "0", "invalid count '0'"),
        ("rebuild", "--rounds", "nan", "invalid count 'nan'"),
        ("queries", "--repositories", "0", "invalid count '0'"),
        ("queries", "--repositories", "-1", "invalid count '-1'"),
        ("queries", "--iterations", "0", "invalid count '0'"),
        ("relay", "--backlog", "0", "invalid count '0'"),
        ("relay", "--backlog", "-1", "invalid count '-1'"),
        ("relay", "--seconds", "0", "invalid duration '0'"),
        ("relay", "--seconds", "-1", "invalid duration '-1'"),
        ("relay", "--seconds", "nan", "invalid duration 'nan'"),
        ("relay", "--seconds", "inf", "invalid duration 'inf'"),
        ("relay", "--seconds", "0.001", "--seconds 0.001 is too short"),
    ],
)
def test_bench_number_option_rejected(
    module: str,
    option: str,
    value: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        BENCH_PARSERS[module]([f"{option}={value}"])

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert message in error


@pytest.mark.parametrize("value", ["no-such-query", ","])
def test_bench_queries_only_rejects_unknown(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.queries.parse_args([f"--only={value}"])

    assert exited.value.code == 2
    assert "unknown query names" in capsys.readouterr().err


def test_bench_number_options_accepted() -> None:
    rebuild = bench.rebuild.parse_args(["--events", "10", "--rounds", "1"])
    queries = bench.queries.parse_args(["--repositories", "1", "--iterations", "1"])
    relay = bench.relay.parse_args(["--seconds", "0.01", "--backlog", "1"])

    assert (rebuild.events, rebuild.rounds) == (10, 1)
    assert (queries.repositories, queries.iterations) == (1, 1)
    assert (relay.seconds, relay.backlog) == (0.01, 1)


def test_bench_rebuild_rejects_zero_rounds() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.rebuild", "--rounds", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2, completed.stderr
    assert "argument --rounds: invalid count '0'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_bench_relative_cairn_path_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each server starts in its own run directory, where a path relative to
    # the caller's directory names nothing.
    program = tmp_path / "bin" / "cairn"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.chdir(tmp_path)

    found = CairnTarget("bin/cairn").find_program()

    assert found.is_absolute()
    assert found == program.resolve()
