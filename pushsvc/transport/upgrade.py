"""Upgrade turns a connection into a pushsvc WebSocket: one engine for every ``/ws``.

The first request on every connection is read here. A WebSocket upgrade of
``/ws`` is checked with :func:`~pushsvc.transport.connection.admit` and
answered with ``101`` (or the refusal's status and JSON body); the socket
then leaves Tornado and lives as a :class:`FastConnection` on an asyncio
transport (:mod:`pushsvc.transport.websocket`) - no RequestHandler, no
HTTP1Connection, no IOStream, no request object kept per connection.
Anything else goes back, unread, to Tornado's HTTP server (the HTTP API,
metrics, plugin routes).

An upgrade that reaches Tornado anyway - sent later on a keep-alive
connection, or on any connection when the internal the hand-over needs is
missing and Tornado accepts every connection - is served by
:class:`UpgradeHandler`: the same checks, then the socket is detached from
Tornado and becomes the same :class:`FastConnection`. Tornado serves HTTP
only; every WebSocket has the same engine and the same bounds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketProtocol13

from pushsvc.core.node import Node
from pushsvc.ops import logs
from pushsvc.plugin.api import Principal
from pushsvc.protocol.codes import HandshakeError, retry_after_header
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.transport import tornado_compat
from pushsvc.transport.connection import admit
from pushsvc.transport.pacing import pacer
from pushsvc.transport.websocket import WireConnection

log = logging.getLogger("pushsvc.upgrade")

WEBSOCKET_PATH = "/ws"
_UPGRADE_START = b"GET " + WEBSOCKET_PATH.encode()
_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


class Headers(dict[str, str]):
    """Request headers with case-insensitive ``get`` (keys stored lower-case)."""

    def get(self, name: str, default: Any = None) -> Any:
        """The header's value, whatever the case of ``name``."""
        return super().get(name.lower(), default)


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A parsed ``GET /ws`` WebSocket upgrade."""

    target: str  # path and query, as sent
    headers: Headers  # lower-case names
    key: str  # Sec-WebSocket-Key
    token: str | None  # the access_token query parameter


def parse_upgrade(head: bytes) -> UpgradeRequest | None:
    """Parse a request head; None unless it is a version-13 upgrade of ``/ws``."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
        return None
    path, _, query = parts[1].partition("?")
    if path != WEBSOCKET_PATH:
        return None
    headers = Headers()
    for line in lines[1:]:
        if not line:
            continue  # the blank line that ends the head
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None  # let Tornado answer malformed heads
        headers[name.lower()] = value.strip()
    connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    key = headers.get("Sec-WebSocket-Key")
    if (
        headers.get("Upgrade", "").lower() != "websocket"
        or "upgrade" not in connection
        or headers.get("Sec-WebSocket-Version") != "13"
        or not key
    ):
        return None
    token = None
    if query:
        for name, value in urllib.parse.parse_qsl(query):
            if name == "access_token":
                token = value
    return UpgradeRequest(parts[1], headers, key, token)


def head_end(buffer: bytes, limit: int) -> int:
    """Where the request head in ``buffer[:limit]`` ends (after its blank line), or -1.

    The blank line is ``\\n\\n`` or ``\\n\\r\\n`` (``\\r\\n`` line ends or bare
    ``\\n``), whichever comes first: two ``bytes.find`` instead of a regular
    expression, a twentieth of the cost on a 400-byte head.
    """
    bare = buffer.find(b"\n\n", 0, limit)
    crlf = buffer.find(b"\n\r\n", 0, limit)
    if crlf < 0:
        return -1 if bare < 0 else bare + 2
    if bare < 0 or crlf < bare:
        return crlf + 3
    return bare + 2


