"""The Redis broker against a real ``redis-server``: batching, faults, liveness, figures.

The contract suite (tests/contracts/test_broker_contract.py) covers what every
broker does; these tests cover what only a network broker meets: batched
SUBSCRIBE commands, lost connections, a stopped or blocked Redis, the probe,
and the node's answers while Redis is away (``unavailable``, 503, the gap
repair of at-least-once deliveries). Each starts its own ``redis-server``
(``fresh_redis``) unless it only needs a clean one (``redis_url``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server
from pushsvc.broker import BrokerUnavailable, Envelope, EnvelopeKind, make_broker
from pushsvc.broker.redis import BACKOFF_MAX, PROBE_MISSES, RedisBroker
from redis_server import NO_REDIS, REDIS_SERVER, RedisServer

#: Longest a reconnect and resubscribe may take once Redis is back: the
#: documented backoff bound, a connect timeout, and slack for a loaded machine.
RECOVERY = BACKOFF_MAX + 1.0 + 3.0
PROBE = 0.1  # probe interval of the brokers under test


def live(n: int) -> Envelope:
    return Envelope(EnvelopeKind.LIVE, "chat", f"m{n}", b'{"n":%d}' % n)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; returns the seconds it took, fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def command_calls(redis: RedisServer, command: str) -> int:
    """How many times Redis ran ``command`` (INFO commandstats)."""
    for line in redis.command("INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def numsub(redis: RedisServer, *channels: str) -> dict[str, int]:
    """Subscribers per (prefixed) channel, from PUBSUB NUMSUB."""
    reply = redis.command("PUBSUB", "NUMSUB", *channels).splitlines()
    return {reply[i]: int(reply[i + 1]) for i in range(0, len(reply), 2)}


class Recorder:
    """A broker callback that keeps what arrives; counts gap calls too."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Envelope]] = []
        self.gaps = 0

    def __call__(self, channel: str, envelope: Envelope) -> None:
        self.received.append((channel, envelope))

    def gap(self) -> None:
        self.gaps += 1

    def ids(self, channel: str | None = None) -> list[str]:
        """The ids received, in order (on ``channel`` only, if given)."""
        return [e.id for c, e in self.received if channel is None or c == channel]


@pytest.fixture
async def make(fresh_redis: RedisServer) -> AsyncIterator[Callable[..., Awaitable[RedisBroker]]]:
    """Start brokers on the test's own Redis (fast probe); all are closed at teardown."""
    brokers: list[RedisBroker] = []

    async def start(recorder: Recorder, *, timeout: float = 0.5, query: str = "") -> RedisBroker:
        broker = make_broker(fresh_redis.url + query, timeout=timeout, probe_interval=PROBE)
        assert isinstance(broker, RedisBroker)
        broker.set_callback(recorder)
        broker.set_gap_callback(recorder.gap)
        await broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        await broker.close()


# -- batching -------------------------------------------------------------------------------


