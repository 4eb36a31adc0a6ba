"""The HTTP API for app backends (PROTOCOL §4), plus health and metrics.

:class:`ApiHandler` is public: plugins that add API routes subclass it to
get the same authentication (scope ``publish``), JSON bodies, size and rate
limits, ``Idempotency-Key`` handling (:meth:`ApiHandler.accept_once`) and
error bodies ``{"error": code, "message": text}``. A subclass describes its
routes for the OpenAPI document with :meth:`ApiHandler.openapi_paths`.

Check order of every ``/api/v1`` request: token (401), scope ``publish``
(403), the caller's rate-limit bucket (429), body size (413), then the
endpoint's own validation (400 naming the field). Unknown routes answer 404
in JSON (:class:`NotFoundHandler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pushsvc.auth import revocation
from pushsvc.auth.tokens import AuthError, token_from_request
from pushsvc.broker import Envelope, EnvelopeKind, user_channel
from pushsvc.config import Config
from pushsvc.core.node import Node
from pushsvc.plugin.api import CommandError, Delivery, Guarantee, Principal
from pushsvc.plugin.manager import CORE_TYPES
from pushsvc.protocol.codes import ApiErrorCode
from pushsvc.store import IdempotencyKey, Revocation, StoreUnavailable

#: Server-only frame types that ``publish`` may not impersonate.
RESERVED_TYPES = CORE_TYPES | {"welcome", "reply", "error", "pong", "presence"}
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
#: HTTP status of each ``CommandError`` code a node operation may raise.
ERROR_STATUS = {
    "bad_request": HTTPStatus.BAD_REQUEST,
    "forbidden": HTTPStatus.FORBIDDEN,
    "rate_limited": HTTPStatus.TOO_MANY_REQUESTS,
    "too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
    "internal": HTTPStatus.INTERNAL_SERVER_ERROR,
    "unknown_type": HTTPStatus.BAD_REQUEST,
}
#: Longest room name (as for ``join`` frames).
MAX_ROOM_LENGTH = 200
#: Longest user id, ``jti`` or message id list entry accepted in a body.
MAX_NAME_LENGTH = 256
#: Longest message id in ``ids`` lists and ``after``.
MAX_ID_LENGTH = 64
#: Most ids in one dead-letter requeue or delete call.
MAX_IDS = 1000
#: ``limit`` of listings: default and largest.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: ``reason`` of a disconnect: characters, and bytes (a WebSocket close reason fits 123).
MAX_REASON_LENGTH = 100
MAX_REASON_BYTES = 123
#: Seconds a caller is told to wait after a store failure (503).
RETRY_AFTER_UNAVAILABLE = 1.0
#: Longest ``Retry-After`` announced (a bucket with rate 0 never refills).
MAX_RETRY_AFTER = 3600.0
#: The idempotency request header, its value's pattern, and the replay marker header.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[!-~]{1,255}$")
REPLAYED_HEADER = "Idempotent-Replayed"
_DIGITS = re.compile(r"^[0-9]{1,9}$")


def at_least_once_types(node: Node) -> list[str]:
    """Registered message types that need at-least-once delivery (not publishable)."""
    types = node.plugins.types.items()
    return sorted(k for k, t in types if t.message_type.guarantee is Guarantee.AT_LEAST_ONCE)


class ApiError(Exception):
    """An API failure: HTTP status, error code, message, optional Retry-After."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after  # seconds, for 429 and 503
        self.reason = reason  # machine-readable detail (401: why the token was refused)


def bad_request(message: str) -> ApiError:
    """A 400 ``bad_request`` whose message starts with the field's name."""
    return ApiError(HTTPStatus.BAD_REQUEST, ApiErrorCode.BAD_REQUEST, message)


