"""Hostile HTTP clients against a real server over raw sockets (issue 15).

Each attack is answered as documented (docs/security.md lists the limits and
these tests), and never holds a socket or memory longer than its bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from test_upgrade import upgrade_request

from conftest import Server, token

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#: Small bounds so that the tests are quick; the defaults are 10 s and 16 KiB.
HEAD_TIMEOUT = 0.5
MAX_HEAD = 4096


@pytest.fixture
async def strict(start_server: Any) -> Server:
    """A server with a short head timeout and a small head limit."""
    server: Server = await start_server(
        server={"header_timeout": HEAD_TIMEOUT, "max_header_bytes": MAX_HEAD}
    )
    return server


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP response (head and ``Content-Length`` body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await asyncio.wait_for(reader.readexactly(length), 5) if length else b"")


async def dribble_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, limit: float
) -> tuple[float, bytes]:
    """Send ``head`` a byte every 50 ms until the server closes; (seconds, bytes read)."""
    started = time.monotonic()
    received = b""
    for byte in head:
        if time.monotonic() - started > limit:
            break
        try:
            writer.write(bytes((byte,)))
            await writer.drain()
        except ConnectionError:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(4096), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - started, received


async def closed_without_answer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """Whether the server closed without a byte (EOF, or a reset for unread data)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


# -- 1. slowloris: every request head has the same timeout and size limit --------------


async def test_dribbled_first_head_is_dropped_after_the_timeout(strict: Server) -> None:
    reader, writer = await connect(strict)
    seconds, received = await dribble_until_closed(
        reader, writer, upgrade_request(f"/ws?access_token={token('slow')}") * 4, 10
    )
    assert received == b"" and seconds < HEAD_TIMEOUT + 1.5
    writer.close()


async def test_dribbled_upgrade_after_a_keep_alive_get_is_dropped_too(strict: Server) -> None:
    reader, writer = await connect(strict)
    writer.write(HEALTH)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    seconds, received = await dribble_until_closed(
        reader, writer, upgrade_request(f"/ws?access_token={token('slow')}") * 4, 10
    )
    assert received == b"" and seconds < HEAD_TIMEOUT + 1.5
    writer.close()


async def test_dribbled_get_after_a_keep_alive_get_is_dropped_too(strict: Server) -> None:
    reader, writer = await connect(strict)
    writer.write(HEALTH)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    slow = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: a\r\n" * 200 + b"\r\n"
    seconds, received = await dribble_until_closed(reader, writer, slow, 10)
    assert received == b"" and seconds < HEAD_TIMEOUT + 1.5
    writer.close()


async def test_idle_keep_alive_connection_is_closed_after_the_head_timeout(
    strict: Server,
) -> None:
    reader, writer = await connect(strict)
    writer.write(HEALTH)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started < HEAD_TIMEOUT + 1.5
    writer.close()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["first", "keep-alive"])
@pytest.mark.parametrize("kind", ["upgrade", "get"])
async def test_oversized_head_is_dropped_on_every_request(
    strict: Server, keep_alive: bool, kind: str
) -> None:
    reader, writer = await connect(strict)
    if keep_alive:
        writer.write(HEALTH)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    pad = {"X_Pad": "a" * MAX_HEAD}
    if kind == "upgrade":
        big = upgrade_request(f"/ws?access_token={token('big')}", **pad)
    else:
        big = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    writer.write(big)
    assert await closed_without_answer(reader)
    writer.close()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["first", "keep-alive"])
async def test_head_just_under_the_limit_is_served_on_every_request(
    strict: Server, keep_alive: bool
) -> None:
    reader, writer = await connect(strict)
    if keep_alive:
        writer.write(HEALTH)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    request = upgrade_request(f"/ws?access_token={token('fits')}")
    pad = MAX_HEAD - len(request) - len(b"X-Pad: \r\n")
    writer.write(upgrade_request(f"/ws?access_token={token('fits')}", X_Pad="a" * pad))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.close()


async def test_well_behaved_client_keeps_its_messages_beside_slowloris(strict: Server) -> None:
    client = await strict.connect("good")
    attackers = [await connect(strict) for _ in range(50)]
    for _, writer in attackers:
        writer.write(HEALTH)
    for reader, _ in attackers:
        await read_response(reader)
    for _, writer in attackers:
        writer.write(b"GET /ws HTTP/1.1\r\n")  # and never more
    started = time.monotonic()
    status, _, _ = await strict.http(
        "POST", "/api/v1/publish", {"room": "lobby", "text": "still here"}
    )
    assert status == 202
    frame = await client.recv_type("chat", timeout=2)
    assert frame["text"] == "still here" and time.monotonic() - started < 2
    for reader, writer in attackers:  # every one is dropped within the timeout
        assert await asyncio.wait_for(reader.read(), HEAD_TIMEOUT + 2) == b""
        writer.close()
    client.close()


def test_defaults_are_documented() -> None:
    from pushsvc import config as config_module

    server = config_module.build([{}]).server
    assert (server.header_timeout, server.max_header_bytes) == (10.0, 16384)
    assert orjson.dumps(server.body_timeout) == b"60.0"
