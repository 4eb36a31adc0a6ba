"""Several ``pushsvc serve`` processes on one real ``redis-server``: one service.

Every node here is a real process with ``broker.url`` and ``store.url`` on
the Redis the test started (``fresh_redis``); clients connect to whichever
node they like, as behind a load balancer without sticky sessions. The
faults are real too: ``kill -9`` of a node, Redis stopped and started again
with ``appendonly yes``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import Client, ServerProcess, token
from redis_server import RedisServer

pytestmark = pytest.mark.slow


#: Fast timers, so the faults resolve within seconds.
FAST = {
    "PUSHSVC_DELIVERY__ACK_TIMEOUT": "1.0",
    "PUSHSVC_SERVER__HEARTBEAT": "25",
    "PUSHSVC_RATELIMIT__RATE": "1000",
    "PUSHSVC_RATELIMIT__BURST": "1000",
    "PUSHSVC_RATELIMIT__USER_RATE": "1000",
    "PUSHSVC_RATELIMIT__USER_BURST": "1000",
}

#: How long after Redis is back every node must be ready again (docs/redis.md).
RECOVERY_BOUND = 10.0


class Node:
    """One pushsvc process of the cluster, with client helpers."""

    def __init__(self, process: ServerProcess, name: str) -> None:
        self.process = process
        self.name = name

    async def connect(self, sub: str, **claims: Any) -> Client:
        conn = await websocket_connect(f"{self.process.ws_url}?access_token={token(sub, **claims)}")
        client = Client(conn)
        welcome = await client.recv()
        assert welcome is not None and welcome["type"] == "welcome", welcome
        client.welcome = welcome
        return client

    async def http(
        self, method: str, path: str, body: Any = None, scope: str = "publish"
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token('backend', scope=scope)}"}
        data = orjson.dumps(body) if body is not None else (b"{}" if method == "POST" else None)
        request = HTTPRequest(
            self.process.base + path, method=method, body=data, headers=headers, request_timeout=10
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        parsed = orjson.loads(response.body) if response.body else None
        return response.code, parsed, dict(response.headers)

    async def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples whose labels contain ``labels``."""
        response = await AsyncHTTPClient().fetch(self.process.base + "/metrics")
        assert response.code == 200
        total = 0.0
        for line in response.body.decode().splitlines():
            match = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
            if match and labels in (match.group(1) or ""):
                total += float(match.group(2))
        return total


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.1)


async def answer(client: Client, ref: str, timeout: float = 5.0) -> dict[str, Any]:
    """The ``reply`` or ``error`` for ``ref`` (other frames are skipped)."""
    while True:
        frame = await client.recv_type("reply", "error", timeout=timeout)
        if frame.get("ref") == ref:
            return frame


async def ready(node: Node) -> bool:
    try:
        response = await AsyncHTTPClient().fetch(node.process.base + "/readyz", request_timeout=3)
    except (HTTPClientError, OSError):
        return False
    return response.code == 200


@pytest.fixture
def cluster(
    tmp_path: Path, fresh_redis: RedisServer, spawn: Callable[..., ServerProcess]
) -> Callable[..., list[Node]]:
    """Start ``n`` nodes on the test's Redis (store and broker); all killed at teardown."""
    return node_starter(tmp_path, spawn, fresh_redis.url)


def node_starter(
    tmp_path: Path, spawn: Callable[..., ServerProcess], redis_url: str
) -> Callable[..., list[Node]]:
    """``start(n, env, first)``: ``n`` nodes with store and broker on ``redis_url``."""

    def start(n: int = 3, env: dict[str, str] | None = None, first: int = 0) -> list[Node]:
        full_env = {
            **FAST,
            "PUSHSVC_BROKER__URL": redis_url,
            "PUSHSVC_STORE__URL": redis_url,
            **(env or {}),
        }
        nodes = []
        for index in range(first, first + n):
            name = f"node{index}"
            process = spawn("--data-dir", str(tmp_path / name), env=full_env, name=name)
            nodes.append(Node(process, name))
        return nodes

    return start


# -- routing ----------------------------------------------------------------------


