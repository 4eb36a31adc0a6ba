"""Everything pushsvc does with Tornado's internals, behind one small boundary.

Used only where it is safe (no per-message compression, which pushsvc never
negotiates), checked once at import: when an internal is missing (a Tornado
upgrade), :data:`INTERNALS_OK` is False, one line is logged, and pushsvc
runs on Tornado's public API only (``HTTPServer`` + ``WebSocketHandler``,
``write_message``; slower, more memory per connection, and invalid UTF-8
aborts the connection). Tested with Tornado 6.4.2, 6.5.2 and 6.6.1.

What a Tornado upgrade must re-check (see CHANGELOG):

- ``WebSocketProtocol13``: the constructor ``(handler, mask_outgoing,
  _WebSocketParams)``, ``stream``, ``_handle_message``, ``_run_callback``,
  ``_read_bytes`` and ``_wire_bytes_in``,
  ``_receive_frame_loop``, ``_write_frame``, ``_abort``, ``close`` and
  ``server_terminated``, ``_frame_compressed``, ``_compressor``,
  ``_message_bytes_in``; the ``_WebSocketDelegate`` methods it calls.
- ``IOStream``: ``socket``, ``_closed``, ``_write_buffer`` (a
  ``_StreamBuffer``: its ``_size``, ``len`` and ``_buffers`` deque),
  ``_write_futures``, ``_read_buffer``, ``_read_buffer_size``,
  ``_read_future``, ``_user_read_buffer`` and ``_consume``.
- ``tornado.util._websocket_mask`` (the C unmasking; a pure-Python
  fallback stands in without it).
- ``RequestHandler``: ``_headers``, ``_transforms``, ``_write_buffer``,
  ``path_args``/``path_kwargs``, ``open_args``/``open_kwargs``, ``ui`` and
  the method guards WebSocketHandler installs when it detaches the stream.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import tornado.util
from tornado.iostream import BaseIOStream, IOStream, StreamClosedError, _StreamBuffer
from tornado.web import RequestHandler
from tornado.websocket import WebSocketClosedError, WebSocketProtocol13, _WebSocketParams

log = logging.getLogger("pushsvc.tornado")


def _check_internals() -> bool:
    needed = [
        hasattr(WebSocketProtocol13, "_handle_message"),
        hasattr(WebSocketProtocol13, "_write_frame"),
        hasattr(WebSocketProtocol13, "_run_callback"),
        hasattr(WebSocketProtocol13, "_abort"),
        hasattr(WebSocketProtocol13, "_receive_frame_loop"),
        "_read_buffer" in BaseIOStream.__init__.__code__.co_names,
        "_read_buffer_size" in BaseIOStream.__init__.__code__.co_names,
        "_read_future" in BaseIOStream.__init__.__code__.co_names,
        "_user_read_buffer" in BaseIOStream.__init__.__code__.co_names,
        hasattr(BaseIOStream, "_consume"),
        hasattr(WebSocketProtocol13, "_read_bytes"),
        hasattr(BaseIOStream, "writing") and hasattr(BaseIOStream, "write"),
        "_write_buffer" in BaseIOStream.__init__.__code__.co_names,
        "_closed" in BaseIOStream.__init__.__code__.co_names,
        "_size" in _StreamBuffer.__init__.__code__.co_names,
    ]
    return all(needed)


INTERNALS_OK = _check_internals()
if not INTERNALS_OK:  # pragma: no cover - depends on the installed Tornado
    log.warning("Tornado internals changed; using the public API only (slower, strict UTF-8)")


def _mask_python(key: bytes, data: bytes) -> bytes:
    size = len(data)
    keys = int.from_bytes(key * (size // 4 + 1), "little") & ((1 << (8 * size)) - 1)
    return (int.from_bytes(data, "little") ^ keys).to_bytes(size, "little")


websocket_mask: Callable[[bytes, bytes], bytes] = getattr(
    tornado.util, "_websocket_mask", _mask_python
)
"""XOR a client frame's payload with its masking key (Tornado's, in C when built)."""


def _retrieve(future: Any) -> None:
    if not future.cancelled():
        future.exception()


class LenientTextProtocol(WebSocketProtocol13):
    """Hands text frames with invalid UTF-8 to ``handler.on_invalid_text``.

    Tornado aborts the connection on invalid UTF-8; the pushsvc contract
    answers with an ``error`` frame and keeps the connection.
    """

    sent_close_code: int | None = None  # first close code this side sent

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        if opcode == 0x1 and not self._frame_compressed and not self.client_terminated:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self._message_bytes_in += len(data)
                return self._run_callback(self.handler.on_invalid_text, data)  # type: ignore[attr-defined]
        return super()._handle_message(opcode, data)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Send a close frame, remembering the first code sent (1009 aborts at once)."""
        if self.sent_close_code is None and not self.server_terminated:
            self.sent_close_code = code
        super().close(code, reason)

    async def _read_bytes(self, n: int) -> bytes:
        # The frame reader asks for 2 to 4 small pieces per frame; when they are
        # already in the stream's buffer, take them without Tornado's read machinery
        # (a Future and a callback per piece).
        stream = self.stream
        if (
            n <= stream._read_buffer_size
            and stream._read_future is None
            and not stream._user_read_buffer
        ):
            self._wire_bytes_in += n
            return stream._consume(n)
        return await super()._read_bytes(n)

    def start_reading(self) -> None:
        """Read frames from the stream in a task of its own."""
        # No attribute is added here: that would unshare this instance's __dict__ keys.
        task = asyncio.ensure_future(WebSocketProtocol13._receive_frame_loop(self))
        _FRAME_LOOPS.add(task)
        task.add_done_callback(_FRAME_LOOPS.discard)

    async def _receive_frame_loop(self) -> None:
        # Tornado awaits this at the end of the handshake: returning at once lets the
        # handshake's coroutine chain (RequestHandler._execute -> get -> accept_connection)
        # end and be freed, while the frames are read by start_reading's task.
        self.start_reading()


