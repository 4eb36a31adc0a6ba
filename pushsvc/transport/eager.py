"""Eager coroutines: run a frame handler synchronously until it really has to wait.

Tornado turns a coroutine ``on_message`` into a Task, which costs a Task and
one event-loop pass per frame even when the handler never waits (a chat
message through the in-process broker). :func:`start` runs the coroutine
right away instead. Frames already buffered on a socket are then handled in
the same loop pass, and their broadcasts leave in one ``send`` per member
(see :mod:`pushsvc.transport.outbox`). When the coroutine does wait (a store write),
a small :class:`_Stepper` resumes it from the awaited future's callback -
what a Task does, without the Task. Python 3.12's
``asyncio.eager_task_factory`` is the same idea for every task.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pushsvc.transport.pacing import pacer

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
    _Stepper(coroutine, functools.partial(_settle, done)).wait(waiting_on)
    return done


def run(coroutine: Coroutine[Any, Any, Any], finished: Finished) -> bool:
    """Run ``coroutine`` until it suspends; True when it finished without suspending.

    Otherwise ``finished(error)`` is called, directly from the step that ends
    it, with its exception (None for a result or a cancellation): no future
    and no extra loop callback per suspended frame, which :func:`start` costs.
    Exceptions raised before the first suspension propagate to the caller.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return True
    _Stepper(coroutine, lambda _value, error, _cancelled: finished(error)).wait(waiting_on)
    return False


#: What :func:`run` calls when a suspended coroutine ended: its exception or None.
Finished = Callable[[BaseException | None], None]
#: How a :class:`_Stepper` reports the end: (result, exception, cancelled).
_Settle = Callable[[Any, BaseException | None, bool], None]


def _settle(
    done: asyncio.Future[Any], value: Any, error: BaseException | None, cancelled: bool
) -> None:
    if done.cancelled():
        return
    if cancelled:
        done.cancel()
    elif error is not None:
        done.set_exception(error)
    else:
        done.set_result(value)


class _Stepper:
    """Drives a started coroutine from future callbacks, as a Task would."""

    __slots__ = ("coroutine", "settle")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], settle: _Settle) -> None:
        self.coroutine = coroutine  # suspended inside an ``await``
        self.settle = settle  # called once with the coroutine's result or exception

    def wait(self, waiting_on: Any) -> None:
        """Resume the coroutine once ``waiting_on`` (what it yielded) is done."""
        if waiting_on is None:  # a bare ``yield``, as in ``asyncio.sleep(0)``
            asyncio.get_running_loop().call_soon(self.step, None)
            return
        waiting_on._asyncio_future_blocking = False
        waiting_on.add_done_callback(self.step)

    def step(self, _finished: Any) -> None:
        """Send the coroutine on, or in the pacer's next turn when this pass is busy.

        After a store commit that answers hundreds of waiting frames at
        once, they go on a turn at a time (:mod:`pushsvc.transport.pacing`).
        """
        paced = pacer()
        if paced.busy():
            paced.soon(self._go_on)
            return
        self._go_on()

    def _go_on(self) -> None:
        """Send the coroutine on; its ``await`` picks up the future's result or error."""
        try:
            waiting_on = self.coroutine.send(None)
        except StopIteration as stop:
            self.settle(stop.value, None, False)
            return
        except asyncio.CancelledError:
            self.settle(None, None, True)
            return
        except Exception as error:  # delivered through the future, like a Task
            self.settle(None, error, False)
            return
        self.wait(waiting_on)
