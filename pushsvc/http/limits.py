"""The limits and names of the server API, shared by its handlers and its OpenAPI document.

Plain values only (no handler, no Tornado): :mod:`pushsvc.http.base`, the
endpoint modules and :mod:`pushsvc.http.openapi` import them from here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pushsvc.plugin.api import Guarantee
from pushsvc.protocol.commands import CORE_TYPES, SERVER_TYPES

if TYPE_CHECKING:
    from pushsvc.core.node import Node

#: Server-only frame types that ``publish`` may not impersonate.
RESERVED_TYPES = CORE_TYPES | SERVER_TYPES
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
#: Longest room name (as for ``join`` frames).
MAX_ROOM_LENGTH = 200
#: Longest user id, ``jti`` or message id list entry accepted in a body.
MAX_NAME_LENGTH = 256
#: Longest message id in ``ids`` lists and ``after``.
MAX_ID_LENGTH = 64
#: Most ids in one dead-letter requeue or delete call.
MAX_IDS = 1000
#: ``limit`` of listings: default and largest.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: ``reason`` of a disconnect: characters, and bytes (a WebSocket close reason fits 123).
MAX_REASON_LENGTH = 100
MAX_REASON_BYTES = 123
#: Longest ``Retry-After`` announced (a bucket with rate 0 never refills).
MAX_RETRY_AFTER = 3600.0
#: The idempotency request header, its value's pattern, and the replay marker header.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[!-~]{1,255}$")
REPLAYED_HEADER = "Idempotent-Replayed"


def at_least_once_types(node: Node) -> list[str]:
    """Registered message types that need at-least-once delivery (not publishable)."""
    types = node.plugins.types.items()
    return sorted(k for k, t in types if t.message_type.guarantee is Guarantee.AT_LEAST_ONCE)


#: Largest ``since`` offset the history endpoint takes (18 digits).
MAX_OFFSET = 10**18 - 1
