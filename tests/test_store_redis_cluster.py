"""What the Redis store promises on a Redis Cluster (the shared guarantees: tests/contracts/,
which run on a shared three-master cluster too).

Fan-out over every master, batching per master, a slot moved under the store
(MOVED), a master killed with ``kill -9`` and restarted, ``min_replicas``
and the settings check on every master. The keys are inspected over plain
sockets (``RedisServer.command``), never through the client under test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from redis.crc import key_slot

from conftest import Server
from pushsvc.protocol import ids
from pushsvc.store import IdempotencyKey, Store, StoreOptions, StoreUnavailable, make_store
from pushsvc.store.redis import RedisStore
from redis_server import RedisClusterSetup, RedisServer, _wait, strict_slots

HOUR = 3600.0
PREFIX = "t:"


def owners(cluster: RedisClusterSetup) -> dict[int, RedisServer]:
    """Slot -> the master serving it, as the cluster itself says (CLUSTER SHARDS-free)."""
    table: dict[int, RedisServer] = {}
    for node in cluster.nodes:
        myself = node.command("CLUSTER", "MYID")
        for line in node.command("CLUSTER", "NODES").split("\n"):
            fields = line.split()
            if len(fields) > 8 and fields[0] == myself:
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    for slot in range(int(low), int(high or low) + 1):
                        table[slot] = node
    return table


def owner(table: dict[int, RedisServer], key: str) -> RedisServer:
    return table[key_slot(key.encode())]


def users_on(table: dict[int, RedisServer], node: RedisServer, count: int) -> list[str]:
    """``count`` user names whose keys live on ``node``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        user = f"user{n}"
        if owner(table, f"{PREFIX}{{u:{user}}}:p") is node:
            found.append(user)
        n += 1
    return found


def message_id_off(table: dict[int, RedisServer], node: RedisServer) -> str:
    """A new message id whose hash is not on ``node``."""
    while True:
        message_id = ids.new_id()
        if owner(table, f"{PREFIX}{{m:{message_id}}}") is not node:
            return message_id


def keys(node: RedisServer) -> list[str]:
    return [k for k in node.command("KEYS", "*").split("\n") if k]


async def opened(url: str, busy_timeout: float = 0.5) -> RedisStore:
    store = make_store(f"{url}?prefix={PREFIX}", StoreOptions(busy_timeout=busy_timeout))
    assert isinstance(store, RedisStore) and store.cluster
    await store.open()
    return store


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    strict_slots(monkeypatch)


@pytest.fixture
def cluster(shared_redis_cluster: RedisClusterSetup, redis_cluster_url: str) -> RedisClusterSetup:
    return shared_redis_cluster


async def put(store: Store, users: list[str], message_id: str | None = None) -> str:
    message_id = message_id or ids.new_id()
    await store.accept(message_id, "private", b'{"n":1}', users, time.time() + HOUR)
    return message_id


async def test_strict_mode_refuses_a_script_spanning_slots(
    cluster: RedisClusterSetup, strict: None
) -> None:
    """The premise of the contract run: a one-Redis script (accept: message, inbox and the
    {g} indexes in one), its keys all on one master but in three slots, which Redis would
    run without the tests' shebang, is refused."""
    table = owners(cluster)
    home = owner(table, f"{PREFIX}{{g}}:pending")
    (user,) = users_on(table, home, 1)
    message_id = ids.new_id()
    while owner(table, f"{PREFIX}{{m:{message_id}}}") is not home:
        message_id = ids.new_id()
    store = await opened(cluster.url)
    try:
        call = store._script(  # the one-Redis form, sent to the message's slot
            "accept",
            message_id,
            "private",
            b"{}",
            "1e12",
            10**15,
            1,
            user,
            key=f"{PREFIX}{{m:{message_id}}}",
        )
        with pytest.raises(StoreUnavailable, match="same slot"):
            await call
    finally:
        await store.close()


async def test_fan_out_over_every_master_is_one_pipeline_per_master(
    cluster: RedisClusterSetup, strict: None
) -> None:
    table = owners(cluster)
    users = [u for node in cluster.nodes for u in users_on(table, node, 5)]
    store = await opened(cluster.url)
    try:
        batches = store.batches
        message_id = await put(store, users)
        assert store.batches - batches <= len(cluster.nodes)  # one step: a pipeline per master
        for node in cluster.nodes:  # every master holds inboxes of the message
            assert any(k.startswith(f"{PREFIX}{{u:") for k in keys(node))
        pending = await asyncio.gather(*(store.pending(u, "", 10) for u in users))
        assert all([m.id for m in p] == [message_id] for p in pending)
        assert (await store.stats()).pending == len(users)
        results = await asyncio.gather(*(store.ack(u, [message_id]) for u in users))
        assert all(list(r.acked) == [(message_id, "private")] for r in results)
        assert (await store.stats()).pending == 0
        again = await asyncio.gather(*(store.ack(u, [message_id]) for u in users))
        assert all(r.repeated == 1 for r in again)
        assert (await store.ack("stranger", [message_id])).foreign == 1
        # Past the ack retention the sweep drops the acks and then the message.
        await store.expire(time.time() + 2 * HOUR, retention=HOUR)
        assert await store.frames([message_id]) == {}
        assert not any(k.startswith(f"{PREFIX}{{m:") for node in cluster.nodes for k in keys(node))
    finally:
        await store.close()


