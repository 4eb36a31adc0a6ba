"""The base of the HTTP API: JSON handlers, API errors and :class:`ApiHandler`.

:class:`ApiHandler` is public (``from pushsvc import ApiHandler``): plugins
that add API routes subclass it to get the same authentication (scope
``publish``), JSON bodies, size and rate limits, ``Idempotency-Key``
handling (:meth:`ApiHandler.accept_once`) and error bodies ``{"error":
code, "message": text}``. A subclass describes its routes for the OpenAPI
document with :meth:`ApiHandler.openapi_paths`.

Check order of every ``/api/v1`` request: token (401), scope ``publish``
(403), the caller's rate-limit bucket (429), body size (413), then the
endpoint's own validation (400 naming the field).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

import orjson
import tornado.web

from pushsvc.auth.tokens import AuthError, token_from_request
from pushsvc.config import Config
from pushsvc.core.node import Node
from pushsvc.http.limits import (
    DEFAULT_LIMIT,
    IDEMPOTENCY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    MAX_ID_LENGTH,
    MAX_IDS,
    MAX_LIMIT,
    MAX_RETRY_AFTER,
    REPLAYED_HEADER,
)
from pushsvc.plugin.api import CommandError, Delivery, Guarantee, Principal, PushOptions
from pushsvc.protocol.codes import RETRY_AFTER_UNAVAILABLE, ApiErrorCode, retry_after_header
from pushsvc.store import IdempotencyKey, StoreUnavailable

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
_DIGITS = re.compile(r"^[0-9]{1,9}$")


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
            self.set_header("Retry-After", retry_after_header(error.retry_after))
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
        describes their routes; build operations with ``openapi.operation``
        (``from pushsvc import openapi``).
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

    async def send(
        self,
        to: Sequence[str],
        message: dict[str, Any],
        guarantee: Guarantee,
        ttl: float | None = None,
        *,
        idempotency: IdempotencyKey | None = None,
        push: PushOptions | None = None,
    ) -> Delivery:
        """Deliver ``message`` to the users in ``to`` (``Node.send``), errors as API errors.

        ``idempotency`` is the key :meth:`accept_once` hands to its ``accept``:
        stored with an at-least-once message in the same transaction. A
        :class:`CommandError` (e.g. ``unavailable``) becomes its API error.
        ``push`` overrides the message type's Web Push mode (``Node.send``).
        """
        delivery: Delivery = await self.run(
            self.node.send(to, message, guarantee, ttl, idempotency=idempotency, push=push)
        )
        return delivery

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
        ``accept`` must store the key it is given with its message, in the
        same transaction: ``await self.send(..., idempotency=key)``.
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
