"""Connection owns what every WebSocket shares: admission, the session, the outbox.

Upgrades arrive two ways: as a connection's first request
(:class:`~pushsvc.transport.upgrade.FirstRequest`) or through Tornado
(:class:`~pushsvc.transport.upgrade.UpgradeHandler`: keep-alive connections,
and every connection when Tornado accepts them). Both refuse handshakes with
:func:`admit` and then run the same engine,
:class:`~pushsvc.transport.websocket.WireConnection`, which starts and ends
sessions and queues frames with :class:`ConnectionBase`.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import urllib.parse
from collections.abc import Mapping

from pushsvc.auth.tokens import AuthError, token_from_request
from pushsvc.core.node import Node
from pushsvc.core.session import Session
from pushsvc.plugin.api import HandshakeRequest, Principal
from pushsvc.protocol import ids
from pushsvc.protocol.codes import HandshakeError
from pushsvc.protocol.disconnects import CLIENT_CLOSE_LABEL, DISCONNECTS
from pushsvc.protocol.frames import Broadcast
from pushsvc.transport.outbox import Flusher
from pushsvc.transport.pacing import pacer
from pushsvc.transport.tornado_compat import text_frame

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
    (429), token (401), connection caps (429; the per-user cap over every
    node, the per-address cap on this one). On success the caller owns
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
        principal = await node.authenticate_client(
            token_from_request(headers, query_token), HandshakeRequest(headers, remote_ip)
        )
    except AuthError as exc:
        raise HandshakeError(401, "unauthorized", exc.reason) from exc
    limits = config.ratelimit
    exceeded = await node.hub.reserve(
        principal.user, remote_ip, limits.max_connections_per_user, limits.max_connections_per_ip
    )
    if exceeded is not None:
        raise HandshakeError(429, "too_many_connections", exceeded, retry_after=1)
    return principal


class ConnectionBase:
    """The session's lifecycle and the per-pass outbox of a WebSocket connection.

    Subclasses set ``node``, call :meth:`start_session` once the upgrade is
    done and :meth:`connection_closed` when it ends, and implement the rest
    of the session's :class:`~pushsvc.session.Transport` (``write_frame``,
    ``close_connection``, ``send_ping``) and ``flush_outbox``.
    """

    __slots__ = ("_flusher", "_outbox", "_reserved", "node", "session")

    node: Node
    session: Session | None
    _outbox: list[bytes] | None  # frames queued for this loop pass
    _flusher: Flusher  # the loop's flusher (looked up once: a connection lives on one loop)
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
        """The socket closed (``code`` from the peer, ``sent_code`` ours): clean up once.

        The session is marked closing now; the rest (metrics, the hub, the
        rooms, the connection slot) is paced (:mod:`pushsvc.transport.pacing`):
        10,000 resets at once are cleaned up over several loop passes, not in one.
        """
        session = self.session
        if session is None:
            return
        self.session = None
        by_peer = not session.closing  # else the close we started was counted already
        session.closing = True
        reserved, self._reserved = self._reserved, False
        pacer().call(self._clean_up, session, code, sent_code, by_peer, reserved)

    def _clean_up(
        self,
        session: Session,
        code: int | None,
        sent_code: int | None,
        by_peer: bool,
        reserved: bool,
    ) -> None:
        """In the pacer's turn: count and log the close, release the slot, forget the session."""
        node = self.node
        paced = pacer()
        if by_peer:
            oversize = DISCONNECTS.oversize
            reason = oversize.label if (code or sent_code) == oversize.code else CLIENT_CLOSE_LABEL
            node.metrics.closes.labels(reason).inc()
        log.debug(
            "connection closed (code %s)",
            code,
            extra={"session": session.session, "user": session.principal.user},
        )
        if reserved:  # with a remote registry the two wait side by side
            node.track(paced.run(node.hub.release(session.principal.user, session.remote_ip)))
        node.track(paced.run(node.disconnected(session, code)))

    # -- frames out ---------------------------------------------------------------------

    def write_framed(self, frame: bytes) -> None:
        """Queue a complete frame; the loop's flusher writes the queue once per loop pass."""
        outbox = self._outbox
        if outbox is None:
            self._outbox = [frame]
            self._flusher.mark(self)
        else:
            outbox.append(frame)

    def write_broadcast(self, broadcast: Broadcast) -> None:
        """Queue a shared payload, framed once per broadcast."""
        self.write_framed(broadcast.wrapped(text_frame))

    # The engine moves the bytes:

    def flush_outbox(self) -> None:
        """Write the queued frames, in order."""
        raise NotImplementedError

    def write_frame(self, data: bytes) -> None:
        """Write ``data`` (JSON) as one text frame."""
        raise NotImplementedError

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; with ``abort`` drop the socket without waiting for the peer."""
        raise NotImplementedError

    def send_ping(self) -> None:
        """Send a protocol ping (the peer's pong updates ``last_seen``)."""
        raise NotImplementedError
