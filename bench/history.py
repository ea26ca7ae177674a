"""One Markdown row per results file: cairn against Distribution, run by run.

    .venv/bin/python -m bench.history [FILE ...]

With no FILE it reads every bench/results/*.json, oldest first. Runs made
with --quick, and runs that did not measure both targets, are left out.
Each ratio cell gives how many times faster cairn was than Distribution in
that run's medians, whether the figure is a rate or a time, so a cell below
1.00x means that Distribution was faster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.report import BASELINE, format_number

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDER = "cairn"

# (column heading, workload name, figure key)
RATIO_COLUMNS = (
    ("monolithic push", "big-blob", "monolithic-push"),
    ("chunked push", "big-blob", "chunked-push"),
    ("pull", "big-blob", "pull"),
    ("small blobs", "small-blobs", "sequential"),
    ("small blobs, 8 clients", "small-blobs", "concurrent"),
    ("manifest PUTs", "manifests", "sequential"),
    ("manifest PUTs, 8 clients", "manifests", "concurrent"),
    ("tag listing", "listing", "tags-full"),
    ("catalog", "listing", "catalog-full"),
)
RSS_COLUMNS = (
    ("RSS 4 GiB, MiB", "memory", "big-peak-rss"),
    ("RSS 32 x 64 MiB, MiB", "memory", "concurrent-peak-rss"),
)


def _figure(record: dict[str, Any], workload: str, key: str) -> dict[str, Any] | None:
    for run in record.get("workloads", []):
        if run["name"] != workload:
            continue
        for figure in run["figures"]:
            if figure["key"] == key:
                return figure  # type: ignore[no-any-return]
    return None


def speedup(record: dict[str, Any], workload: str, key: str) -> float | None:
    """Return how many times faster cairn's median was, or None if unmeasured."""
    figure = _figure(record, workload, key)
    if figure is None:
        return None
    ratio = figure["ratios"].get(f"{CONTENDER}/{BASELINE}")
    if not ratio:
        return None
    return float(ratio) if figure["higher_is_better"] else 1 / float(ratio)


def contender_median(record: dict[str, Any], workload: str, key: str) -> float | None:
    figure = _figure(record, workload, key)
    if figure is None:
        return None
    median = figure["targets"].get(CONTENDER, {}).get("median")
    return None if median is None else float(median)


def _limit(record: dict[str, Any], name: str) -> str:
    limit = record.get("limits", {}).get(name)
    return format_number(limit["mib_per_s"]) if limit else ""


def _commit(record: dict[str, Any]) -> str:
    source = record.get("source") or {}
    commit = str(source.get("commit") or "")[:7]
    if commit and source.get("modified"):
        commit += " (modified)"
    return commit


def row(name: str, record: dict[str, Any]) -> str:
    cells = [
        name,
        _commit(record),
        str(record["machine"].get("cpu_model", "")),
        _limit(record, "sha256"),
        _limit(record, "disk-fsync"),
    ]
    for _, workload, key in RATIO_COLUMNS:
        value = speedup(record, workload, key)
        cells.append("" if value is None else f"{value:.2f}x")
    for _, workload, key in RSS_COLUMNS:
        value = contender_median(record, workload, key)
        cells.append("" if value is None else format_number(value))
    return "| " + " | ".join(cells) + " |"


def comparable(record: dict[str, Any]) -> bool:
    names = record.get("target_names", [])
    return not record.get("quick") and BASELINE in names and CONTENDER in names


def table(paths: list[Path]) -> str:
    headings = [
        "run",
        "commit",
        "CPU",
        "sha256, MiB/s",
        "disk + fsync, MiB/s",
        *(heading for heading, _, _ in RATIO_COLUMNS),
        *(heading for heading, _, _ in RSS_COLUMNS),
    ]
    lines = [
        "| " + " | ".join(headings) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(headings) - 3)) + " |",
    ]
    for path in paths:
        record = json.loads(path.read_text())
        if comparable(record):
            lines.append(row(path.stem, record))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in arguments] or sorted(RESULTS.glob("*.json"))
    if not paths:
        print(
            f"no results files found in {RESULTS}; run bench/run to make one",
            file=sys.stderr,
        )
        return 1
    print(table(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