_FRAME_LOOPS: set[asyncio.Task[None]] = set()  # running frame-loop tasks (strong refs)


class _RequestSummary:
    """What a handler still needs of its request after the upgrade (error logs).

    ``uri`` is the path only: the query may hold the token.
    """

    __slots__ = ("method", "remote_ip", "uri")

    def __init__(self, method: str | None, uri: str | None, remote_ip: str | None) -> None:
        self.method = method
        self.uri = uri
        self.remote_ip = remote_ip

    def __repr__(self) -> str:
        return f"HTTPServerRequest(method={self.method!r}, uri={self.uri!r})"


class _SmallQueue(list):  # type: ignore[type-arg]
    """A list with ``popleft``: stands in for IOStream's per-stream deques.

    An empty deque takes 624 bytes, an empty list 56; these queues hold a few
    items at most (write chunks are joined per loop pass).
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def release_handshake(handler: RequestHandler) -> None:
    """Drop what Tornado keeps per connection for the handshake only.

    The request (with its headers and connection), the response headers and
    the UI-module closures are not used once the WebSocket is open; keeping
    them costs several KiB per idle connection.
    """
    if not INTERNALS_OK:
        return
    request = handler.request
    handler.request = _RequestSummary(request.method, request.path, request.remote_ip)  # type: ignore[assignment]
    state = handler.__dict__
    # The handshake state, and the guards Tornado installs against HTTP methods after
    # the upgrade (pushsvc never calls them on an open WebSocket).
    for name in ("_headers", "path_args", "path_kwargs", "open_args", "open_kwargs",
                 "_transforms", "_write_buffer", "write", "redirect", "set_header",
                 "set_cookie", "set_status", "flush", "finish"):  # fmt: skip
        state.pop(name, None)
    state["ui"] = None
    handler.__dict__ = dict(state)  # a dict never shrinks in place; a copy is compact
    connection = getattr(handler, "ws_connection", None)
    stream = getattr(connection, "stream", None)
    if stream is not None:
        slim_stream(stream)


def slim_stream(stream: IOStream) -> None:
    """Swap the stream's empty write queues (624-byte deques) for small lists."""
    if INTERNALS_OK and not stream._write_futures and not stream._write_buffer:
        stream._write_futures = _SmallQueue()  # type: ignore[assignment]
        stream._write_buffer._buffers = _SmallQueue()  # type: ignore[assignment]


def push_back(stream: IOStream, data: bytes) -> None:
    """Put bytes already read back at the front of the stream's read buffer."""
    stream._read_buffer[0:0] = data
    stream._read_buffer_size += len(data)


def make_protocol(delegate: Any, max_message_size: int) -> LenientTextProtocol:
    """A server-side RFC 6455 protocol: no compression, no built-in pings.

    ``delegate`` gets ``on_message``, ``on_pong``, ``on_ws_connection_close``...
    (Tornado's ``_WebSocketDelegate``): a WebSocketHandler or any object
    with those methods.
    """
    params = _WebSocketParams(
        ping_interval=None,
        ping_timeout=None,
        max_message_size=max_message_size,
        compression_options=None,
    )
    return LenientTextProtocol(delegate, False, params)


#: What :func:`write_raw` did: the stream was closed, the kernel took every byte,
#: or some bytes wait in Tornado's buffer.
CLOSED, SENT, BUFFERED = 0, 1, 2

RAW_FRAMES = INTERNALS_OK
"""Whether pushsvc may build frames itself and write them to the stream."""


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


def write_raw(connection: WebSocketProtocol13, data: bytes) -> int:
    """Write already framed bytes: :data:`CLOSED`, :data:`SENT` or :data:`BUFFERED`.

    When Tornado's stream has nothing buffered, the bytes go to the socket
    with one non-blocking ``send`` (no Future, no callback); only what the
    kernel does not take is handed to the stream, so frames never interleave.
    """
    stream = connection.stream
    if stream is None or stream._closed:
        return CLOSED
    # A plain IOStream (not TLS) with nothing buffered: the bytes may go to the socket.
    # (Attributes, not methods: this runs once per member of every broadcast.)
    if stream.__class__ is IOStream and not stream._write_buffer._size:
        try:
            sent = stream.socket.send(data)
        except OSError:  # EAGAIN, or an error the stream will report when it writes
            sent = 0
        if sent == len(data):
            return SENT
        data = data[sent:]
    try:
        stream.write(data)
    except StreamClosedError:
        return CLOSED
    return BUFFERED


def write_text(connection: WebSocketProtocol13, data: bytes) -> bool:
    """Write ``data`` (UTF-8 JSON) as one text frame with Tornado's public API.

    The fallback when :data:`RAW_FRAMES` is off; False if the socket is closed.
    """
    try:
        future = connection.write_message(data, binary=False)
    except WebSocketClosedError:
        return False
    future.add_done_callback(_retrieve)  # a closed peer's error is expected, not logged
    return True


def abort(connection: WebSocketProtocol13) -> None:
    """Drop the TCP connection now, without waiting for the peer's close frame."""
    if INTERNALS_OK:
        connection._abort()
    else:  # pragma: no cover - public API: the close handshake times out after 5 s
        connection.close(None, None)


def buffered_bytes(connection: WebSocketProtocol13) -> int:
    """Bytes written to the connection but not yet sent by the kernel (0 if unknown)."""
    stream = getattr(connection, "stream", None)
    if stream is None or not INTERNALS_OK:
        return 0
    return len(stream._write_buffer)
