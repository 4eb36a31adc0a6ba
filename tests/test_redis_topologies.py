"""Redis topologies beyond one server: Sentinel failover (a real master, replica, sentinels).

The test starts its own ``redis-server`` processes (tests/redis_server.py): a
master, a replica and three sentinels; the failover is a ``kill -9`` of the
master. pushsvc reaches Redis only through ``redis+sentinel://`` URLs, with
``min_replicas=1`` on the store so that what it reports accepted is on the
replica before the answer (``WAIT``), and therefore survives the failover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from conftest import Server
from pushsvc import redisurl
from redis_server import RedisSentinelSetup

pytestmark = pytest.mark.slow

#: Seconds from the master's death to every check passing again (docs/redis.md):
#: the sentinels' down-after (1 s here) and election, then the broker's reconnect.
FAILOVER_BOUND = 30.0


async def ready(server: Server) -> bool:
    response = await AsyncHTTPClient().fetch(
        server.base + "/readyz", raise_error=False, request_timeout=5
    )
    return response.code == 200


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def test_sentinel_urls_are_parsed_and_checked() -> None:
    target = redisurl.parse_sentinel(
        "redis+sentinel://:pw@a:26379,b:26380,[::1]/mymaster/2?socket_keepalive=true", "store.url"
    )
    assert target.sentinels == [("a", 26379), ("b", 26380), ("::1", 26379)]
    assert (target.master, target.db, target.password, target.tls) == ("mymaster", 2, "pw", False)
    assert redisurl.redacted("redis+sentinel://:pw@a:1/m") == "redis+sentinel://:***@a:1/m"
    for bad in ("redis+sentinel://a:1/", "redis+sentinel://a:1/m/x", "redis+sentinel://a:x/m"):
        with pytest.raises(ValueError, match=r"broker\.url"):
            redisurl.check_path(bad, "broker.url")


async def test_sentinel_failover_loses_nothing_accepted_and_recovers_by_itself(
    start_server: Callable[..., Any], redis_sentinel: RedisSentinelSetup
) -> None:
    url = redis_sentinel.url
    server: Server = await start_server(
        store={"url": f"{url}?min_replicas=1&replica_timeout=2", "busy_timeout": 2.0},
        broker={"url": url, "timeout": 1.0},
        delivery={"ack_timeout": 30.0},
    )
    bob = await server.connect("bob")
    for n in range(5):  # carol is offline: these wait in Redis, on master and replica
        code, body, _ = await server.http(
            "POST", "/api/v1/notify", {"to": "carol", "title": f"t{n}", "message": "m"}
        )
        assert code == 202, body

    redis_sentinel.failover()  # kill -9 of the master; the replica is promoted
    # Until a replica confirms writes again, the store refuses (min_replicas=1) rather
    # than report accepted what one more failover could lose.
    code, _, headers = await server.http(
        "POST", "/api/v1/notify", {"to": "carol", "title": "lost?", "message": "m"}
    )
    assert code == 503 and "Retry-After" in headers
    redis_sentinel.master.start()  # back as a replica of the new master (the sentinels)
    took = await until(lambda: ready(server), FAILOVER_BOUND, "ready after the failover")
    assert took < FAILOVER_BOUND
    assert bob.close_code is None  # the connection stayed open through the failover

    carol = await server.connect("carol")
    titles = []
    for _ in range(5):
        frame = await carol.recv_type("notification", timeout=10)
        titles.append(frame["title"])
        await carol.send({"type": "ack", "id": frame["id"]})
    assert titles == [f"t{n}" for n in range(5)]

    code, _, _ = await server.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "after", "message": "m"}
    )
    assert code == 202
    assert (await bob.recv_type("notification", timeout=10))["title"] == "after"
    await carol.send({"type": "chat", "text": "on the new master", "ref": "c"})
    assert (await bob.recv_type("chat", timeout=10))["text"] == "on the new master"


async def test_without_a_replica_the_store_refuses_instead_of_reporting_accepted(
    start_server: Callable[..., Any], redis_sentinel: RedisSentinelSetup
) -> None:
    server: Server = await start_server(
        store={"url": f"{redis_sentinel.url}?min_replicas=1&replica_timeout=0.3"},
        broker={"url": redis_sentinel.url},
    )
    code, _, _ = await server.http(
        "POST", "/api/v1/notify", {"to": "carol", "title": "t", "message": "m"}
    )
    assert code == 202
    redis_sentinel.replica.kill9()  # min_replicas=1 cannot be met any more
    code, body, headers = await server.http(
        "POST", "/api/v1/notify", {"to": "carol", "title": "t", "message": "m"}
    )
    assert code == 503 and "Retry-After" in headers, (code, body)
