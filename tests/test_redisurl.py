"""pushsvc.redisurl: every Redis URL form parsed and connected (real redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from pushsvc import redisurl
from redis_server import RedisClusterSetup


def test_cluster_url_is_parsed() -> None:
    target = redisurl.parse_cluster("rediss+cluster://app:s%40cret@a:7000,[::1]:7001,b", "k")
    assert target.nodes == [("a", 7000), ("::1", 7001), ("b", 6379)]
    assert (target.username, target.password, target.tls) == ("app", "s@cret", True)
    assert redisurl.where("redis+cluster://u:p@a:1,b:2") == "cluster via a:1,b:2"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://a:1,b:2/3", "only database 0"),
        ("redis+cluster://a:x", "bad cluster node address"),
    ],
)
def test_bad_cluster_urls_name_the_key(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"store\.url: .*{message}"):
        redisurl.check_path(url, "store.url")


def test_a_cluster_url_is_not_a_pool() -> None:
    with pytest.raises(ValueError, match=r"broker\.url: .*cluster_client"):
        redisurl.connection_pool("redis+cluster://a:1", key="broker.url")


def test_cluster_client_reaches_every_master(redis_cluster: RedisClusterSetup) -> None:
    async def scenario() -> list[bytes | None]:
        client = redisurl.cluster_client(redis_cluster.url, key="store.url")
        try:
            for tag in ("a", "b", "c", "d"):
                await client.set(f"{{{tag}}}:k", tag)
            return [await client.get(f"{{{tag}}}:k") for tag in ("a", "b", "c", "d")]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"a", b"b", b"c", b"d"]


def test_a_components_own_parameters_are_taken_out_once() -> None:
    url, given = redisurl.take_params(
        "redis://h:1/0?prefix=a:&socket_keepalive=true&partitions=8", ("prefix", "partitions"), "k"
    )
    assert (url, given) == (
        "redis://h:1/0?socket_keepalive=true",
        {"prefix": "a:", "partitions": "8"},
    )
    with pytest.raises(ValueError, match=r"store\.url: prefix given more than once"):
        redisurl.take_params("redis://h/0?prefix=a&prefix=b", ("prefix",), "store.url")
