"""The verified identity behind a connection or an API request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind a connection or an API request."""

    user: str  # the token's ``sub``
    name: str | None  # the token's ``name`` claim
    scopes: frozenset[str]  # the token's ``scope``, split on spaces
    rooms: tuple[str, ...] | None  # the ``rooms`` claim (globs); None: default policy
    expires_at: float | None  # the token's ``exp`` (seconds since the epoch)
    claims: Mapping[str, Any] = field(default_factory=dict)  # every verified claim

    def has_scope(self, scope: str) -> bool:
        """Whether the token granted ``scope``."""
        return scope in self.scopes
