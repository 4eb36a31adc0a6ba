"""Connections, rooms, chat, heartbeat, expiry and every bad input, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import orjson

from conftest import Server, token

Start = Any


async def test_welcome_and_chat_in_default_room(server: Server) -> None:
    alice = await server.connect("alice", name="Alice")
    assert alice.welcome["user"] == "alice" and alice.welcome["heartbeat"] == 25.0
    assert alice.welcome["session"] and "message" in alice.welcome
    bob = await server.connect("bob")
    assert await alice.recv_type("presence") == {
        "type": "presence",
        "room": "lobby",
        "event": "join",
        "user": "bob",
    }
    await alice.send({"type": "chat", "text": "hi", "ref": "r1", "user": "mallory", "timestamp": 1})
    # The reply and alice's copy of the chat come in either order (a broker may deliver later).
    own = {frame["type"]: frame for frame in [await alice.recv_type("chat", "reply") for _ in "12"]}
    for chat in (own["chat"], await bob.recv_type("chat")):
        assert chat["room"] == "lobby" and chat["text"] == "hi"
        assert chat["user"] == "alice" and chat["name"] == "Alice"  # not the client's value
        assert chat["timestamp"] > 1_700_000_000_000 and len(chat["id"]) == 26
    reply = own["reply"]
    assert reply == {"type": "reply", "ref": "r1", "ok": True, "id": chat["id"]}


async def test_join_leave_presence_and_room_broadcast(server: Server) -> None:
    a = await server.connect("a")
    b = await server.connect("b")
    c = await server.connect("c")
    await a.send({"type": "join", "room": "team", "ref": "j"})
    joined_reply = {
        "type": "reply",
        "ref": "j",
        "ok": True,
        "room": "team",
        "users": ["a"],
        "offset": 0,  # the room's history position: nothing published yet
        "epoch": "",
    }
    assert await a.recv_type("reply") == joined_reply
    await b.send({"type": "join", "room": "team", "ref": "j2"})
    # The join reply lists the members so far (presence events tell the changes).
    assert (await b.recv_type("reply"))["users"] == ["a", "b"]
    joined = await a.recv_type("presence")
    while joined["room"] != "team":
        joined = await a.recv_type("presence")
    assert joined == {"type": "presence", "room": "team", "event": "join", "user": "b"}
    await b.send({"type": "chat", "room": "team", "text": "team only"})
    assert (await a.recv_type("chat"))["text"] == "team only"
    assert (await b.recv_type("chat"))["text"] == "team only"  # sender included
    await c.expect_nothing(0.3, ignore=("presence",))
    await b.send({"type": "leave", "room": "team"})
    left = await a.recv_type("presence")
    while left["room"] != "team":
        left = await a.recv_type("presence")
    assert left["event"] == "leave" and left["user"] == "b"
    # Chat to a room one has not joined is refused.
    await c.send({"type": "chat", "room": "team", "text": "x", "ref": "c1"})
    error = await c.recv_type("error")
    assert error["code"] == "forbidden" and error["ref"] == "c1"


async def test_rooms_claim_and_forbidden_join(server: Server) -> None:
    client = await server.connect("r", rooms=["team-*"])
    await client.send({"type": "join", "room": "team-red", "ref": "ok"})
    assert (await client.recv_type("reply", "error"))["type"] == "reply"
    await client.send({"type": "join", "room": "admins", "ref": "no"})
    error = await client.recv_type("error")
    assert error["code"] == "forbidden" and error["ref"] == "no"


async def test_bad_input_keeps_the_connection(server: Server) -> None:
    client = await server.connect("bad")
    long_ref = "r" * 65
    cases: list[tuple[Any, str, str]] = [
        ('{"type": "ping"', "bad_request", "invalid JSON"),
        ("[1, 2]", "bad_request", "JSON object"),
        ("{}", "bad_request", "type: missing"),
        ('{"type": 7}', "bad_request", "type: must be a string"),
        ({"type": "teleport"}, "unknown_type", "teleport"),
        ({"type": "chat"}, "bad_request", "text: missing"),
        ({"type": "chat", "text": 5}, "bad_request", "text: must be a string"),
        ({"type": "private", "text": "x"}, "bad_request", "to: missing"),
        ({"type": "join", "room": ["x"]}, "bad_request", "room:"),
        ({"type": "ping", "ref": long_ref}, "bad_request", "ref:"),
        ({"type": "ack"}, "bad_request", "ack"),
        ({"type": "ack", "ids": ["x"] * 10_000}, "bad_request", "ids: at most 1000"),
        ({"type": "ack", "ids": [1, 2]}, "bad_request", "ids: every item"),
        ({"type": "notification", "to": "bob", "title": "t", "message": "m"}, "forbidden", "scope"),
    ]
    for frame, code, text in cases:
        await client.send(frame)
        error = await client.recv_type("error")
        assert error["code"] == code and text in error["message"], (frame, error)
    await client.send(b"\x01\x02", binary=True)
    error = await client.recv_type("error")
    assert error["code"] == "bad_request" and "binary" in error["message"]
    # Still serving.
    await client.send({"type": "ping", "ref": "p"})
    assert await client.recv_type("pong") == {"type": "pong", "ref": "p"}
    # A text frame that is not UTF-8 is no WebSocket text (RFC 6455 §8.1): 1007.
    client.conn.protocol._write_frame(True, 0x1, b'{"type": "\xff"}')
    assert await client.closed() == 1007


async def test_oversize_frame_closes_1009(start_server: Start) -> None:
    server = await start_server(server={"max_message_bytes": 1024})
    client = await server.connect("big")
    other = await server.connect("other")
    await client.send({"type": "chat", "text": "x" * 2000})
    assert await client.closed() == 1009
    await other.send({"type": "ping"})
    assert (await other.recv_type("pong"))["type"] == "pong"


async def test_flood_is_rate_limited_then_closed_1008(start_server: Start) -> None:
    server = await start_server(
        ratelimit={"rate": 1.0, "burst": 3.0, "abuse_violations": 3, "abuse_window": 10.0}
    )
    client = await server.connect("flood")
    bystander = await server.connect("calm")
    for i in range(10):
        await client.send({"type": "ping", "ref": str(i)})
    pongs, errors = 0, []
    while True:
        frame = await client.recv()
        if frame is None:
            break
        if frame["type"] == "pong":
            pongs += 1
        elif frame["type"] == "error":
            errors.append(frame)
    assert pongs == 3
    assert errors and all(e["code"] == "rate_limited" and e["retry_after"] > 0 for e in errors)
    assert client.close_code == 1008
    await bystander.send({"type": "ping"})
    assert (await bystander.recv_type("pong"))["type"] == "pong"


async def test_user_bucket_spans_connections(start_server: Start) -> None:
    server = await start_server(ratelimit={"user_rate": 0.1, "user_burst": 2.0})
    one = await server.connect("u")
    two = await server.connect("u")
    await one.send({"type": "ping"})
    await two.send({"type": "ping"})
    await one.recv_type("pong")
    await two.recv_type("pong")
    await two.send({"type": "ping", "ref": "3"})
    error = await two.recv_type("error")
    assert error["code"] == "rate_limited" and "user" in error["message"]


async def test_auth_frame_refreshes_token_and_expiry_closes_4001(start_server: Start) -> None:
    server = await start_server(auth={"leeway": 0.0})
    refreshed = await server.connect("t", ttl=2)
    expiring = await server.connect("t", ttl=2)
    await refreshed.send({"type": "auth", "token": token("t", ttl=60), "ref": "a"})
    reply = await refreshed.recv_type("reply")
    assert reply["ref"] == "a" and reply["exp"] > 0
    await refreshed.send({"type": "auth", "token": token("someone-else"), "ref": "b"})
    error = await refreshed.recv_type("error")
    assert error["code"] == "forbidden" and "sub" in error["message"]
    assert await expiring.closed(timeout=6) == 4001
    await refreshed.send({"type": "ping"})
    assert (await refreshed.recv_type("pong"))["type"] == "pong"


async def test_heartbeat_closes_silent_peers(start_server: Start) -> None:
    # No auto-join: presence frames left unread would fill the test client's one-slot
    # queue and stop it answering pings, making it a silent peer too.
    server = await start_server(
        server={"heartbeat": 0.5, "heartbeat_timeout": 0.5}, chat={"auto_join": False}
    )
    live = await server.connect("live")  # the client library answers pings
    # A raw client that never reads, so it never answers pings.
    silent = raw_upgrade(server, "silent")
    await asyncio.sleep(3.0)
    assert "silent" not in server.node.hub.users
    await live.send({"type": "ping"})
    assert (await live.recv_type("pong"))["type"] == "pong"
    silent.close()


def raw_upgrade(server: Server, sub: str, rcvbuf: int | None = None) -> socket.socket:
    """Open a WebSocket by hand and never read from it."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws?access_token={token(sub)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def test_slow_consumer_is_closed(start_server: Start) -> None:
    server = await start_server(server={"max_buffer_bytes": 64 * 1024})
    fast = await server.connect("fast")
    slow = raw_upgrade(server, "slow", rcvbuf=4096)
    for _ in range(100):
        if "slow" in server.node.hub.users:
            break
        await asyncio.sleep(0.02)
    payload = "x" * 3000
    for _ in range(3000):
        await server.node.publish("lobby", {"type": "chat", "room": "lobby", "text": payload})
        if "slow" not in server.node.hub.users:
            break
        await asyncio.sleep(0)
    for _ in range(100):
        if "slow" not in server.node.hub.users:
            break
        await asyncio.sleep(0.02)
    assert "slow" not in server.node.hub.users
    closes = server.node.metrics.closes.labels("slow_consumer")._value.get()
    assert closes == 1
    await fast.send({"type": "ping"})
    assert (await fast.recv_type("pong"))["type"] == "pong"
    slow.close()


async def test_welcome_is_first_and_json_once(server: Server) -> None:
    client = await server.connect("j", welcome=False)
    raw = await client.conn.read_message()
    assert isinstance(raw, str) and orjson.loads(raw)["type"] == "welcome"


async def test_join_reply_leaves_users_out_above_the_presence_cap(start_server: Any) -> None:
    server = await start_server(chat={"presence_max_members": 1, "auto_join": False})
    a = await server.connect("a")
    b = await server.connect("b")
    await a.send({"type": "join", "room": "big", "ref": "1"})
    assert (await a.recv_type("reply"))["users"] == ["a"]
    await b.send({"type": "join", "room": "big", "ref": "2"})
    assert "users" not in await b.recv_type("reply")
