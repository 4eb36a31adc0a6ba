"""The push subscription contract: :class:`pushsvc.store.PushSubscriptionStore`, per store.

Each test runs once per entry of ``PUSH_IMPLEMENTATIONS`` (the store
implementations of ``test_store_contract.py`` that keep push subscriptions)
through the Protocol's methods only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from test_store_contract import REDIS, REDIS_CLUSTER, SQLITE, Implementation

from pushsvc.store import (
    PushSubscription,
    PushSubscriptionStore,
    Store,
    StoreUnavailable,
    make_store,
)
from redis_server import strict_slots

#: Store implementations with push subscriptions; the next one is one more entry.
PUSH_IMPLEMENTATIONS = [SQLITE, REDIS, REDIS_CLUSTER]
P256DH = "B" + "A" * 86  # the store keeps keys as given: no decoding here
AUTH = "A" * 22


class Both(Store, PushSubscriptionStore):
    """What the tests hold: a store with push subscriptions (for typing only)."""


Open = Callable[[], Awaitable[Both]]


@pytest.fixture(params=PUSH_IMPLEMENTATIONS, ids=lambda impl: impl.name)
def impl(request: pytest.FixtureRequest) -> Implementation:
    implementation: Implementation = request.param
    return implementation


@pytest.fixture
def url(impl: Implementation, request: pytest.FixtureRequest) -> str:
    return impl.url(request.getfixturevalue(impl.fixture))


@pytest.fixture
async def open_store(
    impl: Implementation, url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Open]:
    opened: list[Store] = []
    if impl.strict_slots:
        strict_slots(monkeypatch)

    async def open_() -> Both:
        store = make_store(url, impl.options)
        await store.open()
        opened.append(store)
        assert isinstance(store, PushSubscriptionStore)
        return store  # type: ignore[return-value]  # both Protocols, checked above

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: Open) -> Both:
    return await open_store()


def sub(user: str, n: int, *, auth: str = AUTH, at: float | None = None) -> PushSubscription:
    return PushSubscription(
        user, f"https://push.example/{n}", P256DH, auth, time.time() if at is None else at
    )


async def endpoints(store: PushSubscriptionStore, user: str) -> list[str]:
    return [s.endpoint for s in await store.push_subscriptions(user)]


async def test_several_per_user_oldest_first_and_counted(store: PushSubscriptionStore) -> None:
    now = time.time()
    assert await store.add_push_subscription(sub("ann", 2, at=now + 1), 10) == "created"
    assert await store.add_push_subscription(sub("ann", 1, at=now), 10) == "created"
    assert await store.add_push_subscription(sub("bob", 3, at=now), 10) == "created"
    assert await endpoints(store, "ann") == ["https://push.example/1", "https://push.example/2"]
    assert await endpoints(store, "bob") == ["https://push.example/3"]
    assert await endpoints(store, "carol") == []
    assert await store.count_push_subscriptions() == 3
    (first, _second) = await store.push_subscriptions("ann")
    assert first == sub("ann", 1, at=now)  # every field comes back as stored


async def test_the_same_endpoint_is_updated_not_duplicated(store: PushSubscriptionStore) -> None:
    assert await store.add_push_subscription(sub("ann", 1), 10) == "created"
    assert await store.add_push_subscription(sub("ann", 1, auth="B" * 22), 10) == "updated"
    (only,) = await store.push_subscriptions("ann")
    assert only.auth == "B" * 22
    assert await store.count_push_subscriptions() == 1


async def test_the_cap_refuses_new_endpoints_but_not_updates(store: PushSubscriptionStore) -> None:
    for n in range(3):
        assert await store.add_push_subscription(sub("ann", n), 3) == "created"
    assert await store.add_push_subscription(sub("ann", 9), 3) == "limit"
    assert await store.add_push_subscription(sub("ann", 0, auth="C" * 22), 3) == "updated"
    assert len(await endpoints(store, "ann")) == 3
    assert "https://push.example/9" not in await endpoints(store, "ann")


async def test_an_endpoint_moves_to_the_user_who_subscribes_it(
    store: PushSubscriptionStore,
) -> None:
    """One browser profile, another user logged in: the old user stops getting its pushes."""
    await store.add_push_subscription(sub("ann", 1), 10)
    assert await store.add_push_subscription(sub("bob", 1), 10) == "created"
    assert await endpoints(store, "ann") == []
    assert await endpoints(store, "bob") == ["https://push.example/1"]
    await store.add_push_subscription(sub("carol", 2), 1)
    assert await store.add_push_subscription(sub("carol", 1), 1) == "limit"  # carol is full
    assert await endpoints(store, "bob") == ["https://push.example/1"]


async def test_remove_only_the_users_own(store: PushSubscriptionStore) -> None:
    await store.add_push_subscription(sub("ann", 1), 10)
    assert await store.remove_push_subscription("bob", "https://push.example/1") is False
    assert await store.remove_push_subscription("ann", "https://push.example/1") is True
    assert await store.remove_push_subscription("ann", "https://push.example/1") is False
    assert await store.count_push_subscriptions() == 0


async def test_subscriptions_survive_a_restart(store: Both, open_store: Open) -> None:
    await store.add_push_subscription(sub("ann", 1), 10)
    await store.close()
    again = await open_store()
    assert await endpoints(again, "ann") == ["https://push.example/1"]


async def test_refused_while_the_storage_is_out(
    store: PushSubscriptionStore, impl: Implementation, url: str
) -> None:
    with impl.outage(url):
        with pytest.raises(StoreUnavailable):
            await store.add_push_subscription(sub("ann", 1), 10)
    assert await endpoints(store, "ann") == []
