"""Eager coroutines: run a frame handler synchronously until it really has to wait.

Tornado turns a coroutine ``on_message`` into a Task, which costs a Task and
one event-loop pass per frame even when the handler never waits (a chat
message through the in-process broker). :func:`start` runs the coroutine
right away instead; only if it suspends on an unfinished future does the
rest continue in a Task. Frames already buffered on a socket are then
handled in the same loop pass, and their broadcasts leave in one ``send``
per member (see :mod:`pushsvc.fanout`). Python 3.12's
``asyncio.eager_task_factory`` does the same for every task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """Run ``coroutine`` until it suspends; None when it finished without suspending.

    Exceptions raised before the first suspension propagate to the caller.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_finish(coroutine, waiting_on))


async def _finish(coroutine: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    """Drive a started coroutine to its end, as a Task would."""
    while True:
        try:
            if waiting_on is None:  # a bare ``yield``, as in ``asyncio.sleep(0)``
                await asyncio.sleep(0)
            else:
                waiting_on._asyncio_future_blocking = False
                await asyncio.wait([waiting_on])
        except asyncio.CancelledError as cancelled:
            coroutine.throw(cancelled)
            raise
        try:
            waiting_on = coroutine.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
