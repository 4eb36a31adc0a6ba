"""The registry contract: what every node knows about the others' connections.

A :class:`Registry` holds the cluster-wide facts the local hub cannot know
alone: how many connections a user has on all nodes (the per-user cap) and
which users are in a room on any node (presence). Each node writes only its
own entries and keeps them alive with a heartbeat; the entries of a node that
stops heartbeating (crashed, ``kill -9``, cut off) stop counting within
``node_ttl`` seconds of its last heartbeat.

The hub calls the registry on connect, join, leave and disconnect only, never
per message (Web Push asks :meth:`Registry.online` once per accepted
notification, for all its recipients at once). A registry never raises for an
unreachable back end: a cap check then allows the connection (fails open),
presence and ``online`` answer with this node's own entries; ``on_error``
counts each failure.

When a node dies, the others notice it within ``node_ttl`` plus one heartbeat
(``node_ttl / 3``). Each calls its :data:`DepartedCallback` once per room it
has local members in, with the dead node's users who are in that room on no
live node any more, so that each node tells only its own connections
(``presence`` leave): one event per watcher, no broker traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

#: Called with the operation's name (``reserve``, ``release``, ``joined``,
#: ``left``, ``room_users``, ``online``, ``roster``, ``heartbeat``, ``departed``,
#: ``close``) each time the back end failed.
ErrorCallback = Callable[[str], None]

#: Called with ``(room, users)``: these users were in ``room`` on a node that
#: died, and are in it on no live node now (sorted, not empty).
DepartedCallback = Callable[[str, list[str]], None]


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """What ``make_registry`` passes to an implementation (from ``[cluster]``)."""

    node_ttl: float = 15.0  # seconds a node's entries live without a heartbeat
    timeout: float = 1.0  # bound of every back-end call, seconds
    on_error: ErrorCallback | None = None  # counts failures (the metrics)

    @property
    def heartbeat(self) -> float:
        """Seconds between heartbeats: a third of ``node_ttl``."""
        return self.node_ttl / 3


class Registry(Protocol):
    """Cluster-wide connection counts and room members, with per-node liveness.

    ``connection`` ids need only be unique on this node; ``session`` ids are
    the connections' session ids. Every method is idempotent for the same
    arguments.
    """

    node_id: str  # this node's id, unique per process (generated at construction)

    async def start(self) -> None:
        """Connect and start the heartbeat; raises if the back end cannot be reached."""
        ...

    async def close(self) -> None:
        """Stop the heartbeat and remove this node's entries (a clean shutdown)."""
        ...

    def healthy(self) -> bool:
        """Whether the last call to the back end succeeded (False once closed)."""
        ...

    async def reserve_user(self, user: str, connection: str, limit: int) -> bool:
        """Count ``connection`` for ``user`` unless the user has ``limit`` on all nodes.

        The check and the count are one atomic step. Returns False when over
        the cap; True when counted (or already counted), and True when the
        back end failed (fails open).
        """
        ...

    async def release_user(self, user: str, connection: str) -> None:
        """Stop counting ``connection`` for ``user``."""
        ...

    async def joined(self, room: str, user: str, session: str) -> None:
        """``session`` of ``user`` on this node is in ``room``."""
        ...

    async def left(self, room: str, user: str, session: str) -> None:
        """``session`` on this node left ``room``."""
        ...

    async def room_users(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users with a connection in ``room`` on any live node, sorted.

        With ``limit``, stops looking once more than ``limit`` users were
        found: a list longer than ``limit`` is then incomplete (the caller
        only needs to know the room is larger). When the back end fails,
        answers with this node's own members.
        """
        ...

    async def online(self, users: Collection[str]) -> set[str]:
        """Those of ``users`` with a connection (open or opening) on any live node.

        One round trip for all of them (batched), not one per user. When the
        back end fails, answers with those connected to this node.
        """
        ...

    def set_departed_callback(self, callback: DepartedCallback | None) -> None:
        """Where to report users who left rooms because their node died (see the module).

        Called at most once per (dead node, room) on each node, only for rooms
        with members on this node; never for this node's own members. A
        registry without other nodes never calls it.
        """
        ...
