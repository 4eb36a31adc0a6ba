"""``GET`` and ``POST /api/v1/revocations``: revoked tokens."""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from pushsvc.auth import revocation
from pushsvc.http.base import ApiHandler, bad_request
from pushsvc.http.limits import MAX_NAME_LENGTH
from pushsvc.store import Revocation


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
