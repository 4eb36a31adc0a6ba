"""Rooms that remember: offsets on room messages, resume with since, gap repair, history.

Real servers on loopback, real WebSocket clients; the gap is injected by a
wrapper around the real in-memory broker that drops one envelope.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from tornado.websocket import websocket_connect

import conftest
from conftest import Client, Server, ServerProcess
from pushsvc import config as config_module
from pushsvc.broker import Broker, Envelope, EnvelopeKind, room_channel
from pushsvc.broker.memory import MemoryBroker

NO_AUTO_JOIN = {"chat": {"auto_join": False}, "ratelimit": {"burst": 1000, "user_burst": 1000}}
#: The same for ``pushsvc serve`` subprocesses.
SPAWN_ENV = {
    "PUSHSVC_CHAT__AUTO_JOIN": "false",
    "PUSHSVC_RATELIMIT__BURST": "1000",
    "PUSHSVC_RATELIMIT__USER_BURST": "1000",
}


async def join(client: Client, room: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "join", "room": room, "ref": "j"}
    if since is not None:
        frame["since"] = since
    await client.send(frame)
    return await client.recv_type("reply", "error")


async def say(client: Client, room: str, text: str) -> dict[str, Any]:
    await client.send({"type": "chat", "room": room, "text": text, "ref": f"c-{text}"})
    reply = await client.recv_type("reply", "error")
    assert reply["type"] == "reply", reply
    return reply


async def chats(client: Client, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` chat frames (presence and replies skipped)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        got.append(await client.recv_type("chat", timeout=max(0.01, deadline - time.monotonic())))
    return got


async def publish(server: Server, room: str, text: str) -> None:
    status, body, _ = await server.http("POST", "/api/v1/publish", {"room": room, "text": text})
    assert status == 202, body


# -- offsets -------------------------------------------------------------------------


async def test_room_messages_carry_offset_and_epoch_presence_does_not(
    start_server: Callable[..., Any],
) -> None:
    server: Server = await start_server(**NO_AUTO_JOIN)
    alice, bob = await server.connect("alice"), await server.connect("bob")
    joined = await join(alice, "r")
    assert (joined["offset"], joined["epoch"]) == (0, "")  # nothing published yet
    await join(bob, "r")
    presence = await alice.recv_type("presence")
    assert "offset" not in presence and "epoch" not in presence
    await say(alice, "r", "one")
    first = (await chats(bob, 1))[0]
    await publish(server, "r", "two")  # the server API records too
    second = (await chats(bob, 1))[0]
    assert (first["offset"], second["offset"]) == (1, 2)
    assert first["epoch"] == second["epoch"] and len(first["epoch"]) == 16
    rejoined = await join(await server.connect("carol"), "r")
    assert (rejoined["offset"], rejoined["epoch"]) == (2, first["epoch"])


# -- resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("delivery", ["sync", "async"])
async def test_resume_replays_exactly_what_was_missed_then_live(
    start_server: Callable[..., Any], delivery: str
) -> None:
    server: Server = await start_server(
        broker={"url": f"memory://?delivery={delivery}"}, **NO_AUTO_JOIN
    )
    alice = await server.connect("alice")
    bob = await server.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    await say(alice, "r", "before")
    seen = (await chats(bob, 1))[0]
    bob.close()
    for i in range(50):
        await say(alice, "r", f"m{i}")
    bob = await server.connect("bob")
    resumed = await join(bob, "r", {"offset": seen["offset"], "epoch": seen["epoch"]})
    assert resumed["recovered"] is True and resumed["recovered_count"] == 50, resumed
    assert "reason" not in resumed
    assert resumed["offset"] == seen["offset"] + 50
    await say(alice, "r", "live")
    got = await chats(bob, 51)
    assert [m["text"] for m in got] == [f"m{i}" for i in range(50)] + ["live"]
    assert [m["offset"] for m in got] == list(range(seen["offset"] + 1, seen["offset"] + 52))
    await bob.expect_nothing(0.3, ignore=("presence",))
    node = server.node
    assert metric(node, "pushsvc_history_recoveries_total", outcome="recovered") == 1
    assert metric(node, "pushsvc_history_replayed_total", source="resume") == 50
    await node.trim_history()
    assert metric(node, "pushsvc_history_entries") == 52
    assert metric(node, "pushsvc_history_rooms") == 1


@pytest.mark.parametrize("delivery", ["sync", "async"])
async def test_resume_during_a_burst_has_no_gap_and_no_duplicate(
    start_server: Callable[..., Any], delivery: str
) -> None:
    server: Server = await start_server(
        broker={"url": f"memory://?delivery={delivery}"}, **NO_AUTO_JOIN
    )
    alice, bob = await server.connect("alice"), await server.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    await say(alice, "r", "start")
    seen = (await chats(bob, 1))[0]
    bob.close()
    for i in range(20):
        await publish(server, "r", f"gone{i}")

    async def burst() -> None:
        for i in range(100):
            await publish(server, "r", f"burst{i}")

    task = asyncio.ensure_future(burst())
    await asyncio.sleep(0.05)
    bob = await server.connect("bob")
    resumed = await join(bob, "r", {"offset": seen["offset"], "epoch": seen["epoch"]})
    assert resumed["recovered"] is True
    await task
    last = seen["offset"] + 120
    offsets = [m["offset"] for m in await chats(bob, 120)]
    assert offsets == list(range(seen["offset"] + 1, last + 1))
    await bob.expect_nothing(0.3, ignore=("presence",))


async def test_too_far_behind_is_not_recovered(start_server: Callable[..., Any]) -> None:
    server: Server = await start_server(history={"max_recovery": 10}, **NO_AUTO_JOIN)
    alice = await server.connect("alice")
    position = await join(alice, "r")
    for i in range(11):
        await publish(server, "r", f"m{i}")
    await chats(alice, 11)
    bob = await server.connect("bob")
    since = {"offset": position["offset"], "epoch": position["epoch"]}
    answer = await join(bob, "r", since)
    assert answer["recovered"] is False and answer["reason"] == "too_far_behind", answer
    assert answer["recovered_count"] == 0 and answer["offset"] == 11
    await publish(server, "r", "live")
    assert [m["text"] for m in await chats(bob, 1)] == ["live"]  # live from here on
    since = {"offset": 2, "epoch": answer["epoch"]}  # 10 behind (offset 12 is the latest)
    ten_behind = await join(await server.connect("carol"), "r", since)
    assert ten_behind["recovered"] is True and ten_behind["recovered_count"] == 10


async def test_epoch_change_is_not_recovered(start_server: Callable[..., Any]) -> None:
    server: Server = await start_server(**NO_AUTO_JOIN)
    await publish(server, "r", "x")
    bob = await server.connect("bob")
    answer = await join(bob, "r", {"offset": 1, "epoch": "0000000000000000"})
    assert answer["recovered"] is False and answer["reason"] == "epoch_changed", answer
    assert answer["offset"] == 1 and answer["epoch"] != "0000000000000000"


async def test_trimmed_history_is_expired(start_server: Callable[..., Any]) -> None:
    server: Server = await start_server(history={"size": 5}, **NO_AUTO_JOIN)
    alice = await server.connect("alice")
    position = await join(alice, "r")
    for i in range(8):
        await publish(server, "r", f"m{i}")
    answer = await join(await server.connect("bob"), "r", {"offset": 0, "epoch": ""})
    assert answer["recovered"] is False and answer["reason"] == "history_expired", answer
    assert position["epoch"] == ""  # the room had no history when alice joined


async def test_a_client_that_saw_no_history_recovers_from_the_start(
    start_server: Callable[..., Any],
) -> None:
    server: Server = await start_server(**NO_AUTO_JOIN)
    bob = await server.connect("bob")
    position = await join(bob, "r")
    bob.close()
    for i in range(3):
        await publish(server, "r", f"m{i}")
    bob = await server.connect("bob")
    since = {"offset": position["offset"], "epoch": position["epoch"]}
    answer = await join(bob, "r", since)
    assert answer["recovered"] is True and answer["recovered_count"] == 3
    assert [m["text"] for m in await chats(bob, 3)] == ["m0", "m1", "m2"]


async def test_history_disabled(start_server: Callable[..., Any]) -> None:
    server: Server = await start_server(history={"rooms": ["quiet-* 0 0"]}, **NO_AUTO_JOIN)
    alice = await server.connect("alice")
    assert "offset" not in await join(alice, "quiet-1")
    await publish(server, "quiet-1", "x")
    assert "offset" not in (await chats(alice, 1))[0]
    answer = await join(await server.connect("bob"), "quiet-1", {"offset": 0, "epoch": ""})
    assert answer["recovered"] is False and answer["reason"] == "history_disabled"
    off: Server = await start_server(history={"enabled": False}, **NO_AUTO_JOIN)
    answer = await join(await off.connect("bob"), "r", {"offset": 3, "epoch": "e"})
    assert answer["reason"] == "history_disabled"


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("3", "since: must be an object"),
        ({"offset": 1}, 'since: must be {"offset": N, "epoch": "E"}'),
        ({"offset": -1, "epoch": "e"}, "since: offset must be an integer >= 0"),
        ({"offset": 1.5, "epoch": "e"}, "since: offset must be an integer >= 0"),
        ({"offset": True, "epoch": "e"}, "since: offset must be an integer >= 0"),
        ({"offset": 1, "epoch": 7}, "since: epoch must be a string of at most 64 characters"),
        (
            {"offset": 1, "epoch": "e" * 65},
            "since: epoch must be a string of at most 64 characters",
        ),
        ({"offset": 1, "epoch": "e", "x": 1}, 'since: must be {"offset": N, "epoch": "E"}'),
    ],
)
async def test_bad_since_gets_bad_request(server: Server, since: Any, message: str) -> None:
    alice = await server.connect("alice")
    answer = await join(alice, "r", since)
    assert answer == {"type": "error", "code": "bad_request", "message": message, "ref": "j"}


@pytest.mark.slow
async def test_resume_across_kill_9(spawn: Callable[..., ServerProcess]) -> None:
    process = spawn(env=SPAWN_ENV)
    sender = await connect_to(process, "alice")
    bob = await connect_to(process, "bob")
    await join(sender, "r")
    await join(bob, "r")
    await say(sender, "r", "before")
    seen = (await chats(bob, 1))[0]
    bob.close()
    for i in range(50):
        await say(sender, "r", f"m{i}")
    process.kill9()
    process = spawn(port=process.port, env=SPAWN_ENV)
    bob = await connect_to(process, "bob")
    resumed = await join(bob, "r", {"offset": seen["offset"], "epoch": seen["epoch"]})
    assert resumed["recovered"] is True and resumed["recovered_count"] == 50, resumed
    sender = await connect_to(process, "alice")
    await join(sender, "r")
    await say(sender, "r", "after")
    got = await chats(bob, 51)
    assert [m["text"] for m in got] == [f"m{i}" for i in range(50)] + ["after"]
    assert got[-1]["offset"] == seen["offset"] + 51 and got[-1]["epoch"] == seen["epoch"]


async def connect_to(process: ServerProcess, user: str) -> Client:
    url = f"{process.ws_url}?access_token={conftest.token(user)}"
    client = Client(await websocket_connect(url))
    welcome = await client.recv()
    assert welcome is not None and welcome["type"] == "welcome"
    return client


# -- gap repair on live connections ------------------------------------------------------


class DroppingBroker:
    """A real broker that loses chosen room envelopes on their way (as pub/sub may)."""

    def __init__(self, inner: Broker, drop: set[int]) -> None:
        self.inner = inner
        self.drop = drop  # offsets of the room envelopes to lose

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, channel: str, envelope: Envelope) -> None:
        if channel.startswith("room:") and envelope.offset in self.drop:
            self.drop.discard(envelope.offset)
            return
        await self.inner.publish(channel, envelope)


@pytest.mark.parametrize("delivery", ["sync", "async"])
async def test_a_dropped_publication_is_repaired_in_order(
    start_server: Callable[..., Any], delivery: str
) -> None:
    server: Server = await start_server(
        broker={"url": f"memory://?delivery={delivery}"}, **NO_AUTO_JOIN
    )
    node = server.node
    assert isinstance(node.broker, MemoryBroker)
    node.broker = DroppingBroker(node.broker, {3, 7, 8})  # type: ignore[assignment]
    alice, bob = await server.connect("alice"), await server.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    for i in range(1, 11):
        await publish(server, "r", f"m{i}")
    for client in (alice, bob):
        got = await chats(client, 10)
        assert [m["offset"] for m in got] == list(range(1, 11))
        assert [m["text"] for m in got] == [f"m{i}" for i in range(1, 11)]
        await client.expect_nothing(0.2, ignore=("presence",))
    assert metric(node, "pushsvc_history_gaps_repaired_total") == 2
    assert metric(node, "pushsvc_history_replayed_total", source="repair") == 3
    assert metric(node, "pushsvc_history_lost_total") == 0


class LaggingHistory:
    """The real store, whose history reads miss chosen offsets a number of times
    (as when another node took the offset and has not committed it yet)."""

    def __init__(self, inner: Any, hide: set[int], reads: int) -> None:
        self.inner = inner
        self.hide = hide
        self.reads = reads  # reads that miss them

    async def history(self, room: str, since: int | None, limit: int, **kw: Any) -> Any:
        page = await self.inner.history(room, since, limit, **kw)
        if self.reads <= 0:
            return page
        self.reads -= 1
        entries = [e for e in page.entries if e.offset not in self.hide]
        return dataclasses.replace(page, entries=entries)


@pytest.mark.parametrize(("reads", "lost"), [(1, 0), (2, 1)])
async def test_a_repair_reads_again_what_was_not_committed_yet(
    start_server: Callable[..., Any], reads: int, lost: int
) -> None:
    server: Server = await start_server(**NO_AUTO_JOIN)
    node = server.node
    node.broker = DroppingBroker(node.broker, {3})  # type: ignore[assignment]
    node.hub.history = LaggingHistory(node.store, {3}, reads)
    alice = await server.connect("alice")
    await join(alice, "r")
    for i in range(1, 6):
        await publish(server, "r", f"m{i}")
    expected = [1, 2, 3, 4, 5] if not lost else [1, 2, 4, 5]
    assert [m["offset"] for m in await chats(alice, len(expected))] == expected
    await alice.expect_nothing(0.2, ignore=("presence",))
    assert metric(node, "pushsvc_history_gaps_repaired_total") == (0 if lost else 1)
    assert metric(node, "pushsvc_history_lost_total") == lost


async def test_a_late_copy_of_a_repaired_publication_is_dropped(server: Server) -> None:
    alice = await server.connect("alice")
    await join(alice, "r")
    for i in range(1, 4):
        await publish(server, "r", f"m{i}")
    await chats(alice, 3)
    page = await server.node.store.history("r", 1, 1)
    late = page.entries[0]
    server.node.hub.on_envelope(
        room_channel("r"),
        Envelope(EnvelopeKind.LIVE, late.type, "", late.frame, late.offset, page.epoch),
    )
    await alice.expect_nothing(0.2, ignore=("presence",))
    assert metric(server.node, "pushsvc_history_duplicates_total") == 1


def metric(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


# -- the history command and endpoint ----------------------------------------------------


async def test_history_command_pages_forward_and_back(start_server: Callable[..., Any]) -> None:
    server: Server = await start_server(**NO_AUTO_JOIN)
    for i in range(1, 6):
        await publish(server, "r", f"m{i}")
    alice = await server.connect("alice")
    await alice.send({"type": "history", "room": "r", "since": 1, "limit": 2, "ref": "h"})
    page = await alice.recv_type("reply")
    assert [p["text"] for p in page["publications"]] == ["m2", "m3"]
    assert (page["offset"], page["earliest"], page["room"]) == (5, 1, "r")
    assert page["publications"][0]["epoch"] == page["epoch"]
    await alice.send({"type": "history", "room": "r", "reverse": True, "limit": 2, "ref": "h"})
    back = await alice.recv_type("reply")
    assert [p["offset"] for p in back["publications"]] == [5, 4]
    await alice.send({"type": "history", "room": "r", "limit": 0, "ref": "h"})
    assert (await alice.recv_type("error"))["message"] == "limit: must be between 1 and 1000"
    carol = await server.connect("carol", rooms=["other"])
    await carol.send({"type": "history", "room": "r", "ref": "h"})
    assert (await carol.recv_type("error"))["code"] == "forbidden"


async def test_history_endpoint_paginates(server: Server) -> None:
    for i in range(1, 6):
        await publish(server, "r", f"m{i}")
    status, body, _ = await server.http("GET", "/api/v1/rooms/r/history?limit=2")
    assert status == 200, body
    assert [p["offset"] for p in body["publications"]] == [1, 2] and body["next"] == 2
    status, body, _ = await server.http("GET", "/api/v1/rooms/r/history?limit=2&since=4")
    assert [p["text"] for p in body["publications"]] == ["m5"] and body["next"] is None
    status, body, _ = await server.http("GET", "/api/v1/rooms/r/history?reverse=true&limit=3")
    assert [p["offset"] for p in body["publications"]] == [5, 4, 3] and body["next"] == 3
    assert (body["epoch"], body["offset"], body["earliest"]) == (
        body["publications"][0]["epoch"],
        5,
        1,
    )
    status, body, _ = await server.http("GET", "/api/v1/rooms/none/history")
    assert status == 200 and body["publications"] == [] and body["epoch"] == ""
    for query in ("since=-1", "since=x", "reverse=maybe", "limit=0"):
        status, body, _ = await server.http("GET", f"/api/v1/rooms/r/history?{query}")
        assert status == 400 and body["error"] == "bad_request", query


def test_envelope_carries_offset_and_epoch_in_its_id_field() -> None:
    recorded = Envelope(EnvelopeKind.LIVE, "chat", "01ID", b'{"a":"\x1f b"}', 42, "9f2c")
    wire = recorded.to_bytes()
    assert wire.split(b"\x1f", 3)[2] == b"01ID 42 9f2c"  # a node that predates it: an id
    assert Envelope.from_bytes(wire) == recorded
    plain = Envelope(EnvelopeKind.LIVE, "chat", "01ID", b"{}")
    assert plain.to_bytes() == b"L\x1fchat\x1f01ID\x1f{}"  # unchanged without an offset
    assert Envelope.from_bytes(plain.to_bytes()) == plain
    with pytest.raises(ValueError):
        Envelope.from_bytes(b"L\x1fchat\x1f01ID x e\x1f{}")


@pytest.mark.parametrize(
    "rule", ["ticker-*", "ticker-* 5", "ticker-* x 1", "ticker-* -1 1", "a 1 2 3", "a 1 -2"]
)
def test_bad_history_rules_are_refused_naming_the_key(rule: str, tmp_path: Any) -> None:
    with pytest.raises(config_module.ConfigError, match=r"^history\.rooms: .*PATTERN SIZE TTL"):
        conftest.make_config(tmp_path, history={"rooms": [rule]})


def test_history_rules_first_match_wins(tmp_path: Any) -> None:
    history = conftest.make_config(
        tmp_path, history={"rooms": ["ticker-* 0 0", "support-* 5000 86400", "* 10 5"]}
    ).history
    assert history.retention("ticker-eur") is None
    assert history.retention("support-1") == (5000, 86400.0)
    assert history.retention("lobby") == (10, 5.0)
