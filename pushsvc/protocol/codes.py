"""Named error codes and WebSocket close codes of the wire contract.

Every code a client can see is named here once; nothing else in pushsvc
writes them as literals.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` frame (PROTOCOL §2)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    INTERNAL = "internal"
    #: Extension: the store could not persist the message; nothing was
    #: accepted and the client may retry after ``retry_after`` seconds.
    UNAVAILABLE = "unavailable"


class CloseCode(enum.IntEnum):
    """WebSocket close codes pushsvc sends (PROTOCOL §2, plus extensions)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutting down or draining: reconnect with jitter
    POLICY_VIOLATION = 1008  # repeated rate-limit abuse: back off
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TOKEN_EXPIRED = 4001  # token expired or revoked: refresh, then reconnect
    DISCONNECTED_BY_API = 4003
    #: Extension: the client did not read its socket fast enough and the
    #: unsent buffer passed ``server.max_buffer_bytes``; reconnect.
    SLOW_CONSUMER = 4008
    #: Extension: no pong within ``server.heartbeat_timeout``.
    HEARTBEAT_TIMEOUT = 4009


class ApiErrorCode(enum.StrEnum):
    """``error`` of an HTTP API error body ``{"error", "message"}`` (PROTOCOL §4)."""

    BAD_REQUEST = "bad_request"  # 400, the message names the field
    UNAUTHORIZED = "unauthorized"  # 401, with ``reason`` (``revoked``, ``expired``...)
    FORBIDDEN = "forbidden"  # 403: the token lacks scope ``publish``
    NOT_FOUND = "not_found"  # 404: no such route
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405, with ``Allow``
    TOO_LARGE = "too_large"  # 413: body over ``api.max_body_bytes``
    #: Extension, 409: an ``Idempotency-Key`` reused with a different request.
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    RATE_LIMITED = "rate_limited"  # 429, with ``Retry-After``
    INTERNAL = "internal"  # 500
    UNAVAILABLE = "unavailable"  # 503, with ``Retry-After``: nothing was accepted


#: Seconds a client or API caller is told to wait after ``unavailable`` (503).
RETRY_AFTER_UNAVAILABLE = 1.0


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` header value for a wait of ``seconds`` (whole seconds, at least 1)."""
    return str(max(1, round(seconds)))


class HandshakeError(Exception):
    """Refuses a WebSocket upgrade with an HTTP status and a JSON body.

    Args:
        status: the HTTP status (401, 403, 429 or 503).
        error: the body's ``error`` code, e.g. ``"unauthorized"``.
        reason: a short machine-readable reason (``"expired"``), optional.
        retry_after: seconds for a ``Retry-After`` header, optional.
    """

    def __init__(
        self, status: int, error: str, reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {error} {reason}".strip())
        self.status = status
        self.error = error
        self.reason = reason
        self.retry_after = retry_after

    def body(self) -> dict[str, str]:
        """The JSON body of the refusal."""
        out = {"error": self.error}
        if self.reason:
            out["reason"] = self.reason
        return out
