"""The WebSocket endpoint: handshake checks before the upgrade, then bytes in and out.

Everything about frames lives in :class:`pushsvc.session.Session`; this
handler refuses bad handshakes with an HTTP status and a JSON body (PROTOCOL
§1), then moves frames between the socket and the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
import urllib.parse
import uuid
from typing import Any

import tornado.web
import tornado.websocket

from pushsvc import eager, tornado_compat
from pushsvc.auth import AuthError, token_from_request
from pushsvc.errors import CloseCode, HandshakeError
from pushsvc.node import Node
from pushsvc.plugin_api import Principal
from pushsvc.session import Session

log = logging.getLogger("pushsvc.handler")


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """Whether a browser ``Origin`` may connect: same host, or a configured glob."""
    netloc = urllib.parse.urlsplit(origin).netloc.lower()
    if netloc and netloc == host.lower():
        return True
    return any(fnmatch.fnmatchcase(origin.lower(), pattern.lower()) for pattern in allowed)


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    """``GET /ws``: authenticated WebSocket connections."""

    node: Node
    principal: Principal | None
    session: Session | None

    def initialize(self, node: Node) -> None:
        """Receive the node (Tornado calls this per request)."""
        self.node = node
        self.principal = None  # set once the token is verified
        self.session = None  # set once the connection is open
        self._reserved = False  # a connection slot is held for this request
        self._protocol: tornado_compat.LenientTextProtocol | None = None  # tells 1009 sent
        self._outbox: list[bytes] | None = None  # frames queued for this loop pass

    # -- handshake --------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse the upgrade early: draining, origin, handshake rate, token, caps."""
        try:
            await self._admit()
        except HandshakeError as refusal:
            self.node.metrics.handshake(refusal.error, refusal.reason)
            self.set_status(refusal.status)
            if refusal.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(refusal.retry_after))))
            self.set_header("Content-Type", "application/json")
            self.finish(refusal.body())

    async def _admit(self) -> None:
        node, request = self.node, self.request
        config = node.config
        ip = request.remote_ip or "unknown"
        if node.draining:
            raise HandshakeError(503, "unavailable", "draining", retry_after=1)
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin, request.headers.get("Host", ""), config.server.allowed_origins
        ):
            raise HandshakeError(403, "forbidden_origin")
        retry = node.handshake_buckets.try_take(ip, time.monotonic())
        if retry:
            node.metrics.rate_limited.labels("handshake").inc()
            raise HandshakeError(429, "too_many_connections", "handshake_rate", retry_after=retry)
        token = token_from_request(request.headers, self.get_query_argument("access_token", None))
        try:
            self.principal = await node.authenticate(token)
        except AuthError as exc:
            raise HandshakeError(401, "unauthorized", exc.reason) from exc
        limits = config.ratelimit
        exceeded = node.hub.reserve(
            self.principal.user, ip, limits.max_connections_per_user, limits.max_connections_per_ip
        )
        if exceeded is not None:
            raise HandshakeError(429, "too_many_connections", exceeded, retry_after=1)
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
        version = self.request.headers.get("Sec-WebSocket-Version")
        if version not in ("7", "8", "13"):
            return None
        params = tornado.websocket._WebSocketParams(
            ping_interval=None,
            ping_timeout=None,
            max_message_size=self.max_message_size,
            compression_options=None,
        )
        self._protocol = tornado_compat.LenientTextProtocol(self, False, params)
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
        node = self.node
        assert self.principal is not None
        self.set_nodelay(True)
        session = Session(
            node, self, self.principal, uuid.uuid4().hex, self.request.remote_ip or "unknown"
        )
        self.session = session
        node.metrics.handshake("ok")
        log.debug(
            "connection opened from %s",
            session.remote_ip,
            extra={"session": session.session, "user": session.principal.user},
        )
        session.send(node.welcome_frame(session), "welcome")
        await node.connected(session)
        self._release_request()

    def _release_request(self) -> None:
        # The request and its headers are not needed once the session exists.
        self.principal = None
        tornado_compat.release_handshake(self)

    def on_message(self, message: str | bytes) -> asyncio.Task[None] | None:
        """A text (``str``) or binary (``bytes``) frame, handled eagerly (see :mod:`eager`)."""
        if self.session is None:
            return None
        return eager.start(self.session.on_frame(message, binary=isinstance(message, bytes)))

    def on_invalid_text(self, data: bytes) -> asyncio.Task[None] | None:
        """A text frame that is not valid UTF-8 (see :class:`LenientTextProtocol`)."""
        if self.session is None:
            return None
        return eager.start(self.session.on_frame(data, binary=False))

    def on_pong(self, data: bytes) -> None:
        """The client answered our ping."""
        if self.session is not None:
            self.session.on_pong()

    def on_close(self) -> None:
        """Unregister the session and release the connection slot."""
        session = self.session
        if session is None:
            return
        if not session.closing:
            session.closing = True
            code = self.close_code  # the peer's; Tornado aborts after sending 1009 itself
            if code is None and self._protocol is not None:
                code = self._protocol.sent_close_code
            reason = "oversize" if code == CloseCode.MESSAGE_TOO_BIG else "client"
            self.node.metrics.closes.labels(reason).inc()
        log.debug(
            "connection closed (code %s)",
            self.close_code,
            extra={"session": session.session, "user": session.principal.user},
        )
        if self._reserved:
            self._reserved = False
            self.node.hub.release(session.principal.user, session.remote_ip)
        task = asyncio.ensure_future(self.node.disconnected(session, self.close_code))
        self.node.track(task)

    # -- transport for the session ------------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Write ``data`` as one text frame (queued until the end of this loop pass)."""
        if tornado_compat.RAW_FRAMES:
            self.write_framed(tornado_compat.text_frame(data))
            return
        connection = self.ws_connection
        if connection is not None and not connection.is_closing():
            tornado_compat.write_text(connection, data)  # type: ignore[arg-type]
            self._check_buffer()

    def write_framed(self, frame: bytes) -> None:
        """Queue a complete frame; the node's flusher writes the queue once per loop pass."""
        outbox = self._outbox
        if outbox is None:
            self._outbox = [frame]
            self.node.flusher.mark(self)
        else:
            outbox.append(frame)

    def flush_outbox(self) -> None:
        """Write the queued frames with one send, then check for a slow consumer."""
        frames, self._outbox = self._outbox, None
        connection = self.ws_connection
        if not frames or connection is None or connection.is_closing():
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if tornado_compat.write_raw(connection, data):  # type: ignore[arg-type]
            self._check_buffer()

    def _check_buffer(self) -> None:
        connection = self.ws_connection
        if connection is None or self.session is None:
            return
        buffered = tornado_compat.buffered_bytes(connection)  # type: ignore[arg-type]
        if buffered > self.node.config.server.max_buffer_bytes:
            self.session.close_with(CloseCode.SLOW_CONSUMER, "slow consumer", "slow_consumer")

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; with ``abort`` drop the socket without waiting for the peer."""
        connection = self.ws_connection
        if connection is None:
            return
        self.close(code, reason)
        if abort:
            tornado_compat.abort(connection)  # type: ignore[arg-type]

    def send_ping(self) -> None:
        """Send a protocol ping (the peer's pong updates ``last_seen``)."""
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            super().ping(b"")
