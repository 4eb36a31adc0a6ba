"""SQLite store: the default, embedded, one file under ``server.data_dir``.

Room history lives in the same file (tables ``history_rooms``: each room's
epoch and latest offset, ``history``: the entries); an append runs in the
same group commit as every other write.

All SQL runs on one writer thread, never on the event loop. The
operations submitted during one pass of the event loop are handed to the
thread together (one wake-up), and the thread runs as many as are waiting
(up to ``batch_max``) in one transaction, so one commit (one fsync with
``synchronous=full``) serves many messages: throughput grows under load.
WAL checkpoints run on a second thread with its own connection, so no
commit waits for one. WAL mode with ``synchronous=normal`` loses nothing
committed when the process is killed; ``synchronous=full`` also survives
power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pushsvc.protocol import ids
from pushsvc.store.contracts import (
    ACKED_RETENTION,
    EPOCH_RETENTION,
    AckResult,
    Appended,
    DeadLetter,
    HistoryEntry,
    HistoryPage,
    HistoryRetention,
    HistoryStats,
    IdempotencyKey,
    IdempotentResult,
    PendingMessage,
    PushSubscription,
    Revocation,
    StoreStats,
    StoreUnavailable,
    SubscribeResult,
)

log = logging.getLogger("pushsvc.store")

T = TypeVar("T")
PENDING, ACKED, DEAD = 0, 1, 2
#: Seconds between WAL checkpoints, run by their own thread and connection.
CHECKPOINT_INTERVAL = 0.2
#: WAL pages after which the writer checkpoints itself (only if the checkpoint thread lags).
AUTOCHECKPOINT_PAGES = 10_000
NOTHING_PENDING_MAX = 100_000  # users remembered as having nothing pending
_CHUNK = 500  # ids per IN (...) list
#: Rows one clean-up step of :meth:`SqliteStore.expire` handles, in one transaction:
#: bounds how long the messages being accepted meanwhile wait behind it.
SWEEP_CHUNK = 2_000
#: Clean-up steps of each kind per :meth:`SqliteStore.expire` call; the rest waits
#: for the next call (the sweep runs every few seconds).
SWEEP_STEPS = 25
#: Messages whose TTL passed after the mark (expires_at, id), in that order (index
#: ``messages_expiry``, which holds the id): a sweep never rereads older ones.
EXPIRED_MESSAGES = (
    "SELECT id, expires_at FROM messages WHERE (expires_at, id) > (?, ?) "
    "AND expires_at <= ? ORDER BY expires_at, id LIMIT ?"
)
PENDING_RECIPIENTS = "SELECT user FROM deliveries WHERE message_id = ? AND state = 0"
#: Settled deliveries of one state past a time (index ``settled``: the ``state != 0``
#: term lets SQLite use that partial index; without it the query scans the table).
SETTLED_BEFORE = (
    "SELECT message_id, user FROM deliveries "
    "WHERE state != 0 AND state = ? AND settled_at < ? LIMIT ?"
)
STATS = "SELECT count(*), min(message_id) FROM deliveries WHERE state = 0"
DROP_ORPHAN = (
    "DELETE FROM messages WHERE id = ? AND NOT EXISTS "
    "(SELECT 1 FROM deliveries WHERE message_id = ?)"
)
ADD_MESSAGE = "INSERT INTO messages VALUES (?, ?, ?, ?)"
ADD_DELIVERY = "INSERT INTO deliveries (message_id, user) VALUES (?, ?)"
ACK_SETTLE = "UPDATE deliveries SET state = 1, settled_at = ? WHERE message_id = ? AND user = ?"
#: Settle one pending delivery and return its message's type (no row: nothing settled).
ACK_SETTLE_ONE = (
    "UPDATE deliveries SET state = 1, settled_at = ? WHERE message_id = ? AND user = ? "
    "AND state = 0 RETURNING (SELECT type FROM messages WHERE id = message_id)"
)
ACK_LOOKUP_ONE = (
    "SELECT m.type, d.state FROM messages m LEFT JOIN deliveries d "
    "ON d.message_id = m.id AND d.user = ? WHERE m.id = ?"
)
ACK_LOOKUP = (
    "SELECT m.id, m.type, d.state FROM messages m LEFT JOIN deliveries d "
    "ON d.message_id = m.id AND d.user = ? WHERE m.id IN ({marks})"
)

#: Rooms whose (epoch, latest offset) the writer thread keeps in memory.
HISTORY_ROOMS_CACHED = 100_000
HISTORY_ROOM = "SELECT epoch, top FROM history_rooms WHERE room = ?"
HISTORY_SAVE_ROOM = (
    "INSERT INTO history_rooms VALUES (?, ?, ?, ?) ON CONFLICT (room) DO UPDATE SET "
    "top = excluded.top, expires_at = max(expires_at, excluded.expires_at)"
)
HISTORY_EARLIEST = "SELECT min(seq) FROM history WHERE room = ? AND expires_at > ?"
HISTORY_FORWARD = (
    "SELECT seq, type, frame, created_at FROM history "
    "WHERE room = ? AND seq > ? AND expires_at > ? ORDER BY seq LIMIT ?"
)
HISTORY_REVERSE = (
    "SELECT seq, type, frame, created_at FROM history "
    "WHERE room = ? AND seq < ? AND expires_at > ? ORDER BY seq DESC LIMIT ?"
)
HISTORY_EXPIRED = (
    "DELETE FROM history WHERE (room, seq) IN "
    "(SELECT room, seq FROM history WHERE expires_at <= ? LIMIT ?)"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, frame BLOB NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    message_id TEXT NOT NULL, user TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, settled_at REAL,
    PRIMARY KEY (message_id, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_user ON deliveries (user, message_id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS dead_by_user ON deliveries (user, message_id) WHERE state = 2;
CREATE INDEX IF NOT EXISTS settled ON deliveries (state, settled_at) WHERE state != 0;
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expires_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    client TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
    message_id TEXT NOT NULL, recipients INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (client, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history_rooms (
    room TEXT PRIMARY KEY, epoch TEXT NOT NULL, top INTEGER NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    room TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, frame BLOB NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_expiry ON history (expires_at);
CREATE INDEX IF NOT EXISTS history_rooms_expiry ON history_rooms (expires_at);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS revocations (
    kind TEXT NOT NULL, subject TEXT NOT NULL, until REAL, created_at REAL NOT NULL,
    expires_at REAL, PRIMARY KEY (kind, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS push_subscriptions (
    endpoint TEXT PRIMARY KEY, user TEXT NOT NULL, p256dh TEXT NOT NULL, auth TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS push_by_user ON push_subscriptions (user, created_at);
"""


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


