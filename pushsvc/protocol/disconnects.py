"""Why the server closes a connection: one table of close code, reason, metric label, advice.

Every close pushsvc starts goes through a :class:`Disconnect` from
:data:`DISCONNECTS` (or one derived from it with :meth:`Disconnect.because`),
so the code a client sees, the reason it reads, the ``pushsvc_closes_total``
label and the reconnect advice in docs/protocol.md stay one fact.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from pushsvc.protocol.codes import CloseCode


class Reconnect(enum.Enum):
    """What a client should do after the close (docs/protocol.md, "Close codes")."""

    NOW = "now"  # reconnect with the usual jittered backoff
    AFTER_REFRESH = "after_refresh"  # get a fresh token first
    BACK_OFF = "back_off"  # wait longer than usual
    AFTER_DELAY = "after_delay"  # wait the delay given in the reason
    NEVER = "never"  # do not reconnect


@dataclass(frozen=True, slots=True)
class Disconnect:
    """One reason to close a connection.

    Example::

        session.close(DISCONNECTS.slow_consumer)
        session.close(DISCONNECTS.api.because("account suspended"))
    """

    code: CloseCode  # the WebSocket close code
    reason: str  # the close reason the client reads (at most 123 bytes on the wire)
    label: str  # the ``reason`` label of ``pushsvc_closes_total``
    reconnect: Reconnect  # advice to the client
    abort: bool = False  # drop the socket after the close frame, without waiting for the peer

    def because(self, reason: str) -> Disconnect:
        """The same disconnect with another close reason (code and label unchanged)."""
        return dataclasses.replace(self, reason=reason)


@dataclass(frozen=True, slots=True)
class _Table:
    going_away: Disconnect
    rate_abuse: Disconnect
    oversize: Disconnect
    internal: Disconnect
    token_expired: Disconnect
    revoked: Disconnect
    api: Disconnect
    slow_consumer: Disconnect
    heartbeat: Disconnect


DISCONNECTS = _Table(
    going_away=Disconnect(CloseCode.GOING_AWAY, "server draining", "drain", Reconnect.AFTER_DELAY),
    rate_abuse=Disconnect(
        CloseCode.POLICY_VIOLATION, "rate limit abuse", "rate_abuse", Reconnect.BACK_OFF
    ),
    oversize=Disconnect(CloseCode.MESSAGE_TOO_BIG, "message too big", "oversize", Reconnect.NEVER),
    internal=Disconnect(
        CloseCode.INTERNAL_ERROR, "internal error", "internal", Reconnect.NOW, abort=True
    ),
    token_expired=Disconnect(
        CloseCode.TOKEN_EXPIRED, "token expired", "token_expired", Reconnect.AFTER_REFRESH
    ),
    revoked=Disconnect(
        CloseCode.TOKEN_EXPIRED, "token revoked", "revoked", Reconnect.AFTER_REFRESH
    ),
    api=Disconnect(
        CloseCode.DISCONNECTED_BY_API, "disconnected by the server", "api", Reconnect.NEVER
    ),
    slow_consumer=Disconnect(
        CloseCode.SLOW_CONSUMER, "slow consumer", "slow_consumer", Reconnect.NOW, abort=True
    ),
    heartbeat=Disconnect(
        CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", "heartbeat", Reconnect.NOW, abort=True
    ),
)
"""Every disconnect the server starts."""

#: Labels of closes the server counts but did not start.
CLIENT_CLOSE_LABEL = "client"


def every_disconnect() -> tuple[Disconnect, ...]:
    """The rows of :data:`DISCONNECTS` (for docs and tests)."""
    return tuple(getattr(DISCONNECTS, f.name) for f in dataclasses.fields(DISCONNECTS))
