"""At-least-once delivery: the pure retry policy and ack tracker, then everything over sockets.

Sockets, SQLite and the plugins are real; the timers are short (``ack_timeout``
0.2 s) so retries and dead letters happen within a second or two.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pushsvc_poke
import pytest

from conftest import Client, Server
from pushsvc import Guarantee, hookimpl
from pushsvc.core.session import Session
from pushsvc.delivery.tracker import AckTracker, RetryPolicy
from pushsvc.protocol import frames, ids

#: Short timers: resend after ~0.2 s, then ~0.4 s, dead after the 3rd send (~1.4 s in all).
FAST = {"ack_timeout": 0.2, "max_attempts": 3, "backoff_max": 1.0}
#: Rate limits out of the way for tests that send many frames.
OPEN_LIMITS = {"rate": 1e6, "burst": 1e6, "user_rate": 1e6, "user_burst": 1e6}
TICK = 0.05  # the delivery timer's period (pushsvc.app)
SLACK = 0.15  # scheduling slack on top of a timer


# -- pure parts -----------------------------------------------------------------------


def test_retry_policy_doubles_and_caps() -> None:
    policy = RetryPolicy(ack_timeout=1.0, max_attempts=8, backoff_max=10.0)
    middle = [policy.delay(attempt, rand=lambda: 0.5) for attempt in range(1, 8)]
    assert middle == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert policy.delay(0, rand=lambda: 0.5) == 1.0  # never below the ack timeout's base


def test_retry_policy_jitter_bounds() -> None:
    policy = RetryPolicy(ack_timeout=1.0, max_attempts=8, backoff_max=10.0, jitter=0.2)
    assert policy.delay(2, rand=lambda: 0.0) == pytest.approx(1.6)
    assert policy.delay(2, rand=lambda: 1.0) == pytest.approx(2.4)
    assert policy.delay(5, rand=lambda: 1.0) == 10.0  # jitter never passes the cap
    assert policy.delay(5, rand=lambda: 0.0) == pytest.approx(8.0)
    source = random.Random(7)
    for attempt in range(1, 10):
        base = min(10.0, 2.0 ** (attempt - 1))
        for _ in range(200):
            delay = policy.delay(attempt, rand=source.random)
            assert 0.8 * base - 1e-9 <= delay <= min(10.0, 1.2 * base) + 1e-9


def test_ack_tracker_window_cursor_settle() -> None:
    tracker = AckTracker(window=2)
    assert tracker.room() == 2 and tracker.backlog and not tracker.can_send_live()
    tracker.backlog = False
    assert tracker.can_send_live()
    tracker.sent("B", "private", b"b", 1, now=10.0, due=11.0)
    tracker.sent("A", "private", b"a", 1, now=10.5, due=11.5)
    assert tracker.cursor == "B"  # the cursor only moves up
    assert tracker.room() == 0 and not tracker.can_send_live()
    tracker.sent("B", "private", b"b", 2, now=11.0, due=13.0)  # a resend
    entry = tracker.inflight["B"]
    assert (entry.attempts, entry.sent_at, entry.first_sent_at, entry.due) == (2, 11.0, 10.0, 13.0)
    assert list(tracker.inflight) == ["B", "A"]
    assert tracker.settle("B") is entry
    assert tracker.settle("B") is None  # settling twice is harmless
    assert tracker.room() == 1 and tracker.can_send_live()
    tracker.refilling = True
    assert not tracker.can_send_live()  # a store read is running: order stays by id


# -- helpers --------------------------------------------------------------------------


class DeadRecorder:
    """A plugin registered through ``load_plugins(extra=...)``: records dead letters."""

    def __init__(self) -> None:
        self.dead: list[tuple[str, str, str, float]] = []  # (user, id, reason, monotonic)

    @hookimpl
    def pushsvc_dead_lettered(self, user: str, message: dict[str, Any], reason: str) -> None:
        self.dead.append((user, message["id"], reason, time.monotonic()))


@pytest.fixture
def start_with(start_server: Callable[..., Any]) -> Callable[..., Any]:
    """``start_server`` with extra plugins first: ``start_with([(name, plugin)], ...)``."""

    async def start(extra: list[tuple[str, object]], **sections: dict[str, Any]) -> Server:
        server: Server = await start_server(extra=extra, **sections)
        return server

    return start


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample of the server's registry (0 when absent)."""
    value = server.node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def answer(client: Client, ref: str, timeout: float = 5.0) -> dict[str, Any]:
    """The ``reply`` or ``error`` for ``ref`` (other frames are skipped)."""
    while True:
        frame = await client.recv_type("reply", "error", timeout=timeout)
        if frame.get("ref") == ref:
            return frame