class UpgradeServer(tornado.httpserver.HTTPServer):
    """An ``HTTPServer`` whose connections' first request may become a fast WebSocket.

    With :meth:`listen_fast`, the event loop accepts the connections itself
    (:class:`FirstRequest` reads the first request head); without it, or
    without the Tornado internals, this is Tornado's ``HTTPServer``.

    Every request head, the first one (read by :class:`FirstRequest`) and
    each later one on a keep-alive connection (read by Tornado), has the
    same bounds: ``idle_connection_timeout`` seconds from the accept or from
    the end of the previous response, and ``max_header_size`` bytes. Over
    either, the connection is closed without an answer.
    """

    node: Node | None = None  # set by pushsvc.app before listening

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_servers: list[asyncio.AbstractServer] = []

    async def listen_fast(self, sockets: list[socket.socket], backlog: int) -> None:
        """Accept on ``sockets`` with the event loop's own servers (Tornado's otherwise)."""
        if self.node is None or not tornado_compat.INTERNALS_OK:
            self.add_sockets(sockets)  # Tornado accepts; /ws still reaches UpgradeHandler
            return
        loop = asyncio.get_running_loop()
        for listener in sockets:
            server = await loop.create_server(
                lambda: FirstRequest(self), sock=listener, backlog=backlog
            )
            self._fast_servers.append(server)

    def stop(self) -> None:
        """Stop listening (connections already accepted go on)."""
        for server in self._fast_servers:
            server.close()
        self._fast_servers = []
        super().stop()

    @property
    def head_timeout(self) -> float:
        """Seconds a connection has to send a complete request head."""
        return float(self.conn_params.header_timeout or 3600)

    @property
    def max_head_bytes(self) -> int:
        """Longest request head; a longer one drops the connection."""
        return int(self.conn_params.max_header_size)

    def hand_over(self, transport: asyncio.Transport, head: bytes) -> None:
        """Give an accepted connection, ``head`` read already, to Tornado's HTTP stack."""
        peer = transport.get_extra_info("peername")
        try:
            sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        except (OSError, AttributeError):  # gone already, or a transport without a socket
            transport.abort()
            return
        transport.abort()  # closes our descriptor only: the duplicate keeps the connection
        stream = IOStream(sock, max_buffer_size=self.max_buffer_size,
                          read_chunk_size=self.read_chunk_size)  # fmt: skip
        tornado_compat.push_back(stream, head)
        super().handle_stream(stream, peer if isinstance(peer, tuple) else ("",))

    def upgrade_later(self, transport: asyncio.Transport, buffer: bytes, end: int) -> None:
        """Parse the head ``buffer[:end]`` and admit the upgrade in its turn.

        Paced (:mod:`pushsvc.transport.pacing`): in this loop pass unless a
        burst of handshakes is queued before it. A head that is no upgrade
        of ``/ws`` after all goes to Tornado then.
        """
        pacer().start(self._upgrade(transport, buffer, end)).add_done_callback(_report)

    async def _upgrade(self, transport: asyncio.Transport, buffer: bytes, end: int) -> None:
        """Admit a ``/ws`` upgrade and run it as a :class:`FastConnection`."""
        assert self.node is not None
        if transport.is_closing():  # the peer left while the handshake waited its turn
            return
        request = parse_upgrade(buffer[:end])
        if request is None:
            self.hand_over(transport, buffer)
            return
        peer = transport.get_extra_info("peername")
        remote_ip = self._remote_ip(peer if isinstance(peer, tuple) else (), request)
        await FastConnection.accept(self.node, transport, request, remote_ip, buffer[end:])

    def _remote_ip(self, address: tuple[Any, ...], request: UpgradeRequest) -> str:
        ip = str(address[0]) if address and address[0] else "local"  # unix socket
        if not self.xheaders:
            return ip
        forwarded = request.headers.get("X-Forwarded-For", ip)
        for candidate in (part.strip() for part in reversed(forwarded.split(","))):
            if candidate not in (self.trusted_downstream or ()):
                forwarded = candidate
                break
        real = request.headers.get("X-Real-Ip", forwarded)
        return str(real) if tornado.netutil.is_valid_ip(real) else ip


