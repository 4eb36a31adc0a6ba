"""Delivery and acks: at-least-once messages from the store to the sockets.

:class:`AckTracker` and :class:`RetryPolicy` are pure (the caller passes the
time and the random source). :class:`Delivery` drives them: it persists
accepted messages, sends them through a per-connection window of
``delivery.window`` unacked messages, resends on timeout with exponential
backoff and jitter, settles acks for every connection of the user, and
dead-letters after ``max_attempts`` or the TTL. Pending state lives in the
store; a connection holds only its in-flight window in memory.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from pushsvc.auth.principal import Principal
from pushsvc.broker import BrokerUnavailable, Envelope, EnvelopeKind, user_channel
from pushsvc.config import DeliveryConfig
from pushsvc.ops.metrics import Metrics
from pushsvc.protocol import frames
from pushsvc.protocol.codes import RETRY_AFTER_UNAVAILABLE, ErrorCode
from pushsvc.protocol.fields import CommandError
from pushsvc.store import DeadLetter, IdempotencyKey, Store, StoreUnavailable

log = logging.getLogger("pushsvc.delivery")

#: Shortest gap between two resend passes (seconds): a resend goes out at most this
#: long after it is due, and a busy node runs at most one pass per gap.
TICK_MIN_GAP = 0.05
#: Resend timers are kept in slots, this many per second (one per gap): a pass takes
#: the slots whose start passed, and an ack takes its message out of its slot.
SLOTS_PER_SECOND = round(1 / TICK_MIN_GAP)


def _slot_of(due: float) -> int:
    """The slot a resend due at ``due`` (monotonic seconds) waits in: the first after it."""
    return int(due * SLOTS_PER_SECOND) + 1


#: ``reason`` of a dead letter: the attempts ran out, or the TTL did.
DEAD_MAX_ATTEMPTS = "max_attempts"
DEAD_TTL = "ttl"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to resend: ``ack_timeout`` doubled per attempt, capped, with ±20 % jitter."""

    ack_timeout: float  # wait after the first send
    max_attempts: int  # sends before dead-lettering
    backoff_max: float  # longest wait
    jitter: float = 0.2  # fraction of the wait randomised either way

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait for an ack after the ``attempts``-th send."""
        base = min(self.backoff_max, self.ack_timeout * 2.0 ** max(0, attempts - 1))
        return float(min(self.backoff_max, base * (1 - self.jitter + 2 * self.jitter * rand())))


@dataclass(slots=True)
class InFlight:
    """A message sent on a connection and not yet acked."""

    type: str  # message type
    frame: bytes  # the frame, kept for resends
    attempts: int  # sends to this user so far (this one included)
    sent_at: float  # monotonic time of the last send
    first_sent_at: float  # monotonic time of the first send on this connection
    due: float  # monotonic time of the next resend


class AckTracker:
    """One connection's in-flight window (pure: no I/O, no clock)."""

    __slots__ = ("backlog", "cursor", "dirty", "inflight", "refilling", "rewind", "window")

    def __init__(self, window: int) -> None:
        self.window = window  # most unacked messages in flight
        self.inflight: dict[str, InFlight] = {}  # id -> in-flight state, in send order
        self.cursor = ""  # highest id sent or loaded on this connection
        self.backlog = True  # the store may hold pending messages not in the window
        self.dirty = False  # a message arrived while the window could not take it
        self.refilling = False  # a store read for this window is running
        self.rewind = False  # a message older than the cursor is pending (a requeue)

    def room(self) -> int:
        """How many more messages the window takes."""
        return self.window - len(self.inflight)

    def can_send_live(self) -> bool:
        """Whether a message arriving now may go straight out (order stays by id)."""
        return not self.backlog and not self.refilling and len(self.inflight) < self.window

    def sent(
        self, message_id: str, kind: str, frame: bytes, attempts: int, now: float, due: float
    ) -> None:
        """Record a send (first or repeated)."""
        entry = self.inflight.get(message_id)
        if entry is None:
            self.inflight[message_id] = InFlight(kind, frame, attempts, now, now, due)
        else:
            entry.attempts, entry.sent_at, entry.due = attempts, now, due
        if message_id > self.cursor:
            self.cursor = message_id

    def settle(self, message_id: str) -> InFlight | None:
        """Forget a message (acked or dead); returns its state if it was in flight."""
        return self.inflight.pop(message_id, None)


class Recipient(Protocol):
    """A connection as delivery sees it (a :class:`~pushsvc.core.session.Session`)."""

    session: str  # unique id of the connection
    principal: Principal  # whose messages it receives
    closing: bool  # a close was started
    inflight: Any  # its :class:`AckTracker`, set and cleared by delivery only

    def send(self, data: bytes, kind: str) -> None:
        """Write one payload; ``kind`` labels the metrics."""
        ...


