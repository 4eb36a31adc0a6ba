"""The HTTP API for app backends (PROTOCOL §4), plus health and metrics.

:class:`ApiHandler` is public: plugins that add API routes subclass it to
get the same authentication (scope ``publish``), JSON bodies, size and rate
limits, and error bodies ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pushsvc.auth import AuthError, token_from_request
from pushsvc.node import Node
from pushsvc.plugin_api import CommandError, Guarantee, Principal
from pushsvc.plugins import CORE_TYPES

#: Server-only frame types that ``publish`` may not impersonate.
RESERVED_TYPES = CORE_TYPES | {"welcome", "reply", "error", "pong", "presence"}
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
ERROR_STATUS = {
    "bad_request": 400,
    "forbidden": 403,
    "rate_limited": 429,
    "too_large": 413,
    "unavailable": 503,
    "internal": 500,
    "unknown_type": 400,
}


class ApiError(Exception):
    """An API failure: HTTP status, error code, message, optional Retry-After."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class JsonHandler(tornado.web.RequestHandler):
    """Base for JSON endpoints: uniform error bodies."""

    node: Node

    def initialize(self, node: Node) -> None:
        """Receive the node."""
        self.node = node

    def send_json(self, status: int, body: Any) -> None:
        """Finish with a JSON body."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))

    def send_api_error(self, error: ApiError) -> None:
        """Finish with ``{"error", "message"}`` (and ``Retry-After``)."""
        if error.retry_after is not None:
            self.set_header("Retry-After", str(max(1, round(error.retry_after))))
        self.send_json(error.status, {"error": error.code, "message": error.message})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Uncaught errors also answer in JSON."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(status_code, "internal")
        if status_code < 500 and code == "internal":
            code = "bad_request"
        self.finish({"error": code, "message": self._reason})


class ApiHandler(JsonHandler):
    """Base for ``/api/v1`` endpoints: a ``publish``-scoped token, rate limit, JSON body.

    Subclasses implement ``async def get/post(...)``, call :meth:`body` and
    :meth:`field` to read input, and raise :class:`ApiError` on bad input.
    """

    principal: Principal

    async def prepare(self) -> None:
        """Authenticate, check the scope and the per-client rate limit."""
        try:
            await self._authorize()
        except ApiError as error:
            self.send_api_error(error)

    async def _authorize(self) -> None:
        token = token_from_request(self.request.headers, None)
        try:
            self.principal = await self.node.authenticate(token)
        except AuthError as exc:
            raise ApiError(401, "unauthorized", f"token refused: {exc.reason}") from exc
        if not self.principal.has_scope("publish"):
            raise ApiError(403, "forbidden", "the token needs scope 'publish'")
        retry = self.node.api_buckets.try_take(self.principal.user, time.monotonic())
        if retry:
            self.node.metrics.rate_limited.labels("api").inc()
            raise ApiError(429, "rate_limited", "API rate limit exceeded", retry_after=retry)
        if len(self.request.body or b"") > self.node.config.api.max_body_bytes:
            raise ApiError(
                413, "too_large", f"body over {self.node.config.api.max_body_bytes} bytes"
            )

    def body(self) -> dict[str, Any]:
        """The JSON object body (400 otherwise)."""
        try:
            data = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_request", f"body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return data

    @staticmethod
    def field(
        data: dict[str, Any],
        name: str,
        types: type | tuple[type, ...],
        *,
        required: bool = True,
        max_length: int | None = None,
    ) -> Any:
        """Read one body field, 400 naming it when missing or of the wrong type."""
        value = data.get(name)
        if value is None:
            if required:
                raise ApiError(400, "bad_request", f"{name}: missing")
            return None
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ApiError(400, "bad_request", f"{name}: wrong type")
        if max_length is not None and isinstance(value, str | list) and len(value) > max_length:
            raise ApiError(400, "bad_request", f"{name}: at most {max_length}")
        return value

    async def run(self, coroutine: Any) -> Any:
        """Await a node operation, mapping :class:`CommandError` to an API error."""
        try:
            return await coroutine
        except CommandError as exc:
            status = ERROR_STATUS.get(exc.code, 400)
            raise ApiError(status, exc.code, exc.message, exc.retry_after) from exc

    def recipients(self, data: dict[str, Any]) -> list[str]:
        """The ``to`` field: a user id or a non-empty list of them, capped."""
        to = self.field(data, "to", (str, list))
        users = [to] if isinstance(to, str) else to
        if not users or not all(isinstance(u, str) and u for u in users):
            raise ApiError(400, "bad_request", "to: a user id or a list of user ids")
        if len(users) > self.node.config.api.max_recipients:
            raise ApiError(
                400, "bad_request", f"to: at most {self.node.config.api.max_recipients} recipients"
            )
        return list(dict.fromkeys(users))


class PublishHandler(ApiHandler):
    """``POST /api/v1/publish``: live fan-out to a room (at most once)."""

    async def post(self) -> None:
        """Publish ``{"room", "type"?, "text"?, "data"?}``; 202 ``{"id"}``."""
        try:
            data = self.body()
            room = self.field(data, "room", str, max_length=200)
            kind = self.field(data, "type", str, required=False) or "chat"
            if not TYPE_PATTERN.match(kind) or kind in RESERVED_TYPES:
                raise ApiError(400, "bad_request", f"type: {kind!r} cannot be published")
            registered = self.node.plugins.types.get(kind)
            if registered and registered.message_type.guarantee is Guarantee.AT_LEAST_ONCE:
                raise ApiError(400, "bad_request", f"type: {kind!r} is at-least-once; use notify")
            message: dict[str, Any] = {"type": kind, "room": room, "user": self.principal.user}
            if self.principal.name:
                message["name"] = self.principal.name
            text = self.field(data, "text", str, required=False)
            if text is not None:
                message["text"] = text
            extra = self.field(data, "data", dict, required=False)
            if extra is not None:
                message["data"] = extra
            message_id = await self.node.publish(room, message)
            self.send_json(202, {"id": message_id})
        except ApiError as error:
            self.send_api_error(error)


class PendingHandler(ApiHandler):
    """``GET /api/v1/users/{user}/pending``: unacked messages of a user."""

    async def get(self, user: str) -> None:
        """200 ``{"messages": [...]}``, oldest first (at most ``limit``, default 100)."""
        try:
            limit = min(1000, max(1, int(self.get_query_argument("limit", "100"))))
        except ValueError:
            self.send_api_error(ApiError(400, "bad_request", "limit: must be an integer"))
            return
        after = self.get_query_argument("after", "")
        try:
            rows = await self.node.store.pending(user, after, limit)
        except Exception as exc:
            self.send_api_error(ApiError(503, "unavailable", f"store unavailable: {exc}", 1))
            return
        messages = [{**orjson.loads(row.frame), "attempts": row.attempts} for row in rows]
        self.send_json(200, {"messages": messages})


class DisconnectHandler(ApiHandler):
    """``POST /api/v1/users/{user}/disconnect``: close a user's connections with 4003."""

    async def post(self, user: str) -> None:
        """200 ``{"closed": n}`` (n counts this node's connections)."""
        try:
            data = self.body()
            reason = self.field(data, "reason", str, required=False, max_length=100) or (
                "disconnected by the server"
            )
            closed = await self.node.disconnect_user(user, reason)
            self.send_json(200, {"closed": closed})
        except ApiError as error:
            self.send_api_error(error)


