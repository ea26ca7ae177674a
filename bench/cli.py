"""Command line of the benchmark harness: start targets, run workloads, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.limits import Limit, measure_limits
from bench.machine import CpuMeter, machine_info, source_info
from bench.report import figure_record, limits_record, markdown_tables
from bench.targets import (
    TARGETS,
    CairnTarget,
    DistributionTarget,
    Target,
    TargetUnavailable,
)
from bench.workloads import (
    FULL_SIZES,
    QUICK_SIZES,
    Context,
    Sizes,
    Workload,
    all_workloads,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    workload_names = [workload.name for workload in all_workloads()]
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description=(
            "Benchmark OCI registries on 127.0.0.1: start each target, run every "
            "workload against the targets in alternation, and write "
            "bench/results/<timestamp>.json plus a Markdown table on stdout."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, no warm-up and one round (a smoke test)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="measured rounds per workload (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="unrecorded warm-up rounds before them (default 1; 0 with --quick)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated targets, in alternation order (default "
        f"{','.join(TARGETS)})",
    )
    parser.add_argument("--only", metavar="NAME", help="run this one target only")
    parser.add_argument(
        "--workloads",
        default=",".join(workload_names),
        help=f"comma-separated workloads (default all: {','.join(workload_names)})",
    )
    parser.add_argument(
        "--distribution",
        metavar="PATH",
        help="docker-registry executable (default: PATH)",
    )
    parser.add_argument(
        "--cairn",
        metavar="PATH",
        help="cairn executable (default: .venv/bin/cairn, then PATH)",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        help="existing directory in which to create the run directory that "
        "contains both servers' data and the payloads (default: the system temp "
        "dir); the fsync limit is measured there",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <timestamp>.json (default bench/results)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run directory after the run"
    )
    args = parser.parse_args(argv)

    args.target_names = [args.only] if args.only else _split(args.targets)
    for name in args.target_names:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    args.workload_names = _split(args.workloads)
    for name in args.workload_names:
        if name not in workload_names:
            parser.error(
                f"unknown workload {name!r}; choose from {', '.join(workload_names)}"
            )
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    # A typo in --tmp-dir fails here instead of creating a directory that
    # may lie on another file system than the one meant to be measured.
    if args.tmp_dir is not None and not args.tmp_dir.is_dir():
        parser.error(
            f"--tmp-dir {args.tmp_dir} is not an existing directory; create it "
            "or choose another"
        )
    # Create the results directory before the run, so that an unusable path
    # fails at once instead of after the whole run.
    try:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(
            f"cannot create --results-dir {args.results_dir}: {error.strerror or error}"
        )
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def make_target(name: str, args: argparse.Namespace) -> Target:
    if name == DistributionTarget.name:
        return DistributionTarget(args.distribution)
    if name == CairnTarget.name:
        return CairnTarget(args.cairn)
    return TARGETS[name]()


@dataclass
class WorkloadRun:
    """Measured values of one workload: {figure key: {target: [per round]}}."""

    workload: Workload
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    warmup: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


def run_workload(
    workload: Workload,
    context: Context,
    targets: list[Target],
    rounds: int,
    warmup: int,
) -> WorkloadRun:
    """Run a workload against every target, alternating targets within each round."""
    run = WorkloadRun(workload)
    reason = workload.unavailable_reason()
    if reason:
        log.warning("%s: skipped: %s", workload.name, reason)
        run.skipped = reason
        return run
    started = time.perf_counter()
    log.info("%s: preparing payloads", workload.name)
    workload.prepare(context)

    # A failure on one target ends only that target's part of this workload. The
    # error is logged and stored in the results, and the other targets go on.
    states: dict[str, object] = {}
    active: list[Target] = []
    for target in targets:
        try:
            log.info("%s: setup on %s", workload.name, target.name)
            states[target.name] = workload.setup(context, target)
            active.append(target)
        except Exception as error:
            _record_failure(run, workload, target, "setup", error)

    labels = [f"warmup{index + 1}" for index in range(warmup)]
    labels += [f"r{index + 1}" for index in range(rounds)]
    for label in labels:
        for target in list(active):
            try:
                values = workload.run_round(context, target, states[target.name], label)
            except Exception as error:
                _record_failure(run, workload, target, label, error)
                active.remove(target)
                continue
            log.info("%s %s %s: %s", workload.name, label, target.name, _brief(values))
            if label.startswith("warmup"):
                run.warmup.setdefault(target.name, []).append(values)
                continue
            for key, value in values.items():
                run.values.setdefault(key, {}).setdefault(target.name, []).append(value)
    log.info("%s: done in %.0f s", workload.name, time.perf_counter() - started)
    return run


def _record_failure(
    run: WorkloadRun, workload: Workload, target: Target, step: str, error: Exception
) -> None:
    message = f"{step}: {type(error).__name__}: {error}"
    if target.process is not None and target.process.poll() is not None:
        message += (
            f"\n{target.name} exited with code {target.process.returncode}; "
            f"log:\n{target.log_tail()}"
        )
    log.error(
        "%s on %s failed at %s", workload.name, target.name, message, exc_info=error
    )
    run.errors[target.name] = message


def _brief(values: dict[str, float]) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in values.items())


def start_targets(
    names: list[str], args: argparse.Namespace, run_dir: Path, started: list[Target]
) -> dict[str, dict[str, object]]:
    """Start each named target and append it to started, so the caller can stop it
    even if a later start raises. A target that cannot start is reported and skipped.
    """
    info: dict[str, dict[str, object]] = {}
    for name in names:
        target = make_target(name, args)
        try:
            program = target.find_program()
            version = target.version(program)
            target.start(run_dir / name)
        except TargetUnavailable as error:
            log.warning("skipping %s: %s", name, error)
            info[name] = {"available": False, "reason": str(error)}
            continue
        log.info("%s: pid %d at %s (%s)", name, target.pid, target.base_url, program)
        info[name] = {
            "available": True,
            "program": str(program),
            "version": version,
            "base_url": target.base_url,
            "data_dir": str(target.data_dir),
        }
        started.append(target)
    return info


def _exit_on_sigterm(signum: int, frame: object) -> None:
    log.warning("received SIGTERM, stopping")
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    # httpx logs every request at INFO, which would bury the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM raises SystemExit, so the finally block below still stops the
    # servers and removes the run directory.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    workloads = [w for w in all_workloads() if w.name in args.workload_names]
    started_at = datetime.now(UTC)
    source = source_info(Path(__file__).resolve().parent.parent)
    load_at_start = os.getloadavg()
    log.info("load average at start: %.2f %.2f %.2f", *load_at_start)
    cpu_meter = CpuMeter()
    wall_start = time.perf_counter()
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="cairn-bench-", dir=args.tmp_dir))
    except OSError as error:
        parent = args.tmp_dir or tempfile.gettempdir()
        log.error("cannot create the run directory in %s: %s", parent, error)
        return 1
    log.info("run directory %s", run_dir)
    targets: list[Target] = []
    try:
        log.info("measuring physical limits")
        limits = measure_limits(run_dir, args.quick)
        for limit in limits.values():
            log.info("  %s: %.0f MiB/s", limit.label, limit.mib_per_s)
        target_info = start_targets(args.target_names, args, run_dir, targets)
        if not targets:
            log.error("no target could be started; nothing to measure")
            return 1
        scratch = run_dir / "payloads"
        scratch.mkdir()
        context = Context(sizes, scratch, log.info)
        runs = [
            run_workload(workload, context, targets, args.rounds, args.warmup)
            for workload in workloads
        ]
    finally:
        for target in targets:
            target.stop()
        if args.keep:
            log.info("kept %s", run_dir)
        else:
            log.info("removing %s", run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)

    machine = machine_info(args.tmp_dir or Path(tempfile.gettempdir()))
    # Other processes compete for the same cores. The load averages and their
    # CPU time show how busy the machine was around the run.
    machine["loadavg_at_start"] = load_at_start
    machine["loadavg_at_end"] = os.getloadavg()
    machine["run_seconds"] = round(time.perf_counter() - wall_start, 1)
    machine["other_cpu_seconds"] = round(cpu_meter.stop(), 1)
    log.info(
        "other processes used %.0f CPU-seconds during the %.0f s run",
        machine["other_cpu_seconds"],
        machine["run_seconds"],
    )
    record = build_record(args, sizes, started_at, machine, limits, target_info, runs)
    record["command"] = ["bench/run", *(sys.argv[1:] if argv is None else argv)]
    record["source"] = source
    out = args.results_dir / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_tables(record))
    unavailable = [name for name, item in target_info.items() if not item["available"]]
    for name in unavailable:
        print(f"\n{name} was not measured: {target_info[name]['reason']}")
    for run in runs:
        if run.skipped:
            print(f"\n{run.workload.name} was skipped: {run.skipped}")
        for name, message in run.errors.items():
            print(f"\n{run.workload.name} failed on {name}: {message}")
    log.info("wrote %s", out)
    failed = any(run.errors for run in runs)
    return 1 if failed else 0


def build_record(
    args: argparse.Namespace,
    sizes: Sizes,
    started_at: datetime,
    machine: dict[str, object],
    limits: dict[str, Limit],
    target_info: dict[str, dict[str, object]],
    runs: list[WorkloadRun],
) -> dict[str, object]:
    names = list(args.target_names)
    workloads = []
    for run in runs:
        figures = [
            figure_record(figure, run.values.get(figure.key, {}), names, limits)
            for figure in run.workload.figures(sizes)
        ]
        workloads.append(
            {
                "name": run.workload.name,
                "description": run.workload.description,
                "skipped": run.skipped,
                "errors": run.errors,
                "warmup": run.warmup,
                "figures": figures,
            }
        )
    return {
        "started_at": started_at.isoformat(),
        "quick": args.quick,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "sizes": asdict(sizes),
        "machine": machine,
        "limits": limits_record(limits),
        "target_names": names,
        "targets": target_info,
        "workloads": workloads,
    }
