"""The fast upgrade path and its hand-offs to Tornado's HTTP stack, over raw sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from conftest import Server, token
from pushsvc.transport.upgrade import FastConnection, head_end, parse_upgrade


def upgrade_request(path: str = "/ws", **headers: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, *requests: bytes, read: int = 1) -> list[bytes]:
    """Send requests one after the other on one connection; collect ``read`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            extra = b""
            if head.startswith(b"HTTP/1.1 101"):
                extra = await asyncio.wait_for(reader.read(4096), 5)  # the welcome frame
            answers.append(head + body + extra)
        return answers[:read] if read else answers
    finally:
        writer.close()


#: Bytes made of line ends and a letter: every kind of blank line, in every order.
HEADS = st.lists(st.sampled_from([b"\r", b"\n", b"a"]), max_size=40).map(b"".join)


@given(HEADS, st.integers(0, 48))
def test_head_end_finds_the_blank_line_a_regex_finds(buffer: bytes, limit: int) -> None:
    found = re.compile(rb"\r?\n\r?\n").search(buffer, 0, limit)
    assert head_end(buffer, limit) == (found.end() if found else -1)


def test_parse_upgrade() -> None:
    request = parse_upgrade(upgrade_request("/ws?a=1&access_token=t%2B1", Origin="x"))
    assert request is not None and request.token == "t+1"
    assert request.headers.get("ORIGIN") == "x" and request.headers.get("host") == "127.0.0.1"
    assert parse_upgrade(upgrade_request("/other")) is None
    assert parse_upgrade(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n") is None  # not an upgrade
    assert parse_upgrade(b"POST /ws HTTP/1.1\r\n\r\n") is None
    assert parse_upgrade(b"garbage\r\n\r\n") is None
    bad_version = upgrade_request().replace(b"Version: 13", b"Version: 8")
    assert parse_upgrade(bad_version) is None


async def test_upgrade_goes_the_fast_way(server: Server) -> None:
    client = await server.connect("fast")
    transports = [type(s.transport) for s in server.node.hub.sessions.values()]
    assert transports == [FastConnection]
    await client.send({"type": "ping", "ref": "1"})
    assert (await client.recv_type("pong"))["ref"] == "1"


async def test_refusal_is_json_and_closes(server: Server) -> None:
    [answer] = await exchange(server.port, upgrade_request("/ws?access_token=nope"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert orjson.loads(body) == {"error": "unauthorized", "reason": "malformed"}


async def test_keep_alive_upgrade_uses_the_same_engine(server: Server) -> None:
    health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    ws = upgrade_request(f"/ws?access_token={token('kept')}")
    first, second = await exchange(server.port, health, ws, read=0)
    assert first.startswith(b"HTTP/1.1 200")
    assert second.startswith(b"HTTP/1.1 101")
    assert b'"type":"welcome"' in second
    for _ in range(50):
        if "kept" in server.node.hub.users:
            break
        await asyncio.sleep(0.02)
    [session] = server.node.hub.user_clients("kept")
    assert type(session.transport) is FastConnection  # type: ignore[attr-defined]


async def test_other_requests_reach_tornado(server: Server) -> None:
    [answer] = await exchange(server.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    [answer] = await exchange(server.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401")  # plain GET of /ws: Tornado, checks first


async def test_oversized_head_is_dropped(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ws HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_xheaders_give_the_client_address(start_server: Any) -> None:
    server: Server = await start_server(
        server={"xheaders": True}, ratelimit={"max_connections_per_ip": 1}
    )
    jwt = token("x")
    one = await exchange(
        server.port, upgrade_request(f"/ws?access_token={jwt}", X_Real_Ip="10.0.0.1")
    )
    two = await exchange(
        server.port,
        upgrade_request(f"/ws?access_token={jwt}", X_Forwarded_For="10.0.0.9, 10.0.0.2"),
    )
    assert one[0].startswith(b"HTTP/1.1 101") and two[0].startswith(b"HTTP/1.1 101")
    # Both connections closed again; a third from an address at its cap is refused.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(upgrade_request(f"/ws?access_token={jwt}", X_Real_Ip="10.0.0.3"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    [answer] = await exchange(
        server.port, upgrade_request(f"/ws?access_token={jwt}", X_Real_Ip="10.0.0.3")
    )
    assert answer.startswith(b"HTTP/1.1 429") and b"per_ip" in answer
    writer.close()


async def test_head_in_pieces_still_upgrades(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = upgrade_request(f"/ws?access_token={token('slow')}")
    for start in range(0, len(request), 40):
        writer.write(request[start : start + 40])
        await writer.drain()
        await asyncio.sleep(0.01)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
    writer.close()


async def test_unfinished_head_is_dropped_after_the_timeout(start_server: Any) -> None:
    server: Server = await start_server(server={"header_timeout": 0.2})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_plain_get_of_ws_with_a_token_is_refused_and_releases_its_slot(
    start_server: Any,
) -> None:
    server: Server = await start_server(ratelimit={"max_connections_per_user": 1})
    plain = f"GET /ws?access_token={token('p')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    [answer] = await exchange(server.port, plain)
    assert answer.startswith(b"HTTP/1.1 400")
    old = upgrade_request(f"/ws?access_token={token('p')}").replace(b"Version: 13", b"Version: 8")
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    _, answer = await exchange(server.port, health, old, read=0)
    assert answer.startswith(b"HTTP/1.1 426") and b"sec-websocket-version: 13" in answer.lower()
    client = await server.connect("p")  # the refusals kept no slot
    await client.send({"type": "ping", "ref": "1"})
    assert (await client.recv_type("pong"))["ref"] == "1"