def unavailable(exc: Exception) -> ApiError:
    """A 503 ``unavailable`` after a store failure: nothing was done, retry."""
    return ApiError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        ApiErrorCode.UNAVAILABLE,
        f"store unavailable, nothing was done: {exc}",
        RETRY_AFTER_UNAVAILABLE,
    )


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
        body = {"error": error.code, "message": error.message}
        if error.reason is not None:
            body["reason"] = error.reason
        if error.status == HTTPStatus.UNAUTHORIZED:
            self.set_header("WWW-Authenticate", 'Bearer realm="pushsvc"')
        self.send_json(error.status, body)

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (the ``Allow`` header of a 405)."""
        base = tornado.web.RequestHandler
        names = ("GET", "POST", "DELETE", "PUT", "PATCH")
        return [m for m in names if getattr(type(self), m.lower()) is not getattr(base, m.lower())]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Uncaught errors also answer in JSON."""
        if status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        codes: dict[int, ApiErrorCode] = {
            HTTPStatus.NOT_FOUND: ApiErrorCode.NOT_FOUND,
            HTTPStatus.METHOD_NOT_ALLOWED: ApiErrorCode.METHOD_NOT_ALLOWED,
        }
        code = codes.get(status_code, ApiErrorCode.INTERNAL)
        if status_code < HTTPStatus.INTERNAL_SERVER_ERROR and code == ApiErrorCode.INTERNAL:
            code = ApiErrorCode.BAD_REQUEST
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"error": code, "message": self._reason}))


class NotFoundHandler(JsonHandler):
    """Every path no route matches: 404 ``not_found`` in JSON, whatever the method."""

    def prepare(self) -> None:
        """Answer 404 before any method runs."""
        path = self.request.path
        message = f"no route for {self.request.method} {path}"
        self.send_api_error(ApiError(HTTPStatus.NOT_FOUND, ApiErrorCode.NOT_FOUND, message))


class _KeyLocks:
    """One asyncio lock per (client, Idempotency-Key) while requests with it run."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}  # key -> lock, users

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """Run the block alone among requests with the same key."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


#: Per node: the idempotency locks of requests in progress.
_KEY_LOCKS: weakref.WeakKeyDictionary[Node, _KeyLocks] = weakref.WeakKeyDictionary()


