"""Per-address request rate limits: one token bucket per remote address.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per
second. A request takes one token, and a request that finds the bucket
empty gets 429 TOOMANYREQUESTS with the whole seconds until a token is back.
A bucket untouched for ``burst / rate`` seconds has refilled completely and
is the same as a new one, so it is dropped. Memory therefore grows with the
number of addresses seen in the last ``burst / rate`` seconds only.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from engine.api.errors import ErrorCode, HTTPError

# The key of the bucket for requests with no client address (a Unix socket).
NO_ADDRESS = ""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client address, kept in memory.

    Not thread-safe, because the app calls it from the event loop only.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Allow ``rate`` requests per second with bursts of ``burst``.

        ``burst`` defaults to twice ``rate`` and is at least 1, so every
        address can always send one request. ``clock`` returns seconds.
        """
        if rate <= 0:
            raise ValueError(f"invalid rate {rate}: expected a positive number")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst if burst is not None else 2 * rate))
        self.idle_after = self.burst / self.rate
        self._clock = clock
        # Least recently used first, so the idle buckets are at the front.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, address: str | None) -> int | None:
        """Take a token for ``address``.

        Returns None when the request may proceed, or the Retry-After value:
        whole seconds, at least 1, until the bucket has a token again.
        """
        now = self._clock()
        self._drop_idle(now)

        key = address or NO_ADDRESS
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
            self._buckets.move_to_end(key)

        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def _drop_idle(self, now: float) -> None:
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if now - oldest.updated < self.idle_after:
                return
            del self._buckets[key]


def too_many_requests(address: str | None, retry_after: int) -> HTTPError:
    """Build the 429 TOOMANYREQUESTS error with its Retry-After header."""
    return HTTPError(
        ErrorCode.TOOMANYREQUESTS,
        429,
        f"too many requests from {address or 'this client'}: "
        f"retry after {retry_after} s",
        {"address": address, "retry_after": retry_after},
        [("Retry-After", str(retry_after))],
    )
