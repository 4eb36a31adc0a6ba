"""Keepalive runs the shared timers: heartbeat pings and token expiry.

One timer for all connections instead of one per connection: each ping
round pings every connection and closes the silent ones, and a heap of
token expiry times closes connections whose token ran out with 4001. A
round goes :data:`PING_SLICE` connections per loop pass, so 10,000 idle
connections do not make one 50 ms pass of pings every heartbeat.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from pushsvc.auth.principal import Principal
from pushsvc.protocol.disconnects import DISCONNECTS, Disconnect

#: Heap entries beyond twice the open connections before it is rebuilt.
COMPACT_SLACK = 1024
#: Connections a ping round handles in one loop pass (the rest in the next passes).
PING_SLICE = 500


class Watched(Protocol):
    """A connection as the keepalive sees it."""

    session: str  # unique id
    principal: Principal  # holds the token's expiry
    last_seen: float  # monotonic time of the last frame or pong
    closing: bool  # a close was started

    def ping(self) -> None:
        """Send a protocol-level ping."""
        ...

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection."""
        ...


class Keepalive:
    """Heartbeat and token-expiry timers shared by all connections."""

    def __init__(
        self,
        clients: Callable[[], Iterable[Watched]],
        lookup: Callable[[str], Watched | None],
        heartbeat: float,
        timeout: float,
    ) -> None:
        self.clients = clients  # snapshot of the open connections
        self.lookup = lookup  # session id -> open connection, or None once closed
        self.heartbeat = heartbeat  # seconds between pings
        self.timeout = timeout  # seconds of silence tolerated after a ping
        # (exp, session id) heap; ids, not connections, so closed ones are not kept alive.
        self._expiries: list[tuple[float, str]] = []
        self._next_ping = time.monotonic() + heartbeat  # when the next ping round is due

    def tick_interval(self) -> float:
        """How often :meth:`tick` should run: a quarter heartbeat, at most a second."""
        return min(1.0, self.heartbeat / 4)

    def track_expiry(self, client: Watched) -> None:
        """Schedule a 4001 close when the client's current token expires."""
        expires_at = client.principal.expires_at
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, client.session))

    def tick(self, wall: float | None = None, mono: float | None = None) -> None:
        """Run what is due (call about once a second)."""
        wall = time.time() if wall is None else wall
        mono = time.monotonic() if mono is None else mono
        expiries = self._expiries
        while expiries and expiries[0][0] <= wall:
            _expires_at, session = heapq.heappop(expiries)
            client = self.lookup(session)
            if client is None or client.closing:
                continue
            current = client.principal.expires_at  # an ``auth`` frame may have renewed it
            if current is not None and current <= wall:
                client.close(DISCONNECTS.token_expired)
        if mono >= self._next_ping:
            self._next_ping = mono + self.heartbeat
            silent_after = self.heartbeat + self.timeout
            clients = list(self.clients())
            if len(expiries) > 2 * len(clients) + COMPACT_SLACK:
                self._compact(clients)
            self._ping_round(clients, 0, mono - silent_after)

    def _ping_round(self, clients: list[Watched], start: int, silent_before: float) -> None:
        """Ping ``clients[start:]`` (closing those silent since before ``silent_before``).

        One slice now; the rest from the next loop pass on.
        """
        end = start + PING_SLICE
        for client in clients[start:end]:
            if client.closing:
                continue
            if client.last_seen < silent_before:
                client.close(DISCONNECTS.heartbeat)
            else:
                client.ping()
        if end < len(clients):
            asyncio.get_running_loop().call_soon(self._ping_round, clients, end, silent_before)

    def _compact(self, clients: list[Watched]) -> None:
        """Rebuild the heap from the open connections (entries of closed ones go)."""
        self._expiries = [
            (c.principal.expires_at, c.session) for c in clients if c.principal.expires_at
        ]
        heapq.heapify(self._expiries)

    def reconfigure(self, heartbeat: float, timeout: float) -> None:
        """Apply new heartbeat settings."""
        self.heartbeat, self.timeout = heartbeat, timeout