class Publisher(Protocol):
    """Where settled and durable envelopes go (the broker)."""

    in_process: bool  # every subscriber is this process, served inside publish

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Send ``envelope`` to every node subscribed to ``channel``."""
        ...


#: Called for each dead letter: ``(user, message, reason)`` (the plugins' hook).
DeadLetterHook = Callable[[str, dict[str, Any], str], None]

#: This node's open connections of a user (the hub's ``user_clients``).
LocalConnections = Callable[[str], Collection[Recipient]]


class Delivery:
    """Runs at-least-once delivery for the node."""

    def __init__(
        self,
        config: DeliveryConfig,
        store: Store,
        broker: Publisher,
        metrics: Metrics,
        dead_lettered: DeadLetterHook,
    ) -> None:
        delivery = config
        self.config = config  # delivery.* settings
        self.store = store  # the durable inbox
        self.broker = broker  # other nodes, and this one's hub
        self.metrics = metrics  # Prometheus series
        self.dead_lettered = dead_lettered  # the plugins' pushsvc_dead_lettered hook
        self.policy = RetryPolicy(delivery.ack_timeout, delivery.max_attempts, delivery.backoff_max)
        # Resend timers, a timing wheel: slot -> {(session id, message id): due}, and a
        # heap of the slots in use. A send adds its entry to the slot its due time falls
        # in, an ack or a close removes it (no entry left for the pass to skip), a pass
        # takes the slots that started. Ids, not Recipient objects: the garbage
        # collector does not scan dicts of strings.
        self._slots: dict[int, dict[tuple[str, str], float]] = {}
        self._slot_heap: list[int] = []  # the keys of _slots, earliest first
        self._sessions: dict[str, Recipient] = {}  # session id -> connection with a window
        self._tasks: set[asyncio.Task[Any]] = set()  # refills in progress
        # The resend pass is armed for the earliest due entry (start_timer), not run on
        # a fixed period: no wake-up while nothing is due.
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start_timer
        self._timer: asyncio.TimerHandle | None = None  # the armed pass
        self._timer_at = float("inf")  # monotonic time it runs at
        self._last_pass = float("-inf")  # monotonic time of the last pass
        # This node's connections, when the broker is in-process (see serve_locally).
        self._local: LocalConnections | None = None

    def serve_locally(self, connections: LocalConnections) -> None:
        """Hand envelopes to this node's connections directly when the broker is in-process.

        With :attr:`~pushsvc.broker.Broker.in_process` (``memory://``), a
        publish would only call back into this node, inside the call: offering
        and settling here does the same without building, publishing and
        dispatching an envelope (two per acked message). Any other broker
        keeps the publish, which also reaches the other nodes.
        """
        self._local = connections if self.broker.in_process else None

    # -- accepting --------------------------------------------------------------

    async def accept(
        self,
        recipients: Sequence[str],
        message: dict[str, Any],
        ttl: float | None,
        idempotency: IdempotencyKey | None = None,
    ) -> str:
        """Persist ``message`` for every recipient, then send it; returns its id.

        ``idempotency`` (an API ``Idempotency-Key``) is stored in the same transaction.

        Raises:
            CommandError: ``unavailable`` when the store failed (nothing accepted).
        """
        message_id, frame = frames.stamp(message)
        frame["ack"] = True
        data = frames.encode(frame)
        kind = frame["type"]
        lifetime = min(ttl, self.config.ttl) if ttl else self.config.ttl
        try:  # latency and failures are counted by the instrumented store
            await self.store.accept(
                message_id, kind, data, recipients, time.time() + lifetime, idempotency=idempotency
            )
        except StoreUnavailable as exc:
            raise CommandError(
                ErrorCode.UNAVAILABLE,
                f"not accepted, store unavailable: {exc}",
                RETRY_AFTER_UNAVAILABLE,
            ) from exc
        self.metrics.messages_accepted.count(kind)
        if self._local is not None:  # the in-process broker: no envelope to build
            for user in recipients:
                try:
                    self._offer_here(user, message_id, kind, data)
                except Exception:  # persisted already: resent, or delivered on reconnect
                    log.exception("delivering an accepted message %s failed", message_id)
            return message_id
        envelope = Envelope(EnvelopeKind.DURABLE, kind, message_id, data)
        for user in recipients:
            try:
                await self.broker.publish(user_channel(user), envelope)
            except Exception:  # persisted already: delivered on reconnect
                log.exception("broker publish failed for an accepted message %s", message_id)
        return message_id

    def _offer_here(self, user: str, message_id: str, kind: str, frame: bytes) -> bool:
        """Offer a message to ``user``'s connections on an in-process broker; else False."""
        local = self._local
        if local is None:
            return False
        for session in list(local(user)):
            self._offer(session, message_id, kind, frame)
        return True

    # -- connections ------------------------------------------------------------

    async def connected(self, session: Recipient) -> None:
        """Give a new connection its window and send what is pending for its user."""
        if session.closing:  # closed while it was being registered
            return
        tracker = session.inflight = AckTracker(self.config.window)
        self._sessions[session.session] = session
        if self.store.may_have_pending(session.principal.user):
            self._spawn_refill(session)
        else:
            tracker.backlog = False  # nothing stored: new messages go straight out

    def resync(self) -> None:
        """Refill every local window from the store, from its start (broker envelopes were lost).

        A DURABLE envelope lost while the broker was down never reached its
        connections; it is pending in the store, so rereading each user's
        pending messages (those in flight are skipped) sends it now. One
        store read per connection whose user may have something pending.
        """
        for session in list(self._sessions.values()):
            tracker: AckTracker | None = session.inflight
            if tracker is None or session.closing:
                continue
            if not self.store.may_have_pending(session.principal.user):
                continue  # the store knows: nothing to reload
            tracker.backlog = tracker.dirty = tracker.rewind = True
            self._spawn_refill(session)

    def disconnected(self, session: Recipient) -> None:
        """Drop a closed connection's window (its messages stay pending in the store)."""
        tracker: AckTracker | None = session.inflight
        session.inflight = None
        self._sessions.pop(session.session, None)
        if tracker is not None:
            for message_id, entry in tracker.inflight.items():
                self._unschedule(session.session, message_id, entry.due)

    def offer(self, session: Recipient, envelope: Envelope) -> None:
        """A new at-least-once message for ``session``'s user arrived from the broker."""
        self._offer(session, envelope.id, envelope.type, envelope.frame)

    def _offer(self, session: Recipient, message_id: str, kind: str, frame: bytes) -> None:
        tracker: AckTracker | None = session.inflight
        if tracker is None or session.closing or message_id in tracker.inflight:
            return
        if tracker.can_send_live():
            self._send(session, tracker, message_id, kind, frame, 1)
            return
        tracker.dirty = True
        tracker.backlog = True
        if message_id <= tracker.cursor:  # e.g. a requeued dead letter: reread from the start
            tracker.rewind = True
        self._spawn_refill(session)

    def settled(self, session: Recipient, message_ids: Collection[str]) -> None:
        """These ids were acked or dead-lettered: stop resending them here."""
        tracker: AckTracker | None = session.inflight
        if tracker is None:
            return
        freed = False
        for message_id in message_ids:
            entry = tracker.settle(message_id)
            if entry is not None:
                freed = True
                self._unschedule(session.session, message_id, entry.due)
        if freed and tracker.backlog:
            self._spawn_refill(session)

    # -- sending ----------------------------------------------------------------

    def _send(
        self,
        session: Recipient,
        tracker: AckTracker,
        message_id: str,
        kind: str,
        frame: bytes,
        attempts: int,
    ) -> None:
        now = time.monotonic()
        due = now + self.policy.delay(attempts)
        tracker.sent(message_id, kind, frame, attempts, now, due)
        slot = _slot_of(due)
        entries = self._slots.get(slot)
        if entries is not None:
            entries[session.session, message_id] = due
        else:
            self._slots[slot] = {(session.session, message_id): due}
            heapq.heappush(self._slot_heap, slot)
            if slot / SLOTS_PER_SECOND < self._timer_at:
                self._arm()
        metrics = self.metrics
        metrics.messages_delivered.count(kind)
        if attempts > 1:
            metrics.messages_redelivered.count(kind)
        session.send(frame, kind)

    def _unschedule(self, session_id: str, message_id: str, due: float) -> None:
        """Take a message's resend timer out of its slot (acked, dead, or its connection closed)."""
        entries = self._slots.get(_slot_of(due))
        if entries is not None:
            entries.pop((session_id, message_id), None)

    def _spawn_refill(self, session: Recipient) -> None:
        tracker: AckTracker | None = session.inflight
        if tracker is None or tracker.refilling or tracker.room() <= 0:
            return
        tracker.refilling = True
        task = asyncio.ensure_future(self._refill(session, tracker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self, session: Recipient, tracker: AckTracker) -> None:
        """Load pending messages from the store into the window, oldest first."""
        store, user = self.store, session.principal.user
        max_attempts = self.policy.max_attempts
        try:
            while session.inflight is tracker and not session.closing:
                room = tracker.room()
                if room <= 0:
                    break
                tracker.dirty = False
                if tracker.rewind:  # ids in the window are skipped below
                    tracker.rewind, tracker.cursor = False, ""
                rows = await store.pending(user, tracker.cursor, room)
                if session.inflight is not tracker:
                    return
                sends: list[tuple[str, int]] = []
                expired: list[str] = []
                too_old: list[str] = []
                now = time.time()
                for row in rows:
                    tracker.cursor = max(tracker.cursor, row.id)
                    if row.id in tracker.inflight:
                        continue
                    if row.expires_at <= now:  # never delivered past its TTL, sweep or not
                        too_old.append(row.id)
                        continue
                    attempts = row.attempts + 1
                    if attempts > max_attempts:
                        expired.append(row.id)
                        continue
                    self._send(session, tracker, row.id, row.type, row.frame, attempts)
                    sends.append((row.id, attempts))
                if sends:
                    await store.record_attempts(user, sends)
                if expired:
                    await self._dead_letter(user, expired, DEAD_MAX_ATTEMPTS)
                if too_old:
                    await self._dead_letter(user, too_old, DEAD_TTL)
                if len(rows) < room and not tracker.dirty:
                    tracker.backlog = False
                    break
        except StoreUnavailable as exc:
            log.warning(
                "loading pending messages for a connection failed: %s",
                exc,
                extra={"session": session.session, "user": user},
            )
            asyncio.get_running_loop().call_later(1.0, self._spawn_refill, session)
        finally:
            tracker.refilling = False

    # -- acks -------------------------------------------------------------------

    async def ack(self, session: Recipient, message_ids: Sequence[str]) -> int:
        """Settle ``message_ids`` for ``session``'s user; returns how many were settled."""
        try:
            result = await self.store.ack(session.principal.user, message_ids)
        except StoreUnavailable as exc:
            raise CommandError(
                ErrorCode.UNAVAILABLE, f"ack not recorded: {exc}", RETRY_AFTER_UNAVAILABLE
            ) from exc
        metrics = self.metrics
        if result.repeated or result.foreign or result.unknown:
            for reason, count in (
                ("repeated", result.repeated),
                ("foreign", result.foreign),
                ("unknown", result.unknown),
            ):
                if count:
                    metrics.acks_ignored.labels(reason).inc(count)
        if not result.acked:
            return 0
        now = time.monotonic()
        tracker: AckTracker | None = session.inflight
        for message_id, kind in result.acked:
            metrics.messages_acked.count(kind)
            entry = tracker.inflight.get(message_id) if tracker is not None else None
            if entry is not None:
                metrics.ack_latency_loop.observe(now - entry.sent_at)
        settled = [message_id for message_id, _kind in result.acked]
        if not self._settle_here(session.principal.user, settled):
            await self._publish_settled(session.principal.user, settled)
        return len(result.acked)

    def _settle_here(self, user: str, message_ids: Sequence[str]) -> bool:
        """Settle on ``user``'s connections on an in-process broker; else False."""
        local = self._local
        if local is None:
            return False
        for session in list(local(user)):
            self.settled(session, message_ids)
        return True

    async def _publish_settled(self, user: str, message_ids: Sequence[str]) -> None:
        """Tell every node to stop resending these ids; a broker failure is logged (acks stand)."""
        ids = " ".join(message_ids).encode()
        try:
            await self.broker.publish(
                user_channel(user), Envelope(EnvelopeKind.SETTLED, "", "", ids)
            )
        except BrokerUnavailable as exc:  # stored: other nodes' resends are answered "repeated"
            log.warning("settled ids not broadcast: %s", exc, extra={"user": user})

    # -- timers -----------------------------------------------------------------

    def start_timer(self) -> None:
        """Run :meth:`tick` on this loop whenever a resend timer is due (``stop_timer``).

        One timer armed at the earliest due time (at least ``TICK_MIN_GAP``
        after the previous pass), re-armed after each pass and when an earlier
        one is scheduled: the loop wakes only when something may be due.
        """
        self._loop = asyncio.get_running_loop()
        self._arm()

    def stop_timer(self) -> None:
        """Stop running :meth:`tick` (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop, self._timer, self._timer_at = None, None, float("inf")

    def _arm(self) -> None:
        """(Re-)arm the pass for the earliest due entry, if started and anything is due."""
        slot_heap, slots = self._slot_heap, self._slots
        while slot_heap and not slots[slot_heap[0]]:  # every entry in it was acked
            del slots[heapq.heappop(slot_heap)]
        if self._loop is None or not slot_heap:
            return
        at = max(slot_heap[0] / SLOTS_PER_SECOND, self._last_pass + TICK_MIN_GAP)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._pass)

    def _pass(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        try:
            self.tick()
        except Exception:  # the pass re-arms below: a bug must not stop resends
            log.exception("resend pass failed")
        self._arm()

    def tick(self) -> None:
        """Resend or dead-letter what timed out (run by :meth:`start_timer`'s timer)."""
        now = time.monotonic()
        self._last_pass = now
        slot_heap, slots = self._slot_heap, self._slots
        resends: dict[Recipient, list[tuple[str, int]]] = {}
        dead: dict[str, list[str]] = {}
        freed: set[Recipient] = set()
        sessions = self._sessions
        while slot_heap and slot_heap[0] / SLOTS_PER_SECOND <= now:
            for (session_id, message_id), due in slots.pop(heapq.heappop(slot_heap)).items():
                session = sessions.get(session_id)
                if session is None:
                    continue  # the connection is gone
                tracker: AckTracker | None = session.inflight
                entry = tracker.inflight.get(message_id) if tracker is not None else None
                if tracker is None or entry is None or entry.due != due or session.closing:
                    continue  # settled or rescheduled meanwhile
                if entry.attempts >= self.policy.max_attempts:
                    tracker.settle(message_id)
                    dead.setdefault(session.principal.user, []).append(message_id)
                    freed.add(session)
                    continue
                attempts = entry.attempts + 1
                self._send(session, tracker, message_id, entry.type, entry.frame, attempts)
                resends.setdefault(session, []).append((message_id, attempts))
        for session in freed:  # the window has room again: load the backlog behind it
            if session.inflight is not None and session.inflight.backlog:
                self._spawn_refill(session)
        for session, pairs in resends.items():
            self._background(self.store.record_attempts(session.principal.user, pairs))
        for user, message_ids in dead.items():
            self._background(self._dead_letter(user, message_ids, DEAD_MAX_ATTEMPTS))

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._report)

    def _report(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, StoreUnavailable):
                log.warning("delivery bookkeeping failed (retried later): %s", error)
            else:
                log.error("delivery task failed", exc_info=error)

    async def _dead_letter(self, user: str, message_ids: Sequence[str], reason: str) -> None:
        dead = await self.store.dead_letter(user, message_ids, reason)
        await self.announce_dead(dead)

    async def announce_dead(self, dead: Sequence[DeadLetter]) -> None:
        """Count dead letters, call the hook, and stop their resends everywhere."""
        by_user: dict[str, list[str]] = {}
        for letter in dead:
            self.metrics.messages_dead_lettered.labels(letter.type, letter.reason).inc()
            by_user.setdefault(letter.user, []).append(letter.id)
            self.dead_lettered(letter.user, orjson.loads(letter.frame), letter.reason)
        for user, message_ids in by_user.items():
            if not self._settle_here(user, message_ids):
                await self._publish_settled(user, message_ids)

    async def sweep(self) -> None:
        """TTL expiry, retention clean-up and backlog gauges (call every few seconds)."""
        dead = await self.store.expire(time.time(), self.config.dead_letter_retention)
        await self.announce_dead(dead)
        stats = await self.store.stats()
        self.metrics.pending_messages.set(stats.pending)
        age = (
            0.0 if stats.oldest_created_ms is None else time.time() - stats.oldest_created_ms / 1000
        )
        self.metrics.oldest_pending_age.set(max(0.0, age))

    async def drain(self) -> None:
        """Wait for refills and bookkeeping started so far."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def requeue(self, user: str, ids: Sequence[str], expires_at: float) -> list[str]:
        """Make the dead letters ``ids`` of ``user`` pending again until ``expires_at``.

        Returns the ids that were dead letters of ``user``; connected clients
        get them now, through the delivery window like any new message.

        Raises:
            StoreUnavailable: nothing was requeued (the caller answers 503).
        """
        requeued = await self.store.requeue(user, ids, expires_at)
        stored = await self.store.frames(requeued) if requeued else {}
        for message_id in requeued:
            kind, frame = stored[message_id]
            if self._offer_here(user, message_id, kind, frame):
                continue
            envelope = Envelope(EnvelopeKind.DURABLE, kind, message_id, frame)
            try:
                await self.broker.publish(user_channel(user), envelope)
            except BrokerUnavailable as exc:  # pending: sent after the broker's gap or a reconnect
                log.warning("requeued %s not broadcast: %s", message_id, exc)
        return list(requeued)
