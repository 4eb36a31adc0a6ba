"""The store contract: every guarantee of docs/delivery.md, for every store implementation.

Each test runs once per entry of ``IMPLEMENTATIONS`` and uses only the public
methods of :class:`pushsvc.store.Store` (built by ``make_store`` from a url),
never the storage underneath: a new implementation passes this file or it is
not a store. What only one implementation promises (SQLite's WAL, group
commit, query plans) is in its own test file (``tests/test_store_sqlite.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pushsvc.protocol import ids
from pushsvc.store import (
    ACKED_RETENTION,
    IdempotencyKey,
    Revocation,
    Store,
    StoreOptions,
    StoreUnavailable,
    make_store,
)
from redis_server import RedisServer, strict_slots

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


# -- the implementations under test --------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """How the contract builds one kind of store and makes it unavailable."""

    name: str  # test id
    #: store.url of a fresh, empty store for one test, given the value of ``fixture``.
    url: Callable[[Any], str]
    #: While inside, the storage refuses every operation for real (lock, outage):
    #: given the store's url, the store opened on it stays as it is.
    outage: Callable[[str], AbstractContextManager[None]]
    #: Options for make_store: fail fast when unavailable.
    options: StoreOptions = field(default_factory=lambda: StoreOptions(busy_timeout=0.05))
    #: The fixture whose value ``url`` gets: the test's tmp dir, or a server's URL.
    fixture: str = "tmp_path"
    #: Redis Cluster: every script must touch keys of one slot (strict_slots).
    strict_slots: bool = False


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'inbox.sqlite3'}"


@contextlib.contextmanager
def _sqlite_write_lock(url: str) -> Iterator[None]:
    """Another connection holds the database's write lock (as another process would)."""
    holder = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


SQLITE = Implementation("sqlite", _sqlite_url, _sqlite_write_lock)


def _redis_command(url: str, *args: str) -> str:
    """One command to the Redis of ``url`` over a plain socket (not the client under test)."""
    parts = urlsplit(url)
    server = RedisServer.__new__(RedisServer)  # only its port is used by command()
    server.port = parts.port or 6379
    return server.command(*args)


@contextlib.contextmanager
def _redis_paused(url: str) -> Iterator[None]:
    """Redis postpones every write of every client (``CLIENT PAUSE ... WRITE``; with
    ``ALL`` not even ``CLIENT UNPAUSE`` would run)."""
    _redis_command(url, "CLIENT", "PAUSE", "30000", "WRITE")
    try:
        yield
    finally:
        _redis_command(url, "CLIENT", "UNPAUSE")


#: The shared test Redis (flushed per test), a prefix of the contract's own.
REDIS = Implementation(
    "redis",
    lambda redis_url: f"{redis_url}?prefix=contract:",
    _redis_paused,
    StoreOptions(busy_timeout=0.5),  # per command: a loaded machine answers in time
    fixture="redis_url",
)


@contextlib.contextmanager
def _cluster_paused(url: str) -> Iterator[None]:
    """Every master of the cluster postpones every write (as ``_redis_paused``)."""
    hosts = urlsplit(url).netloc.split(",")
    nodes = [f"redis://{host}/0" for host in hosts]
    for node in nodes:
        _redis_command(node, "CLIENT", "PAUSE", "30000", "WRITE")
    try:
        yield
    finally:
        for node in nodes:
            _redis_command(node, "CLIENT", "UNPAUSE")


#: The shared three-master Redis Cluster: every operation split by slot.
REDIS_CLUSTER = Implementation(
    "redis-cluster",
    lambda redis_cluster_url: f"{redis_cluster_url}?prefix=contract:",
    _cluster_paused,
    StoreOptions(busy_timeout=0.5),
    fixture="redis_cluster_url",
    strict_slots=True,
)


#: Every store implementation; the next one is one more entry.
IMPLEMENTATIONS = [SQLITE, REDIS, REDIS_CLUSTER]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda impl: impl.name)
def impl(request: pytest.FixtureRequest) -> Implementation:
    implementation: Implementation = request.param
    return implementation


