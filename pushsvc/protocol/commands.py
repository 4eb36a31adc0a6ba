"""The core commands of the wire protocol: one table of name, fields and rate-limit cost.

Session dispatch, the plugin manager (a plugin may not take a core name), the
HTTP API (``publish`` may not impersonate one) and the metrics' ``type``
label all read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pushsvc.protocol.fields import Field
from pushsvc.protocol.webpush import MAX_ENDPOINT_LENGTH, check_subscription

#: A room name as ``join`` and ``leave`` take it.
ROOM_FIELD = Field(str, max_length=200)


@dataclass(frozen=True, slots=True)
class CoreCommand:
    """A command every pushsvc node answers itself (PROTOCOL §2)."""

    name: str  # the frame's ``type``
    fields: Mapping[str, Field] = field(default_factory=dict)  # validated before dispatch
    cost: float = 1.0  # tokens of the rate-limit buckets one frame takes
    description: str = ""


CORE_COMMANDS: Mapping[str, CoreCommand] = {
    command.name: command
    for command in (
        CoreCommand("join", {"room": ROOM_FIELD}, description="join a room"),
        CoreCommand("leave", {"room": ROOM_FIELD}, description="leave a room"),
        CoreCommand(
            "auth", {"token": Field(str, max_length=8192)}, description="refresh the token"
        ),
        CoreCommand("ping", description="application ping, answered with pong"),
        CoreCommand(
            "ack",
            {
                "id": Field(str, required=False, max_length=64),
                "ids": Field(list, required=False, items=str, max_length=1000),
            },
            cost=0.1,  # cheap, so that acking stays possible under a tight limit
            description="settle at-least-once messages",
        ),
        CoreCommand(
            "push_subscribe",
            {"subscription": Field(dict, validator=check_subscription)},
            cost=5.0,  # a store write and a DNS lookup
            description="register a browser's Web Push subscription (push.enabled)",
        ),
        CoreCommand(
            "push_unsubscribe",
            {"endpoint": Field(str, min_length=1, max_length=MAX_ENDPOINT_LENGTH)},
            description="forget a Web Push subscription",
        ),
    )
}
"""Core commands by name."""

CORE_TYPES = frozenset(CORE_COMMANDS)
"""Names of the core commands: no plugin may register them."""

SERVER_TYPES = frozenset({"welcome", "reply", "error", "pong", "presence"})
"""Frame types only the server sends."""
