"""An in-memory transport: sessions on a real node without sockets (tests, embedding).

It is the proof that a transport is one module: :class:`MemoryConnection`
implements the session's :class:`~pushsvc.core.session.Transport` by
recording what the session writes, and reuses the transport-neutral parts
of :mod:`pushsvc.transport.connection`: :func:`~pushsvc.transport.connection.admit`
(draining, handshake bucket, token, connection caps; the ``headers`` are a
plain mapping) and :class:`~pushsvc.transport.connection.ConnectionBase`'s
lifecycle (``start_session``: session, ``welcome``, ``node.connected``;
``connection_closed``: the close metric, the cap release, ``node.disconnected``).
Nothing in :mod:`pushsvc.core` knows this transport exists.

What differs from the WebSocket engine: frames are written at once, not per
loop pass (no outbox), and a close ends the connection at once (the peer
answers immediately). Broadcasts go through
:meth:`~pushsvc.protocol.frames.Broadcast.wrapped` with :data:`FRAMING`, a
trivial netstring framing that counts its calls, so a test can check that a
room's payload was framed once however many memory connections received it.

Example::

    conn = await open_session(node, token)
    assert conn.welcome["user"] == "alice"
    await conn.receive({"type": "join", "room": "lobby", "ref": "j"})
    assert (await conn.recv_type("reply"))["room"] == "lobby"
    await conn.close()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import orjson

from pushsvc.core.node import Node
from pushsvc.plugin.api import Principal
from pushsvc.protocol.codes import CloseCode
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.protocol.frames import Broadcast
from pushsvc.transport.connection import ConnectionBase, admit
from pushsvc.transport.outbox import flusher
from pushsvc.transport.pacing import pacer

#: The address memory connections report (per-address caps and buckets count it).
MEMORY_ADDRESS = "memory"


class Framing:
    """The memory transport's framing: a netstring (``b"5:hello,"``), counting its calls.

    One instance (:data:`FRAMING`) serves every memory connection: a
    :class:`~pushsvc.protocol.frames.Broadcast` caches by framing function.
    """

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0  # payloads framed so far

    def __call__(self, payload: bytes) -> bytes:
        """Frame ``payload``."""
        self.calls += 1
        return b"%d:%s," % (len(payload), payload)

    @staticmethod
    def unframe(framed: bytes) -> bytes:
        """The payload of one framed message."""
        length, _, rest = framed.partition(b":")
        payload = rest[: int(length)]
        if rest[int(length) :] != b",":
            raise ValueError("not one netstring")
        return payload


FRAMING = Framing()


class MemoryConnection(ConnectionBase):
    """One connection of a session, kept in memory: what it was sent, how it closed.

    ``payloads`` holds every JSON payload in the order written (replies,
    errors and broadcasts alike); :meth:`recv` reads them one by one, and
    :meth:`answer` picks the answer to one ``ref`` out of the unread ones.
    """

    __slots__ = (
        "_arrived",
        "_unread",
        "broadcasts",
        "closes",
        "framed",
        "payloads",
        "pings",
        "welcome",
    )

    def __init__(self, node: Node) -> None:
        self.node = node
        self.session = None  # set by start_session, cleared by connection_closed
        self._reserved = False  # set once admit() reserved a slot for this connection
        self._outbox = None  # unused: frames are written at once
        self._flusher = flusher()  # the running loop's
        self.payloads: list[bytes] = []  # every payload written, in order
        self.broadcasts: list[Broadcast] = []  # the shared payloads among them
        self.framed: list[bytes] = []  # what FRAMING made of each broadcast (shared bytes)
        self.closes: list[tuple[int, str, bool]] = []  # (code, reason, abort) the server sent
        self.pings = 0  # transport pings sent
        self.welcome: dict[str, Any] = {}  # the welcome frame, decoded
        self._unread: list[bytes] = []  # payloads not yet returned by recv or answer
        self._arrived = asyncio.Event()  # set when a payload or the close arrives

    # -- the session's transport --------------------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Record one payload."""
        if self.closes:
            return  # like a WebSocket after its close frame
        self.payloads.append(data)
        self._unread.append(data)
        self._arrived.set()

    def write_broadcast(self, broadcast: Broadcast) -> None:
        """Record a shared payload, framed once per broadcast by :data:`FRAMING`."""
        if self.closes:
            return
        framed = broadcast.wrapped(FRAMING)
        self.broadcasts.append(broadcast)
        self.framed.append(framed)
        payload = Framing.unframe(framed)
        self.payloads.append(payload)
        self._unread.append(payload)
        self._arrived.set()

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Record the close; the connection ends at once (the peer echoes the code)."""
        if self.closes:
            return
        self.closes.append((code, reason, abort))
        self._arrived.set()
        self.connection_closed(None if abort else code, code)

    def send_ping(self) -> None:
        """Count a ping; :meth:`pong` answers it."""
        if not self.closes:
            self.pings += 1

    def flush_outbox(self) -> None:
        """Nothing is ever queued."""

    # -- the peer's side -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection ended (either side closed it)."""
        return self.session is None

    @property
    def close_code(self) -> int | None:
        """The code of the server's close, if it closed the connection."""
        return self.closes[0][0] if self.closes else None

    async def receive(self, frame: Mapping[str, Any] | str | bytes, binary: bool = False) -> None:
        """Hand the session one client frame (a mapping is encoded as JSON) and handle it."""
        session = self.session
        if session is None:
            raise ConnectionError("the memory connection is closed")
        data = frame if isinstance(frame, str | bytes) else orjson.dumps(dict(frame))
        await session.on_frame(data, binary=binary)

    def pong(self) -> None:
        """Answer a ping, as a peer does."""
        if self.session is not None:
            self.session.on_pong()

    async def close(self, code: int = CloseCode.NORMAL) -> None:
        """The client closes: end the session and wait until the node forgot it."""
        self.connection_closed(code, None)
        await pacer().drained()  # the clean-up is paced
        await self.node.settle_background()

    async def wait_closed(self, seconds: float = 5.0) -> int | None:
        """Wait until the server closed the connection and the node forgot it; its code."""
        deadline = time.monotonic() + seconds
        while not self.closes:
            await self._wait(deadline)
        await pacer().drained()  # the clean-up is paced
        await self.node.settle_background()
        return self.close_code

    def messages(self, *types: str) -> list[dict[str, Any]]:
        """Every payload so far, decoded (only ``types`` when given), read or not."""
        decoded = [orjson.loads(payload) for payload in self.payloads]
        return [m for m in decoded if not types or m["type"] in types]

    async def recv(self, seconds: float = 5.0) -> dict[str, Any]:
        """The next unread payload, decoded (waits for it; TimeoutError, ConnectionError)."""
        deadline = time.monotonic() + seconds
        while not self._unread:
            if self.closes:
                raise ConnectionError(f"closed with {self.close_code}")
            await self._wait(deadline)
        message: dict[str, Any] = orjson.loads(self._unread.pop(0))
        return message

    async def recv_type(self, *types: str, seconds: float = 5.0) -> dict[str, Any]:
        """Skip payloads until one of ``types`` arrives."""
        deadline = time.monotonic() + seconds
        while True:
            message = await self.recv(max(0.0, deadline - time.monotonic()))
            if message["type"] in types:
                return message

    async def answer(self, ref: str, seconds: float = 5.0) -> dict[str, Any]:
        """The ``reply`` or ``error`` carrying ``ref``; other unread payloads stay unread."""
        deadline = time.monotonic() + seconds
        scanned = 0  # unread payloads already looked at
        while True:
            unread = self._unread
            for index in range(scanned, len(unread)):
                message: dict[str, Any] = orjson.loads(unread[index])
                if message["type"] in ("reply", "error") and message.get("ref") == ref:
                    del unread[index]
                    return message
            scanned = len(unread)
            if self.closes:
                raise ConnectionError(f"closed with {self.close_code} before answering {ref!r}")
            await self._wait(deadline)

    async def request(self, frame: Mapping[str, Any], seconds: float = 5.0) -> dict[str, Any]:
        """Send ``frame`` (it must carry a ``ref``) and return its answer."""
        await self.receive(frame)
        return await self.answer(str(frame["ref"]), seconds)

    async def _wait(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nothing arrived on the memory connection")
        self._arrived.clear()
        await asyncio.wait_for(self._arrived.wait(), left)


async def open_session(
    node: Node,
    token: str | None,
    *,
    remote_ip: str = MEMORY_ADDRESS,
    headers: Mapping[str, str] | None = None,
) -> MemoryConnection:
    """Admit ``token`` and start a session on ``node``, as the WebSocket upgrade does.

    Raises :class:`~pushsvc.protocol.codes.HandshakeError` for a refusal
    (draining, ``Origin``, handshake rate, token, caps), already counted.
    """
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    principal = await admit(node, all_headers, remote_ip, None)
    return await start(node, principal, remote_ip, reserved=True)


async def start(
    node: Node, principal: Principal, remote_ip: str = MEMORY_ADDRESS, *, reserved: bool = False
) -> MemoryConnection:
    """Start a session for an already admitted ``principal``.

    ``reserved``: ``admit`` reserved a connection slot, released when the connection ends.
    """
    connection = MemoryConnection(node)
    connection._reserved = reserved
    try:
        await connection.start_session(principal, remote_ip)
    except Exception:
        internal = DISCONNECTS.internal
        if connection.session is not None:
            connection.session.close(internal)  # ends it: the slot is released there
        elif reserved:
            await node.hub.release(principal.user, remote_ip)
        raise
    welcome: dict[str, Any] = await connection.recv_type("welcome")
    connection.welcome = welcome
    return connection


__all__ = ["FRAMING", "MEMORY_ADDRESS", "Framing", "MemoryConnection", "open_session", "start"]
