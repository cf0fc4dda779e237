"""Token buckets per peer address: how often a node may do something costly for one address.

Pure: the clock is passed in. Loopback addresses get ``local_factor`` times the burst and rate
(every node of a host shares 127.0.0.1). At most ``capacity`` addresses are remembered; the one
used least recently is forgotten first (it starts again with a full bucket).
"""

from __future__ import annotations

import collections


class AddressBuckets:
    def __init__(self, burst: int, rate_per_s: float, local_factor: int, capacity: int) -> None:
        self._burst = burst
        self._rate = rate_per_s
        self._local = local_factor
        self._capacity = capacity
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict())

    def tokens(self, address: str, now: float) -> float:
        """What ``address`` may have now."""
        factor = self._local if address.startswith("127.") else 1
        burst = float(self._burst * factor)
        tokens, stamp = self._buckets.get(address, (burst, now))
        return min(burst, tokens + (now - stamp) * self._rate * factor)

    def has(self, address: str, now: float) -> bool:
        return self.tokens(address, now) >= 1.0

    def wait(self, address: str, now: float) -> float:
        """Seconds until ``address`` has a token (0.0 if it has one now)."""
        missing = 1.0 - self.tokens(address, now)
        if missing <= 0.0:
            return 0.0
        factor = self._local if address.startswith("127.") else 1
        return missing / (self._rate * factor)

    def give(self, address: str, now: float) -> None:
        """Return a token taken for ``address`` (what it was spent on turned out harmless)."""
        if address in self._buckets:
            tokens = self.tokens(address, now)
            self._buckets[address] = (tokens + 1.0, now)  # tokens() caps it at the burst

    def take(self, address: str, now: float) -> None:
        tokens = self.tokens(address, now)
        self._buckets.pop(address, None)
        self._buckets[address] = (tokens - 1.0, now)
        while len(self._buckets) > self._capacity:
            self._buckets.popitem(last=False)
