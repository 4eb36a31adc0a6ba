"""The types plugin authors use: message types, fields, the frame context.

Everything here is re-exported from :mod:`pushsvc`; import it from there.
"""

from __future__ import annotations

import enum
import http.cookies
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pluggy

from pushsvc.auth.principal import Principal
from pushsvc.auth.tokens import AuthError
from pushsvc.config import Config
from pushsvc.protocol.fields import CommandError, Field
from pushsvc.protocol.webpush import PUSH_MODES, PushOptions
from pushsvc.store import IdempotencyKey

__all__ = [
    "PLUGIN_API_VERSION",
    "AuthError",
    "CommandError",
    "Delivery",
    "Field",
    "FrameContext",
    "Guarantee",
    "Handler",
    "HandshakeRequest",
    "MessageType",
    "Node",
    "Principal",
    "PushOptions",
    "Reply",
    "hookimpl",
]

#: The plugin API's version, ``"MAJOR.MINOR"``: the hooks, their arguments and the names
#: exported from :mod:`pushsvc` (docs/plugins.md, "Versions"). A minor version only adds
#: (hooks, arguments, names, keyword arguments with defaults); a major one may remove or change.
#: A plugin states the version it needs as ``PUSHSVC_PLUGIN_API = "1.1"`` in its module.
PLUGIN_API_VERSION = "1.1"

#: Marks a hook implementation: ``@hookimpl def pushsvc_register_message_types(): ...``
hookimpl = pluggy.HookimplMarker("pushsvc")


class Guarantee(enum.Enum):
    """What pushsvc promises for a message type's deliveries."""

    #: Live fan-out only: connections online now get it, nothing is stored.
    AT_MOST_ONCE = "at-most-once"
    #: Persisted per recipient before it is accepted, resent until acked,
    #: delivered on reconnect, dead-lettered after the attempts or the TTL.
    AT_LEAST_ONCE = "at-least-once"


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's success answer: fields merged into the ``reply`` frame.

    The ``reply`` is sent only when the client's frame carried a ``ref``.
    """

    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What :meth:`FrameContext.send` did: the message id and its recipients."""

    id: str
    recipients: Sequence[str]


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """The WebSocket upgrade request, as ``pushsvc_authenticate`` sees it."""

    headers: Mapping[str, str]  # the request headers; ``get`` ignores the name's case
    remote_ip: str  # the client's address (``X-Forwarded-For`` applied when trusted)

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name`` of the ``Cookie`` header, if sent."""
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except http.cookies.CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None


class Node(Protocol):
    """The service operations a message handler may use (implemented by core)."""

    config: Config  # the configuration in force

    def may_join(self, principal: Principal, room: str) -> bool:
        """Whether ``principal`` is allowed into ``room``."""
        ...

    def is_member(self, session: str, room: str) -> bool:
        """Whether the connection ``session`` has joined ``room`` on this node."""
        ...

    async def presence(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users with a connection in ``room`` on any node, sorted.

        With ``limit``, a list longer than ``limit`` means "more than ``limit``"
        and may be incomplete.
        """
        ...

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        exclude: str | None = None,
        *,
        history: bool = False,
        defer: list[Awaitable[None]] | None = None,
    ) -> str:
        """Fan ``message`` out to the room's members, at most once; returns its id.

        ``exclude`` is a session id left out (on every node). With
        ``history`` it is recorded in the room's history first and carries
        ``offset`` and ``epoch`` (clients resume from them). With ``defer``
        it returns before the commit and adds the work left to it.
        """
        ...

    async def send(
        self,
        to: Sequence[str],
        message: dict[str, Any],
        guarantee: Guarantee,
        ttl: float | None = None,
        idempotency: IdempotencyKey | None = None,
        push: PushOptions | None = None,
    ) -> Delivery:
        """Deliver ``message`` to every connection of each user in ``to``.

        ``idempotency`` (the key :meth:`ApiHandler.accept_once` gives, at-least-once
        only) is stored with the message in the same transaction. ``push``
        (at-least-once only) says whether and how the message goes out through
        Web Push too (``push.enabled``); None: the message type's ``push``.
        """
        ...


Handler = Callable[["FrameContext"], Awaitable[Reply | None]]


