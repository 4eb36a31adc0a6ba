"""The OpenAPI 3.1 document of the server API, served at ``/api/v1/openapi.json``.

Generated once at startup from the route table (:mod:`pushsvc.http.routes`),
then served from memory. Core routes are described here; any handler in the
table with an ``openapi_paths(config)`` class method (a plugin's
:class:`~pushsvc.http.base.ApiHandler`) describes its own routes, built with
:func:`operation` and the other helpers below, so the document lists every
route the server answers without core naming any plugin. Limits that come
from the config (recipients per call, body size) are read from the config.

This module imports no handler: handlers and the route table import it.
Plugins reach it as ``from pushsvc import openapi``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from pushsvc.config import Config
from pushsvc.http.limits import (
    IDEMPOTENCY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    MAX_ID_LENGTH,
    MAX_IDS,
    MAX_LIMIT,
    MAX_NAME_LENGTH,
    MAX_OFFSET,
    MAX_REASON_LENGTH,
    MAX_ROOM_LENGTH,
    RESERVED_TYPES,
    TYPE_PATTERN,
)
from pushsvc.protocol.codes import ApiErrorCode
from pushsvc.protocol.webpush import MAX_ENDPOINT_LENGTH
from pushsvc.version import __version__

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
JSON = "application/json"
#: Error answers every ``/api/v1`` operation may give (component response names).
COMMON_ERRORS: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "BadRequest",
    HTTPStatus.UNAUTHORIZED: "Unauthorized",
    HTTPStatus.FORBIDDEN: "Forbidden",
    HTTPStatus.NOT_FOUND: "NotFound",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "TooLarge",
    HTTPStatus.TOO_MANY_REQUESTS: "RateLimited",
    HTTPStatus.SERVICE_UNAVAILABLE: "Unavailable",
}
#: The response of a reused ``Idempotency-Key`` (for operations that take one).
IDEMPOTENCY_MISMATCH: dict[int, str] = {HTTPStatus.CONFLICT: "IdempotencyMismatch"}


# -- helpers (public: plugins use them) ---------------------------------------------


def schema_ref(name: str) -> dict[str, str]:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` or ``null`` (pushsvc reads a ``null`` optional field as absent)."""
    return {"anyOf": [dict(schema), {"type": "null"}]}


def json_body(
    schema: Mapping[str, Any], description: str = "", *, required: bool = True
) -> dict[str, Any]:
    """A JSON request body (``required=False``: an empty body counts as ``{}``)."""
    body: dict[str, Any] = {"required": required, "content": {JSON: {"schema": dict(schema)}}}
    if description:
        body["description"] = description
    return body


def json_response(
    description: str, schema: Mapping[str, Any], headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON response object."""
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def path_param(name: str, description: str) -> dict[str, Any]:
    """A required string path parameter."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def query_param(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    """An optional query parameter."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": dict(schema),
    }


def idempotency_key_param() -> dict[str, Any]:
    """The optional ``Idempotency-Key`` request header."""
    return {
        "name": IDEMPOTENCY_HEADER,
        "in": "header",
        "required": False,
        "description": (
            "Makes a retry safe: the same key (per API client) with the same request "
            "within `api.idempotency_window` answers the first result and stores "
            "nothing new; with a different request it is 409 `idempotency_mismatch`."
        ),
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
    }