class ApiHandler(JsonHandler):
    """Base for ``/api/v1`` endpoints: a ``publish``-scoped token, rate limit, JSON body.

    Subclasses implement ``async def get/post/delete(...)``, call :meth:`body`
    and :meth:`field` to read input, and raise :class:`ApiError` on bad input
    (:meth:`handle` turns it into the error body).
    """

    principal: Principal

    @classmethod
    def openapi_paths(cls, config: Config) -> dict[str, Any]:
        """OpenAPI path items of this handler's routes (``{path: {method: operation}}``).

        Plugin handlers override this so that ``/api/v1/openapi.json``
        describes their routes; build operations with :func:`pushsvc.openapi.operation`.
        """
        return {}

    async def prepare(self) -> None:
        """Authenticate, check the scope, the per-client rate limit and the body size."""
        try:
            await self._authorize()
        except ApiError as error:
            self.send_api_error(error)

    async def _authorize(self) -> None:
        token = token_from_request(self.request.headers, None)
        try:
            self.principal = await self.node.authenticate(token)
        except AuthError as exc:
            raise ApiError(
                HTTPStatus.UNAUTHORIZED,
                ApiErrorCode.UNAUTHORIZED,
                f"token refused: {exc.reason}",
                reason=exc.reason,
            ) from exc
        if not self.principal.has_scope("publish"):
            raise ApiError(
                HTTPStatus.FORBIDDEN, ApiErrorCode.FORBIDDEN, "the token needs scope 'publish'"
            )
        retry = self.node.api_buckets.try_take(self.principal.user, time.monotonic())
        if retry:
            self.node.metrics.rate_limited.labels("api").inc()
            raise ApiError(
                HTTPStatus.TOO_MANY_REQUESTS,
                ApiErrorCode.RATE_LIMITED,
                "API rate limit exceeded (api.rate, api.burst)",
                retry_after=min(retry, MAX_RETRY_AFTER),
            )
        limit = self.node.config.api.max_body_bytes
        if len(self.request.body or b"") > limit:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                ApiErrorCode.TOO_LARGE,
                f"body over {limit} bytes (api.max_body_bytes)",
            )

    async def handle(self, work: Awaitable[tuple[int, Any]]) -> None:
        """Await ``work`` (an endpoint's ``(status, body)``) and answer; errors as JSON."""
        try:
            status, body = await work
        except ApiError as error:
            self.send_api_error(error)
            return
        self.send_json(status, body)

    # -- input ------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The JSON object body (400 otherwise)."""
        try:
            data = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"body: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise bad_request("body: must be a JSON object")
        return data

    @staticmethod
    def field(
        data: dict[str, Any],
        name: str,
        types: type | tuple[type, ...],
        *,
        required: bool = True,
        max_length: int | None = None,
        min_length: int | None = None,
    ) -> Any:
        """Read one body field, 400 naming it when missing or of the wrong type.

        ``null`` counts as absent. ``int`` is not accepted where only ``float``
        is listed, and ``bool`` never passes for a number.
        """
        value = data.get(name)
        if value is None:
            if required:
                raise bad_request(f"{name}: missing")
            return None
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise bad_request(f"{name}: wrong type")
        if isinstance(value, str | list):
            if max_length is not None and len(value) > max_length:
                raise bad_request(f"{name}: at most {max_length}")
            if min_length is not None and len(value) < min_length:
                raise bad_request(f"{name}: at least {min_length}")
        return value

    @classmethod
    def number(cls, data: dict[str, Any], name: str, *, required: bool = False) -> float | None:
        """A positive finite number field (seconds, epoch times), 400 naming it otherwise."""
        value = cls.field(data, name, (int, float), required=required)
        if value is not None and not 0 < value < float("inf"):
            raise bad_request(f"{name}: must be a positive number")
        return None if value is None else float(value)

    def query_limit(self) -> int:
        """The ``limit`` query argument: 1..1000, default 100."""
        raw = self.get_query_argument("limit", None)
        if raw is None:
            return DEFAULT_LIMIT
        if not _DIGITS.match(raw) or not 1 <= int(raw) <= MAX_LIMIT:
            raise bad_request(f"limit: an integer from 1 to {MAX_LIMIT}")
        return int(raw)

    def ids(self, data: dict[str, Any]) -> list[str]:
        """The ``ids`` field: 1..1000 message ids."""
        ids = self.field(data, "ids", list, max_length=MAX_IDS, min_length=1)
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_LENGTH for i in ids):
            raise bad_request(f"ids: message ids (strings of 1 to {MAX_ID_LENGTH} characters)")
        return list(dict.fromkeys(ids))

    def recipients(self, data: dict[str, Any]) -> list[str]:
        """The ``to`` field: a user id or a non-empty list of them, capped."""
        to = self.field(data, "to", (str, list))
        users = [to] if isinstance(to, str) else to
        if not users or not all(isinstance(u, str) and u for u in users):
            raise bad_request("to: a user id or a non-empty list of user ids")
        cap = self.node.config.api.max_recipients
        if len(users) > cap:
            raise bad_request(f"to: at most {cap} recipients (api.max_recipients)")
        return list(dict.fromkeys(users))

    # -- node operations ----------------------------------------------------------

    async def run(self, coroutine: Awaitable[Any]) -> Any:
        """Await a node operation, mapping :class:`CommandError` to an API error."""
        try:
            return await coroutine
        except CommandError as exc:
            status = ERROR_STATUS.get(exc.code, HTTPStatus.BAD_REQUEST)
            raise ApiError(status, exc.code, exc.message, exc.retry_after) from exc

    @staticmethod
    async def stored(coroutine: Awaitable[Any]) -> Any:
        """Await a store operation; a store failure becomes 503 ``unavailable``."""
        try:
            return await coroutine
        except StoreUnavailable as exc:
            raise unavailable(exc) from exc

    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header (400 when malformed); None when absent or off."""
        value = self.request.headers.get(IDEMPOTENCY_HEADER)
        if value is None or self.node.config.api.idempotency_window <= 0:
            return None
        if not IDEMPOTENCY_KEY_PATTERN.match(value):
            raise bad_request(f"{IDEMPOTENCY_HEADER}: 1 to 255 visible ASCII characters")
        return value

    def fingerprint(self, data: dict[str, Any]) -> str:
        """A hash of the request: method, path and the body in canonical form."""
        digest = hashlib.sha256()
        digest.update(f"{self.request.method} {self.request.path}\n".encode())
        digest.update(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()

    async def accept_once(
        self,
        data: dict[str, Any],
        accept: Callable[[IdempotencyKey | None], Awaitable[Delivery]],
    ) -> tuple[str, int]:
        """Run ``accept`` once per ``Idempotency-Key``; returns (message id, recipients).

        Without the header ``accept(None)`` runs. With it, a request that
        repeats an earlier one of the same API client (same key, same method,
        path and body) within ``api.idempotency_window`` answers what the
        first one did, with ``Idempotent-Replayed: true``, and stores nothing;
        the same key with another request is 409 ``idempotency_mismatch``.
        ``accept`` must store the key it is given with its message (in the
        same transaction: ``Node.send(..., idempotency=key)``).
        """
        key = self.idempotency_key()
        if key is None:
            delivery = await accept(None)
            return delivery.id, len(delivery.recipients)
        client, fingerprint = self.principal.user, self.fingerprint(data)
        locks = _KEY_LOCKS.setdefault(self.node, _KeyLocks())
        async with locks.hold((client, key)):
            found = await self.stored(self.node.store.idempotent_result(client, key, time.time()))
            if found is not None:
                if found.fingerprint != fingerprint:
                    raise ApiError(
                        HTTPStatus.CONFLICT,
                        ApiErrorCode.IDEMPOTENCY_MISMATCH,
                        f"{IDEMPOTENCY_HEADER}: already used for a different request",
                    )
                self.set_header(REPLAYED_HEADER, "true")
                return found.message_id, found.recipients
            expires_at = time.time() + self.node.config.api.idempotency_window
            delivery = await accept(IdempotencyKey(client, key, fingerprint, expires_at))
            return delivery.id, len(delivery.recipients)


class PublishHandler(ApiHandler):
    """``POST /api/v1/publish``: live fan-out to a room (at most once)."""

    async def post(self) -> None:
        """Publish ``{"room", "type"?, "text"?, "data"?}``; 202 ``{"id"}``."""
        await self.handle(self._publish())

    async def _publish(self) -> tuple[int, Any]:
        data = self.body()
        room = self.field(data, "room", str, max_length=MAX_ROOM_LENGTH, min_length=1)
        kind = self.field(data, "type", str, required=False)
        kind = "chat" if kind is None else kind
        if not TYPE_PATTERN.match(kind) or kind in RESERVED_TYPES:
            raise bad_request(f"type: {kind!r} cannot be published")
        if kind in at_least_once_types(self.node):
            raise bad_request(f"type: {kind!r} is at-least-once; use notify")
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
        return HTTPStatus.ACCEPTED, {"id": message_id}


class PendingHandler(ApiHandler):
    """``GET /api/v1/users/{user}/pending``: unacked messages of a user."""

    async def get(self, user: str) -> None:
        """200 ``{"messages": [...]}``, oldest first, after id ``after``, at most ``limit``."""
        await self.handle(self._pending(user))

    async def _pending(self, user: str) -> tuple[int, Any]:
        limit = self.query_limit()
        after = self.get_query_argument("after", "")
        if len(after) > MAX_ID_LENGTH:
            raise bad_request(f"after: at most {MAX_ID_LENGTH} characters")
        rows = await self.stored(self.node.store.pending(user, after, limit))
        messages = [{**orjson.loads(row.frame), "attempts": row.attempts} for row in rows]
        return HTTPStatus.OK, {"messages": messages}


class DisconnectHandler(ApiHandler):
    """``POST /api/v1/users/{user}/disconnect``: close a user's connections with 4003."""

    async def post(self, user: str) -> None:
        """200 ``{"closed": n}`` (n counts this node's connections)."""
        await self.handle(self._disconnect(user))

    async def _disconnect(self, user: str) -> tuple[int, Any]:
        data = self.body()
        reason = self.field(data, "reason", str, required=False, max_length=MAX_REASON_LENGTH)
        if reason is not None and len(reason.encode()) > MAX_REASON_BYTES:
            raise bad_request(f"reason: at most {MAX_REASON_BYTES} bytes in UTF-8")
        closed = await self.node.disconnect_user(user, reason or "disconnected by the server")
        return HTTPStatus.OK, {"closed": closed}