@pytest.fixture
def url(impl: Implementation, request: pytest.FixtureRequest) -> str:
    return impl.url(request.getfixturevalue(impl.fixture))


@pytest.fixture
async def open_store(
    impl: Implementation, url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open a store on the test's url (again after a close); all are closed at teardown."""
    opened: list[Store] = []
    if impl.strict_slots:
        strict_slots(monkeypatch)

    async def open_() -> Store:
        store = make_store(url, impl.options)
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: Callable[[], Awaitable[Store]]) -> Store:
    return await open_store()


async def reopen(store: Store, open_store: Callable[[], Awaitable[Store]]) -> Store:
    """Close ``store`` and open its data again (a restart)."""
    await store.close()
    return await open_store()


def frame_of(message_id: str) -> bytes:
    return b'{"id":"%s"}' % message_id.encode()


async def put(
    store: Store,
    *users: str,
    kind: str = "private",
    expires: float | None = None,
    message_id: str | None = None,
    idempotency: IdempotencyKey | None = None,
) -> str:
    """Accept one message for ``users`` (TTL an hour unless ``expires``); returns its id."""
    message_id = message_id or ids.new_id()
    expires_at = time.time() + HOUR if expires is None else expires
    await store.accept(message_id, kind, frame_of(message_id), users, expires_at, idempotency)
    return message_id


async def pending_ids(store: Store, user: str) -> list[str]:
    return [m.id for m in await store.pending(user, "", 1000)]


# -- order: oldest first, cursor, limit --------------------------------------------


async def test_pending_oldest_first_by_id_with_cursor_and_limit(store: Store) -> None:
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    third = await put(store, "bob", kind="notification")
    ann = await store.pending("ann", "", 10)
    assert [m.id for m in ann] == [first, second]
    assert ann[0].type == "private" and ann[0].attempts == 0
    assert ann[0].frame == frame_of(first)
    bob = await store.pending("bob", "", 10)
    assert [(m.id, m.type) for m in bob] == [(first, "private"), (third, "notification")]
    assert [m.id for m in await store.pending("ann", first, 10)] == [second]  # after a cursor
    assert await store.pending("ann", second, 10) == []
    assert [m.id for m in await store.pending("bob", "", 1)] == [first]  # limit
    assert await store.pending("nobody", "", 10) == []


async def test_order_is_by_id_not_by_arrival(store: Store) -> None:
    older, newer = ids.new_id(), ids.new_id()
    await put(store, "ann", message_id=newer)
    await put(store, "ann", message_id=older)  # accepted last, created first
    assert await pending_ids(store, "ann") == [older, newer]


async def test_pending_carries_the_ttl(store: Store) -> None:
    soon, later = time.time() + MINUTE, time.time() + DAY
    first = await put(store, "ann", "bob", expires=soon)
    second = await put(store, "ann", expires=later)
    ann = await store.pending("ann", "", 10)
    assert [(m.id, m.expires_at) for m in ann] == [(first, soon), (second, later)]
    assert [m.expires_at for m in await store.pending("bob", "", 10)] == [soon]


async def test_concurrent_accepts_are_all_stored(store: Store) -> None:
    message_ids = [ids.new_id() for _ in range(300)]
    await asyncio.gather(
        *(put(store, f"u{i % 7}", message_id=m) for i, m in enumerate(message_ids))
    )
    loaded = [i for u in range(7) for i in await pending_ids(store, f"u{u}")]
    assert sorted(loaded) == message_ids
    assert (await store.stats()).pending == len(message_ids)


# -- acks ---------------------------------------------------------------------------