async def test_room_messages_reach_only_nodes_with_members(
    cluster: Callable[..., list[Node]],
) -> None:
    a, b, c = cluster(3)
    alice, bob = await a.connect("alice"), await b.connect("bob")
    carol = await c.connect("carol")  # in the lobby only (auto-join), never in "ops"
    for client, ref in ((alice, "j1"), (bob, "j2")):
        await client.send({"type": "join", "room": "ops", "ref": ref})
        assert (await answer(client, ref))["type"] == "reply"
    # The join events (lobby and ops, from three nodes, in no set order) must all have
    # arrived before the snapshot: wait for bob's ops join, then for the counts to settle.
    while True:
        presence = await alice.recv_type("presence")
        if (presence["room"], presence["event"], presence["user"]) == ("ops", "join", "bob"):
            break
    received = [await node.metric("pushsvc_broker_received_total") for node in (a, b, c)]
    while True:
        await asyncio.sleep(0.3)
        again = [await node.metric("pushsvc_broker_received_total") for node in (a, b, c)]
        if again == received:
            break
        received = again
    for n in range(20):
        await alice.send({"type": "chat", "room": "ops", "text": f"m{n}", "ref": f"c{n}"})
    texts = []
    while len(texts) < 20:
        frame = await bob.recv_type("chat")
        texts.append(frame["text"])
    assert texts == [f"m{n}" for n in range(20)]  # in order, once each, across nodes
    await asyncio.sleep(0.5)
    now = [await node.metric("pushsvc_broker_received_total") for node in (a, b, c)]
    # Probes are not counted (docs/operations.md): what each node took from Redis is
    # exactly the room's 20 messages where "ops" has a member, and none on node c.
    assert [after - before for before, after in zip(received, now, strict=True)] == [20, 20, 0]
    await carol.expect_nothing(0.2, ignore=("presence",))
    for client in (alice, bob, carol):
        client.close()


async def test_everything_works_across_nodes(cluster: Callable[..., list[Node]]) -> None:
    a, b, c = cluster(3)
    alice, bob = await a.connect("alice"), await b.connect("bob")

    # chat and presence: bob on b sees alice on a join and talk
    await bob.send({"type": "join", "room": "team", "ref": "jb"})
    await answer(bob, "jb")
    await alice.send({"type": "join", "room": "team", "ref": "ja"})
    joined = await answer(alice, "ja")
    assert joined.get("users") == ["alice", "bob"], joined  # presence from both nodes
    presence = await bob.recv_type("presence")
    assert (presence["event"], presence["user"]) == ("join", "alice")
    await alice.send({"type": "chat", "room": "team", "text": "hi", "ref": "c1"})
    assert (await bob.recv_type("chat"))["text"] == "hi"

    # private, at least once, acked on the other node
    await alice.send({"type": "private", "to": "bob", "text": "psst", "ref": "p1"})
    assert (await answer(alice, "p1"))["type"] == "reply"
    private = await bob.recv_type("private")
    assert private["text"] == "psst"
    await bob.send({"type": "ack", "id": private["id"]})

    # server API on a third node: notify and publish
    code, body, _ = await c.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
    )
    assert code == 202, body
    notification = await bob.recv_type("notification")
    assert notification["title"] == "t"
    await bob.send({"type": "ack", "id": notification["id"]})
    code, body, _ = await c.http("POST", "/api/v1/publish", {"room": "team", "text": "deploy"})
    assert code == 202, body
    assert (await alice.recv_type("chat"))["text"] == "deploy"
    assert (await bob.recv_type("chat"))["text"] == "deploy"

    # presence over the API on a node with no member at all
    code, body, _ = await c.http("GET", "/api/v1/rooms/team/presence")
    assert code == 200 and body["users"] == ["alice", "bob"], body

    # disconnect through node c closes bob on node b with 4003
    code, body, _ = await c.http("POST", "/api/v1/users/bob/disconnect", {"reason": "bye"})
    assert code in (200, 202), body
    assert await bob.closed() == 4003

    # a revocation stored through node a closes alice's connection there and is
    # refused by node c at the next handshake
    code, body, _ = await a.http("POST", "/api/v1/revocations", {"user": "alice"})
    assert code in (200, 201, 202), body
    assert await alice.closed() is not None
    with pytest.raises(HTTPClientError):
        await c.connect("alice", extra={"iat": int(time.time()) - 60})


async def test_ack_on_one_node_stops_resends_on_another(cluster: Callable[..., list[Node]]) -> None:
    a, b = cluster(2)
    on_a, on_b = await a.connect("bob"), await b.connect("bob")
    code, body, _ = await a.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
    )
    assert code == 202, body
    first_a, first_b = await on_a.recv_type("notification"), await on_b.recv_type("notification")
    assert first_a["id"] == first_b["id"]
    await on_a.send({"type": "ack", "id": first_a["id"]})
    # ack_timeout is 1 s: without the settle crossing nodes, b would resend within ~1.2 s
    await on_b.expect_nothing(2.5, ignore=("presence",))
    code, body, _ = await b.http("GET", "/api/v1/users/bob/pending")
    assert code == 200 and not body["messages"], body