class PresenceHandler(ApiHandler):
    """``GET /api/v1/rooms/{room}/presence``: users in a room."""

    async def get(self, room: str) -> None:
        """200 ``{"users": [...]}`` (distinct users with a connection on this node, sorted)."""
        await self.handle(self._presence(room))

    async def _presence(self, room: str) -> tuple[int, Any]:
        if len(room) > MAX_ROOM_LENGTH:
            raise bad_request(f"room: at most {MAX_ROOM_LENGTH} characters")
        return HTTPStatus.OK, {"users": self.node.presence(room)}


class DeadLettersHandler(ApiHandler):
    """``GET`` and ``DELETE /api/v1/users/{user}/dead-letters``."""

    async def get(self, user: str) -> None:
        """200 ``{"messages": [...]}``: the frames with ``reason`` and ``dead_at``, oldest first."""
        await self.handle(self._list(user))

    async def delete(self, user: str) -> None:
        """Delete ``{"ids": [...]}``; 200 ``{"deleted": n}``."""
        await self.handle(delete_dead_letters(self, user))

    async def _list(self, user: str) -> tuple[int, Any]:
        letters = await self.stored(self.node.store.dead_letters(user, self.query_limit()))
        messages = [
            {**orjson.loads(letter.frame), "reason": letter.reason, "dead_at": letter.dead_at}
            for letter in letters
        ]
        return HTTPStatus.OK, {"messages": messages}