async def test_ack_classifies_every_id(store: Store) -> None:
    shared = await put(store, "ann", "bob")
    bobs = await put(store, "bob")
    unknown = ids.new_id()
    result = await store.ack("ann", [shared, shared, bobs, unknown])  # duplicates count once
    assert list(result.acked) == [(shared, "private")]
    assert (result.repeated, result.foreign, result.unknown) == (0, 1, 1)
    again = await store.ack("ann", [shared])
    assert list(again.acked) == [] and (again.repeated, again.foreign, again.unknown) == (1, 0, 0)
    # Ann's ack settled nothing of Bob's: both his deliveries are still pending.
    assert await pending_ids(store, "bob") == [shared, bobs]
    assert await store.pending("ann", "", 10) == []
    both = await store.ack("bob", [shared, bobs])
    assert sorted(both.acked) == sorted([(shared, "private"), (bobs, "private")])


async def test_ack_of_many_ids(store: Store) -> None:
    mine = [await put(store, "ann") for _ in range(3)]
    noise = [ids.new_id() for _ in range(1200)]
    result = await store.ack("ann", [*noise, *mine])
    assert sorted(i for i, _kind in result.acked) == mine
    assert result.unknown == 1200


# -- attempts -----------------------------------------------------------------------


async def test_record_attempts_never_lowers(store: Store) -> None:
    message_id = await put(store, "ann", "bob")
    await store.record_attempts("ann", [(message_id, 3)])
    await store.record_attempts("ann", [(message_id, 2)])
    assert (await store.pending("ann", "", 1))[0].attempts == 3
    assert (await store.pending("bob", "", 1))[0].attempts == 0  # per recipient
    await store.record_attempts("carol", [(message_id, 9)])  # no such delivery: no effect
    await store.record_attempts("ann", [(ids.new_id(), 9)])
    assert (await store.pending("ann", "", 1))[0].attempts == 3


# -- dead letters -------------------------------------------------------------------


async def test_dead_letter_requeue_delete(store: Store) -> None:
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    before = time.time()
    dead = await store.dead_letter("ann", [first, second, ids.new_id()], "max_attempts")
    assert [(d.user, d.id, d.reason) for d in dead] == [
        ("ann", first, "max_attempts"),
        ("ann", second, "max_attempts"),
    ]
    assert dead[0].frame == frame_of(first) and dead[0].type == "private"
    assert before - 1 <= dead[0].dead_at <= time.time() + 1
    assert await store.dead_letter("ann", [first], "max_attempts") == []  # only pending moves
    assert await store.pending("ann", "", 10) == []
    assert await pending_ids(store, "bob") == [first]  # bob unaffected
    assert [d.id for d in await store.dead_letters("ann", 10)] == [first, second]
    assert (await store.ack("ann", [first])).repeated == 1  # a dead letter is not re-settled

    await store.record_attempts("ann", [(second, 5)])
    assert await store.requeue("ann", [second, ids.new_id()], time.time() + HOUR) == [second]
    requeued = await store.pending("ann", "", 10)
    assert [(m.id, m.attempts) for m in requeued] == [(second, 0)]  # attempts reset
    assert await store.requeue("ann", [second], time.time() + HOUR) == []  # pending: no-op

    assert await store.delete_dead("ann", [first, second]) == 1  # second is pending again
    assert await store.dead_letters("ann", 10) == []
    assert await store.delete_dead("ann", [first]) == 0
    # first is still bob's: the message stays, frame and all.
    assert [(m.id, m.frame) for m in await store.pending("bob", "", 10)] == [
        (first, frame_of(first))
    ]
    assert await store.frames([first]) == {first: ("private", frame_of(first))}


async def test_dead_letters_oldest_first_with_limit(store: Store) -> None:
    letters = [await put(store, "ann") for _ in range(3)]
    await store.dead_letter("ann", list(reversed(letters)), "max_attempts")
    assert [d.id for d in await store.dead_letters("ann", 10)] == letters
    assert [d.id for d in await store.dead_letters("ann", 2)] == letters[:2]
    assert await store.dead_letters("bob", 10) == []


