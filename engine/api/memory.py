"""Return memory that finished uploads freed to the operating system.

Upload bodies pass through buffers of 1 MiB. glibc's malloc keeps the
memory of freed buffers in its arenas, one per thread that allocated, so
after 32 concurrent uploads the server stayed about 100 MiB larger than
before them. ``malloc_trim`` gives free arena pages back. It walks every
arena, so it runs only when the last running upload ends, and only after
uploads have moved at least TRIM_AFTER_BYTES since the last call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from typing import Final

TRIM_AFTER_BYTES: Final = 64 * 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    function = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if function is None:
        # Not every C library has it; glibc does.
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


class MemoryTrimmer:
    """Counts running uploads and the body bytes they moved, and trims the
    heap when the last one ends after enough bytes went by."""

    def __init__(
        self, trim: Callable[[int], int] | None, *, after_bytes: int = TRIM_AFTER_BYTES
    ) -> None:
        self._trim = trim
        self._after_bytes = after_bytes
        self._lock = threading.Lock()
        self._running = 0
        self._moved = 0
        self.trims = 0

    def upload_started(self) -> None:
        with self._lock:
            self._running += 1

    def upload_finished(self, body_bytes: int) -> None:
        """Record an upload's end; called from its worker thread."""
        with self._lock:
            self._running -= 1
            self._moved += body_bytes
            if self._trim is None or self._running or self._moved < self._after_bytes:
                return
            self._moved = 0
            self.trims += 1
        self._trim(0)


TRIMMER: Final = MemoryTrimmer(_load_malloc_trim())
