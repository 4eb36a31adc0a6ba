"""The broker contract: envelopes, their kinds, channels and the :class:`Broker` protocol."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_SEP = b"\x1f"

#: The broadcast channel of token revocations (:attr:`EnvelopeKind.REVOKED`).
REVOCATIONS_CHANNEL = "control:revocations"


class EnvelopeKind(enum.Enum):
    """What an envelope asks the receiving node to do; the value is its wire byte."""

    LIVE = b"L"  # send to the channel's connections, at most once
    PRESENCE = b"P"  # like LIVE, to a room's members except the session in ``id``
    DURABLE = b"D"  # send and track for an ack (at least once)
    SETTLED = b"S"  # ids acked elsewhere (space-separated in ``frame``): stop resending
    DISCONNECT = b"X"  # close the user's connections; ``frame`` is the UTF-8 reason
    REVOKED = b"R"  # a token revocation (JSON in ``frame``): cache it, close its holders


_KINDS: dict[bytes, EnvelopeKind] = {kind.value: kind for kind in EnvelopeKind}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on a broker channel.

    ``kind`` says what the receiver does with it (:class:`EnvelopeKind`).
    On the wire it is one byte, then the type, the id and the frame,
    separated by ``\x1f`` (the frame last, so it may contain any byte).

    A room publication recorded in the room's history also carries its
    ``offset`` and ``epoch`` (the same values as inside the frame), so that
    a receiving node can see a gap without decoding the JSON. On the wire
    they follow the id in its field, space-separated (``<id> <offset>
    <epoch>``); a node that predates them reads that field as the id, which
    it does not use for a LIVE room envelope.
    """

    kind: EnvelopeKind  # what the receiving node does with it
    type: str  # message type (metric label); "" for control envelopes
    id: str  # message id; "" when none
    frame: bytes  # the frame exactly as clients receive it, or the control payload
    offset: int = 0  # position in the room's history; 0: not recorded
    epoch: str = ""  # the room history's epoch when ``offset`` is set

    def to_bytes(self) -> bytes:
        """Serialise for the wire."""
        head = self.id.encode()
        if self.offset:
            head = b"%s %d %s" % (head, self.offset, self.epoch.encode())
        return _SEP.join((self.kind.value, self.type.encode(), head, self.frame))

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse what :meth:`to_bytes` made (the frame is not decoded).

        Raises ``ValueError`` for malformed data or an unknown kind.
        """
        kind, kind_type, head, frame = data.split(_SEP, 3)
        try:
            envelope_kind = _KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown envelope kind {kind!r}") from None
        if b" " not in head:
            return cls(envelope_kind, kind_type.decode(), head.decode(), frame)
        message_id, offset, epoch = head.split(b" ", 2)
        return cls(
            envelope_kind,
            kind_type.decode(),
            message_id.decode(),
            frame,
            int(offset),
            epoch.decode(),
        )


def room_channel(room: str) -> str:
    """The broker channel of a room."""
    return f"room:{room}"


def user_channel(user: str) -> str:
    """The broker channel of a user's connections."""
    return f"user:{user}"


MessageCallback = Callable[[str, Envelope], None]

#: Called after envelopes may have been lost (see :meth:`Broker.set_gap_callback`).
GapCallback = Callable[[], None]


class BrokerUnavailable(Exception):
    """A publish did not reach the broker (down, or slower than its timeout): nothing was sent.

    Raised only by :meth:`Broker.publish`; the caller decides what it means
    (an at-most-once message is refused as ``unavailable``).
    """


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """A broker's figures, read at scrape time by the metrics (counters since start)."""

    received: int = 0  # envelopes received from the broker (probes excluded)
    published: int = 0  # envelopes published (probes excluded)
    publish_errors: int = 0  # publishes that raised BrokerUnavailable (timeouts included)
    timeouts: int = 0  # broker operations that gave up after the broker timeout
    reconnects: int = 0  # subscriber connections re-established after a loss
    resubscriptions: int = 0  # full resubscribes confirmed after a reconnect
    subscriptions: int = 0  # channels subscribed now
    last_message_age: float | None = None  # seconds since the last message received; None: none


class Broker(Protocol):
    """Fans envelopes out to every node subscribed to a channel, at most once."""

    #: True when every subscriber is this process and :meth:`publish` runs the callback
    #: inside the call (``memory://``): a caller may then hand an envelope to this
    #: node's own connections itself, with the same result and no round trip.
    in_process: bool

    def set_callback(self, callback: MessageCallback) -> None:
        """Where envelopes for subscribed channels go (the local hub)."""
        ...

    def set_gap_callback(self, callback: GapCallback) -> None:
        """Called after envelopes may have been lost: resubscribed after a disconnect.

        The node repairs at-least-once state then (every window is refilled
        from the store); at-most-once envelopes lost meanwhile stay lost.
        """
        ...

    def stats(self) -> BrokerStats:
        """The current figures (cheap: called at every metrics scrape)."""
        ...

    async def start(self) -> None:
        """Connect; raises if the broker cannot be reached."""
        ...

    async def close(self) -> None:
        """Disconnect and release resources."""
        ...

    def healthy(self) -> bool:
        """Whether publishes currently reach the other nodes (False once closed)."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel`` on this node.

        Returns once the broker confirmed it (an envelope published after
        that is received), or after the broker timeout while the broker is
        unreachable: the subscription is then made on reconnect. Never raises
        for the broker's state.
        """
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` on this node (nothing more is delivered from it)."""
        ...

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Send ``envelope`` to every node subscribed to ``channel``.

        After :meth:`close` it delivers nothing and does not raise (at most
        once: a closed node is like a node that is down).

        Raises:
            BrokerUnavailable: the broker did not take it within its timeout.
        """
        ...
