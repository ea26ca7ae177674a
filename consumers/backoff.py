"""Exponential backoff with jitter, as a pure function of the attempt number."""

from __future__ import annotations

import random


def retry_delay(attempt: int, initial: float, maximum: float) -> float:
    """Return the seconds to wait after failed attempt number ``attempt`` (1-based).

    The base delay doubles from ``initial`` up to ``maximum``. The result is
    drawn uniformly from the upper half of the base, so consumers that fail
    together do not retry in step, and it never exceeds ``maximum``.
    """
    base = min(maximum, initial * 2 ** max(attempt - 1, 0))
    return random.uniform(base / 2, base)
