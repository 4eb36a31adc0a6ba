"""Pacing spreads bursts of connection work over event-loop passes.

libuv handles every ready socket in one poll phase (up to 48 rounds of
1,024 events before it looks at its timers again), and asyncio runs every
callback that was ready when a pass began. So when 10,000 clients connect
or drop at once, their handshakes (token check, session, ``welcome``) or
their clean-ups (hub, rooms, presence, slots) would all run in one pass:
seconds during which no timer fires and no other connection is served.

A :class:`Pacer` queues that work and runs it in turns of
:data:`TURN_SECONDS` at most, one turn per loop pass: between two turns
the loop runs its timers and its I/O. What a socket callback queues costs
it a deque append (:meth:`Pacer.call`): the parsing, checking and clean-up
happen in the turns. Coroutines run without a Task (:meth:`Pacer.start`,
:meth:`Pacer.run`, driven by a :class:`Stepper`): each runs until it waits,
and when what it waited for is done it is queued again to go on (before the work not started yet, so
started handshakes finish first). So the work after a wait is paced too:
when one store commit answers a thousand handshakes at once, they go on a
turn at a time, not all in the pass after the commit. Queued work starts
in the order it was queued. Frames are paced the same way once a pass
has had its share of them (:meth:`Pacer.busy`: reads after
:data:`PASS_SECONDS`, and frame handlers resumed then, wait for a turn).
One pacer serves every connection of an event loop (:func:`pacer`).

Trade-off: in a burst, a handshake waits for the ones queued before it (a
10,000-connection storm is served at about the same rate, in order, while
the loop stays responsive) instead of all finishing in one long pass; and
each wait of a paced piece costs it one loop pass more than a Task's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pushsvc.transport.perloop import PerLoop

T = TypeVar("T")

log = logging.getLogger("pushsvc.pacing")

#: Longest turn: queued work stops for the pass once this much time went into it.
TURN_SECONDS = 0.005
#: Frames read in one loop pass are handled at once up to this much time into the
#: pass; later reads in the same pass wait for a turn (:meth:`Pacer.busy`).
PASS_SECONDS = 0.020


#: How a :class:`Stepper` reports the end: (result, exception, cancelled).
Settle = Callable[[Any, BaseException | None, bool], None]


def settle_future(
    done: asyncio.Future[Any], value: Any, error: BaseException | None, cancelled: bool
) -> None:
    """A :data:`Settle` that resolves ``done`` as a Task resolves itself (unless cancelled)."""
    if done.cancelled():
        return
    if cancelled:
        done.cancel()
    elif error is not None:
        done.set_exception(error)
    else:
        done.set_result(value)


class Stepper:
    """Drives a started coroutine from future callbacks, as a Task would, without the Task.

    When what the coroutine awaits is done, it goes on at once, or in the
    pacer's next turn when this loop pass is busy (:meth:`Pacer.busy`), or
    always in a turn with ``paced`` (work queued on the pacer). A bare
    ``yield`` (``asyncio.sleep(0)``) goes on from a later loop pass.
    """

    __slots__ = ("coroutine", "paced", "pacer", "settle")

    def __init__(
        self,
        pacer: Pacer,
        coroutine: Coroutine[Any, Any, Any],
        settle: Settle,
        *,
        paced: bool = False,
    ) -> None:
        self.pacer = pacer  # whose turns it may wait for
        self.coroutine = coroutine  # not started yet, or suspended in an ``await``
        self.settle = settle  # called once with the coroutine's result or exception
        self.paced = paced  # go on only in the pacer's turns

    def wait(self, waiting_on: Any) -> None:
        """Go on once ``waiting_on`` (what the coroutine yielded) is done."""
        if waiting_on is None:  # a bare ``yield``
            self.pacer._loop.call_soon(self._woken, None)
            return
        waiting_on._asyncio_future_blocking = False
        waiting_on.add_done_callback(self._woken)

    def _woken(self, _finished: Any) -> None:
        paced = self.pacer
        if self.paced or paced.busy():
            paced.soon(self.go_on)
        else:
            self.go_on()

    def go_on(self) -> None:
        """Send the coroutine on until it waits or ends; its ``await`` gets the result or error."""
        try:
            waiting_on = self.coroutine.send(None)
        except StopIteration as stop:
            self.settle(stop.value, None, False)
            return
        except asyncio.CancelledError:
            self.settle(None, None, True)
            return
        except Exception as error:  # delivered through settle, like a Task
            self.settle(None, error, False)
            return
        self.wait(waiting_on)


class Pacer:
    """Runs queued work a turn per loop pass (one per loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, turn: float = TURN_SECONDS) -> None:
        self._loop = loop  # the loop whose passes it follows
        self.turn = turn  # seconds of work per pass at most (one step at least)
        self._new: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()  # in order
        self._woken: deque[Callable[[], None]] = deque()  # done waiting: they go on first
        self._scheduled = False  # a turn is scheduled on the loop
        self._idle: asyncio.Future[None] | None = None  # resolved once the queues are empty
        self._pass_started: float | None = None  # when this pass's first read was handled
        self.turns = 0  # turns run so far

    def __len__(self) -> int:
        """Work waiting for a turn (not started, or done waiting)."""
        return len(self._new) + len(self._woken)

    def busy(self) -> bool:
        """Whether this loop pass handled reads for :data:`PASS_SECONDS` already.

        Called for each read of frames (cheap: one clock read). After a
        stall (a burst of clients, the process descheduled, a collection)
        libuv hands over every ready socket in one pass; past this share,
        the frames of the rest wait for a turn instead of stretching the pass.
        """
        now = time.monotonic()
        started = self._pass_started
        if started is None:
            self._pass_started = now
            self._loop.call_soon(self._next_pass)
            return False
        return now - started >= PASS_SECONDS

    def _next_pass(self) -> None:
        self._pass_started = None

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)`` (its errors are logged)."""
        self._new.append((function, args))
        self._schedule()

    def start(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Queue ``coroutine``; the future has its result (or error) once it ran.

        Cancelling the future before its turn drops the coroutine unstarted.
        """
        done: asyncio.Future[T] = self._loop.create_future()
        stepper = Stepper(self, coroutine, functools.partial(settle_future, done), paced=True)
        self._new.append((self._begin, (stepper, done)))
        self._schedule()
        return done

    @staticmethod
    def _begin(stepper: Stepper, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            stepper.coroutine.close()
        else:
            stepper.go_on()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coroutine`` now (from a turn) until it waits; it goes on in later turns."""
        done: asyncio.Future[T] = self._loop.create_future()
        Stepper(self, coroutine, functools.partial(settle_future, done), paced=True).go_on()
        return done

    def soon(self, step: Callable[[], None]) -> None:
        """Run ``step`` (work that was waiting and goes on) in the next turn, before new work."""
        self._woken.append(step)
        self._schedule()

    async def drained(self) -> None:
        """Return once nothing waits for a turn (shutdown)."""
        if self._new or self._woken:
            if self._idle is None:
                self._idle = self._loop.create_future()
            await asyncio.shield(self._idle)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        """One turn: run queued work until the turn's time is used up."""
        self.turns += 1
        woken, new = self._woken, self._new
        deadline = time.monotonic() + self.turn
        while woken or new:
            if woken:
                woken.popleft()()
            else:
                function, args = new.popleft()
                try:
                    function(*args)
                except Exception:
                    log.exception("paced work failed")
            if time.monotonic() >= deadline:
                break
        if woken or new:
            self._loop.call_soon(self._run)  # the next pass: timers and I/O run first
            return
        self._scheduled = False
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)


_PACERS: PerLoop[Pacer] = PerLoop(Pacer)


def pacer() -> Pacer:
    """The running loop's pacer."""
    return _PACERS.get()
