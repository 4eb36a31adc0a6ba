"""Eager coroutines: run a frame handler synchronously until it really has to wait.

Tornado turns a coroutine ``on_message`` into a Task, which costs a Task and
one event-loop pass per frame even when the handler never waits (a chat
message through the in-process broker). :func:`start` runs the coroutine
right away instead. Frames already buffered on a socket are then handled in
the same loop pass, and their broadcasts leave in one ``send`` per member
(see :mod:`pushsvc.transport.outbox`). When the coroutine does wait (a store write),
a :class:`~pushsvc.transport.pacing.Stepper` resumes it from the awaited
future's callback - what a Task does, without the Task. Python 3.12's
``asyncio.eager_task_factory`` is the same idea for every task.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, TypeVar

from pushsvc.transport.pacing import Pacer, Settle, Stepper, pacer, settle_future

T = TypeVar("T")


def start(coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T] | None:
    """Run ``coroutine`` until it suspends; None when it finished without suspending.

    Otherwise returns a future for its result. Exceptions raised before the
    first suspension propagate to the caller.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    Stepper(pacer(), coroutine, functools.partial(settle_future, done)).wait(waiting_on)
    return done


def run(coroutine: Coroutine[Any, Any, Any], finished: Settle, paced: Pacer | None = None) -> bool:
    """Run ``coroutine`` until it suspends; True when it finished without suspending.

    Otherwise ``finished(value, error, cancelled)`` (a
    :data:`~pushsvc.transport.pacing.Settle`) is called directly from the step
    that ends it: no future and no extra loop callback per suspended frame,
    which :func:`start` costs.
    Exceptions raised before the first suspension propagate to the caller.
    After a commit that answers hundreds of waiting frames at once, they go
    on a turn at a time (:mod:`pushsvc.transport.pacing`): ``paced``, the running
    loop's pacer (looked up when not given).
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return True
    if paced is None:  # not ``paced or``: an idle pacer is falsy (its len() is 0)
        paced = pacer()
    Stepper(paced, coroutine, finished).wait(waiting_on)
    return False
