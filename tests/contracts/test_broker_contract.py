"""The broker contract: what every implementation of ``pushsvc.broker.Broker`` does.

Each test runs once per entry of :data:`BROKERS`; a new implementation is
one more entry there. Waits are polls with a deadline, so the same tests
hold for a broker that delivers over a network. The Redis entry runs on the
session's ``redis-server`` (``redis_url``, flushed per test; skipped without
the binary), the Redis Cluster entry on the session's three-master cluster
(``redis_cluster_url``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conftest import ASYNC_BROKER, Server, token
from pushsvc.broker import Broker, Envelope, EnvelopeKind, make_broker
from pushsvc.broker.memory import MemoryBroker

#: Stands for the ``redis_url`` fixture's URL in :data:`BROKERS`.
REDIS = "redis://<redis_url fixture>"
#: Stands for the ``redis_cluster_url`` fixture's URL (a 3-master Redis Cluster).
REDIS_CLUSTER = "redis+cluster://<redis_cluster_url fixture>"
#: Implementations under contract: id -> broker.url.
BROKERS = {
    "memory-sync": "memory://",
    "memory-async": ASYNC_BROKER,
    "redis": REDIS,
    "redis-cluster": REDIS_CLUSTER,
}


def broker_url(request: pytest.FixtureRequest, url: str) -> str:
    """``url``, with :data:`REDIS` / :data:`REDIS_CLUSTER` replaced by the session's
    Redis / Redis Cluster (started on first use)."""
    if url == REDIS:
        return str(request.getfixturevalue("redis_url"))
    if url == REDIS_CLUSTER:
        return str(request.getfixturevalue("redis_cluster_url"))
    return url


QUIET = 0.05  # seconds to wait to be fairly sure nothing more arrives


class Recorder:
    """The callback of a broker under test: keeps what arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Envelope]] = []

    def __call__(self, channel: str, envelope: Envelope) -> None:
        self.received.append((channel, envelope))

    async def wait_for(self, count: int, timeout: float = 2.0) -> list[tuple[str, Envelope]]:
        """At least ``count`` envelopes, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"got {len(self.received)} of {count}"
            await asyncio.sleep(0.001)
        return self.received

    async def settled(self, seconds: float = QUIET) -> list[tuple[str, Envelope]]:
        """What arrived once ``seconds`` pass without anything new."""
        await asyncio.sleep(seconds)
        return self.received


def live(n: int, frame: bytes = b"{}") -> Envelope:
    return Envelope(EnvelopeKind.LIVE, "chat", f"m{n}", frame)


@pytest.fixture(params=list(BROKERS), ids=list(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    instance = make_broker(broker_url(request, BROKERS[request.param]))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
def recorder(broker: Broker) -> Recorder:
    recorder = Recorder()
    broker.set_callback(recorder)
    return recorder


# -- the contract -------------------------------------------------------------------------


async def test_subscribe_delivers_and_unsubscribe_stops(broker: Broker, recorder: Recorder) -> None:
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    assert await recorder.wait_for(1) == [("room:a", live(1))]
    await broker.unsubscribe("room:a")
    await broker.publish("room:a", live(2))
    assert await recorder.settled() == [("room:a", live(1))]
    await broker.subscribe("room:a")  # again: delivered again
    await broker.publish("room:a", live(3))
    assert [e.id for _, e in await recorder.wait_for(2)] == ["m1", "m3"]


async def test_only_subscribed_channels_are_delivered(broker: Broker, recorder: Recorder) -> None:
    await broker.subscribe("room:a")
    await broker.subscribe("user:u1")
    for channel in ("room:b", "room:a", "user:u2", "user:u1", "control:other"):
        await broker.publish(channel, live(0, channel.encode()))
    await recorder.wait_for(2)
    got = await recorder.settled()
    assert [channel for channel, _ in got] == ["room:a", "user:u1"]
    assert [envelope.frame for _, envelope in got] == [b"room:a", b"user:u1"]


async def test_published_before_subscribe_is_not_delivered(
    broker: Broker, recorder: Recorder
) -> None:
    await broker.publish("room:a", live(1))  # at most once: nobody was listening
    await broker.subscribe("room:a")
    assert await recorder.settled() == []


async def test_unsubscribe_drops_what_is_not_yet_delivered(
    broker: Broker, recorder: Recorder
) -> None:
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    await broker.unsubscribe("room:a")
    # Synchronous delivery happened inside publish; any later one is dropped.
    assert [e.id for _, e in await recorder.settled()] in (["m1"], [])
    await broker.publish("room:a", live(2))
    assert "m2" not in [e.id for _, e in await recorder.settled()]


async def test_order_is_kept_per_channel(broker: Broker, recorder: Recorder) -> None:
    channels = ["room:a", "room:b", "user:u"]
    for channel in channels:
        await broker.subscribe(channel)
    count = 300
    for n in range(count):
        await broker.publish(channels[n % 3], live(n))
    got = await recorder.wait_for(count)
    for index, channel in enumerate(channels):
        ids = [envelope.id for ch, envelope in got if ch == channel]
        assert ids == [f"m{n}" for n in range(index, count, 3)], channel


@pytest.mark.parametrize("kind", list(EnvelopeKind), ids=lambda kind: kind.name)
async def test_every_kind_round_trips_through_bytes_and_the_broker(
    broker: Broker, recorder: Recorder, kind: EnvelopeKind
) -> None:
    # The frame is last on the wire: separators and non-UTF-8 bytes survive.
    envelope = Envelope(kind, "tÿpe", "01J0000000000000000000000", b'{"a":"\x1f"}\xff\x00')
    data = envelope.to_bytes()
    assert data[:1] == kind.value and len(kind.value) == 1  # compact: one byte per kind
    assert Envelope.from_bytes(data) == envelope
    empty = Envelope(kind, "", "", b"")
    assert Envelope.from_bytes(empty.to_bytes()) == empty
    await broker.subscribe("user:u")
    await broker.publish("user:u", envelope)
    assert await recorder.wait_for(1) == [("user:u", envelope)]


def test_kind_wire_bytes_are_distinct_and_unknown_ones_refused() -> None:
    assert len({kind.value for kind in EnvelopeKind}) == len(EnvelopeKind)
    assert {kind.name for kind in EnvelopeKind} == {
        "LIVE",
        "PRESENCE",
        "DURABLE",
        "SETTLED",
        "DISCONNECT",
        "REVOKED",
    }
    with pytest.raises(ValueError, match="unknown envelope kind"):
        Envelope.from_bytes(b"?\x1fchat\x1fid\x1f{}")
    with pytest.raises(ValueError):
        Envelope.from_bytes(b"L\x1fchat")  # truncated


async def test_publish_after_close_delivers_nothing_and_does_not_raise(
    broker: Broker, recorder: Recorder
) -> None:
    assert broker.healthy()
    await broker.subscribe("room:a")
    await broker.close()
    assert not broker.healthy()
    await broker.publish("room:a", live(1))
    assert await recorder.settled() == []


async def test_close_drops_what_is_not_yet_delivered(broker: Broker, recorder: Recorder) -> None:
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    await broker.close()
    assert [e.id for _, e in await recorder.settled()] in (["m1"], [])


async def test_healthy_after_start(broker: Broker) -> None:
    assert broker.healthy()
    await broker.close()
    assert not broker.healthy()
    await broker.start()  # a restart reconnects
    assert broker.healthy()


async def test_in_process_only_when_every_subscriber_is_served_inside_publish(
    broker: Broker, request: pytest.FixtureRequest
) -> None:
    """``in_process`` lets delivery skip the publish: true of synchronous memory:// alone."""
    assert broker.in_process is (request.node.callspec.id == "memory-sync")


