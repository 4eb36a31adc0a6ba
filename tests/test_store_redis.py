"""What only the Redis store promises (the shared guarantees are tests/contracts/).

Each test runs its own ``redis-server`` (``fresh_redis``) when it stops or
kills it, or the shared one (``redis_url``), and inspects the keys over a
plain socket, never through the client under test.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest
from redis.crc import key_slot

from conftest import Server
from pushsvc.protocol import ids
from pushsvc.redisurl import redacted
from pushsvc.store import (
    EPOCH_RETENTION,
    HistoryRetention,
    HistoryStats,
    Revocation,
    Store,
    StoreOptions,
    StoreUnavailable,
    make_store,
)
from pushsvc.store.redis import CONNECTIONS, SWEEP_CHUNK, RedisStore, parse_url
from redis_server import RedisServer

HOUR = 3600.0


async def opened(url: str, busy_timeout: float = 1.0) -> Store:
    store = make_store(url, StoreOptions(busy_timeout=busy_timeout))
    await store.open()
    return store


async def put(store: Store, *users: str) -> str:
    message_id = ids.new_id()
    await store.accept(message_id, "private", b"{}", users, time.time() + HOUR)
    return message_id


def keys(server: RedisServer, pattern: str = "*") -> list[str]:
    return sorted(k for k in server.command("KEYS", pattern).split("\n") if k)


def test_url_schemes_and_prefix() -> None:
    assert isinstance(make_store("redis://127.0.0.1:6379/0"), RedisStore)
    assert isinstance(make_store("rediss://127.0.0.1:6380/1"), RedisStore)
    assert isinstance(make_store("unix:///run/redis.sock?db=2"), RedisStore)
    assert parse_url("redis://h:1/3?prefix=app1:&max_connections=8&ssl_cert_reqs=none")[:3] == (
        "redis://h:1/3?ssl_cert_reqs=none",
        "app1:",
        8,
    )
    assert parse_url("redis://h:1/0")[:4] == ("redis://h:1/0", "pushsvc:", CONNECTIONS, 0)
    assert parse_url("redis://h:1/0?min_replicas=1&replica_timeout=2")[3:] == (1, 2.0)
    for bad in ("min_replicas=-1", "replica_timeout=0", "replica_timeout=x"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            make_store(f"redis://h:1/0?{bad}")
    assert parse_url("redis://h:1/0?prefix=")[1] == ""  # keys without a prefix
    for bad in ("{x}", "a}", "prefix=a&prefix=b"):
        with pytest.raises(ValueError, match="prefix"):
            make_store(f"redis://h:1/0?prefix={bad}")
    with pytest.raises(ValueError, match="max_connections"):
        make_store("redis://h:1/0?max_connections=0")
    assert redacted("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redacted("rediss://app:s3cret@h:1/0?prefix=a") == "rediss://app:***@h:1/0?prefix=a"
    assert redacted("unix:///run/redis.sock") == "unix:///run/redis.sock"


async def test_a_refused_open_names_redis_without_its_password() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = make_store(f"redis://:s3cret@127.0.0.1:{port}/0", StoreOptions(busy_timeout=1.0))
    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    assert "s3cret" not in str(refused.value) and f"127.0.0.1:{port}" in str(refused.value)


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_accepted_messages_survive_kill9_with_appendonly(tmp_path: Any, fsync: str) -> None:
    """What accept returned is in the AOF before the reply: a kill -9 right after loses none.

    ``always``: fsynced before the reply. ``everysec``: written to the OS before
    the reply (fsynced within a second), which a process crash does not undo;
    docs/redis.md, "Store durability".
    """
    server = RedisServer(tmp_path / "redis", extra=["--appendfsync", fsync])
    server.start()
    try:
        store = await opened(server.url)
        kept = await put(store, "ann", "bob")
        acked = await put(store, "ann")
        await store.ack("ann", [acked])
        await store.revoke(Revocation("user", "ann", 1.0, 2.0, None))
        await store.close()
        server.kill9()
        server.start()
        store = await opened(server.url)
        assert [m.id for m in await store.pending("ann", "", 10)] == [kept]
        assert [m.id for m in await store.pending("bob", "", 10)] == [kept]
        assert (await store.ack("ann", [acked])).repeated == 1
        assert [r.subject for r in await store.revocations(3.0)] == ["ann"]
        assert (await store.stats()).pending == 2
        await store.close()
    finally:
        server.kill9()


async def test_outage_is_bounded_and_recovery_needs_no_reopen(fresh_redis: RedisServer) -> None:
    store = await opened(fresh_redis.url, busy_timeout=0.5)
    before = await put(store, "ann")
    assert store.healthy()
    fresh_redis.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(put(store, "ann"), 10)  # the bound is the store's, not this
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.pending("ann", "", 10), 10)
    assert await asyncio.wait_for(store.check(), 10) is False
    assert time.monotonic() - started < 10
    assert not store.healthy()
    fresh_redis.start()
    assert await store.check() is True and store.healthy()  # the same store object
    after = await put(store, "ann")
    assert [m.id for m in await store.pending("ann", "", 10)] == [before, after]
    await store.close()


async def test_paused_redis_times_out_and_the_write_never_lands(fresh_redis: RedisServer) -> None:
    """A command given up on is not run later: its connection is closed."""
    store = await opened(fresh_redis.url, busy_timeout=0.3)
    fresh_redis.command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(put(store, "ann"), 10)
        assert not store.healthy()
    finally:
        fresh_redis.command("CLIENT", "UNPAUSE")
    await asyncio.sleep(0.2)
    assert await store.pending("ann", "", 10) == [] and store.healthy()
    await store.close()


async def test_prefixes_isolate_deployments(redis_server: RedisServer, redis_url: str) -> None:
    one = await opened(f"{redis_url}?prefix=one:")
    two = await opened(f"{redis_url}?prefix=two:")
    mine = await put(one, "ann")
    await one.revoke(Revocation("jti", "t", None, 1.0, None))
    assert await two.pending("ann", "", 10) == []
    assert (await two.stats()).pending == 0
    assert await two.frames([mine]) == {}
    assert await two.revocations(0.0) == []
    assert (await two.ack("ann", [mine])).unknown == 1
    assert [m.id for m in await one.pending("ann", "", 10)] == [mine]
    assert all(k.startswith("one:") for k in keys(redis_server))
    await one.close()
    await two.close()


async def test_keys_of_a_user_share_a_hash_tag(redis_server: RedisServer, redis_url: str) -> None:
    store = await opened(redis_url)
    first = await put(store, "ann", "bob")
    second = await put(store, "ann")
    await store.record_attempts("ann", [(first, 1)])
    await store.ack("ann", [first])
    await store.dead_letter("ann", [second], "max_attempts")
    everything = keys(redis_server)
    assert keys(redis_server, "pushsvc:{u:ann}:*") == [
        "pushsvc:{u:ann}:k",
        "pushsvc:{u:ann}:r",
        "pushsvc:{u:ann}:x",
    ]
    assert keys(redis_server, "pushsvc:{u:bob}:*") == ["pushsvc:{u:bob}:p"]
    assert f"pushsvc:{{m:{first}}}" in everything and f"pushsvc:{{m:{second}}}" in everything
    # Every key has one hash tag: a user's, a message's, or the global indexes' {g}.
    for key in everything:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert tag.startswith(("u:", "m:", "g")), key
    # The slot Redis Cluster would give each (CRC16 of the tag): one per user.
    assert len({key_slot(k.encode()) for k in everything if "{u:ann}" in k}) == 1
    await store.close()


async def test_node_delivers_a_stored_message_from_redis(start_server: Any, redis_url: str) -> None:
    """A node on the Redis store: offline recipient, connect, receive, ack."""
    server: Server = await start_server(store={"url": redis_url})
    sender = await server.connect("sam")
    await sender.send({"type": "private", "to": "rita", "text": "hi", "ref": "s"})
    reply = await sender.recv_type("reply", "error")
    assert reply["type"] == "reply" and reply["ok"] is True, reply
    rita = await server.connect("rita")
    frame = await rita.recv_type("private")
    assert (frame["id"], frame["text"], frame["ack"]) == (reply["id"], "hi", True)
    await rita.send({"type": "ack", "ids": [frame["id"]], "ref": "a"})
    answer = await rita.recv_type("reply", "error")
    assert answer["type"] == "reply" and answer["acked"] == 1, answer
    assert (await server.node.store.stats()).pending == 0
    rita.close()
    sender.close()


async def test_open_warns_when_redis_may_evict_or_keeps_no_aof(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(
        tmp_path / "redis", appendonly=False, extra=["--maxmemory-policy", "allkeys-lru"]
    )
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pushsvc.store"):
            store = await opened(server.url)  # a warning, not a failure
        warnings = " ".join(r.getMessage() for r in caplog.records)
        assert "'allkeys-lru'" in warnings and "noeviction" in warnings
        assert "appendonly is off" in warnings
        await put(store, "ann")
        await store.close()
    finally:
        server.kill9()


async def test_scripts_are_loaded_again_after_redis_forgot_them(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = await opened(redis_url)
    first = await put(store, "ann")
    redis_server.command("SCRIPT", "FLUSH")  # what a restart without persistence does
    second = await put(store, "ann")
    assert [m.id for m in await store.pending("ann", "", 10)] == [first, second]
    assert store.healthy()
    await store.close()


async def test_one_loop_pass_is_one_pipeline(redis_url: str) -> None:
    store = await opened(redis_url)
    assert isinstance(store, RedisStore)
    before = store.batches
    await asyncio.gather(*(put(store, f"u{i}") for i in range(50)))
    assert store.operations >= 50 and store.batches - before <= CONNECTIONS
    await store.close()


async def test_node_with_redis_down_refuses_then_recovers(
    start_server: Any, fresh_redis: RedisServer
) -> None:
    """Redis stopped: `unavailable` with retry_after, /readyz 503, connections stay open."""
    server: Server = await start_server(store={"url": fresh_redis.url, "busy_timeout": 0.5})
    sender = await server.connect("sam")
    fresh_redis.stop()
    await sender.send({"type": "private", "to": "rita", "text": "lost?", "ref": "s1"})
    refused = await sender.recv_type("reply", "error", timeout=10)
    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
    assert refused["retry_after"] > 0
    status, body, _ = await server.http("GET", "/readyz")
    assert status == 503 and body["checks"]["store"] is False, body
    await sender.send({"type": "ping", "ref": "p"})
    assert (await sender.recv_type("pong"))["ref"] == "p"  # still connected
    fresh_redis.start()
    status, body, _ = await server.http("GET", "/readyz")  # a real write: healthy again
    assert status == 200, body
    await sender.send({"type": "private", "to": "rita", "text": "kept", "ref": "s2"})
    reply = await sender.recv_type("reply", "error")
    assert reply["type"] == "reply" and reply["ok"] is True, reply
    rita = await server.connect("rita")
    frame = await rita.recv_type("private")
    assert (frame["id"], frame["text"]) == (reply["id"], "kept")  # the refused one is not there
    await rita.expect_nothing(0.3, ignore=("reply",))
    rita.close()
    sender.close()


async def test_full_redis_refuses_accepts_whole_and_still_takes_acks(tmp_path: Any) -> None:
    """maxmemory with noeviction: accept fails with nothing half-written; acks still work."""
    server = RedisServer(
        tmp_path / "redis", extra=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    )
    server.start()
    try:
        store = await opened(server.url)
        accepted: list[str] = []
        refused: StoreUnavailable | None = None
        while refused is None and len(accepted) < 2000:
            message_id = ids.new_id()
            try:
                await store.accept(message_id, "private", b"x" * 10_000, ["ann"], time.time() + 60)
            except StoreUnavailable as exc:
                refused = exc
            else:
                accepted.append(message_id)
        assert refused is not None and "maxmemory" in str(refused)
        assert accepted and not store.healthy()
        assert (await store.stats()).pending == len(accepted)  # the refused one left nothing
        assert [m.id for m in await store.pending("ann", "", 5000)] == accepted
        assert store.healthy()  # reads succeed: healthy again (as with SQLite)
        result = await store.ack("ann", accepted[:10])  # acks free memory: never refused
        assert len(result.acked) == 10
        assert (await store.stats()).pending == len(accepted) - 10
        await store.close()
    finally:
        server.kill9()


async def test_two_nodes_share_the_inbox(start_server: Any, redis_url: str) -> None:
    """Accepted on node A, delivered from the store by node B, acked on B: settled for A."""
    node_a: Server = await start_server(store={"url": redis_url})
    node_b: Server = await start_server(store={"url": redis_url})
    sender = await node_a.connect("sam")
    await sender.send({"type": "private", "to": "rita", "text": "via A", "ref": "s"})
    reply = await sender.recv_type("reply", "error")
    assert reply["type"] == "reply" and reply["ok"] is True, reply
    rita = await node_b.connect("rita")  # offline when sent, connects to the other node
    frame = await rita.recv_type("private")
    assert (frame["id"], frame["text"]) == (reply["id"], "via A")
    await rita.send({"type": "ack", "ids": [frame["id"]], "ref": "a"})
    answer = await rita.recv_type("reply", "error")
    assert answer["type"] == "reply" and answer["acked"] == 1, answer
    assert await node_a.node.store.pending("rita", "", 10) == []  # A sees B's ack
    assert (await node_a.node.store.stats()).pending == 0
    rita.close()
    sender.close()


async def test_connections_killed_by_redis_are_replaced(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = await opened(redis_url)
    first = await put(store, "ann")
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")  # every client but this one
    second = await put(store, "ann")  # on a new connection, not a failure
    assert store.healthy()
    assert [m.id for m in await store.pending("ann", "", 10)] == [first, second]
    await store.close()


async def test_sweep_works_through_more_than_one_chunk(redis_url: str) -> None:
    store = await opened(redis_url, busy_timeout=5.0)
    now = time.time()
    count = SWEEP_CHUNK * 2 + 7
    message_ids = [ids.new_id() for _ in range(count)]
    await asyncio.gather(
        *(store.accept(m, "private", b"{}", ["ann"], now - 1) for m in message_ids)
    )
    dead = await store.expire(now, retention=3600.0)
    assert sorted(d.id for d in dead) == message_ids  # three scripts, one call
    assert (await store.stats()).pending == 0
    assert await store.expire(now + 7200.0, retention=3600.0) == []  # retention drops them
    assert await store.dead_letters("ann", 10) == []
    assert await store.frames(message_ids[:5]) == {}
    await store.close()


async def test_room_history_keys_share_the_room_tag_and_a_flush_starts_a_new_epoch(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = await opened(redis_url)
    keep = HistoryRetention(size=2, ttl=600.0)

    def encode(offset: int, epoch: str) -> bytes:
        return b'{"type":"chat","offset":%d,"epoch":"%s"}' % (offset, epoch.encode())

    for _ in range(3):
        first = await store.append("lobby", "chat", encode, keep)
    assert keys(redis_server, "pushsvc:{r:lobby}:*") == [
        "pushsvc:{r:lobby}:h",
        "pushsvc:{r:lobby}:l",
    ]
    assert len({key_slot(k.encode()) for k in keys(redis_server, "*{r:lobby}*")}) == 1
    assert [e.offset for e in (await store.history("lobby", None, 10)).entries] == [2, 3]
    assert await store.trim_history(time.time()) == HistoryStats(rooms=1, entries=2)
    redis_server.command("FLUSHALL")  # the history is lost: a new epoch from 1
    again = await store.append("lobby", "chat", encode, keep)
    assert again.offset == 1 and again.epoch != first.epoch
    await store.close()


async def test_history_sweep_works_through_more_than_one_chunk(redis_url: str) -> None:
    store = await opened(redis_url)
    short = HistoryRetention(size=10, ttl=0.05)

    def encode(offset: int, epoch: str) -> bytes:
        return b'{"offset":%d,"epoch":"%s"}' % (offset, epoch.encode())

    await asyncio.gather(*(store.append(f"r{i}", "chat", encode, short) for i in range(1500)))
    await asyncio.sleep(0.1)
    stats = await store.trim_history(time.time())
    assert stats == HistoryStats(rooms=1500, entries=0)  # epochs stay a day
    stats = await store.trim_history(time.time() + EPOCH_RETENTION + 1)
    assert stats == HistoryStats(rooms=0, entries=0)
    await store.close()