async def test_per_user_connection_cap_holds_across_nodes(
    cluster: Callable[..., list[Node]],
) -> None:
    a, b, c = cluster(3, env={"PUSHSVC_RATELIMIT__MAX_CONNECTIONS_PER_USER": "2"})
    first, second = await a.connect("dave"), await b.connect("dave")
    with pytest.raises(HTTPClientError) as refused:
        await c.connect("dave")
    assert refused.value.code == 429
    first.close()
    await asyncio.sleep(0.3)
    third = await c.connect("dave")  # a slot is free again, cluster-wide
    for client in (second, third):
        client.close()


# -- faults -----------------------------------------------------------------------


async def test_node_killed_its_users_reconnect_elsewhere_and_get_everything(
    cluster: Callable[..., list[Node]],
) -> None:
    a, b, c = cluster(3)
    bob = await a.connect("bob")
    code, _, _ = await b.http("POST", "/api/v1/notify", {"to": "bob", "title": "1", "message": "m"})
    assert code == 202
    unacked = await bob.recv_type("notification")  # received, not acked: must come again
    a.process.kill9()
    await bob.closed()  # returns once closed; no close code, the node died
    code, _, _ = await b.http("POST", "/api/v1/notify", {"to": "bob", "title": "2", "message": "m"})
    assert code == 202  # while bob is offline
    again = await c.connect("bob")
    titles = []
    while len(titles) < 2:
        frame = await again.recv_type("notification")
        titles.append(frame["title"])
        await again.send({"type": "ack", "id": frame["id"]})
        if frame["title"] == "1":
            assert frame["id"] == unacked["id"]
    assert titles == ["1", "2"]
    await again.expect_nothing(1.5, ignore=("presence",))  # no duplicates after the acks


async def test_redis_down_refuses_clearly_then_everything_resumes(
    cluster: Callable[..., list[Node]], fresh_redis: RedisServer
) -> None:
    a, b = cluster(2)
    alice, bob = await a.connect("alice"), await b.connect("bob")
    code, _, _ = await a.http(
        "POST", "/api/v1/notify", {"to": "carol", "title": "before", "message": "m"}
    )
    assert code == 202  # carol is offline: it waits in Redis
    fresh_redis.command("CONFIG", "SET", "appendfsync", "always")
    fresh_redis.command("BGREWRITEAOF")
    await asyncio.sleep(1.5)  # everysec had its second before the setting changed
    fresh_redis.kill9()

    await wait_for(lambda: _not_ready(a), 10, "node a to report not ready")
    response = await _readyz(a)
    assert response[0] == 503
    assert set(response[1]["message"].split(": ", 1)[1].split(", ")) & {"broker", "store"}
    code, body, headers = await a.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "during", "message": "m"}
    )
    assert code == 503 and "Retry-After" in headers, (code, body)
    await alice.send({"type": "private", "to": "bob", "text": "during", "ref": "p1"})
    refused = await answer(alice, "p1", timeout=10)
    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
    assert "retry_after" in refused
    await alice.send({"type": "chat", "text": "during", "ref": "c1"})
    chat = await answer(alice, "c1", timeout=10)
    assert chat["type"] == "error" and chat["code"] == "unavailable", chat
    assert alice.close_code is None and bob.close_code is None  # live connections stay open

    fresh_redis.start()  # same port, same AOF
    started = time.monotonic()
    for node in (a, b):
        await wait_for(lambda node=node: ready(node), RECOVERY_BOUND, f"{node.name} ready again")
    recovered_in = time.monotonic() - started
    assert recovered_in < RECOVERY_BOUND

    await alice.send({"type": "private", "to": "bob", "text": "after", "ref": "p2"})
    assert (await answer(alice, "p2"))["type"] == "reply"
    assert (await bob.recv_type("private", timeout=10))["text"] == "after"
    carol = await b.connect("carol")
    kept = await carol.recv_type("notification")
    assert kept["title"] == "before"  # accepted before the crash, kept by the AOF
    assert await a.metric("pushsvc_broker_reconnects_total") >= 1