async def test_subscribes_of_one_loop_pass_go_out_as_one_command(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    broker = await make(Recorder())
    before = command_calls(fresh_redis, "subscribe")
    channels = [f"room:r{n}" for n in range(200)]
    await asyncio.gather(*(broker.subscribe(channel) for channel in channels))
    assert command_calls(fresh_redis, "subscribe") == before + 1
    counts = numsub(fresh_redis, *(f"pushsvc:{c}" for c in channels))
    assert set(counts.values()) == {1}
    assert broker.stats().subscriptions == 201  # and the probe channel

    before = command_calls(fresh_redis, "unsubscribe")
    await asyncio.gather(*(broker.unsubscribe(channel) for channel in channels[:150]))
    await until(lambda: broker.stats().subscriptions == 51, 2, "unsubscribed")
    assert command_calls(fresh_redis, "unsubscribe") == before + 1
    counts = numsub(fresh_redis, "pushsvc:room:r0", "pushsvc:room:r199")
    assert counts == {"pushsvc:room:r0": 0, "pushsvc:room:r199": 1}


async def test_subscribe_and_unsubscribe_in_one_batch_cancel_out(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    recorder = Recorder()
    broker = await make(recorder)
    await broker.subscribe("room:kept")
    before = command_calls(fresh_redis, "subscribe") + command_calls(fresh_redis, "unsubscribe")
    # Same pass: a new channel in and out, a subscribed one out and in again.
    await asyncio.gather(
        broker.subscribe("room:gone"),
        broker.unsubscribe("room:gone"),
        broker.unsubscribe("room:kept"),
        broker.subscribe("room:kept"),
    )
    await asyncio.sleep(0.05)
    after = command_calls(fresh_redis, "subscribe") + command_calls(fresh_redis, "unsubscribe")
    assert after == before  # nothing changed on the server: nothing sent
    assert numsub(fresh_redis, "pushsvc:room:gone", "pushsvc:room:kept") == {
        "pushsvc:room:gone": 0,
        "pushsvc:room:kept": 1,
    }
    await broker.publish("room:gone", live(1))
    await broker.publish("room:kept", live(2))
    await until(lambda: recorder.ids() == ["m2"], 2, "room:kept delivered")


async def test_prefix_from_the_url_and_two_nodes_share_a_redis(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    a, b, other = Recorder(), Recorder(), Recorder()
    node_a = await make(a)
    node_b = await make(b)
    elsewhere = await make(other, query="?prefix=staging:")
    assert elsewhere.prefix == "staging:"
    await node_b.subscribe("room:r")
    await elsewhere.subscribe("room:r")
    await node_a.publish("room:r", live(1))  # A has no member: receives none
    await until(lambda: b.ids() == ["m1"], 2, "delivered to B")
    await asyncio.sleep(0.05)
    assert a.received == [] and other.received == []
    assert numsub(fresh_redis, "pushsvc:room:r", "staging:room:r") == {
        "pushsvc:room:r": 1,
        "staging:room:r": 1,
    }
    assert node_a.stats().published == 1 and node_b.stats().received == 1


# -- faults ---------------------------------------------------------------------------------


async def test_killed_subscriber_connection_reconnects_resubscribes_and_reports_a_gap(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    recorder = Recorder()
    broker = await make(recorder)
    await broker.subscribe("room:a")
    await broker.subscribe("user:u")
    assert recorder.gaps == 0
    fresh_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    await until(lambda: broker.stats().resubscriptions == 1, RECOVERY, "resubscribed")
    await until(broker.healthy, RECOVERY, "healthy again")
    stats = broker.stats()
    assert stats.reconnects == 1 and stats.subscriptions == 3
    assert recorder.gaps == 1
    await broker.publish("room:a", live(1))
    await broker.publish("user:u", live(2))
    await until(lambda: recorder.ids() == ["m1", "m2"], 2, "delivered after the reconnect")


async def test_output_buffer_limit_kill_is_repaired(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    recorder = Recorder()
    broker = await make(recorder)
    await broker.subscribe("room:a")
    fresh_redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1 1 0")
    big = Envelope(EnvelopeKind.LIVE, "chat", "big", b"x" * 100_000)
    await broker.publish("room:a", big)  # over the limit: Redis drops the subscriber
    await until(lambda: broker.stats().reconnects >= 1, RECOVERY, "reconnected")
    fresh_redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 32mb 8mb 60")
    await until(broker.healthy, RECOVERY, "healthy again")
    assert recorder.gaps >= 1
    await broker.publish("room:a", live(1))
    await until(lambda: "m1" in recorder.ids(), 2, "delivered after the reconnect")


async def test_stopped_redis_unhealthy_publish_refused_then_recovered_within_the_bound(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    recorder = Recorder()
    broker = await make(recorder)
    await broker.subscribe("room:a")
    fresh_redis.stop()
    await until(lambda: not broker.healthy(), 5, "unhealthy")
    with pytest.raises(BrokerUnavailable):
        await broker.publish("room:a", live(1))
    await broker.subscribe("room:b")  # returns: made on reconnect
    await broker.unsubscribe("room:a")  # and this one is not remade
    await asyncio.sleep(BACKOFF_MAX)  # long enough for the backoff to reach its bound
    stats = broker.stats()
    assert stats.publish_errors >= 1 and stats.subscriptions == 0
    fresh_redis.start()
    took = await until(broker.healthy, RECOVERY, "healthy after the restart")
    assert took <= RECOVERY
    assert recorder.gaps == 1 and broker.stats().reconnects == 1
    assert numsub(fresh_redis, "pushsvc:room:a", "pushsvc:room:b") == {
        "pushsvc:room:a": 0,
        "pushsvc:room:b": 1,
    }
    await broker.publish("room:b", live(2))
    await until(lambda: recorder.ids() == ["m2"], 2, "delivered after the restart")


async def test_start_refuses_an_unreachable_redis(fresh_redis: RedisServer) -> None:
    broker = make_broker(fresh_redis.url, timeout=0.2)
    fresh_redis.stop()
    with pytest.raises(BrokerUnavailable, match="not reachable"):
        await broker.start()
    assert not broker.healthy()


async def test_unix_socket_url(tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    sock = tmp_path / "redis.sock"
    server = RedisServer(
        tmp_path / "r", extra=["--unixsocket", str(sock), "--unixsocketperm", "700"]
    )
    server.start()
    try:
        broker = make_broker(f"unix://{sock}?db=0&prefix=u:", timeout=0.5, probe_interval=PROBE)
        recorder = Recorder()
        broker.set_callback(recorder)
        await broker.start()
        await broker.subscribe("room:a")
        assert numsub(server, "u:room:a") == {"u:room:a": 1}
        await broker.publish("room:a", live(1))
        await until(lambda: recorder.ids() == ["m1"], 2, "delivered over the socket")
        await broker.close()
    finally:
        server.kill9()


async def test_paused_redis_is_a_silent_subscription_then_healthy_again(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    broker = await make(Recorder())
    await until(lambda: broker.stats().last_message_age is not None, 2, "a probe")
    fresh_redis.command("CLIENT", "PAUSE", "3000", "WRITE")  # publishes wait: no probe arrives
    took = await until(lambda: not broker.healthy(), 3, "the probe is missed")
    assert took >= PROBE  # not before a probe was due
    age = broker.stats().last_message_age
    assert age is not None and age > PROBE_MISSES * PROBE
    # Dropped as silent and reconnected, but not healthy while nothing arrives.
    await until(lambda: broker.stats().reconnects >= 1, 3, "a new connection")
    for _ in range(25):
        assert not broker.healthy()
        await asyncio.sleep(0.02)
    await until(broker.healthy, RECOVERY, "probes arrive again")
    assert broker.stats().timeouts >= 1  # the probe publishes waited on the pause


async def test_blocked_redis_does_not_block_the_loop_and_publish_times_out(
    make: Callable[..., Awaitable[RedisBroker]], fresh_redis: RedisServer
) -> None:
    broker = await make(Recorder(), timeout=0.3)
    await broker.subscribe("room:a")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def lag_probe() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    probe = asyncio.ensure_future(lag_probe())
    sleeper = asyncio.ensure_future(asyncio.to_thread(fresh_redis.command, "DEBUG", "SLEEP", "2"))
    await asyncio.sleep(0.2)  # Redis is asleep now
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish("room:a", live(1))
    failed_after = time.monotonic() - started
    await sleeper
    stop.set()
    await probe
    assert failed_after < 0.3 + 1.0  # bounded by broker.timeout (with slack), not the sleep
    assert max(gaps) < 0.2, f"the loop stalled {max(gaps):.3f} s"
    assert broker.stats().timeouts >= 1
    await until(broker.healthy, RECOVERY, "healthy after the sleep")
    await broker.publish("room:a", live(2))


# -- a node on Redis ------------------------------------------------------------------------


def series(text: str) -> dict[str, float]:
    """Sample name -> value of the unlabelled samples in a /metrics answer."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


async def test_node_while_redis_is_stopped_then_repairs_durable_deliveries(
    start_server: Callable[..., Any], fresh_redis: RedisServer
) -> None:
    server: Server = await start_server(
        broker={"url": fresh_redis.url, "probe_interval": PROBE, "timeout": 0.3}
    )
    alice = await server.connect("alice")
    bob = await server.connect("bob")
    await alice.recv_type("presence")
    fresh_redis.stop()
    await until(lambda: not server.node.broker_healthy(), 5, "broker unhealthy")
    # An at-most-once chat: refused with the documented error, connection stays open.
    await alice.send({"type": "chat", "text": "lost?", "ref": "c1"})
    error = await alice.recv_type("error")
    assert error["code"] == "unavailable" and error["ref"] == "c1"
    assert error["retry_after"] > 0
    # The API: publish and disconnect answer 503 with Retry-After; /readyz names the broker.
    status, body, headers = await server.http("POST", "/api/v1/publish", {"room": "lobby"})
    assert status == 503 and body["error"] == "unavailable" and "Retry-After" in headers
    status, body, headers = await server.http("POST", "/api/v1/users/bob/disconnect", {})
    assert status == 503 and "Retry-After" in headers
    status, body, _ = await server.http("GET", "/readyz", auth_header=False)
    assert status == 503 and body["checks"]["broker"] is False and "broker" in body["message"]
    # At least once: the store (SQLite) takes it, its DURABLE envelope is lost.
    status, body, _ = await server.http(
        "POST", "/api/v1/notify", {"to": ["bob"], "title": "T", "message": "kept"}
    )
    assert status == 202, body
    await bob.expect_nothing(0.3, ignore=("presence",))
    fresh_redis.start()
    notification = await bob.recv_type("notification", timeout=RECOVERY)
    assert notification["message"] == "kept"  # the gap repair, without a reconnect
    assert bob.close_code is None and alice.close_code is None
    await alice.send({"type": "chat", "text": "back", "ref": "c2"})
    assert (await bob.recv_type("chat"))["text"] == "back"
    status, text, _ = await server.http("GET", "/metrics", auth_header=False)
    figures = series(text)
    assert figures["pushsvc_broker_reconnects_total"] == 1
    assert figures["pushsvc_broker_resubscriptions_total"] == 1
    assert figures["pushsvc_broker_publish_errors_total"] >= 3
    assert figures["pushsvc_broker_subscriptions"] >= 4  # users, lobby, revocations, probe
    assert figures["pushsvc_broker_received_total"] >= 1
    assert figures["pushsvc_broker_published_total"] >= 1
    assert 0 <= figures["pushsvc_broker_last_message_age_seconds"] < 3
    assert figures["pushsvc_broker_up"] == 1


async def test_two_nodes_on_one_redis_route_only_what_each_needs(
    start_server: Callable[..., Any], redis_url: str
) -> None:
    broker = {"url": redis_url, "probe_interval": PROBE}
    one: Server = await start_server(broker=broker, chat={"auto_join": False})
    two: Server = await start_server(broker=broker, chat={"auto_join": False})
    alice = await one.connect("alice")
    bob = await two.connect("bob")
    await alice.send({"type": "join", "room": "r", "ref": "j"})
    await alice.recv_type("reply")
    await bob.send({"type": "join", "room": "r", "ref": "j"})
    await bob.recv_type("reply")
    await alice.send({"type": "chat", "room": "r", "text": "hi"})
    assert (await bob.recv_type("chat"))["text"] == "hi"
    received = two.node.broker.stats().received
    status, _, _ = await one.http("POST", "/api/v1/publish", {"room": "elsewhere", "text": "x"})
    assert status == 202
    status, body, _ = await one.http(
        "POST", "/api/v1/notify", {"to": ["bob"], "title": "T", "message": "m"}
    )
    assert status == 202, body
    assert (await bob.recv_type("notification"))["message"] == "m"
    await asyncio.sleep(0.1)
    assert two.node.broker.stats().received == received + 1  # the notification, not the room
