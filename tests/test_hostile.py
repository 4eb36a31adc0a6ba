"""Hostile HTTP clients against a real server over raw sockets (issue 15).

Each attack is answered as documented (docs/security.md lists the limits and
these tests), and never holds a socket or memory longer than its bound.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson
import pytest
from test_upgrade import upgrade_request

from conftest import Server, ServerProcess, token

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


async def connect(
    server: Server | ServerProcess,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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


# -- 3. bodies are JSON whatever their Content-Type --------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "application/json"]
)
async def test_body_is_json_whatever_the_content_type(server: Server, content_type: str) -> None:
    client = await server.connect("reader")
    text = "a=1&" * 1500  # curl -d sends form-urlencoded: Tornado parsed it as a form
    status, body, _ = await server.http(
        "POST",
        "/api/v1/publish",
        {"room": "lobby", "text": text, "data": {"q": "x&y=z"}},
        headers={"Content-Type": content_type},
    )
    assert status == 202, body
    frame = await client.recv_type("chat")
    assert frame["text"] == text and frame["data"] == {"q": "x&y=z"}
    client.close()


async def test_form_body_that_is_not_json_names_the_body(server: Server) -> None:
    status, body, _ = await server.http(
        "POST",
        "/api/v1/publish",
        b"room=lobby&text=hi",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 400 and body["message"].startswith("body: not valid JSON")


# -- 4. bodies are refused on the head, before they are read -----------------------------


def post_head(path: str, length: int, jwt: str | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    if jwt is not None:
        lines.append(f"Authorization: Bearer {jwt}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("jwt", "length", "status"),
    [
        (None, 10_000_000, 401),
        ("client", 10_000_000, 403),  # a client token (no scope publish) on the server API
        ("backend", 10_000_000, 413),
        ("backend", 1024 * 1024 + 1, 413),
    ],
)
async def test_refused_on_the_head_without_reading_the_body(
    server: Server, jwt: str | None, length: int, status: int
) -> None:
    reader, writer = await connect(server)
    bearer = {None: None, "client": token("c"), "backend": token("b", scope="publish")}[jwt]
    writer.write(post_head("/api/v1/publish", length, bearer))  # and not a byte of body
    response = await read_response(reader)
    assert status_of(response) == status
    assert b"Connection: close" in response
    writer.close()


@pytest.mark.parametrize("status", [401, 413])
async def test_refused_client_still_sending_its_body_reads_the_answer(
    server: Server, status: int
) -> None:
    """No ``Expect: 100-continue``: the whole body is sent before reading (lingering close)."""
    reader, writer = await connect(server)
    jwt = token("b", scope="publish") if status == 413 else None
    body = b"x" * 8_000_000
    writer.write(post_head("/api/v1/publish", len(body), jwt) + body)
    await asyncio.wait_for(writer.drain(), 10)
    response = await read_response(reader)
    assert status_of(response) == status
    assert await asyncio.wait_for(reader.read(), 10) == b""  # then EOF, not a reset
    writer.close()


async def test_chunked_body_over_the_limit_is_cut(start_server: Any) -> None:
    server: Server = await start_server(api={"max_body_bytes": 1000})
    reader, writer = await connect(server)
    writer.write(post_head("/api/v1/publish", 0, token("b", scope="publish"), chunked=True))
    writer.write(b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n")
    assert status_of(await read_response(reader)) == 400
    assert await closed_without_answer(reader)
    writer.close()


async def test_bodies_in_flight_share_a_bounded_buffer(start_server: Any) -> None:
    server: Server = await start_server(api={"max_body_bytes": 1000, "max_buffered_bytes": 1500})
    jwt = token("b", scope="publish")
    body = orjson.dumps({"room": "lobby", "text": "x" * 900})
    first = await connect(server)
    first[1].write(post_head("/api/v1/publish", len(body), jwt))  # body still to come
    await asyncio.sleep(0.2)
    second = await connect(server)
    second[1].write(post_head("/api/v1/publish", len(body), jwt))
    response = await read_response(second[0])
    assert status_of(response) == 503 and b"Retry-After: 1" in response
    assert b"api.max_buffered_bytes" in response
    first[1].write(body)
    assert status_of(await read_response(first[0])) == 202
    status, _, _ = await server.http("POST", "/api/v1/publish", {"room": "lobby", "text": "x"})
    assert status == 202  # the reservation was given back
    for _, writer in (first, second):
        writer.close()


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115 - read at once
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
async def test_unauthenticated_bodies_do_not_grow_the_server(spawn: Any) -> None:
    """Six concurrent 10 MB bodies without a token: answered 401, not buffered."""
    server = spawn()
    for _ in range(3):  # warm up the code paths
        reader, writer = await connect(server)
        writer.write(post_head("/api/v1/publish", 100) + b"x" * 100)
        await read_response(reader)
        writer.close()
    before = rss_mib(server.proc.pid)
    body = b"x" * 10_000_000

    async def attack() -> int:
        reader, writer = await connect(server)
        writer.write(post_head("/api/v1/publish", len(body)) + body)
        await asyncio.wait_for(writer.drain(), 20)
        status = status_of(await read_response(reader))
        writer.close()
        return status

    assert await asyncio.gather(*(attack() for _ in range(6))) == [401] * 6
    assert rss_mib(server.proc.pid) - before < 16  # was +98 MiB with the bodies buffered
