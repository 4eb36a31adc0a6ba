"""Token buckets and abuse counting with a fake clock."""

from __future__ import annotations

import pytest

from pushsvc.core.ratelimit import KeyedBuckets, TokenBucket, ViolationCounter


def test_bucket_allows_burst_then_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(0.0) == pytest.approx(0.5)
    assert bucket.try_take(0.5) == 0.0  # one token back after 0.5 s
    assert bucket.try_take(0.5) == pytest.approx(0.5)
    assert bucket.try_take(100.0, cost=3.0) == 0.0  # never more than the burst
    assert bucket.try_take(100.0) == pytest.approx(0.5)


def test_bucket_cost_and_zero_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=5.0, now=0.0)
    assert bucket.try_take(0.0, cost=4.0) == 0.0
    assert bucket.try_take(0.0, cost=2.0) == pytest.approx(1.0)
    frozen = TokenBucket(rate=0.0, burst=1.0, now=0.0)
    assert frozen.try_take(0.0) == 0.0
    assert frozen.try_take(10.0) == float("inf")


def test_reconfigure_keeps_level() -> None:
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    for _ in range(10):
        bucket.try_take(0.0)
    bucket.reconfigure(rate=100.0, burst=2.0, now=0.0)
    assert bucket.try_take(0.0) > 0
    assert bucket.try_take(0.02) == 0.0


def test_violations_window() -> None:
    counter = ViolationCounter(limit=2, window=10.0)
    assert not counter.add(0.0)
    assert not counter.add(1.0)
    assert counter.add(2.0)
    later = ViolationCounter(limit=2, window=10.0)
    assert not any(later.add(t) for t in (0.0, 5.0, 11.0, 16.0))


def test_keyed_buckets_prune_full_ones() -> None:
    buckets = KeyedBuckets(rate=1.0, burst=1.0)
    assert buckets.try_take("a", 0.0) == 0.0
    assert buckets.try_take("a", 0.0) > 0
    assert buckets.try_take("b", 0.0) == 0.0
    buckets.prune(0.5)
    assert len(buckets) == 2
    buckets.prune(5.0)
    assert len(buckets) == 0
