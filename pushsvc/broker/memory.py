"""In-process broker: the default, for a single pushsvc process.

It cannot reach other processes: run one node only with it.

Two delivery modes, chosen by ``broker.url``:

- ``memory://`` (or ``memory://?delivery=sync``): the subscriber's callback
  runs inside ``publish``. The default: no extra loop pass per message.
- ``memory://?delivery=async``: ``publish`` returns first; the envelope goes
  through its wire form (``to_bytes``/``from_bytes``) and is delivered on a
  later loop pass (``loop.call_soon``, so in publish order on every channel),
  as a network broker would. Tests use it to catch code that relies on
  delivery happening inside ``publish``.

Either way a channel must be subscribed both when the envelope is published
and when it is delivered; nothing is delivered after :meth:`close`.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs, urlsplit

from pushsvc.broker.contracts import BrokerStats, Envelope, GapCallback, MessageCallback

log = logging.getLogger("pushsvc.broker")

#: ``delivery=`` values of a ``memory://`` URL.
SYNC = "sync"
ASYNC = "async"


class MemoryBroker:
    """Delivers published envelopes to this process's subscriptions."""

    def __init__(self, delivery: str = SYNC) -> None:
        if delivery not in (SYNC, ASYNC):
            raise ValueError(f"delivery: {delivery!r} is not 'sync' or 'async'")
        self.delivery = delivery  # SYNC: inside publish; ASYNC: on a later loop pass
        self.in_process = delivery == SYNC  # see Broker.in_process
        self._callback: MessageCallback | None = None  # the local hub's entry point
        self._channels: set[str] = set()  # channels with a local subscriber
        self._closed = False  # close() was called: deliver nothing more
        self._gap_callback: GapCallback | None = None  # stored, never called: nothing is lost
        self._received = 0  # envelopes handed to the callback
        self._published = 0  # envelopes published while open

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        """Build from ``memory://[?delivery=sync|async]``; raises ``ValueError``."""
        parts = urlsplit(url)
        if parts.scheme != "memory" or parts.netloc or parts.path or parts.fragment:
            raise ValueError(f"broker.url: expected memory://[?delivery=sync|async], not {url!r}")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        unknown = set(query) - {"delivery"}
        if unknown:
            raise ValueError(f"broker.url: unknown parameter(s) {sorted(unknown)} in {url!r}")
        values = query.get("delivery", [SYNC])
        if len(values) != 1:
            raise ValueError(f"broker.url: delivery given more than once in {url!r}")
        if values[0] not in (SYNC, ASYNC):
            raise ValueError(f"broker.url: delivery must be sync or async, not {values[0]!r}")
        return cls(values[0])

    def set_callback(self, callback: MessageCallback) -> None:
        """Where envelopes for subscribed channels go."""
        self._callback = callback

    def set_gap_callback(self, callback: GapCallback) -> None:
        """Stored and never called: an in-process broker loses nothing while open."""
        self._gap_callback = callback

    def stats(self) -> BrokerStats:
        """Counts of envelopes published and delivered; never an error or a reconnect."""
        return BrokerStats(
            received=self._received,
            published=self._published,
            subscriptions=len(self._channels),
        )

    async def start(self) -> None:
        """Nothing to connect."""
        self._closed = False

    async def close(self) -> None:
        """Deliver nothing more (envelopes still queued are dropped: at most once)."""
        self._closed = True

    def healthy(self) -> bool:
        """Healthy until closed."""
        return not self._closed

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel`` from now on."""
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` (also what was published but not yet delivered)."""
        self._channels.discard(channel)

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Hand ``envelope`` to the local callback if ``channel`` is subscribed."""
        if self._closed:
            return
        self._published += 1
        if channel not in self._channels or self._callback is None:
            return
        if self.delivery == SYNC:
            self._received += 1
            self._callback(channel, envelope)
        else:
            asyncio.get_running_loop().call_soon(self._deliver, channel, envelope.to_bytes())

    def _deliver(self, channel: str, data: bytes) -> None:
        """A later loop pass: deliver if still subscribed and open."""
        if self._closed or channel not in self._channels or self._callback is None:
            return
        self._received += 1
        try:
            self._callback(channel, Envelope.from_bytes(data))
        except Exception:
            log.exception("broker callback failed on %s", channel)
