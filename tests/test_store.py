"""The SQLite store on a real file: inbox order, ack classification, dead letters, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pushsvc.protocol import ids
from pushsvc.store import StoreUnavailable
from pushsvc.store import sqlite as sqlite_module
from pushsvc.store.sqlite import ACKED_RETENTION, SqliteStore

HOUR = 3600.0
LATER = time.time() + HOUR  # an expiry that does not pass during a test


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(str(tmp_path / "store" / "inbox.sqlite3"), busy_timeout=0.05)
    await opened.open()
    yield opened
    await opened.close()


async def put(
    store: SqliteStore, *users: str, kind: str = "private", expires: float = LATER
) -> str:
    """Accept one message for ``users``; returns its id."""
    message_id = ids.new_id()
    await store.accept(message_id, kind, b'{"id":"%s"}' % message_id.encode(), users, expires)
    return message_id


async def test_accept_and_pending_in_id_order(store: SqliteStore) -> None:
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    third = await put(store, "bob", kind="notification")
    ann = await store.pending("ann", "", 10)
    assert [m.id for m in ann] == [first, second]
    assert ann[0].type == "private" and ann[0].attempts == 0
    assert ann[0].frame == b'{"id":"%s"}' % first.encode()
    assert [m.id for m in await store.pending("bob", "", 10)] == [first, third]
    assert [m.id for m in await store.pending("ann", first, 10)] == [second]  # after a cursor
    assert [m.id for m in await store.pending("bob", "", 1)] == [first]  # limit
    assert await store.pending("nobody", "", 10) == []
    # One message, one delivery row per recipient.
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (3,)
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (4,)


async def test_ack_classifies_every_id(store: SqliteStore) -> None:
    shared = await put(store, "ann", "bob")
    bobs = await put(store, "bob")
    unknown = ids.new_id()
    result = await store.ack("ann", [shared, shared, bobs, unknown])
    assert list(result.acked) == [(shared, "private")]
    assert (result.repeated, result.foreign, result.unknown) == (0, 1, 1)
    again = await store.ack("ann", [shared])
    assert list(again.acked) == [] and again.repeated == 1
    # Ann's ack settled nothing of Bob's: both his deliveries are still pending.
    assert [m.id for m in await store.pending("bob", "", 10)] == [shared, bobs]
    assert await store.pending("ann", "", 10) == []


async def test_ack_of_many_ids_in_chunks(store: SqliteStore) -> None:
    mine = [await put(store, "ann") for _ in range(3)]
    noise = [ids.new_id() for _ in range(1200)]  # over the IN (...) chunk size
    result = await store.ack("ann", [*noise, *mine])
    assert sorted(i for i, _kind in result.acked) == mine
    assert result.unknown == 1200


async def test_record_attempts_never_lowers(store: SqliteStore) -> None:
    message_id = await put(store, "ann")
    await store.record_attempts("ann", [(message_id, 3)])
    await store.record_attempts("ann", [(message_id, 2)])
    assert (await store.pending("ann", "", 1))[0].attempts == 3
    await store.record_attempts("bob", [(message_id, 9)])  # no such delivery: no effect
    assert (await store.pending("ann", "", 1))[0].attempts == 3


async def test_dead_letter_requeue_delete(store: SqliteStore) -> None:
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    dead = await store.dead_letter("ann", [first, second, ids.new_id()], "max_attempts")
    assert [(d.user, d.id, d.reason) for d in dead] == [
        ("ann", first, "max_attempts"),
        ("ann", second, "max_attempts"),
    ]
    assert dead[0].frame == b'{"id":"%s"}' % first.encode() and dead[0].type == "private"
    assert await store.dead_letter("ann", [first], "max_attempts") == []  # only pending moves
    assert await store.pending("ann", "", 10) == []
    assert [m.id for m in await store.pending("bob", "", 10)] == [first]  # bob unaffected
    assert [d.id for d in await store.dead_letters("ann", 10)] == [first, second]
    assert (await store.ack("ann", [first])).repeated == 1  # a dead letter is not re-settled

    await store.record_attempts("ann", [(second, 5)])
    assert await store.requeue("ann", [second, ids.new_id()], time.time() + HOUR) == [second]
    requeued = await store.pending("ann", "", 10)
    assert [(m.id, m.attempts) for m in requeued] == [(second, 0)]

    assert await store.delete_dead("ann", [first, second]) == 1  # second is pending again
    assert await store.dead_letters("ann", 10) == []
    with sqlite3.connect(store.path) as db:  # first is still bob's: the message stays
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (2,)


async def test_expire_ttl_and_retention(store: SqliteStore) -> None:
    now = time.time()
    old = await put(store, "ann", "bob", expires=now - 1)
    fresh = await put(store, "ann")
    dead = await store.expire(now, retention=HOUR)
    assert sorted((d.user, d.reason) for d in dead) == [("ann", "ttl"), ("bob", "ttl")]
    assert [m.id for m in await store.pending("ann", "", 10)] == [fresh]
    assert [d.id for d in await store.dead_letters("bob", 10)] == [old]
    assert await store.expire(now, retention=HOUR) == []  # already dead
    await store.ack("ann", [fresh])
    # Past the retention the dead letters go, past ACKED_RETENTION the acks go,
    # and with them the messages no delivery refers to.
    later = now + max(HOUR, ACKED_RETENTION) + 1
    assert await store.expire(later, retention=HOUR) == []
    assert await store.dead_letters("bob", 10) == []
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
    assert (await store.ack("ann", [fresh])).unknown == 1


async def test_stats(store: SqliteStore) -> None:
    empty = await store.stats()
    assert (empty.pending, empty.oldest_created_ms) == (0, None)
    first = await put(store, "ann", "bob")
    await put(store, "ann")
    stats = await store.stats()
    assert stats.pending == 3
    assert stats.oldest_created_ms == ids.timestamp_ms(first)
    assert abs(stats.oldest_created_ms / 1000 - time.time()) < 60


async def test_group_commit_under_concurrency(store: SqliteStore) -> None:
    before = store.transactions
    count = 2000
    message_ids = [ids.new_id() for _ in range(count)]
    await asyncio.gather(
        *(
            store.accept(m, "private", b"{}", [f"u{i % 7}"], LATER)
            for i, m in enumerate(message_ids)
        )
    )
    transactions = store.transactions - before
    assert 1 <= transactions < count / 4, transactions  # many operations per commit
    stats = await store.stats()
    assert stats.pending == count
    loaded = [m.id for u in range(7) for m in await store.pending(f"u{u}", "", count)]
    assert sorted(loaded) == sorted(message_ids)


async def test_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "reopen.sqlite3")
    first = SqliteStore(path)
    await first.open()
    message_id = await put(first, "ann")
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert [m.id for m in await second.pending("ann", "", 10)] == [message_id]
    finally:
        await second.close()


async def test_locked_database_fails_then_recovers(store: SqliteStore) -> None:
    """Another process holds the write lock: nothing is accepted, then writes resume."""
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        refused = ids.new_id()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.accept(refused, "private", b"{}", ["ann"], LATER)
        assert not store.healthy()
        assert await store.check() is False
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await store.check() is True and store.healthy()
    accepted = await put(store, "ann")
    assert [m.id for m in await store.pending("ann", "", 10)] == [accepted]  # not `refused`


async def test_unopenable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = SqliteStore(str(blocker / "sub" / "db.sqlite3"))
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.accept(ids.new_id(), "private", b"{}", ["ann"], LATER)


async def test_checkpoints_run_off_the_writer(store: SqliteStore, tmp_path: Path) -> None:
    """The checkpoint thread copies committed data into the main file (WAL stays small)."""
    written = [await put(store, "ann") for _ in range(50)]
    snapshot = tmp_path / "main-file-only.sqlite3"
    deadline = time.monotonic() + 5
    while True:
        snapshot.write_bytes(Path(store.path).read_bytes())  # without the -wal file
        with contextlib.closing(sqlite3.connect(snapshot)) as db:
            try:
                (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
            except sqlite3.OperationalError:  # no table yet: not checkpointed at all
                count = 0
        if count == len(written):
            break
        assert time.monotonic() < deadline, f"{count} of {len(written)} checkpointed"
        await asyncio.sleep(0.05)
    assert store.checkpoints >= 1


async def test_sweep_works_in_bounded_steps(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "SWEEP_CHUNK", 3)
    monkeypatch.setattr(sqlite_module, "SWEEP_STEPS", 2)
    now = time.time()
    expired = [await put(store, f"u{i}", expires=now - 1) for i in range(10)]
    first = await store.expire(now, retention=HOUR)
    assert len(first) == 6  # two steps of three
    second = await store.expire(now, retention=HOUR)
    assert sorted(d.id for d in first + second) == expired
    assert await store.expire(now, retention=HOUR) == []
    later = now + HOUR + 1
    await store.expire(later, retention=HOUR)  # drops 6 of the 10 dead letters
    left = sum([len(await store.dead_letters(f"u{i}", 10)) for i in range(10)])
    assert left == 4
    await store.expire(later, retention=HOUR)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_requeued_message_expires_again(store: SqliteStore) -> None:
    now = time.time()
    message_id = await put(store, "ann", expires=now - 5)
    assert [d.id for d in await store.expire(now, retention=HOUR)] == [message_id]
    assert await store.requeue("ann", [message_id], now - 1) == [message_id]  # already old
    assert [m.id for m in await store.pending("ann", "", 10)] == [message_id]
    assert [d.id for d in await store.expire(now + 1, retention=HOUR)] == [message_id]


async def test_sweep_after_the_clock_went_back(store: SqliteStore) -> None:
    now = time.time()
    await store.expire(now + 100, retention=HOUR)  # a sweep while the clock was ahead
    message_id = await put(store, "ann", expires=now - 1)
    assert [d.id for d in await store.expire(now, retention=HOUR)] == [message_id]


@pytest.mark.parametrize(
    "query",
    [
        sqlite_module.ACK_LOOKUP.format(marks="?,?"),
        sqlite_module.EXPIRED_MESSAGES,
        sqlite_module.PENDING_RECIPIENTS,
        sqlite_module.SETTLED_BEFORE,
        sqlite_module.DROP_ORPHAN,
    ],
)
async def test_hot_and_sweep_queries_use_indexes(store: SqliteStore, query: str) -> None:
    """No full table scan: the tables hold every message acked in the last minutes."""
    with sqlite3.connect(store.path) as db:
        plan = db.execute("EXPLAIN QUERY PLAN " + query, (1,) * query.count("?")).fetchall()
    details = " / ".join(row[3] for row in plan)
    assert "SCAN" not in details, details


async def test_stats_do_not_wait_for_the_writer(store: SqliteStore) -> None:
    """Backlog figures are read beside the writer, even while it cannot write."""
    await put(store, "ann")
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert (await store.stats()).pending == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_nothing_pending_hint(store: SqliteStore) -> None:
    assert store.may_have_pending("carol")  # unknown: must be read
    assert await store.pending("carol", "", 10) == []
    assert not store.may_have_pending("carol")  # a read found nothing
    first = await put(store, "carol")
    assert store.may_have_pending("carol")  # an accept clears the hint
    assert [m.id for m in await store.pending("carol", "", 10)] == [first]
    await store.ack("carol", [first])
    assert store.may_have_pending("carol")  # acks never set it
    assert await store.pending("carol", "", 10) == []
    assert not store.may_have_pending("carol")
    await put(store, "carol", "dave")
    assert store.may_have_pending("carol") and store.may_have_pending("dave")
    # Reads with a cursor say nothing about the whole inbox.
    await store.pending("erin", "ZZZZ", 10)
    assert store.may_have_pending("erin")