async def test_requeue_gives_a_fresh_ttl(store: Store) -> None:
    now = time.time()
    message_id = await put(store, "ann", expires=now - 5)
    assert [d.reason for d in await store.expire(now, retention=HOUR)] == ["ttl"]
    assert await store.requeue("ann", [message_id], now + DAY) == [message_id]
    (again,) = await store.pending("ann", "", 10)
    assert again.expires_at >= now + DAY
    assert await store.expire(now + 1, retention=HOUR) == []  # not expired any more


# -- TTL: expire() --------------------------------------------------------------------


async def test_expire_dead_letters_what_passed_its_ttl(store: Store) -> None:
    now = time.time()
    old = await put(store, "ann", "bob", expires=now - 1)
    acked = await put(store, "ann", "bob", expires=now - 1)
    await store.ack("ann", [acked])
    fresh = await put(store, "ann")
    dead = await store.expire(now, retention=HOUR)
    assert sorted((d.user, d.id, d.reason) for d in dead) == sorted(
        [("ann", old, "ttl"), ("bob", old, "ttl"), ("bob", acked, "ttl")]
    )
    assert all(abs(d.dead_at - now) < MINUTE and d.frame == frame_of(d.id) for d in dead)
    assert await pending_ids(store, "ann") == [fresh]
    assert await pending_ids(store, "bob") == []
    assert [d.id for d in await store.dead_letters("bob", 10)] == [old, acked]
    assert await store.expire(now, retention=HOUR) == []  # already dead
    assert (await store.ack("ann", [acked])).repeated == 1  # the ack stays an ack


async def test_requeued_message_expires_again(store: Store) -> None:
    now = time.time()
    message_id = await put(store, "ann", expires=now - 5)
    assert [d.id for d in await store.expire(now, retention=HOUR)] == [message_id]
    assert await store.requeue("ann", [message_id], now - 1) == [message_id]  # already old
    assert await pending_ids(store, "ann") == [message_id]
    assert [d.id for d in await store.expire(now + 1, retention=HOUR)] == [message_id]


async def test_sweep_after_the_clock_went_back(store: Store) -> None:
    now = time.time()
    await store.expire(now + 100, retention=HOUR)  # a sweep while the clock was ahead
    message_id = await put(store, "ann", expires=now - 1)
    assert [d.id for d in await store.expire(now, retention=HOUR)] == [message_id]


# -- retention ------------------------------------------------------------------------


async def test_retention_drops_old_dead_letters_acks_and_messages(store: Store) -> None:
    now = time.time()
    old = await put(store, "ann", "bob", expires=now - 1)
    fresh = await put(store, "ann")
    await store.expire(now, retention=HOUR)
    await store.ack("ann", [fresh])
    # Within the retentions the dead letters stay, and the ack is known as one.
    assert await store.expire(now + min(HOUR, ACKED_RETENTION) / 2, retention=HOUR) == []
    assert [d.id for d in await store.dead_letters("bob", 10)] == [old]
    assert (await store.ack("ann", [fresh])).repeated == 1
    # Past the retention the dead letters go, past ACKED_RETENTION the acks go,
    # and with them the messages no delivery refers to.
    later = now + max(HOUR, ACKED_RETENTION) + 1
    assert await store.expire(later, retention=HOUR) == []
    assert await store.dead_letters("ann", 10) == []
    assert await store.dead_letters("bob", 10) == []
    assert await store.frames([old, fresh]) == {}
    assert (await store.ack("ann", [fresh])).unknown == 1


async def test_retention_keeps_what_another_recipient_needs(store: Store) -> None:
    now = time.time()
    shared = await put(store, "ann", "bob", expires=now + 30 * DAY)
    await store.dead_letter("ann", [shared], "max_attempts")
    await store.expire(now + 2 * DAY, retention=DAY)
    assert await store.dead_letters("ann", 10) == []
    assert [(m.id, m.frame) for m in await store.pending("bob", "", 10)] == [
        (shared, frame_of(shared))
    ]


# -- idempotency keys -------------------------------------------------------------------


def key(fingerprint: str, expires_at: float, client: str = "backend") -> IdempotencyKey:
    return IdempotencyKey(client, "k-1", fingerprint, expires_at)


