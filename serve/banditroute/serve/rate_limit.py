"""A token-bucket rate limit per API key (pure: the clock is injected; no Ray, no I/O).

Each key gets a bucket of ``burst`` tokens refilled at ``rate_per_s``; a
request takes one token, or is refused with the seconds until one is back
(the ingress answers 429 with ``Retry-After``). Buckets live in the ingress
replica that answers: with N ingress replicas a key may get up to N times the
rate (per replica, documented in docs/reliability.md). Memory is bounded: at
most ``max_keys`` buckets, the least recently used dropped first (a dropped
key starts again with a full bucket, never with less).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``tokens`` available at ``updated`` (clock seconds); refills at ``rate_per_s`` up to ``burst``."""

    tokens: float
    updated: float

    def take(self, now: float, rate_per_s: float, burst: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 when granted, else the seconds until they would be (nothing taken)."""
        elapsed = max(0.0, now - self.updated)  # a clock that steps back never refills
        self.tokens = min(burst, self.tokens + elapsed * rate_per_s)
        self.updated = max(self.updated, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / rate_per_s


class KeyedRateLimiter:
    """One TokenBucket per key, bounded in number; ``rate_per_s == 0`` turns it off."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if rate_per_s < 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_s must be >= 0, burst and max_keys >= 1")
        self.rate_per_s, self.burst, self.max_keys, self.clock = float(rate_per_s), float(burst), int(max_keys), clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def check(self, key: str, cost: float = 1.0) -> float:
        """0.0 when ``key`` may make this request now, else the seconds to wait (the request is not counted)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.burst, now)
        wait = bucket.take(now, self.rate_per_s, self.burst, cost)
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), as HTTP wants it."""
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
