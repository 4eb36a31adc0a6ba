"""One WebSocket engine on every path: first-request upgrades, keep-alive upgrades, and
upgrades when Tornado accepts every connection (its internals missing)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from test_upgrade import upgrade_request
from test_wire import masked

from conftest import Server, token
from pushsvc.transport import tornado_compat
from pushsvc.transport.upgrade import FastConnection

PATHS = ["first-request", "keep-alive", "tornado-accepts"]
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "tornado-accepts":  # as when IOStream's read buffer internals are gone
        monkeypatch.setattr(tornado_compat, "INTERNALS_OK", False)
    return str(request.param)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


async def open_ws(
    server: Server, path: str, sub: str, early: bytes = b"", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Upgrade by hand on ``path``; ``early`` frames are sent with the request head."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    if path == "keep-alive":
        writer.write(HEALTH)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    writer.write(upgrade_request(f"/ws?access_token={token(sub)}") + early)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 101")
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, length = await asyncio.wait_for(reader.readexactly(2), 5)
    length &= 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
    return first & 0x0F, await reader.readexactly(length)


def session_of(server: Server, sub: str) -> Any:
    [session] = server.node.hub.user_clients(sub)
    return session


async def until(condition: Any, tries: int = 250) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_engine_order_early_frames_and_counters(path: str, server: Server) -> None:
    metrics = server.node.metrics
    received = metrics.received_bytes.labels("ping")._value.get()
    sent = metrics.frames_sent.labels("pong")._value.get()
    pings = [orjson.dumps({"type": "ping", "ref": str(i)}) for i in range(8)]
    # The pings leave with the request head: they wait for the session, then run in order.
    reader, writer = await open_ws(server, path, "u", early=b"".join(masked(1, p) for p in pings))
    opcode, welcome = await read_frame(reader)
    assert opcode == 1 and orjson.loads(welcome)["type"] == "welcome"
    refs = []
    while len(refs) < len(pings):
        opcode, payload = await read_frame(reader)
        message = orjson.loads(payload)
        if message["type"] == "pong":
            refs.append(message["ref"])
    assert refs == [str(i) for i in range(8)]
    assert type(session_of(server, "u").transport) is FastConnection
    assert metrics.received_bytes.labels("ping")._value.get() - received == sum(map(len, pings))
    assert metrics.frames_sent.labels("pong")._value.get() - sent == 8
    writer.write(masked(0x9, b"hi"))  # a protocol ping is answered by the engine
    assert await read_frame(reader) == (0xA, b"hi")
    writer.write(masked(0x8, (1000).to_bytes(2, "big")))
    assert await read_frame(reader) == (0x8, (1000).to_bytes(2, "big"))
    await until(lambda: "u" not in server.node.hub.users)
    writer.close()


async def test_slow_consumer_gets_4008(path: str, start_server: Any) -> None:
    server: Server = await start_server(server={"max_buffer_bytes": 64 * 1024})
    reader, writer = await open_ws(server, path, "slow", rcvbuf=4096)  # then reads nothing
    await until(lambda: "slow" in server.node.hub.users)
    closes = server.node.metrics.closes.labels("slow_consumer")
    before = closes._value.get()
    text = "x" * 3000
    for _ in range(3000):
        await server.node.publish("lobby", {"type": "chat", "room": "lobby", "text": text})
        if "slow" not in server.node.hub.users:
            break
        await asyncio.sleep(0)
    await until(lambda: "slow" not in server.node.hub.users)
    assert closes._value.get() - before == 1
    # Frames not yet handed to the kernel were dropped: the close frame follows what was.
    frames = 0
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 0x8:
            break
        frames += 1
    assert int.from_bytes(payload[:2], "big") == 4008 and payload[2:] == b"slow consumer"
    assert frames < 3000
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server closed
    writer.close()