async def test_idempotency_key_is_stored_with_its_message(store: Store) -> None:
    now = time.time()
    assert await store.idempotent_result("backend", "k-1", now) is None
    message_id = await put(store, "ann", "bob", idempotency=key("fp-1", now + DAY))
    result = await store.idempotent_result("backend", "k-1", now)
    assert result is not None
    assert (result.message_id, result.recipients, result.fingerprint) == (message_id, 2, "fp-1")
    assert await store.idempotent_result("other-client", "k-1", now) is None  # per client
    assert await store.idempotent_result("backend", "k-2", now) is None
    assert await store.idempotent_result("backend", "k-1", now + DAY + 1) is None  # expired


async def test_expired_idempotency_key_is_replaced(store: Store) -> None:
    now = time.time()
    await put(store, "ann", idempotency=key("fp-old", now - 1))
    assert await store.idempotent_result("backend", "k-1", now) is None  # forgotten
    second = await put(store, "ann", idempotency=key("fp-new", now + DAY))
    result = await store.idempotent_result("backend", "k-1", now)
    assert result is not None and (result.message_id, result.fingerprint) == (second, "fp-new")


# -- revocations ------------------------------------------------------------------------


async def test_revocations_a_users_until_only_grows(store: Store) -> None:
    now = time.time()
    token = Revocation("jti", "t-1", None, now, now + HOUR)
    assert await store.revoke(token) == token
    user = await store.revoke(Revocation("user", "ann", now, now, None))
    assert (user.kind, user.subject, user.until, user.expires_at) == ("user", "ann", now, None)
    earlier = await store.revoke(Revocation("user", "ann", now - HOUR, now + 1, None))
    assert earlier.until == now  # an earlier cut-off never lowers the stored one
    later = await store.revoke(Revocation("user", "ann", now + MINUTE, now + 2, None))
    assert later.until == now + MINUTE
    listed = await store.revocations(now + 3)
    assert sorted((r.kind, r.subject, r.until) for r in listed) == [
        ("jti", "t-1", None),
        ("user", "ann", now + MINUTE),
    ]


async def test_revocations_expire(store: Store) -> None:
    now = time.time()
    await store.revoke(Revocation("jti", "short", None, now, now + MINUTE))
    await store.revoke(Revocation("jti", "kept", None, now, None))
    grown = await store.revoke(Revocation("jti", "grows", None, now, now + MINUTE))
    grown = await store.revoke(Revocation("jti", "grows", None, now + 1, now + HOUR))
    assert grown.expires_at == now + HOUR  # expiry only grows too
    assert {r.subject for r in await store.revocations(now)} == {"short", "kept", "grows"}
    assert {r.subject for r in await store.revocations(now + 2 * MINUTE)} == {"kept", "grows"}
    assert {r.subject for r in await store.revocations(now + DAY)} == {"kept"}


# -- durability -------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(
    store: Store, open_store: Callable[[], Awaitable[Store]]
) -> None:
    now = time.time()
    kept = await put(store, "ann", expires=now + DAY)
    acked = await put(store, "ann")
    dead = await put(store, "bob")
    keyed = await put(store, "carol", idempotency=key("fp", now + DAY))
    await store.ack("ann", [acked])
    await store.record_attempts("ann", [(kept, 4)])
    await store.dead_letter("bob", [dead], "max_attempts")
    await store.revoke(Revocation("user", "ann", now, now, None))

    store = await reopen(store, open_store)
    assert [(m.id, m.attempts, m.expires_at) for m in await store.pending("ann", "", 10)] == [
        (kept, 4, now + DAY)
    ]
    assert (await store.ack("ann", [acked])).repeated == 1  # the ack did not come undone
    assert [(d.id, d.reason) for d in await store.dead_letters("bob", 10)] == [
        (dead, "max_attempts")
    ]
    result = await store.idempotent_result("backend", "k-1", now)
    assert result is not None and result.message_id == keyed
    assert [(r.subject, r.until) for r in await store.revocations(now)] == [("ann", now)]
    assert (await store.stats()).pending == 2  # kept, keyed