# -- the two in-memory modes --------------------------------------------------------------


async def test_sync_memory_delivers_inside_publish() -> None:
    broker = make_broker("memory://?delivery=sync")
    recorder = Recorder()
    broker.set_callback(recorder)
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    assert recorder.received == [("room:a", live(1))]


async def test_async_memory_delivers_on_a_later_loop_pass() -> None:
    broker = make_broker(ASYNC_BROKER)
    recorder = Recorder()
    broker.set_callback(recorder)
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    assert recorder.received == []  # publish returned first
    await asyncio.sleep(0)
    assert recorder.received == [("room:a", live(1))]
    assert recorder.received[0][1] is not live(1)  # a copy through the wire form


async def test_async_memory_logs_a_failing_callback_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = make_broker(ASYNC_BROKER)
    recorder = Recorder()

    def callback(channel: str, envelope: Envelope) -> None:
        if envelope.id == "m1":
            raise RuntimeError("boom")
        recorder(channel, envelope)

    broker.set_callback(callback)
    await broker.subscribe("room:a")
    await broker.publish("room:a", live(1))
    await broker.publish("room:a", live(2))
    assert [e.id for _, e in await recorder.wait_for(1)] == ["m2"]
    assert "broker callback failed on room:a" in caplog.text


@pytest.mark.parametrize(
    ("url", "delivery"),
    [("memory://", "sync"), ("memory://?delivery=sync", "sync"), (ASYNC_BROKER, "async")],
)
def test_memory_url_selects_the_mode(url: str, delivery: str) -> None:
    broker = make_broker(url)
    assert isinstance(broker, MemoryBroker) and broker.delivery == delivery


