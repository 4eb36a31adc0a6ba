"""Session is one client connection's protocol logic, independent of Tornado.

It turns frames into actions: decode, rate-limit, dispatch to a core command
or a plugin's message type, answer with ``reply`` or ``error``. The transport
(the WebSocket handler) only moves bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

from pushsvc.auth.tokens import AuthError
from pushsvc.broker import Envelope
from pushsvc.config import RateLimitConfig
from pushsvc.core.ratelimit import TokenBucket, ViolationCounter
from pushsvc.plugin.api import CommandError, Field, FrameContext, Principal, Reply
from pushsvc.protocol import frames
from pushsvc.protocol.codes import CloseCode, ErrorCode
from pushsvc.protocol.frames import Command, FrameError

if TYPE_CHECKING:
    from pushsvc.core.node import Node

log = logging.getLogger("pushsvc.session")

ROOM_FIELD = Field(str, max_length=200)
CORE_FIELDS: dict[str, dict[str, Field]] = {
    "join": {"room": ROOM_FIELD},
    "leave": {"room": ROOM_FIELD},
    "auth": {"token": Field(str, max_length=8192)},
    "ping": {},
    "ack": {
        "id": Field(str, required=False, max_length=64),
        "ids": Field(list, required=False, items=str, max_length=1000),
    },
}
#: Rate-limit cost of core commands; acks are cheap so that acking stays possible.
CORE_COSTS = {"join": 1.0, "leave": 1.0, "auth": 1.0, "ping": 1.0, "ack": 0.1}
#: Close reasons logged at debug level only (one line per connection would flood the log).
QUIET_CLOSES = frozenset({"drain"})


class Transport(Protocol):
    """What a session needs from its socket."""

    def write_frame(self, data: bytes) -> None:
        """Write ``data`` as one text frame, closing the connection if its buffer is too full."""
        ...

    def write_framed(self, frame: bytes) -> None:
        """Write bytes that are already a complete WebSocket frame."""
        ...

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; with ``abort``, drop the socket without waiting."""
        ...

    def send_ping(self) -> None:
        """Send a protocol-level ping."""
        ...