async def test_operations_of_one_loop_pass_share_a_pipeline_per_master(
    cluster: RedisClusterSetup,
) -> None:
    store = await opened(cluster.url)
    try:
        batches, operations = store.batches, store.operations
        await asyncio.gather(*(put(store, [f"u{i}"]) for i in range(200)))
        # 200 accepts, each 3 scripts (message, index, inbox): 600 operations in one step
        assert store.operations - operations == 600
        assert store.batches - batches <= len(cluster.nodes)
    finally:
        await store.close()


async def test_a_moved_slot_is_followed(redis_cluster: RedisClusterSetup) -> None:
    """The store's slot map is stale after a slot moved: MOVED, a refresh, sent again."""
    table = owners(redis_cluster)
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[1]
    (user,) = users_on(table, source, 1)
    slot = key_slot(f"{PREFIX}{{u:{user}}}:p".encode())
    store = await opened(redis_cluster.url, busy_timeout=2.0)
    try:
        target_id = target.command("CLUSTER", "MYID")
        for node in (target, source, redis_cluster.nodes[2]):  # an empty slot: no MIGRATE
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        _wait(lambda: all(owners(redis_cluster).get(slot) is target for _ in [0]))
        message_id = await put(store, [user])
        assert [m.id for m in await store.pending(user, "", 10)] == [message_id]
        assert f"{PREFIX}{{u:{user}}}:p" in keys(target)
        assert f"{PREFIX}{{u:{user}}}:p" not in keys(source)
    finally:
        await store.close()


@pytest.fixture
def degradable(redis_cluster: RedisClusterSetup) -> RedisClusterSetup:
    """A cluster whose other masters keep serving while one is down (without replicas,
    ``cluster-require-full-coverage yes``, the default, stops them all), fsyncing
    every write."""
    for node in redis_cluster.nodes:
        node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
        # everysec postpones the AOF write while a background fsync runs (a loaded
        # machine): a kill -9 then loses a write already answered
        node.command("CONFIG", "SET", "appendfsync", "always")
    return redis_cluster


async def test_a_master_killed_fails_only_its_slots_and_loses_nothing(
    degradable: RedisClusterSetup,
) -> None:
    cluster = degradable
    table = owners(cluster)
    index_node = owner(table, f"{PREFIX}{{g}}:pending")
    victim = next(n for n in cluster.nodes if n is not index_node)
    survivor = next(n for n in cluster.nodes if n is not victim and n is not index_node)
    lost_users = users_on(table, victim, 3)
    live_users = users_on(table, survivor, 3)
    store = await opened(cluster.url)
    try:
        # The messages' hashes are off the victim: a pending read needs them.
        accepted = {
            u: [await put(store, [u], message_id_off(table, victim)) for _ in range(5)]
            for u in lost_users + live_users
        }
        shared = await put(store, lost_users + live_users, message_id_off(table, victim))
        acked = accepted[lost_users[0]][0]
        assert (await store.ack(lost_users[0], [acked])).acked
        victim.kill9()

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await put(store, [lost_users[1]], message_id_off(table, victim))
        with pytest.raises(StoreUnavailable):
            await store.pending(lost_users[1], "", 10)
        assert time.monotonic() - started < 3 * store.busy_timeout + 1
        assert not store.healthy()
        # The others still work: users, message and index on live masters.
        fresh = await put(store, [live_users[0]], message_id_off(table, victim))
        live = await store.pending(live_users[0], "", 100)
        assert [m.id for m in live] == [*accepted[live_users[0]], shared, fresh]

        victim.start()  # same port, nodes.conf and AOF
        _wait(
            lambda: all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in cluster.nodes)
        )
        deadline = time.monotonic() + 15
        while True:  # the store reconnects by itself
            try:
                later = await put(store, [lost_users[1]])
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for user in lost_users:
            expected = [i for i in accepted[user] if i != acked] + [shared]
            if user == lost_users[1]:
                expected.append(later)
            assert [m.id for m in await store.pending(user, "", 100)] == expected
        assert (await store.ack(lost_users[0], [acked])).repeated == 1  # the ack survived
        assert await store.check() and store.healthy()
    finally:
        await store.close()


async def test_min_replicas_on_a_cluster_waits_on_each_master(cluster: RedisClusterSetup) -> None:
    """WAIT goes to every master a batch touched; without replicas nothing is accepted."""
    store = make_store(
        f"{cluster.url}?prefix={PREFIX}&min_replicas=1&replica_timeout=0.05",
        StoreOptions(busy_timeout=0.5),
    )
    await store.open()
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            await put(store, ["ann"])
        assert not store.healthy()
    finally:
        await store.close()


