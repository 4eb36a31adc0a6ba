"""``private``: a text message to every connection of one user (at least once)."""

from __future__ import annotations

from pushsvc import Field, FrameContext, Guarantee, MessageType, Reply, hookimpl

MAX_TEXT = 4000


async def handle_private(ctx: FrameContext) -> Reply:
    """Persist for ``to``, then deliver; the ``reply`` carries the message id."""
    to = ctx.frame["to"]
    delivery = await ctx.send(
        to,
        {
            "type": "private",
            "from": ctx.principal.user,
            "to": to,
            "text": ctx.frame["text"],
        },
    )
    return Reply({"id": delivery.id})


@hookimpl
def pushsvc_register_message_types() -> list[MessageType]:
    """Declare ``private``."""
    return [
        MessageType(
            "private",
            handle_private,
            {"to": Field(str, max_length=200), "text": Field(str, max_length=MAX_TEXT)},
            guarantee=Guarantee.AT_LEAST_ONCE,
            description="text to one user, stored until acked",
        )
    ]
