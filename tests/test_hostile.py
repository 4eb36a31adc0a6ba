"""Hostile HTTP clients against a real server over raw sockets (issue 15).

Each attack is answered as documented (docs/security.md lists the limits and
these tests), and never holds a socket or memory longer than its bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, ClassVar

import jwt
import orjson
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives.asymmetric import ec
from test_upgrade import upgrade_request
from tornado.websocket import websocket_connect

from conftest import SECRET, Server, ServerProcess, token

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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


async def test_well_behaved_client_keeps_its_messages_beside_slowloris(strict: Server) -> None:
    client = await strict.connect("good")
    baseline = open_fds()
    attackers = [await connect(strict) for _ in range(200)]
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
    await asyncio.sleep(0.1)
    assert open_fds() <= baseline + 2  # the server's descriptors (and ours) are back
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


# -- token attacks ------------------------------------------------------------------------


def forged(claims: dict[str, Any], key: str, **header: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=header)


async def handshake_reason(server: Server, jwt_text: str) -> str | None:
    """None when the upgrade is accepted, else the 401's reason."""
    reader, writer = await connect(server)
    writer.write(upgrade_request(f"/ws?access_token={jwt_text}"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    try:
        if head.startswith(b"HTTP/1.1 101"):
            return None
        assert head.startswith(b"HTTP/1.1 401"), head
        body = await asyncio.wait_for(reader.read(), 5)
        return str(orjson.loads(body)["reason"])
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        {"kid": "../../../../etc/passwd"},
        {"kid": "' OR 1=1; DROP TABLE messages; --"},
        {"jku": "http://127.0.0.1:1/keys.json"},
        {"x5u": "http://127.0.0.1:1/cert.pem"},
        {"jwk": {"kty": "oct", "k": "YXR0YWNrZXI"}},
    ],
    ids=["kid-path", "kid-sql", "jku", "x5u", "jwk"],
)
async def test_token_header_tricks_are_ignored(server: Server, header: dict[str, Any]) -> None:
    claims = {"sub": "h", "exp": int(time.time()) + 60}
    # Signed with the server's secret: the extra header changes nothing (no fetch, no file).
    assert await handshake_reason(server, forged(claims, SECRET, **header)) is None
    # Signed with the attacker's key it names: refused.
    attacker = forged(claims, "attacker-key-of-enough-length-for-hs256!", **header)
    assert await handshake_reason(server, attacker) == "bad_signature"


async def test_expired_one_second_past_the_leeway(start_server: Any) -> None:
    server: Server = await start_server(auth={"leeway": 5.0})
    now = int(time.time())
    past = forged({"sub": "e", "exp": now - 7}, SECRET)
    assert await handshake_reason(server, past) == "expired"
    within = forged({"sub": "e", "exp": now - 3}, SECRET)
    assert await handshake_reason(server, within) is None


async def test_token_of_another_issuer_or_audience(start_server: Any) -> None:
    server: Server = await start_server(auth={"audience": "app", "issuer": "https://id"})
    claims = {"sub": "i", "exp": int(time.time()) + 60, "aud": "app", "iss": "https://id"}
    assert await handshake_reason(server, forged(claims, SECRET)) is None
    other_iss = forged({**claims, "iss": "https://other"}, SECRET)
    assert await handshake_reason(server, other_iss) == "bad_issuer"
    other_aud = forged({**claims, "aud": "other-app"}, SECRET)
    assert await handshake_reason(server, other_aud) == "bad_audience"


async def test_100_kb_jwt_is_dropped_with_the_head(server: Server) -> None:
    """Over ``server.max_header_bytes``: no token parsing, no signature check."""
    (await server.connect("counted")).close()
    huge = "a" * 100_000
    checks = handshakes(server)
    assert checks >= 1
    for request in (
        upgrade_request(f"/ws?access_token={huge}"),
        upgrade_request("/ws", Authorization=f"Bearer {huge}"),
        post_head("/api/v1/publish", 2, huge) + b"{}",
    ):
        reader, writer = await connect(server)
        writer.write(request)
        started = time.monotonic()
        assert await closed_without_answer(reader)
        assert time.monotonic() - started < 2
        writer.close()
    assert handshakes(server) == checks  # none reached the token check


def handshakes(server: Server) -> float:
    """Handshakes counted so far, whatever their result."""
    return sum(
        sample.value
        for metric in server.node.metrics.registry.collect()
        if metric.name == "pushsvc_handshakes"
        for sample in metric.samples
        if sample.name == "pushsvc_handshakes_total"
    )