@pytest.mark.parametrize(
    "url",
    [
        "memory://?delivery=later",
        "memory://?mode=async",
        "memory://?delivery=async&delivery=sync",
        "memory://host",
        "memory:///path",
        "redis+sentinel://localhost",
        "redis://localhost/0?prefix=a&prefix=b",
        "redis://localhost/not-a-db",
        "redis://localhost/0?no_such_option=1",
    ],
)
def test_bad_broker_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"broker\.url|delivery"):
        make_broker(url)


# -- a node over each broker --------------------------------------------------------------


@pytest.mark.parametrize("url", list(BROKERS.values()), ids=list(BROKERS))
async def test_node_flows_over_each_broker(
    start_server: Callable[..., Any], url: str, request: pytest.FixtureRequest
) -> None:
    """Rooms, presence, at-least-once with acks, disconnect and revocation, end to end."""
    server: Server = await start_server(broker={"url": broker_url(request, url)})
    alice = await server.connect("alice")
    bob = await server.connect("bob", extra={"jti": "bob-1"})
    joined = await alice.recv_type("presence")
    assert joined["event"] == "join" and joined["user"] == "bob"
    await alice.send({"type": "chat", "text": "one"})
    await alice.send({"type": "chat", "text": "two"})
    for client in (alice, bob):
        assert (await client.recv_type("chat"))["text"] == "one"
        assert (await client.recv_type("chat"))["text"] == "two"
    # At least once: a second connection of bob sees the ack of the first settle it.
    bob2 = await server.connect("bob")
    status, body, _ = await server.http(
        "POST", "/api/v1/notify", {"to": ["bob"], "title": "T", "message": "hey"}
    )
    assert status == 202, body
    first = await bob.recv_type("notification")
    second = await bob2.recv_type("notification")
    assert first["id"] == second["id"]
    await bob.send({"type": "ack", "ids": [first["id"]]})
    await bob2.expect_nothing(0.3, ignore=("presence",))
    # Revocation closes bob's revoked connection only; disconnect closes the rest.
    status, body, _ = await server.http("POST", "/api/v1/revocations", {"jti": "bob-1"})
    assert status == 200 and body["closed"] == 1
    assert await bob.closed() == 4001
    status, body, _ = await server.http("POST", "/api/v1/users/bob/disconnect", {})
    assert status == 200, body
    assert await bob2.closed() == 4003
    error = await server.handshake(f"?access_token={token('bob', extra={'jti': 'bob-1'})}")
    assert getattr(error, "code", None) == 401
