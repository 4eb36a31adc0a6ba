"""Both sides of the Tornado-internals boundary: the event loop accepting connections, and
Tornado accepting them (internals missing) with ``/ws`` on the same engine."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Server
from pushsvc.transport import tornado_compat


@pytest.fixture(params=["internals", "tornado-accepts"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "tornado-accepts":
        monkeypatch.setattr(tornado_compat, "INTERNALS_OK", False)
    return str(request.param)


@pytest.mark.parametrize("size", [10, 125, 126, 65535, 65536, 200_000])
async def test_frames_of_every_length_class(path: str, start_server: Any, size: int) -> None:
    server: Server = await start_server(server={"max_message_bytes": 300_000})
    alice = await server.connect("alice")
    bob = await server.connect("bob")
    await alice.recv_type("presence")
    text = "é" * (size // 2)
    await server.node.publish("lobby", {"type": "chat", "room": "lobby", "text": text})
    for client in (alice, bob):
        assert (await client.recv_type("chat"))["text"] == text
    # A chat's broadcast comes before its reply; the ping after it may be answered
    # before that reply (docs/protocol.md: replies are matched by ref).
    await alice.send({"type": "chat", "text": "one", "ref": "1"})
    await alice.send({"type": "ping", "ref": "2"})
    kinds = [(await alice.recv_type("chat", "reply", "pong"))["type"] for _ in range(3)]
    assert sorted(kinds) == ["chat", "pong", "reply"]
    assert kinds.index("chat") < kinds.index("reply"), kinds


async def test_counters_match_on_both_paths(path: str, server: Server) -> None:
    clients = [await server.connect(f"u{i}", welcome=True) for i in range(5)]
    metrics = server.node.metrics
    before = metrics.frames_sent.labels("chat")._value.get()
    await server.node.publish("lobby", {"type": "chat", "room": "lobby", "text": "x"})
    for client in clients:
        await client.recv_type("chat")
    assert metrics.frames_sent.labels("chat")._value.get() - before == 5


async def test_invalid_utf8(path: str, server: Server) -> None:
    client = await server.connect("u")
    client.conn.protocol._write_frame(True, 0x1, b'{"type": "\xff"}')
    assert await client.closed() == 1007  # one engine: the same close on both paths


def test_internals_present_on_the_pinned_tornado() -> None:
    assert tornado_compat.INTERNALS_OK, "the pinned Tornado lacks an internal pushsvc uses"
    assert tornado_compat.text_frame(b"x" * 3) == b"\x81\x03xxx"
    assert tornado_compat.text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert tornado_compat.text_frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
