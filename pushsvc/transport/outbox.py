"""The outbox: frames queued per connection, written once per event-loop pass.

Under load, several frames for one connection leave in one ``send()``; when
idle, a frame leaves in the same pass it was queued. One :class:`Flusher`
serves every connection of an event loop (:func:`flusher`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pushsvc.transport.perloop import PerLoop


class Outbox(Protocol):
    """A connection with queued frames to write."""

    def flush_outbox(self) -> None:
        """Write everything queued, in order."""
        ...


class Flusher:
    """Writes queued frames once per event-loop pass (one per loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # the loop whose passes it follows
        self._dirty: list[Outbox] = []  # connections with queued frames
        self._scheduled = False  # a flush is scheduled on the loop

    def mark(self, outbox: Outbox) -> None:
        """``outbox`` has frames queued: flush it at the end of this loop pass."""
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame now."""
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for outbox in dirty:
            outbox.flush_outbox()


_FLUSHERS: PerLoop[Flusher] = PerLoop(Flusher)


def flusher() -> Flusher:
    """The running loop's flusher."""
    return _FLUSHERS.get()
