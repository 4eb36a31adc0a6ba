"""Dead-letter endpoints: list, requeue (through delivery), delete."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

from pushsvc.http.base import ApiHandler


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
        requeued: list[str] = await self.stored(self.node.requeue_dead_letters(user, ids))
        return HTTPStatus.OK, {"requeued": len(requeued), "ids": requeued}
