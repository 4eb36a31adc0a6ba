#!/usr/bin/env python3
"""bench/loopprobe.py - ``pushsvc serve`` with a fine event-loop probe (used by bench/soak.py).

The service's own monitor (``pushsvc_event_loop_lag_seconds``) fires a
timer every 0.5 s: two samples a second, and a late timer cannot say
whether the loop was busy with the server's own work or waiting for a CPU
another process held. This wrapper runs the same ``pushsvc serve`` and adds,
on its event loop, a timer every millisecond that records each *gap*
between two firings longer than :data:`RECORD_ABOVE` together with the
process CPU time and the loop thread's CPU time (``time.thread_time()``)
spent in it. Pinned to one core (``taskset -c 0``), the process CPU of a gap
is the server's own work in it (the loop and its threads); the rest of the
gap is time the core ran something else. Every garbage collection is
recorded too (``gc.callbacks``); ``--gc0 N`` runs the server with a
generation-0 threshold of N instead of ``pushsvc.cli.GC_GEN0_THRESHOLD``.

Lines written to OUT (flushed every second, so the file is complete up to
the last second when the server is killed)::

    G <monotonic> <gap s> <process cpu s> <loop thread cpu s>
    C <monotonic> <generation> <seconds> <objects collected>

``--attribute`` also times the callbacks that do the server's work
(:data:`ATTRIBUTED`: socket reads, handshakes, flushes, paced turns, store
answers, timers, HTTP requests) and writes, for each gap longer than
:data:`ATTRIBUTE_ABOVE`, where its time went::

    A <monotonic> <gap s> <name>=<s> <name>=<s> ... (the rest: uvloop, tasks)

``--stacks FILE`` also samples the loop thread's stack (every 2 ms, from a
thread) while the loop has not fired for more than 10 ms, and writes the
stacks folded (``outer;...;inner count``) to FILE every 5 s: what the long
passes do. It takes the GIL from the loop during long passes, so leave it
off for figures.

Usage (the arguments after ``--`` are pushsvc's)::

    python bench/loopprobe.py OUT [--stacks FILE] -- serve --port 8888 ...
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import sys
import threading
import time
from collections import Counter
from typing import Any

#: Seconds between the probe's firings.
PERIOD = 0.001
#: Gaps (seconds between two firings) longer than this are written out.
RECORD_ABOVE = 0.002
#: Gaps longer than this get an ``A`` line with ``--attribute``.
ATTRIBUTE_ABOVE = 0.020
#: ``module:qualified name`` of the callbacks ``--attribute`` times.
ATTRIBUTED = (
    "pushsvc.transport.upgrade:FirstRequest.connection_made",
    "pushsvc.transport.upgrade:FirstRequest.data_received",
    "pushsvc.transport.upgrade:FirstRequest.connection_lost",
    "pushsvc.transport.websocket:WireConnection.data_received",
    "pushsvc.transport.websocket:WireConnection.connection_lost",
    "pushsvc.transport.websocket:WireConnection.resume_writing",
    "pushsvc.transport.websocket:WireConnection._handled",
    "pushsvc.transport.outbox:Flusher.flush",
    "pushsvc.transport.pacing:Pacer._run",
    "pushsvc.transport.pacing:Stepper._woken",
    "pushsvc.store.sqlite:SqliteStore._settle_all",
    "pushsvc.store.sqlite:SqliteStore._hand_over",
    "pushsvc.core.keepalive:Keepalive.tick",
    "pushsvc.delivery.tracker:Delivery.tick",
    "pushsvc.app:Service._prune",
    "pushsvc.http.health:MetricsHandler.get",
    "tornado.web:RequestHandler._execute",
)
#: The stack sampler looks at the loop thread once the loop has not fired for this long.
STACK_AFTER = 0.010


class Probe:
    """The 1 ms timer, the GC callback and (optionally) the stack sampler."""

    def __init__(self, out: str, stacks: str | None) -> None:
        self.out = open(out, "a", buffering=1 << 16)  # noqa: SIM115 - open for the process
        self.stacks_path = stacks
        self.lines: list[str] = []
        self.stacks: Counter[str] = Counter()
        self.last = (time.monotonic(), time.process_time(), time.thread_time())
        self.next_flush = self.last[0] + 1.0
        self.gc_started = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.spent: dict[str, float] = {}  # callback -> seconds since the last firing
        atexit.register(self.flush)

    def attribute(self) -> None:
        """Time the :data:`ATTRIBUTED` callbacks (before the server starts)."""
        import importlib

        for target in ATTRIBUTED:
            module_name, _, qualified = target.partition(":")
            owner: Any = importlib.import_module(module_name)
            *path, name = qualified.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, self._timed(qualified, getattr(owner, name)))

    def _timed(self, name: str, function: Any) -> Any:
        spent = self.spent
        clock = time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + clock() - started

        return timed

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start on ``loop`` (from the loop's thread)."""
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.last = (time.monotonic(), time.process_time(), time.thread_time())
        gc.callbacks.append(self._gc)
        loop.call_later(PERIOD, self._tick)
        if self.stacks_path:
            threading.Thread(target=self._sample, name="loopprobe-stacks", daemon=True).start()

    def _tick(self) -> None:
        wall, cpu, thread = time.monotonic(), time.process_time(), time.thread_time()
        last_wall, last_cpu, last_thread = self.last
        gap = wall - last_wall
        if gap > RECORD_ABOVE:
            self.lines.append(
                f"G {wall:.6f} {gap:.6f} {cpu - last_cpu:.6f} {thread - last_thread:.6f}\n"
            )
        if self.spent:
            if gap > ATTRIBUTE_ABOVE:
                parts = " ".join(
                    f"{name}={seconds:.4f}"
                    for name, seconds in sorted(self.spent.items(), key=lambda i: -i[1])
                )
                self.lines.append(f"A {wall:.6f} {gap:.6f} {parts}\n")
            self.spent.clear()
        self.last = (wall, cpu, thread)
        if wall >= self.next_flush:
            self.next_flush = wall + 1.0
            self.flush()
        assert self.loop is not None
        self.loop.call_later(PERIOD, self._tick)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.gc_started = time.monotonic()
            return
        now = time.monotonic()
        seconds = now - self.gc_started
        self.lines.append(f"C {now:.6f} {info['generation']} {seconds:.6f} {info['collected']}\n")

    def flush(self) -> None:
        """Write what was recorded (every second, and at exit)."""
        lines, self.lines = self.lines, []
        if lines:
            self.out.write("".join(lines))
            self.out.flush()

    def _sample(self) -> None:
        written = time.monotonic()
        while True:
            time.sleep(0.002)
            now = time.monotonic()
            if now - self.last[0] > STACK_AFTER:
                frame = sys._current_frames().get(self.loop_thread)
                names: list[str] = []
                while frame is not None:
                    code = frame.f_code
                    module = code.co_filename.rsplit("/", 2)
                    names.append(f"{'/'.join(module[-2:])}:{code.co_name}")
                    frame = frame.f_back
                self.stacks[";".join(reversed(names))] += 1
            if now - written > 5.0 and self.stacks_path:
                written = now
                with open(self.stacks_path, "w") as handle:
                    for stack, count in self.stacks.most_common():
                        handle.write(f"{stack} {count}\n")


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="where the gaps and collections go")
    parser.add_argument("--stacks", default=None, help="sample long passes' stacks to FILE")
    parser.add_argument("--attribute", action="store_true", help="time the server's callbacks")
    parser.add_argument("--gc0", type=int, default=0, help="generation-0 GC threshold")
    args = parser.parse_args(argv[:split])
    probe = Probe(args.out, args.stacks)
    if args.attribute:
        probe.attribute()

    from pushsvc import app, cli

    if args.gc0:
        cli.GC_GEN0_THRESHOLD = args.gc0

    start_timers = app.Service.start_timers

    def start_timers_and_probe(self: app.Service) -> None:
        start_timers(self)
        probe.install(asyncio.get_running_loop())

    app.Service.start_timers = start_timers_and_probe  # type: ignore[method-assign]
    return cli.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
