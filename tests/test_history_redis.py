"""Room history on Redis across nodes: two real servers sharing a Redis store and broker.

A client resumes on the other node and gets exactly what it missed; a
publication one node's subscriber lost (dropped on arrival, or its pub/sub
connection killed by Redis during a burst) is repaired from the shared
history, in order, on the live connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from test_history import NO_AUTO_JOIN, chats, join, metric, say

from conftest import Server
from pushsvc.broker import Envelope
from redis_server import RedisServer

#: Seconds a node's Redis broker may take to reconnect and resubscribe.
RECOVERY = 10.0


async def two_nodes(start_server: Callable[..., Any], url: str) -> tuple[Server, Server]:
    """Two nodes with the same Redis as store and broker."""
    shared = {"store": {"url": url}, "broker": {"url": url}, **NO_AUTO_JOIN}
    return await start_server(**shared), await start_server(**shared)


async def test_resume_on_the_other_node_gets_exactly_the_missed(
    start_server: Callable[..., Any], redis_url: str
) -> None:
    node_a, node_b = await two_nodes(start_server, redis_url)
    alice = await node_a.connect("alice")
    bob = await node_a.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    await say(alice, "r", "before")
    seen = (await chats(bob, 1))[0]
    bob.close()
    for i in range(30):
        await say(alice, "r", f"m{i}")
    bob = await node_b.connect("bob")  # back, through the other node
    resumed = await join(bob, "r", {"offset": seen["offset"], "epoch": seen["epoch"]})
    assert resumed["recovered"] is True and resumed["recovered_count"] == 30, resumed
    assert (resumed["offset"], resumed["epoch"]) == (seen["offset"] + 30, seen["epoch"])
    await say(alice, "r", "live")  # from node A, through the broker to B
    got = await chats(bob, 31)
    assert [m["text"] for m in got] == [f"m{i}" for i in range(30)] + ["live"]
    assert [m["offset"] for m in got] == list(range(seen["offset"] + 1, seen["offset"] + 32))
    await bob.expect_nothing(0.3, ignore=("presence",))
    assert metric(node_b.node, "pushsvc_history_replayed_total", source="resume") == 30
    alice.close()
    bob.close()


async def test_a_publication_lost_on_arrival_is_repaired_from_the_shared_history(
    start_server: Callable[..., Any], redis_url: str
) -> None:
    node_a, node_b = await two_nodes(start_server, redis_url)
    hub = node_b.node.hub
    dropped: list[int] = []

    def lossy(channel: str, envelope: Envelope) -> None:  # B's subscriber misses 4 and 5
        if channel == "room:r" and envelope.offset in (4, 5) and envelope.offset not in dropped:
            dropped.append(envelope.offset)
            return
        hub.on_envelope(channel, envelope)

    node_b.node.broker.set_callback(lossy)
    alice = await node_a.connect("alice")
    bob = await node_b.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    for i in range(1, 11):
        await say(alice, "r", f"m{i}")
    got = await chats(bob, 10)
    assert [m["offset"] for m in got] == list(range(1, 11))
    assert [m["text"] for m in got] == [f"m{i}" for i in range(1, 11)]
    await bob.expect_nothing(0.3, ignore=("presence",))
    assert dropped == [4, 5]
    assert metric(node_b.node, "pushsvc_history_gaps_repaired_total") == 1
    assert metric(node_b.node, "pushsvc_history_replayed_total", source="repair") == 2
    assert metric(node_b.node, "pushsvc_history_lost_total") == 0
    assert metric(node_a.node, "pushsvc_history_gaps_repaired_total") == 0
    alice.close()
    bob.close()


async def test_a_subscriber_killed_during_a_burst_is_repaired_in_order(
    start_server: Callable[..., Any], fresh_redis: RedisServer
) -> None:
    node_a, node_b = await two_nodes(start_server, fresh_redis.url)
    alice = await node_a.connect("alice")
    bob = await node_b.connect("bob")
    await join(alice, "r")
    await join(bob, "r")
    for i in range(1, 6):
        await say(alice, "r", f"m{i}")
    assert [m["offset"] for m in await chats(bob, 5)] == [1, 2, 3, 4, 5]
    broker_b = node_b.node.broker
    before = broker_b.stats().resubscriptions
    # Both nodes' subscribers go; A's publishes meanwhile reach no one on B.
    fresh_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    for i in range(6, 21):
        await say(alice, "r", f"m{i}")
    deadline = time.monotonic() + RECOVERY
    while broker_b.stats().resubscriptions == before or not broker_b.healthy():
        assert time.monotonic() < deadline, "node B did not resubscribe"
        await asyncio.sleep(0.05)
    await say(alice, "r", "m21")  # the first one B gets live shows the gap
    got = []
    while not got or got[-1]["offset"] < 21:
        got.append((await chats(bob, 1))[0])
    offsets = [m["offset"] for m in got]
    assert offsets == list(range(offsets[0], 22)), offsets  # in order, no gap, no repeat
    assert offsets[0] == 6
    assert [m["text"] for m in got] == [f"m{i}" for i in range(6, 22)]
    await bob.expect_nothing(0.3, ignore=("presence",))
    # B resubscribes within the burst: what it missed meanwhile came from the history
    assert metric(node_b.node, "pushsvc_history_replayed_total", source="repair") >= 1
    assert metric(node_b.node, "pushsvc_history_lost_total") == 0
    alice.close()
    bob.close()