#: Called on the loop as timed operations settle: (operation, seconds, failed, count).
OperationTiming = Callable[[str, float, bool, int], None]
#: Operations that return the writer's future itself (no coroutine of their own) and
#: that the store times as they settle (see :meth:`SqliteStore.time_operations`).
SELF_TIMED = frozenset({"accept", "ack"})


#: A ``messages`` row: (id, type, frame, expires_at).
MessageRow = tuple[str, str, bytes, float]
#: What a plain accept inserts: its message row and its recipients.
Accepted = tuple[MessageRow, Sequence[str]]


def _bulk_only(db: sqlite3.Connection) -> None:
    raise AssertionError("an accept is inserted with its batch (_Op.accepted), not called")


class _Op:
    __slots__ = ("accepted", "fn", "future", "single", "started", "timed")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        timed: str | None = None,
        started: float = 0.0,
        single: bool = False,
        accepted: Accepted | None = None,
    ):
        self.fn = fn  # runs on the writer thread inside the batch transaction
        self.future = future  # resolved on the loop with fn's result
        self.timed = timed  # operation name reported to the timing callback, if any
        # perf_counter() at the first submission of its loop pass (timed operations):
        # the operations of a pass and a transaction are timed together.
        self.started = started
        # fn writes with one statement (and may read after it): alone in a batch, that
        # statement is its own transaction, with no BEGIN and COMMIT around it.
        self.single = single
        # A plain accept (no idempotency key): inserted with the batch's other accepts.
        self.accepted = accepted


