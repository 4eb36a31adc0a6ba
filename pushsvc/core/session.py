"""Session is one client connection's protocol logic, independent of any transport.

It turns frames into actions: decode, rate-limit, dispatch to a core command
(:data:`~pushsvc.protocol.commands.CORE_COMMANDS`) or a plugin's message type,
answer with ``reply`` or ``error``. It needs the service only through
:class:`SessionServices` and its connection only through :class:`Transport`
(which moves payload bytes its own way: WebSocket frames, or anything else).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from pushsvc.auth.principal import Principal
from pushsvc.auth.tokens import AuthError
from pushsvc.config import RateLimitConfig
from pushsvc.core.ratelimit import KeyedBuckets, TokenBucket, ViolationCounter
from pushsvc.ops.metrics import Metrics
from pushsvc.plugin.api import FrameContext, Reply
from pushsvc.plugin.api import Node as PluginNode
from pushsvc.plugin.manager import MESSAGE_HANDLER, RegisteredType, StepTimer
from pushsvc.protocol import frames
from pushsvc.protocol.codes import ErrorCode
from pushsvc.protocol.commands import CORE_COMMANDS, HISTORY_PAGE_DEFAULT
from pushsvc.protocol.disconnects import DISCONNECTS, Disconnect
from pushsvc.protocol.fields import CommandError
from pushsvc.protocol.frames import Broadcast, Command, FrameError
from pushsvc.store import HistoryPage

log = logging.getLogger("pushsvc.session")

#: Close reasons logged at debug level only (one line per connection would flood the log).
QUIET_CLOSES = frozenset({DISCONNECTS.going_away.label})


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Joined:
    """What a join did: fields for the ``reply``, and what to send after it."""

    fields: dict[str, Any]  # offset, epoch; with since: recovered, recovered_count, reason
    #: Sends the recovered publications, then the live ones held meanwhile; called
    #: once, right after the reply (also when there is none).
    finish: Callable[[], None] = field(default=_nothing)


class Transport(Protocol):
    """What a session needs of its connection (WebSocket, in-memory, or any other)."""

    def write_frame(self, data: bytes) -> None:
        """Write one payload (a JSON message), closing the connection if its buffer is too full."""
        ...

    def write_broadcast(self, broadcast: Broadcast) -> None:
        """Write a payload shared by many connections.

        A transport that wraps payloads (WebSocket framing) wraps it once per
        broadcast with :meth:`~pushsvc.protocol.frames.Broadcast.wrapped`.
        """
        ...

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Close with ``code`` and ``reason``; with ``abort``, drop it without waiting."""
        ...

    def send_ping(self) -> None:
        """Send a transport-level ping (the peer's answer calls ``Session.on_pong``)."""
        ...


