"""Tornado's WebSocketHandler as a pushsvc endpoint (fallback and keep-alive upgrades).

Most connections arrive through :mod:`pushsvc.upgrade`, which upgrades
without a RequestHandler. This handler serves ``/ws`` when that path is off
(Tornado internals missing) and for upgrades sent on a keep-alive HTTP
connection; it refuses bad handshakes with the same :func:`~pushsvc.connection.admit`
and moves frames with the same :class:`~pushsvc.connection.ConnectionBase`.
"""

from __future__ import annotations

import logging
from typing import Any

import tornado.web
import tornado.websocket

from pushsvc import tornado_compat
from pushsvc.connection import ConnectionBase, admit
from pushsvc.errors import HandshakeError
from pushsvc.node import Node
from pushsvc.plugin_api import Principal

log = logging.getLogger("pushsvc.handler")


class WebSocketHandler(ConnectionBase, tornado.websocket.WebSocketHandler):
    """``GET /ws``: authenticated WebSocket connections."""

    principal: Principal | None

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