async def send_private(client: Client, to: str, text: str, ref: str) -> str:
    """Send a ``private`` frame and return the id of its ``reply ok``."""
    await client.send({"type": "private", "to": to, "text": text, "ref": ref})
    reply = await answer(client, ref)
    assert reply["type"] == "reply" and reply["ok"] is True, reply
    message_id: str = reply["id"]
    return message_id


async def ack(client: Client, message_ids: list[str], ref: str) -> dict[str, Any]:
    """Ack ``message_ids`` and return the answer."""
    await client.send({"type": "ack", "ids": message_ids, "ref": ref})
    return await answer(client, ref)


def sessions(server: Server, user: str) -> list[Session]:
    """The live sessions of ``user`` on the server."""
    return [client for client in server.node.hub.user_clients(user) if isinstance(client, Session)]


# -- behaviour over sockets -------------------------------------------------------------


async def test_offline_recipient_gets_stored_messages_in_order(start_server: Any) -> None:
    server: Server = await start_server(delivery={"ack_timeout": 5.0})
    sender = await server.connect("sam")
    sent = [await send_private(sender, "rita", f"m{i}", f"r{i}") for i in range(5)]
    assert sent == sorted(sent) and len(set(sent)) == 5
    rita = await server.connect("rita")
    frames = [await rita.recv_type("private") for _ in sent]
    assert [f["id"] for f in frames] == sent  # oldest first, ids unchanged
    assert [f["text"] for f in frames] == [f"m{i}" for i in range(5)]
    assert all(f["ack"] is True and f["from"] == "sam" and f["to"] == "rita" for f in frames)
    assert (await ack(rita, sent, "a"))["acked"] == 5
    assert metric(server, "pushsvc_messages_acked_total", type="private") == 5
    rita.close()
    await asyncio.sleep(0.1)
    again = await server.connect("rita")
    await again.expect_nothing(0.5)


async def test_two_connections_both_get_it_one_ack_settles_both(start_server: Any) -> None:
    server: Server = await start_server(delivery={**FAST, "max_attempts": 5})
    phone = await server.connect("dora")
    laptop = await server.connect("dora")
    sender = await server.connect("sam")
    message_id = await send_private(sender, "dora", "hello", "s")
    for client in (phone, laptop):
        frame = await client.recv_type("private")
        assert frame["id"] == message_id and frame["ack"] is True
    assert (await ack(phone, [message_id], "a1"))["acked"] == 1
    # Resends would come at ~0.2, 0.6, 1.4 s: neither connection gets one.
    await asyncio.gather(
        phone.expect_nothing(1.6, ignore=("reply",)), laptop.expect_nothing(1.6, ignore=("reply",))
    )
    assert (await ack(laptop, [message_id], "a2"))["acked"] == 0  # repeated: ignored
    assert metric(server, "pushsvc_acks_ignored_total", reason="repeated") == 1
    assert metric(server, "pushsvc_messages_redelivered_total", type="private") == 0


