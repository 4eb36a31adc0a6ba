"""The Redis cluster registry across nodes: caps, presence, dead nodes, Redis outages.

Nodes here are real: in-process services (``start_server``) and ``pushsvc
serve`` processes (``spawn``), sharing a real ``redis-server`` through
``cluster.url``; the broker stays in memory (the Redis broker is its own
piece), so these tests check what the registry shares, not message routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from redis.crc import key_slot
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import Server, ServerProcess, token
from pushsvc.cluster import RegistryOptions
from pushsvc.cluster.redis import NODES_KEY, RedisRegistry, index_key, node_key, roster_key
from redis_server import RedisServer

Start = Callable[..., Any]
NODE_TTL = 1.0  # seconds: fast liveness for the tests (the default is 15)


async def start_node(start_server: Start, url: str, **sections: dict[str, Any]) -> Server:
    server: Server = await start_server(cluster={"url": url, "node_ttl": NODE_TTL}, **sections)
    return server


async def join(client: Any, room: str, ref: str = "j") -> dict[str, Any]:
    await client.send({"type": "join", "room": room, "ref": ref})
    reply: dict[str, Any] = await client.recv_type("reply")
    return reply


async def test_the_per_user_cap_holds_across_nodes(start_server: Start, redis_url: str) -> None:
    caps = {"max_connections_per_user": 2}
    one = await start_node(start_server, redis_url, ratelimit=caps)
    two = await start_node(start_server, redis_url, ratelimit=caps)
    first = await one.connect("alice")
    second = await two.connect("alice")
    refused = await two.handshake(f"?access_token={token('alice')}")
    assert isinstance(refused, HTTPClientError) and refused.code == 429
    assert refused.response is not None
    assert orjson.loads(refused.response.body) == {
        "error": "too_many_connections",
        "reason": "per_user",
    }
    refused = await one.handshake(f"?access_token={token('alice')}")
    assert isinstance(refused, HTTPClientError) and refused.code == 429
    await two.connect("bob")  # other users are not affected
    first.close()  # frees a slot on every node
    deadline = time.monotonic() + 5
    while one.node.hub.reserved_users.get("alice"):
        assert time.monotonic() < deadline, "node one never released alice's slot"
        await asyncio.sleep(0.02)
    third = await two.connect("alice")
    second.close()
    third.close()


async def test_presence_lists_the_users_of_every_node(start_server: Start, redis_url: str) -> None:
    one = await start_node(start_server, redis_url)
    two = await start_node(start_server, redis_url)
    alice = await one.connect("alice")
    await join(alice, "team")
    bob = await two.connect("bob")
    reply = await join(bob, "team")
    assert reply["users"] == ["alice", "bob"]  # the join reply: both nodes
    assert await one.node.presence("team") == ["alice", "bob"]
    status, body, _ = await one.http("GET", "/api/v1/rooms/team/presence")
    assert (status, body) == (200, {"users": ["alice", "bob"]})
    bob.close()
    deadline = time.monotonic() + 5
    while await one.node.presence("team") != ["alice"]:
        assert time.monotonic() < deadline, "bob never left the room on node one's view"
        await asyncio.sleep(0.02)
    alice.close()


@pytest.mark.slow
async def test_a_killed_node_leaves_presence_within_node_ttl(
    start_server: Start, redis_url: str, spawn: Callable[..., ServerProcess]
) -> None:
    caps = {"max_connections_per_user": 1}
    survivor = await start_node(start_server, redis_url, ratelimit=caps)
    doomed = spawn(
        env={
            "PUSHSVC_CLUSTER__URL": redis_url,
            "PUSHSVC_CLUSTER__NODE_TTL": str(NODE_TTL),
            "PUSHSVC_RATELIMIT__MAX_CONNECTIONS_PER_USER": "1",
        }
    )
    request = HTTPRequest(f"{doomed.ws_url}?access_token={token('carol')}")
    carol = await websocket_connect(request)
    assert orjson.loads(await carol.read_message())["type"] == "welcome"
    deadline = time.monotonic() + 5  # the lobby is joined right after the welcome
    while await survivor.node.presence("lobby") != ["carol"]:
        assert time.monotonic() < deadline, "carol never showed in the lobby"
        await asyncio.sleep(0.02)
    refused = await survivor.handshake(f"?access_token={token('carol')}")
    assert isinstance(refused, HTTPClientError) and refused.code == 429  # the cap, over nodes

    doomed.kill9()  # no cleanup: only the TTL of its entries removes them
    killed = time.monotonic()
    bound = NODE_TTL + 1.0  # documented: node_ttl after its last heartbeat; 1 s of slack
    while await survivor.node.presence("lobby"):
        assert time.monotonic() - killed < bound, "the dead node's member did not expire"
        await asyncio.sleep(0.05)
    carol.close()
    again = await survivor.connect("carol")  # the dead node's slot is free too
    again.close()


async def test_redis_down_fails_open_then_repairs(fresh_redis: RedisServer) -> None:
    failures: list[str] = []
    # The calls fail because the port refuses, not by the timeout: a short one only failed
    # the calls after the restart on a loaded machine. A long TTL: no background heartbeat
    # races the test's own, and nothing expires while the test is descheduled.
    options = RegistryOptions(node_ttl=60.0, timeout=2.0, on_error=failures.append)
    node = RedisRegistry(fresh_redis.url, options)
    other = RedisRegistry(fresh_redis.url, options)
    await node.start()
    await other.start()
    try:
        await node.joined("r", "alice", "s1")
        assert await node.reserve_user("alice", "c1", 1)
        fresh_redis.kill9()  # its AOF may lose the last second: the heartbeat rewrites
        assert await node.reserve_user("alice", "c2", 1)  # fails open
        await node.joined("r", "bob", "s2")
        assert await node.room_users("r") == ["alice", "bob"]  # this node's own members
        assert await node.online(["alice", "zoe"]) == {"alice"}  # this node's own connections
        assert not node.healthy()
        assert {"reserve", "joined", "room_users", "online"} <= set(failures)

        fresh_redis.start()
        await node.heartbeat()  # what the timer does every node_ttl / 3
        assert node.healthy()
        assert await other.room_users("r") == ["alice", "bob"]
        assert not await other.reserve_user("alice", "c9", 2)  # c1 and c2 both count
    finally:
        await node.close()
        await other.close()


async def test_the_join_reply_keeps_the_member_cap_across_nodes(
    start_server: Start, redis_url: str
) -> None:
    chat = {"presence_max_members": 1}
    one = await start_node(start_server, redis_url, chat=chat)
    two = await start_node(start_server, redis_url, chat=chat)
    alice = await one.connect("alice")
    assert (await join(alice, "team"))["users"] == ["alice"]
    bob = await two.connect("bob")
    assert "users" not in await join(bob, "team")  # two users on two nodes: above the cap
    alice.close()
    bob.close()


def _commands(server: RedisServer) -> int:
    """Commands Redis ran so far (``INFO commandstats``, summed)."""
    stats = server.command("INFO", "commandstats")
    return sum(
        int(part.split("=", 1)[1])
        for line in stats.splitlines()
        if line.startswith("cmdstat_") and not line.startswith("cmdstat_info")
        for part in line.split(":", 1)[1].split(",")
        if part.startswith("calls=")
    )


async def test_messages_do_not_call_the_registry(
    start_server: Start, redis_server: RedisServer, redis_url: str
) -> None:
    # A long TTL: no heartbeat runs during the test.
    node: Server = await start_server(cluster={"url": redis_url, "node_ttl": 300.0})
    alice = await node.connect("alice")
    bob = await node.connect("bob")
    await join(alice, "team")
    await join(bob, "team")
    before = _commands(redis_server)
    for number in range(30):  # within the connection burst (40)
        await alice.send({"type": "chat", "room": "team", "text": f"m{number}"})
    for _ in range(30):
        await bob.recv_type("chat")
    assert _commands(redis_server) == before
    alice.close()
    bob.close()


@pytest.mark.parametrize("name", ["alice", "a}b{", "{x}", "team:1", "ü"])
def test_the_keys_of_one_user_or_room_share_a_cluster_slot(name: str) -> None:
    for kind in ("conns", "members"):
        index = index_key(kind, name)
        assert key_slot(f"{index}:some-node-7".encode()) == key_slot(index.encode())


async def test_the_heartbeat_rewrites_what_redis_lost(
    redis_server: RedisServer, redis_url: str
) -> None:
    options = RegistryOptions(node_ttl=60.0, timeout=2.0)  # the test calls heartbeat itself
    node = RedisRegistry(redis_url, options)
    other = RedisRegistry(redis_url, options)
    await node.start()
    await other.start()
    try:
        await node.joined("r", "alice", "s1")
        assert await node.reserve_user("alice", "c1", 1)
        redis_server.flush()  # a restart without persistence
        assert await other.room_users("r") == []
        await node.heartbeat()
        assert await other.room_users("r") == ["alice"]
        assert not await other.reserve_user("alice", "c2", 1)
        roster = redis_server.command("HGETALL", roster_key(node.node_id)).split("\n")
        assert roster == ["s1\0r", "alice"]  # its member list, for the others if it dies
        assert node.node_id in redis_server.command("SMEMBERS", NODES_KEY).split()
    finally:
        await node.close()
        await other.close()


async def _die(registry: RedisRegistry) -> None:
    """What ``kill -9`` leaves: no more heartbeats, no cleanup; its heartbeat key expires."""
    while registry._roster_task is not None:  # what it was sending when it died has arrived
        await asyncio.sleep(0.01)
    beat = registry._heartbeat
    assert beat is not None
    beat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beat
    registry._heartbeat, registry._client = None, None  # close() finds nothing to clean up


async def test_a_dead_nodes_departed_are_reported_once_and_not_those_still_in_the_room(
    redis_server: RedisServer, redis_url: str
) -> None:
    options = RegistryOptions(node_ttl=60.0, timeout=2.0)  # the test calls reap itself
    watcher, doomed, other = (RedisRegistry(redis_url, options) for _ in range(3))
    reports: list[tuple[str, list[str]]] = []
    watcher.set_departed_callback(lambda room, users: reports.append((room, users)))
    for registry in (watcher, doomed, other):
        await registry.start()
    try:
        await watcher.joined("r", "wendy", "w1")
        await watcher.joined("r", "carol", "w2")  # carol is here too
        await doomed.joined("r", "alice", "d1")
        await doomed.joined("r", "alice", "d2")  # two connections: one leave
        await doomed.joined("r", "bob", "d3")
        await doomed.joined("r", "carol", "d4")
        await doomed.joined("r", "dave", "d5")
        await doomed.left("r", "dave", "d5")  # left before the death: no second leave
        await doomed.joined("elsewhere", "erin", "d6")  # no member of the watcher there
        await other.joined("r", "bob", "o1")  # bob is still in the room on a live node
        await watcher.reap()
        assert reports == []  # everyone alive

        client = doomed._client
        await _die(doomed)
        await client.delete(node_key(doomed.node_id))  # its heartbeat key expired
        await watcher.reap()
        assert reports == [("r", ["alice"])]
        assert await watcher.room_users("r") == ["bob", "carol", "wendy"]  # agrees at once
        await watcher.reap()
        assert reports == [("r", ["alice"])]  # once

        await client.delete(roster_key(doomed.node_id))  # its member list expired too
        await watcher.reap()
        assert doomed.node_id not in redis_server.command("SMEMBERS", NODES_KEY).split()
        await client.aclose()
    finally:
        await watcher.close()
        await other.close()
    assert redis_server.command("SMEMBERS", NODES_KEY) == ""  # clean shutdowns leave it


async def test_the_node_tells_its_members_of_the_departed_once_each(start_server: Start) -> None:
    server: Server = await start_server(chat={"auto_join": False})
    wendy, carol = await server.connect("wendy"), await server.connect("carol")
    await join(wendy, "team")
    await join(carol, "team")
    await wendy.recv_type("presence")  # carol's join
    server.node.departed("team", ["alice", "carol"])  # what the registry reports
    server.node.departed("elsewhere", ["alice"])  # no member here: nothing
    leave = {"type": "presence", "room": "team", "event": "leave", "user": "alice"}
    assert await wendy.recv_type("presence") == leave  # not carol: she is here
    assert await carol.recv_type("presence") == leave
    await wendy.expect_nothing(0.3)
    await carol.expect_nothing(0.3)
    wendy.close()
    carol.close()
