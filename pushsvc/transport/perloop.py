"""One object per event loop, made on first use: the outbox's flusher and the pacer.

Looked up on hot paths (every queued frame, every read), so the one found
last is kept beside the weak dictionary: a process runs one loop at a time.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """``factory(loop)`` once per event loop; :meth:`get` finds the running loop's."""

    __slots__ = ("_by_loop", "_factory", "_last")

    def __init__(self, factory: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._factory = factory  # makes a loop's object
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None

    def get(self) -> T:
        """The running loop's object (made now if it has none yet)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        found = self._by_loop.get(loop)
        if found is None:
            found = self._by_loop[loop] = self._factory(loop)
        self._last = (weakref.ref(loop), found)
        return found