async def test_resend_timers_follow_what_is_in_flight(start_server: Any) -> None:
    """An ack of one message keeps the other's resend; a new message re-arms the pass."""
    server: Server = await start_server(delivery={**FAST, "max_attempts": 5})
    dora = await server.connect("dora")
    sender = await server.connect("sam")
    first = await send_private(sender, "dora", "one", "s1")
    second = await send_private(sender, "dora", "two", "s2")
    got = [(await dora.recv_type("private"))["id"] for _ in range(2)]
    assert got == [first, second]
    assert (await ack(dora, [first], "a1"))["acked"] == 1
    resent = await dora.recv_type("private", timeout=3)  # ack_timeout 0.2 s, jitter 20 %
    assert resent["id"] == second
    assert server.node.delivery._timer is not None  # second is still in flight
    assert (await ack(dora, [second], "a2"))["acked"] == 1
    delivery = server.node.delivery
    deadline = time.monotonic() + 1  # an async broker settles on a later loop pass
    while any(delivery._slots.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not any(delivery._slots.values())  # an ack takes its timer out of the wheel
    await dora.expect_nothing(1.0, ignore=("reply",))
    assert delivery._timer is None  # nothing left in flight: the pass did not re-arm
    third = await send_private(sender, "dora", "three", "s3")
    assert (await dora.recv_type("private"))["id"] == third
    assert (await dora.recv_type("private", timeout=3))["id"] == third  # armed again


async def test_never_acking_client_backs_off_then_dead_letter(start_with: Any) -> None:
    recorder = DeadRecorder()
    server: Server = await start_with([("recorder", recorder)], delivery=FAST)
    mute = await server.connect("mute")
    sender = await server.connect("sam")
    message_id = await send_private(sender, "mute", "are you there?", "s")
    times = []
    for _ in range(FAST["max_attempts"]):
        frame = await mute.recv_type("private", timeout=3)
        assert frame["id"] == message_id  # a resend keeps its id
        times.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    ack_timeout = FAST["ack_timeout"]
    for attempt, gap in enumerate(gaps, start=1):
        base = ack_timeout * 2 ** (attempt - 1)
        assert 0.8 * base - TICK <= gap <= 1.2 * base + SLACK, gaps
    assert 1.2 < gaps[1] / gaps[0] < 3.5, gaps  # roughly doubles
    # After the last send's wait (~0.8 s) the message is dead: hook, metric, store.
    deadline = time.monotonic() + 3
    while not recorder.dead and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert [d[:3] for d in recorder.dead] == [("mute", message_id, "max_attempts")]
    assert recorder.dead[0][3] - times[-1] >= 0.8 * 4 * ack_timeout - TICK
    assert (
        metric(
            server, "pushsvc_messages_dead_lettered_total", type="private", reason="max_attempts"
        )
        == 1
    )
    assert [d.id for d in await server.node.store.dead_letters("mute", 10)] == [message_id]
    await mute.expect_nothing(1.5)  # nothing resent afterwards
    assert (await ack(mute, [message_id], "late"))["acked"] == 0  # too late to settle
    mute.close()
    again = await server.connect("mute")
    await again.expect_nothing(0.4)  # not pending any more


async def test_backoff_is_capped(start_server: Any) -> None:
    server: Server = await start_server(
        delivery={"ack_timeout": 0.1, "max_attempts": 5, "backoff_max": 0.25}
    )
    mute = await server.connect("mute")
    sender = await server.connect("sam")
    await send_private(sender, "mute", "x", "s")
    times = [time.monotonic()]
    await mute.recv_type("private")
    for _ in range(4):
        await mute.recv_type("private", timeout=2)
        times.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap <= 0.25 + SLACK for gap in gaps), gaps
    assert gaps[-1] >= 0.2 - TICK and gaps[-2] >= 0.2 - TICK, gaps  # 0.25 with -20 % jitter


async def test_bad_acks_settle_nothing_wrongly(start_server: Any) -> None:
    steady = {"ack_timeout": 0.3, "backoff_max": 0.3, "max_attempts": 50}
    server: Server = await start_server(
        delivery=steady, server={"max_message_bytes": 1_000_000}, ratelimit=OPEN_LIMITS
    )
    alice = await server.connect("alice")
    bob = await server.connect("bob")
    sender = await server.connect("sam")
    to_alice = await send_private(sender, "alice", "for alice", "s1")
    to_bob = await send_private(sender, "bob", "for bob", "s2")
    assert (await alice.recv_type("private"))["id"] == to_alice
    assert (await bob.recv_type("private"))["id"] == to_bob

    assert (await ack(alice, [ids.new_id()], "unknown"))["acked"] == 0
    assert (await ack(alice, [to_bob], "foreign"))["acked"] == 0
    assert (await ack(alice, ["not-an-id"], "garbage"))["acked"] == 0
    refused = {
        "many": ({"ids": [ids.new_id() for _ in range(10_000)]}, "ids: at most 1000 items"),
        "ints": ({"ids": [1, 2]}, "ids: every item must be a string"),
        "objs": ({"ids": [{"id": to_alice}]}, "ids: every item must be a string"),
        "int": ({"id": 5}, "id: must be a string"),
        "list": ({"ids": to_alice}, "ids: must be a list"),
        "long": ({"id": "x" * 65}, "id: at most 64 characters"),
        "none": ({}, "ack: needs id or ids"),
    }
    for ref, (fields, message) in refused.items():
        await alice.send({"type": "ack", "ref": ref, **fields})
        error = await answer(alice, ref)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        assert message in error["message"]
    await alice.send({"type": "ping", "ref": "still-open"})
    assert (await alice.recv_type("pong"))["ref"] == "still-open"
    assert metric(server, "pushsvc_acks_ignored_total", reason="unknown") == 2
    assert metric(server, "pushsvc_acks_ignored_total", reason="foreign") == 1
    # Nothing was settled: both recipients still get their resends.
    assert (await alice.recv_type("private", timeout=2))["id"] == to_alice
    assert (await bob.recv_type("private", timeout=2))["id"] == to_bob
    assert (await ack(bob, [to_bob, to_alice], "bob"))["acked"] == 1
    assert (await ack(alice, [to_alice, to_alice], "alice"))["acked"] == 1  # duplicates once
    assert (await ack(alice, [to_alice], "again"))["acked"] == 0
    await alice.expect_nothing(0.8, ignore=("reply",))
    await bob.expect_nothing(0.1, ignore=("reply",))


