"""The in-memory transport: sessions and delivery on a real node, without sockets.

The node is built from real parts as ``app.start`` builds it (SQLite store
in ``tmp_path``, the in-memory broker in both delivery modes, Metrics on a
fresh registry, the plugins from their entry points), minus the HTTP
server; the delivery timer runs as in ``Service.start_timers``. Every test
runs on ``memory://`` and on ``memory://?delivery=async``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import ASYNC_BROKER, Server, make_config, token
from pushsvc import app, hookimpl
from pushsvc.core.node import Node
from pushsvc.plugin.manager import load_plugins
from pushsvc.protocol.codes import HandshakeError
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.transport.memory import FRAMING, MemoryConnection, open_session
from pushsvc.transport.pacing import pacer

TICK = 0.02  # the delivery timer's period here (app: 50 ms)

NodeFactory = Callable[..., Any]


class DeadRecorder:
    """A plugin registered through ``load_plugins(extra=...)``: records dead letters."""

    def __init__(self) -> None:
        self.dead: list[tuple[str, str, str]] = []  # (user, id, reason)

    @hookimpl
    def pushsvc_dead_lettered(self, user: str, message: dict[str, Any], reason: str) -> None:
        self.dead.append((user, message["id"], reason))


async def _every(interval: float, fn: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        fn()


@pytest.fixture(params=["memory://", ASYNC_BROKER], ids=["sync", "async"])
def broker_url(request: pytest.FixtureRequest) -> str:
    url: str = request.param
    return url


@pytest.fixture
async def make_node(tmp_path: Path, broker_url: str) -> AsyncIterator[NodeFactory]:
    """Build nodes from real parts (``app.build_node``: no HTTP); stopped at teardown."""
    built: list[tuple[Node, asyncio.Task[None]]] = []

    async def build(*, extra: Sequence[tuple[str, object]] = (), **sections: Any) -> Node:
        data_dir = tmp_path / f"data{len(built)}"
        data_dir.mkdir()
        config = make_config(data_dir, broker={"url": broker_url}, **sections)
        plugins = load_plugins(config.plugins.disabled, config.auth.default_rooms, extra=extra)
        node = await app.build_node(config, registry=CollectorRegistry(), plugins=plugins)
        built.append((node, asyncio.ensure_future(_every(TICK, node.delivery.tick))))
        return node

    yield build
    for node, ticker in built:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        for client in list(node.hub.all_clients()):
            client.close(DISCONNECTS.going_away)
        await pacer().drained()
        await node.settle_background()
        await node.delivery.drain()
        await node.broker.close()
        await node.store.close()


@pytest.fixture
async def node(make_node: NodeFactory) -> Node:
    built: Node = await make_node()
    return built


def metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def connect(node: Node, sub: str, **claims: Any) -> MemoryConnection:
    return await open_session(node, token(sub, **claims))


async def eventually(check: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def presence_in(conn: MemoryConnection, room: str) -> dict[str, Any]:
    """The next presence event of ``room`` (the default room's are skipped)."""
    while True:
        event = await conn.recv_type("presence")
        if event["room"] == room:
            return event


# -- sessions ------------------------------------------------------------------------------


async def test_welcome_registers_the_session(node: Node) -> None:
    conn = await connect(node, "alice", name="Alice")
    session = conn.session
    assert session is not None
    assert conn.welcome == {
        "type": "welcome",
        "message": "Welcome, Alice!",
        "user": "alice",
        "session": session.session,
        "heartbeat": node.config.server.heartbeat,
    }
    assert node.hub.sessions[session.session] is session
    assert session.transport is conn
    assert session.rooms == {"lobby"}  # chat.auto_join
    assert metric(node, "pushsvc_handshakes_total", result="ok", reason="none") == 1
    assert node.hub.reserved_users == {"alice": 1}

    await conn.close()
    assert conn.closed and node.hub.sessions == {}
    assert node.hub.reserved_users == {} and node.hub.rooms.get("lobby") is None
    assert metric(node, "pushsvc_closes_total", reason="client") == 1
    with pytest.raises(ConnectionError):
        await conn.receive({"type": "ping"})


async def test_refused_token_is_a_handshake_error(node: Node) -> None:
    with pytest.raises(HandshakeError) as refused:
        await open_session(node, "not-a-jwt")
    assert refused.value.status == 401
    assert node.hub.sessions == {} and node.hub.reserved_users == {}


async def test_ping_pong_and_transport_pings(node: Node) -> None:
    conn = await connect(node, "alice")
    await conn.receive({"type": "ping", "ref": "p1"})
    assert await conn.recv_type("pong") == {"type": "pong", "ref": "p1"}
    await conn.receive({"type": "ping"})
    assert await conn.recv_type("pong") == {"type": "pong"}

    session = conn.session
    assert session is not None
    node.keepalive.tick(mono=time.monotonic() + node.config.server.heartbeat)  # a ping round
    assert conn.pings == 1
    before = session.last_seen
    conn.pong()
    assert session.last_seen > before


async def test_join_and_leave_reply_and_tell_the_members(node: Node) -> None:
    alice = await connect(node, "alice")
    bob = await connect(node, "bob")
    assert await alice.request({"type": "join", "room": "r1", "ref": "j"}) == {
        "type": "reply",
        "ref": "j",
        "ok": True,
        "room": "r1",
        "users": ["alice"],
        "offset": 0,  # the room's history position: nothing published yet
        "epoch": "",
    }
    joined = await bob.request({"type": "join", "room": "r1", "ref": "j"})
    assert joined["users"] == ["alice", "bob"]  # the members so far, the joiner included
    presence = await presence_in(alice, "r1")
    assert presence == {"type": "presence", "room": "r1", "event": "join", "user": "bob"}
    assert await node.presence("r1") == ["alice", "bob"]

    reply = await bob.request({"type": "leave", "room": "r1", "ref": "l"})
    assert reply == {"type": "reply", "ref": "l", "ok": True, "room": "r1"}
    presence = await presence_in(alice, "r1")
    assert presence["event"] == "leave" and presence["user"] == "bob"
    assert await node.presence("r1") == ["alice"]

    refused = await bob.request({"type": "join", "room": "r2", "ref": "x"}, seconds=2)
    assert refused["type"] == "reply"  # default_rooms "*": any room
    forbidden = await connect(node, "carol", rooms=["only"])
    answer = await forbidden.request({"type": "join", "room": "r1", "ref": "f"})
    assert answer["type"] == "error" and answer["code"] == "forbidden"


async def test_chat_reaches_two_connections_framed_once(node: Node) -> None:
    alice = await connect(node, "alice")
    bob = await connect(node, "bob")
    await alice.request({"type": "join", "room": "r", "ref": "j"})
    await bob.request({"type": "join", "room": "r", "ref": "j"})
    await presence_in(alice, "r")  # bob's join: every earlier broadcast has arrived
    framings = FRAMING.calls

    reply = await alice.request({"type": "chat", "room": "r", "text": "hi", "ref": "c"})
    assert reply["ok"] is True
    got = [await conn.recv_type("chat") for conn in (alice, bob)]
    assert got[0] == got[1]
    assert got[0]["id"] == reply["id"] and got[0]["text"] == "hi"
    assert got[0]["user"] == "alice" and got[0]["room"] == "r"

    assert FRAMING.calls == framings + 1  # one framing for the whole room
    assert alice.broadcasts[-1] is bob.broadcasts[-1]  # one payload, encoded once
    assert alice.framed[-1] is bob.framed[-1]  # and framed once
    assert metric(node, "pushsvc_messages_accepted_total", type="chat") == 1


async def test_rate_limit_error_then_1008_on_abuse(make_node: NodeFactory) -> None:
    node: Node = await make_node(ratelimit={"rate": 0.001, "burst": 1, "abuse_violations": 3})
    conn = await connect(node, "alice")
    session = conn.session
    assert session is not None
    await conn.receive({"type": "ping", "ref": "ok"})
    assert (await conn.recv_type("pong"))["ref"] == "ok"
    errors = []
    while not conn.closes:
        await conn.receive({"type": "ping", "ref": f"p{len(errors)}"})
        errors.append(await conn.recv_type("error"))
    assert len(errors) == 4  # abuse_violations are tolerated, the next one closes
    assert all(e["code"] == "rate_limited" and e["retry_after"] > 0 for e in errors)
    assert errors[0]["ref"] == "p0" and "connection" in errors[0]["message"]

    assert await conn.wait_closed() == 1008
    assert conn.closes == [(1008, "rate limit abuse", False)]
    assert conn.closed and session.session not in node.hub.sessions
    assert node.hub.reserved_users == {}
    assert metric(node, "pushsvc_closes_total", reason="rate_abuse") == 1
    assert metric(node, "pushsvc_rate_limited_total", bucket="connection") == 4


async def test_unknown_type_and_invalid_json_are_errors(node: Node) -> None:
    conn = await connect(node, "alice")
    unknown = await conn.request({"type": "nope", "ref": "u"})
    assert unknown["code"] == "unknown_type" and "'nope'" in unknown["message"]

    await conn.receive(b'{"type": "ping", ')
    invalid = await conn.recv_type("error")
    assert invalid["code"] == "bad_request" and invalid["message"].startswith("invalid JSON")
    await conn.receive(b"\x00\x01", binary=True)
    binary = await conn.recv_type("error")
    assert binary["code"] == "bad_request" and "binary" in binary["message"]
    assert not conn.closes  # errors, not closes
    assert metric(node, "pushsvc_frame_errors_total", code="bad_request") == 2


async def test_auth_refreshes_the_token(node: Node) -> None:
    conn = await connect(node, "alice", ttl=60)
    session = conn.session
    assert session is not None
    first_exp = session.principal.expires_at
    assert first_exp is not None
    reply = await conn.request({"type": "auth", "token": token("alice", ttl=7200), "ref": "a"})
    assert reply["ok"] is True and reply["exp"] > first_exp
    assert session.principal.expires_at == reply["exp"]

    other = await conn.request({"type": "auth", "token": token("mallory"), "ref": "b"})
    assert other["code"] == "forbidden" and "another user" in other["message"]
    bad = await conn.request({"type": "auth", "token": "garbage", "ref": "c"})
    assert bad["code"] == "forbidden"
    assert session.principal.user == "alice" and not conn.closes


async def test_token_expiry_closes_with_4001(node: Node) -> None:
    conn = await connect(node, "alice", ttl=60)
    node.keepalive.tick(wall=time.time() + 120)  # the keepalive's expiry timer, an hour early
    assert await conn.wait_closed() == 4001
    assert conn.closes == [(4001, "token expired", False)]
    assert metric(node, "pushsvc_closes_total", reason="token_expired") == 1
    assert node.hub.sessions == {}


# -- at-least-once delivery ---------------------------------------------------------------


async def send_private(conn: MemoryConnection, to: str, text: str, ref: str) -> str:
    reply = await conn.request({"type": "private", "to": to, "text": text, "ref": ref})
    assert reply["type"] == "reply" and reply["ok"] is True, reply
    message_id: str = reply["id"]
    return message_id


async def test_private_to_an_offline_user_is_delivered_on_connect(node: Node) -> None:
    sam = await connect(node, "sam")
    sent = [await send_private(sam, "rita", f"m{i}", f"s{i}") for i in range(3)]
    rita = await connect(node, "rita")
    got = [await rita.recv_type("private") for _ in sent]
    assert [m["id"] for m in got] == sent
    assert [m["text"] for m in got] == ["m0", "m1", "m2"]
    assert all(m["ack"] is True and m["from"] == "sam" and m["to"] == "rita" for m in got)
    reply = await rita.request({"type": "ack", "ids": sent, "ref": "a"})
    assert reply["acked"] == 3
    assert metric(node, "pushsvc_messages_acked_total", type="private") == 3


async def test_an_accepted_message_stays_accepted_when_its_delivery_fails(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on the way to a recipient's connection is logged; the sender's reply is ok."""
    rita, sam = await connect(node, "rita"), await connect(node, "sam")
    write = MemoryConnection.write_frame

    def broken(self: MemoryConnection, data: bytes) -> None:
        if self is rita and b'"private"' in data:
            raise RuntimeError("a transport bug")
        write(self, data)

    monkeypatch.setattr(MemoryConnection, "write_frame", broken)
    message_id = await send_private(sam, "rita", "still stored", "s")  # reply ok
    monkeypatch.undo()
    again = await connect(node, "rita")  # the message is pending: a new connection gets it
    assert (await again.recv_type("private"))["id"] == message_id


async def test_one_ack_settles_every_connection_of_the_user(make_node: NodeFactory) -> None:
    node: Node = await make_node(delivery={"ack_timeout": 0.2, "max_attempts": 5})
    phone, laptop = await connect(node, "dora"), await connect(node, "dora")
    sam = await connect(node, "sam")
    published = node.broker.stats().published
    message_id = await send_private(sam, "dora", "hello", "s")
    for conn in (phone, laptop):
        assert (await conn.recv_type("private"))["id"] == message_id
    assert (await phone.request({"type": "ack", "id": message_id, "ref": "a1"}))["acked"] == 1
    # The in-process broker is skipped (Broker.in_process); any other one carries a DURABLE
    # and a SETTLED envelope on the user's channel.
    envelopes = node.broker.stats().published - published
    assert envelopes == (0 if node.broker.in_process else 2)
    await asyncio.sleep(0.6)  # three ack timeouts: a resend would have come by now
    assert len(laptop.messages("private")) == 1 and len(phone.messages("private")) == 1
    for conn in (phone, laptop):
        assert conn.session is not None and not conn.session.inflight.inflight
    assert (await laptop.request({"type": "ack", "id": message_id, "ref": "a2"}))["acked"] == 0
    assert metric(node, "pushsvc_messages_redelivered_total", type="private") == 0
    assert metric(node, "pushsvc_acks_ignored_total", reason="repeated") == 1


async def test_resent_after_the_ack_timeout(make_node: NodeFactory) -> None:
    node: Node = await make_node(delivery={"ack_timeout": 0.1, "max_attempts": 5})
    mute = await connect(node, "mute")
    sam = await connect(node, "sam")
    sent_at = time.monotonic()  # before the first send
    message_id = await send_private(sam, "mute", "there?", "s")
    first = await mute.recv_type("private")
    again = await mute.recv_type("private", seconds=2)
    assert first == again and again["id"] == message_id
    assert time.monotonic() - sent_at >= 0.1 * 0.8  # not before the ack timeout (-jitter)
    assert metric(node, "pushsvc_messages_redelivered_total", type="private") >= 1
    assert (await mute.request({"type": "ack", "id": message_id, "ref": "a"}))["acked"] == 1
    count = len(mute.messages("private"))
    await asyncio.sleep(0.4)
    assert len(mute.messages("private")) == count  # settled: no more resends


async def test_dead_letter_after_max_attempts(make_node: NodeFactory) -> None:
    recorder = DeadRecorder()
    node: Node = await make_node(
        extra=[("dead-recorder", recorder)],
        delivery={"ack_timeout": 0.05, "max_attempts": 2, "backoff_max": 0.1},
    )
    mute = await connect(node, "mute")
    sam = await connect(node, "sam")
    message_id = await send_private(sam, "mute", "anyone?", "s")
    await eventually(lambda: bool(recorder.dead))
    assert recorder.dead == [("mute", message_id, "max_attempts")]
    assert [m["id"] for m in mute.messages("private")] == [message_id, message_id]  # 2 sends
    dead = metric(
        node, "pushsvc_messages_dead_lettered_total", type="private", reason="max_attempts"
    )
    assert dead == 1
    letters = await node.store.dead_letters("mute", 10)
    assert [letter.id for letter in letters] == [message_id]
    assert (await mute.request({"type": "ack", "id": message_id, "ref": "late"}))["acked"] == 0
    await asyncio.sleep(0.3)
    assert len(mute.messages("private")) == 2  # no send after the dead letter


# -- next to the WebSocket transport -------------------------------------------------------


async def test_websocket_and_memory_connections_share_a_room(server: Server) -> None:
    node = server.node
    ws = await server.connect("alice")
    mem = await connect(node, "bob")
    await ws.send({"type": "join", "room": "both", "ref": "j"})
    assert (await ws.recv_type("reply"))["room"] == "both"
    await mem.request({"type": "join", "room": "both", "ref": "j"})
    while (await ws.recv_type("presence"))["room"] != "both":
        pass

    await ws.send({"type": "chat", "room": "both", "text": "from ws", "ref": "c"})
    assert (await mem.recv_type("chat"))["text"] == "from ws"
    assert (await ws.recv_type("chat"))["text"] == "from ws"
    await mem.request({"type": "chat", "room": "both", "text": "from memory", "ref": "c"})
    assert (await ws.recv_type("chat"))["text"] == "from memory"
    assert (await mem.recv_type("chat"))["text"] == "from memory"

    message_id = await send_private(mem, "alice", "durable", "p")
    frame = await ws.recv_type("private")
    assert frame["id"] == message_id and frame["from"] == "bob"
    ws.close()
    await mem.close()