class DeadLettersDeleteHandler(ApiHandler):
    """``POST /api/v1/users/{user}/dead-letters/delete``: for clients without DELETE bodies."""

    async def post(self, user: str) -> None:
        """Delete ``{"ids": [...]}``; 200 ``{"deleted": n}``."""
        await self.handle(delete_dead_letters(self, user))


async def delete_dead_letters(handler: ApiHandler, user: str) -> tuple[int, Any]:
    """Delete the dead letters of ``user`` among ``ids``."""
    ids = handler.ids(handler.body())
    deleted = await handler.stored(handler.node.store.delete_dead(user, ids))
    return HTTPStatus.OK, {"deleted": deleted}


class DeadLettersRequeueHandler(ApiHandler):
    """``POST /api/v1/users/{user}/dead-letters/requeue``: dead letters become pending again."""

    async def post(self, user: str) -> None:
        """Requeue ``{"ids": [...]}``; 200 ``{"requeued": n, "ids": [...]}``."""
        await self.handle(self._requeue(user))

    async def _requeue(self, user: str) -> tuple[int, Any]:
        ids = self.ids(self.body())
        node = self.node
        store = node.store
        expires_at = time.time() + node.config.delivery.ttl
        requeued = await self.stored(store.requeue(user, ids, expires_at))
        frames = await self.stored(store.frames(requeued)) if requeued else {}
        # Connected clients get them now, through the delivery window like any new message.
        for message_id in requeued:
            kind, frame = frames[message_id]
            envelope = Envelope(EnvelopeKind.DURABLE, kind, message_id, frame)
            await node.broker.publish(user_channel(user), envelope)
        return HTTPStatus.OK, {"requeued": len(requeued), "ids": requeued}


