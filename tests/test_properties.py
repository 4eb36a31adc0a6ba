"""Model-based (stateful) hypothesis tests of the pure cores against simple reference models.

``KeyedBuckets`` (the per-user, per-address and per-API-client token buckets)
is driven by random sequences of takes, clock advances, reloads and prunes,
and compared step by step with a model in exact fractions. ``AckTracker``
(a connection's in-flight window) by sends, resends and acks against plain
dicts; ``RetryPolicy``'s delays against their bounds; the hub's registry
(sessions, users, rooms, connection caps, broker subscriptions) by connects,
joins, leaves and disconnects against sets.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from pushsvc.auth.principal import Principal
from pushsvc.broker.memory import MemoryBroker
from pushsvc.cluster.memory import MemoryRegistry
from pushsvc.core.hub import Hub
from pushsvc.core.ratelimit import KeyedBuckets
from pushsvc.delivery.tracker import AckTracker, RetryPolicy
from pushsvc.ops.metrics import Metrics

NAMES = ["alice", "bob", "10.0.0.1"]
KEYS = st.sampled_from(NAMES)
USERS = st.sampled_from(["ann", "ben", "cid"])
ROOMS = st.sampled_from(["lobby", "team-red", "🙂"])
IDS = st.sampled_from([f"01M8C2GQWP5RHRSYT62N6MQSY{c}" for c in "0123456"])
POLICY = RetryPolicy(ack_timeout=10.0, max_attempts=8, backoff_max=300.0)
#: Float rounding may flip a decision that the model makes within this many tokens.
EPSILON = Fraction(1, 10**6)


class BucketModel(RuleBasedStateMachine):
    """``KeyedBuckets`` against a dict of exact token levels."""

    def __init__(self) -> None:
        super().__init__()
        self.rate, self.burst = Fraction(5), Fraction(10)
        self.buckets = KeyedBuckets(float(self.rate), float(self.burst))
        self.now = Fraction(1000)
        self.levels: dict[str, tuple[Fraction, Fraction]] = {}  # key -> (tokens, updated)

    def level(self, key: str) -> Fraction:
        tokens, updated = self.levels.get(key, (self.burst, self.now))
        return min(self.burst, tokens + (self.now - updated) * self.rate)

    @rule(seconds=st.fractions(min_value=0, max_value=5, max_denominator=1000))
    def advance(self, seconds: Fraction) -> None:
        self.now += seconds

    @rule(key=KEYS, cost=st.sampled_from([Fraction(1), Fraction(1, 10), Fraction(2)]))
    def take(self, key: str, cost: Fraction) -> None:
        level = self.level(key)
        wait = self.buckets.try_take(key, float(self.now), float(cost))
        if abs(level - cost) < EPSILON:
            self.levels[key] = (level - cost if wait == 0 else level, self.now)
            return  # on the boundary either answer is right
        if level >= cost:
            assert wait == 0, (level, cost, wait)
            self.levels[key] = (level - cost, self.now)
        else:
            assert wait > 0
            if self.rate > 0:
                expected = (cost - level) / self.rate
                assert abs(Fraction(wait) - expected) < Fraction(1, 1000), (wait, expected)
            else:
                assert wait == float("inf")
            self.levels[key] = (level, self.now)

    @rule(
        rate=st.sampled_from([Fraction(0), Fraction(1), Fraction(5), Fraction(50)]),
        burst=st.sampled_from([Fraction(1), Fraction(3), Fraction(10), Fraction(40)]),
    )
    def reload(self, rate: Fraction, burst: Fraction) -> None:
        for key in list(self.levels):
            self.levels[key] = (min(self.level(key), burst), self.now)
        self.rate, self.burst = rate, burst
        self.buckets.reconfigure(float(rate), float(burst), float(self.now))

    @rule()
    def prune(self) -> None:
        self.buckets.prune(float(self.now))
        for key in list(self.levels):
            if self.level(key) >= self.burst:
                del self.levels[key]  # a full bucket is the same as a new one
        assert len(self.buckets) <= len(self.levels)  # the full ones are gone

    @precondition(lambda self: self.rate > 0)
    @rule(key=KEYS)
    def waiting_the_answer_is_enough(self, key: str) -> None:
        wait = self.buckets.try_take(key, float(self.now), float(self.burst) * 2)
        assert wait > 0  # more than the capacity is never there
        level = self.level(key)
        self.levels[key] = (level, self.now)  # the key has a bucket now
        if level >= 1:
            return
        wait = self.buckets.try_take(key, float(self.now), 1.0)
        assert wait > 0
        later = self.now + Fraction(wait) + EPSILON
        assert self.buckets.try_take(key, float(later), 1.0) == 0
        self.levels[key] = (self.level_at(key, later) - 1, later)
        self.now = later

    def level_at(self, key: str, when: Fraction) -> Fraction:
        tokens, updated = self.levels.get(key, (self.burst, self.now))
        return min(self.burst, tokens + (when - updated) * self.rate)

    @invariant()
    def one_bucket_per_key_at_most(self) -> None:
        assert len(self.buckets) <= len(NAMES)


BucketModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestKeyedBuckets = BucketModel.TestCase


class TrackerModel(RuleBasedStateMachine):
    """``AckTracker`` (one connection's in-flight window) against plain dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = AckTracker(window=3)
        self.tracker.backlog = False
        self.now = 0.0
        self.model: dict[str, tuple[int, float]] = {}  # id -> (attempts, first sent)
        self.order: list[str] = []  # first-send order
        self.highest = ""

    @rule(seconds=st.floats(min_value=0, max_value=60))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(message_id=IDS)
    def send(self, message_id: str) -> None:
        if message_id not in self.model and len(self.model) >= 3:
            assert not self.tracker.can_send_live()  # the window is full
            return
        attempts = self.model.get(message_id, (0, self.now))[0] + 1
        due = self.now + POLICY.delay(attempts, lambda: 0.5)
        self.tracker.sent(message_id, "private", b"{}", attempts, self.now, due)
        first = self.model.get(message_id, (0, self.now))[1]
        if message_id not in self.model:
            self.order.append(message_id)
        self.model[message_id] = (attempts, first)
        self.highest = max(self.highest, message_id)

    @rule(message_id=IDS)
    def ack(self, message_id: str) -> None:
        settled = self.tracker.settle(message_id)
        assert (settled is not None) == (message_id in self.model)
        if message_id in self.model:
            attempts, first = self.model.pop(message_id)
            self.order.remove(message_id)
            assert settled is not None
            assert (settled.attempts, settled.first_sent_at) == (attempts, first)

    @invariant()
    def same_window(self) -> None:
        tracker = self.tracker
        assert list(tracker.inflight) == self.order  # send order, resends keep their place
        assert tracker.room() == 3 - len(self.model) >= 0
        assert tracker.can_send_live() == (len(self.model) < 3)
        assert tracker.cursor == self.highest  # the cursor only moves up
        for message_id, (attempts, first) in self.model.items():
            entry = tracker.inflight[message_id]
            assert (entry.attempts, entry.first_sent_at) == (attempts, first)
            assert entry.sent_at <= entry.due


TrackerModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestAckTracker = TrackerModel.TestCase


@settings(max_examples=300, deadline=None)
@given(attempts=st.integers(1, 40), rand=st.floats(0, 1))
def test_retry_delay_is_bounded_and_grows(attempts: int, rand: float) -> None:
    delay = POLICY.delay(attempts, lambda: rand)
    base = min(POLICY.backoff_max, POLICY.ack_timeout * 2.0 ** (attempts - 1))
    assert base * (1 - POLICY.jitter) - 1e-9 <= delay <= min(POLICY.backoff_max, base * 1.2) + 1e-9
    assert POLICY.delay(attempts + 1, lambda: 0.5) >= POLICY.delay(attempts, lambda: 0.5) or (
        POLICY.delay(attempts, lambda: 0.5) == POLICY.backoff_max
    )


class FakeClient:
    """What the hub needs of a connection, and nothing more."""

    def __init__(self, session: str, user: str) -> None:
        self.session = session
        self.principal = Principal(user, None, frozenset(), None, None)
        self.remote_ip = "10.0.0.1"
        self.rooms: set[str] = set()
        self.last_seen = 0.0
        self.closing = False

    def send_broadcast(self, broadcast: object) -> bool:
        return True


class NoDurable:
    def offer(self, client: object, envelope: object) -> None:
        pass

    def settled(self, client: object, message_ids: object) -> None:
        pass


class HubModel(RuleBasedStateMachine):
    """The hub's registry (sessions, users, rooms, caps, subscriptions) against sets."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.broker = MemoryBroker()
        self.cluster = MemoryRegistry()
        self.hub = Hub(self.broker, Metrics(CollectorRegistry()), NoDurable(), self.cluster)
        self.clients: dict[str, FakeClient] = {}  # open sessions
        self.reserved: dict[str, int] = {}  # user -> reservations
        self.serial = 0

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        self.loop.close()

    @rule(user=USERS)
    def connect(self, user: str) -> None:
        exceeded = self.run(self.hub.reserve(user, "10.0.0.1", max_per_user=3, max_per_ip=100))
        if self.reserved.get(user, 0) >= 3:
            assert exceeded == "per_user"
            return
        assert exceeded is None
        self.reserved[user] = self.reserved.get(user, 0) + 1
        self.serial += 1
        client = FakeClient(f"s{self.serial}", user)
        self.run(self.hub.add(client))  # type: ignore[arg-type]
        self.clients[client.session] = client

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        session = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients.pop(session)
        rooms = set(client.rooms)
        left = self.run(self.hub.remove(client))  # type: ignore[arg-type]
        assert set(left) == rooms
        self.run(self.hub.release(client.principal.user, client.remote_ip))
        self.reserved[client.principal.user] -= 1
        assert self.run(self.hub.remove(client)) == []  # a second remove is harmless

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), room=ROOMS)
    def join(self, data: st.DataObject, room: str) -> None:
        client = self.clients[data.draw(st.sampled_from(sorted(self.clients)))]
        was = room in client.rooms
        assert self.run(self.hub.join(client, room)) is not was  # type: ignore[arg-type]

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), room=ROOMS)
    def leave(self, data: st.DataObject, room: str) -> None:
        client = self.clients[data.draw(st.sampled_from(sorted(self.clients)))]
        was = room in client.rooms
        assert self.run(self.hub.leave(client, room)) is was  # type: ignore[arg-type]

    @invariant()
    def same_registry(self) -> None:
        hub = self.hub
        assert set(hub.sessions) == set(self.clients)
        users: dict[str, set[str]] = {}
        rooms: dict[str, set[str]] = {}
        for session, client in self.clients.items():
            users.setdefault(client.principal.user, set()).add(session)
            for room in client.rooms:
                rooms.setdefault(room, set()).add(session)
        assert {u: set(peers) for u, peers in hub.users.items()} == users  # no empty entries
        assert {r: set(members) for r, members in hub.rooms.items()} == rooms
        for room, members in rooms.items():
            users_in = {self.clients[s].principal.user for s in members}
            assert self.run(self.cluster.room_users(room)) == sorted(users_in)
        assert hub.reserved_users == {u: n for u, n in self.reserved.items() if n}
        channels = {f"user:{u}" for u in users} | {f"room:{r}" for r in rooms}
        assert self.broker._channels == channels  # subscribed exactly while someone is there


HubModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestHubRegistry = HubModel.TestCase