class FirstRequest(asyncio.Protocol):
    """Reads a new connection's first request head, then hands the connection on.

    A ``/ws`` upgrade becomes a :class:`FastConnection` on the same
    transport; anything else goes, unread, to Tornado. A head longer than
    the server's ``max_head_bytes`` or slower than its ``head_timeout`` drops
    the connection (the same bounds as Tornado's for later requests).
    """

    __slots__ = ("_buffer", "_deadline", "_server", "_transport")

    def __init__(self, server: UpgradeServer) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock for the request head."""
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.head_timeout,
            transport.abort,  # type: ignore[attr-defined]
        )

    def data_received(self, data: bytes) -> None:
        """Buffer until the head is complete, then decide."""
        transport = self._transport
        if transport is None:
            return
        buffer = self._buffer + data if self._buffer else data
        limit = self._server.max_head_bytes
        end = head_end(buffer, limit)
        if end < 0:
            if len(buffer) >= limit:
                self._drop()
                transport.abort()
            else:
                self._buffer = buffer
            return
        self._drop()
        transport.pause_reading()  # what follows waits for the connection's new owner
        if buffer.startswith(_UPGRADE_START):  # parsed in its turn (a storm's are many)
            self._server.upgrade_later(transport, buffer, end)
        else:
            self._server.hand_over(transport, buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        """The peer left before its head was complete."""
        self._drop()

    def _drop(self) -> None:
        self._transport = None
        self._buffer = b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _report(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("WebSocket upgrade failed", exc_info=done.exception())


def _refuse(transport: asyncio.Transport, refusal: HandshakeError) -> None:
    body = orjson.dumps(refusal.body())
    status = HTTPStatus(refusal.status)
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if refusal.retry_after is not None:
        head.append(f"Retry-After: {retry_after_header(refusal.retry_after)}")
    transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    transport.close()


class FastConnection(WireConnection):
    """A WebSocket connection served without a RequestHandler, on its own protocol."""

    __slots__ = ()

    @classmethod
    async def accept(
        cls,
        node: Node,
        transport: asyncio.Transport,
        request: UpgradeRequest,
        remote_ip: str,
        early: bytes = b"",
    ) -> None:
        """Check the handshake, answer it, and run the connection on ``transport``."""
        started = time.monotonic()
        try:
            principal = await admit(node, request.headers, remote_ip, request.token)
        except HandshakeError as refusal:
            logs.log_request(refusal.status, "GET", request.target, remote_ip,
                             time.monotonic() - started)  # fmt: skip
            _refuse(transport, refusal)
            return
        if transport.is_closing():  # the peer left while its token was checked
            await node.hub.release(principal.user, remote_ip)
            return
        connection = cls(node, switching(request.key), early)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        logs.log_request(101, "GET", request.target, remote_ip, time.monotonic() - started)
        await connection.run(principal, remote_ip)

    async def run(self, principal: Principal, remote_ip: str) -> None:
        """Start the session on the open connection, then handle its frames."""
        if self._ended:  # the peer left before the session could start
            self._reserved = False
            await self.node.hub.release(principal.user, remote_ip)
            return
        try:
            await self.start_session(principal, remote_ip)
        except Exception:
            log.exception("starting a session failed")
            internal = DISCONNECTS.internal
            self.close_connection(internal.code, internal.reason, internal.abort)
        self.start()


def switching(key: str) -> bytes:
    """The ``101`` response to an upgrade with ``Sec-WebSocket-Key: key``."""
    return _SWITCHING + WebSocketProtocol13.compute_accept_value(key).encode() + b"\r\n\r\n"


class UpgradeHandler(tornado.web.RequestHandler):
    """``GET /ws`` reaching Tornado: admitted here, then run as a :class:`FastConnection`.

    Serves upgrades sent on a keep-alive connection after other requests,
    and every upgrade when Tornado accepts the connections itself. Only
    Tornado's public API is used: :meth:`detach`, ``IOStream.socket`` and a
    partial ``read_bytes`` for the bytes read past the request head.
    """

    def initialize(self, node: Node) -> None:
        """Receive the node (Tornado calls this per request)."""
        self.node = node

    async def get(self) -> None:
        """Check the handshake, then hand the socket to the event loop."""
        request = self.request
        headers = request.headers
        remote_ip = request.remote_ip or "unknown"
        try:
            principal = await admit(
                self.node, headers, remote_ip, self.get_query_argument("access_token", None)
            )
        except HandshakeError as refusal:
            self.set_status(refusal.status)
            if refusal.retry_after is not None:
                self.set_header("Retry-After", retry_after_header(refusal.retry_after))
            self.set_header("Content-Type", "application/json")
            self.finish(refusal.body())
            return
        key = headers.get("Sec-WebSocket-Key")
        refused = _not_an_upgrade(headers)
        if refused is not None or not key:
            await self.node.hub.release(principal.user, remote_ip)
            if refused == 426:
                self.set_header("Sec-WebSocket-Version", "13")
            self.set_status(refused or 400)
            self.finish({"error": "bad_request", "reason": "not a WebSocket upgrade"})
            return
        self.set_status(101)
        self.application.log_request(self)  # Tornado logs a request when it finishes
        stream = self.detach()
        early = _take_buffered(stream)
        try:
            sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        except (OSError, AttributeError):  # the peer is gone already
            stream.close()
            await self.node.hub.release(principal.user, remote_ip)
            return
        stream.close()  # closes Tornado's descriptor only: the duplicate keeps the connection
        connection = FastConnection(self.node, switching(key), early)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock)
        except OSError:
            sock.close()
            await self.node.hub.release(principal.user, remote_ip)
            return
        await connection.run(principal, remote_ip)


def _not_an_upgrade(headers: Any) -> int | None:
    """None for a version-13 WebSocket upgrade; else the status to answer with."""
    connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
        return 400
    if headers.get("Sec-WebSocket-Version") != "13":
        return 426
    return None


def _take_buffered(stream: IOStream) -> bytes:
    """The bytes the stream read past the request head (the client's first frames)."""
    try:
        read = stream.read_bytes(1 << 30, partial=True)  # resolves at once when buffered
    except StreamClosedError:
        return b""
    future = asyncio.ensure_future(read)
    if future.done():
        return b"" if future.cancelled() or future.exception() else future.result()
    future.add_done_callback(_retrieve)  # fails with StreamClosedError when the stream closes
    return b""


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()
