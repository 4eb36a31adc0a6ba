"""The types plugin authors use: message types, fields, the frame context.

Everything here is re-exported from :mod:`pushsvc`; import it from there.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pluggy

from pushsvc.auth.principal import Principal
from pushsvc.config import Config
from pushsvc.protocol.fields import CommandError, Field
from pushsvc.store import IdempotencyKey

__all__ = [
    "CommandError",
    "Delivery",
    "Field",
    "FrameContext",
    "Guarantee",
    "Handler",
    "MessageType",
    "Node",
    "Principal",
    "Reply",
    "hookimpl",
]

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


class Node(Protocol):
    """The service operations a message handler may use (implemented by core)."""

    config: Config  # the configuration in force

    def may_join(self, principal: Principal, room: str) -> bool:
        """Whether ``principal`` is allowed into ``room``."""
        ...

    def is_member(self, session: str, room: str) -> bool:
        """Whether the connection ``session`` has joined ``room`` on this node."""
        ...

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        *,
        history: bool = False,
        defer: list[Awaitable[None]] | None = None,
    ) -> str:
        """Fan ``message`` out to the room's members, at most once; returns its id.

        With ``history`` it is recorded in the room's history first and
        carries ``offset`` and ``epoch`` (clients resume from them). With
        ``defer`` it returns before the commit and adds the work left to it.
        """
        ...

    async def send(
        self,
        to: Sequence[str],
        message: dict[str, Any],
        guarantee: Guarantee,
        ttl: float | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Delivery:
        """Deliver ``message`` to every connection of each user in ``to``.

        ``idempotency`` (the key :meth:`ApiHandler.accept_once` gives, at-least-once
        only) is stored with the message in the same transaction.
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
        cost: tokens of the rate-limit buckets one frame of this type takes.
        scope: a token scope the sender needs (``forbidden`` otherwise).
        description: one line for ``pushsvc plugins``.
        history: :meth:`FrameContext.publish` records this type's room
            publications in the room's history (offset, epoch, resume).
    """

    name: str
    handle: Handler
    fields: Mapping[str, Field] = field(default_factory=dict)
    guarantee: Guarantee = Guarantee.AT_MOST_ONCE
    cost: float = 1.0
    scope: str | None = None
    description: str = ""
    history: bool = False


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

    async def publish(self, room: str, message: dict[str, Any]) -> str:
        """Fan ``message`` out to the members of ``room`` (at most once).

        The server adds ``id`` and ``timestamp`` (and ``offset`` and
        ``epoch`` when the type declares ``history``); returns the id. A
        recorded publication returns before its commit; the frame's reply
        is sent after it, and the connection's next frames do not wait.
        """
        if not self.message_type.history:
            return await self.node.publish(room, message)
        return await self.node.publish(room, message, history=True, defer=self.deferred)

    async def send(
        self, to: str | Sequence[str], message: dict[str, Any], ttl: float | None = None
    ) -> Delivery:
        """Deliver ``message`` to every connection of the users in ``to``.

        With :attr:`Guarantee.AT_LEAST_ONCE` the message is persisted for each
        recipient before this returns, carries ``ack: true``, and is resent
        until acked; otherwise it is live only. The server adds ``id`` and
        ``timestamp``.
        """
        users = [to] if isinstance(to, str) else list(to)
        return await self.node.send(users, message, self.message_type.guarantee, ttl)
