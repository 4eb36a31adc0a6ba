"""The store's contracts: the values it exchanges and one small Protocol per user.

Each caller depends on the part it uses:

- :class:`InboxStore`: the per-user inbox of at-least-once messages
  (lifecycle, accept, pending, ack, attempts, stats, frames), used by the
  delivery tracker, the node and the HTTP API;
- :class:`DeadLetterStore`: deliveries given up, the TTL sweep and retention;
- :class:`IdempotencyStore`: what a request with an ``Idempotency-Key``
  created (the key itself is stored by :meth:`InboxStore.accept`, in the
  same transaction as the message);
- :class:`RevocationStore`: revoked tokens and users;
- :class:`HistoryStore`: room history, one offset per room publication
  (used by the node to publish and resume, and by the HTTP API);
- :class:`PushSubscriptionStore`: users' Web Push subscriptions (browsers),
  kept apart from :class:`Store` so that an implementation may come without
  them (``push.enabled`` then refuses to start).

:class:`Store` is the first five: what an implementation provides
(:mod:`pushsvc.store.sqlite`) and what ``make_store`` returns. Every method
may raise :class:`StoreUnavailable`, after which nothing of that call was
persisted. ``tests/contracts/test_store_contract.py`` states these
guarantees for every implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

#: Seconds an acked delivery is remembered, so a repeated ack is classified
#: ``repeated`` (afterwards it is ``unknown``); the sweep drops older acks.
ACKED_RETENTION = 300.0


class StoreUnavailable(Exception):
    """The store could not complete an operation (disk full, locked, unreachable)."""


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """An unacked delivery of a message to one user."""

    id: str  # message id (sortable by time)
    type: str  # message type
    frame: bytes  # the frame as the client receives it
    attempts: int  # sends recorded so far
    expires_at: float  # seconds since the epoch; not to be sent afterwards (TTL)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery given up after ``max_attempts`` or the TTL."""

    user: str  # recipient
    id: str  # message id
    type: str  # message type
    frame: bytes  # the frame
    reason: str  # "max_attempts" | "ttl"
    dead_at: float  # seconds since the epoch


