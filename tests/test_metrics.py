"""Every series of issue 4 moves under real traffic, read from ``GET /metrics``.

Each test drives a real server over real sockets (no registry pokes) and
reads the Prometheus text exposition back, the way Prometheus does.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.netutil
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, make_config, token
from pushsvc import FrameContext, MessageType, app, hookimpl
from pushsvc.plugin.manager import load_plugins

Start = Callable[..., Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: Server) -> tuple[str, Samples]:
    """GET /metrics: the text and its samples keyed by (name, labels)."""
    status, text, headers = await server.http("GET", "/metrics", auth_header=False)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def eventually(
    server: Server, check: Callable[[Samples], bool], timeout: float = 5.0
) -> Samples:
    """Scrape until ``check`` holds (background work settles asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        _text, samples = await scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


class Crashy:
    """A plugin whose ``boom`` handler raises."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        return [MessageType("boom", self.boom, description="always raises")]

    async def boom(self, ctx: FrameContext) -> None:
        raise RuntimeError("boom")


@pytest.fixture
async def crashy_server(data_dir: Path) -> AsyncIterator[Server]:
    """A server with the built-in plugins plus :class:`Crashy`."""
    service = await app.start(
        make_config(data_dir),
        registry=CollectorRegistry(),
        plugins=load_plugins(extra=[("crashy", Crashy())]),
        sockets=tornado.netutil.bind_sockets(0, "127.0.0.1"),
    )
    yield Server(service)
    await service.shutdown(pace=False)


async def test_connections_handshakes_frames_and_chat(start_server: Start) -> None:
    server = await start_server()
    alice = await server.connect("alice-7f3a")
    bob = await server.connect("bob-91c2")
    await server.handshake("?access_token=not-a-jwt")
    await server.handshake(f"?access_token={token('late', ttl=-3600)}")
    await server.handshake()
    chat = '{"type": "chat", "text": "hi", "ref": "c1"}'
    await alice.send(chat)
    await bob.recv_type("chat")
    await alice.recv_type("reply")
    await alice.send('{"type": "ping"')  # invalid JSON
    await alice.send({"type": "nope", "ref": "n"})
    await alice.send({"type": "ping", "ref": "p"})
    assert (await alice.recv_type("error"))["code"] == "bad_request"
    assert (await alice.recv_type("error"))["code"] == "unknown_type"
    await alice.recv_type("pong")

    text, s = await scrape(server)
    assert value(s, "pushsvc_connections") == 2
    assert value(s, "pushsvc_handshakes_total", result="ok") == 2
    assert value(s, "pushsvc_handshakes_total", result="unauthorized", reason="malformed") == 1
    assert value(s, "pushsvc_handshakes_total", result="unauthorized", reason="expired") == 1
    assert value(s, "pushsvc_handshakes_total", reason="missing_token") == 1
    for kind in ("chat", "invalid", "unknown", "ping"):
        assert value(s, "pushsvc_frames_received_total", type=kind) == 1, kind
    assert value(s, "pushsvc_received_bytes_total", type="chat") == len(chat)
    assert value(s, "pushsvc_frames_sent_total", type="welcome") == 2
    assert value(s, "pushsvc_frames_sent_total", type="chat") == 2
    assert value(s, "pushsvc_frames_sent_total", type="error") == 2
    assert value(s, "pushsvc_frames_sent_total", type="pong") == 1
    assert value(s, "pushsvc_frames_sent_total", type="presence") >= 1
    assert value(s, "pushsvc_sent_bytes_total", type="chat") > 2 * len("hi")
    assert value(s, "pushsvc_broadcast_recipients_count") == 1
    assert value(s, "pushsvc_broadcast_recipients_sum") == 2
    assert value(s, "pushsvc_broadcast_recipients_bucket", le="1.0") == 0
    assert value(s, "pushsvc_messages_accepted_total", type="chat") == 1
    assert value(s, "pushsvc_messages_delivered_total", type="chat") == 2
    assert value(s, "pushsvc_frame_errors_total", code="bad_request") == 1
    assert value(s, "pushsvc_frame_errors_total", code="unknown_type") == 1
    # Bounded labels: no user id, room name or session id in any series.
    for unbounded in ("alice-7f3a", "bob-91c2", "lobby", alice.welcome["session"]):
        assert unbounded not in text

    alice.close()
    bob.close()
    s = await eventually(server, lambda s: value(s, "pushsvc_connections") == 0)
    assert value(s, "pushsvc_connections") == 0
    assert value(s, "pushsvc_closes_total", reason="client") == 2


async def test_at_least_once_series(start_server: Start) -> None:
    server = await start_server(delivery={"ack_timeout": 0.2, "max_attempts": 2})
    sender = await server.connect("sender")
    reader = await server.connect("reader")
    await sender.send({"type": "private", "to": "reader", "text": "ack me", "ref": "p1"})
    first = await reader.recv_type("private")
    await reader.send({"type": "ack", "id": first["id"], "ref": "a1"})
    assert (await reader.recv_type("reply"))["acked"] == 1
    # Never acked: resent once after ack_timeout, then dead-lettered.
    await sender.send({"type": "private", "to": "reader", "text": "ignore me"})
    ignored = await reader.recv_type("private")
    again = await reader.recv_type("private", timeout=3)
    assert again["id"] == ignored["id"]
    # For a user who is offline: stays pending.
    await sender.send({"type": "private", "to": "offline", "text": "later", "ref": "p3"})
    await sender.recv_type("reply")

    s = await eventually(
        server, lambda s: value(s, "pushsvc_messages_dead_lettered_total") == 1, timeout=5
    )
    assert value(s, "pushsvc_messages_accepted_total", type="private") == 3
    assert value(s, "pushsvc_messages_delivered_total", type="private") == 3
    assert value(s, "pushsvc_messages_acked_total", type="private") == 1
    assert value(s, "pushsvc_messages_redelivered_total", type="private") == 1
    assert (
        value(s, "pushsvc_messages_dead_lettered_total", type="private", reason="max_attempts") == 1
    )
    assert value(s, "pushsvc_ack_latency_seconds_count") == 1
    assert 0 < value(s, "pushsvc_ack_latency_seconds_sum") < 5
    for operation in ("accept", "pending", "ack", "record_attempts", "dead_letter"):
        count = value(s, "pushsvc_store_operation_seconds_count", operation=operation)
        assert count >= 1, operation
    assert value(s, "pushsvc_store_errors_total") == 0

    await server.node.delivery.sweep()  # the 5 s backlog timer, run now
    s = await eventually(server, lambda s: value(s, "pushsvc_pending_messages") == 1)
    assert value(s, "pushsvc_pending_messages") == 1
    assert 0 <= value(s, "pushsvc_oldest_pending_age_seconds") < 60
    assert value(s, "pushsvc_store_operation_seconds_count", operation="stats") >= 1
    assert value(s, "pushsvc_store_operation_seconds_count", operation="expire") >= 1


async def test_rate_limit_and_abuse_close(start_server: Start) -> None:
    server = await start_server(
        ratelimit={"rate": 0.5, "burst": 2, "abuse_violations": 3, "abuse_window": 10}
    )
    client = await server.connect("noisy")
    for _ in range(6):
        await client.send({"type": "ping"})
    assert await client.closed() == 1008
    s = await eventually(server, lambda s: value(s, "pushsvc_connections") == 0)
    # Closed on the violation after abuse_violations: 4 frames were refused.
    assert value(s, "pushsvc_rate_limited_total", bucket="connection") == 4
    assert value(s, "pushsvc_closes_total", reason="rate_abuse") == 1
    assert value(s, "pushsvc_frame_errors_total", code="rate_limited") == 4


async def test_oversize_and_expiry_closes(start_server: Start) -> None:
    server = await start_server(server={"max_message_bytes": 1024})
    big = await server.connect("big")
    await big.send({"type": "chat", "text": "x" * 2000})
    assert await big.closed() == 1009
    short = await server.connect("short", ttl=1)
    assert await short.closed(timeout=5) == 4001
    s = await eventually(server, lambda s: value(s, "pushsvc_connections") == 0)
    assert value(s, "pushsvc_closes_total", reason="oversize") == 1
    assert value(s, "pushsvc_closes_total", reason="token_expired") == 1


async def test_plugin_errors_by_plugin(crashy_server: Server) -> None:
    client = await crashy_server.connect("c")
    await client.send({"type": "boom", "ref": "b"})
    assert (await client.recv_type("error"))["message"] == "plugin crashy failed"
    _text, s = await scrape(crashy_server)
    assert value(s, "pushsvc_plugin_errors_total", plugin="crashy", hook="message_handler") == 1
    assert value(s, "pushsvc_frames_received_total", type="boom") == 1


async def test_store_errors_and_state_gauges(start_server: Start, data_dir: Path) -> None:
    server = await start_server(store={"busy_timeout": 0.1})
    client = await server.connect("writer")
    await asyncio.sleep(0.6)  # one event-loop lag sample (0.5 s timer)
    _text, s = await scrape(server)
    assert value(s, "pushsvc_broker_up") == 1
    assert value(s, "pushsvc_ready") == 1
    assert value(s, "pushsvc_draining") == 0
    assert value(s, "pushsvc_event_loop_lag_seconds_count") >= 1
    assert value(s, "pushsvc_build_info") == 1

    holder = sqlite3.connect(data_dir / "pushsvc.sqlite3", timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # a second writer holds the lock
    try:
        await client.send({"type": "private", "to": "someone", "text": "x", "ref": "w"})
        error = await client.recv_type("error")
        assert error["code"] == "unavailable" and error["retry_after"] >= 1
        _text, s = await scrape(server)
        assert value(s, "pushsvc_store_errors_total", operation="accept") == 1
        assert value(s, "pushsvc_ready") == 0  # the last write failed
    finally:
        holder.rollback()
        holder.close()
    await client.send({"type": "private", "to": "someone", "text": "x", "ref": "w2"})
    assert (await client.recv_type("reply", "error"))["type"] == "reply"
    _text, s = await scrape(server)
    assert value(s, "pushsvc_ready") == 1
    assert value(s, "pushsvc_store_errors_total", operation="accept") == 1


async def test_undeclared_published_type_is_labelled_other(start_server: Start) -> None:
    server = await start_server()
    watcher = await server.connect("watcher")
    for kind in ("news-1", "news-2"):
        status, _body, _ = await server.http(
            "POST", "/api/v1/publish", {"room": "lobby", "type": kind, "text": "t"}
        )
        assert status == 202
        await watcher.recv_type(kind)
    text, s = await scrape(server)
    assert "news-1" not in text and "news-2" not in text
    assert value(s, "pushsvc_messages_accepted_total", type="other") == 2
    assert value(s, "pushsvc_messages_delivered_total", type="other") == 2
    assert value(s, "pushsvc_frames_sent_total", type="other") == 2


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; `make tools` installs it in CI)",
)
async def test_promtool_check_metrics(start_server: Start) -> None:
    server = await start_server(delivery={"ack_timeout": 0.2, "max_attempts": 1})
    alice = await server.connect("alice")
    await alice.send({"type": "chat", "text": "hi"})
    await alice.send({"type": "private", "to": "alice", "text": "x"})
    await alice.send("{bad")
    await alice.recv_type("private")
    await eventually(server, lambda s: value(s, "pushsvc_messages_dead_lettered_total") == 1)
    await server.node.delivery.sweep()
    text, _s = await scrape(server)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lock_free_values_read_as_prometheus_client_would() -> None:
    """LoopHistogram buckets like prometheus-client (``le`` inclusive); counters read back."""
    from prometheus_client import Counter, Histogram

    from pushsvc.ops.metrics import LoopHistogram, Metrics, loop_value

    registry = CollectorRegistry()
    plain = Histogram("plain_seconds", "", buckets=(0.1, 1.0), registry=registry)
    fast = Histogram("fast_seconds", "", buckets=(0.1, 1.0), registry=registry)
    loop = LoopHistogram(fast)
    for value in (0.0, 0.1, 0.10001, 1.0, 5.0):
        plain.observe(value)
        loop.observe(value)
    for le in ("0.1", "1.0", "+Inf"):
        assert registry.get_sample_value("fast_seconds_bucket", {"le": le}) == (
            registry.get_sample_value("plain_seconds_bucket", {"le": le})
        )
    assert registry.get_sample_value("fast_seconds_sum") == pytest.approx(6.20001)
    for _ in range(3):  # a group of operations timed together is one call with a count
        plain.observe(0.5)
    loop.observe(0.5, 3)
    for le in ("0.1", "1.0", "+Inf"):
        assert registry.get_sample_value("fast_seconds_bucket", {"le": le}) == (
            registry.get_sample_value("plain_seconds_bucket", {"le": le})
        )
    assert registry.get_sample_value("fast_seconds_sum") == pytest.approx(7.70001)
    counter = Counter("things", "", ["kind"], registry=registry)
    value = loop_value(counter.labels("a"))
    assert loop_value(counter.labels("a")) is value  # one value object per child
    value.inc()
    value.inc(2.5)
    counter.labels("a").inc()  # prometheus-client's own inc lands in the same value
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 4.5
    metrics = Metrics()
    metrics.sent.count("reply", 40)
    metrics.sent.count("reply", 2)
    assert metrics.frames_sent.labels("reply")._value.get() == 2
    assert metrics.registry.get_sample_value("pushsvc_sent_bytes_total", {"type": "reply"}) == 42


def test_the_locked_fallback_counts_through_prometheus_client() -> None:
    """If prometheus-client's internals move, the per-message series still count (locked)."""
    from prometheus_client import Counter, Histogram

    from pushsvc.ops.metrics import LOCKLESS, _LockedHistogram, _LockedValue

    assert LOCKLESS  # the prometheus-client installed here keeps values where assumed
    registry = CollectorRegistry()
    counter = Counter("things", "", ["kind"], registry=registry)
    histogram = Histogram("took_seconds", "", buckets=(1.0,), registry=registry)
    value = _LockedValue(counter.labels("a"))
    value.inc()
    value.inc(2.0)
    value.amount += 1  # what the hot paths write goes through prometheus-client too
    _LockedHistogram(histogram).observe(0.5)
    _LockedHistogram(histogram).observe(0.5, 2)
    assert value.get() == value.amount == 4.0
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 4.0
    assert registry.get_sample_value("took_seconds_bucket", {"le": "1.0"}) == 3