class SqliteStore:
    """The SQLite implementation of :class:`pushsvc.store.Store` (every contract)."""

    #: Operations this store times itself (:meth:`time_operations`).
    self_timed = SELF_TIMED

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "normal",
        batch_max: int = 512,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path  # database file
        self.synchronous = synchronous  # "normal" or "full"
        self.batch_max = batch_max  # most operations per transaction
        self.busy_timeout = busy_timeout  # seconds to wait on a locked database
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()  # for the thread
        self._outbox: list[_Op] = []  # submitted in this loop pass, handed over at its end
        self._writer: threading.Thread | None = None  # the writer
        self._loop: asyncio.AbstractEventLoop | None = None  # where futures resolve
        self._healthy = True  # result of the last transaction
        self._transactions = 0  # transactions committed (each serves a batch of operations)
        self._operations = 0  # operations committed in those transactions
        self._checkpoints = 0  # WAL checkpoints run by the checkpoint thread
        # Users known to have nothing pending, changed only on the writer thread, in
        # order with the writes (see may_have_pending).
        self._nothing_pending: set[str] = set()
        self._stop_checkpoints = threading.Event()  # set when the writer stops
        self._expiry_mark: tuple[float, str] = (0.0, "")  # (expires_at, id) handled so far
        # Room -> (epoch, latest offset) as committed or about to be in this transaction;
        # writer thread only, cleared when a transaction fails.
        self._history_rooms: dict[str, tuple[str, int]] = {}
        self._timing: OperationTiming | None = None  # see time_operations
        self._outbox_started = 0.0  # perf_counter() at this loop pass's first submission
        # The read-only connection of stats() and history_stats(), opened on first use
        # and kept (opening one parses the whole schema: ~450,000 instructions a sweep).
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()  # one executor thread on it at a time

    def time_operations(self, record: OperationTiming) -> None:
        """Report the operations of :data:`SELF_TIMED` to ``record`` as they settle.

        ``accept`` and ``ack`` return the writer's future rather than a
        coroutine, so a wrapper cannot time them by awaiting; the metrics'
        instrumented store passes its recorder here instead: ``record(name,
        seconds, failed, count)``, once per kind of the operations that were
        submitted in one loop pass and settled by one transaction, the
        seconds from the pass's first submission to their results on the loop.
        """
        self._timing = record

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Create the folder, the file and the schema."""
        self._loop = asyncio.get_running_loop()
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {Path(self.path).parent}: {exc}") from exc
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._run, args=(ready,), name="pushsvc-store", daemon=True
        )
        self._writer.start()
        await ready

    async def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if self._writer is None:
            return
        self._hand_over()
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._writer = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def healthy(self) -> bool:
        """Whether the last transaction committed."""
        return self._healthy

    @property
    def transactions(self) -> int:
        """Transactions committed so far (read-only; fewer than operations under load)."""
        return self._transactions

    @property
    def checkpoints(self) -> int:
        """WAL checkpoints run off the writer thread so far (read-only)."""
        return self._checkpoints

    @property
    def operations(self) -> int:
        """Operations committed so far (read-only; ``operations / transactions`` is the batch)."""
        return self._operations

    async def check(self) -> bool:
        """Commit a tiny write to see whether the database accepts writes."""

        def probe(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (str(time.time()),))

        try:
            await self._submit(probe)
        except StoreUnavailable:
            return False
        return True

    # -- the writer thread --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.synchronous == 'full' else 'NORMAL'}")
        # A checkpoint inside a commit stalls every message of that batch (an fsync with
        # synchronous=normal): the checkpoint thread runs them; this is only a safety net.
        db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        db.executescript(SCHEMA)
        return db

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file every CHECKPOINT_INTERVAL, off the writer.

        PASSIVE checkpoints never block the writer; once one has copied the whole WAL,
        the next transaction starts the WAL over, so it stays small.
        """
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.error(
                "checkpoint thread cannot open %s (the writer checkpoints): %s", self.path, exc
            )
            return
        done = -1
        while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL):
            if self._transactions == done:
                continue
            committed = self._transactions
            try:
                busy, wal_frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                log.debug("checkpoint failed (retried): %s", exc)
                continue
            self._checkpoints += 1
            # Only a complete copy settles these transactions; else the next round retries.
            if not busy and copied == wal_frames:
                done = committed
        db.close()

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            error = StoreUnavailable(f"cannot open {self.path}: {exc}")
            loop.call_soon_threadsafe(_settle_one, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle_one, ready, None, None)
        checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="pushsvc-checkpoint", daemon=True
        )
        checkpointer.start()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = first
            while len(batch) < self.batch_max:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            for start in range(0, len(batch), self.batch_max):
                results = self._transaction(db, batch[start : start + self.batch_max])
                loop.call_soon_threadsafe(self._settle_all, results)
        self._stop_checkpoints.set()
        checkpointer.join()
        db.close()  # the last connection to close checkpoints what is left

    def _transaction(
        self, db: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[_Op, Any, BaseException | None]]:
        # One single-statement operation (an ack of one id, the common batch at low
        # rates): SQLite's autocommit makes that statement the transaction, atomic and
        # as durable as a COMMIT; two statements (and their GIL hand-offs) less.
        alone = len(batch) == 1 and batch[0].single
        try:
            if not alone:
                db.execute("BEGIN IMMEDIATE")
            # Accepts insert rows under new ids that no operation queued before them
            # can name, so inserting them all first, with one statement per table,
            # commits what running them in order would.
            accepted = [op.accepted for op in batch if op.accepted is not None]
            if accepted:
                self._insert_accepted(db, accepted)
            values = [None if op.accepted is not None else op.fn(db) for op in batch]
            if not alone:
                db.execute("COMMIT")
            self._transactions += 1
            self._operations += len(batch)
        except Exception as exc:  # sqlite3.Error, or a bug in an operation: fail the batch
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._history_rooms.clear()  # may hold offsets that were rolled back
            if self._healthy:
                log.error("store write failed, nothing of this batch was accepted: %s", exc)
            self._healthy = False
            error = StoreUnavailable(str(exc))
            return [(op, None, error) for op in batch]
        if not self._healthy:
            log.warning("store writes succeed again")
        self._healthy = True
        return [(op, value, None) for op, value in zip(batch, values, strict=True)]

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        timed: str | None = None,
        single: bool = False,
        accepted: Accepted | None = None,
    ) -> asyncio.Future[T]:
        """Queue ``fn`` for the writer; the future resolves on the loop with its result.

        A plain function returning the future (awaited by the caller), not a
        coroutine: one coroutine layer less between a frame and its commit.
        ``timed`` names an operation of :data:`SELF_TIMED` for the timing callback;
        ``single``: ``fn`` writes with one statement (see ``_Op.single``);
        ``accepted``: a plain accept, inserted with the batch's others (``fn`` is not called).
        """
        loop = self._loop
        if self._writer is None or loop is None:
            if timed is not None and self._timing is not None:
                self._timing(timed, 0.0, True, 1)
            raise StoreUnavailable("store is not open")
        future: asyncio.Future[T] = loop.create_future()
        if not self._outbox:  # the first operation of this loop pass
            loop.call_soon(self._hand_over)
            self._outbox_started = time.perf_counter()
        if timed is not None and self._timing is not None:
            self._outbox.append(_Op(fn, future, timed, self._outbox_started, single, accepted))
        else:
            self._outbox.append(_Op(fn, future, single=single, accepted=accepted))
        return future

    def _settle_all(self, results: list[tuple[_Op, Any, BaseException | None]]) -> None:
        """On the loop: resolve a transaction's futures, and time the timed operations."""
        timing = self._timing
        now = time.perf_counter() if timing is not None else 0.0
        # (operation, its pass's start, failed) -> how many: one observation per group.
        counts: dict[tuple[str, float, bool], int] = {}
        for op, value, error in results:
            _settle_one(op.future, value, error)
            if op.timed is not None and timing is not None:
                key = (op.timed, op.started, error is not None)
                counts[key] = counts.get(key, 0) + 1
        if timing is not None:
            for (name, started, failed), count in counts.items():
                timing(name, now - started, failed, count)

    def _hand_over(self) -> None:
        """Give the writer everything submitted in this loop pass: one wake-up, one batch."""
        if self._outbox:
            ops, self._outbox = self._outbox, []
            self._queue.put(ops)

    # -- operations -------------------------------------------------------------

    def accept(
        self,
        message_id: str,
        message_type: str,
        frame: bytes,
        recipients: Sequence[str],
        expires_at: float,
        idempotency: IdempotencyKey | None = None,
    ) -> asyncio.Future[None]:
        """Persist a message and one pending delivery per recipient (and the idempotency key).

        Returns the writer's future (no coroutine layer; timed as it settles).
        """

        row = (message_id, message_type, frame, expires_at)
        if idempotency is None:  # the common case: inserted with the batch's other accepts
            return self._submit(_bulk_only, "accept", accepted=(row, recipients))

        def write(db: sqlite3.Connection) -> None:
            self._insert_accepted(db, [(row, recipients)])
            _remember_key(db, idempotency, message_id, len(recipients))

        return self._submit(write, "accept")

    def _insert_accepted(self, db: sqlite3.Connection, accepted: Sequence[Accepted]) -> None:
        """Insert messages and their pending deliveries: one statement per table and batch."""
        pending = self._nothing_pending
        deliveries: list[tuple[str, str]] = []
        for row, recipients in accepted:
            pending.difference_update(recipients)
            message_id = row[0]
            deliveries.extend((message_id, user) for user in recipients)
        if len(accepted) == 1:  # a quiet moment: no executemany cursor
            db.execute(ADD_MESSAGE, accepted[0][0])
        else:
            db.executemany(ADD_MESSAGE, [row for row, _recipients in accepted])
        if len(deliveries) == 1:
            db.execute(ADD_DELIVERY, deliveries[0])
        else:
            db.executemany(ADD_DELIVERY, deliveries)

    async def pending(self, user: str, after_id: str, limit: int) -> list[PendingMessage]:
        """The oldest pending deliveries of ``user`` after ``after_id``."""

        def read(db: sqlite3.Connection) -> list[PendingMessage]:
            rows = db.execute(
                "SELECT m.id, m.type, m.frame, d.attempts, m.expires_at FROM deliveries d "
                "JOIN messages m ON m.id = d.message_id "
                "WHERE d.user = ? AND d.state = 0 AND d.message_id > ? "
                "ORDER BY d.message_id LIMIT ?",
                (user, after_id, limit),
            ).fetchall()
            if not rows and not after_id:
                if len(self._nothing_pending) >= NOTHING_PENDING_MAX:
                    self._nothing_pending.clear()
                self._nothing_pending.add(user)
            return [PendingMessage(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self._submit(read)

    def may_have_pending(self, user: str) -> bool:
        """False only when ``user`` certainly has nothing pending (no I/O).

        The hint is set by a :meth:`pending` read that found nothing and
        cleared by every write that makes a delivery pending, both on the
        writer thread in order, so a message committed before a connection
        registered is never hidden by it; one committed later reaches the
        connection through the broker.
        """
        return user not in self._nothing_pending

    def ack(self, user: str, message_ids: Sequence[str]) -> asyncio.Future[AckResult]:
        """Settle ``user``'s pending deliveries among ``message_ids``.

        Returns the writer's future (no coroutine layer; timed as it settles).
        """
        wanted = list(dict.fromkeys(message_ids))

        if len(wanted) == 1:  # the common case (one ack per message): no IN list to build
            ack_one = functools.partial(self._ack_one, user, wanted[0])
            return self._submit(ack_one, "ack", single=True)

        def write(db: sqlite3.Connection) -> AckResult:
            found: dict[str, tuple[str, int | None]] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                query = ACK_LOOKUP.format(marks=marks)  # only "?" placeholders go in
                for message_id, kind, state in db.execute(query, (user, *chunk)):
                    found[message_id] = (kind, state)
            acked = [(i, kind) for i, (kind, state) in found.items() if state == PENDING]
            now = time.time()
            db.executemany(ACK_SETTLE, [(now, message_id, user) for message_id, _kind in acked])
            states = [state for _kind, state in found.values()]
            return AckResult(
                acked=acked,
                repeated=sum(1 for s in states if s in (ACKED, DEAD)),
                foreign=sum(1 for s in states if s is None),
                unknown=len(wanted) - len(found),
            )

        return self._submit(write, "ack")

    @staticmethod
    def _ack_one(user: str, message_id: str, db: sqlite3.Connection) -> AckResult:
        """:meth:`ack` of one id: one statement when it settles a pending delivery.

        The update returns the message's type; only an id that settled
        nothing is looked up, to say why (repeated, foreign or unknown).
        """
        settled = db.execute(ACK_SETTLE_ONE, (time.time(), message_id, user)).fetchall()
        if settled:
            return AckResult(acked=[(message_id, settled[0][0])])
        row = db.execute(ACK_LOOKUP_ONE, (user, message_id)).fetchone()
        if row is None:
            return AckResult(acked=[], repeated=0, foreign=0, unknown=1)
        if row[1] is None:
            return AckResult(acked=[], repeated=0, foreign=1, unknown=0)
        return AckResult(acked=[], repeated=1, foreign=0, unknown=0)

    async def record_attempts(self, user: str, attempts: Sequence[tuple[str, int]]) -> None:
        """Store send counts (never lowering them)."""

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE deliveries SET attempts = max(attempts, ?) "
                "WHERE message_id = ? AND user = ? AND state = 0",
                [(count, message_id, user) for message_id, count in attempts],
            )

        await self._submit(write)

    @staticmethod
    def _move_to_dead(
        db: sqlite3.Connection, pairs: Sequence[tuple[str, str]], reason: str, now: float
    ) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        for user, message_id in pairs:
            changed = db.execute(
                "UPDATE deliveries SET state = 2, reason = ?, settled_at = ? "
                "WHERE message_id = ? AND user = ? AND state = 0",
                (reason, now, message_id, user),
            ).rowcount
            if changed:
                row = db.execute(
                    "SELECT type, frame FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                dead.append(DeadLetter(user, message_id, row[0], row[1], reason, now))
        return dead

    async def dead_letter(
        self, user: str, message_ids: Sequence[str], reason: str
    ) -> list[DeadLetter]:
        """Move pending deliveries to the dead letters."""
        pairs = [(user, message_id) for message_id in message_ids]
        return await self._submit(lambda db: self._move_to_dead(db, pairs, reason, time.time()))

    async def expire(self, now: float, retention: float) -> list[DeadLetter]:
        """Dead-letter what passed its TTL; drop old acks, old dead letters, orphan messages.

        The work is done in steps of at most SWEEP_CHUNK rows, each its own
        transaction, so a large backlog never stalls the writer for long; at
        most SWEEP_STEPS steps of each kind run per call.
        """
        dead: list[DeadLetter] = []
        if now < self._expiry_mark[0]:  # the wall clock went back: look at every TTL again
            self._expiry_mark = (0.0, "")
        for _ in range(SWEEP_STEPS):
            step = functools.partial(self._expire_step, now=now, mark=self._expiry_mark)
            letters, mark, more = await self._submit(step)
            self._expiry_mark = mark  # only once committed
            dead.extend(letters)
            if not more:
                break
        for state, before in ((ACKED, now - ACKED_RETENTION), (DEAD, now - retention)):
            for _ in range(SWEEP_STEPS):
                drop = functools.partial(self._drop_step, state=state, before=before)
                if await self._submit(drop) < SWEEP_CHUNK:
                    break
        return dead

    def _expire_step(
        self, db: sqlite3.Connection, now: float, mark: tuple[float, str]
    ) -> tuple[list[DeadLetter], tuple[float, str], bool]:
        """Dead-letter the pending deliveries of messages that expired after ``mark``."""
        rows = db.execute(EXPIRED_MESSAGES, (*mark, now, SWEEP_CHUNK)).fetchall()
        pairs = [
            (user, message_id)
            for message_id, _expires in rows
            for (user,) in db.execute(PENDING_RECIPIENTS, (message_id,))
        ]
        dead = self._move_to_dead(db, pairs, "ttl", now)
        if len(rows) < SWEEP_CHUNK:
            return dead, (now, ""), False
        last_id, last_expiry = rows[-1]
        return dead, (float(last_expiry), str(last_id)), True

    @staticmethod
    def _drop_step(db: sqlite3.Connection, state: int, before: float) -> int:
        """Delete up to SWEEP_CHUNK deliveries settled (``state``) before ``before``."""
        rows = db.execute(SETTLED_BEFORE, (state, before, SWEEP_CHUNK)).fetchall()
        db.executemany("DELETE FROM deliveries WHERE message_id = ? AND user = ?", rows)
        db.executemany(DROP_ORPHAN, [(m, m) for m in {message_id for message_id, _ in rows}])
        return len(rows)

    async def dead_letters(self, user: str, limit: int) -> list[DeadLetter]:
        """``user``'s dead letters, oldest first."""

        def read(db: sqlite3.Connection) -> list[DeadLetter]:
            rows = db.execute(
                "SELECT d.message_id, m.type, m.frame, d.reason, d.settled_at FROM deliveries d "
                "JOIN messages m ON m.id = d.message_id WHERE d.user = ? AND d.state = 2 "
                "ORDER BY d.message_id LIMIT ?",
                (user, limit),
            ).fetchall()
            return [DeadLetter(user, r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self._submit(read)

    async def requeue(self, user: str, message_ids: Sequence[str], expires_at: float) -> list[str]:
        """Make dead letters pending again with fresh attempts and TTL."""

        def write(db: sqlite3.Connection) -> list[str]:
            self._nothing_pending.discard(user)
            done = []
            for message_id in message_ids:
                changed = db.execute(
                    "UPDATE deliveries SET state = 0, attempts = 0, reason = NULL, "
                    "settled_at = NULL WHERE message_id = ? AND user = ? AND state = 2",
                    (message_id, user),
                ).rowcount
                if changed:
                    db.execute(
                        "UPDATE messages SET expires_at = max(expires_at, ?) WHERE id = ?",
                        (expires_at, message_id),
                    )
                    done.append(message_id)
            return done

        requeued = await self._submit(write)
        if requeued:  # the next sweep must see their new expiry, however close
            self._expiry_mark = min(self._expiry_mark, (expires_at, ""))
        return requeued

    async def delete_dead(self, user: str, message_ids: Sequence[str]) -> int:
        """Delete dead letters of ``user``."""

        def write(db: sqlite3.Connection) -> int:
            count = 0
            for message_id in message_ids:
                count += db.execute(
                    "DELETE FROM deliveries WHERE message_id = ? AND user = ? AND state = 2",
                    (message_id, user),
                ).rowcount
                db.execute(
                    "DELETE FROM messages WHERE id = ? AND NOT EXISTS "
                    "(SELECT 1 FROM deliveries WHERE message_id = ?)",
                    (message_id, message_id),
                )
            return count

        return await self._submit(write)

    async def stats(self) -> StoreStats:
        """Pending count and the oldest pending message's creation time.

        Read on a read-only connection of its own, off the writer thread: the
        count walks every pending delivery (~20 ms per 30,000), which would
        hold up every message accepted meanwhile.
        """
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        return await asyncio.get_running_loop().run_in_executor(None, self._read_stats)

    def _read(self, query: str) -> tuple[Any, ...]:
        """The one row of ``query`` on the read-only connection (executor thread).

        The connection is opened once and kept; after an error it is closed
        and the next read opens a new one. ``fetchall`` runs the statement to
        its end, so no read transaction stays open to hold back checkpoints.
        """
        with self._reader_lock:
            try:
                if self._reader is None:
                    uri = f"{Path(self.path).resolve().as_uri()}?mode=ro"
                    self._reader = sqlite3.connect(
                        uri, uri=True, timeout=self.busy_timeout, check_same_thread=False
                    )
                row: tuple[Any, ...] = self._reader.execute(query).fetchall()[0]
                return row
            except sqlite3.Error:
                if self._reader is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._reader.close()
                    self._reader = None
                raise

    def _read_stats(self) -> StoreStats:
        try:
            count, oldest = self._read(STATS)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"reading backlog figures: {exc}") from exc
        return StoreStats(count, ids.timestamp_ms(oldest) if oldest else None)

    # -- room history -------------------------------------------------------------

    async def append(
        self,
        room: str,
        message_type: str,
        encode: Callable[[int, str], bytes],
        retention: HistoryRetention,
    ) -> Appended:
        """Give the publication the room's next offset, encode and store it (group commit)."""

        def write(db: sqlite3.Connection) -> Appended:
            rooms = self._history_rooms
            state = rooms.get(room)
            if state is None:
                row = db.execute(HISTORY_ROOM, (room,)).fetchone()
                if row is None:  # a new epoch: nothing of an older one may stay
                    db.execute("DELETE FROM history WHERE room = ?", (room,))
                state = (row[0], row[1]) if row is not None else (ids.epoch(), 0)
            epoch, offset = state[0], state[1] + 1
            frame = encode(offset, epoch)
            now = time.time()
            expires_at = now + retention.ttl
            db.execute(HISTORY_SAVE_ROOM, (room, epoch, offset, expires_at + EPOCH_RETENTION))
            db.execute(
                "INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)",
                (room, offset, message_type, frame, now, expires_at),
            )
            if offset > retention.size:
                db.execute(
                    "DELETE FROM history WHERE room = ? AND seq <= ?",
                    (room, offset - retention.size),
                )
            if len(rooms) >= HISTORY_ROOMS_CACHED:
                rooms.clear()
            rooms[room] = (epoch, offset)
            return Appended(offset, epoch, frame)

        return await self._submit(write)

    async def history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """Entries of ``room`` after (or, reversed, before) ``since``, and its position."""

        def read(db: sqlite3.Connection) -> HistoryPage:
            row = db.execute(HISTORY_ROOM, (room,)).fetchone()
            if row is None:
                return HistoryPage("", 0, 1, [])
            epoch, top = row
            now = time.time()
            (earliest,) = db.execute(HISTORY_EARLIEST, (room, now)).fetchone()
            if reverse:
                start = top + 1 if since is None else since
                rows = db.execute(HISTORY_REVERSE, (room, start, now, limit)).fetchall()
            else:
                start = since or 0
                rows = db.execute(HISTORY_FORWARD, (room, start, now, limit)).fetchall()
            entries = [HistoryEntry(r[0], r[1], r[2], r[3]) for r in rows]
            return HistoryPage(epoch, top, top + 1 if earliest is None else earliest, entries)

        return await self._submit(read)

    async def trim_history(self, now: float) -> HistoryStats:
        """Drop expired entries (in steps of SWEEP_CHUNK) and forgotten epochs; count the rest."""
        for _ in range(SWEEP_STEPS):
            step = functools.partial(self._trim_step, now=now)
            if await self._submit(step) < SWEEP_CHUNK:
                break

        def forget_rooms(db: sqlite3.Connection) -> None:
            gone = db.execute(
                "DELETE FROM history_rooms WHERE expires_at <= ? RETURNING room", (now,)
            ).fetchall()
            for (room,) in gone:
                db.execute("DELETE FROM history WHERE room = ?", (room,))
                self._history_rooms.pop(room, None)

        await self._submit(forget_rooms)
        return await asyncio.get_running_loop().run_in_executor(None, self._read_history_stats)

    @staticmethod
    def _trim_step(db: sqlite3.Connection, now: float) -> int:
        return db.execute(HISTORY_EXPIRED, (now, SWEEP_CHUNK)).rowcount

    def _read_history_stats(self) -> HistoryStats:
        try:
            (rooms,) = self._read("SELECT count(*) FROM history_rooms")
            (entries,) = self._read("SELECT count(*) FROM history")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"reading history figures: {exc}") from exc
        return HistoryStats(rooms, entries)

    # -- server API: frames, idempotency keys, revocations -------------------------

    async def frames(self, message_ids: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """Type and frame of the stored messages among ``message_ids``."""
        wanted = list(dict.fromkeys(message_ids))

        def read(db: sqlite3.Connection) -> dict[str, tuple[str, bytes]]:
            found: dict[str, tuple[str, bytes]] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))  # only "?" placeholders go in
                query = f"SELECT id, type, frame FROM messages WHERE id IN ({marks})"  # noqa: S608
                for message_id, kind, frame in db.execute(query, tuple(chunk)):
                    found[message_id] = (kind, frame)
            return found

        return await self._submit(read)

    async def idempotent_result(self, client: str, key: str, now: float) -> IdempotentResult | None:
        """What ``client``'s request with ``key`` created, unless unknown or expired."""

        def read(db: sqlite3.Connection) -> IdempotentResult | None:
            row = db.execute(
                "SELECT message_id, recipients, fingerprint FROM idempotency "
                "WHERE client = ? AND key = ? AND expires_at > ?",
                (client, key, now),
            ).fetchone()
            return None if row is None else IdempotentResult(row[0], row[1], row[2])

        return await self._submit(read)

    async def revoke(self, revocation: Revocation) -> Revocation:
        """Persist a revocation; a user's ``until`` and any ``expires_at`` only grow."""

        def write(db: sqlite3.Connection) -> Revocation:
            db.execute(
                "DELETE FROM revocations WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (revocation.created_at,),
            )
            db.execute(
                "INSERT INTO revocations VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, subject) DO UPDATE SET "
                "until = max(coalesce(until, excluded.until), coalesce(excluded.until, until)), "
                "expires_at = CASE WHEN expires_at IS NULL OR excluded.expires_at IS NULL "
                "THEN NULL ELSE max(expires_at, excluded.expires_at) END",
                (
                    revocation.kind,
                    revocation.subject,
                    revocation.until,
                    revocation.created_at,
                    revocation.expires_at,
                ),
            )
            row = db.execute(
                "SELECT kind, subject, until, created_at, expires_at FROM revocations "
                "WHERE kind = ? AND subject = ?",
                (revocation.kind, revocation.subject),
            ).fetchone()
            return Revocation(*row)

        return await self._submit(write)

    async def revocations(self, now: float) -> list[Revocation]:
        """Every revocation not expired at ``now``, oldest first."""

        def read(db: sqlite3.Connection) -> list[Revocation]:
            rows = db.execute(
                "SELECT kind, subject, until, created_at, expires_at FROM revocations "
                "WHERE expires_at IS NULL OR expires_at > ? ORDER BY created_at, kind, subject",
                (now,),
            ).fetchall()
            return [Revocation(*row) for row in rows]

        return await self._submit(read)

    # -- Web Push subscriptions ----------------------------------------------------

    async def add_push_subscription(
        self, subscription: PushSubscription, limit: int
    ) -> SubscribeResult:
        """Store a subscription (replacing the endpoint's), unless the user has ``limit``."""
        sub = subscription

        def write(db: sqlite3.Connection) -> SubscribeResult:
            owner = db.execute(
                "SELECT user FROM push_subscriptions WHERE endpoint = ?", (sub.endpoint,)
            ).fetchone()
            if owner is None or owner[0] != sub.user:
                (count,) = db.execute(
                    "SELECT count(*) FROM push_subscriptions WHERE user = ?", (sub.user,)
                ).fetchone()
                if count >= limit:
                    return "limit"
            db.execute(
                "INSERT OR REPLACE INTO push_subscriptions VALUES (?, ?, ?, ?, ?)",
                (sub.endpoint, sub.user, sub.p256dh, sub.auth, sub.created_at),
            )
            return "updated" if owner is not None and owner[0] == sub.user else "created"

        return await self._submit(write)

    async def remove_push_subscription(self, user: str, endpoint: str) -> bool:
        """Delete ``user``'s subscription with ``endpoint``."""

        def write(db: sqlite3.Connection) -> bool:
            return bool(
                db.execute(
                    "DELETE FROM push_subscriptions WHERE endpoint = ? AND user = ?",
                    (endpoint, user),
                ).rowcount
            )

        return await self._submit(write)

    async def push_subscriptions(self, user: str) -> list[PushSubscription]:
        """``user``'s subscriptions, oldest first."""

        def read(db: sqlite3.Connection) -> list[PushSubscription]:
            rows = db.execute(
                "SELECT endpoint, p256dh, auth, created_at FROM push_subscriptions "
                "WHERE user = ? ORDER BY created_at, endpoint",
                (user,),
            ).fetchall()
            return [PushSubscription(user, r[0], r[1], r[2], r[3]) for r in rows]

        return await self._submit(read)

    async def count_push_subscriptions(self) -> int:
        """Every user's subscriptions together."""

        def read(db: sqlite3.Connection) -> int:
            (count,) = db.execute("SELECT count(*) FROM push_subscriptions").fetchone()
            return int(count)

        return await self._submit(read)


def _remember_key(
    db: sqlite3.Connection, idempotency: IdempotencyKey, message_id: str, recipients: int
) -> None:
    """Store an idempotency key with its message (expired keys are dropped on the way)."""
    now = time.time()
    db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
    db.execute(
        "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
        (
            idempotency.client,
            idempotency.key,
            idempotency.fingerprint,
            message_id,
            recipients,
            idempotency.expires_at,
        ),
    )


def _settle_one(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