@dataclass(slots=True)  # not frozen: one per ack, and a frozen __init__ costs 3x
class AckResult:
    """What one ack did: ``acked`` ids settled, the rest classified and ignored."""

    acked: Sequence[tuple[str, str]]  # (id, type) of the deliveries settled now
    repeated: int = 0  # ids this user had acked already
    foreign: int = 0  # ids of messages for other users
    unknown: int = 0  # ids of no message at all


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` stored with the message its request created."""

    client: str  # the API client (the token's sub)
    key: str  # the header's value
    fingerprint: str  # hash of the request (method, path, canonical body)
    expires_at: float  # seconds since the epoch; forgotten afterwards


@dataclass(frozen=True, slots=True)
class IdempotentResult:
    """What a remembered request created: replayed on a retry with the same key."""

    message_id: str  # the message id answered the first time
    recipients: int  # how many recipients it had
    fingerprint: str  # the first request's fingerprint


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked token (``kind`` ``jti``) or a user's tokens issued before ``until``."""

    kind: str  # "jti" | "user"
    subject: str  # the jti, or the user id
    until: float | None  # kind "user": tokens with iat < until are revoked
    created_at: float  # seconds since the epoch
    expires_at: float | None  # forgotten after this time; None: kept


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Backlog figures for metrics."""

    pending: int  # unacked deliveries
    oldest_created_ms: int | None  # creation time of the oldest one


@dataclass(frozen=True, slots=True)
class HistoryRetention:
    """How much of one room's history is kept: ``size`` entries, each for ``ttl`` seconds."""

    size: int  # most entries kept per room (older ones are trimmed on append)
    ttl: float  # seconds an entry is kept after its append


@dataclass(frozen=True, slots=True)
class Appended:
    """Where a publication went in its room's history, and its frame with that position."""

    offset: int  # 1 for the first publication of an epoch, one more for each after
    epoch: str  # the room history's epoch
    frame: bytes  # what ``encode(offset, epoch)`` returned (stored and published)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored room publication."""

    offset: int  # its offset in the room
    type: str  # message type
    frame: bytes  # the frame exactly as it was published (``offset`` and ``epoch`` inside)
    created_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A read of one room's history, consistent with its position at that moment.

    ``epoch`` is ``""`` and ``top`` 0 for a room with no history (never
    published, or forgotten). ``earliest`` is the smallest offset still kept
    (``top + 1`` when nothing is): a reader who saw offset ``n`` of this epoch
    can get everything it missed exactly when ``earliest <= n + 1``.
    """

    epoch: str  # the room history's epoch ("" when none)
    top: int  # offset of the latest publication (0 when none)
    earliest: int  # smallest offset still kept; top + 1 when none is
    entries: Sequence[HistoryEntry]  # what was asked for, in the order asked for


@dataclass(frozen=True, slots=True)
class HistoryStats:
    """Room history figures for metrics (after a trim)."""

    rooms: int  # rooms with a history (epoch) kept
    entries: int  # entries kept, all rooms


#: Seconds a room's epoch and latest offset are kept after its last entry expired:
#: a client resuming meanwhile is told ``history_expired`` (it missed what was
#: trimmed), later its room starts a new epoch (``epoch_changed``).
EPOCH_RETENTION = 86400.0


@dataclass(frozen=True, slots=True)
class PushSubscription:
    """A browser's Web Push subscription (``PushSubscription.toJSON()``) for one user."""

    user: str  # whose notifications it receives
    endpoint: str  # the push service URL (unique: one browser profile and app)
    p256dh: str  # the browser's P-256 public key, base64url (RFC 8291)
    auth: str  # the 16-byte authentication secret, base64url (RFC 8291)
    created_at: float  # seconds since the epoch of the last (re)subscription


#: What :meth:`PushSubscriptionStore.add_push_subscription` did.
SubscribeResult = Literal["created", "updated", "limit"]


class InboxStore(Protocol):
    """Durable per-user inbox of at-least-once messages."""

    async def open(self) -> None:
        """Create or open the storage; raises :class:`StoreUnavailable`."""
        ...

    async def close(self) -> None:
        """Finish queued writes and release the storage (again: does nothing)."""
        ...

    def healthy(self) -> bool:
        """False after a failed write, until a write succeeds again."""
        ...

    async def check(self) -> bool:
        """Try a small write now; updates and returns :meth:`healthy`."""
        ...

    def accept(
        self,
        message_id: str,
        message_type: str,
        frame: bytes,
        recipients: Sequence[str],
        expires_at: float,
        idempotency: IdempotencyKey | None = None,
    ) -> Awaitable[None]:
        """Persist a message and a pending delivery per recipient (durable once awaited).

        An ``async def``, or a plain method returning an awaitable (a future:
        one coroutine layer less on the path of every message).

        With ``idempotency``, the key is remembered in the same transaction
        (replacing an expired entry with the same client and key); see
        :class:`IdempotencyStore`.
        """
        ...

    def may_have_pending(self, user: str) -> bool:
        """False only when the store knows ``user`` has nothing pending (no I/O).

        A hint that lets a new connection skip its first :meth:`pending` read;
        a store that cannot tell cheaply returns True.
        """
        ...

    async def pending(self, user: str, after_id: str, limit: int) -> list[PendingMessage]:
        """Up to ``limit`` pending deliveries of ``user`` with id > ``after_id``, oldest first."""
        ...

    def ack(self, user: str, ids: Sequence[str]) -> Awaitable[AckResult]:
        """Settle ``user``'s pending deliveries among ``ids`` (durable once awaited).

        An ``async def``, or a plain method returning an awaitable, as :meth:`accept`.
        """
        ...

    async def record_attempts(self, user: str, attempts: Sequence[tuple[str, int]]) -> None:
        """Remember how often each message id was sent to ``user`` (never lowered)."""
        ...

    async def stats(self) -> StoreStats:
        """Backlog figures."""
        ...

    async def frames(self, ids: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """Type and frame of the stored messages among ``ids`` (id -> (type, frame))."""
        ...


class DeadLetterStore(Protocol):
    """Deliveries given up: dead letters, the TTL sweep, retention."""

    async def dead_letter(self, user: str, ids: Sequence[str], reason: str) -> list[DeadLetter]:
        """Move pending deliveries to the dead letters; returns those that moved."""
        ...

    async def expire(self, now: float, retention: float) -> list[DeadLetter]:
        """Dead-letter deliveries past their TTL and drop old dead letters and acks.

        Dead letters settled more than ``retention`` seconds before ``now`` and
        acks older than :data:`ACKED_RETENTION` go, with the messages no
        delivery refers to any more.
        """
        ...

    async def dead_letters(self, user: str, limit: int) -> list[DeadLetter]:
        """``user``'s dead letters, oldest first."""
        ...

    async def requeue(self, user: str, ids: Sequence[str], expires_at: float) -> list[str]:
        """Make dead letters pending again (attempts reset); returns the ids requeued."""
        ...

    async def delete_dead(self, user: str, ids: Sequence[str]) -> int:
        """Delete dead letters; returns how many."""
        ...


class IdempotencyStore(Protocol):
    """Requests remembered by their ``Idempotency-Key`` (written by ``accept``)."""

    async def idempotent_result(self, client: str, key: str, now: float) -> IdempotentResult | None:
        """What ``client``'s request with ``key`` created, unless unknown or expired."""
        ...


class RevocationStore(Protocol):
    """Revoked tokens (by ``jti``) and users (tokens issued before a time)."""

    async def revoke(self, revocation: Revocation) -> Revocation:
        """Persist a revocation; returns what is stored (a user's ``until`` only grows)."""
        ...

    async def revocations(self, now: float) -> list[Revocation]:
        """Every revocation not expired at ``now``."""
        ...


class HistoryStore(Protocol):
    """Room history: every recorded publication gets its room's next offset.

    One room's offsets are 1, 2, 3... within an epoch, with no gap and no
    repeat, whichever node appends (the store assigns them). An epoch is a
    random string that changes when the history is lost or reset (a new
    store, a room forgotten after :data:`EPOCH_RETENTION`): offsets of
    different epochs are not comparable.
    """

    async def append(
        self,
        room: str,
        message_type: str,
        encode: Callable[[int, str], bytes],
        retention: HistoryRetention,
    ) -> Appended:
        """Record a publication in ``room``'s history (durable on return).

        ``encode(offset, epoch)`` makes the frame once its position is known;
        it is pure and quick and may run on another thread (SQLite: the
        writer thread, inside the group commit), so that the publication
        costs one store round trip and is encoded once. A store may call it
        with stand-ins instead and put the real offset and epoch in their
        place in the bytes (Redis: before its one script), so it should
        write them as their text, as JSON does. The entry is kept
        for ``retention.ttl`` seconds, and at most ``retention.size``
        entries of the room are kept (older ones are trimmed now).
        """
        ...

    async def history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """Up to ``limit`` unexpired entries of ``room`` and its position.

        Forward (the default): offsets greater than ``since`` (``None``: 0),
        oldest first. With ``reverse``: offsets smaller than ``since``
        (``None``: from the latest), newest first.
        """
        ...

    async def trim_history(self, now: float) -> HistoryStats:
        """Drop entries expired at ``now`` and epochs past :data:`EPOCH_RETENTION`."""
        ...


@runtime_checkable
class PushSubscriptionStore(Protocol):
    """Web Push subscriptions, several per user, an endpoint belonging to one user."""

    async def add_push_subscription(
        self, subscription: PushSubscription, limit: int
    ) -> SubscribeResult:
        """Store ``subscription`` for its user (durable on return).

        An endpoint the user has already is ``updated`` (new keys and time);
        an endpoint another user had moves to this user (the browser changed
        hands). A new endpoint of a user who has ``limit`` subscriptions
        already is refused: ``limit``, nothing stored.
        """
        ...

    async def remove_push_subscription(self, user: str, endpoint: str) -> bool:
        """Delete ``user``'s subscription with ``endpoint``; whether there was one."""
        ...

    async def push_subscriptions(self, user: str) -> list[PushSubscription]:
        """``user``'s subscriptions, oldest first."""
        ...

    async def count_push_subscriptions(self) -> int:
        """How many subscriptions are stored, for every user (metrics)."""
        ...


class Store(InboxStore, DeadLetterStore, IdempotencyStore, RevocationStore, HistoryStore, Protocol):
    """Everything a store implementation provides: the five contracts together."""
