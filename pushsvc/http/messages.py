"""Message endpoints: ``publish``, a user's ``pending`` messages, ``disconnect``, ``presence``,
a room's ``history``.

``POST /api/v1/notify`` is served by the built-in ``notification`` plugin
(``plugins/notification.py``), through the public :class:`ApiHandler`.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import orjson

from pushsvc.http.base import ApiHandler, bad_request
from pushsvc.http.limits import (
    MAX_ID_LENGTH,
    MAX_OFFSET,
    MAX_REASON_BYTES,
    MAX_REASON_LENGTH,
    MAX_ROOM_LENGTH,
    RESERVED_TYPES,
    TYPE_PATTERN,
    at_least_once_types,
)
from pushsvc.protocol.disconnects import DISCONNECTS

_DIGITS = re.compile(r"[0-9]{1,18}")


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
        message_id = await self.run(self.node.publish(room, message, history=True))
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
        closed = await self.run(self.node.disconnect_user(user, reason or DISCONNECTS.api.reason))
        return HTTPStatus.OK, {"closed": closed}


class PresenceHandler(ApiHandler):
    """``GET /api/v1/rooms/{room}/presence``: users in a room."""

    async def get(self, room: str) -> None:
        """200 ``{"users": [...]}`` (distinct users with a connection on any node, sorted)."""
        await self.handle(self._presence(room))

    async def _presence(self, room: str) -> tuple[int, Any]:
        if len(room) > MAX_ROOM_LENGTH:
            raise bad_request(f"room: at most {MAX_ROOM_LENGTH} characters")
        return HTTPStatus.OK, {"users": await self.node.presence(room)}


class HistoryHandler(ApiHandler):
    """``GET /api/v1/rooms/{room}/history``: a page of a room's recorded publications."""

    async def get(self, room: str) -> None:
        """200 ``{"room", "epoch", "offset", "earliest", "publications", "next"}``."""
        await self.handle(self._history(room))

    async def _history(self, room: str) -> tuple[int, Any]:
        if len(room) > MAX_ROOM_LENGTH:
            raise bad_request(f"room: at most {MAX_ROOM_LENGTH} characters")
        limit = self.query_limit()
        raw = self.get_query_argument("since", None)
        if raw is not None and not (_DIGITS.fullmatch(raw) and int(raw) <= MAX_OFFSET):
            raise bad_request("since: an offset (an integer >= 0)")
        since = None if raw is None else int(raw)
        flag = self.get_query_argument("reverse", "false")
        if flag not in ("true", "false", "1", "0"):
            raise bad_request("reverse: true or false")
        reverse = flag in ("true", "1")
        page = await self.stored(self.node.store.history(room, since, limit, reverse=reverse))
        entries = page.entries
        last = entries[-1].offset if entries else None
        more = (
            last is not None
            and len(entries) == limit
            and (last > page.earliest if reverse else last < page.top)
        )
        return HTTPStatus.OK, {
            "room": room,
            "epoch": page.epoch,
            "offset": page.top,
            "earliest": page.earliest,
            "publications": [orjson.Fragment(entry.frame) for entry in entries],
            "next": last if more else None,
        }