async def test_settings_are_checked_on_every_master(
    cluster: RedisClusterSetup, caplog: pytest.LogCaptureFixture
) -> None:
    odd = cluster.nodes[2]
    odd.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="pushsvc.store"):
            store = await opened(cluster.url)
            await store.close()
    finally:
        odd.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'allkeys-lru'" in warnings[0] and f":{odd.port}" in warnings[0]


async def test_check_probes_every_master(cluster: RedisClusterSetup) -> None:
    store = await opened(cluster.url)
    try:
        assert await store.check()
        for node in cluster.nodes:
            assert any(k.endswith(":probe") for k in keys(node))
    finally:
        await store.close()


async def test_two_nodes_share_an_inbox_on_the_cluster(
    start_server: Any, cluster: RedisClusterSetup
) -> None:
    """Accepted on node A, delivered by node B from the cluster, acked on B: settled for A."""
    url = f"{cluster.url}?prefix={PREFIX}"
    node_a: Server = await start_server(store={"url": url})
    node_b: Server = await start_server(store={"url": url})
    sender = await node_a.connect("sam")
    readers = ["rita", "ravi", "rosa", "rudy", "ruth", "remy"]  # spread over the masters
    for n, user in enumerate(readers):
        await sender.send({"type": "private", "to": user, "text": f"hi {user}", "ref": str(n)})
        reply = await sender.recv_type("reply", "error")
        assert reply["type"] == "reply" and reply["ok"] is True, reply
    for user in readers:
        client = await node_b.connect(user)  # offline when sent, connects to the other node
        frame = await client.recv_type("private")
        assert frame["text"] == f"hi {user}"
        await client.send({"type": "ack", "ids": [frame["id"]], "ref": "a"})
        answer = await client.recv_type("reply", "error")
        assert answer["type"] == "reply" and answer["acked"] == 1, answer
        assert await node_a.node.store.pending(user, "", 10) == []  # A sees B's ack
        client.close()
    assert (await node_a.node.store.stats()).pending == 0
    sender.close()


async def test_scripts_are_loaded_again_on_a_master_that_forgot_them(
    cluster: RedisClusterSetup,
) -> None:
    table = owners(cluster)
    forgetful = cluster.nodes[1]
    users = [u for node in cluster.nodes for u in users_on(table, node, 2)]
    store = await opened(cluster.url)
    try:
        forgetful.command("SCRIPT", "FLUSH")
        message_id = await put(store, users)
        pending = await asyncio.gather(*(store.pending(u, "", 10) for u in users))
        assert all([m.id for m in p] == [message_id] for p in pending)
        assert store.healthy()
    finally:
        await store.close()


async def test_a_slot_migrating_is_unavailable_then_followed(
    redis_cluster: RedisClusterSetup,
) -> None:
    """While a user's slot migrates (ASK) their operations are refused, not half done;
    once it moved (MOVED) they work on the new master, with everything migrated."""
    table = owners(redis_cluster)
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[1]
    (user,) = users_on(table, source, 1)
    key = f"{PREFIX}{{u:{user}}}:p"
    slot = str(key_slot(key.encode()))
    store = await opened(redis_cluster.url)
    try:
        kept = await put(store, [user], message_id_off(table, source))
        source_id, target_id = source.command("CLUSTER", "MYID"), target.command("CLUSTER", "MYID")
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        source.command("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", key)
        with pytest.raises(StoreUnavailable, match="ASK"):
            await store.pending(user, "", 10)
        for node in (target, source, redis_cluster.nodes[2]):
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert [m.id for m in await store.pending(user, "", 10)] == [kept]
        later = await put(store, [user], message_id_off(table, source))
        assert [m.id for m in await store.pending(user, "", 10)] == [kept, later]
        assert key in keys(target) and key not in keys(source)
    finally:
        await store.close()


async def test_a_half_failed_accept_is_never_reported_accepted(cluster: RedisClusterSetup) -> None:
    """One master does not answer: the accept fails although other masters took their
    part, its idempotency key is not written, and a retry with the key stores it whole."""
    table = owners(cluster)
    index_node = owner(table, f"{PREFIX}{{g}}:pending")
    slow = next(n for n in cluster.nodes if n is not index_node)
    users = [u for node in cluster.nodes for u in users_on(table, node, 2)]
    store = await opened(cluster.url)
    key = IdempotencyKey("backend", "k-1", "fp", time.time() + HOUR)
    try:
        slow.command("CLIENT", "PAUSE", "30000", "WRITE")
        try:
            with pytest.raises(StoreUnavailable):
                await store.accept(ids.new_id(), "private", b"{}", users, time.time() + HOUR, key)
        finally:
            slow.command("CLIENT", "UNPAUSE")
        assert await store.idempotent_result("backend", "k-1", time.time()) is None
        retried = ids.new_id()  # the API's retry: the key is unknown, so a new message
        await store.accept(retried, "private", b"{}", users, time.time() + HOUR, key)
        result = await store.idempotent_result("backend", "k-1", time.time())
        assert result is not None and result.message_id == retried
        for user in users:  # every recipient has the retried one (some also the first)
            assert retried in [m.id for m in await store.pending(user, "", 10)]
        assert store.healthy()
    finally:
        await store.close()