class RevocationsHandler(ApiHandler):
    """``GET`` and ``POST /api/v1/revocations``: revoked tokens."""

    async def get(self) -> None:
        """200 ``{"revocations": [...]}``: those in force, oldest first."""
        listing = [revocation.to_json(entry) for entry in self.node.revocations.listing()]
        self.send_json(HTTPStatus.OK, {"revocations": listing})

    async def post(self) -> None:
        """Revoke ``{"jti"}`` or ``{"user", "until"?}``; 200 with the entry and ``closed``."""
        await self.handle(self._revoke())

    async def _revoke(self) -> tuple[int, Any]:
        entry = self._revocation(self.body())
        stored, closed = await self.stored(self.node.revoke(entry))
        return HTTPStatus.OK, {**revocation.to_json(stored), "closed": closed}

    def _revocation(self, data: dict[str, Any]) -> Revocation:
        jti = self.field(data, "jti", str, required=False, max_length=MAX_NAME_LENGTH, min_length=1)
        user = self.field(
            data, "user", str, required=False, max_length=MAX_NAME_LENGTH, min_length=1
        )
        if (jti is None) == (user is None):
            raise bad_request("jti or user: exactly one of them is required")
        until = self.number(data, "until")
        expires_at = self.number(data, "expires_at")
        now = time.time()
        if jti is not None:
            if until is not None:
                raise bad_request("until: only with user")
            return Revocation(revocation.JTI, jti, None, now, expires_at)
        return Revocation(revocation.USER, user, now if until is None else until, now, expires_at)


class OpenApiHandler(JsonHandler):
    """``GET /api/v1/openapi.json``: the OpenAPI 3.1 document of this server's API."""

    def get(self) -> None:
        """200 with the document (core routes and the plugins' routes); no token needed."""
        from pushsvc.http import openapi  # the document module builds on this one's names

        self.send_json(HTTPStatus.OK, openapi.document(self.node))


class HealthHandler(JsonHandler):
    """``GET /healthz``: 200 while the process runs."""

    def get(self) -> None:
        """Always 200."""
        self.send_json(200, {"status": "ok"})


_FAILED_CHECK = {"serving": "draining"}  # how a failed check is named in the message


class ReadyHandler(JsonHandler):
    """``GET /readyz``: 200 when it can accept and persist; 503 naming the failed check."""

    async def get(self) -> None:
        """Check store (a real write, bounded by ``store.busy_timeout``), broker, draining."""
        node = self.node
        store_ok = await node.store.check()
        broker_ok = node.broker.healthy()
        # Every check is true when it passes; "serving" is false while the node drains.
        checks = {"store": store_ok, "broker": broker_ok, "serving": not node.draining}
        if all(checks.values()):
            self.send_json(200, {"status": "ready", "checks": checks})
            return
        failed = [_FAILED_CHECK.get(name, name) for name, ok in checks.items() if not ok]
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
    user = r"/api/v1/users/([^/]+)"
    return [
        (r"/healthz", HealthHandler, kwargs),
        (r"/readyz", ReadyHandler, kwargs),
        (r"/metrics", MetricsHandler, kwargs),
        (r"/api/v1/openapi\.json", OpenApiHandler, kwargs),
        (r"/api/v1/publish", PublishHandler, kwargs),
        (rf"{user}/pending", PendingHandler, kwargs),
        (rf"{user}/disconnect", DisconnectHandler, kwargs),
        (rf"{user}/dead-letters", DeadLettersHandler, kwargs),
        (rf"{user}/dead-letters/requeue", DeadLettersRequeueHandler, kwargs),
        (rf"{user}/dead-letters/delete", DeadLettersDeleteHandler, kwargs),
        (r"/api/v1/rooms/([^/]+)/presence", PresenceHandler, kwargs),
        (r"/api/v1/revocations", RevocationsHandler, kwargs),
    ]
