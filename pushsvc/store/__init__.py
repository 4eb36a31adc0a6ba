"""Store: where at-least-once messages live until every recipient acked them,
and the bounded history of room publications.

A message is stored once, with one delivery row per recipient. The store
owns durability; the delivery tracker owns timing. Every method may raise
:class:`StoreUnavailable`, after which nothing of that call was persisted.

The contracts (one small Protocol per user, and :class:`Store`, all of them)
and the values they exchange are in :mod:`pushsvc.store.contracts`, re-exported
here; :func:`make_store` builds the implementation that ``store.url`` names.
"""

from __future__ import annotations

from dataclasses import dataclass

from pushsvc.config import REDIS_SCHEMES
from pushsvc.store.contracts import (
    ACKED_RETENTION,
    EPOCH_RETENTION,
    AckResult,
    Appended,
    DeadLetter,
    DeadLetterStore,
    HistoryEntry,
    HistoryPage,
    HistoryRetention,
    HistoryStats,
    HistoryStore,
    IdempotencyKey,
    IdempotencyStore,
    IdempotentResult,
    InboxStore,
    PendingMessage,
    PushSubscription,
    PushSubscriptionStore,
    Revocation,
    RevocationStore,
    Store,
    StoreStats,
    StoreUnavailable,
    SubscribeResult,
)

__all__ = [
    "ACKED_RETENTION",
    "EPOCH_RETENTION",
    "AckResult",
    "Appended",
    "DeadLetter",
    "DeadLetterStore",
    "HistoryEntry",
    "HistoryPage",
    "HistoryRetention",
    "HistoryStats",
    "HistoryStore",
    "IdempotencyKey",
    "IdempotencyStore",
    "IdempotentResult",
    "InboxStore",
    "PendingMessage",
    "PushSubscription",
    "PushSubscriptionStore",
    "Revocation",
    "RevocationStore",
    "Store",
    "StoreOptions",
    "StoreStats",
    "StoreUnavailable",
    "SubscribeResult",
    "make_store",
]


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """The ``[store]`` keys besides ``url``; an implementation ignores those it has no use for."""

    synchronous: str = "normal"  # "normal" | "full" (SQLite: fsync every commit)
    batch_max: int = 512  # most operations per transaction (group commit)
    busy_timeout: float = 5.0  # seconds: SQLite waits on a lock; Redis bounds each command


def make_store(url: str, options: StoreOptions | None = None) -> Store:
    """Build the store ``url`` (``store.url``) names; raises ValueError for an unknown scheme."""
    options = options or StoreOptions()
    if url.startswith("sqlite:///"):
        from pushsvc.store.sqlite import SqliteStore

        return SqliteStore(
            url[len("sqlite:///") :],
            synchronous=options.synchronous,
            batch_max=options.batch_max,
            busy_timeout=options.busy_timeout,
        )
    if url.startswith(REDIS_SCHEMES):
        from pushsvc.store.redis import RedisStore

        return RedisStore(url, busy_timeout=options.busy_timeout)
    raise ValueError(
        f"store.url: unsupported scheme in {url!r} "
        "(supported: sqlite:///PATH, redis://HOST:PORT/DB, rediss://..., unix://PATH, "
        "redis+sentinel://HOST:PORT,.../MASTER/DB, redis+cluster://HOST:PORT,HOST:PORT)"
    )