async def test_acking_another_users_message_changes_nothing(server: Server) -> None:
    bob = await server.connect("bob")
    status, body, _ = await server.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
    )
    assert status == 202
    message_id = body["id"]
    assert (await bob.recv_type("notification"))["id"] == message_id
    mallory = await server.connect("mallory")
    await mallory.send({"type": "ack", "ids": [message_id], "ref": "steal"})
    await mallory.recv_type("reply", "error")
    status, pending, _ = await server.http("GET", "/api/v1/users/bob/pending")
    assert status == 200 and [m["id"] for m in pending["messages"]] == [message_id]
    bob.close()
    mallory.close()


# -- frame floods and odd input ------------------------------------------------------------


async def test_deep_json_huge_ids_and_odd_names_get_error_frames(server: Server) -> None:
    client = await server.connect("odd")
    bystander = await server.connect("calm")
    cases: list[tuple[str, str]] = [
        ('{"type":"ping","x":' + "[" * 5000 + "]" * 5000 + "}", "bad_request"),
        (orjson.dumps({"type": "ack", "ids": ["x"] * 1001}).decode(), "bad_request"),
        (orjson.dumps({"type": "join", "room": "r" * 201}).decode(), "bad_request"),
        (orjson.dumps({"type": "join", "room": ""}).decode(), "bad_request"),
    ]
    for frame, code in cases:
        await client.send(frame)
        assert (await client.recv_type("error"))["code"] == code, frame[:60]
    for room in ("🙂-room", "\u202eevil", "a\u0000b", "ünïcödé"):  # stored and echoed as text
        await client.send({"type": "join", "room": room, "ref": "j"})
        reply = await client.recv_type("reply", "error")
        assert reply["type"] == "reply" and reply["room"] == room
    await bystander.send({"type": "ping", "ref": "ok"})
    assert (await bystander.recv_type("pong", timeout=2))["ref"] == "ok"
    client.close()
    bystander.close()


async def test_connection_flood_from_one_address_is_capped(start_server: Any) -> None:
    server: Server = await start_server(
        server={"xheaders": True},
        ratelimit={"max_connections_per_ip": 5, "handshake_rate": 1000, "handshake_burst": 1000},
    )
    good = await server.connect("good", headers={"X-Real-Ip": "10.0.0.2"})
    statuses = []
    writers = []
    for n in range(30):
        reader, writer = await connect(server)
        writers.append(writer)
        writer.write(upgrade_request(f"/ws?access_token={token(f'f{n}')}", X_Real_Ip="10.0.0.9"))
        statuses.append(status_of(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)))
    assert statuses.count(101) == 5 and statuses.count(429) == 25
    status, _, _ = await server.http("POST", "/api/v1/publish", {"room": "lobby", "text": "hi"})
    assert status == 202
    assert (await good.recv_type("chat", timeout=2))["text"] == "hi"
    for writer in writers:
        writer.close()
    good.close()


async def test_dribbled_body_is_cut_after_the_body_timeout(start_server: Any) -> None:
    server: Server = await start_server(server={"body_timeout": 0.5})
    reader, writer = await connect(server)
    writer.write(post_head("/api/v1/publish", 100, token("b", scope="publish")) + b'{"room"')
    started = time.monotonic()
    assert await closed_without_answer(reader)
    assert time.monotonic() - started < 2.5
    writer.close()


# -- a JWKS endpoint that is down, slow or returns garbage -------------------------------


class FlakyJwks(tornado.web.RequestHandler):
    """``GET /jwks``: the key set, garbage, or the key set after a delay."""

    keys: ClassVar[dict[str, Any]] = {}
    mode = "ok"

    async def get(self) -> None:
        if FlakyJwks.mode == "garbage":
            self.write(b"<html>not a key set</html>")
            return
        if FlakyJwks.mode == "slow":
            await asyncio.sleep(3)
        self.write({"keys": list(FlakyJwks.keys.values())})


