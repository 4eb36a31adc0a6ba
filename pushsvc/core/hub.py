"""Hub tracks the client connections on this node: by session, user, address and room.

It is the broker's local end: envelopes for ``room:`` and ``user:``
channels arrive in :meth:`Hub.on_envelope`; live ones go to the local
connections through :func:`send_to_all`, the one broadcast path (the payload
is encoded once and wrapped once per transport kind), durable and settled
ones go straight to the delivery tracker.

Room publications recorded in the history carry an offset: the hub keeps
the last offset it delivered per room (:class:`_Feed`), and when one is
skipped (the broker is at most once) it reads the missing ones from the
history and delivers them in order before the new one, without
disconnecting anyone. A connection that resumes a room is *held* while the
node reads what it missed: live envelopes for it are kept aside and the
ones it gets from history are dropped (:meth:`Hub.release_room`).

Trade-off, as plainly as websockets puts it for its ``broadcast()``: there is
no backpressure towards the publisher. A member whose transport cannot keep
up is closed as a slow consumer (4008) instead of growing memory; the others
are not slowed down by it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from pushsvc.auth.principal import Principal
from pushsvc.broker import Broker, Envelope, EnvelopeKind, room_channel, user_channel
from pushsvc.cluster import Registry
from pushsvc.config import RateLimitConfig
from pushsvc.ops.metrics import Metrics
from pushsvc.protocol.disconnects import DISCONNECTS, Disconnect
from pushsvc.protocol.frames import Broadcast
from pushsvc.store import HistoryPage

log = logging.getLogger("pushsvc.hub")

#: Seconds before a gap repair reads the history again for what it lacked.
REPAIR_RETRY = 0.05

#: ``type`` of the PRESENCE envelopes that carry join/leave events (not counted as messages);
#: other PRESENCE envelopes are messages published with ``exclude`` (a session left out).
PRESENCE_FRAME = "presence"


class Client(Protocol):
    """What the hub needs of a connection (a :class:`~pushsvc.core.session.Session`)."""

    session: str  # unique id of the connection
    principal: Principal  # who is connected
    remote_ip: str  # the peer's address
    rooms: set[str]  # rooms joined on this connection
    last_seen: float  # monotonic time of the last frame or pong
    closing: bool  # a close was started
    inflight: Any  # its delivery window, owned by the delivery module

    def ping(self) -> None:
        """Send a protocol-level ping."""
        ...

    def send(self, data: bytes, kind: str) -> None:
        """Write one payload; ``kind`` is the message type (for metrics)."""
        ...

    def send_broadcast(self, broadcast: Broadcast) -> bool:
        """Queue a shared payload; False when the connection is closing."""
        ...

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection with a close code and a reason."""
        ...

    def reconfigure_limits(self, limits: RateLimitConfig, now: float) -> None:
        """Apply reloaded rate limits."""
        ...


class DurableReceiver(Protocol):
    """Where at-least-once envelopes go (the delivery tracker)."""

    def offer(self, client: Any, envelope: Envelope) -> None:
        """A new at-least-once message for ``client``'s user."""
        ...

    def settled(self, client: Any, message_ids: Collection[str]) -> None:
        """These ids were acked or dead-lettered: stop resending them on ``client``."""
        ...


class HistoryReader(Protocol):
    """Where the hub reads publications it missed (the store's :class:`HistoryStore`)."""

    async def history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """Entries of ``room`` after ``since``, oldest first, and its position."""
        ...


class _Feed:
    """The recorded publications of one room as this node delivered them."""

    __slots__ = ("epoch", "last", "queue", "repairing")

    def __init__(self, epoch: str, last: int) -> None:
        self.epoch = epoch  # the room history's epoch
        self.last = last  # offset delivered last
        self.queue: list[Envelope] = []  # arrived while a repair runs, in arrival order
        self.repairing = False  # a repair task owns the feed


def send_to_all(clients: Iterable[Client], broadcast: Broadcast) -> int:
    """Queue the same payload on every client; returns how many took it."""
    sent = 0
    for client in list(clients):
        sent += client.send_broadcast(broadcast)
    return sent


