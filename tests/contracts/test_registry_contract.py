"""The cluster registry contract: caps and presence, for every registry implementation.

Each test runs once per entry of ``REGISTRIES`` (id -> how to get a
``cluster.url``) and uses only the :class:`pushsvc.cluster.Registry`
protocol, built by ``make_registry``. What needs several nodes (sharing,
liveness, outages) is Redis-only and lives in ``tests/test_cluster_redis.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pushsvc.cluster import Registry, RegistryOptions, make_registry

#: Every registry implementation: id -> the url, given the test's fixtures.
REGISTRIES: dict[str, Callable[[pytest.FixtureRequest], str]] = {
    "memory": lambda request: "memory://",
    "redis": lambda request: str(request.getfixturevalue("redis_url")),
}

OPTIONS = RegistryOptions(node_ttl=5.0, timeout=2.0)


@pytest.fixture(params=sorted(REGISTRIES))
def url(request: pytest.FixtureRequest) -> str:
    return REGISTRIES[request.param](request)


@pytest.fixture
async def open_registry(url: str) -> AsyncIterator[Callable[[], Awaitable[Registry]]]:
    """Start registries on the test's url (each a node); all are closed at teardown."""
    started: list[Registry] = []

    async def open_() -> Registry:
        registry = make_registry(url, OPTIONS)
        await registry.start()
        started.append(registry)
        return registry

    yield open_
    for registry in started:
        await registry.close()


@pytest.fixture
async def registry(open_registry: Callable[[], Awaitable[Registry]]) -> Registry:
    return await open_registry()


async def test_healthy_from_start_to_close(
    open_registry: Callable[[], Awaitable[Registry]],
) -> None:
    registry = await open_registry()
    assert registry.healthy()
    assert registry.node_id
    await registry.close()
    assert not registry.healthy()


async def test_reserve_counts_up_to_the_limit(registry: Registry) -> None:
    assert await registry.reserve_user("alice", "c1", 2)
    assert await registry.reserve_user("alice", "c2", 2)
    assert not await registry.reserve_user("alice", "c3", 2)
    assert await registry.reserve_user("bob", "c3", 2)  # per user


async def test_reserve_is_idempotent_for_one_connection(registry: Registry) -> None:
    assert await registry.reserve_user("alice", "c1", 1)
    assert await registry.reserve_user("alice", "c1", 1)  # counted once
    assert not await registry.reserve_user("alice", "c2", 1)


async def test_release_frees_a_slot(registry: Registry) -> None:
    assert await registry.reserve_user("alice", "c1", 1)
    await registry.release_user("alice", "c1")
    await registry.release_user("alice", "c1")  # again: nothing to do
    assert await registry.reserve_user("alice", "c2", 1)
    assert not await registry.reserve_user("alice", "c3", 1)


async def test_room_users_are_distinct_and_sorted(registry: Registry) -> None:
    assert await registry.room_users("r") == []
    await registry.joined("r", "carol", "s1")
    await registry.joined("r", "alice", "s2")
    await registry.joined("r", "alice", "s3")  # a second connection of alice
    await registry.joined("other", "bob", "s4")
    assert await registry.room_users("r") == ["alice", "carol"]
    await registry.left("r", "alice", "s2")
    assert await registry.room_users("r") == ["alice", "carol"]
    await registry.left("r", "alice", "s3")
    await registry.left("r", "alice", "s3")  # again: nothing to do
    assert await registry.room_users("r") == ["carol"]
    assert await registry.room_users("other") == ["bob"]


async def test_room_users_limit_says_too_many(registry: Registry) -> None:
    for number in range(5):
        await registry.joined("r", f"user{number}", f"s{number}")
    assert len(await registry.room_users("r", 2)) > 2
    assert await registry.room_users("r", 5) == [f"user{n}" for n in range(5)]
    assert await registry.room_users("r", 0) != []  # more than none


async def test_online_tells_who_has_a_connection(registry: Registry) -> None:
    assert await registry.online([]) == set()
    assert await registry.reserve_user("alice", "c1", 5)
    assert await registry.reserve_user("alice", "c2", 5)
    assert await registry.reserve_user("a}b{", "c3", 5)
    await registry.joined("r", "bob", "s1")  # a member without a counted connection: not online
    many = [f"user{n}" for n in range(2500)]  # more than one pipeline's worth
    assert await registry.online(["alice", "bob", "a}b{", "alice", *many]) == {"alice", "a}b{"}
    await registry.release_user("alice", "c1")
    assert await registry.online(["alice"]) == {"alice"}  # c2 still counts
    await registry.release_user("alice", "c2")
    assert await registry.online(["alice", "a}b{"]) == {"a}b{"}


async def test_online_sees_the_other_nodes(
    open_registry: Callable[[], Awaitable[Registry]], url: str
) -> None:
    if url.startswith("memory://"):
        pytest.skip("memory:// is one node")
    here, there = await open_registry(), await open_registry()
    assert await there.reserve_user("alice", "c1", 1)
    assert await here.online(["alice", "bob"]) == {"alice"}
    await there.close()  # a clean shutdown removes its connections at once
    assert await here.online(["alice"]) == set()


async def test_names_with_hash_tag_characters(registry: Registry) -> None:
    await registry.joined("{r}:x", "a}b{", "s1")
    assert await registry.room_users("{r}:x") == ["a}b{"]
    assert await registry.room_users("{r}") == []
    assert await registry.reserve_user("a}b{", "c1", 1)
    assert not await registry.reserve_user("a}b{", "c2", 1)


async def test_close_removes_this_nodes_entries(
    open_registry: Callable[[], Awaitable[Registry]],
) -> None:
    first = await open_registry()
    await first.joined("r", "alice", "s1")
    assert await first.reserve_user("alice", "c1", 1)
    await first.close()
    second = await open_registry()
    assert await second.room_users("r") == []
    assert await second.reserve_user("alice", "c1", 1)


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cluster\.url"):
        make_registry("etcd://localhost")