async def test_close_finishes_queued_writes(
    store: Store, open_store: Callable[[], Awaitable[Store]]
) -> None:
    message_ids = [ids.new_id() for _ in range(20)]
    writes = [asyncio.ensure_future(put(store, "ann", message_id=m)) for m in message_ids]
    await asyncio.sleep(0)  # submitted, not committed
    await store.close()
    await asyncio.gather(*writes)
    await store.close()  # a second close does nothing
    store = await open_store()
    assert await pending_ids(store, "ann") == message_ids


# -- failure atomicity ------------------------------------------------------------------


async def test_failed_operations_leave_nothing_then_writes_resume(
    store: Store, impl: Implementation, url: str
) -> None:
    """While the storage refuses: nothing of a failed call is stored, then all works again."""
    now = time.time()
    acked = await put(store, "ann")
    refused = ids.new_id()
    assert store.healthy()
    with impl.outage(url):
        with pytest.raises(StoreUnavailable):
            await put(store, "ann", "bob", message_id=refused, idempotency=key("fp", now + DAY))
        assert not store.healthy()
        with pytest.raises(StoreUnavailable):
            await store.ack("ann", [acked])
        assert await store.check() is False
        assert not store.healthy()
    assert await store.check() is True and store.healthy()
    assert await pending_ids(store, "ann") == [acked]  # the ack failed: still pending
    assert await pending_ids(store, "bob") == []
    assert await store.frames([refused]) == {}
    assert await store.idempotent_result("backend", "k-1", now) is None  # no key either
    accepted = await put(store, "ann")
    assert await pending_ids(store, "ann") == [acked, accepted]


async def test_a_store_not_open_is_unavailable(impl: Implementation, url: str) -> None:
    store = make_store(url, impl.options)
    with pytest.raises(StoreUnavailable):
        await put(store, "ann")
    with pytest.raises(StoreUnavailable):
        await store.pending("ann", "", 10)


# -- the nothing-pending hint, stats, frames ----------------------------------------------


async def test_may_have_pending_never_hides_a_pending_message(store: Store) -> None:
    """The hint may say True at any time; it says False only with nothing pending."""
    assert await store.pending("carol", "", 10) == []
    first = await put(store, "carol", "dave")
    assert store.may_have_pending("carol") and store.may_have_pending("dave")
    await store.ack("carol", [first])
    assert await store.pending("carol", "", 10) == []
    await store.ack("dave", [first])
    second = await put(store, "carol")
    assert store.may_have_pending("carol")
    await store.dead_letter("carol", [second], "max_attempts")
    assert await store.pending("carol", "", 10) == []
    assert await store.requeue("carol", [second], time.time() + HOUR) == [second]
    assert store.may_have_pending("carol")  # requeued: pending again
    assert await pending_ids(store, "carol") == [second]


async def test_stats(store: Store) -> None:
    empty = await store.stats()
    assert (empty.pending, empty.oldest_created_ms) == (0, None)
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    stats = await store.stats()
    assert stats.pending == 3  # deliveries, not messages
    assert stats.oldest_created_ms == ids.timestamp_ms(first)
    assert stats.oldest_created_ms is not None
    assert abs(stats.oldest_created_ms / 1000 - time.time()) < 60
    await store.ack("ann", [first])
    await store.dead_letter("bob", [first], "max_attempts")
    settled = await store.stats()  # neither acks nor dead letters are pending
    assert (settled.pending, settled.oldest_created_ms) == (1, ids.timestamp_ms(second))


async def test_frames(store: Store) -> None:
    private = await put(store, "ann")
    notification = await put(store, "bob", kind="notification")
    unknown = ids.new_id()
    found = await store.frames([private, notification, private, unknown])
    assert found == {
        private: ("private", frame_of(private)),
        notification: ("notification", frame_of(notification)),
    }
    assert await store.frames([]) == {}
