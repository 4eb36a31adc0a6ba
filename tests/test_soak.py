"""A short soak in the suite: rounds of clients come and go; nothing stays behind.

``bench/soak.py`` is the long version (rounds of 1,000 clients against a
``pushsvc serve`` process, a reconnect storm; figures in docs/performance.md).
Here a few rounds run against an in-process server, so that the node's own
structures can be checked: sessions, users, rooms, connection reservations,
delivery state, asyncio tasks and timers, open file descriptors.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET, Server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from soak import run_round

ROUNDS, CLIENTS = 3, 40


def footprint(server: Server) -> dict[str, int]:
    hub = server.node.hub
    loop = asyncio.get_running_loop()
    return {
        "sessions": len(hub.sessions),
        "users": len(hub.users),
        "rooms": len(hub.rooms),
        "reserved_users": len(hub.reserved_users),
        "reserved_ips": len(hub.reserved_ips),
        "tasks": len(asyncio.all_tasks()),
        # asyncio's loop (uvloop has none); cancelled handles leave it lazily
        "timers": sum(not t.cancelled() for t in getattr(loop, "_scheduled", ())),
        "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0,
    }


async def settled(server: Server, baseline: dict[str, int], seconds: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    while True:
        now = footprint(server)
        if all(now[key] <= baseline[key] + margin(key) for key in now):
            return now
        if time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


def timers() -> dict[str, int]:
    """The loop's scheduled callbacks by name (asyncio's loop), for a failure's message."""
    scheduled = getattr(asyncio.get_running_loop(), "_scheduled", ())
    return dict(Counter(f"{getattr(t._callback, '__qualname__', t._callback)}"
                        f"{' (cancelled)' if t.cancelled() else ''}" for t in scheduled))  # fmt: skip


def margin(key: str) -> int:
    """Tolerated growth: a few tasks and timers come and go with the shared timers."""
    return {"tasks": 3, "timers": 5, "fds": 2}.get(key, 0)


@pytest.mark.timeout(120)
async def test_rounds_of_clients_leave_nothing_behind(start_server: Any) -> None:
    server: Server = await start_server(
        ratelimit={"max_connections_per_ip": 10000, "handshake_rate": 10000.0,
                   "handshake_burst": 10000.0},
    )  # fmt: skip
    warm = await run_round(server.port, 10, secret=SECRET)
    assert not warm.errors, warm.errors
    baseline = await settled(server, footprint(server))
    for _ in range(ROUNDS):
        stats = await run_round(server.port, CLIENTS, rooms=4, secret=SECRET)
        assert not stats.errors, stats.errors
        assert stats.connected == stats.notifications_acked == CLIENTS
        assert stats.clean_closes == stats.drops == CLIENTS // 2
    after = await settled(server, baseline)
    grown = {
        key: (baseline[key], after[key])
        for key in after
        if after[key] > baseline[key] + margin(key)
    }
    assert not grown, (grown, timers())
    assert not server.node.hub.sessions and not server.node.hub.rooms
    pending = server.node.metrics.registry.get_sample_value("pushsvc_pending_messages")
    assert not pending  # every notification was acked
    lag = server.node.metrics.loop_lag
    assert lag is not None
