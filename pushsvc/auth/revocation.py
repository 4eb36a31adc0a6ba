"""Token revocation: by ``jti``, or every token of a user issued before a time.

Revocations live in the store (they survive restarts) and in an in-memory
cache loaded at startup, so the check on every handshake, API call and
``auth`` frame costs two dict lookups. Revoking also closes the open
connections that hold a revoked token, with 4001 ``token revoked``, on every
node: the revocation travels as an :attr:`EnvelopeKind.REVOKED` envelope on
:data:`REVOCATIONS_CHANNEL`, which every node subscribes to at start, and
the node that took the API call applies that same envelope locally
(:meth:`pushsvc.core.node.Node.revoke`), so one code path serves both.

A user revocation covers tokens whose ``iat`` is before ``until``; a token
without ``iat`` cannot prove it is newer and is treated as revoked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

from pushsvc.auth.principal import Principal
from pushsvc.auth.tokens import AuthError
from pushsvc.broker import Envelope, EnvelopeKind
from pushsvc.protocol.disconnects import DISCONNECTS, Disconnect
from pushsvc.store import Revocation, Store

#: ``kind`` of a revocation of one token (by its ``jti`` claim).
JTI = "jti"
#: ``kind`` of a revocation of a user's tokens issued before ``until``.
USER = "user"
#: ``AuthError.reason`` of a revoked token (401 ``reason``, ``auth`` refusals).
AUTH_REASON = "revoked"


class Holder(Protocol):
    """A connection as revocation sees it."""

    principal: Principal  # the token in use
    closing: bool  # a close was started

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection."""
        ...


def to_json(revocation: Revocation) -> dict[str, Any]:
    """The API form: ``{"jti"}`` or ``{"user", "until"}``, with times."""
    body: dict[str, Any] = {revocation.kind: revocation.subject}
    if revocation.kind == USER:
        body["until"] = revocation.until
    body["created_at"] = revocation.created_at
    body["expires_at"] = revocation.expires_at
    return body


def to_envelope(revocation: Revocation) -> Envelope:
    """The :attr:`EnvelopeKind.REVOKED` envelope carrying ``revocation`` (JSON frame)."""
    body = {
        "kind": revocation.kind,
        "subject": revocation.subject,
        "until": revocation.until,
        "created_at": revocation.created_at,
        "expires_at": revocation.expires_at,
    }
    return Envelope(EnvelopeKind.REVOKED, "", "", orjson.dumps(body))


def from_envelope(envelope: Envelope) -> Revocation:
    """The revocation a :func:`to_envelope` envelope carries; raises ``ValueError``."""
    if envelope.kind is not EnvelopeKind.REVOKED:
        raise ValueError(f"not a revocation envelope: {envelope.kind}")
    body = orjson.loads(envelope.frame)
    if not isinstance(body, dict):
        raise ValueError("revocation envelope: not a JSON object")
    kind, subject = body.get("kind"), body.get("subject")
    if kind not in (JTI, USER) or not isinstance(subject, str) or not subject:
        raise ValueError("revocation envelope: bad kind or subject")
    created_at = _time(body, "created_at", optional=False)
    if created_at is None:
        raise ValueError("revocation envelope: created_at is required")
    until = _time(body, "until", optional=kind == JTI)
    return Revocation(kind, subject, until, created_at, _time(body, "expires_at", optional=True))


def _time(body: dict[str, Any], key: str, optional: bool) -> float | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"revocation envelope: bad {key}")
    return float(value)


class Revocations:
    """The revocation list of a node: stored durably, checked from memory."""

    def __init__(self, store: Store) -> None:
        self.store = store  # where revocations persist
        self._jtis: dict[str, Revocation] = {}  # jti -> its revocation
        self._users: dict[str, Revocation] = {}  # user -> the latest cut-off

    async def load(self) -> None:
        """Fill the cache from the store (startup); raises ``StoreUnavailable``."""
        for revocation in await self.store.revocations(time.time()):
            self._cache(revocation)

    def _cache(self, revocation: Revocation) -> None:
        table = self._jtis if revocation.kind == JTI else self._users
        known = table.get(revocation.subject)
        # A user's cut-off only grows, whatever order the store and the broker bring them in.
        if (
            known is not None
            and revocation.kind == USER
            and (known.until or 0.0) > (revocation.until or 0.0)
        ):
            return
        table[revocation.subject] = revocation

    def is_revoked(self, principal: Principal, now: float | None = None) -> bool:
        """Whether ``principal``'s token is revoked (two dict lookups)."""
        if not self._jtis and not self._users:
            return False
        now = time.time() if now is None else now
        claims = principal.claims
        jti = claims.get("jti")
        if isinstance(jti, str):
            revoked = self._jtis.get(jti)
            if revoked is not None and _in_force(revoked, now):
                return True
        entry = self._users.get(principal.user)
        if entry is None or not _in_force(entry, now) or entry.until is None:
            return False
        iat = claims.get("iat")
        return not isinstance(iat, int | float) or isinstance(iat, bool) or iat < entry.until

    def check(self, principal: Principal) -> None:
        """Raise :class:`AuthError` ``revoked`` when the token is revoked."""
        if self.is_revoked(principal):
            raise AuthError(AUTH_REASON, "token revoked")

    async def persist(self, revocation: Revocation) -> Revocation:
        """Store ``revocation``; returns what the store kept (a user's ``until`` only grows).

        Raises ``StoreUnavailable``: nothing was revoked then. It is not in
        force on any node until :meth:`apply` (through the REVOKED envelope).
        """
        return await self.store.revoke(revocation)

    def apply(self, revocation: Revocation, holders: Iterable[Holder]) -> int:
        """Cache ``revocation`` and close the ``holders`` it revokes; returns how many.

        Idempotent: applying it again closes nothing more.
        """
        self._cache(revocation)
        closed = 0
        for holder in list(holders):
            if not holder.closing and self.is_revoked(holder.principal):
                holder.close(DISCONNECTS.revoked)
                closed += 1
        return closed

    def listing(self, now: float | None = None) -> list[Revocation]:
        """The revocations in force, oldest first."""
        now = time.time() if now is None else now
        entries = [*self._jtis.values(), *self._users.values()]
        live = [entry for entry in entries if _in_force(entry, now)]
        return sorted(live, key=lambda entry: (entry.created_at, entry.kind, entry.subject))

    def __len__(self) -> int:
        return len(self._jtis) + len(self._users)


def _in_force(revocation: Revocation, now: float) -> bool:
    return revocation.expires_at is None or revocation.expires_at > now
