"""The Redis broker on a real three-master Redis Cluster: sharded pub/sub across masters.

The contract suite runs on the cluster too (``redis-cluster`` in
tests/contracts/test_broker_contract.py); these tests cover what only a
cluster meets: channels on every master, SSUBSCRIBE batched per partition,
a master killed and restarted (no replicas: its slots are unavailable while
it is down), and a slot moved to another master under a live subscription.
Tests that break the cluster take their own (``redis_cluster``); the others
share the session's (``redis_cluster_url``).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.crc import key_slot
from test_broker_redis import PROBE, RECOVERY, Recorder, command_calls, live, until

from pushsvc.broker import BrokerUnavailable, make_broker
from pushsvc.broker.redis import DEFAULT_PARTITIONS, RedisBroker, partition_tags
from redis_server import RedisClusterSetup, RedisServer


def slot_owners(cluster: RedisClusterSetup) -> dict[int, RedisServer]:
    """Slot -> the master serving it (CLUSTER SLOTS, read from the servers themselves)."""
    by_port = {node.port: node for node in cluster.nodes}
    owners: dict[int, RedisServer] = {}
    for line in cluster.nodes[0].command("CLUSTER", "NODES").splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for span in fields[8:]:
            if span.startswith("["):
                continue
            low, _, high = span.partition("-")
            for slot in range(int(low), int(high or low) + 1):
                owners[slot] = by_port[port]
    return owners


def master_of(cluster: RedisClusterSetup, channel: str) -> RedisServer:
    """The master a broker channel lives on (its partition's slot)."""
    tags = partition_tags(DEFAULT_PARTITIONS)
    tag = tags[zlib.crc32(channel.encode()) % DEFAULT_PARTITIONS]
    return slot_owners(cluster)[key_slot(tag.encode())]


def rooms_per_master(cluster: RedisClusterSetup, count: int = 1) -> dict[int, list[str]]:
    """``count`` room channels for each master (by port)."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.nodes}
    number = 0
    while any(len(rooms) < count for rooms in found.values()):
        channel = f"room:r{number}"
        rooms = found[master_of(cluster, channel).port]
        if len(rooms) < count:
            rooms.append(channel)
        number += 1
    return found


def shardnumsub(redis: RedisServer, *channels: str) -> dict[str, int]:
    reply = redis.command("PUBSUB", "SHARDNUMSUB", *channels).splitlines()
    return {reply[i]: int(reply[i + 1]) for i in range(0, len(reply), 2)}


def wire(channel: str) -> str:
    tags = partition_tags(DEFAULT_PARTITIONS)
    return f"pushsvc:{{{tags[zlib.crc32(channel.encode()) % DEFAULT_PARTITIONS]}}}:{channel}"


Make = Callable[..., Awaitable[RedisBroker]]


@pytest.fixture
async def brokers() -> AsyncIterator[Make]:
    """Start brokers on a cluster URL (fast probe); all are closed at teardown."""
    started: list[RedisBroker] = []

    async def start(url: str, recorder: Recorder, *, timeout: float = 0.5) -> RedisBroker:
        broker = make_broker(url, timeout=timeout, probe_interval=PROBE)
        assert isinstance(broker, RedisBroker)
        broker.set_callback(recorder)
        broker.set_gap_callback(recorder.gap)
        await broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        await broker.close()


def test_partition_tags_spread_over_the_slots() -> None:
    tags = partition_tags(DEFAULT_PARTITIONS)
    slots = [key_slot(tag.encode()) for tag in tags]
    width = 16384 // DEFAULT_PARTITIONS
    assert [slot // width for slot in slots] == list(range(DEFAULT_PARTITIONS))
    assert partition_tags(DEFAULT_PARTITIONS) == tags  # the same on every node


def test_cluster_urls_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="may not hold"):
        make_broker("redis+cluster://127.0.0.1:7000?prefix={x}:")
    with pytest.raises(ValueError, match="partitions must be"):
        make_broker("redis+cluster://127.0.0.1:7000?partitions=0")
    broker = make_broker("redis+cluster://127.0.0.1:7000?partitions=4&prefix=app:")
    assert isinstance(broker, RedisBroker)
    assert (broker.partitions, broker.prefix, broker.sharded) == (4, "app:", True)
    assert "partitions" not in broker.url and "prefix" not in broker.url


async def test_rooms_on_every_master_reach_another_node_through_spublish(
    brokers: Make, redis_cluster_url: str, shared_redis_cluster: RedisClusterSetup
) -> None:
    cluster = shared_redis_cluster
    rooms = rooms_per_master(cluster)
    channels = [room for found in rooms.values() for room in found]
    publisher, subscriber = Recorder(), Recorder()
    one = await brokers(redis_cluster_url, publisher)
    two = await brokers(redis_cluster_url, subscriber)
    for channel in channels:
        await two.subscribe(channel)
    for node in cluster.nodes:  # each master holds the subscriptions of its own rooms only
        mine = rooms[node.port]
        assert shardnumsub(node, *(wire(c) for c in mine)) == {wire(c): 1 for c in mine}
        classic = node.command("PUBSUB", "NUMSUB", *(wire(c) for c in channels)).splitlines()
        assert set(classic[1::2]) == {"0"}  # sharded only: no SUBSCRIBE anywhere
    for number, channel in enumerate(channels):
        await one.publish(channel, live(number))
    await until(lambda: len(subscriber.received) == len(channels), 2.0, "every room delivered")
    assert [c for c, _ in subscriber.received] == channels
    assert subscriber.received[0][1].frame == b'{"n":0}'  # the frame as published
    assert publisher.received == []  # one never subscribed: receives nothing
    assert one.stats().published == len(channels) and two.stats().received == len(channels)
    assert two.healthy() and one.healthy()
    assert {node.port for node in cluster.nodes} == {
        int(name.rsplit(":", 1)[1]) for name in two._links
    }  # one subscriber connection per master


async def test_subscribes_of_one_loop_pass_go_out_as_one_ssubscribe_per_partition(
    brokers: Make, redis_cluster_url: str, shared_redis_cluster: RedisClusterSetup
) -> None:
    broker = await brokers(redis_cluster_url, Recorder())
    cluster = shared_redis_cluster
    before = {node.port: command_calls(node, "ssubscribe") for node in cluster.nodes}
    channels = [f"room:burst{n}" for n in range(300)]
    await asyncio.gather(*(broker.subscribe(channel) for channel in channels))
    partitions = {zlib.crc32(c.encode()) % DEFAULT_PARTITIONS for c in channels}
    calls = sum(command_calls(node, "ssubscribe") - before[node.port] for node in cluster.nodes)
    assert calls == len(partitions)  # 300 channels, one SSUBSCRIBE per partition (32)
    assert broker.stats().subscriptions == 300 + len(broker._links)  # and a probe per master


async def test_a_killed_master_is_unavailable_then_resubscribed_and_repaired(
    brokers: Make, redis_cluster: RedisClusterSetup
) -> None:
    rooms = rooms_per_master(redis_cluster)
    doomed = redis_cluster.nodes[0]
    lost_room, kept_room = rooms[doomed.port][0], rooms[redis_cluster.nodes[1].port][0]
    publisher, subscriber = Recorder(), Recorder()
    one = await brokers(redis_cluster.url, publisher)
    two = await brokers(redis_cluster.url, subscriber)
    await two.subscribe(lost_room)
    await two.subscribe(kept_room)
    resubscriptions = two.stats().resubscriptions

    doomed.kill9()
    await until(lambda: not two.healthy(), 2.0, "the subscriber reports the lost master")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await one.publish(lost_room, live(1))
    assert time.monotonic() - started < 0.5 + 0.5  # the timeout, not a hang
    await one.publish(kept_room, live(2))  # the other masters keep serving their slots
    await until(lambda: subscriber.ids(kept_room) == ["m2"], 2.0, "the live master delivers")

    doomed.start()
    took = await until(two.healthy, RECOVERY, "resubscribed on the restarted master")
    assert took < RECOVERY
    assert two.stats().resubscriptions > resubscriptions
    assert two.stats().reconnects >= 1
    assert subscriber.gaps >= 1  # the node repairs its deliveries from the store
    await until(one.healthy, RECOVERY, "the publisher's probe of that master is back")
    await one.publish(lost_room, live(3))
    await until(lambda: subscriber.ids(lost_room) == ["m3"], 2.0, "delivery resumes")


async def test_a_moved_slot_is_resubscribed_on_its_new_master(
    brokers: Make, redis_cluster: RedisClusterSetup
) -> None:
    rooms = rooms_per_master(redis_cluster)
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[1]
    room = rooms[source.port][0]
    publisher, subscriber = Recorder(), Recorder()
    one = await brokers(redis_cluster.url, publisher)
    two = await brokers(redis_cluster.url, subscriber)
    await two.subscribe(room)
    await one.publish(room, live(1))
    await until(lambda: subscriber.ids(room) == ["m1"], 2.0, "delivered before the move")
    resubscriptions, gaps = two.stats().resubscriptions, subscriber.gaps

    tag = partition_tags(DEFAULT_PARTITIONS)[zlib.crc32(room.encode()) % DEFAULT_PARTITIONS]
    slot = str(key_slot(tag.encode()))
    target_id = target.command("CLUSTER", "MYID")
    for node in (target, source, redis_cluster.nodes[2]):  # an empty slot: no keys to move
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    await until(lambda: master_of(redis_cluster, room) is target, 5.0, "the slot moved")

    await until(
        lambda: shardnumsub(target, wire(room)) == {wire(room): 1}, RECOVERY, "resubscribed"
    )
    assert shardnumsub(source, wire(room)) == {wire(room): 0}
    await until(lambda: two.stats().resubscriptions > resubscriptions, 2.0, "counted")
    assert subscriber.gaps > gaps
    await one.publish(room, live(2))  # MOVED for the publisher: rereads, sends again
    await until(lambda: subscriber.ids(room) == ["m1", "m2"], 2.0, "delivered after the move")
    await until(two.healthy, RECOVERY, "healthy after the move")


async def test_slots_taken_over_from_a_dead_master_move_the_subscriptions(
    brokers: Make, redis_cluster: RedisClusterSetup
) -> None:
    # What a failover does, without replicas: the dead master's slots (those of the
    # broker's partitions) are given to another master by hand.
    rooms = rooms_per_master(redis_cluster)
    dead, heir, third = redis_cluster.nodes
    room = rooms[dead.port][0]
    publisher, subscriber = Recorder(), Recorder()
    one = await brokers(redis_cluster.url, publisher)
    two = await brokers(redis_cluster.url, subscriber)
    await two.subscribe(room)
    resubscriptions, gaps = two.stats().resubscriptions, subscriber.gaps
    owners = slot_owners(redis_cluster)
    slots = [
        key_slot(tag.encode())
        for tag in partition_tags(DEFAULT_PARTITIONS)
        if owners[key_slot(tag.encode())] is dead
    ]
    dead.kill9()
    heir_id = heir.command("CLUSTER", "MYID")
    for node in (heir, third):
        for slot in slots:
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", heir_id)
    heir.command("CLUSTER", "BUMPEPOCH")

    await until(
        lambda: shardnumsub(heir, wire(room)) == {wire(room): 1}, RECOVERY, "moved to the heir"
    )
    await until(two.healthy, RECOVERY, "healthy without the dead master")
    assert two.stats().resubscriptions > resubscriptions and subscriber.gaps > gaps
    assert dead.port not in {int(name.rsplit(":", 1)[1]) for name in two._links}

    async def delivered() -> bool:
        try:
            await one.publish(room, live(len(publisher.received)))
        except BrokerUnavailable:  # the publisher learns the new owner on its failure
            await asyncio.sleep(0.1)
            return False
        return True

    deadline = time.monotonic() + RECOVERY
    while not await delivered():
        assert time.monotonic() < deadline, "the publisher never reached the heir"
    await until(lambda: len(subscriber.ids(room)) == 1, 2.0, "delivered through the heir")


async def test_a_paused_master_is_a_silent_link(
    brokers: Make, redis_cluster: RedisClusterSetup
) -> None:
    recorder = Recorder()
    broker = await brokers(redis_cluster.url, recorder)
    await until(lambda: all(link.last_message_at for link in broker._links.values()), 2.0, "probes")
    paused = redis_cluster.nodes[2]
    paused.command("CLIENT", "PAUSE", "1500", "ALL")
    await until(lambda: not broker.healthy(), 3 * 3 * PROBE + 1.0, "the silent master is seen")
    stale = lambda: (broker.stats().last_message_age or 0) > 3 * PROBE  # noqa: E731
    await until(stale, 1.0, "the age is the stalest master's")
    await until(broker.healthy, RECOVERY, "healthy again once the master answers")