async def _readyz(node: Node) -> tuple[int, Any]:
    response = await AsyncHTTPClient().fetch(
        node.process.base + "/readyz", raise_error=False, request_timeout=5
    )
    return response.code, orjson.loads(response.body)


async def _not_ready(node: Node) -> bool:
    return (await _readyz(node))[0] == 503


async def test_pubsub_connection_killed_is_detected_and_repaired(
    cluster: Callable[..., list[Node]], fresh_redis: RedisServer
) -> None:
    a, b = cluster(2)
    alice, bob = await a.connect("alice"), await b.connect("bob")
    for client in (alice, bob):  # only members send to a room
        await client.send({"type": "join", "room": "r", "ref": "j"})
        await answer(client, "j")
    fresh_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_for(
        lambda: b.metric("pushsvc_broker_reconnects_total"), RECOVERY_BOUND, "b to resubscribe"
    )
    await wait_for(lambda: ready(b), RECOVERY_BOUND, "b ready")
    await alice.send({"type": "chat", "room": "r", "text": "still here", "ref": "c"})
    assert (await bob.recv_type("chat", timeout=10))["text"] == "still here"


# -- the demo command ----------------------------------------------------------------


async def test_cluster_demo_script_serves_one_service(tmp_path: Path) -> None:
    """``make cluster``'s script: three nodes behind a round-robin balancer on one Redis."""
    import shutil
    import socket
    import subprocess
    import sys

    from conftest import SECRET, free_port
    from redis_server import NO_REDIS

    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)

    def usable(port: int) -> bool:  # the balancer, its 3 nodes (+1..+3) and Redis (+100)
        try:
            for offset in (1, 2, 3, 100):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except (OSError, OverflowError):  # taken, or past 65535
            return False
        return True

    port = free_port()
    while not usable(port):
        port = free_port()
    state = tmp_path / "cluster"
    state.mkdir()
    (state / "jwt_secret").write_text(SECRET)
    script = Path(__file__).parent.parent / "contrib" / "cluster.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--nodes", "3", "--port", str(port), "--dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            lines.append(line)
            if "Ctrl-C" in line or not line:
                break
        assert any("round robin" in line for line in lines), "".join(lines)
        url = f"ws://127.0.0.1:{port}/ws"
        clients = []
        for name in ("u1", "u2", "u3"):
            conn = await websocket_connect(f"{url}?access_token={token(name)}")
            client = Client(conn)
            assert (await client.recv() or {}).get("type") == "welcome"
            clients.append(client)
        await clients[0].send({"type": "chat", "text": "over the balancer", "ref": "c"})
        for client in clients[1:]:  # on the two other nodes
            assert (await client.recv_type("chat"))["text"] == "over the balancer"
        for client in clients:
            client.close()
    finally:
        proc.terminate()
        proc.wait(60)


async def _presence_frames(client: Client, seconds: float) -> list[tuple[str, str, str]]:
    """The ``presence`` events arriving within ``seconds``, as (room, event, user)."""
    events = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await client.recv(left)
        except TimeoutError:
            break
        assert frame is not None, "the watcher was closed"
        if frame["type"] == "presence":
            events.append((frame["room"], frame["event"], frame["user"]))
    return events


async def test_a_killed_nodes_members_leave_presence_once_within_the_bound(
    cluster: Callable[..., list[Node]],
) -> None:
    node_ttl = 1.0
    bound = node_ttl + node_ttl / 3  # documented: node_ttl + one heartbeat (docs/redis.md)
    a, b, c = cluster(3, env={"PUSHSVC_CLUSTER__NODE_TTL": str(node_ttl)})
    wendy = await a.connect("wendy")  # every client auto-joins the lobby too
    await wendy.send({"type": "join", "room": "ops", "ref": "j"})
    await answer(wendy, "j")
    alice, bob_on_b, bob_on_c = (
        await b.connect("alice"),
        await b.connect("bob"),
        await c.connect("bob"),
    )
    for number, client in enumerate((alice, bob_on_b, bob_on_c)):
        await client.send({"type": "join", "room": "ops", "ref": f"j{number}"})
        await answer(client, f"j{number}")
    joins: list[tuple[str, str, str]] = []
    await wait_for(
        lambda: _collect(wendy, joins, 6), 10, "the joins of alice and bob in both rooms"
    )
    assert sorted(joins) == sorted(
        (room, "join", user)
        for room in ("lobby", "ops")
        for user in ("alice", "bob", "bob")  # one event per connection
    )

    b.process.kill9()  # no cleanup: the other nodes must notice the death
    killed = time.monotonic()
    first = await wendy.recv_type("presence", timeout=bound + 5)
    took = time.monotonic() - killed
    later = await _presence_frames(wendy, 2 * node_ttl)  # nothing else: bob is still on c
    assert sorted([(first["room"], first["event"], first["user"]), *later]) == [
        ("lobby", "leave", "alice"),
        ("ops", "leave", "alice"),
    ]
    assert took < bound + 1.0, f"the leave came {took:.2f} s after the kill (bound {bound:.2f} s)"
    code, body, _ = await a.http("GET", "/api/v1/rooms/ops/presence")
    assert (code, body) == (200, {"users": ["bob", "wendy"]})
    # each node tells its own members; bob, still connected on c, hears of alice only
    assert sorted(await _presence_frames(bob_on_c, 0.5)) == [
        ("lobby", "leave", "alice"),
        ("ops", "leave", "alice"),
    ]
    print(f"leave {took:.2f} s after kill -9 (bound {bound:.2f} s)")


