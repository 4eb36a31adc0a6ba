"""An example third-party plugin: ``poke`` a user, see who poked whom over HTTP.

``poke`` is at-least-once: pushsvc persists it, resends it until the
recipient acks, and delivers it on reconnect; this plugin writes no
storage code. ``GET /poke/stats`` shows how the plugin adds an HTTP route.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import tornado.web

from pushsvc import Field, FrameContext, Guarantee, MessageType, Reply, hookimpl

#: Pokes sent, by sender (kept in memory for the example route).
POKES: Counter[str] = Counter()
#: (user, message id, reason) of dead-lettered pokes.
DEAD: list[tuple[str, str, str]] = []


async def handle_poke(ctx: FrameContext) -> Reply:
    """Send ``{"type": "poke", "from", "to", "emoji"}`` to user ``to``."""
    delivery = await ctx.send(
        ctx.frame["to"],
        {
            "type": "poke",
            "from": ctx.principal.user,
            "to": ctx.frame["to"],
            "emoji": ctx.frame.get("emoji", "👉"),
        },
    )
    POKES[ctx.principal.user] += 1
    return Reply({"id": delivery.id})


class PokeStats(tornado.web.RequestHandler):
    """``GET /poke/stats``: pokes sent per user."""

    def get(self) -> None:
        self.write({"pokes": dict(POKES), "dead": len(DEAD)})


@hookimpl
def pushsvc_register_message_types() -> list[MessageType]:
    return [
        MessageType(
            "poke",
            handle_poke,
            {"to": Field(str, max_length=200), "emoji": Field(str, required=False, max_length=8)},
            guarantee=Guarantee.AT_LEAST_ONCE,
            cost=2.0,
            description="poke a user (example plugin)",
        )
    ]


@hookimpl
def pushsvc_register_routes() -> list[tuple[str, type, dict[str, Any]]]:
    return [(r"/poke/stats", PokeStats, {})]


@hookimpl
def pushsvc_dead_lettered(user: str, message: dict[str, Any], reason: str) -> None:
    if message.get("type") == "poke":
        DEAD.append((user, message["id"], reason))