async def test_jwks_down_slow_or_garbage_keeps_the_cached_keys(start_server: Any) -> None:
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    jwks = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/jwks", FlakyJwks)]))
    jwks.add_sockets(sockets)
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    FlakyJwks.keys = {"k1": {**public, "kid": "k1", "alg": "ES256", "use": "sig"}}
    FlakyJwks.mode = "ok"
    server: Server = await start_server(
        auth={
            "algorithms": ["ES256"],
            "jwks_url": f"http://127.0.0.1:{sockets[0].getsockname()[1]}/jwks",
            "jwks_refresh_interval": 1.0,
            "jwks_min_refetch_interval": 0.0,
        }
    )
    cache = server.node.authenticator.jwks
    assert cache is not None
    serial = iter(range(1000))

    def signed() -> str:  # a new token each time: the verified-token cache is bypassed
        claims = {"sub": "j", "exp": int(time.time()) + 60, "jti": str(next(serial))}
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})

    try:
        assert await handshake_reason(server, signed()) is None  # keys fetched
        bystander = await strict_connect(server, signed())
        for mode in ("garbage", "slow", "down"):
            FlakyJwks.mode = mode
            if mode == "down":
                jwks.stop()
                await jwks.close_all_connections()
            await asyncio.sleep(1.1)  # the keys are old: the next handshake refreshes them
            failures = cache.failures
            started = time.monotonic()
            assert await handshake_reason(server, signed()) is None, mode
            assert time.monotonic() - started < 1, mode  # nobody waits for the refresh
            await bystander.send({"type": "ping", "ref": mode})
            assert (await bystander.recv_type("pong", timeout=1))["ref"] == mode
            if mode != "slow":
                for _ in range(100):
                    if cache.failures > failures:
                        break
                    await asyncio.sleep(0.02)
                assert cache.failures == failures + 1, mode
                exported = server.node.metrics.registry.get_sample_value(
                    "pushsvc_jwks_fetch_failures_total"
                )
                assert exported == cache.failures
        unknown = jwt.encode(
            {"sub": "j", "exp": int(time.time()) + 60}, key, algorithm="ES256",
            headers={"kid": "k9"},
        )  # fmt: skip
        assert await handshake_reason(server, unknown) == "unknown_kid"
        bystander.close()
    finally:
        jwks.stop()


async def strict_connect(server: Server, jwt_text: str) -> Any:
    from conftest import Client

    connection = await websocket_connect(f"{server.ws_url}?access_token={jwt_text}")
    client = Client(connection)
    await client.recv_type("welcome")
    return client


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
async def test_slowloris_memory_and_descriptors_return_to_baseline(spawn: Any) -> None:
    """300 sockets dribbling heads (first and keep-alive) against ``pushsvc serve``."""
    server = spawn(env={"PUSHSVC_SERVER__HEADER_TIMEOUT": str(HEAD_TIMEOUT)})
    pid = server.proc.pid

    async def attack(keep_alive: bool) -> None:
        reader, writer = await connect(server)
        if keep_alive:
            writer.write(HEALTH)
            await read_response(reader)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        assert await closed_without_answer(reader, HEAD_TIMEOUT + 5)
        writer.close()

    await asyncio.gather(*(attack(False) for _ in range(20)))  # warm up
    await asyncio.sleep(0.2)
    rss, fds = rss_mib(pid), len(os.listdir(f"/proc/{pid}/fd"))
    await asyncio.gather(*(attack(n % 2 == 0) for n in range(300)))
    await asyncio.sleep(0.2)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= fds + 1
    assert rss_mib(pid) - rss < 8


async def test_clients_that_never_read_are_dropped_and_leave_nothing(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 clients upgrade, then never read while the server writes: 4008, then the sockets go."""
    from test_engine import open_ws

    from pushsvc.transport import websocket as wire

    monkeypatch.setattr(wire, "CLOSE_TIMEOUT", 0.5)  # the wait for a peer that never reads
    server: Server = await start_server(server={"max_buffer_bytes": 64 * 1024})
    good = await server.connect("good")
    await good.send({"type": "leave", "room": "lobby", "ref": "l"})  # the flood is not for it
    await good.recv_type("reply")
    baseline = open_fds()
    stuck = [await open_ws(server, "first", f"stuck-{n}", rcvbuf=4096) for n in range(20)]
    hub = server.node.hub
    for _ in range(100):
        if all(f"stuck-{n}" in hub.users for n in range(20)):
            break
        await asyncio.sleep(0.02)
    text = "x" * 3000
    for _ in range(5000):
        await server.node.publish("lobby", {"type": "chat", "room": "lobby", "text": text})
        await asyncio.sleep(0)
        if not any(user.startswith("stuck-") for user in hub.users):
            break
    assert not any(user.startswith("stuck-") for user in hub.users)
    closes = server.node.metrics.registry.get_sample_value(
        "pushsvc_closes_total", {"reason": "slow_consumer"}
    )
    assert closes == 20
    await good.send({"type": "ping", "ref": "fine"})  # the well-behaved client read on
    assert (await good.recv_type("pong", timeout=2))["ref"] == "fine"
    await asyncio.sleep(1.0)  # past the close timeout: the server dropped its sockets
    assert open_fds() <= baseline + 20 + 2  # only our own ends of the stuck sockets are left
    for _, writer in stuck:
        writer.close()
    await asyncio.sleep(0.1)
    assert open_fds() <= baseline + 2
    good.close()
