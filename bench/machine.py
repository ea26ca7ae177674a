"""Facts about the machine a run measured: hardware and competing CPU load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine_info(data_dir: Path) -> dict[str, object]:
    cpu_model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "data_filesystem": filesystem_of(data_dir),
    }


def source_info(checkout: Path) -> dict[str, object]:
    """Return the checked-out commit of ``checkout`` and whether its tracked
    files differ from it, or an empty dict when git cannot tell.

    The default cairn target is the venv's editable install of this
    checkout, so this names the code that ran unless --cairn points
    elsewhere.
    """

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *arguments],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "modified": bool(changes.strip())}


def filesystem_of(path: Path) -> str:
    """Return 'device (fstype) at mount point' for the mount that contains path."""
    best = ("", "", "")
    resolved = str(path.resolve())
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount_point, fstype = line.split()[:3]
            inside = resolved == mount_point or resolved.startswith(
                mount_point.rstrip("/") + "/"
            )
            if inside and len(mount_point) >= len(best[1]):
                best = (device, mount_point, fstype)
    return f"{best[0]} ({best[2]}) at {best[1]}"


def _busy_seconds() -> float:
    """Return the CPU time all cores spent not idle since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """Return the CPU time of this process and of the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class CpuMeter:
    """Measures CPU time used outside the harness and its servers during a run.

    Call stop() after every server has been stopped and waited for, so their CPU
    time counts as the harness's own. Kernel threads that do the run's disk
    writeback count as outside, so the figure is an upper bound on interference.
    """

    def __init__(self) -> None:
        self._busy_start = _busy_seconds()
        self._own_start = _own_seconds()

    def stop(self) -> float:
        """Return the core-seconds used by other processes since construction."""
        busy = _busy_seconds() - self._busy_start
        own = _own_seconds() - self._own_start
        return max(0.0, busy - own)
