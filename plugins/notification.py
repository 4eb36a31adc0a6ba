"""``notification``: a titled message to users, from clients with scope ``notify``
or from app backends through ``POST /api/v1/notify`` (at least once)."""

from __future__ import annotations

from typing import Any

from pushsvc import CommandError, Field, FrameContext, Guarantee, MessageType, Reply, hookimpl
from pushsvc.api import ApiError, ApiHandler

MAX_RECIPIENTS_PER_FRAME = 1000


def notification(title: str, message: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """The frame clients receive (the server adds id, timestamp and ack)."""
    return {"type": "notification", "title": title, "message": message, "data": data or {}}


async def handle_notification(ctx: FrameContext) -> Reply:
    """Persist for every recipient in ``to``, then deliver."""
    frame = ctx.frame
    if not frame["to"] or not all(frame["to"]):
        raise CommandError("bad_request", "to: a user id or a non-empty list of user ids")
    message = notification(frame["title"], frame["message"], frame.get("data"))
    delivery = await ctx.send(frame["to"], message)
    return Reply({"id": delivery.id, "recipients": len(delivery.recipients)})


class NotifyHandler(ApiHandler):
    """``POST /api/v1/notify``: 202 ``{"id", "recipients"}`` once persisted."""

    async def post(self) -> None:
        """Accept ``{"to", "title", "message", "data"?, "ttl"?}``."""
        try:
            data = self.body()
            users = self.recipients(data)
            title = self.field(data, "title", str, max_length=1000)
            text = self.field(data, "message", str, max_length=16000)
            extra = self.field(data, "data", dict, required=False)
            ttl = self.field(data, "ttl", (int, float), required=False)
            if ttl is not None and ttl <= 0:
                raise ApiError(400, "bad_request", "ttl: must be positive")
            message = notification(title, text, extra)
            delivery = await self.run(self.node.send(users, message, Guarantee.AT_LEAST_ONCE, ttl))
            self.send_json(202, {"id": delivery.id, "recipients": len(delivery.recipients)})
        except ApiError as error:
            self.send_api_error(error)


@hookimpl
def pushsvc_register_message_types() -> list[MessageType]:
    """Declare ``notification`` (needs scope ``notify``)."""
    return [
        MessageType(
            "notification",
            handle_notification,
            {
                "to": Field((str, list), items=str, max_length=MAX_RECIPIENTS_PER_FRAME),
                "title": Field(str, max_length=1000),
                "message": Field(str, max_length=16000),
                "data": Field(dict, required=False),
            },
            guarantee=Guarantee.AT_LEAST_ONCE,
            scope="notify",
            description="titled message to users, stored until acked",
        )
    ]


@hookimpl
def pushsvc_register_routes() -> list[tuple[str, type, dict[str, Any]]]:
    """Serve ``POST /api/v1/notify``."""
    return [(r"/api/v1/notify", NotifyHandler, {"node": None})]
