"""Upgrade turns a new TCP connection into a pushsvc WebSocket without Tornado's HTTP stack.

The first request on every connection is read here. A WebSocket upgrade of
``/ws`` is checked with :func:`~pushsvc.connection.admit` and answered with
``101`` (or the refusal's status and JSON body); the socket then leaves
Tornado and lives as a :class:`FastConnection` on an asyncio transport
(:mod:`pushsvc.wire`) - no RequestHandler, no HTTP1Connection, no IOStream,
no request object kept per connection. Anything else goes
back, unread, to Tornado's HTTP server (the HTTP API, metrics, plugin routes,
and upgrades sent later on a keep-alive connection, which
:class:`~pushsvc.handler.WebSocketHandler` serves).

The path uses Tornado internals through :mod:`pushsvc.tornado_compat` only;
without them the server behaves exactly like Tornado's ``HTTPServer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import orjson
import tornado.httpserver
import tornado.netutil
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.websocket import WebSocketProtocol13

from pushsvc import eager, logs, tornado_compat, wire
from pushsvc.connection import admit
from pushsvc.errors import HandshakeError
from pushsvc.node import Node
from pushsvc.wire import WireConnection

log = logging.getLogger("pushsvc.upgrade")

WEBSOCKET_PATH = "/ws"
MAX_HEAD_BYTES = 16 * 1024  # a longer first request head is dropped
HEAD_TIMEOUT = 10.0  # seconds to send the first request head
_HEAD_END = rb"\r?\n\r?\n"
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


class UpgradeServer(tornado.httpserver.HTTPServer):
    """An ``HTTPServer`` whose connections' first request may become a fast WebSocket."""

    node: Node | None = None  # set by pushsvc.app before listening
    #: The listening sockets set TCP_NODELAY and accepted sockets inherit it (Linux),
    #: which saves a setsockopt per connection.
    nodelay_inherited = False

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        """Sniff the first request; hand everything else to Tornado unchanged."""
        if self.node is None or not tornado_compat.INTERNALS_OK:
            super().handle_stream(stream, address)
            return
        try:
            # Tornado returns an asyncio Future (typed as an Awaitable).
            head = cast(
                "asyncio.Future[bytes]",
                stream.read_until_regex(_HEAD_END, max_bytes=MAX_HEAD_BYTES),
            )
        except StreamClosedError:
            return
        # A peer that never finishes its request head is dropped (slowloris).
        deadline = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, stream.close)
        head.add_done_callback(lambda read: self._first_request(stream, address, read, deadline))

    def _first_request(
        self,
        stream: IOStream,
        address: tuple[Any, ...],
        read: asyncio.Future[bytes],
        deadline: asyncio.TimerHandle,
    ) -> None:
        deadline.cancel()
        assert self.node is not None
        try:
            head = read.result()
        except (StreamClosedError, UnsatisfiableReadError):
            stream.close()
            return
        request = parse_upgrade(head)
        if request is None:
            tornado_compat.push_back(stream, head)
            super().handle_stream(stream, address)
            return
        remote_ip = self._remote_ip(address, request)
        accepting = FastConnection.accept(
            self.node, stream, request, remote_ip, nodelay=not self.nodelay_inherited
        )
        pending = eager.start(accepting)  # usually finishes without waiting
        if pending is not None:
            pending.add_done_callback(_report)

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


def _report(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("WebSocket upgrade failed", exc_info=done.exception())


async def _refuse(stream: IOStream, refusal: HandshakeError) -> None:
    body = orjson.dumps(refusal.body())
    status = HTTPStatus(refusal.status)
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if refusal.retry_after is not None:
        head.append(f"Retry-After: {max(1, round(refusal.retry_after))}")
    with contextlib.suppress(StreamClosedError):
        await stream.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    stream.close()


class FastConnection(WireConnection):
    """A WebSocket connection served without a RequestHandler, on its own protocol."""

    @classmethod
    async def accept(
        cls,
        node: Node,
        stream: IOStream,
        request: UpgradeRequest,
        remote_ip: str,
        *,
        nodelay: bool = True,
    ) -> None:
        """Check the handshake, answer it, and run the connection."""
        started = time.monotonic()
        try:
            principal = await admit(node, request.headers, remote_ip, request.token)
        except HandshakeError as refusal:
            logs.log_request(refusal.status, "GET", request.target, remote_ip,
                             time.monotonic() - started)  # fmt: skip
            await _refuse(stream, refusal)
            return
        accept_value = WebSocketProtocol13.compute_accept_value(request.key).encode()
        try:
            if nodelay:
                stream.set_nodelay(True)
            sock, early = tornado_compat.detach(stream)
            connection = cls(node, _SWITCHING + accept_value + b"\r\n\r\n", early)
            await wire.attach(connection, sock)
        except (OSError, StreamClosedError):
            node.hub.release(principal.user, remote_ip)
            return
        logs.log_request(101, "GET", request.target, remote_ip, time.monotonic() - started)
        try:
            await connection.start_session(principal, remote_ip)
        except Exception:
            log.exception("starting a session failed")
            connection.close_connection(1011, "internal error", abort=True)
        connection.start()
