"""Exponential backoff and rate-limited logging for the bus's retry loops."""

from __future__ import annotations

import random
import time


class Backoff:
    """Delays that double from ``initial`` up to ``maximum`` seconds.

    Each delay is spread by up to ``jitter`` (a fraction) either way, so that
    several processes retrying the same server do not retry in step.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(
                f"invalid backoff: initial {initial} s must be positive and at "
                f"most maximum {maximum} s"
            )
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.attempt = 0

    def next_delay(self) -> float:
        """Count one more failed attempt and return the delay before the next."""
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self.attempt = 0


class Throttle:
    """Decide whether a repeated log line may be written now.

    The first occurrence always passes; later ones pass at most once per
    ``interval`` seconds, and report how many were held back in between.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None
        self._suppressed = 0

    def ready(self) -> int | None:
        """Return the number of suppressed occurrences, or None to stay quiet."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return None
        suppressed = self._suppressed
        self._last = now
        self._suppressed = 0
        return suppressed

    def reset(self) -> None:
        self._last = None
        self._suppressed = 0