class PresenceHandler(ApiHandler):
    """``GET /api/v1/rooms/{room}/presence``: users in a room."""

    async def get(self, room: str) -> None:
        """200 ``{"users": [...]}``."""
        self.send_json(200, {"users": self.node.presence(room)})


class HealthHandler(JsonHandler):
    """``GET /healthz``: 200 while the process runs."""

    def get(self) -> None:
        """Always 200."""
        self.send_json(200, {"status": "ok"})


class ReadyHandler(JsonHandler):
    """``GET /readyz``: 200 when it can accept and persist; 503 naming the failed check."""

    async def get(self) -> None:
        """Check store (a real write, bounded by ``store.busy_timeout``), broker, draining."""
        node = self.node
        store_ok = await node.store.check()
        broker_ok = node.broker.healthy()
        checks = {"store": store_ok, "broker": broker_ok, "draining": not node.draining}
        if all(checks.values()):
            self.send_json(200, {"status": "ready", "checks": checks})
            return
        failed = [name for name, ok in checks.items() if not ok]
        self.send_json(
            503,
            {
                "error": "unavailable",
                "message": f"not ready: {', '.join(failed)}",
                "checks": checks,
            },
        )


class MetricsHandler(JsonHandler):
    """``GET /metrics``: Prometheus text format."""

    def get(self) -> None:
        """The node's registry."""
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.node.metrics.registry))


def routes(node: Node) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
    """The core HTTP routes."""
    kwargs = {"node": node}
    return [
        (r"/healthz", HealthHandler, kwargs),
        (r"/readyz", ReadyHandler, kwargs),
        (r"/metrics", MetricsHandler, kwargs),
        (r"/api/v1/publish", PublishHandler, kwargs),
        (r"/api/v1/users/([^/]+)/pending", PendingHandler, kwargs),
        (r"/api/v1/users/([^/]+)/disconnect", DisconnectHandler, kwargs),
        (r"/api/v1/rooms/([^/]+)/presence", PresenceHandler, kwargs),
    ]
