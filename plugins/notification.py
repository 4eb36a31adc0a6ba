"""``notification``: a titled message to users, from clients with scope ``notify``
or from app backends through ``POST /api/v1/notify`` (at least once)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pushsvc import (
    ApiError,
    ApiHandler,
    CommandError,
    Config,
    Delivery,
    Field,
    FrameContext,
    Guarantee,
    IdempotencyKey,
    MessageType,
    PushOptions,
    Reply,
    hookimpl,
    openapi,
)

PUSH_MODES, URGENCIES, TOPIC_PATTERN = (
    PushOptions.MODES,
    PushOptions.URGENCIES,
    PushOptions.TOPIC_PATTERN,
)

MAX_RECIPIENTS_PER_FRAME = 1000
MAX_TITLE_LENGTH = 1000
MAX_MESSAGE_LENGTH = 16000


def notification(title: str, message: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """The frame clients receive (the server adds id, timestamp and ack)."""
    return {"type": "notification", "title": title, "message": message, "data": data or {}}


def push_options(fields: Any) -> PushOptions:
    """The Web Push fields of a frame or body: ``push``, ``urgency``, ``topic`` (all optional)."""
    return PushOptions(fields.get("push"), fields.get("urgency"), fields.get("topic"))


#: The optional Web Push fields of a notification (frame and API body).
PUSH_FIELDS = {
    "push": Field(str, required=False, choices=PUSH_MODES),
    "urgency": Field(str, required=False, choices=URGENCIES),
    "topic": Field(str, required=False, pattern=TOPIC_PATTERN),
}


async def handle_notification(ctx: FrameContext) -> Reply:
    """Persist for every recipient in ``to``, then deliver."""
    frame = ctx.frame
    if not frame["to"] or not all(frame["to"]):
        raise CommandError("bad_request", "to: a user id or a non-empty list of user ids")
    message = notification(frame["title"], frame["message"], frame.get("data"))
    delivery = await ctx.send(frame["to"], message, push=push_options(frame))
    return Reply({"id": delivery.id, "recipients": len(delivery.recipients)})


class NotifyHandler(ApiHandler):
    """``POST /api/v1/notify``: 202 ``{"id", "recipients"}`` once persisted.

    Takes an ``Idempotency-Key`` header: a retry with the same key and body
    answers the first ``id`` and stores nothing new (:meth:`ApiHandler.accept_once`).
    """

    async def post(self) -> None:
        """Accept ``{"to", "title", "message", "data"?, "ttl"?}``."""
        await self.handle(self._notify())

    async def _notify(self) -> tuple[int, Any]:
        data = self.body()
        users = self.recipients(data)
        title = self.field(data, "title", str, max_length=MAX_TITLE_LENGTH)
        text = self.field(data, "message", str, max_length=MAX_MESSAGE_LENGTH)
        extra = self.field(data, "data", dict, required=False)
        ttl = self.number(data, "ttl")
        push = self._push(data)
        message = notification(title, text, extra)

        async def accept(key: IdempotencyKey | None) -> Delivery:
            return await self.send(
                users, message, Guarantee.AT_LEAST_ONCE, ttl, idempotency=key, push=push
            )

        message_id, recipients = await self.accept_once(data, accept)
        return HTTPStatus.ACCEPTED, {"id": message_id, "recipients": recipients}

    def _push(self, data: dict[str, Any]) -> PushOptions:
        for name in PUSH_FIELDS:
            self.field(data, name, str, required=False, max_length=32)
        try:
            return push_options(data)
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad_request", str(exc)) from exc

    @classmethod
    def openapi_paths(cls, config: Config) -> dict[str, Any]:
        """``POST /api/v1/notify`` for the OpenAPI document."""
        user = {"type": "string", "minLength": 1}
        recipients = {
            "anyOf": [
                user,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": config.api.max_recipients,
                    "items": user,
                },
            ],
            "description": "a user id or a list (at most `api.max_recipients`)",
        }
        request = {
            "type": "object",
            "required": ["to", "title", "message"],
            "properties": {
                "to": recipients,
                "title": {"type": "string", "maxLength": MAX_TITLE_LENGTH},
                "message": {"type": "string", "maxLength": MAX_MESSAGE_LENGTH},
                "data": openapi.nullable({"type": "object"}),
                "ttl": openapi.nullable(
                    {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "description": "seconds; at most `delivery.ttl`",
                    }
                ),
                "push": openapi.nullable(
                    {
                        "enum": list(PUSH_MODES),
                        "description": "Web Push (push.enabled): default `offline`",
                    }
                ),
                "urgency": openapi.nullable({"enum": list(URGENCIES)}),
                "topic": openapi.nullable({"type": "string", "pattern": f"^{TOPIC_PATTERN}$"}),
            },
        }
        accepted = {
            "type": "object",
            "required": ["id", "recipients"],
            "properties": {"id": {"type": "string"}, "recipients": {"type": "integer"}},
        }
        replayed = {
            "description": "`true` when this answers an earlier request with the same key",
            "schema": {"type": "string", "enum": ["true"]},
        }
        return {
            "/api/v1/notify": {
                "post": openapi.operation(
                    "Notify users (persisted, at least once)",
                    operation_id="notify",
                    tag="messages",
                    description="202 only once the message is persisted for every recipient.",
                    request=request,
                    parameters=[openapi.idempotency_key_param()],
                    ok=(HTTPStatus.ACCEPTED, "persisted", accepted),
                    ok_headers={"Idempotent-Replayed": replayed},
                    errors=openapi.IDEMPOTENCY_MISMATCH,
                )
            }
        }


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
                **PUSH_FIELDS,
            },
            guarantee=Guarantee.AT_LEAST_ONCE,
            scope="notify",
            push="offline",
            description="titled message to users, stored until acked",
        )
    ]


@hookimpl
def pushsvc_register_routes() -> list[tuple[str, type, dict[str, Any]]]:
    """Serve ``POST /api/v1/notify``."""
    return [(r"/api/v1/notify", NotifyHandler, {"node": None})]
