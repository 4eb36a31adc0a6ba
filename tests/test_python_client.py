"""The Python client (pushsvc.client) and its CLI against real ``pushsvc serve`` processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import BIN, SECRET, ServerProcess, free_port, token
from pushsvc.client import PushClient, PushError, drain_delay, token_claims

pytestmark = pytest.mark.timeout(30)

Spawn = Callable[..., ServerProcess]
FAST = {"min_delay": 0.05, "max_delay": 0.3, "drain_jitter": 0.1, "ack_delay": 0.01}


async def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the server API with a ``publish`` token."""
    headers = {"Authorization": f"Bearer {token('backend', scope='publish')}"}
    data = None if body is None else orjson.dumps(body)
    request = HTTPRequest(server.base + path, method=method, body=data, headers=headers)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, orjson.loads(response.body) if response.body else None


async def eventually(check: Callable[[], Any], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check() if asyncio.iscoroutinefunction(check) else not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def pending(server: ServerProcess, user: str) -> list[dict[str, Any]]:
    code, body = await api(server, "GET", f"/api/v1/users/{user}/pending")
    assert code == 200, body
    messages: list[dict[str, Any]] = body["messages"]
    return messages


def test_helpers() -> None:
    assert drain_delay("server draining; reconnect in 2.5s") == 2.5
    assert drain_delay("bye") is None
    claims = token_claims(token("alice", ttl=60))
    assert claims is not None and claims["sub"] == "alice"
    assert token_claims("not a jwt") is None


def test_reconnect_delays() -> None:
    client = PushClient("ws://127.0.0.1:1/ws", token="t", min_delay=1, max_delay=8)
    for attempt, cap in ((1, 1), (2, 2), (4, 8), (10, 8)):
        client._attempt = attempt
        assert all(0 <= client._delay(1006, "") <= cap for _ in range(50))
    client._attempt = 1
    assert all(15 <= client._delay(1008, "") <= 30 for _ in range(50))
    assert all(2.5 <= client._delay(1001, "reconnect in 2.5s") <= 3.5 for _ in range(50))
    assert all(0 <= client._delay(1001, "going away") <= 1 for _ in range(50))


async def test_send_reply_and_error(spawn: Spawn) -> None:
    server = spawn()
    async with PushClient(server.ws_url, token=token("alice"), **FAST) as client:
        welcome = await client.wait_open(5)
        assert welcome["user"] == "alice"
        pong = await client.send("join", room="r1", timeout=5)
        assert pong["type"] == "reply" and pong["room"] == "r1"
        with pytest.raises(PushError) as info:
            await client.send("nonsense", timeout=5)
        assert info.value.code == "unknown_type"
        with pytest.raises(PushError) as info:
            await client.send("chat", room="not-joined", text="x", timeout=5)
        assert info.value.code == "forbidden"
    assert client.state == "closed"
    with pytest.raises(PushError) as info:
        await client.send("ping")
    assert info.value.code == "closed"


async def test_chat_between_two_clients(spawn: Spawn) -> None:
    server = spawn()
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with (
        PushClient(server.ws_url, token=token("alice"), **FAST) as alice,
        PushClient(server.ws_url, token=token("bob"), **FAST) as bob,
    ):
        bob.on("chat", got.put_nowait)
        # joins made before the connection is open are sent on the welcome
        await asyncio.wait_for(asyncio.gather(alice.join("team"), bob.join("team")), 5)
        reply = await alice.send("chat", room="team", text="hello bob")
        message = await asyncio.wait_for(got.get(), 5)
        assert message["text"] == "hello bob" and message["user"] == "alice"
        assert message["id"] == reply["id"]
        await bob.leave("team")
        assert "team" not in bob.rooms


async def test_notification_is_acked_after_the_handler(spawn: Spawn) -> None:
    server = spawn()
    handled: list[dict[str, Any]] = []

    async def store(frame: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        handled.append(frame)

    async with PushClient(server.ws_url, token=token("bob"), **FAST) as bob:
        bob.on("notification", store)
        await bob.wait_open(5)
        code, body = await api(
            server, "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
        )
        assert code == 202, body
        await eventually(lambda: handled)
        assert handled[0]["id"] == body["id"] and handled[0]["ack"] is True

        async def nothing_pending() -> bool:
            return not await pending(server, "bob")

        await eventually(nothing_pending)


async def test_duplicates_are_dropped(spawn: Spawn) -> None:
    server = spawn(env={"PUSHSVC_DELIVERY__ACK_TIMEOUT": "0.2"})
    handled: list[str] = []
    raw: list[str] = []
    bob = PushClient(server.ws_url, token=token("bob"), ack_mode="manual", **FAST)
    bob.on("notification", lambda frame: handled.append(frame["id"]))
    on_message = bob._on_message

    def spy(message: str | bytes) -> None:
        frame = orjson.loads(message)
        if frame.get("type") == "notification":
            raw.append(frame["id"])
        on_message(message)

    bob._on_message = spy  # type: ignore[method-assign]
    async with bob:
        await bob.wait_open(5)
        code, body = await api(
            server, "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
        )
        assert code == 202, body
        await eventually(lambda: len(raw) >= 2)  # redelivered: not acked yet
        assert handled == [body["id"]]
        bob.ack(body["id"])

        async def nothing_pending() -> bool:
            return not await pending(server, "bob")

        await eventually(nothing_pending)


async def test_reconnect_after_restart(spawn: Spawn) -> None:
    port = free_port()
    env = {"PUSHSVC_SERVER__DRAIN_SECONDS": "0.2"}
    server = spawn(port=port, env=env)
    chats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    closes: list[tuple[int, str]] = []
    delays: list[float] = []
    async with PushClient(server.ws_url, token=token("alice"), **FAST) as client:
        client.on("chat", chats.put_nowait)
        client.on("close", lambda code, reason: closes.append((code, reason)))
        client.on("reconnecting", lambda attempt, delay: delays.append(delay))
        await client.join("team")
        assert await asyncio.to_thread(server.terminate, 15) == 0
        await eventually(lambda: client.state != "open")
        assert closes[0][0] == 1001
        assert delays and delays[0] >= drain_delay(closes[0][1]) >= 1  # type: ignore[operator]
        # queued while the server is down; sent after the rooms are rejoined
        queued = asyncio.ensure_future(client.send("chat", room="team", text="queued", timeout=20))
        await asyncio.sleep(0.3)
        assert not queued.done()
        await asyncio.to_thread(spawn, port=port, env=env, name="server2")
        reply = await asyncio.wait_for(queued, 20)
        message = await asyncio.wait_for(chats.get(), 5)
        assert message["id"] == reply["id"] and message["text"] == "queued"
        assert client.rooms == {"team"}


async def test_outbox_timeout_and_full() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens
    async with PushClient(url, token=token("alice"), outbox_size=1, **FAST) as client:
        first = asyncio.ensure_future(client.send("ping", timeout=0.3))
        await asyncio.sleep(0)
        with pytest.raises(PushError) as info:
            await client.send("ping")
        assert info.value.code == "outbox_full"
        with pytest.raises(PushError) as info:
            await first
        assert info.value.code == "timeout"
        queued = asyncio.ensure_future(client.send("ping", timeout=10))
        await asyncio.sleep(0.05)
    with pytest.raises(PushError) as info:
        await queued
    assert info.value.code == "closed"


async def test_disconnect_by_api_does_not_reconnect(spawn: Spawn) -> None:
    server = spawn()
    closes: list[int] = []
    async with PushClient(server.ws_url, token=token("carol"), **FAST) as client:
        client.on("close", lambda code, reason: closes.append(code))
        await client.wait_open(5)
        code, body = await api(server, "POST", "/api/v1/users/carol/disconnect", {"reason": "bye"})
        assert code == 200 and body["closed"] == 1
        await asyncio.wait_for(client.wait_closed(), 5)
        assert client.state == "closed" and closes == [4003]
        await asyncio.sleep(0.3)
        assert closes == [4003]
        with pytest.raises(PushError) as info:
            await client.send("ping")
        assert info.value.code == "closed"


async def test_token_callable_refreshes_in_band(spawn: Spawn) -> None:
    server = spawn()
    calls: list[str] = []

    async def provider() -> str:
        calls.append("x")
        return token("dave", ttl=4)

    async with PushClient(server.ws_url, token=provider, refresh_before=3, **FAST) as client:
        await client.wait_open(5)
        await eventually(lambda: len(calls) >= 2, 5)  # refreshed in-band at ~2 s
        await asyncio.sleep(2.5)  # past the first token's exp: still the same connection
        assert client.state == "open" and client.close_code is None


async def test_revoked_token_is_refreshed_then_reconnects(spawn: Spawn) -> None:
    server = spawn()
    calls: list[float] = []

    async def provider() -> str:
        if calls:
            await asyncio.sleep(1.1)  # iat after the revocation's "until" (whole seconds)
        calls.append(time.time())
        return token("gina", ttl=600)

    closes: list[int] = []
    async with PushClient(server.ws_url, token=provider, **FAST) as client:
        client.on("close", lambda code, reason: closes.append(code))
        await client.wait_open(5)
        await client.join("team")
        code, body = await api(server, "POST", "/api/v1/revocations", {"user": "gina"})
        assert code in (200, 201), body
        await eventually(lambda: closes)
        assert closes[0] == 4001
        await eventually(lambda: client.state == "open" and len(calls) >= 2, 10)
        assert client.rooms == {"team"}
        reply = await client.send("chat", room="team", text="back", timeout=5)
        assert reply["id"]


# -- CLI -----------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {**os.environ, "PUSHSVC_JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}


async def test_cli_listen_prints_and_acks(spawn: Spawn) -> None:
    server = spawn()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "pushsvc"),
        "listen",
        "--url",
        server.ws_url,
        "--token",
        token("erin"),
        "--room",
        "news",
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None

        async def next_frame(kind: str) -> dict[str, Any]:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 10)  # type: ignore[union-attr]
                assert line, "listen exited"
                frame: dict[str, Any] = orjson.loads(line)
                if frame["type"] == kind:
                    return frame

        await next_frame("welcome")

        async def joined() -> bool:
            code, body = await api(server, "GET", "/api/v1/rooms/news/presence")
            return code == 200 and "erin" in body["users"]

        await eventually(joined)
        code, body = await api(
            server, "POST", "/api/v1/notify", {"to": "erin", "title": "hi", "message": "there"}
        )
        assert code == 202
        frame = await next_frame("notification")
        assert frame["id"] == body["id"] and frame["title"] == "hi"

        async def nothing_pending() -> bool:
            return not await pending(server, "erin")

        await eventually(nothing_pending)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def test_cli_send(spawn: Spawn) -> None:
    server = spawn()
    base = [str(BIN / "pushsvc"), "send", "--url", server.ws_url, "--token", token("frank")]
    done = subprocess.run(
        [*base, "join", "--field", "room=news"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    reply = orjson.loads(done.stdout)
    assert reply["type"] == "reply" and reply["room"] == "news"
    done = subprocess.run(
        [*base, "chat", "--json", '{"room": "nowhere", "text": "x"}'],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=20,
    )
    assert done.returncode == 1, done.stderr
    assert orjson.loads(done.stdout)["code"] == "forbidden"


async def test_rejoin_resumes_the_room_after_a_reconnect(spawn: Spawn) -> None:
    port = free_port()
    server = spawn(port=port)
    chats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    recoveries: list[dict[str, Any]] = []
    async with PushClient(server.ws_url, token=token("alice"), **FAST) as client:
        client.on("chat", chats.put_nowait)
        client.on("recovery", recoveries.append)
        await client.join("team")
        code, body = await api(server, "POST", "/api/v1/publish", {"room": "team", "text": "m0"})
        assert code == 202, body
        first = await asyncio.wait_for(chats.get(), 5)
        assert client.positions["team"] == (first["offset"], first["epoch"])
        server.kill9()
        # the room goes on without the client: another process on the same data
        other = await asyncio.to_thread(spawn, name="other")
        for i in range(1, 6):
            code, body = await api(
                other, "POST", "/api/v1/publish", {"room": "team", "text": f"m{i}"}
            )
            assert code == 202, body
        other.kill9()
        await asyncio.to_thread(spawn, port=port, name="again")
        got = [await asyncio.wait_for(chats.get(), 20) for _ in range(5)]
        assert [m["text"] for m in got] == [f"m{i}" for i in range(1, 6)]
        assert recoveries == [
            {"room": "team", "recovered": True, "recovered_count": 5, "reason": None}
        ]
        assert client.positions["team"] == (first["offset"] + 5, first["epoch"])
