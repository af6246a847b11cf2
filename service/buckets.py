"""Token buckets by key, in process: the per-user event rate of the in-process store
(service/store.py `MemoryStore`; Redis keeps its buckets in the append script, APPEND_SCRIPT) and
the failed-key bound per client address (service/limits.py `AuthThrottle`).

A bucket holds up to `burst` tokens and gains `per_s` a second; a request takes as many as it
costs, or none and is told how long to wait. A key's bucket is made full on first use, and the
buckets kept are bounded (`max_keys`, the least recently charged dropped first: a dropped key
starts full again, so the bound costs a little leniency, never memory). The clock is a
parameter, so tests move time by hand.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


def refill(tokens: float, at: float, now: float, per_s: float, burst: float) -> float:
    """The tokens a bucket holds at `now`, having held `tokens` at `at` (a clock that went back
    adds nothing). APPEND_SCRIPT computes the same in Lua."""
    return min(burst, tokens + max(0.0, now - at) * per_s)


class TokenBuckets:
    """One bucket per key (module docstring)."""

    def __init__(
        self,
        per_s: float,
        burst: float,
        *,
        max_keys: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need per_s > 0, burst >= 1, max_keys >= 1; got {per_s}, {burst}, {max_keys}")
        self.per_s = per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: Hashable, now: float) -> float:
        held = self._buckets.get(key)
        return self.burst if held is None else refill(*held, now, self.per_s, self.burst)

    def wait(self, key: Hashable, cost: float = 1) -> float:
        """Seconds until `key`'s bucket holds `cost` tokens (0: it does now). Takes nothing;
        math.inf where `cost` is more than the bucket ever holds."""
        if cost > self.burst:
            return math.inf
        missing = cost - self._tokens(key, self._clock())
        return max(0.0, missing / self.per_s)

    def take(self, key: Hashable, cost: float = 1) -> float:
        """Take `cost` tokens from `key`'s bucket and return 0; or, where it holds fewer, take
        nothing and return the seconds until it holds enough (`wait`)."""
        now = self._clock()
        if cost > self.burst:
            return math.inf
        tokens = self._tokens(key, now)
        if tokens < cost:
            return (cost - tokens) / self.per_s
        self._buckets[key] = (tokens - cost, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)  # the least recently charged: it starts full again
        return 0.0

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key, None)
