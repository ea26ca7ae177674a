"""Resident memory and CPU time of a process tree, read from /proc."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def process_tree(pid: int) -> list[int]:
    """Return pid and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in field 2 may contain spaces, so split after ")".
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, []))
    return tree


def status_kib(pid: int, field: str) -> int:
    """Return a kB field such as VmRSS or VmHWM of /proc/PID/status, 0 if gone."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def reset_peak(pids: list[int]) -> None:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux 4.0+)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            (PROC / str(pid) / "clear_refs").write_text("5")


class RssSampler:
    """Samples the summed VmRSS of a process tree in a background thread.

    peak_kib is the larger of the highest sampled sum and the highest VmHWM of
    any one member, since a short spike can fall between two samples.
    """

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_sum_kib = 0
        self.members: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.members = set(process_tree(self.pid))
        reset_peak(list(self.members))
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        tree = process_tree(self.pid)
        self.members.update(tree)
        total = sum(status_kib(pid, "VmRSS") for pid in tree)
        self.peak_sum_kib = max(self.peak_sum_kib, total)

    def _run(self) -> None:
        refresh = 0
        tree = process_tree(self.pid)
        while not self._stop.wait(self.interval_s):
            # Rescanning /proc for new children costs more than reading status,
            # so it runs every 25 samples.
            refresh += 1
            if refresh % 25 == 0:
                tree = process_tree(self.pid)
                self.members.update(tree)
            total = sum(status_kib(pid, "VmRSS") for pid in tree)
            self.peak_sum_kib = max(self.peak_sum_kib, total)

    @property
    def peak_kib(self) -> int:
        peaks = [status_kib(pid, "VmHWM") for pid in self.members]
        return max([self.peak_sum_kib, *peaks])


def tree_rss_kib(pid: int) -> int:
    return sum(status_kib(member, "VmRSS") for member in process_tree(pid))


def tree_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of pid and its live descendants.

    Descendants that have exited are not counted: /proc gives their time only
    to a parent that has waited for them. A descendant that exits between
    two readings therefore makes their difference too low.
    """
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = (PROC / str(member) / "stat").read_text()
        except OSError:
            continue
        # Fields 14 and 15 (utime, stime) are the 12th and 13th after ")".
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds that a server process tree and this process use between
    start() and stop(). This process's time covers all of its threads."""

    server_pid: int
    server_s: float = 0.0
    client_s: float = 0.0

    # Each method reads this process's time on the side of its /proc scan
    # that keeps the scan out of the harness figure.
    def start(self) -> None:
        self.server_s = -tree_cpu_seconds(self.server_pid)
        self.client_s = -time.process_time()

    def stop(self) -> None:
        self.client_s += time.process_time()
        self.server_s += tree_cpu_seconds(self.server_pid)