async def test_window_limits_in_flight_and_drains_in_order(start_server: Any) -> None:
    window, total, batch = 50, 1000, 25
    server: Server = await start_server(
        delivery={"window": window, "ack_timeout": 30.0}, ratelimit=OPEN_LIMITS
    )
    message = {"type": "private", "from": "sam", "to": "wendy", "text": "backlog"}
    results = await asyncio.gather(
        *(server.node.send(["wendy"], message, Guarantee.AT_LEAST_ONCE) for _ in range(total))
    )
    stored = sorted(result.id for result in results)
    wendy = await server.connect("wendy")
    (session,) = sessions(server, "wendy")
    received: list[str] = []
    acked = 0
    largest_window = 0
    checked_stop = False
    while len(received) < total:
        frame = await wendy.recv_type("private", timeout=5)
        received.append(frame["id"])
        assert len(received) - acked <= window  # the client never holds more than the window
        largest_window = max(largest_window, len(session.inflight.inflight))
        if len(received) - acked == window:
            if not checked_stop:  # the server stops at the window until something is acked
                await wendy.expect_nothing(0.3, ignore=("reply",))
                checked_stop = True
            await wendy.send({"type": "ack", "ids": received[acked : acked + batch]})
            acked += batch
    assert received == stored  # everything, once, oldest first
    assert largest_window == window
    assert (await ack(wendy, received[acked:], "rest"))["acked"] == total - acked
    assert len(session.inflight.inflight) == 0
    assert (await server.node.store.stats()).pending == 0


async def test_third_party_type_gets_at_least_once(start_server: Any) -> None:
    """``poke`` (tests/example_plugin, its own distribution) writes no storage code."""
    server: Server = await start_server(delivery=FAST)
    sender = await server.connect("sam")
    await sender.send({"type": "poke", "to": "pat", "emoji": "🦆", "ref": "p1"})
    first = (await answer(sender, "p1"))["id"]
    with sqlite3.connect(Path(server.node.config.server.data_dir) / "pushsvc.sqlite3") as db:
        assert db.execute("SELECT type FROM messages WHERE id = ?", (first,)).fetchone() == (
            "poke",
        )
    pat = await server.connect("pat")  # offline until now: delivered on connect
    poke = await pat.recv_type("poke")
    assert (poke["id"], poke["from"], poke["emoji"], poke["ack"]) == (first, "sam", "🦆", True)
    assert (await pat.recv_type("poke", timeout=2))["id"] == first  # resent, no ack
    pat.close()
    await asyncio.sleep(0.1)
    pat = await server.connect("pat")  # delivered again on reconnect, same id
    assert (await pat.recv_type("poke"))["id"] == first
    assert (await ack(pat, [first], "a"))["acked"] == 1
    await pat.expect_nothing(1.0, ignore=("reply",))
    # A poke nobody acks is dead-lettered, and the plugin's hook sees it.
    await sender.send({"type": "poke", "to": "pat", "ref": "p2"})
    second = (await answer(sender, "p2"))["id"]
    deadline = time.monotonic() + 4
    while ("pat", second, "max_attempts") not in pushsvc_poke.DEAD:
        assert time.monotonic() < deadline, pushsvc_poke.DEAD
        await asyncio.sleep(0.05)
    assert metric(server, "pushsvc_messages_acked_total", type="poke") == 1


