"""Worker threads for the synchronous registry, so the event loop never blocks.

The handlers make every database call, disk read and hash in a worker thread:
short calls through ``run_sync``, upload bodies through engine.api.body. An
upload body occupies its thread for as long as the client sends, so uploads
get a limiter of their own and cannot take the 40 threads of anyio's default
limiter from the short calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

# Concurrent upload bodies being written; more wait for a free thread.
MAX_UPLOAD_THREADS: Final = 64


async def run_sync(func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run ``func(*args, **kwargs)`` in a worker thread and return its result."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


def upload_limiter() -> anyio.CapacityLimiter:
    """Return a new limiter for upload bodies, one per app."""
    return anyio.CapacityLimiter(MAX_UPLOAD_THREADS)
