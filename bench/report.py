"""Summaries of measured rounds: the JSON record and the Markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from bench.limits import Limit
from bench.workloads import Figure

BASELINE = "distribution"


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def bound_of(figure: Figure, limits: dict[str, Limit]) -> Limit | None:
    """Return the smallest limit among those that cap this figure."""
    candidates = [limits[name] for name in figure.bound if name in limits]
    return min(candidates, key=lambda limit: limit.mib_per_s, default=None)


def figure_record(
    figure: Figure,
    values: dict[str, list[float]],
    target_names: list[str],
    limits: dict[str, Limit],
) -> dict[str, object]:
    """Return one figure's JSON record: per-target stats, fractions and ratios."""
    bound = bound_of(figure, limits)
    per_target: dict[str, object] = {}
    medians: dict[str, float] = {}
    for name in target_names:
        stats = summarize(values.get(name, []))
        entry: dict[str, object] = {"rounds": values.get(name, [])}
        if stats is not None:
            entry.update(stats)
            medians[name] = stats["median"]
            if bound is not None:
                entry["fraction_of_bound"] = stats["median"] / bound.mib_per_s
        per_target[name] = entry
    ratios = {
        f"{name}/{BASELINE}": medians[name] / medians[BASELINE]
        for name in target_names
        if name != BASELINE and name in medians and medians.get(BASELINE)
    }
    return {
        "key": figure.key,
        "label": figure.label,
        "unit": figure.unit,
        "higher_is_better": figure.higher_is_better,
        "bound": bound.name if bound else None,
        "targets": per_target,
        "ratios": ratios,
    }


def limits_record(limits: dict[str, Limit]) -> dict[str, object]:
    return {name: asdict(limit) for name, limit in limits.items()}


def format_number(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(entry: dict[str, Any]) -> str:
    if "median" not in entry:
        return "not measured"
    median = format_number(entry["median"])
    if len(entry["rounds"]) < 2:
        return median
    return f"{median} ({format_number(entry['min'])}-{format_number(entry['max'])})"


def _fraction_cell(entry: dict[str, Any]) -> str:
    fraction = entry.get("fraction_of_bound")
    return "" if fraction is None else f"{fraction:.0%}"


def markdown_tables(record: dict[str, Any]) -> str:
    """Render the limits and the results of a run record as Markdown."""
    lines = ["| limit | MiB/s | how |", "| --- | ---: | --- |"]
    for limit in record["limits"].values():
        lines.append(
            f"| {limit['label']} | {format_number(limit['mib_per_s'])} "
            f"| {limit['detail']} |"
        )

    names: list[str] = record["target_names"]
    header = ["workload", "figure", "unit"]
    for name in names:
        header += [f"{name} median (min-max)", f"{name} % of bound"]
    ratio_names = [f"{name}/{BASELINE}" for name in names if name != BASELINE]
    if BASELINE in names:
        header += ratio_names
    header.append("bound")

    lines += ["", "| " + " | ".join(header) + " |"]
    lines.append(
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 4)) + " | --- |"
    )

    for workload in record["workloads"]:
        for figure in workload["figures"]:
            row = [workload["name"], figure["label"], figure["unit"]]
            for name in names:
                entry = figure["targets"][name]
                row += [_cell(entry), _fraction_cell(entry)]
            if BASELINE in names:
                for ratio_name in ratio_names:
                    ratio = figure["ratios"].get(ratio_name)
                    row.append("" if ratio is None else f"{ratio:.2f}")
            row.append(figure["bound"] or "")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