def operation(
    summary: str,
    *,
    operation_id: str,
    tag: str,
    ok: tuple[int, str, Mapping[str, Any]],
    description: str = "",
    request: Mapping[str, Any] | None = None,
    request_required: bool = True,
    parameters: Iterable[Mapping[str, Any]] = (),
    errors: Mapping[int, str] | None = None,
    ok_headers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An authenticated API operation with the common error answers.

    Args:
        ok: (status, description, JSON schema) of the success answer.
        request: the JSON request body schema, if the operation takes one.
        request_required: False when an empty body is read as ``{}``.
        errors: extra ``{status: component response name}`` besides :data:`COMMON_ERRORS`.
    """
    responses: dict[str, Any] = {str(ok[0]): json_response(ok[1], ok[2], ok_headers)}
    for status, name in {**COMMON_ERRORS, **(errors or {})}.items():
        responses[str(int(status))] = {"$ref": f"#/components/responses/{name}"}
    result: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": [tag],
        "responses": dict(sorted(responses.items())),
    }
    if description:
        result["description"] = description
    params = list(parameters)
    if params:
        result["parameters"] = [dict(p) for p in params]
    if request is not None:
        result["requestBody"] = json_body(request, required=request_required)
    return result


# -- shared schemas and responses -------------------------------------------------------


def _obj(properties: Mapping[str, Any], required: Iterable[str] = ()) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": dict(properties)}


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_EPOCH = {"type": "number", "description": "seconds since the epoch"}
_RETRY_AFTER = {
    "description": "seconds to wait before retrying",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def _schemas() -> dict[str, Any]:
    message = _obj(
        {
            "type": _STRING,
            "id": {"type": "string", "description": "unique, sortable by time; kept on resends"},
            "timestamp": {"type": "integer", "description": "server clock, milliseconds"},
            "ack": {"type": "boolean"},
        },
        ["type", "id", "timestamp"],
    )
    message["description"] = "A frame as clients receive it (more fields by type)."
    pending = {"allOf": [message, _obj({"attempts": _COUNT}, ["attempts"])]}
    dead = {
        "allOf": [
            message,
            _obj(
                {"reason": {"enum": ["max_attempts", "ttl"]}, "dead_at": _EPOCH},
                ["reason", "dead_at"],
            ),
        ]
    }
    revocation = _obj(
        {
            "jti": _STRING,
            "user": _STRING,
            "until": {**_EPOCH, "description": "tokens of `user` with `iat` before this"},
            "created_at": _EPOCH,
            "expires_at": {"anyOf": [_EPOCH, {"type": "null"}]},
        },
        ["created_at", "expires_at"],
    )
    return {
        "Error": _obj(
            {
                "error": {"type": "string", "enum": [code.value for code in ApiErrorCode]},
                "message": _STRING,
                "reason": {"type": "string", "description": "401: why the token was refused"},
            },
            ["error", "message"],
        ),
        "Message": message,
        "PendingMessage": pending,
        "RoomPublication": {
            "allOf": [
                message,
                _obj(
                    {
                        "room": _STRING,
                        "offset": {**_COUNT, "description": "one more per room publication"},
                        "epoch": {"type": "string", "description": "the room history's epoch"},
                    },
                    ["offset", "epoch"],
                ),
            ]
        },
        "DeadLetter": dead,
        "Revocation": revocation,
        "Ids": _obj(
            {
                "ids": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_IDS,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                }
            },
            ["ids"],
        ),
    }


def _error(description: str, headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return json_response(description, schema_ref("Error"), headers)


def _responses(config: Config) -> dict[str, Any]:
    return {
        "BadRequest": _error("`bad_request`: invalid input; the message names the field"),
        "Unauthorized": _error(
            "`unauthorized`: no token, or a refused one (`reason`: `expired`, `revoked`...)",
            {"WWW-Authenticate": {"schema": _STRING}},
        ),
        "Forbidden": _error("`forbidden`: the token lacks scope `publish`"),
        "NotFound": _error("`not_found`: no such route"),
        "TooLarge": _error(
            f"`too_large`: body over `api.max_body_bytes` ({config.api.max_body_bytes} bytes)"
        ),
        "RateLimited": _error(
            "`rate_limited`: the API client's bucket (`api.rate`, `api.burst`) is empty",
            {"Retry-After": _RETRY_AFTER},
        ),
        "Unavailable": _error(
            "`unavailable`: the store or the broker failed; nothing was done; retry",
            {"Retry-After": _RETRY_AFTER},
        ),
        "IdempotencyMismatch": _error(
            "`idempotency_mismatch`: the `Idempotency-Key` was used for a different request"
        ),
    }


# -- core paths -----------------------------------------------------------------------


_USER = path_param("user", "the user id (a token's `sub`)")
_LIMIT = query_param(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "most entries (default 100)"
)


def _api_paths(unpublishable: list[str]) -> dict[str, Any]:
    user = "/api/v1/users/{user}"
    ids_body = schema_ref("Ids")
    dead_list = _obj(
        {"messages": {"type": "array", "items": schema_ref("DeadLetter")}}, ["messages"]
    )
    return {
        "/api/v1/publish": {
            "post": operation(
                "Publish to a room (live, at most once)",
                operation_id="publish",
                tag="messages",
                request=_obj(
                    {
                        "room": {"type": "string", "minLength": 1, "maxLength": MAX_ROOM_LENGTH},
                        "type": nullable(
                            {
                                "type": "string",
                                "pattern": TYPE_PATTERN.pattern,
                                "not": {"enum": unpublishable},
                                "description": "default `chat`; not a core or at-least-once type",
                            }
                        ),
                        "text": nullable(_STRING),
                        "data": nullable({"type": "object"}),
                    },
                    ["room"],
                ),
                ok=(HTTPStatus.ACCEPTED, "fanned out", _obj({"id": _STRING}, ["id"])),
            )
        },
        f"{user}/pending": {
            "get": operation(
                "A user's unacked messages",
                operation_id="pending",
                tag="users",
                parameters=[
                    _USER,
                    _LIMIT,
                    query_param(
                        "after",
                        {"type": "string", "maxLength": MAX_ID_LENGTH},
                        "only ids after this one (paging)",
                    ),
                ],
                ok=(
                    HTTPStatus.OK,
                    "oldest first",
                    _obj(
                        {"messages": {"type": "array", "items": schema_ref("PendingMessage")}},
                        ["messages"],
                    ),
                ),
            )
        },
        f"{user}/disconnect": {
            "post": operation(
                "Close a user's connections (4003)",
                operation_id="disconnect",
                tag="users",
                parameters=[_USER],
                request=_obj(
                    {
                        "reason": nullable(
                            {
                                "type": "string",
                                "maxLength": MAX_REASON_LENGTH,
                                "description": "close reason, at most 123 bytes in UTF-8",
                            }
                        )
                    }
                ),
                request_required=False,
                ok=(
                    HTTPStatus.OK,
                    "connections closed on this node",
                    _obj({"closed": _COUNT}, ["closed"]),
                ),
            )
        },
        f"{user}/dead-letters": {
            "get": operation(
                "A user's dead letters",
                operation_id="deadLetters",
                tag="dead letters",
                parameters=[_USER, _LIMIT],
                ok=(HTTPStatus.OK, "oldest first", dead_list),
            ),
            "delete": _delete_dead_letters("deleteDeadLetters"),
        },
        f"{user}/dead-letters/delete": {"post": _delete_dead_letters("deleteDeadLettersPost")},
        f"{user}/dead-letters/requeue": {
            "post": operation(
                "Requeue dead letters (pending again, delivered to connected clients)",
                operation_id="requeueDeadLetters",
                tag="dead letters",
                parameters=[_USER],
                request=ids_body,
                ok=(
                    HTTPStatus.OK,
                    "the ids that were dead letters of this user",
                    _obj(
                        {"requeued": _COUNT, "ids": {"type": "array", "items": _STRING}},
                        ["requeued", "ids"],
                    ),
                ),
            )
        },
        "/api/v1/rooms/{room}/presence": {
            "get": operation(
                "Users in a room (every node)",
                operation_id="presence",
                tag="rooms",
                parameters=[path_param("room", "the room name")],
                ok=(
                    HTTPStatus.OK,
                    "distinct users, sorted",
                    _obj({"users": {"type": "array", "items": _STRING}}, ["users"]),
                ),
            )
        },
        "/api/v1/rooms/{room}/history": {
            "get": operation(
                "A page of a room's history",
                operation_id="history",
                tag="rooms",
                description=(
                    "Recorded room publications (chat, `publish`, plugin types that opt in), "
                    "as clients received them, with `offset` and `epoch`. Forward from "
                    "`since` (exclusive; default 0) oldest first, or with `reverse` back "
                    "from `since` (exclusive; default the latest) newest first. Pass "
                    "`next` as `since` for the following page; `next` is null on the last."
                ),
                parameters=[
                    path_param("room", "the room name"),
                    query_param(
                        "since",
                        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                        "an offset (exclusive)",
                    ),
                    _LIMIT,
                    query_param("reverse", {"type": "boolean", "default": False}, "newest first"),
                ],
                ok=(
                    HTTPStatus.OK,
                    "a page and the room's position",
                    _obj(
                        {
                            "room": _STRING,
                            "epoch": {
                                "type": "string",
                                "description": "the history's epoch; empty: the room has none",
                            },
                            "offset": {**_COUNT, "description": "the latest offset (0: none)"},
                            "earliest": {
                                **_COUNT,
                                "description": "smallest offset still kept (offset + 1: none)",
                            },
                            "publications": {
                                "type": "array",
                                "items": schema_ref("RoomPublication"),
                            },
                            "next": {
                                "anyOf": [_COUNT, {"type": "null"}],
                                "description": "`since` of the next page; null: no more",
                            },
                        },
                        ["room", "epoch", "offset", "earliest", "publications", "next"],
                    ),
                ),
            )
        },
        "/api/v1/revocations": {
            "get": operation(
                "Revocations in force",
                operation_id="revocations",
                tag="tokens",
                ok=(
                    HTTPStatus.OK,
                    "oldest first",
                    _obj(
                        {"revocations": {"type": "array", "items": schema_ref("Revocation")}},
                        ["revocations"],
                    ),
                ),
            ),
            "post": operation(
                "Revoke a token (jti) or a user's tokens issued before a time",
                operation_id="revoke",
                tag="tokens",
                description=(
                    "Open connections holding a revoked token are closed with 4001 "
                    "`token revoked`; new handshakes get 401 `revoked`."
                ),
                request=_revocation_request(),
                ok=(
                    HTTPStatus.OK,
                    "the stored revocation and how many connections were closed",
                    {"allOf": [schema_ref("Revocation"), _obj({"closed": _COUNT}, ["closed"])]},
                ),
            ),
        },
    }


def _delete_dead_letters(operation_id: str) -> dict[str, Any]:
    return operation(
        "Delete dead letters",
        operation_id=operation_id,
        tag="dead letters",
        parameters=[_USER],
        request=schema_ref("Ids"),
        ok=(HTTPStatus.OK, "how many were deleted", _obj({"deleted": _COUNT}, ["deleted"])),
    )


def _revocation_request() -> dict[str, Any]:
    name = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH}
    positive = nullable({"type": "number", "exclusiveMinimum": 0})
    return {
        "oneOf": [
            _obj({"jti": name, "expires_at": positive, "user": False, "until": False}, ["jti"]),
            _obj({"user": name, "until": positive, "expires_at": positive, "jti": False}, ["user"]),
        ],
        "description": (
            "`until` defaults to now; `expires_at`: forget the revocation after this "
            "time (e.g. the token's `exp`); absent: kept."
        ),
    }


def _public(summary: str, operation_id: str, ok: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["operations"],
        "security": [],
        "responses": {"200": ok, **more},
    }


def _ops_paths() -> dict[str, Any]:
    ready = _obj({"status": _STRING, "checks": {"type": "object"}}, ["status", "checks"])
    not_ready = {"allOf": [schema_ref("Error"), _obj({"checks": {"type": "object"}}, ["checks"])]}
    return {
        "/healthz": {
            "get": _public(
                "Liveness", "healthz", json_response("running", _obj({"status": _STRING}))
            )
        },
        "/readyz": {
            "get": _public(
                "Readiness: store writable, broker connected, not draining",
                "readyz",
                json_response("ready", ready),
                **{"503": json_response("not ready; `checks` names the failed check", not_ready)},
            )
        },
        "/metrics": {
            "get": _public(
                "Prometheus metrics",
                "metrics",
                {
                    "description": "text exposition format",
                    "content": {"text/plain": {"schema": _STRING}},
                },
            )
        },
        "/api/v1/openapi.json": {
            "get": _public(
                "This document", "openapi", json_response("OpenAPI 3.1", {"type": "object"})
            )
        },
    }


def _push_paths() -> dict[str, Any]:
    """The Web Push routes (served when ``push.enabled``)."""
    user = "/api/v1/users/{user}/push-subscriptions"
    endpoint = {"type": "string", "minLength": 1, "maxLength": MAX_ENDPOINT_LENGTH}
    subscription = {
        "type": "object",
        "required": ["endpoint", "keys"],
        "properties": {
            "endpoint": endpoint,
            "keys": _obj(
                {
                    "p256dh": {
                        "type": "string",
                        "pattern": "^B[A-P][A-Za-z0-9_-]{85}=?$",
                        "description": "uncompressed P-256 point, base64url",
                    },
                    "auth": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9_-]{22}(==)?$",
                        "description": "16 bytes, base64url",
                    },
                },
                ["p256dh", "auth"],
            ),
        },
        "description": "the browser's `PushSubscription.toJSON()`",
    }
    result = _obj(
        {"endpoint": _STRING, "result": {"enum": ["created", "updated"]}}, ["endpoint", "result"]
    )
    return {
        "/api/v1/push/vapid-public-key": {
            "get": _public(
                "The VAPID public key (applicationServerKey)",
                "vapidPublicKey",
                json_response("base64url", _obj({"public_key": _STRING}, ["public_key"])),
            )
        },
        user: {
            "get": operation(
                "A user's Web Push subscriptions (endpoints only)",
                operation_id="pushSubscriptions",
                tag="push",
                parameters=[_USER],
                ok=(
                    HTTPStatus.OK,
                    "oldest first",
                    _obj(
                        {
                            "subscriptions": {
                                "type": "array",
                                "items": _obj(
                                    {"endpoint": _STRING, "created_at": _EPOCH},
                                    ["endpoint", "created_at"],
                                ),
                            }
                        },
                        ["subscriptions"],
                    ),
                ),
            ),
            "post": operation(
                "Register a Web Push subscription for a user",
                operation_id="pushSubscribe",
                tag="push",
                description=(
                    "201 for a new endpoint, 200 for a known one (keys replaced). 403 "
                    "`forbidden` for an endpoint that is not https, not an allowed push "
                    "service, or resolves to a non-public address, and past "
                    "`push.max_subscriptions_per_user`."
                ),
                parameters=[_USER],
                request=_obj({"subscription": subscription}, ["subscription"]),
                ok=(HTTPStatus.CREATED, "stored", result),
            ),
            "delete": operation(
                "Forget a Web Push subscription",
                operation_id="pushUnsubscribe",
                tag="push",
                parameters=[
                    _USER,
                    {
                        **query_param("endpoint", endpoint, "the subscription's endpoint"),
                        "required": True,
                    },
                ],
                request=_obj({}),
                request_required=False,
                ok=(
                    HTTPStatus.OK,
                    "whether it existed",
                    _obj({"endpoint": _STRING, "removed": {"type": "boolean"}}, ["removed"]),
                ),
            ),
        },
    }


def core_paths(at_least_once: Iterable[str] = (), push: bool = False) -> dict[str, Any]:
    """The path items of the core routes (``at_least_once``: types ``publish`` refuses).

    ``push``: with the Web Push routes (``push.enabled``).
    """
    unpublishable = sorted({*RESERVED_TYPES, *at_least_once})
    return {**_ops_paths(), **_api_paths(unpublishable), **(_push_paths() if push else {})}


def document(
    config: Config,
    rules: Iterable[Sequence[Any]],
    at_least_once: Iterable[str] = (),
) -> dict[str, Any]:
    """The whole document: core routes plus every route of ``rules`` that describes itself.

    ``rules`` is the route table, Tornado ``(pattern, handler, kwargs)`` rules;
    a handler with an ``openapi_paths(config)`` class method adds its path items.
    """
    paths = core_paths(at_least_once, push=config.push.enabled)
    for rule in rules:
        describe = getattr(rule[1], "openapi_paths", None)
        if callable(describe):
            paths.update(describe(config))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pushsvc server API",
            "version": __version__,
            "description": (
                "HTTP API for app backends (PROTOCOL §4 and extensions; docs/api.md). "
                "Every /api/v1 route needs a JWT whose `scope` includes `publish`. "
                'Errors are `{"error", "message"}`.'
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": _schemas(),
            "responses": _responses(config),
        },
        "security": [{SECURITY_SCHEME: []}],
    }