async def _collect(client: Client, into: list[tuple[str, str, str]], count: int) -> bool:
    into.extend(await _presence_frames(client, 0.2))
    return len(into) >= count


# -- broker and registry on a Redis Cluster ---------------------------------------


@pytest.fixture
def sharded_cluster(
    tmp_path: Path,
    redis_cluster_url: str,
    spawn: Callable[..., ServerProcess],
) -> Callable[..., list[Node]]:
    """Nodes with the store, the broker and the registry on the session's 3-master
    Redis Cluster (``cluster.url`` defaults to ``broker.url``; docs/redis.md, "Redis
    Cluster")."""
    return node_starter(tmp_path, spawn, redis_cluster_url)


async def test_room_routing_on_a_redis_cluster(sharded_cluster: Callable[..., list[Node]]) -> None:
    await test_room_messages_reach_only_nodes_with_members(sharded_cluster)


async def test_everything_works_on_a_redis_cluster(
    sharded_cluster: Callable[..., list[Node]],
) -> None:
    await test_everything_works_across_nodes(sharded_cluster)


async def test_per_user_cap_on_a_redis_cluster(sharded_cluster: Callable[..., list[Node]]) -> None:
    await test_per_user_connection_cap_holds_across_nodes(sharded_cluster)


async def test_chat_and_durable_delivery_across_a_redis_cluster(
    sharded_cluster: Callable[..., list[Node]],
) -> None:
    """Chat, and offline messages to users whose keys live on every master."""
    a, b = sharded_cluster(2)
    alice, bob = await a.connect("alice"), await b.connect("bob")

    # chat with presence across nodes (sharded pub/sub on the room's slot)
    await bob.send({"type": "join", "room": "team", "ref": "jb"})
    await answer(bob, "jb")
    await alice.send({"type": "join", "room": "team", "ref": "ja"})
    assert (await answer(alice, "ja")).get("users") == ["alice", "bob"]
    presence = await bob.recv_type("presence")
    assert (presence["event"], presence["user"]) == ("join", "alice")
    for n in range(5):
        await alice.send({"type": "chat", "room": "team", "text": f"m{n}", "ref": f"c{n}"})
    assert [(await bob.recv_type("chat"))["text"] for _ in range(5)] == [f"m{n}" for n in range(5)]

    # durable: private messages to users whose keys live on every master, sent on
    # node a while they are offline, delivered by node b, acked there
    readers = ["rita", "ravi", "rosa", "rudy", "ruth", "remy"]
    for n, user in enumerate(readers):
        await alice.send({"type": "private", "to": user, "text": f"hi {user}", "ref": f"p{n}"})
        assert (await answer(alice, f"p{n}"))["type"] == "reply"
    code, body, _ = await a.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "m"}
    )
    assert code == 202, body
    notification = await bob.recv_type("notification")
    await bob.send({"type": "ack", "id": notification["id"]})
    for user in readers:
        reader = await b.connect(user)
        frame = await reader.recv_type("private")
        assert frame["text"] == f"hi {user}"
        await reader.send({"type": "ack", "ids": [frame["id"]], "ref": "a"})
        assert (await answer(reader, "a"))["acked"] == 1
        reader.close()
    for user in (*readers, "bob"):
        code, body, _ = await a.http("GET", f"/api/v1/users/{user}/pending")
        assert code == 200 and not body["messages"], (user, body)
    for client in (alice, bob):
        client.close()
