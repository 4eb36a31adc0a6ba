"""Tornado's WebSocketHandler as a pushsvc endpoint (fallback and keep-alive upgrades).

Most connections arrive through :mod:`pushsvc.upgrade`, which upgrades
without a RequestHandler. This handler serves ``/ws`` when that path is off
(Tornado internals missing) and for upgrades sent on a keep-alive HTTP
connection; it refuses bad handshakes with the same :func:`~pushsvc.connection.admit`
and shares sessions and the outbox with the fast path through
:class:`~pushsvc.connection.ConnectionBase`; its frames move through
Tornado's ``WebSocketProtocol13`` (with the internals of
:mod:`pushsvc.tornado_compat` when they are there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketProtocol13

from pushsvc.core.node import Node
from pushsvc.plugin.api import Principal
from pushsvc.protocol.codes import HandshakeError
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.protocol.frames import Broadcast
from pushsvc.transport import eager, tornado_compat
from pushsvc.transport.connection import ConnectionBase, admit

log = logging.getLogger("pushsvc.handler")


class WebSocketHandler(ConnectionBase, tornado.websocket.WebSocketHandler):
    """``GET /ws``: authenticated WebSocket connections."""

    principal: Principal | None
    ws_connection: WebSocketProtocol13 | None  # what get_websocket_protocol made

    def initialize(self, node: Node) -> None:
        """Receive the node (Tornado calls this per request)."""
        self.node = node
        self.principal = None  # set once the token is verified
        self.session = None  # set once the connection is open
        self._reserved = False  # a connection slot is held for this request
        self._protocol: tornado_compat.LenientTextProtocol | None = None  # tells 1009 sent
        self._outbox = None  # frames queued for this loop pass

    # -- handshake --------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse the upgrade early: draining, origin, handshake rate, token, caps."""
        request = self.request
        try:
            self.principal = await admit(
                self.node,
                request.headers,
                request.remote_ip or "unknown",
                self.get_query_argument("access_token", None),
            )
        except HandshakeError as refusal:
            self.set_status(refusal.status)
            if refusal.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(refusal.retry_after))))
            self.set_header("Content-Type", "application/json")
            self.finish(refusal.body())
            return
        self._reserved = True

    def check_origin(self, origin: str) -> bool:
        """Origins are checked in :meth:`prepare` (403 with a JSON body).

        Browsers do not apply the same-origin policy to WebSockets, so an
        unchecked origin allows cross-site WebSocket hijacking: the list in
        ``server.allowed_origins`` is the guard.
        """
        return True

    def get_compression_options(self) -> dict[str, Any] | None:
        """No per-message compression: broadcasts send the same bytes to everyone."""
        return None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Use the protocol that reports invalid UTF-8 instead of aborting."""
        if not tornado_compat.INTERNALS_OK:
            return super().get_websocket_protocol()
        if self.request.headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            return None
        self._protocol = tornado_compat.make_protocol(self, self.max_message_size)
        return self._protocol

    @property
    def max_message_size(self) -> int:
        """``server.max_message_bytes``: larger frames close the connection with 1009."""
        return self.node.config.server.max_message_bytes

    def on_finish(self) -> None:
        """Release the connection slot when the upgrade did not happen."""
        if self._reserved and self.get_status() != 101 and self.principal is not None:
            self._reserved = False
            self.node.hub.release(self.principal.user, self.request.remote_ip or "unknown")

    # -- connection -------------------------------------------------------------

    async def open(self, *args: Any, **kwargs: Any) -> None:
        """Welcome the client and register the session."""
        assert self.principal is not None
        self.set_nodelay(True)
        principal, self.principal = self.principal, None
        await self.start_session(principal, self.request.remote_ip or "unknown")
        tornado_compat.release_handshake(self)

    def on_close(self) -> None:
        """Unregister the session and release the connection slot."""
        sent = self._protocol.sent_close_code if self._protocol is not None else None
        self.connection_closed(self.close_code, sent)

    # -- frames in --------------------------------------------------------------

    def on_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        """A text (``str``) or binary (``bytes``) frame, handled eagerly (see :mod:`eager`)."""
        if self.session is None:
            return None
        return eager.start(self.session.on_frame(message, binary=isinstance(message, bytes)))

    def on_invalid_text(self, data: bytes) -> asyncio.Future[None] | None:
        """A text frame that is not valid UTF-8 (see ``LenientTextProtocol``)."""
        if self.session is None:
            return None
        return eager.start(self.session.on_frame(data, binary=False))

    def on_pong(self, data: bytes) -> None:
        """The client answered our ping."""
        if self.session is not None:
            self.session.on_pong()

    # -- frames out (the session's transport) ------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Write ``data`` as one text frame (queued until the end of this loop pass)."""
        if tornado_compat.RAW_FRAMES:
            self.write_framed(tornado_compat.text_frame(data))
            return
        connection = self.ws_connection
        if connection is not None and not connection.is_closing():
            tornado_compat.write_text(connection, data)
            self._check_buffer()

    def write_broadcast(self, broadcast: Broadcast) -> None:
        """Queue a shared payload (framed once per broadcast when frames are built here)."""
        if tornado_compat.RAW_FRAMES:
            super().write_broadcast(broadcast)
        else:
            self.write_frame(broadcast.payload)

    def flush_outbox(self) -> None:
        """Write the queued frames with one send, then check for a slow consumer."""
        frames, self._outbox = self._outbox, None
        connection = self.ws_connection
        if not frames or connection is None or connection.is_closing():
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if tornado_compat.write_raw(connection, data) == tornado_compat.BUFFERED:
            self._check_buffer()

    def _check_buffer(self) -> None:
        connection = self.ws_connection
        if connection is None or self.session is None:
            return
        if tornado_compat.buffered_bytes(connection) > self.node.config.server.max_buffer_bytes:
            self.session.close(DISCONNECTS.slow_consumer)

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; with ``abort`` drop the socket without waiting for the peer."""
        connection = self.ws_connection
        if connection is None:
            return
        self.ws_connection = None
        connection.close(code, reason)
        if abort:
            tornado_compat.abort(connection)

    def send_ping(self) -> None:
        """Send a protocol ping (the peer's pong updates ``last_seen``)."""
        connection = self.ws_connection
        if connection is not None:
            with contextlib.suppress(WebSocketClosedError, StreamClosedError):
                connection.write_ping(b"")
