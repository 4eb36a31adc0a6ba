"""``chat``: a text message broadcast to a room's members (at most once)."""

from __future__ import annotations

from pushsvc import CommandError, Field, FrameContext, MessageType, Reply, hookimpl

MAX_TEXT = 4000


async def handle_chat(ctx: FrameContext) -> Reply:
    """Broadcast to ``room`` (default: ``chat.default_room``), sender included.

    The sender must have joined the room (with ``chat.auto_join`` every
    connection is in the default room already).
    """
    room = ctx.frame.get("room") or ctx.node.config.chat.default_room
    if not ctx.node.is_member(ctx.session, room):
        raise CommandError("forbidden", f"join {room!r} before sending to it")
    message_id = await ctx.publish(
        room,
        {
            "type": "chat",
            "room": room,
            "user": ctx.principal.user,
            "name": ctx.principal.name or ctx.principal.user,
            "text": ctx.frame["text"],
        },
    )
    return Reply({"id": message_id})


@hookimpl
def pushsvc_register_message_types() -> list[MessageType]:
    """Declare ``chat``."""
    return [
        MessageType(
            "chat",
            handle_chat,
            {
                "room": Field(str, required=False, max_length=200),
                "text": Field(str, max_length=MAX_TEXT),
            },
            description="text to a room's members, sender included",
            history=True,
        )
    ]
