"""In-process broker: the default, for a single pushsvc process.

It cannot reach other processes: run one node only with it.
"""

from __future__ import annotations

from pushsvc.broker import Envelope, MessageCallback


class MemoryBroker:
    """Delivers published envelopes to this process's subscriptions, synchronously."""

    def __init__(self) -> None:
        self._callback: MessageCallback | None = None  # the local hub's entry point
        self._channels: set[str] = set()  # channels with a local subscriber

    def set_callback(self, callback: MessageCallback) -> None:
        """Where envelopes for subscribed channels go."""
        self._callback = callback

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to release."""

    def healthy(self) -> bool:
        """Always healthy."""
        return True

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel`` from now on."""
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``."""
        self._channels.discard(channel)

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Hand ``envelope`` to the local callback if ``channel`` is subscribed."""
        if channel in self._channels and self._callback is not None:
            self._callback(channel, envelope)