@dataclass(frozen=True, slots=True)
class MessageType:
    """A message type a plugin adds to the protocol.

    Args:
        name: the frame's ``type``; unique across all loaded plugins.
        handle: ``async def handle(ctx: FrameContext) -> Reply | None``.
        fields: the frame's fields and how to validate them; unknown fields
            are ignored, and ``user``, ``from`` and ``timestamp`` are always
            dropped (the server fills them).
        guarantee: what :meth:`FrameContext.send` promises for this type.
        cost: tokens of the connection's and the user's buckets one frame of
            this type takes (0: none).
        scope: a token scope the sender needs (``forbidden`` otherwise).
        description: one line for ``pushsvc plugins``.
        rate: frames of this type per second per user, in a bucket of the
            type's own that is checked before the shared ones (None: no own
            bucket).
        burst: that bucket's size in frames (default: ``rate``, at least 1).
        push: at-least-once types only: when a message of this type is also
            sent through Web Push (``push.enabled``), one of ``"offline"``
            (users without an open connection, or not acking within
            ``push.after_seconds``), ``"always"``, ``"never"``; a send may
            override it (:class:`PushOptions`).
        history: :meth:`FrameContext.publish` records this type's room
            publications in the room's history (offset, epoch, resume).

    Raises:
        ValueError: a negative ``cost``, a ``rate`` that is not positive, a
            ``burst`` below 1 or without a ``rate``, an unknown ``push`` mode.
    """

    name: str
    handle: Handler
    fields: Mapping[str, Field] = field(default_factory=dict)
    guarantee: Guarantee = Guarantee.AT_MOST_ONCE
    cost: float = 1.0
    scope: str | None = None
    description: str = ""
    rate: float | None = None
    burst: float | None = None
    push: str = "never"
    history: bool = False

    def __post_init__(self) -> None:
        if self.cost < 0:
            raise ValueError(f"MessageType {self.name!r}: cost must be at least 0")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"MessageType {self.name!r}: rate must be above 0")
        if self.burst is not None and (self.rate is None or not self.burst >= 1):
            raise ValueError(f"MessageType {self.name!r}: burst needs a rate and must be >= 1")
        if self.push not in PUSH_MODES:
            raise ValueError(f"MessageType {self.name!r}: push must be one of {PUSH_MODES}")

    @property
    def bucket(self) -> tuple[float, float] | None:
        """``(rate, burst)`` of the type's own bucket, or None."""
        if self.rate is None:
            return None
        return self.rate, self.burst if self.burst is not None else max(1.0, self.rate)


@dataclass(frozen=True, slots=True)
class FrameContext:
    """Everything a message handler gets for one validated client frame."""

    principal: Principal  # who sent it
    session: str  # the sending connection's session id
    frame: Mapping[str, Any]  # the validated fields (``type`` and ``ref`` removed)
    message_type: MessageType  # the declaration this frame matched
    node: Node  # service operations
    #: Publications still being recorded: the session sends the reply after them.
    deferred: list[Awaitable[None]] = field(default_factory=list)

    async def publish(
        self, room: str, message: dict[str, Any], *, exclude: str | None = None
    ) -> str:
        """Fan ``message`` out to the members of ``room`` (at most once).

        The server adds ``id`` and ``timestamp`` (and ``offset`` and
        ``epoch`` when the type declares ``history``); returns the id.
        ``exclude`` is a session id that does not get it, on whichever node
        it is connected (``exclude=ctx.session``: everyone but the sender's
        connection); it leaves the session out of the live fan-out only: a
        recorded publication is in the history, which a resume replays to
        every member. A recorded publication returns before its commit; the
        frame's reply is sent after it, and the connection's next frames do
        not wait.
        """
        if not self.message_type.history:
            return await self.node.publish(room, message, exclude)
        return await self.node.publish(room, message, exclude, history=True, defer=self.deferred)

    async def members(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users with a connection in ``room``, on every node, sorted.

        With ``limit``, a list longer than ``limit`` means "more than
        ``limit``" and may be incomplete (a cheaper question for big rooms).
        When the cluster registry is unreachable, the users on this node.
        """
        return await self.node.presence(room, limit)

    def send(
        self,
        to: str | Sequence[str],
        message: dict[str, Any],
        ttl: float | None = None,
        push: PushOptions | None = None,
    ) -> Coroutine[Any, Any, Delivery]:
        """Deliver ``message`` to every connection of the users in ``to`` (await it).

        With :attr:`Guarantee.AT_LEAST_ONCE` the message is persisted for each
        recipient before the await returns, carries ``ack: true``, and is resent
        until acked; otherwise it is live only. The server adds ``id`` and
        ``timestamp``. ``push`` overrides the type's Web Push mode for this message.

        Returns the node's coroutine itself (no coroutine of its own: one layer
        less between a frame and its commit).
        """
        users = [to] if isinstance(to, str) else list(to)
        return self.node.send(users, message, self.message_type.guarantee, ttl, push=push)
