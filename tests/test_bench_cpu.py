"""CpuMeter counts the CPU time of a server process tree and of the harness."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.procmem import CpuMeter

BUSY_CHILD = (
    "import subprocess, sys, time\n"
    # The grandchild spins until stdin closes, so the meter must follow the
    # process tree to count it.
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import sys, select\\nwhile not select.select([sys.stdin], [], [], 0)[0]: pass'], "
    "stdin=subprocess.PIPE)\n"
    "sys.stdin.read()\n"
    "child.stdin.close()\n"
    "child.wait()\n"
)


def test_cpu_meter_counts_descendants_and_self() -> None:
    server = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdin=subprocess.PIPE)
    try:
        meter = CpuMeter(server.pid)
        time.sleep(0.5)  # Let the grandchild start spinning.
        meter.start()
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass
        time.sleep(0.5)
        meter.stop()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    # The spinning grandchild alone uses about a core for the ~0.8 s measured.
    assert meter.server_s >= 0.3
    assert meter.client_s >= 0.3
