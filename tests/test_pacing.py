"""The pacer spreads bursts over loop passes: bounded turns, order, continuations first.

No timing is asserted: a turn of 0 s runs exactly one piece, so the number
of turns and what ran between them are deterministic. The servers here run
with the pacing at its tightest (every handshake, clean-up and frame burst
waits for a turn) and must behave exactly as without it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET, Server
from pushsvc.transport import pacing
from pushsvc.transport.pacing import Pacer, pacer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from soak import run_round

LIFTED = {"max_connections_per_ip": 10000, "handshake_rate": 10000.0, "handshake_burst": 10000.0}


async def test_a_turn_of_zero_runs_one_piece_and_lets_the_loop_run_between() -> None:
    loop = asyncio.get_running_loop()
    paced = Pacer(loop, turn=0.0)
    seen: list[str] = []
    for n in range(3):
        paced.call(seen.append, f"piece {n}")
    loop.call_soon(seen.append, "the loop")  # queued after the first turn was scheduled
    assert len(paced) == 3
    while len(paced):
        await asyncio.sleep(0)
    assert seen == ["piece 0", "the loop", "piece 1", "piece 2"]
    assert paced.turns == 3


async def test_coroutines_give_their_result_and_go_on_before_new_work() -> None:
    loop = asyncio.get_running_loop()
    paced = Pacer(loop, turn=0.0)
    gate: asyncio.Future[int] = loop.create_future()
    seen: list[str] = []

    async def waiting() -> int:
        seen.append("started")
        value = await gate
        seen.append("went on")
        return value + 1

    async def failing() -> None:
        raise ValueError("boom")

    result = paced.start(waiting())
    failed = paced.start(failing())
    await asyncio.sleep(0)  # the first turn: ``waiting`` starts and waits
    assert seen == ["started"]
    gate.set_result(41)
    paced.call(seen.append, "new work")  # queued before the continuation is woken
    assert await result == 42
    assert seen[:2] == ["started", "went on"]
    with pytest.raises(ValueError, match="boom"):
        await failed
    await paced.drained()
    assert seen == ["started", "went on", "new work"] and not len(paced)


async def test_cancelled_before_its_turn_never_starts_and_errors_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    paced = Pacer(asyncio.get_running_loop(), turn=0.0)
    started: list[int] = []

    async def piece() -> None:
        started.append(1)

    def broken() -> None:
        raise RuntimeError("a bug")

    future = paced.start(piece())
    future.cancel()
    paced.call(broken)
    paced.call(started.append, 2)
    await paced.drained()
    assert started == [2]  # the cancelled one never ran; the bug did not stop the rest
    assert "paced work failed" in caplog.text


async def test_busy_once_a_pass_has_had_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    paced = Pacer(asyncio.get_running_loop())
    assert not paced.busy()  # the pass's first read
    monkeypatch.setattr(pacing, "PASS_SECONDS", 0.0)
    assert paced.busy()
    await asyncio.sleep(0)  # a new pass
    assert not paced.busy()


async def test_a_handshake_burst_is_admitted_a_turn_at_a_time(start_server: Any) -> None:
    server: Server = await start_server(ratelimit=LIFTED)
    paced = pacer()
    paced.turn = 0.0  # one step per turn
    before = paced.turns
    clients = await asyncio.gather(*(server.connect(f"burst-{n}") for n in range(20)))
    assert all(client.welcome["type"] == "welcome" for client in clients)
    assert paced.turns - before >= 20  # each handshake had a turn of its own at least
    for client in clients:
        client.close()


@pytest.mark.timeout(120)
async def test_rounds_with_the_tightest_pacing_leave_nothing_behind(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read after a pass's first, every resumed handler, every handshake and
    clean-up waits for a one-step turn: the clients see no difference."""
    server: Server = await start_server(ratelimit=LIFTED)
    monkeypatch.setattr(pacing, "PASS_SECONDS", 0.0)
    paced = pacer()
    paced.turn = 0.0
    for _ in range(2):
        stats = await run_round(server.port, 30, rooms=3, secret=SECRET)
        assert not stats.errors, stats.errors
        assert stats.connected == stats.chats_received == stats.notifications_acked == 30
    await paced.drained()
    hub = server.node.hub
    for _ in range(100):
        if not (hub.sessions or hub.rooms or hub.reserved_users or hub.users):
            break
        await asyncio.sleep(0.05)
    assert not (hub.sessions or hub.rooms or hub.reserved_users or hub.users)
    assert paced.turns > 0
