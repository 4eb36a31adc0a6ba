"""The single-process registry: this node's own entries are the whole cluster.

:class:`LocalEntries` is also the Redis registry's copy of what this node
wrote, from which it answers when Redis does not and rewrites what Redis lost.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Collection

from pushsvc.cluster.contracts import DepartedCallback, RegistryOptions


def new_node_id() -> str:
    """A node id unique per process: ``<host>-<pid>-<random>``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class LocalEntries:
    """This node's connections by user and members by room (plain dicts)."""

    def __init__(self) -> None:
        self.users: dict[str, set[str]] = {}  # user -> connection ids
        self.rooms: dict[str, dict[str, str]] = {}  # room -> session -> user

    def add_connection(self, user: str, connection: str) -> None:
        """Count ``connection`` for ``user``."""
        self.users.setdefault(user, set()).add(connection)

    def remove_connection(self, user: str, connection: str) -> None:
        """Stop counting ``connection``."""
        connections = self.users.get(user)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.users[user]

    def add_member(self, room: str, user: str, session: str) -> None:
        """``session`` of ``user`` is in ``room``."""
        self.rooms.setdefault(room, {})[session] = user

    def remove_member(self, room: str, session: str) -> None:
        """``session`` left ``room``."""
        members = self.rooms.get(room)
        if members is not None:
            members.pop(session, None)
            if not members:
                del self.rooms[room]

    def room_users(self, room: str) -> list[str]:
        """Distinct users in ``room``, sorted."""
        return sorted(set(self.rooms.get(room, {}).values()))


class MemoryRegistry:
    """:class:`~pushsvc.cluster.contracts.Registry` for one process (``memory://``)."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.node_id = new_node_id()
        self.entries = LocalEntries()
        self._open = True  # healthy until closed: nothing to reach

    async def start(self) -> None:
        """Nothing to connect to."""
        self._open = True

    async def close(self) -> None:
        """Forget every entry."""
        self._open = False
        self.entries = LocalEntries()

    def healthy(self) -> bool:
        """True until closed."""
        return self._open

    async def reserve_user(self, user: str, connection: str, limit: int) -> bool:
        """Count ``connection`` unless ``user`` has ``limit`` connections already."""
        connections = self.entries.users.get(user, set())
        if connection not in connections and len(connections) >= limit:
            return False
        self.entries.add_connection(user, connection)
        return True

    async def release_user(self, user: str, connection: str) -> None:
        """Stop counting ``connection``."""
        self.entries.remove_connection(user, connection)

    async def joined(self, room: str, user: str, session: str) -> None:
        """Record a member."""
        self.entries.add_member(room, user, session)

    async def left(self, room: str, user: str, session: str) -> None:
        """Forget a member."""
        self.entries.remove_member(room, session)

    async def room_users(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users in ``room``, sorted (complete: ``limit`` costs nothing to honour)."""
        return self.entries.room_users(room)

    async def online(self, users: Collection[str]) -> set[str]:
        """Those of ``users`` with a connection counted here."""
        return {user for user in users if user in self.entries.users}

    def set_departed_callback(self, callback: DepartedCallback | None) -> None:
        """Never called: no other node can die."""