async def test_ttl_dead_letters_offline_messages(start_with: Any) -> None:
    recorder = DeadRecorder()
    server: Server = await start_with([("recorder", recorder)], delivery={"ttl": 1.0})
    sender = await server.connect("sam")
    message_id = await send_private(sender, "otto", "too late", "s")
    await asyncio.sleep(1.1)
    await server.node.delivery.sweep()  # the 5-second timer, run now
    assert [d[:3] for d in recorder.dead] == [("otto", message_id, "ttl")]
    assert metric(server, "pushsvc_messages_dead_lettered_total", type="private", reason="ttl") == 1
    otto = await server.connect("otto")
    await otto.expect_nothing(0.4)


async def test_notification_api_persists_before_202(server: Server) -> None:
    status, body, _headers = await server.http(
        "POST", "/api/v1/notify", {"to": ["nina", "ned"], "title": "T", "message": "M"}
    )
    assert status == 202 and body["recipients"] == 2
    stats = await server.node.store.stats()
    assert stats.pending == 2
    nina = await server.connect("nina")
    frame = await nina.recv_type("notification")
    assert (frame["id"], frame["title"], frame["ack"]) == (body["id"], "T", True)


async def test_dead_letters_free_the_window_for_the_backlog(start_with: Any) -> None:
    """A client that never acks still sees the whole backlog, window by window."""
    recorder = DeadRecorder()
    server: Server = await start_with(
        [("recorder", recorder)],
        delivery={"ack_timeout": 0.2, "max_attempts": 1, "window": 5},
    )
    message = {"type": "private", "from": "sam", "to": "mute", "text": "x"}
    stored = sorted(
        [(await server.node.send(["mute"], message, Guarantee.AT_LEAST_ONCE)).id for _ in range(12)]
    )
    mute = await server.connect("mute")
    received = [(await mute.recv_type("private", timeout=3))["id"] for _ in stored]
    assert received == stored
    deadline = time.monotonic() + 3
    while len(recorder.dead) < len(stored) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert sorted(d[1] for d in recorder.dead) == stored
    await mute.expect_nothing(0.5)


async def test_ttl_is_enforced_between_sweeps(server: Server) -> None:
    """A notify with ``"ttl": 1`` is dead-lettered, not sent, to a user who connects 2 s later."""
    status, body, _headers = await server.http(
        "POST", "/api/v1/notify", {"to": ["late"], "title": "T", "message": "M", "ttl": 1}
    )
    assert status == 202
    await asyncio.sleep(1.5)  # well before the 5-second sweep
    late = await server.connect("late")
    await late.expect_nothing(0.5)
    status, dead, _headers = await server.http("GET", "/api/v1/users/late/dead-letters")
    assert status == 200
    assert [(m["id"], m["reason"]) for m in dead["messages"]] == [(body["id"], "ttl")]
    assert (
        metric(server, "pushsvc_messages_dead_lettered_total", type="notification", reason="ttl")
        == 1
    )


async def test_broker_gap_resync_sends_what_the_broker_lost_to_open_connections(
    server: Server,
) -> None:
    """``Node.on_broker_gap`` (the broker's gap callback) rereads every window from its start.

    The lost message is older than one delivered since, so a refill from the
    window's cursor would miss it: the resync rewinds.
    """
    bob = await server.connect("bob")
    deadline = time.monotonic() + 5
    while not any(  # registered, and the connect's own refill is over
        s.inflight is not None and not s.inflight.refilling for s in sessions(server, "bob")
    ):
        assert time.monotonic() < deadline, "bob's window never opened"
        await asyncio.sleep(0.01)
    lost_id, frame = frames.stamp({"type": "notification", "title": "T", "message": "lost"})
    frame["ack"] = True
    await server.node.store.accept(  # persisted, but its DURABLE envelope never published
        lost_id, "notification", frames.encode(frame), ["bob"], time.time() + 60
    )
    status, _body, _ = await server.http(
        "POST", "/api/v1/notify", {"to": ["bob"], "title": "T", "message": "later"}
    )
    assert status == 202
    assert (await bob.recv_type("notification"))["message"] == "later"
    await bob.expect_nothing(0.2, ignore=("presence",))
    server.node.on_broker_gap()
    got = await bob.recv_type("notification")
    assert (got["id"], got["message"]) == (lost_id, "lost")
    await bob.expect_nothing(0.2, ignore=("presence",))  # "later" is in flight: not resent