class SessionServices(PluginNode, Protocol):
    """What a session needs of the service (implemented by :class:`~pushsvc.core.node.Node`).

    It is also what the session's plugin handlers get as ``FrameContext.node``.
    """

    metrics: Metrics  # Prometheus series
    user_buckets: KeyedBuckets  # the per-user rate limit, shared by the user's connections
    type_buckets: Mapping[str, KeyedBuckets]  # message type -> its own per-user bucket

    def message_type(self, name: str) -> RegisteredType | None:
        """The plugin message type registered as ``name``, if any."""
        ...

    async def join(
        self, session: Session, room: str, *, since: tuple[int, str] | None = None
    ) -> Joined:
        """Join ``room``, resuming after ``since`` (raises ``CommandError`` ``forbidden``)."""
        ...

    async def room_history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """A page of ``room``'s history (raises ``CommandError`` ``unavailable``)."""
        ...

    async def leave(self, session: Session, room: str) -> None:
        """Leave ``room``."""
        ...

    async def presence(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users in ``room`` on every node, sorted (longer than ``limit``: too many)."""
        ...

    async def authenticate_client(self, token: str | None) -> Principal:
        """Authenticate a client's new token: plugins, then the JWT (raises ``AuthError``)."""
        ...

    def token_refreshed(self, session: Session) -> None:
        """``session`` holds a new token: re-arm its expiry."""
        ...

    async def ack(self, session: Session, ids: Sequence[str]) -> int:
        """Settle at-least-once messages for ``session``'s user; returns how many."""
        ...

    async def push_subscribe(self, user: str, subscription: Any) -> str:
        """Store a Web Push subscription for ``user``; ``created`` or ``updated``."""
        ...

    async def push_unsubscribe(self, user: str, endpoint: str) -> bool:
        """Forget ``user``'s Web Push subscription ``endpoint``; whether there was one."""
        ...


class Session:
    """Per-connection state and frame handling."""

    __slots__ = (
        "bucket",
        "closing",
        "inflight",
        "last_seen",
        "principal",
        "remote_ip",
        "rooms",
        "services",
        "session",
        "transport",
        "violations",
    )

    def __init__(
        self,
        services: SessionServices,
        transport: Transport,
        principal: Principal,
        session: str,
        remote_ip: str,
    ) -> None:
        limits = services.config.ratelimit
        now = time.monotonic()
        self.services = services  # what the session needs of the service
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
        self.services.metrics.sent.count(kind, len(data))
        self.transport.write_frame(data)

    def send_broadcast(self, broadcast: Broadcast) -> bool:
        """Queue a payload shared by many recipients (the caller counts the metrics once)."""
        if self.closing:
            return False
        self.transport.write_broadcast(broadcast)
        return True

    def send_error(
        self, code: str, message: str, ref: str | None = None, retry_after: float | None = None
    ) -> None:
        """Send an ``error`` frame."""
        self.services.metrics.frame_errors.labels(code).inc()
        self.send(frames.error_frame(code, message, ref, retry_after), "error")

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection once, counting why.

        Peers that stopped reading or answering (slow consumer, heartbeat)
        are dropped at once instead of waiting for their close frame.
        """
        if self.closing:
            return
        self.closing = True
        self.services.metrics.closes.labels(disconnect.label).inc()
        log.log(
            logging.DEBUG if disconnect.label in QUIET_CLOSES else logging.INFO,
            "closing the connection with %d: %s",
            disconnect.code,
            disconnect.reason,
            extra={"session": self.session, "user": self.principal.user},
        )
        self.transport.close_connection(disconnect.code, disconnect.reason, disconnect.abort)

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
        cost = 1.0  # what a frame that names no known type costs
        registered = None
        own: KeyedBuckets | None = None
        if isinstance(command, Command):
            registered = self.services.message_type(command.type)
            if registered is not None:
                kind, cost = command.type, registered.message_type.cost
                own = self.services.type_buckets.get(kind)
            elif command.type in CORE_COMMANDS:
                kind, cost = command.type, CORE_COMMANDS[command.type].cost
            else:
                kind = "unknown"
        self.services.metrics.received.count(kind, len(data))
        ref = command.ref  # a Command or a FrameError: both carry it
        if not self._admit(now, cost, ref, own):
            return
        if isinstance(command, FrameError):
            self.send_error(command.code, command.message, command.ref)
            return
        try:
            if registered is not None:
                await self._plugin_command(command, registered)
            elif command.type in CORE_COMMANDS:
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

    def _admit(
        self, now: float, cost: float, ref: str | None, own: KeyedBuckets | None = None
    ) -> bool:
        """Apply the type's own bucket, then the connection and user buckets.

        The type's bucket comes first so that frames it refuses take nothing
        from the shared ones. Returns False when the frame is refused.
        """
        retry = 0.0
        bucket = "type"
        if own is not None:
            retry = own.try_take(self.principal.user, now)
        if not retry:
            retry = self.bucket.try_take(now, cost)
            bucket = "connection"
        if not retry:
            retry = self.services.user_buckets.try_take(self.principal.user, now, cost)
            bucket = "user"
        if not retry:
            return True
        self.services.metrics.rate_limited.labels(bucket).inc()
        self.send_error(
            ErrorCode.RATE_LIMITED, f"rate limit exceeded ({bucket})", ref, min(retry, 3600.0)
        )
        if self.violations.add(now):
            self.close(DISCONNECTS.rate_abuse)
        return False

    def _reply(self, ref: str | None, fields: dict[str, Any] | None = None) -> None:
        if ref is not None:
            self.send(frames.reply_frame(ref, fields), "reply")

    async def _plugin_command(self, command: Command, registered: RegisteredType) -> None:
        message_type, plugin = registered.message_type, registered.plugin
        if message_type.scope and not self.principal.has_scope(message_type.scope):
            raise CommandError(
                ErrorCode.FORBIDDEN, f"{command.type} needs scope {message_type.scope!r}"
            )
        checked = frames.validate(command, message_type.fields)
        if isinstance(checked, FrameError):
            self.send_error(checked.code, checked.message, checked.ref)
            return
        context = FrameContext(
            self.principal, self.session, checked.fields, message_type, self.services
        )
        bound = self.services.config.plugins.slow_hook_seconds
        try:
            handled = message_type.handle(context)
            reply = await (StepTimer(handled, bound, plugin, MESSAGE_HANDLER) if bound else handled)
        except CommandError:
            raise
        except Exception:
            self.services.metrics.plugin_errors.labels(plugin, MESSAGE_HANDLER).inc()
            log.exception(
                "plugin %s failed on a %r frame",
                plugin,
                command.type,
                extra={"session": self.session, "user": self.principal.user},
            )
            self.send_error(ErrorCode.INTERNAL, f"plugin {plugin} failed", command.ref)
            return
        fields = dict(reply.fields) if isinstance(reply, Reply) else None
        if context.deferred:  # publications being recorded: reply once they are
            deferred = context.deferred
            waiting: asyncio.Future[Any] = (
                asyncio.ensure_future(deferred[0])
                if len(deferred) == 1
                else asyncio.gather(*deferred)
            )
            waiting.add_done_callback(lambda done: self._reply_recorded(done, command, fields))
            return
        self._reply(command.ref, fields)

    def _reply_recorded(
        self, done: asyncio.Future[Any], command: Command, fields: dict[str, Any] | None
    ) -> None:
        """The frame's publications are recorded and fanned out: answer it."""
        failure = None if done.cancelled() else done.exception()
        if isinstance(failure, CommandError):  # e.g. ``unavailable``: the broker refused it
            self.send_error(failure.code, failure.message, command.ref, failure.retry_after)
            return
        if done.cancelled() or failure is not None:
            log.error(
                "a publication of a %r frame failed",
                command.type,
                exc_info=None if done.cancelled() else done.exception(),
                extra={"session": self.session, "user": self.principal.user},
            )
            self.send_error(ErrorCode.INTERNAL, "internal error", command.ref)
            return
        self._reply(command.ref, fields)

    async def _core_command(self, command: Command) -> None:
        checked = frames.validate(command, CORE_COMMANDS[command.type].fields)
        if isinstance(checked, FrameError):
            self.send_error(checked.code, checked.message, checked.ref)
            return
        fields, ref = checked.fields, checked.ref
        kind = command.type
        if kind == "ack":  # first: one per at-least-once message
            ids = fields.get("ids") or []
            if "id" in fields:
                ids = [fields["id"], *ids]
            if not ids:
                raise CommandError(ErrorCode.BAD_REQUEST, "ack: needs id or ids")
            acked = await self.services.ack(self, ids)
            self._reply(ref, {"acked": acked})
        elif kind == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if ref is not None:
                pong["ref"] = ref
            self.send(frames.encode(pong), "pong")
        elif kind == "join":
            room = fields["room"]
            since = fields.get("since")
            result = await self.services.join(
                self, room, since=None if since is None else (since["offset"], since["epoch"])
            )
            joined: dict[str, Any] = {"room": room, **result.fields}
            try:
                # The members so far (presence events tell the changes from now on),
                # within the same cap as presence events.
                most = self.services.config.chat.presence_max_members
                users = await self.services.presence(room, most)
                if len(users) <= most:
                    joined["users"] = users
                self._reply(ref, joined)
            finally:  # never leave the room held
                result.finish()
        elif kind == "history":
            await self._history(fields, ref)
        elif kind == "leave":
            await self.services.leave(self, fields["room"])
            self._reply(ref, {"room": fields["room"]})
        elif kind == "auth":
            await self._reauthenticate(fields["token"], ref)
        elif kind == "push_subscribe":
            subscription = fields["subscription"]
            outcome = await self.services.push_subscribe(self.principal.user, subscription)
            self._reply(ref, {"endpoint": subscription["endpoint"], "result": outcome})
        elif kind == "push_unsubscribe":
            removed = await self.services.push_unsubscribe(self.principal.user, fields["endpoint"])
            self._reply(ref, {"endpoint": fields["endpoint"], "removed": removed})

    async def _history(self, fields: dict[str, Any], ref: str | None) -> None:
        room = fields["room"]
        if not self.services.may_join(self.principal, room):
            raise CommandError(ErrorCode.FORBIDDEN, f"not allowed to read {room!r}")
        reverse = bool(fields.get("reverse", False))
        limit = fields.get("limit", HISTORY_PAGE_DEFAULT)
        page = await self.services.room_history(room, fields.get("since"), limit, reverse=reverse)
        publications = [orjson.Fragment(entry.frame) for entry in page.entries]
        self._reply(
            ref,
            {
                "room": room,
                "epoch": page.epoch,
                "offset": page.top,
                "earliest": page.earliest,
                "publications": publications,
            },
        )

    async def _reauthenticate(self, token: str, ref: str | None) -> None:
        try:
            principal = await self.services.authenticate_client(token)
        except AuthError as exc:
            raise CommandError(ErrorCode.FORBIDDEN, f"token refused: {exc.reason}") from exc
        if principal.user != self.principal.user:
            raise CommandError(ErrorCode.FORBIDDEN, "token is for another user (sub differs)")
        self.principal = principal
        self.services.token_refreshed(self)
        self._reply(ref, {"exp": principal.expires_at})
