"""Broker: carries encoded frames between nodes (interface and envelope).

A broker delivers at most once: a node that is down or disconnected misses
what was published meanwhile. Durability is the store's job, not the
broker's. Frames travel already encoded, with a small header, so a node
forwards a message to its sockets without decoding the JSON.

Channels are ``room:<name>`` and ``user:<id>``; a node subscribes to a
channel only while it has a local member, so nodes receive only what their
own connections need. ``control:<name>`` channels are broadcasts every node
subscribes to at start (:data:`REVOCATIONS_CHANNEL`).

``broker.url`` selects the implementation: ``memory://`` (in-process,
synchronous delivery inside ``publish``; the default),
``memory://?delivery=async`` (in-process, delivery on a later loop pass
through the wire form, like a network broker; for tests), or
``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path?db=N``,
``redis+sentinel://...`` (Redis pub/sub between nodes) and
``redis+cluster://h1:p1,h2:p2`` (sharded pub/sub on a Redis Cluster), all
:mod:`pushsvc.broker.redis`.
"""

from __future__ import annotations

from pushsvc.broker.contracts import (
    REVOCATIONS_CHANNEL,
    Broker,
    BrokerStats,
    BrokerUnavailable,
    Envelope,
    EnvelopeKind,
    GapCallback,
    MessageCallback,
    room_channel,
    user_channel,
)
from pushsvc.config import REDIS_SCHEMES

__all__ = [
    "REVOCATIONS_CHANNEL",
    "Broker",
    "BrokerStats",
    "BrokerUnavailable",
    "Envelope",
    "EnvelopeKind",
    "GapCallback",
    "MessageCallback",
    "make_broker",
    "room_channel",
    "user_channel",
]


#: ``broker.url`` prefixes :func:`make_broker` takes.
SCHEMES = ("memory://", *REDIS_SCHEMES)


def make_broker(url: str, *, timeout: float = 1.0, probe_interval: float = 1.0) -> Broker:
    """Build the broker for ``broker.url``; raises ``ValueError`` for a bad URL.

    ``memory://`` delivers inside ``publish`` (the default: no loop pass per
    message); ``memory://?delivery=async`` delivers on a later loop pass.
    ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` and ``redis+cluster://``
    use Redis pub/sub, with
    ``timeout`` (seconds) bounding each publish and ``probe_interval``
    (seconds) between liveness probes; the memory broker ignores both.
    """
    if url.startswith("memory://"):
        from pushsvc.broker.memory import MemoryBroker

        return MemoryBroker.from_url(url)
    if url.startswith(REDIS_SCHEMES):
        from pushsvc.broker.redis import RedisBroker

        return RedisBroker.from_url(url, timeout=timeout, probe_interval=probe_interval)
    raise ValueError(f"broker.url: unsupported scheme in {url!r} (supported: {', '.join(SCHEMES)})")
