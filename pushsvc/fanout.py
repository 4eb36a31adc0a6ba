"""The broadcast path: one encoded frame to many connections.

Every fan-out in pushsvc (rooms, users, presence) goes through
:func:`send_to_all`, so a faster transport replaces this one function.
The frame is encoded once by the caller; this module never re-encodes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Sink(Protocol):
    """Anything that can write one text frame."""

    def send(self, data: bytes, kind: str) -> None:
        """Write ``data`` as one text frame; ``kind`` labels metrics."""
        ...


def send_to_all(clients: Iterable[Sink], data: bytes, kind: str) -> None:
    """Write the same frame to every client (at most once, no backpressure).

    A client whose buffer is over its bound closes itself in ``send``; the
    others are not slowed down by it.
    """
    for client in list(clients):
        client.send(data, kind)
