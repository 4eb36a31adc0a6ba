"""A test-only plugin: ``GET /conformance/echo``, a raw echo on pushsvc's WebSocket engine.

The Autobahn cases need a server that echoes every message as it came (text
or binary); pushsvc's ``/ws`` speaks JSON. This endpoint runs the very
engine of ``/ws`` (:class:`~pushsvc.transport.websocket.WireConnection`: the
frame reader, UTF-8 checks, control frames, close handshake, buffers and
limits from the server's config) with an echo in place of the session. It is
registered only by tests (``load_plugins(extra=...)``), never in production.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

import tornado.web

from pushsvc import hookimpl
from pushsvc.core.node import Node
from pushsvc.protocol.disconnects import Disconnect
from pushsvc.transport.upgrade import switching
from pushsvc.transport.websocket import WireConnection

PATH = "/conformance/echo"


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked final frame."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


class EchoSession:
    """What the engine calls on a session: here every message goes back as it came."""

    closing = False

    def __init__(self, connection: EchoConnection) -> None:
        self.connection = connection

    async def on_frame(self, data: str | bytes, binary: bool = False) -> None:
        payload = data.encode() if isinstance(data, str) else data
        self.connection.write_framed(frame(0x2 if binary else 0x1, payload))

    def on_pong(self) -> None:
        pass

    def close(self, disconnect: Disconnect) -> None:
        self.connection.close_connection(disconnect.code, disconnect.reason, disconnect.abort)


class EchoConnection(WireConnection):
    """The ``/ws`` engine with an :class:`EchoSession`."""

    __slots__ = ()

    def connection_closed(self, code: int | None, sent_code: int | None) -> None:
        self.session = None


class EchoHandler(tornado.web.RequestHandler):
    """Upgrade without a token, then hand the socket to the engine."""

    def initialize(self, node: Node) -> None:
        self.node = node

    async def get(self) -> None:
        key = self.request.headers.get("Sec-WebSocket-Key")
        if not key or self.request.headers.get("Upgrade", "").lower() != "websocket":
            self.set_status(400)
            return
        self.set_status(101)
        self.application.log_request(self)  # the request is answered (shutdown waits for it)
        stream = self.detach()
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        stream.close()
        connection = EchoConnection(self.node, switching(key))
        connection._reserved = False
        connection.session = EchoSession(connection)  # type: ignore[assignment]
        await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock)
        connection.start()


class EchoPlugin:
    """Registers :class:`EchoHandler` (pass as ``extra=[("echo", EchoPlugin())]``)."""

    @hookimpl
    def pushsvc_register_routes(self) -> list[tuple[str, type, dict[str, Any]]]:
        return [(PATH, EchoHandler, {"node": None})]
