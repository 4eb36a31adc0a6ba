"""The core commands of the wire protocol: one table of name, fields and rate-limit cost.

Session dispatch, the plugin manager (a plugin may not take a core name), the
HTTP API (``publish`` may not impersonate one) and the metrics' ``type``
label all read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pushsvc.protocol.fields import Field
from pushsvc.protocol.webpush import MAX_ENDPOINT_LENGTH, check_subscription

#: A room name as ``join`` and ``leave`` take it.
ROOM_FIELD = Field(str, max_length=200)
#: Longest epoch a client may send back (the server's are 16 characters).
MAX_EPOCH_LENGTH = 64
#: Publications in one ``history`` page: the default and the most.
HISTORY_PAGE_DEFAULT = 100
HISTORY_PAGE_MAX = 1000


def check_since(value: Any) -> None:
    """``join``'s ``since``: ``{"offset": N, "epoch": "E"}``, N an integer >= 0."""
    if set(value) != {"offset", "epoch"}:
        raise ValueError('must be {"offset": N, "epoch": "E"}')
    offset, epoch = value["offset"], value["epoch"]
    if type(offset) is not int or offset < 0:
        raise ValueError("offset must be an integer >= 0")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_LENGTH:
        raise ValueError(f"epoch must be a string of at most {MAX_EPOCH_LENGTH} characters")


def _offset(value: Any) -> None:
    if value < 0:
        raise ValueError("must be >= 0")


def _limit(value: Any) -> None:
    if not 1 <= value <= HISTORY_PAGE_MAX:
        raise ValueError(f"must be between 1 and {HISTORY_PAGE_MAX}")


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
        CoreCommand(
            "join",
            {"room": ROOM_FIELD, "since": Field(dict, required=False, validator=check_since)},
            description="join a room; with since, resume after that offset",
        ),
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
            "history",
            {
                "room": ROOM_FIELD,
                "since": Field(int, required=False, validator=_offset),
                "limit": Field(int, required=False, validator=_limit),
                "reverse": Field(bool, required=False),
            },
            cost=5.0,  # a store read of up to HISTORY_PAGE_MAX publications
            description="read a page of a room's history",
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
