"""What only the SQLite store promises, on a real file: rows, WAL, group commit, checkpoints.

The guarantees every store gives (order, acks, dead letters, TTL, retention,
idempotency keys, revocations, durability, failure atomicity) are stated once
for every implementation in ``tests/contracts/test_store_contract.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pushsvc.protocol import ids
from pushsvc.store import IdempotencyKey, StoreOptions, StoreUnavailable, make_store
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


async def test_message_stored_once_with_a_delivery_row_per_recipient(store: SqliteStore) -> None:
    await put(store, "ann", "bob")
    await put(store, "ann")
    await put(store, "bob", kind="notification")
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (3,)
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (4,)


async def test_settled_rows_and_orphan_messages_are_deleted(store: SqliteStore) -> None:
    """delete_dead and the retention sweep leave no row behind that nothing refers to."""
    now = time.time()
    shared = await put(store, "ann", "bob")
    await store.dead_letter("ann", [shared], "max_attempts")
    assert await store.delete_dead("ann", [shared]) == 1
    with sqlite3.connect(store.path) as db:  # still bob's: the message stays
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    old = await put(store, "carol", expires=now - 1)
    await store.expire(now, retention=HOUR)
    await store.ack("bob", [shared])
    assert [d.id for d in await store.dead_letters("carol", 10)] == [old]
    await store.expire(now + max(HOUR, ACKED_RETENTION) + 1, retention=HOUR)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)


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


async def test_accepts_of_one_batch_are_inserted_together_with_the_rest_in_order(
    store: SqliteStore,
) -> None:
    """Plain accepts go in one INSERT per table; keyed ones and acks keep their place."""
    first = await put(store, "ann")
    before = store.transactions
    plain = [ids.new_id() for _ in range(3)]
    keyed = ids.new_id()
    key = IdempotencyKey("app", "k-1", "f", LATER)
    # accept and ack return the writer's future: all are queued in this loop pass.
    acked, *_accepted = await asyncio.gather(
        store.ack("ann", [first]),
        store.accept(plain[0], "private", b"{}", ["ann", "bob"], LATER),
        store.accept(keyed, "private", b"{}", ["ann"], LATER, idempotency=key),
        store.accept(plain[1], "private", b"{}", ["bob"], LATER),
        store.accept(plain[2], "private", b"{}", ["ann"], LATER),
    )
    assert store.transactions - before == 1  # one loop pass: one batch, one transaction
    assert acked.acked == [(first, "private")]
    assert [m.id for m in await store.pending("ann", "", 10)] == sorted([plain[0], keyed, plain[2]])
    assert [m.id for m in await store.pending("bob", "", 10)] == sorted(plain[:2])
    assert (await store.idempotent_result("app", "k-1", time.time())) is not None


async def test_a_failing_accept_fails_its_whole_batch(store: SqliteStore) -> None:
    """Inserted together, the batch's accepts commit together or not at all."""
    taken = await put(store, "ann")
    fresh = ids.new_id()
    outcomes = await asyncio.gather(
        store.accept(fresh, "private", b"{}", ["ann"], LATER),
        store.accept(taken, "private", b"{}", ["bob"], LATER),  # the id exists: refused
        return_exceptions=True,
    )
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
    assert [m.id for m in await store.pending("ann", "", 10)] == [taken]
    assert await store.pending("bob", "", 10) == []
    await store.accept(fresh, "private", b"{}", ["ann"], LATER)  # the store goes on
    assert store.healthy()


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
        # The thread counts a checkpoint once it returned: after its data is in the file.
        if count == len(written) and store.checkpoints >= 1:
            break
        assert time.monotonic() < deadline, (
            f"{count} of {len(written)} checkpointed, {store.checkpoints} checkpoints counted"
        )
        await asyncio.sleep(0.05)


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


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
async def test_make_store_builds_sqlite_from_url_and_options(
    tmp_path: Path, synchronous: str, level: int
) -> None:
    """``store.url`` picks SQLite; the options reach it: WAL, synchronous, batch, lock wait."""
    path = tmp_path / "sub" / "db.sqlite3"
    options = StoreOptions(synchronous=synchronous, batch_max=7, busy_timeout=0.25)
    store = make_store(f"sqlite:///{path}", options)
    assert isinstance(store, SqliteStore)
    assert (store.path, store.synchronous, store.batch_max, store.busy_timeout) == (
        str(path),
        synchronous,
        7,
        0.25,
    )
    await store.open()
    try:
        pragmas = await store._submit(
            lambda db: (
                db.execute("PRAGMA journal_mode").fetchone()[0],
                db.execute("PRAGMA synchronous").fetchone()[0],
                db.execute("PRAGMA busy_timeout").fetchone()[0],
            )
        )
        assert pragmas == ("wal", level, 250)
        before = store.transactions
        await asyncio.gather(*(put(store, "ann") for _ in range(70)))
        assert store.transactions - before >= 10  # at most batch_max operations per commit
    finally:
        await store.close()


async def test_make_store_defaults_and_unknown_scheme(tmp_path: Path) -> None:
    store = make_store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert isinstance(store, SqliteStore)
    assert (store.synchronous, store.batch_max, store.busy_timeout) == ("normal", 512, 5.0)
    with pytest.raises(ValueError, match=r"store\.url: unsupported scheme"):
        make_store("postgres://db/pushsvc", StoreOptions())
