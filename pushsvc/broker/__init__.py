"""Broker: carries encoded frames between nodes (interface and envelope).

A broker delivers at most once: a node that is down or disconnected misses
what was published meanwhile. Durability is the store's job, not the
broker's. Frames travel already encoded, with a small header, so a node
forwards a message to its sockets without decoding the JSON.

Channels are ``room:<name>`` and ``user:<id>``; a node subscribes to a
channel only while it has a local member, so nodes receive only what their
own connections need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_SEP = b"\x1f"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on a broker channel.

    ``kind`` is ``live`` (send, at most once), ``presence`` (like live, to
    a room's members except the session in ``id``), ``durable`` (send and
    track for an ack), ``settled`` (``ids`` acked elsewhere: stop resending; the
    ids are space-separated in ``frame``), or ``disconnect`` (close the
    user's connections; ``frame`` is the UTF-8 reason).
    """

    kind: str  # live | presence | durable | settled | disconnect
    type: str  # message type (metric label); "" for control envelopes
    id: str  # message id; "" when none
    frame: bytes  # the frame exactly as clients receive it, or the control payload

    def to_bytes(self) -> bytes:
        """Serialise for the wire."""
        return _SEP.join((self.kind.encode(), self.type.encode(), self.id.encode(), self.frame))

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse what :meth:`to_bytes` made (the frame is not decoded)."""
        kind, kind_type, message_id, frame = data.split(_SEP, 3)
        return cls(kind.decode(), kind_type.decode(), message_id.decode(), frame)


def room_channel(room: str) -> str:
    """The broker channel of a room."""
    return f"room:{room}"


def user_channel(user: str) -> str:
    """The broker channel of a user's connections."""
    return f"user:{user}"


MessageCallback = Callable[[str, Envelope], None]


class Broker(Protocol):
    """Fans envelopes out to every node subscribed to a channel, at most once."""

    def set_callback(self, callback: MessageCallback) -> None:
        """Where envelopes for subscribed channels go (the local hub)."""
        ...

    async def start(self) -> None:
        """Connect; raises if the broker cannot be reached."""
        ...

    async def close(self) -> None:
        """Disconnect and release resources."""
        ...

    def healthy(self) -> bool:
        """Whether publishes currently reach the other nodes."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel`` on this node."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` on this node."""
        ...

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Send ``envelope`` to every node subscribed to ``channel``."""
        ...


def make_broker(url: str) -> Broker:
    """Build the broker for ``broker.url``."""
    if url.startswith("memory://"):
        from pushsvc.broker.memory import MemoryBroker

        return MemoryBroker()
    raise ValueError(f"broker.url: unsupported scheme in {url!r} (supported: memory://)")
