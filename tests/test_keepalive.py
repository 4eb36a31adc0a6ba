"""The shared keepalive timer with a fake clock: pings, silence, token expiry, memory."""

from __future__ import annotations

import asyncio
import dataclasses

from pushsvc.core.keepalive import COMPACT_SLACK, PING_SLICE, Keepalive
from pushsvc.plugin.api import Principal
from pushsvc.protocol.disconnects import Disconnect


@dataclasses.dataclass
class FakeConnection:
    session: str
    principal: Principal
    last_seen: float = 0.0
    closing: bool = False
    pings: int = 0
    closed_with: int | None = None

    def ping(self) -> None:
        self.pings += 1

    def close(self, disconnect: Disconnect) -> None:
        self.closing, self.closed_with = True, disconnect.code


def principal(exp: float | None) -> Principal:
    return Principal("u", None, frozenset(), None, exp)


def make(*connections: FakeConnection) -> tuple[Keepalive, dict[str, FakeConnection]]:
    live = {c.session: c for c in connections}
    keepalive = Keepalive(lambda: list(live.values()), live.get, heartbeat=10, timeout=5)
    for connection in connections:
        keepalive.track_expiry(connection)
    return keepalive, live


def test_token_expiry_closes_4001_unless_renewed() -> None:
    expiring = FakeConnection("a", principal(100.0))
    renewed = FakeConnection("b", principal(100.0))
    forever = FakeConnection("c", principal(None))
    keepalive, _ = make(expiring, renewed, forever)
    renewed.principal = principal(500.0)  # an ``auth`` frame replaced the token
    keepalive.track_expiry(renewed)
    keepalive.tick(wall=99.0, mono=0.0)
    assert expiring.closed_with is None
    keepalive.tick(wall=100.0, mono=0.0)
    assert (expiring.closed_with, renewed.closed_with, forever.closed_with) == (4001, None, None)
    keepalive.tick(wall=500.0, mono=0.0)
    assert renewed.closed_with == 4001


def test_pings_and_silent_peers() -> None:
    talking = FakeConnection("a", principal(None), last_seen=0.0)
    silent = FakeConnection("b", principal(None), last_seen=0.0)
    keepalive, _ = make(talking, silent)
    start = keepalive._next_ping
    talking.last_seen = silent.last_seen = start - 1
    keepalive.tick(wall=0.0, mono=start)
    assert talking.pings == silent.pings == 1
    talking.last_seen = start + 1  # it answered
    keepalive.tick(wall=0.0, mono=start + 16)  # next round: 16 s of silence > 10 + 5
    assert talking.closed_with is None and talking.pings == 2
    assert silent.closed_with == 4009


def test_closed_connections_are_not_kept() -> None:
    keepalive, live = make()
    for i in range(3 * COMPACT_SLACK):
        connection = FakeConnection(str(i), principal(10_000.0))
        live[connection.session] = connection
        keepalive.track_expiry(connection)
        del live[connection.session]  # closed again at once (churn)
    assert len(keepalive._expiries) == 3 * COMPACT_SLACK
    keepalive.tick(wall=0.0, mono=keepalive._next_ping)
    assert keepalive._expiries == []  # rebuilt from the open connections


async def test_a_big_ping_round_goes_a_slice_per_loop_pass() -> None:
    connections = [FakeConnection(str(n), principal(None)) for n in range(2 * PING_SLICE + 1)]
    keepalive, _ = make(*connections)
    start = keepalive._next_ping
    for connection in connections:
        connection.last_seen = start
    keepalive.tick(wall=0.0, mono=start)
    assert sum(c.pings for c in connections) == PING_SLICE  # the first slice, now
    await asyncio.sleep(0)
    assert sum(c.pings for c in connections) == 2 * PING_SLICE
    await asyncio.sleep(0)
    assert all(c.pings == 1 for c in connections)
