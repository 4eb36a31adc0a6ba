"""Web Push endpoints: the VAPID public key (no token) and users' subscriptions (server API)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pushsvc.http.base import ApiError, ApiHandler, JsonHandler, bad_request
from pushsvc.protocol.codes import ApiErrorCode
from pushsvc.protocol.webpush import MAX_ENDPOINT_LENGTH
from pushsvc.push.service import PushService

_DISABLED = "Web Push is not enabled on this server (push.enabled)"


def _push_or_404(handler: JsonHandler) -> PushService:
    if handler.node.push is None:
        raise ApiError(HTTPStatus.NOT_FOUND, ApiErrorCode.NOT_FOUND, _DISABLED)
    return handler.node.push


class VapidPublicKeyHandler(JsonHandler):
    """``GET /api/v1/push/vapid-public-key``: the key browsers subscribe with; no token."""

    def get(self) -> None:
        """200 ``{"public_key"}`` (base64url, ``applicationServerKey``); 404 when push is off."""
        try:
            push = _push_or_404(self)
        except ApiError as error:
            self.send_api_error(error)
            return
        self.set_header("Cache-Control", "public, max-age=300")
        self.send_json(HTTPStatus.OK, {"public_key": push.public_key})


class PushSubscriptionsHandler(ApiHandler):
    """``GET``, ``POST``, ``DELETE /api/v1/users/{user}/push-subscriptions``."""

    async def get(self, user: str) -> None:
        """200 ``{"subscriptions": [{"endpoint", "created_at"}]}``, oldest first (no keys)."""
        await self.handle(self._list(user))

    async def post(self, user: str) -> None:
        """Register ``{"subscription": PushSubscription.toJSON()}``: 201 created, 200 updated."""
        await self.handle(self._subscribe(user))

    async def delete(self, user: str) -> None:
        """Forget the subscription ``?endpoint=``; 200 ``{"removed": bool}``."""
        await self.handle(self._unsubscribe(user))

    async def _list(self, user: str) -> tuple[int, Any]:
        push = _push_or_404(self)
        found = await self.run(push.listing(user))
        listing = [{"endpoint": s.endpoint, "created_at": s.created_at} for s in found]
        return HTTPStatus.OK, {"subscriptions": listing}

    async def _subscribe(self, user: str) -> tuple[int, Any]:
        _push_or_404(self)
        subscription = self.field(self.body(), "subscription", dict)
        result: str = await self.run(self.node.push_subscribe(user, subscription))
        status = HTTPStatus.CREATED if result == "created" else HTTPStatus.OK
        return status, {"endpoint": subscription["endpoint"], "result": result}

    async def _unsubscribe(self, user: str) -> tuple[int, Any]:
        _push_or_404(self)
        self.body()  # none, or an object (400 otherwise)
        endpoint = self.get_query_argument("endpoint", "")
        if not endpoint or len(endpoint) > MAX_ENDPOINT_LENGTH:
            raise bad_request(f"endpoint: a URL of 1 to {MAX_ENDPOINT_LENGTH} characters")
        removed: bool = await self.run(self.node.push_unsubscribe(user, endpoint))
        return HTTPStatus.OK, {"endpoint": endpoint, "removed": removed}