class Hub:
    """Local registry of connections and rooms, fed by the broker.

    Connects, joins, leaves and disconnects also go to the cluster registry
    (per-user caps and presence over every node); messages never do.
    """

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        durable: DurableReceiver,
        cluster: Registry,
        history: HistoryReader | None = None,
        max_repair: int = 1000,
    ) -> None:
        self.broker = broker  # where subscriptions are made
        self.cluster = cluster  # what every node knows: connection counts, room members
        self.metrics = metrics  # for fan-out sizes
        self.durable = durable  # the delivery tracker
        self.history = history  # where gaps are repaired from; None: not repaired
        self.max_repair = max_repair  # most publications one repair reads
        self.feeds: dict[str, _Feed] = {}  # room -> recorded publications delivered
        #: room -> session -> envelopes kept aside while that connection resumes
        self.held: dict[str, dict[str, list[Envelope]]] = {}
        #: room -> session -> (epoch, offset) it got from the history: copies of those
        #: still on their way through the broker are not sent to it again
        self.floors: dict[str, dict[str, tuple[str, int]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # running repairs
        self.sessions: dict[str, Client] = {}  # session -> client
        self.users: dict[str, dict[str, Client]] = {}  # user -> session -> client
        self.rooms: dict[str, dict[str, Client]] = {}  # room -> session -> client
        self.reserved_users: dict[str, int] = {}  # user -> connections open or opening
        self.reserved_ips: dict[str, int] = {}  # address -> connections open or opening
        self._slots: dict[str, list[str]] = {}  # user -> ids counted by the cluster registry
        self._slot_ids = itertools.count(1)  # unique on this node
        #: ``control:`` channel envelopes go here (set by the node); None: dropped
        self.on_control: Callable[[str, Envelope], None] | None = None
        broker.set_callback(self.on_envelope)

    # -- connection caps: reserved before the upgrade, released on close ----------

    async def reserve(self, user: str, ip: str, max_per_user: int, max_per_ip: int) -> str | None:
        """Count a new connection; returns the exceeded cap (``per_user``/``per_ip``) or None.

        ``max_per_user`` holds over every node (the cluster registry counts,
        after a local check that spares it the call when this node alone is
        at the cap); ``max_per_ip`` holds per node (behind a load balancer
        each node sees its own share of an address anyway).
        """
        if self.reserved_users.get(user, 0) >= max_per_user:
            return "per_user"
        if self.reserved_ips.get(ip, 0) >= max_per_ip:
            return "per_ip"
        self._count(user, ip, 1)  # before the await: concurrent handshakes see it
        slot = f"c{next(self._slot_ids)}"
        if not await self.cluster.reserve_user(user, slot, max_per_user):
            self._count(user, ip, -1)
            return "per_user"
        self._slots.setdefault(user, []).append(slot)
        return None

    async def release(self, user: str, ip: str) -> None:
        """Undo one successful :meth:`reserve`."""
        self._count(user, ip, -1)
        slots = self._slots.get(user)
        if not slots:
            return
        slot = slots.pop()
        if not slots:
            del self._slots[user]
        await self.cluster.release_user(user, slot)

    def _count(self, user: str, ip: str, delta: int) -> None:
        for table, key in ((self.reserved_users, user), (self.reserved_ips, ip)):
            left = table.get(key, 0) + delta
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    # -- registration -----------------------------------------------------------

    async def add(self, client: Client) -> None:
        """Register an opened connection and subscribe to its user's channel."""
        self.sessions[client.session] = client
        peers = self.users.setdefault(client.principal.user, {})
        peers[client.session] = client
        self.metrics.connections.set(len(self.sessions))
        if len(peers) == 1:
            await self.broker.subscribe(user_channel(client.principal.user))

    async def remove(self, client: Client) -> list[str]:
        """Forget a closed connection; returns the rooms it was in."""
        if self.sessions.pop(client.session, None) is None:
            return []
        self.metrics.connections.set(len(self.sessions))
        user = client.principal.user
        peers = self.users.get(user)
        if peers is not None:
            peers.pop(client.session, None)
            if not peers:
                del self.users[user]
                await self.broker.unsubscribe(user_channel(user))
        left = list(client.rooms)
        for room in left:
            await self.leave(client, room)
        return left

    async def join(self, client: Client, room: str, *, hold: bool = False) -> bool:
        """Add ``client`` to ``room``; False when it was already a member.

        With ``hold``, what the room publishes is kept aside for ``client``
        until :meth:`release_room` (also when it was a member already).
        """
        if hold:
            self.held.setdefault(room, {})[client.session] = []
        if room in client.rooms:
            return False
        client.rooms.add(room)
        members = self.rooms.setdefault(room, {})
        members[client.session] = client
        if len(members) == 1:
            await self.broker.subscribe(room_channel(room))
        await self.cluster.joined(room, client.principal.user, client.session)
        return True

    def release_room(self, client: Client, room: str, upto: int, epoch: str) -> int:
        """Stop holding ``room`` for ``client``: send what was kept aside; returns how many.

        Recorded publications of ``epoch`` up to offset ``upto`` are dropped
        (the client got them from the history).
        """
        held = self.held.get(room)
        kept = held.pop(client.session, None) if held is not None else None
        if held is not None and not held:
            del self.held[room]
        if client.closing or room not in client.rooms:
            return 0
        sent = 0
        for envelope in kept or ():
            if envelope.offset and envelope.epoch == epoch and envelope.offset <= upto:
                continue
            if envelope.kind is EnvelopeKind.PRESENCE and envelope.id == client.session:
                continue  # published without this connection
            sent += client.send_broadcast(Broadcast(envelope.frame, envelope.type))
        feed = self.feeds.get(room)
        if upto and (feed is None or feed.epoch != epoch or feed.last < upto):
            self.floors.setdefault(room, {})[client.session] = (epoch, upto)
        return sent

    async def leave(self, client: Client, room: str) -> bool:
        """Remove ``client`` from ``room``; False when it was not a member."""
        for table in (self.held, self.floors):
            entries = table.get(room)
            if entries is not None:
                entries.pop(client.session, None)
                if not entries:
                    del table[room]
        if room not in client.rooms:
            return False
        client.rooms.discard(room)
        members = self.rooms.get(room)
        if members is not None:
            members.pop(client.session, None)
            if not members:
                del self.rooms[room]
                self.feeds.pop(room, None)
                await self.broker.unsubscribe(room_channel(room))
        await self.cluster.left(room, client.principal.user, client.session)
        return True

    # -- queries ----------------------------------------------------------------

    def members(self, room: str) -> Collection[Client]:
        """The local connections in ``room``."""
        members = self.rooms.get(room)
        return members.values() if members else ()

    def user_clients(self, user: str) -> Collection[Client]:
        """The local connections of ``user``."""
        peers = self.users.get(user)
        return peers.values() if peers else ()

    def all_clients(self) -> Iterable[Client]:
        """Every local connection (a snapshot)."""
        return list(self.sessions.values())

    # -- broker input -----------------------------------------------------------

    def _broadcast(self, clients: Iterable[Client], envelope: Envelope) -> int:
        """Send a live envelope to ``clients``; frame and byte counters once per broadcast."""
        sent = send_to_all(clients, Broadcast(envelope.frame, envelope.type))
        if sent:
            self.metrics.frames_sent.labels(envelope.type).inc(sent)
            self.metrics.sent_bytes.labels(envelope.type).inc(sent * len(envelope.frame))
        return sent

    def _to_room(self, room: str, envelope: Envelope) -> None:
        """Send a room envelope to its local members (those held get it kept aside)."""
        members = self.rooms.get(room)
        if not members:
            return
        held = self.held.get(room)
        if held:
            for kept in held.values():
                kept.append(envelope)
        excluded: set[str] = set(held) if held else set()
        if envelope.kind is EnvelopeKind.PRESENCE:  # all but the session in ``id``
            excluded.add(envelope.id)
            if envelope.type == PRESENCE_FRAME:  # a join/leave event, not a message
                self._broadcast([c for s, c in members.items() if s not in excluded], envelope)
                return
        floors = self.floors.get(room) if envelope.offset else None
        if floors:
            for session, (epoch, upto) in list(floors.items()):
                if epoch != envelope.epoch or envelope.offset > upto:
                    del floors[session]  # the feed is in order: no older copy comes now
                else:
                    excluded.add(session)
            if not floors:
                del self.floors[room]
        targets: Collection[Client] = (
            [c for s, c in members.items() if s not in excluded] if excluded else members.values()
        )
        self.metrics.broadcast_recipients.observe(len(targets))
        sent = self._broadcast(targets, envelope)
        self.metrics.messages_delivered.labels(envelope.type).inc(sent)

    def _recorded(self, room: str, envelope: Envelope) -> None:
        """A publication with an offset: deliver it in order, repairing a gap first."""
        feed = self.feeds.get(room)
        if feed is None:  # the first one since this node subscribed: nothing to compare
            feed = self.feeds[room] = _Feed(envelope.epoch, envelope.offset - 1)
        if feed.repairing:
            feed.queue.append(envelope)
            return
        if envelope.epoch != feed.epoch:  # a new history: offsets start over
            feed.epoch, feed.last = envelope.epoch, envelope.offset - 1
        if envelope.offset <= feed.last:  # delivered already (by a repair)
            self.metrics.history_duplicates.inc()
            return
        if envelope.offset > feed.last + 1:
            feed.repairing = True
            feed.queue.append(envelope)
            task = asyncio.get_running_loop().create_task(self._repair(room, feed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        feed.last = envelope.offset
        self._to_room(room, envelope)

    async def _repair(self, room: str, feed: _Feed) -> None:
        """Deliver the queued envelopes in order, reading each gap from the history first."""
        assert self.history is not None
        try:
            while feed.queue:
                envelope = feed.queue.pop(0)
                if envelope.epoch != feed.epoch:
                    feed.epoch, feed.last = envelope.epoch, envelope.offset - 1
                if envelope.offset <= feed.last:
                    self.metrics.history_duplicates.inc()
                    continue
                if envelope.offset > feed.last + 1:
                    await self._fill(room, feed, envelope.offset)
                feed.last = envelope.offset
                self._to_room(room, envelope)
        finally:
            feed.repairing = False
            feed.queue.clear()

    async def _fill(self, room: str, feed: _Feed, upto: int) -> None:
        """Deliver the recorded publications after ``feed.last`` and before ``upto``.

        What the history lacks is read once more after :data:`REPAIR_RETRY`
        seconds: with several nodes, a publication may arrive before an
        earlier offset whose publisher has not committed yet.
        """
        since = max(feed.last, upto - 1 - self.max_repair)
        found = await self._read_gap(room, feed.epoch, since, upto)
        if len(found) < upto - 1 - since:
            await asyncio.sleep(REPAIR_RETRY)
            again = await self._read_gap(room, feed.epoch, since, upto)
            found = again if len(again) > len(found) else found
        missing = upto - 1 - feed.last
        for repaired in found:
            self._to_room(room, repaired)
        self.metrics.history_replayed.labels("repair").inc(len(found))
        if len(found) == missing:
            self.metrics.history_gaps_repaired.inc()
        else:
            self.metrics.history_lost.inc(missing - len(found))
            log.warning(
                "room %r: %d publication(s) missed and not in the history",
                room,
                missing - len(found),
            )

    async def _read_gap(self, room: str, epoch: str, since: int, upto: int) -> list[Envelope]:
        """The recorded publications of ``epoch`` after ``since`` and before ``upto``."""
        assert self.history is not None
        try:
            page = await self.history.history(room, since, upto - 1 - since)
        except Exception as exc:  # StoreUnavailable or a broken store: deliver what we have
            log.warning("gap repair of room %r failed: %s", room, exc)
            return []
        if page.epoch != epoch:
            return []
        return [
            Envelope(EnvelopeKind.LIVE, e.type, "", e.frame, e.offset, page.epoch)
            for e in page.entries
            if since < e.offset < upto
        ]

    def on_envelope(self, channel: str, envelope: Envelope) -> None:
        """Deliver an envelope from the broker to the local connections."""
        scope, _, name = channel.partition(":")
        if scope == "control":  # broadcasts to every node (revocations)
            if self.on_control is not None:
                self.on_control(channel, envelope)
            return
        if scope == "room":
            if name not in self.rooms:
                return
            if envelope.offset and self.history is not None:
                self._recorded(name, envelope)
            else:
                self._to_room(name, envelope)
            return
        clients = list(self.user_clients(name))
        if not clients:
            return
        if envelope.kind is EnvelopeKind.LIVE:
            sent = self._broadcast(clients, envelope)
            self.metrics.messages_delivered.labels(envelope.type).inc(sent)
        elif envelope.kind is EnvelopeKind.DURABLE:
            for client in clients:
                self.durable.offer(client, envelope)
        elif envelope.kind is EnvelopeKind.SETTLED:
            ids = envelope.frame.decode().split()
            for client in clients:
                self.durable.settled(client, ids)
        elif envelope.kind is EnvelopeKind.DISCONNECT:
            disconnect = DISCONNECTS.api.because(envelope.frame.decode())
            for client in clients:
                client.close(disconnect)
        else:
            log.warning("unknown envelope kind %r on %s", envelope.kind, channel)
