"""Standard output whose reader has gone, as with `cairn verify | head -1`.

Python ignores SIGPIPE, so a write to such a pipe raises BrokenPipeError
where SIGPIPE's default action would kill the process. cairn commands then
stop quietly with the status that a shell reports for a program that
SIGPIPE killed. SIGPIPE stays ignored, because `cairn serve` must survive
clients that close their sockets.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Final

# 141, what a shell reports for a process that SIGPIPE killed.
STDOUT_CLOSED_STATUS: Final = 128 + signal.SIGPIPE


def stdout_reader_gone() -> bool:
    """Return whether standard output is a pipe or socket that nothing reads.

    poll(2) reports POLLERR on a pipe whose read end is closed, and POLLHUP
    on a socket whose peer has gone.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    # poll(2) always reports POLLERR and POLLHUP, so the mask is empty.
    poller.register(descriptor, 0)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def discard_stdout() -> None:
    """Point standard output's descriptor at /dev/null.

    Lines still in sys.stdout's buffer then go nowhere when Python flushes it
    at exit, instead of raising BrokenPipeError again and printing
    "Exception ignored".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
