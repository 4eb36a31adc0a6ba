"""Token buckets and abuse tracking. Pure: the caller passes the time.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per
second; a frame takes ``cost`` tokens. Nothing here reads a clock, so tests
drive it with plain numbers.
"""

from __future__ import annotations

from collections import deque


class TokenBucket:
    """A token bucket: ``try_take`` answers 0 when allowed, else seconds to wait."""

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate  # tokens added per second
        self.burst = burst  # the bucket's capacity
        self._tokens = burst  # tokens available at ``_updated``
        self._updated = now  # when ``_tokens`` was last computed

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now

    def try_take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if there are enough.

        Returns:
            0.0 when the tokens were taken; otherwise the seconds after which
            they would be there (nothing is taken).
        """
        tokens = self._tokens
        if now > self._updated:  # _refill, inline: this runs three times per frame
            tokens = min(self.burst, tokens + (now - self._updated) * self.rate)
            self._updated = now
        if tokens >= cost:
            self._tokens = tokens - cost
            return 0.0
        self._tokens = tokens
        if self.rate <= 0:
            return float("inf")
        return (cost - tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """Whether the bucket has refilled to its capacity."""
        self._refill(now)
        return self._tokens >= self.burst

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        """Change rate and capacity in place (config reload), keeping the level."""
        self._refill(now)
        self.rate = rate
        self.burst = burst
        self._tokens = min(self._tokens, burst)


class ViolationCounter:
    """Counts violations in a sliding window; ``add`` says when the limit is passed."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit  # violations allowed inside the window
        self.window = window  # seconds
        self._times: deque[float] | None = None  # recent violations (made on the first)

    def add(self, now: float) -> bool:
        """Record a violation; True when more than ``limit`` fall in the window."""
        times = self._times
        if times is None:
            times = self._times = deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times) > self.limit


class KeyedBuckets:
    """One :class:`TokenBucket` per key (user, address), dropped when full again."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate  # for new buckets
        self.burst = burst  # for new buckets
        self._buckets: dict[str, TokenBucket] = {}  # key -> its bucket

    def try_take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Like :meth:`TokenBucket.try_take` for ``key``'s bucket."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.try_take(now, cost)

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        """Apply a new rate and capacity to every bucket."""
        self.rate, self.burst = rate, burst
        for bucket in self._buckets.values():
            bucket.reconfigure(rate, burst, now)

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they equal new ones)."""
        full = [key for key, bucket in self._buckets.items() if bucket.is_full(now)]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