class Session:
    """Per-connection state and frame handling."""

    __slots__ = (
        "bucket",
        "closing",
        "inflight",
        "last_seen",
        "node",
        "principal",
        "remote_ip",
        "rooms",
        "session",
        "transport",
        "violations",
    )

    def __init__(
        self, node: Node, transport: Transport, principal: Principal, session: str, remote_ip: str
    ) -> None:
        limits = node.config.ratelimit
        now = time.monotonic()
        self.node = node  # the service
        self.transport = transport  # the socket
        self.principal = principal  # who is connected (replaced by an 'auth' frame)
        self.session = session  # unique connection id
        self.remote_ip = remote_ip  # peer address
        self.rooms: set[str] = set()  # rooms joined
        self.bucket = TokenBucket(limits.rate, limits.burst, now)  # per-connection limit
        self.violations = ViolationCounter(limits.abuse_violations, limits.abuse_window)
        self.last_seen = now  # monotonic time of the last frame or pong
        self.closing = False  # set once a close was started
        self.inflight: Any = None  # at-least-once window, owned by the delivery module

    def reconfigure_limits(self, limits: RateLimitConfig, now: float) -> None:
        """Apply reloaded rate limits to this open connection."""
        self.bucket.reconfigure(limits.rate, limits.burst, now)
        self.violations.limit = limits.abuse_violations
        self.violations.window = limits.abuse_window

    # -- output -----------------------------------------------------------------

    def send(self, data: bytes, kind: str) -> None:
        """Write one encoded frame (``kind`` labels the metrics)."""
        if self.closing:
            return
        metrics = self.node.metrics
        metrics.frames_sent.labels(kind).inc()
        metrics.sent_bytes.labels(kind).inc(len(data))
        self.transport.write_frame(data)

    def send_framed(self, frame: bytes) -> bool:
        """Queue a frame built once for a broadcast (metrics are counted by the caller)."""
        if self.closing:
            return False
        self.transport.write_framed(frame)
        return True

    def send_error(
        self, code: str, message: str, ref: str | None = None, retry_after: float | None = None
    ) -> None:
        """Send an ``error`` frame."""
        self.node.metrics.frame_errors.labels(code).inc()
        self.send(frames.error_frame(code, message, ref, retry_after), "error")

    def close_with(self, code: int, reason: str, metric_reason: str) -> None:
        """Close the connection once, counting why.

        Peers that stopped reading or answering (slow consumer, heartbeat)
        are dropped at once instead of waiting for their close frame.
        """
        if self.closing:
            return
        self.closing = True
        self.node.metrics.closes.labels(metric_reason).inc()
        log.log(
            logging.DEBUG if metric_reason in QUIET_CLOSES else logging.INFO,
            "closing the connection with %d: %s",
            code,
            reason,
            extra={"session": self.session, "user": self.principal.user},
        )
        abort = code in (CloseCode.SLOW_CONSUMER, CloseCode.HEARTBEAT_TIMEOUT)
        self.transport.close_connection(code, reason, abort)

    def on_durable(self, envelope: Envelope) -> None:
        """An at-least-once message for this user: hand it to the delivery tracker."""
        self.node.delivery.offer(self, envelope)

    def on_settled(self, ids: Collection[str]) -> None:
        """Messages acked elsewhere: stop resending them here."""
        self.node.delivery.settled(self, ids)

    def ping(self) -> None:
        """Send a protocol-level ping (the keepalive calls this)."""
        self.transport.send_ping()

    def on_pong(self) -> None:
        """The peer answered a ping."""
        self.last_seen = time.monotonic()

    # -- input ------------------------------------------------------------------

    async def on_frame(self, data: str | bytes, binary: bool = False) -> None:
        """Handle one client frame; never raises."""
        now = time.monotonic()
        self.last_seen = now
        command = frames.decode_frame(data, binary=binary)
        kind = "invalid"
        cost = 1.0
        registered = None
        if isinstance(command, Command):
            registered = self.node.plugins.types.get(command.type)
            if registered is not None:
                kind, cost = command.type, registered.message_type.cost
            elif command.type in CORE_FIELDS:
                kind, cost = command.type, CORE_COSTS[command.type]
            else:
                kind = "unknown"
        metrics = self.node.metrics
        metrics.frames_received.labels(kind).inc()
        metrics.received_bytes.labels(kind).inc(len(data))
        ref = command.ref if isinstance(command, Command | FrameError) else None
        if not self._admit(now, cost, ref):
            return
        if isinstance(command, FrameError):
            self.send_error(command.code, command.message, command.ref)
            return
        try:
            if registered is not None:
                await self._plugin_command(command, registered.plugin)
            elif command.type in CORE_FIELDS:
                await self._core_command(command)
            else:
                self.send_error(
                    ErrorCode.UNKNOWN_TYPE, f"unknown type {command.type!r}", command.ref
                )
        except CommandError as exc:
            self.send_error(exc.code, exc.message, command.ref, exc.retry_after)
        except Exception:
            log.exception(
                "frame %r failed",
                command.type,
                extra={"session": self.session, "user": self.principal.user},
            )
            self.send_error(ErrorCode.INTERNAL, "internal error", command.ref)

    def _admit(self, now: float, cost: float, ref: str | None) -> bool:
        """Apply the connection and user buckets; False when the frame is refused."""
        retry = self.bucket.try_take(now, cost)
        bucket = "connection"
        if not retry:
            retry = self.node.user_buckets.try_take(self.principal.user, now, cost)
            bucket = "user"
        if not retry:
            return True
        self.node.metrics.rate_limited.labels(bucket).inc()
        self.send_error(
            ErrorCode.RATE_LIMITED, f"rate limit exceeded ({bucket})", ref, min(retry, 3600.0)
        )
        if self.violations.add(now):
            self.close_with(CloseCode.POLICY_VIOLATION, "rate limit abuse", "rate_abuse")
        return False

    def _reply(self, ref: str | None, fields: dict[str, Any] | None = None) -> None:
        if ref is not None:
            self.send(frames.reply_frame(ref, fields), "reply")

    async def _plugin_command(self, command: Command, plugin: str) -> None:
        message_type = self.node.plugins.types[command.type].message_type
        if message_type.scope and not self.principal.has_scope(message_type.scope):
            raise CommandError(
                ErrorCode.FORBIDDEN, f"{command.type} needs scope {message_type.scope!r}"
            )
        checked = frames.validate(command, message_type.fields)
        if isinstance(checked, FrameError):
            self.send_error(checked.code, checked.message, checked.ref)
            return
        context = FrameContext(
            self.principal, self.session, checked.fields, message_type, self.node
        )
        try:
            reply = await message_type.handle(context)
        except CommandError:
            raise
        except Exception:
            self.node.metrics.plugin_errors.labels(plugin).inc()
            log.exception(
                "plugin %s failed on a %r frame",
                plugin,
                command.type,
                extra={"session": self.session, "user": self.principal.user},
            )
            self.send_error(ErrorCode.INTERNAL, f"plugin {plugin} failed", command.ref)
            return
        if isinstance(reply, Reply):
            self._reply(command.ref, dict(reply.fields))
        else:
            self._reply(command.ref)

    async def _core_command(self, command: Command) -> None:
        checked = frames.validate(command, CORE_FIELDS[command.type])
        if isinstance(checked, FrameError):
            self.send_error(checked.code, checked.message, checked.ref)
            return
        fields, ref = checked.fields, checked.ref
        if command.type == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if ref is not None:
                pong["ref"] = ref
            self.send(frames.encode(pong), "pong")
        elif command.type == "join":
            await self.node.join(self, fields["room"])
            self._reply(ref, {"room": fields["room"]})
        elif command.type == "leave":
            await self.node.leave(self, fields["room"])
            self._reply(ref, {"room": fields["room"]})
        elif command.type == "auth":
            await self._reauthenticate(fields["token"], ref)
        elif command.type == "ack":
            ids = fields.get("ids") or []
            if "id" in fields:
                ids = [fields["id"], *ids]
            if not ids:
                raise CommandError(ErrorCode.BAD_REQUEST, "ack: needs id or ids")
            acked = await self.node.delivery.ack(self, ids)
            self._reply(ref, {"acked": acked})

    async def _reauthenticate(self, token: str, ref: str | None) -> None:
        try:
            principal = await self.node.authenticate(token)
        except AuthError as exc:
            raise CommandError(ErrorCode.FORBIDDEN, f"token refused: {exc.reason}") from exc
        if principal.user != self.principal.user:
            raise CommandError(ErrorCode.FORBIDDEN, "token is for another user (sub differs)")
        self.principal = principal
        self.node.keepalive.track_expiry(self)
        self._reply(ref, {"exp": principal.expires_at})
