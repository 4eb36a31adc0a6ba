"""Hub tracks the client connections on this node: by session, user, address and room.

It is the broker's local end: envelopes for ``room:`` and ``user:``
channels arrive in :meth:`Hub.on_envelope`; live ones go to the local
connections through :func:`send_to_all`, the one broadcast path (the payload
is encoded once and wrapped once per transport kind), durable and settled
ones go straight to the delivery tracker.

Trade-off, as plainly as websockets puts it for its ``broadcast()``: there is
no backpressure towards the publisher. A member whose transport cannot keep
up is closed as a slow consumer (4008) instead of growing memory; the others
are not slowed down by it.
"""

from __future__ import annotations

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

log = logging.getLogger("pushsvc.hub")

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
        self, broker: Broker, metrics: Metrics, durable: DurableReceiver, cluster: Registry
    ) -> None:
        self.broker = broker  # where subscriptions are made
        self.cluster = cluster  # what every node knows: connection counts, room members
        self.metrics = metrics  # for fan-out sizes
        self.durable = durable  # the delivery tracker
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

    async def join(self, client: Client, room: str) -> bool:
        """Add ``client`` to ``room``; False when it was already a member."""
        if room in client.rooms:
            return False
        client.rooms.add(room)
        members = self.rooms.setdefault(room, {})
        members[client.session] = client
        if len(members) == 1:
            await self.broker.subscribe(room_channel(room))
        await self.cluster.joined(room, client.principal.user, client.session)
        return True

    async def leave(self, client: Client, room: str) -> bool:
        """Remove ``client`` from ``room``; False when it was not a member."""
        if room not in client.rooms:
            return False
        client.rooms.discard(room)
        members = self.rooms.get(room)
        if members is not None:
            members.pop(client.session, None)
            if not members:
                del self.rooms[room]
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

    def on_envelope(self, channel: str, envelope: Envelope) -> None:
        """Deliver an envelope from the broker to the local connections."""
        scope, _, name = channel.partition(":")
        if scope == "control":  # broadcasts to every node (revocations)
            if self.on_control is not None:
                self.on_control(channel, envelope)
            return
        if scope == "room":
            members = self.rooms.get(name)
            if not members:
                return
            recipients: Collection[Client] = members.values()
            if envelope.kind is EnvelopeKind.PRESENCE:  # all but the session in ``id``
                recipients = [c for s, c in members.items() if s != envelope.id]
                if envelope.type == PRESENCE_FRAME:  # a join/leave event, not a message
                    self._broadcast(recipients, envelope)
                    return
            self.metrics.broadcast_recipients.observe(len(recipients))
            sent = self._broadcast(recipients, envelope)
            self.metrics.messages_delivered.labels(envelope.type).inc(sent)
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
