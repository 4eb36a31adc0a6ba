"""Wire speaks RFC 6455 itself on an asyncio transport, for connections of the fast path.

Once :mod:`pushsvc.upgrade` has answered ``101``, the socket leaves Tornado:
it becomes an asyncio transport (uvloop's when installed) and a
:class:`WireConnection` protocol. A read hands over every byte the kernel
has and :class:`FrameReader` parses all the frames in it in one pass; a
write goes to the transport, which sends at once when nothing is buffered
(in C with uvloop) and keeps the rest. Tornado's frame reader, by contrast,
awaits two to four small reads per frame, each with its Future.

Frames of one connection are handled in order: while a frame's handler
waits (a store commit), later frames wait in a backlog, and reading pauses
as soon as one arrives (not before: a client waiting for the answer costs
no pause and resume).

Writes go to the transport only while it holds nothing unsent (its high
water mark is 0): once the kernel does not take a write whole, later frames
wait in the connection's own queue, so the transport only ever holds whole
frames. A connection whose unsent bytes (transport and queue) pass
``server.max_buffer_bytes`` is a slow consumer: the queued frames are
dropped, the close frame (4008) follows what the transport holds, and the
socket closes once that is sent (aborted after ``CLOSE_TIMEOUT``).

The server side of RFC 6455 as pushsvc needs it: no extensions, client
frames masked, fragmented messages reassembled, pings answered, the close
handshake with a 5 s wait for the peer's close frame. Protocol errors close
with 1002 (a close frame with a 1-byte body or a code RFC 6455 does not
allow included), text that is not UTF-8 (a message, a fragment as soon as
it is read, a close reason) with 1007, and messages over
``server.max_message_bytes`` with 1009. A violation is acted on in order:
the frames read before it are handled first. The engine passes the Autobahn
cases 1-7, 9 and 10 (docs/security.md, ``tests/test_conformance.py``).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.transport import eager, tornado_compat
from pushsvc.transport.connection import ConnectionBase
from pushsvc.transport.outbox import flusher
from pushsvc.transport.pacing import Pacer, pacer

if TYPE_CHECKING:
    from pushsvc.core.node import Node

log = logging.getLogger("pushsvc.wire")

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
#: Not an opcode: stands in the frame list for the violation that ended a read.
OP_VIOLATION = 0x10  # past the 4 bits of real opcodes
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's close frame after ours
PING_FRAME = b"\x89\x00"

mask = tornado_compat.websocket_mask
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def close_code_allowed(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ProtocolViolation(Exception):
    """The peer broke RFC 6455 (or the size limit): close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReader:
    """Parses masked client frames out of a byte stream into whole messages."""

    __slots__ = (
        "_buffer",
        "_fragment_opcode",
        "_fragment_size",
        "_fragments",
        "_utf8",
        "max_size",
        "violation",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size  # largest message payload accepted (1009 above)
        self._buffer = b""  # bytes of an incomplete frame
        self._fragments: list[bytes] | None = None  # payloads of an unfinished message
        self._fragment_opcode = OP_TEXT
        self._fragment_size = 0
        self._utf8: codecs.IncrementalDecoder | None = None  # checks a fragmented text
        self.violation: ProtocolViolation | None = None  # the one that ended the stream

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages ``data`` completes, as ``(opcode, payload)``, control frames too.

        Example::

            >>> FrameReader(100).feed(b"\\x81\\x82\\x00\\x00\\x00\\x00hi")
            [(1, b'hi')]

        Text messages are checked to be UTF-8 (a fragmented one fragment by
        fragment). A violation ends the stream: the messages before it are
        returned, followed by ``(OP_VIOLATION, b"")``, and :attr:`violation`
        holds it (:class:`ProtocolViolation`: 1002 for a frame RFC 6455
        forbids, 1007 for text that is not UTF-8, 1009 for a message over
        ``max_size``, from its header, before its payload is buffered).
        Later calls return nothing.
        """
        if self.violation is not None:
            return []
        # The usual read: one whole, final, masked text frame of ASCII JSON (a 7- or
        # 16-bit length), nothing buffered or fragmented. Any other read, or any doubt
        # (a reserved bit, no mask, an oversize length, other bytes), takes _parse.
        if not self._buffer and self._fragments is None and len(data) > 6 and data[0] == 0x81:
            length = data[1] ^ 0x80  # the length, or >= 128 when the mask bit is not set
            start = 2
            if length == 126:
                length, start = (data[2] << 8) | data[3], 4
            elif length > 126:  # a 64-bit length, or not masked: _parse
                length = -1
            if 0 <= length <= self.max_size and len(data) == start + 4 + length:
                payload = mask(data[start : start + 4], data[start + 4 :])
                if payload.isascii():
                    return [(OP_TEXT, payload)]
        messages: list[tuple[int, bytes]] = []
        try:
            self._parse(data, messages)
        except ProtocolViolation as violation:
            self.violation = violation
            self._buffer = b""
            self._fragments = None
            messages.append((OP_VIOLATION, b""))
        return messages

    def _parse(self, data: bytes, messages: list[tuple[int, bytes]]) -> None:
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        pos = 0
        while size - pos >= 2:
            first = buffer[pos]
            length = buffer[pos + 1]
            if first & 0x70:
                raise ProtocolViolation(PROTOCOL_ERROR, "reserved bits set")
            if not length & 0x80:
                raise ProtocolViolation(PROTOCOL_ERROR, "client frames must be masked")
            length &= 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            opcode = first & 0x0F
            self._check_header(opcode, first & 0x80, length)
            end = start + 4 + length
            if end > size:
                break
            payload = mask(buffer[start : start + 4], buffer[start + 4 : end]) if length else b""
            pos = end
            if first & 0x80 and opcode:  # a whole message, or a control frame
                if opcode == OP_TEXT and not payload.isascii():
                    _check_utf8(payload)
                messages.append((opcode, payload))
            else:
                self._fragment(opcode, first & 0x80, payload, messages)
        self._buffer = buffer[pos:] if pos < size else b""

    def _check_header(self, opcode: int, final: int, length: int) -> None:
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise ProtocolViolation(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not final or length > 125:
                raise ProtocolViolation(PROTOCOL_ERROR, "control frames are final, 125 bytes")
            return
        if opcode > OP_BINARY:
            raise ProtocolViolation(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise ProtocolViolation(PROTOCOL_ERROR, "continuation without a first frame")
            length += self._fragment_size
        elif self._fragments is not None:
            raise ProtocolViolation(PROTOCOL_ERROR, "new message inside a fragmented one")
        if length > self.max_size:
            raise ProtocolViolation(DISCONNECTS.oversize.code, DISCONNECTS.oversize.reason)

    def _fragment(
        self, opcode: int, final: int, payload: bytes, messages: list[tuple[int, bytes]]
    ) -> None:
        if opcode != OP_CONTINUATION:  # the first frame of a fragmented message
            self._fragments = [payload]
            self._fragment_opcode = opcode
            self._fragment_size = len(payload)
            self._utf8 = _Utf8Decoder() if opcode == OP_TEXT else None
            self._check_fragment(payload, False)
            return
        assert self._fragments is not None  # checked by _check_header
        if payload:  # empty ones would grow the list without a byte of the limit
            self._fragments.append(payload)
            self._fragment_size += len(payload)
        self._check_fragment(payload, bool(final))
        if final:
            messages.append((self._fragment_opcode, b"".join(self._fragments)))
            self._fragments = None
            self._fragment_size = 0
            self._utf8 = None

    def _check_fragment(self, payload: bytes, final: bool) -> None:
        """Fail a fragmented text as soon as a fragment cannot be UTF-8."""
        if self._utf8 is not None:
            try:
                self._utf8.decode(payload, final)
            except UnicodeDecodeError:
                raise ProtocolViolation(INVALID_PAYLOAD, "text is not UTF-8") from None


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise ProtocolViolation(INVALID_PAYLOAD, "text is not UTF-8") from None


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """An unmasked control frame (payloads of control frames are at most 125 bytes)."""
    return bytes((0x80 | opcode, len(payload))) + payload


def close_payload(code: int | None, reason: str) -> bytes:
    """The body of a close frame: the code, then the UTF-8 reason (cut to fit)."""
    if code is None:
        return b""
    # 123 bytes at most, cut on a character boundary: the reason must stay valid UTF-8.
    return code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()


class WireConnection(ConnectionBase, asyncio.Protocol):
    """A fast-path WebSocket: an asyncio protocol that is also the session's transport.

    Created by :mod:`pushsvc.upgrade` after the handshake was admitted.
    ``greeting`` (the ``101`` response) is queued as soon as the transport
    exists and leaves with the first frames; frames read before
    :meth:`start` wait in the backlog.
    """

    __slots__ = (
        "_backlog",
        "_close_sent",
        "_close_timer",
        "_early",
        "_ended",
        "_greeting",
        "_pacer",
        "_paused",
        "_peer_close_code",
        "_peer_closed",
        "_queue",
        "_queued",
        "_reader",
        "_transport",
        "_waiting",
        "sent_close_code",
    )

    def __init__(self, node: Node, greeting: bytes, early: bytes = b"") -> None:
        self.node = node
        self.session = None  # set by start_session
        self._reserved = True  # admit() reserved a slot for this connection
        self._outbox = None  # frames queued for this loop pass
        self._flusher = flusher()  # the running loop's
        self._pacer: Pacer = pacer()  # the running loop's
        self._transport: asyncio.Transport | None = None  # None once closed
        self._greeting = greeting
        self._reader = FrameReader(node.config.server.max_message_bytes)
        self._backlog: deque[tuple[int, bytes]] | None = None  # frames waiting their turn
        self._waiting = True  # a frame handler (or the session start) is running
        self._paused = False  # reading paused while waiting
        self._early = early  # bytes read with the handshake
        self._peer_close_code: int | None = None  # from the peer's close frame
        self._peer_closed = False  # the peer sent its close frame
        self.sent_close_code: int | None = None  # first close code this side sent
        self._close_sent = False  # our close frame is written
        self._close_timer: asyncio.TimerHandle | None = None
        self._ended = False  # connection_lost ran
        self._queue: list[bytes] | None = None  # frames waiting for the transport to drain
        self._queued = 0  # bytes in _queue

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer the handshake; frames are handled once :meth:`start` is called."""
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]  # pause_writing once bytes wait
        self._paused = not transport.is_reading()  # type: ignore[attr-defined]
        greeting, self._greeting = self._greeting, b""
        self.write_framed(greeting)  # queued: it leaves with the welcome, in one send
        if self._early:
            early, self._early = self._early, b""
            self.data_received(early)

    def start(self) -> None:
        """The session exists: handle the frames that arrived meanwhile, then read on."""
        self._resume()

    def data_received(self, data: bytes) -> None:
        """Parse every frame in ``data``; handle them in order.

        When this loop pass handled frames for long already (a burst after
        a stall: :meth:`~pushsvc.transport.pacing.Pacer.busy`), they wait for
        the pacer's next turn instead, in order, with reading paused.
        """
        if self._ended:
            return
        frames = self._reader.feed(data)
        if self._waiting:
            self._hold(frames)
            self._pause()
            return
        paced = self._pacer
        if frames and paced.busy():
            self._hold(frames)
            self._waiting = True  # a read before the turn pauses (see above)
            paced.call(self._resume)
            return
        for index, (opcode, payload) in enumerate(frames):
            if self._handle(opcode, payload):
                self._hold(frames[index + 1 :])
                return

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone: end the session once."""
        if self._ended:
            return
        self._ended = True
        self._transport = None
        self._backlog = None
        self._queue = None
        self._queued = 0
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.connection_closed(self._peer_close_code, self.sent_close_code)

    # -- frames in ----------------------------------------------------------------------

    def _handle(self, opcode: int, payload: bytes) -> bool:
        """Handle one frame; True when its handler waits (later frames wait their turn)."""
        session = self.session
        if opcode <= OP_BINARY:
            if session is None or self._close_sent:
                return False  # closing: only the peer's close frame matters now
            handler = session.on_frame(payload, binary=opcode == OP_BINARY)
            if eager.run(handler, self._handled, self._pacer):
                return False
            # Reading pauses only once more bytes arrive meanwhile (data_received): a
            # client that waits for the answer, as most do, costs no pause and resume
            # (two epoll changes) per frame, and at most one read waits in the backlog.
            self._waiting = True
            return True
        if opcode == OP_PING:
            self._write(control_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if session is not None:
                session.on_pong()
        elif opcode == OP_CLOSE:
            self._peer_close(payload)
        else:  # OP_VIOLATION: the frames before it were handled
            assert self._reader.violation is not None
            self._violation(self._reader.violation)
        return False

    def _handled(self, _value: Any, error: BaseException | None, _cancelled: bool) -> None:
        """The waiting frame's handler ended (called from its last step): go on."""
        if error is not None:
            log.error("a frame handler failed", exc_info=error)
        self._resume()

    def _hold(self, frames: list[tuple[int, bytes]]) -> None:
        if frames:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.extend(frames)

    def _resume(self) -> None:
        self._waiting = False
        backlog = self._backlog
        while backlog and not self._ended:
            opcode, payload = backlog.popleft()
            if self._handle(opcode, payload):
                return
        self._backlog = None  # an empty deque is 600 bytes: most connections never need one
        transport = self._transport
        if self._paused and transport is not None and not transport.is_closing():
            self._paused = False
            transport.resume_reading()

    def _pause(self) -> None:
        transport = self._transport
        if not self._paused and transport is not None and not transport.is_closing():
            self._paused = True
            transport.pause_reading()

    def _peer_close(self, payload: bytes) -> None:
        self._peer_closed = True
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        self._peer_close_code = code
        if len(payload) == 1 or (code is not None and not close_code_allowed(code)):
            self._violation(ProtocolViolation(PROTOCOL_ERROR, "bad close frame"))
            return
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            self._violation(ProtocolViolation(INVALID_PAYLOAD, "close reason is not UTF-8"))
            return
        if not self._close_sent:
            self._send_close(code, "")  # echo the peer's code, as Tornado does
        self._close_transport()

    def _violation(self, violation: ProtocolViolation) -> None:
        """Fail the connection: what was queued before, the close frame, then the socket."""
        log.debug("closing with %d: %s", violation.code, violation.reason)
        if self._close_sent or self._transport is None:
            return
        self._send_close(violation.code, violation.reason)
        self._close_transport()
        # A peer that never reads again would keep the socket: drop it in the end.
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)

    # -- frames out (the session's transport) ------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Queue ``data`` as one text frame (written at the end of this loop pass)."""
        size = len(data)  # a short frame's header inline: this runs for every frame
        self.write_framed(
            bytes((0x81, size)) + data if size < 126 else tornado_compat.text_frame(data)
        )

    def flush_outbox(self) -> None:
        """Write the queued frames in one call, then check for a slow consumer."""
        frames, self._outbox = self._outbox, None
        transport = self._transport
        if not frames or transport is None or self._close_sent:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        queue = self._queue
        if queue is None:
            transport.write(data)  # pause_writing runs if the kernel did not take it all
        else:
            queue.append(data)
            self._queued += len(data)
        if (
            transport.get_write_buffer_size() + self._queued
            > self.node.config.server.max_buffer_bytes
        ):
            self._slow_consumer()

    def close_connection(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame; then wait for the peer's (5 s at most).

        With ``abort`` (a peer that stopped reading or answering) the frames
        not yet handed to the kernel are dropped, the close frame follows
        what the kernel has, and the connection ends now without waiting for
        the peer's close frame.
        """
        if self._close_sent or self._transport is None:
            return
        if abort:
            self._close_now(code, reason)
            return
        self._send_close(code, reason)
        if self._peer_closed:
            self._close_transport()
        else:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)

    # -- asyncio flow control (high water mark 0: the transport holds one write at most) ---

    def pause_writing(self) -> None:
        """The kernel did not take a write whole: queue later frames here."""
        if self._queue is None:
            self._queue = []

    def resume_writing(self) -> None:
        """The transport sent everything: hand it the queued frames."""
        queue, self._queue = self._queue, None
        self._queued = 0
        transport = self._transport
        if queue and transport is not None and not transport.is_closing():
            transport.write(b"".join(queue))

    def send_ping(self) -> None:
        """Send a protocol ping (the peer's pong updates ``last_seen``)."""
        if not self._close_sent:
            self._write(PING_FRAME)

    def _send_close(self, code: int | None, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        self.sent_close_code = code
        frames, self._outbox = self._outbox, None  # what was queued leaves first
        close = control_frame(OP_CLOSE, close_payload(code, reason))
        self._write(b"".join([*frames, close]) if frames else close)

    def _close_now(self, code: int, reason: str) -> None:
        """Drop the frames not handed to the kernel, send the close frame, end the connection."""
        transport = self._transport
        if self._close_sent or transport is None:
            return
        self._close_sent = True
        self.sent_close_code = code
        self._outbox = None
        self._queue = None  # whole frames: the transport holds whole frames only
        self._queued = 0
        if not transport.is_closing():
            transport.write(control_frame(OP_CLOSE, close_payload(code, reason)))
            transport.close()  # once what it holds is sent
            # A peer that never reads again would keep the socket: drop it in the end.
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)
        self.connection_lost(None)  # the session ends now, not when the peer has read

    def _close_transport(self) -> None:
        """Close once the queued and buffered bytes are sent."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        queue, self._queue = self._queue, None
        self._queued = 0
        if queue:
            transport.write(b"".join(queue))
        transport.close()

    def _write(self, data: bytes) -> None:
        """Write a control frame (a pong, a ping, the close frame) now, in order."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            queue = self._queue
            if queue is None:
                transport.write(data)
            else:
                queue.append(data)
                self._queued += len(data)
            limit = self.node.config.server.max_buffer_bytes
            if transport.get_write_buffer_size() + self._queued > limit:
                self._slow_consumer()

    def _slow_consumer(self) -> None:
        session = self.session
        if session is not None:
            session.close(DISCONNECTS.slow_consumer)
        else:  # the session is not started yet or already gone
            self._close_now(DISCONNECTS.slow_consumer.code, DISCONNECTS.slow_consumer.reason)

    def _abort(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.abort()

    def __repr__(self) -> str:
        session = self.session
        return f"<WireConnection {session.session if session is not None else '-'}>"
