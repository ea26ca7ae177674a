"""bench.history turns results files into one comparison row per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.history import main


def _figure(
    key: str, higher_is_better: bool, distribution: float, cairn: float
) -> dict[str, Any]:
    return {
        "key": key,
        "higher_is_better": higher_is_better,
        "targets": {
            "distribution": {"median": distribution},
            "cairn": {"median": cairn},
        },
        "ratios": {"cairn/distribution": cairn / distribution},
    }


def _record(
    *, quick: bool = False, targets: tuple[str, ...] = ("distribution", "cairn")
) -> dict[str, Any]:
    return {
        "quick": quick,
        "target_names": list(targets),
        "machine": {"cpu_model": "Test CPU"},
        "limits": {
            "sha256": {"mib_per_s": 1500.0},
            "disk-fsync": {"mib_per_s": 300.0},
        },
        "source": {"commit": "0123456789abcdef", "modified": True},
        "workloads": [
            {
                "name": "big-blob",
                "figures": [_figure("monolithic-push", True, 200.0, 500.0)],
            },
            {
                "name": "listing",
                "figures": [_figure("tags-full", False, 10.0, 40.0)],
            },
            {
                "name": "memory",
                "figures": [_figure("big-peak-rss", False, 70.0, 110.0)],
            },
        ],
    }


def test_history_rows_speedups_skip_quick_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "20260101T000000Z.json"
    full.write_text(json.dumps(_record()))
    quick = tmp_path / "20260101T010000Z.json"
    quick.write_text(json.dumps(_record(quick=True)))
    alone = tmp_path / "20260101T020000Z.json"
    alone.write_text(json.dumps(_record(targets=("cairn",))))

    assert main([str(full), str(quick), str(alone)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines  # heading, rule, and the full run alone
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:5] == [
        "20260101T000000Z",
        "0123456 (modified)",
        "Test CPU",
        "1,500",
        "300",
    ]
    assert cells[5] == "2.50x"  # a rate: cairn's 500 against 200 MiB/s
    # A time: 40 ms against 10 ms is four times slower, shown as 0.25x.
    tag_listing = lines[0].strip("|").split("|").index(" tag listing ")
    assert cells[tag_listing] == "0.25x"
    assert cells[-2] == "110"  # cairn's peak RSS, in MiB
    assert cells[-1] == ""  # the 32-upload peak was not measured
