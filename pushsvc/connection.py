"""Connection owns what every WebSocket endpoint shares: admission and the byte transport.

Two endpoints accept WebSockets: the fast upgrade path (:mod:`pushsvc.upgrade`,
no RequestHandler at all) and Tornado's ``WebSocketHandler``
(:mod:`pushsvc.handler`, the fallback and the path for upgrades on
keep-alive connections). Both refuse handshakes with :func:`admit` and move
frames with :class:`ConnectionBase`, so they behave the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketProtocol13

from pushsvc import eager, ids, tornado_compat
from pushsvc.auth import AuthError, token_from_request
from pushsvc.errors import CloseCode, HandshakeError
from pushsvc.node import Node
from pushsvc.plugin_api import Principal
from pushsvc.session import Session

log = logging.getLogger("pushsvc.connection")


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """Whether a browser ``Origin`` may connect: same host, or a configured glob."""
    netloc = urllib.parse.urlsplit(origin).netloc.lower()
    if netloc and netloc == host.lower():
        return True
    return any(fnmatch.fnmatchcase(origin.lower(), pattern.lower()) for pattern in allowed)


async def admit(
    node: Node, headers: Mapping[str, str], remote_ip: str, query_token: str | None
) -> Principal:
    """Run every pre-upgrade check (PROTOCOL §1) and reserve a connection slot.

    Order: draining (503), ``Origin`` (403), per-address handshake bucket
    (429), token (401), connection caps (429). On success the caller owns
    one slot of ``node.hub.reserve`` and must release it when the
    connection ends (or the upgrade fails).

    Raises:
        HandshakeError: the refusal, already counted in the metrics.
    """
    try:
        return await _admit(node, headers, remote_ip, query_token)
    except HandshakeError as refusal:
        node.metrics.handshake(refusal.error, refusal.reason)
        raise


async def _admit(
    node: Node, headers: Mapping[str, str], remote_ip: str, query_token: str | None
) -> Principal:
    config = node.config
    if node.draining:
        raise HandshakeError(503, "unavailable", "draining", retry_after=1)
    origin = headers.get("Origin")
    if origin is not None and not origin_allowed(
        origin, headers.get("Host", ""), config.server.allowed_origins
    ):
        raise HandshakeError(403, "forbidden_origin")
    retry = node.handshake_buckets.try_take(remote_ip, time.monotonic())
    if retry:
        node.metrics.rate_limited.labels("handshake").inc()
        raise HandshakeError(429, "too_many_connections", "handshake_rate", retry_after=retry)
    try:
        principal = await node.authenticate(token_from_request(headers, query_token))
    except AuthError as exc:
        raise HandshakeError(401, "unauthorized", exc.reason) from exc
    limits = config.ratelimit
    exceeded = node.hub.reserve(
        principal.user, remote_ip, limits.max_connections_per_user, limits.max_connections_per_ip
    )
    if exceeded is not None:
        raise HandshakeError(429, "too_many_connections", exceeded, retry_after=1)
    return principal


class ConnectionBase:
    """The transport half of a WebSocket connection: frames in, frames out, close.

    Subclasses set ``node``, ``ws_connection`` and call :meth:`start_session`
    once the upgrade is done and :meth:`connection_closed` when it ends.
    """

    __slots__ = ("_outbox", "_reserved", "node", "session", "ws_connection")

    node: Node
    session: Session | None
    ws_connection: Any  # the WebSocketProtocol13, None once closed by us
    _outbox: list[bytes] | None  # frames queued for this loop pass
    _reserved: bool  # holds a slot of node.hub.reserve

    # -- lifecycle --------------------------------------------------------------

    async def start_session(self, principal: Principal, remote_ip: str) -> None:
        """Create the session, send ``welcome`` and register it with the node."""
        node = self.node
        session = Session(node, self, principal, ids.session_id(), remote_ip)
        self.session = session
        node.metrics.handshake("ok")
        log.debug(
            "connection opened from %s",
            remote_ip,
            extra={"session": session.session, "user": principal.user},
        )
        session.send(node.welcome_frame(session), "welcome")
        await node.connected(session)

    def connection_closed(self, code: int | None, sent_code: int | None) -> None:
        """The socket closed (``code`` from the peer, ``sent_code`` ours): clean up once."""
        session = self.session
        if session is None:
            return
        self.session = None
        if not session.closing:
            session.closing = True
            reason = "oversize" if (code or sent_code) == CloseCode.MESSAGE_TOO_BIG else "client"
            self.node.metrics.closes.labels(reason).inc()
        log.debug(
            "connection closed (code %s)",
            code,
            extra={"session": session.session, "user": session.principal.user},
        )
        if self._reserved:
            self._reserved = False
            self.node.hub.release(session.principal.user, session.remote_ip)
        self.node.track(asyncio.ensure_future(self.node.disconnected(session, code)))

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

    # -- frames out (the session's transport) -----------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Write ``data`` as one text frame (queued until the end of this loop pass)."""
        if tornado_compat.RAW_FRAMES:
            self.write_framed(tornado_compat.text_frame(data))
            return
        connection = self.ws_connection
        if connection is not None and not connection.is_closing():
            tornado_compat.write_text(connection, data)
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
        if tornado_compat.write_raw(connection, data) == tornado_compat.BUFFERED:
            self._check_buffer()

    def _check_buffer(self) -> None:
        connection = self.ws_connection
        if connection is None or self.session is None:
            return
        if tornado_compat.buffered_bytes(connection) > self.node.config.server.max_buffer_bytes:
            self.session.close_with(CloseCode.SLOW_CONSUMER, "slow consumer", "slow_consumer")

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; with ``abort`` drop the socket without waiting for the peer."""
        connection: WebSocketProtocol13 | None = self.ws_connection
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
