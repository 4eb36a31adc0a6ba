"""Everything pushsvc does with Tornado's internals, behind one small boundary.

Two internals are left, both optional:

- ``IOStream._read_buffer`` and ``_read_buffer_size`` (:func:`push_back`):
  :mod:`pushsvc.transport.upgrade` reads each connection's first request
  head itself and gives the connection, head included, to Tornado's HTTP
  server when it is not a WebSocket upgrade. Checked once at import: when
  they are missing (a Tornado upgrade), :data:`INTERNALS_OK` is False, one
  line is logged, and Tornado's ``HTTPServer`` accepts every connection;
  ``/ws`` then reaches the same asyncio WebSocket engine through
  :class:`~pushsvc.transport.upgrade.UpgradeHandler` (public API only), so
  every WebSocket has the same engine, limits and counters on either path.
- ``tornado.util._websocket_mask`` (:data:`websocket_mask`, the C
  unmasking of client frames); a pure-Python stand-in is used without it.

Tested with Tornado 6.4.2, 6.5.2 and 6.6.1.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import tornado.util
from tornado.iostream import BaseIOStream, IOStream

log = logging.getLogger("pushsvc.tornado")


def _check_internals() -> bool:
    names = BaseIOStream.__init__.__code__.co_names
    return "_read_buffer" in names and "_read_buffer_size" in names


INTERNALS_OK = _check_internals()
"""Whether :func:`push_back` works (else Tornado accepts every connection)."""
if not INTERNALS_OK:  # pragma: no cover - depends on the installed Tornado
    log.warning("Tornado internals changed; Tornado accepts every connection (slower upgrades)")


def _mask_python(key: bytes, data: bytes) -> bytes:
    size = len(data)
    keys = int.from_bytes(key * (size // 4 + 1), "little") & ((1 << (8 * size)) - 1)
    return (int.from_bytes(data, "little") ^ keys).to_bytes(size, "little")


websocket_mask: Callable[[bytes, bytes], bytes] = getattr(
    tornado.util, "_websocket_mask", _mask_python
)
"""XOR a client frame's payload with its masking key (Tornado's, in C when built)."""


def push_back(stream: IOStream, data: bytes) -> None:
    """Put bytes already read back at the front of the stream's read buffer."""
    stream._read_buffer[0:0] = data
    stream._read_buffer_size += len(data)


def text_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed, final text frame (RFC 6455 §5.2) around ``payload``."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload
