"""The broadcast path: one encoded frame to many connections, coalesced per loop pass.

Every fan-out in pushsvc (rooms, users, presence) goes through
:func:`send_to_all`. The JSON is encoded once by the caller and the
WebSocket frame is built once here (server frames are unmasked and
uncompressed, so the bytes are the same for every member). Frames are queued
per connection and written by :class:`Flusher` once per event-loop pass:
under load, several frames leave in one ``send()``; when idle, a frame leaves
in the same pass it was queued.

Trade-off, as plainly as websockets puts it for its ``broadcast()``: there is
no backpressure towards the publisher. A member whose unsent buffer passes
``server.max_buffer_bytes`` is closed as a slow consumer (4008) instead of
growing memory; the others are not slowed down by it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from pushsvc.transport import tornado_compat


class Sink(Protocol):
    """A connection as the broadcast path sees it."""

    def send(self, data: bytes, kind: str) -> None:
        """Write ``data`` (JSON) as one text frame; ``kind`` labels metrics."""
        ...

    def send_framed(self, frame: bytes) -> bool:
        """Queue an already framed message; False when the connection is closing."""
        ...


class Outbox(Protocol):
    """A connection with queued frames to write."""

    def flush_outbox(self) -> None:
        """Write everything queued, in order."""
        ...


def send_to_all(clients: Iterable[Sink], data: bytes, kind: str) -> int:
    """Write the same message to every client; returns how many took it.

    The caller counts metrics once for the whole broadcast.
    """
    frame = tornado_compat.text_frame(data)
    sent = 0
    for client in list(clients):
        sent += client.send_framed(frame)
    return sent


class Flusher:
    """Writes queued frames once per event-loop pass (one per node)."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []  # connections with queued frames
        self._scheduled = False  # a flush is scheduled on the loop

    def mark(self, outbox: Outbox) -> None:
        """``outbox`` has frames queued: flush it at the end of this loop pass."""
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame now."""
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for outbox in dirty:
            outbox.flush_outbox()
