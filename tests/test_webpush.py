"""Web Push end to end, against a real push service on loopback.

No test may leave this machine, so :class:`PushService` below is the
receiving side of RFC 8030 implemented for real: a Tornado HTTP server
standing in for the browser vendor's push service. For every push it checks
the VAPID ``Authorization`` (RFC 8292: the key is the one pushsvc serves, the
ES256 signature verifies with it, ``aud`` is this origin, ``exp`` within 24
hours) and decrypts the ``aes128gcm`` body (RFC 8291) with the browser's
private key and auth secret, which each :class:`Browser` made with
``cryptography`` as a browser does. It answers 201, or whatever a test
scripts (404, 410, 429 with ``Retry-After``, 5xx), or hangs.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_ece
import orjson
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import jwt as vapid_jwt
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from conftest import Client, Server, ServerProcess, token
from pushsvc import hookimpl
from pushsvc.cluster.redis import index_key
from pushsvc.protocol.webpush import b64url_decode, b64url_encode
from pushsvc.push.endpoints import EndpointPolicy, EndpointRefused, GuardedResolver, is_public
from pushsvc.push.keys import VapidKeys
from pushsvc.push.sender import MAX_PLAINTEXT, push_payload, retry_after
from redis_server import RedisServer

SUBJECT = "mailto:ops@example.com"
WAIT = 10.0  # seconds any single expected event may take on a loaded machine

Start = Callable[..., Any]


@dataclass
class Received:
    """One push request as the push service saw it."""

    headers: dict[str, str]
    claims: dict[str, Any]  # the verified VAPID JWT claims
    payload: dict[str, Any]  # the decrypted JSON
    at: float  # monotonic arrival time


@dataclass
class Browser:
    """A browser's side of a subscription: its own P-256 key pair and auth secret."""

    name: str
    service: PushService
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))
    #: Answers to give, in order: (status, headers); then 201. "hang": never answer.
    script: list[tuple[int, dict[str, str]] | str] = field(default_factory=list)
    received: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    requests: int = 0  # every request, whatever the answer

    @property
    def endpoint(self) -> str:
        return f"{self.service.origin}/push/{self.name}"

    def subscription(self) -> dict[str, Any]:
        """What ``PushSubscription.toJSON()`` gives in a browser."""
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64url_encode(point), "auth": b64url_encode(self.auth)},
        }

    async def push(self, timeout: float = WAIT) -> Received:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def expect_no_push(self, seconds: float = 0.5) -> None:
        try:
            got = await asyncio.wait_for(self.received.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected push {got.payload}")


class PushService:
    """The receiving side of RFC 8030 on loopback, verifying and decrypting every push."""

    def __init__(self) -> None:
        self.browsers: dict[str, Browser] = {}
        self.vapid_key = ""  # the public key pushsvc serves; set by the test
        self.errors: list[str] = []  # verification failures (a test asserts none)
        self.hanging = asyncio.Event()  # set at teardown: hung requests end
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        app = tornado.web.Application([(r"/push/(\w+)", _PushHandler, {"service": self})])
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.add_sockets(sockets)

    def browser(self, name: str) -> Browser:
        self.browsers[name] = Browser(name, self)
        return self.browsers[name]

    def verify(self, browser: Browser, headers: dict[str, str], body: bytes) -> Received:
        """Check the VAPID header and decrypt; raises AssertionError naming what is wrong."""
        scheme, _, params = headers.get("Authorization", "").partition(" ")
        assert scheme == "vapid", f"Authorization scheme {scheme!r}"
        parts = dict(item.split("=", 1) for item in params.split(","))
        assert parts["k"] == self.vapid_key, "k is not the served VAPID key"
        claims = vapid_jwt.decode(parts["t"], parts["k"])  # raises unless the signature holds
        now = time.time()
        assert claims["aud"] == self.origin, claims
        assert now < claims["exp"] <= now + 86400, claims
        assert claims["sub"] == SUBJECT, claims
        assert headers.get("Content-Encoding") == "aes128gcm"
        assert int(headers["Ttl"]) > 0
        assert len(body) <= 4096
        plaintext = http_ece.decrypt(
            body, private_key=browser.key, auth_secret=browser.auth, version="aes128gcm"
        )
        return Received(headers, claims, orjson.loads(plaintext), time.monotonic())


class _PushHandler(tornado.web.RequestHandler):
    def initialize(self, service: PushService) -> None:
        self.service = service

    async def post(self, name: str) -> None:
        browser = self.service.browsers.get(name)
        if browser is None:
            self.set_status(404)
            return
        browser.requests += 1
        answer = browser.script.pop(0) if browser.script else (201, {})
        if answer == "hang":
            await self.service.hanging.wait()
            return
        assert not isinstance(answer, str)
        status, headers = answer
        if status == 201:
            try:
                received = self.service.verify(
                    browser, dict(self.request.headers), self.request.body
                )
            except Exception as exc:  # a real push service refuses what it cannot verify
                self.service.errors.append(f"{type(exc).__name__}: {exc}")
                self.set_status(403)
                return
            browser.received.put_nowait(received)
        self.set_status(status)
        for key, value in headers.items():
            self.set_header(key, value)


@pytest.fixture
async def push_service() -> AsyncIterator[PushService]:
    service = PushService()
    yield service
    service.hanging.set()
    service.server.stop()
    await service.server.close_all_connections()
    assert service.errors == []


def push_config(**more: Any) -> dict[str, Any]:
    """``[push]`` for tests: the loopback push service is allowed, retries are quick."""
    return {
        "enabled": True,
        "subject": SUBJECT,
        "allow_private_endpoints": True,
        "allowed_hosts": ["127.0.0.1"],
        "after_seconds": 0,
        "backoff": 0.05,
        "timeout": 5.0,
        **more,
    }


@pytest.fixture
async def start_push(start_server: Start, push_service: PushService) -> Callable[..., Any]:
    async def start(**push: Any) -> Server:
        server: Server = await start_server(push=push_config(**push))
        status, body, _ = await server.http("GET", "/api/v1/push/vapid-public-key")
        assert status == 200
        push_service.vapid_key = body["public_key"]
        return server

    return start


async def subscribe(client: Client, browser: Browser, ref: str = "s") -> dict[str, Any]:
    await client.send(
        {"type": "push_subscribe", "subscription": browser.subscription(), "ref": ref}
    )
    return await client.recv_type("reply", "error")


async def notify(server: Server, to: str | list[str], **fields: Any) -> str:
    body = {"to": to, "title": "Hello", "message": "You have mail", **fields}
    status, answer, _ = await server.http("POST", "/api/v1/notify", body)
    assert status == 202, answer
    message_id: str = answer["id"]
    return message_id


def metric(server: Server, name: str, **labels: str) -> float:
    value = server.node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def until(check: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await _maybe(check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _maybe(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


# -- keys ------------------------------------------------------------------------------


async def test_the_vapid_key_is_generated_once_served_and_in_welcome(
    start_push: Start, data_dir: Path
) -> None:
    server = await start_push()
    _, body, _ = await server.http("GET", "/api/v1/push/vapid-public-key", auth_header=False)
    key = body["public_key"]
    assert len(b64url_decode(key)) == 65 and b64url_decode(key)[0] == 4
    client = await server.connect("alice")
    assert client.welcome["push"] == {"vapid_public_key": key}
    pem = data_dir / "vapid_private_key.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    await server.service.shutdown(pace=False)
    again = await start_push()  # the same data dir: the same key
    _, body, _ = await again.http("GET", "/api/v1/push/vapid-public-key")
    assert body["public_key"] == key


async def test_push_off_by_default(server: Server) -> None:
    status, _, _ = await server.http("GET", "/api/v1/push/vapid-public-key")
    assert status == 404
    client = await server.connect("alice")
    assert "push" not in client.welcome
    await client.send({"type": "push_unsubscribe", "endpoint": "https://x.example/1", "ref": "u"})
    error = await client.recv_type("error")
    assert error["code"] == "forbidden" and "push.enabled" in error["message"]


# -- offline notification ----------------------------------------------------------------


async def test_offline_notification_is_pushed_once_per_subscription_encrypted_and_signed(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push()
    laptop, phone = push_service.browser("laptop"), push_service.browser("phone")
    client = await server.connect("alice")
    assert (await subscribe(client, laptop))["result"] == "created"
    reply = await subscribe(client, phone)
    assert reply == {
        "type": "reply",
        "ref": "s",
        "ok": True,
        "endpoint": phone.endpoint,
        "result": "created",
    }
    assert (await subscribe(client, phone))["result"] == "updated"  # the same browser again
    client.close()
    await until(lambda: not server.node.online("alice"))

    message_id = await notify(server, "alice", data={"url": "/inbox"}, urgency="high", topic="mail")
    for browser in (laptop, phone):
        push = await browser.push()
        assert push.payload == {
            "id": message_id,
            "type": "notification",
            "title": "Hello",
            "message": "You have mail",
            "data": {"url": "/inbox"},
        }
        assert push.headers["Urgency"] == "high" and push.headers["Topic"] == "mail"
        assert 0 < int(push.headers["Ttl"]) <= 86400
    await laptop.expect_no_push()
    assert laptop.requests == phone.requests == 1
    assert metric(server, "pushsvc_push_requests_total", result="sent") == 2
    assert metric(server, "pushsvc_push_subscriptions") == 2

    # A push is no ack: the inbox delivers the message when alice is back.
    back = await server.connect("alice")
    frame = await back.recv_type("notification")
    assert frame["id"] == message_id and frame["ack"] is True


async def test_online_and_acked_is_not_pushed_unacked_is_after_seconds(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(after_seconds=0.5)
    browser = push_service.browser("laptop")
    client = await server.connect("alice")
    await subscribe(client, browser)

    acked = await notify(server, "alice")
    frame = await client.recv_type("notification")
    await client.send({"type": "ack", "id": frame["id"], "ref": "a"})
    assert (await client.recv_type("reply"))["acked"] == 1
    await browser.expect_no_push(1.0)  # connected and acked in time: no push

    unacked = await notify(server, "alice")
    assert (await client.recv_type("notification"))["id"] == unacked  # received, not acked
    push = await browser.push()
    assert push.payload["id"] == unacked != acked
    await browser.expect_no_push()


async def test_connected_users_are_not_pushed_when_after_seconds_is_zero(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(after_seconds=0)
    browser = push_service.browser("laptop")
    client = await server.connect("alice")
    await subscribe(client, browser)
    await notify(server, "alice")
    await client.recv_type("notification")
    await browser.expect_no_push(0.5)
    await notify(server, "alice", push="always")  # unless the sender asks
    assert (await browser.push()).payload["title"] == "Hello"
    client.close()
    await until(lambda: not server.node.online("alice"))
    await notify(server, "alice", push="never")
    await browser.expect_no_push(0.5)


# -- answers of the push service ------------------------------------------------------------


async def test_410_deletes_the_subscription(start_push: Start, push_service: PushService) -> None:
    server = await start_push()
    gone, kept = push_service.browser("gone"), push_service.browser("kept")
    gone.script = [(410, {})]
    client = await server.connect("alice")
    await subscribe(client, gone)
    await subscribe(client, kept)
    client.close()
    await until(lambda: not server.node.online("alice"))
    await notify(server, "alice")
    await kept.push()
    await until(
        lambda: metric(server, "pushsvc_push_subscriptions_deleted_total", reason="expired")
    )
    _, listing, _ = await server.http("GET", "/api/v1/users/alice/push-subscriptions")
    assert [s["endpoint"] for s in listing["subscriptions"]] == [kept.endpoint]
    await notify(server, "alice")
    await kept.push()
    assert gone.requests == 1  # never tried again


async def test_429_retry_after_is_honoured_and_5xx_retried(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push()
    busy, broken = push_service.browser("busy"), push_service.browser("broken")
    busy.script = [(429, {"Retry-After": "1"})]
    broken.script = [(503, {}), (500, {})]
    client = await server.connect("alice")
    await subscribe(client, busy)
    await subscribe(client, broken)
    client.close()
    await until(lambda: not server.node.online("alice"))
    sent_at = time.monotonic()
    message_id = await notify(server, "alice")
    push = await busy.push()
    assert push.payload["id"] == message_id
    # The backoff alone (0.05 s) would have retried at once: the wait is the push service's.
    assert push.at - sent_at >= 0.9
    assert (await broken.push()).payload["id"] == message_id
    assert busy.requests == 2 and broken.requests == 3
    assert metric(server, "pushsvc_push_requests_total", result="retry") == 3


async def test_retries_stop_after_max_attempts(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(max_attempts=2)
    browser = push_service.browser("down")
    browser.script = [(503, {})] * 5
    client = await server.connect("alice")
    await subscribe(client, browser)
    client.close()
    await until(lambda: not server.node.online("alice"))
    await notify(server, "alice")
    await until(lambda: metric(server, "pushsvc_push_dropped_total", reason="attempts") == 1)
    await asyncio.sleep(0.3)
    assert browser.requests == 2


async def test_a_hanging_push_service_does_not_delay_websocket_delivery(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(concurrency=1)
    browser = push_service.browser("stuck")
    browser.script = ["hang"] * 10
    client = await server.connect("alice")
    await subscribe(client, browser)
    for _ in range(3):  # the only push slot is taken by a request that never ends
        await notify(server, "alice", push="always")
        await client.recv_type("notification")
    await until(lambda: browser.requests >= 1)
    started = time.monotonic()
    message_id = await notify(server, "alice", push="always")
    frame = await client.recv_type("notification")
    assert frame["id"] == message_id
    assert time.monotonic() - started < 2.0  # bound: well under push.timeout (5 s)


# -- subscriptions: validation, SSRF, cap, unsubscribe ----------------------------------------


async def test_bad_subscriptions_are_bad_requests(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push()
    client = await server.connect("alice")
    good = push_service.browser("b").subscription()
    cases = [
        ({"endpoint": good["endpoint"]}, "keys"),
        ({**good, "keys": {**good["keys"], "p256dh": "AAAA"}}, "keys.p256dh"),
        ({**good, "keys": {**good["keys"], "auth": "not base64!"}}, "keys.auth"),
        ({**good, "endpoint": ""}, "endpoint"),
    ]
    for subscription, field_name in cases:
        await client.send({"type": "push_subscribe", "subscription": subscription, "ref": "x"})
        error = await client.recv_type("error")
        assert error["code"] == "bad_request" and field_name in error["message"], error
    await client.send({"type": "push_subscribe", "ref": "x"})
    assert (await client.recv_type("error"))["code"] == "bad_request"


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("https://127.0.0.1/push/1", "non-public"),
        ("https://localhost/push/1", "non-public"),  # a name that resolves to 127.0.0.1
        ("https://10.1.2.3/push/1", "non-public"),
        ("https://169.254.169.254/latest/meta-data", "non-public"),
        ("https://[::1]:8443/push/1", "non-public"),
        ("https://[::ffff:192.168.0.1]/push/1", "non-public"),
        ("http://fcm.googleapis.com/fcm/send/1", "https"),
        ("https://user:pw@fcm.googleapis.com/fcm/send/1", "user info"),
    ],
)
async def test_endpoints_the_server_must_not_fetch_are_refused(
    start_server: Start, push_service: PushService, endpoint: str, why: str
) -> None:
    server = await start_server(
        push={"enabled": True, "subject": SUBJECT, "allowed_hosts": []}  # any public host
    )
    client = await server.connect("alice")
    subscription = {**push_service.browser("b").subscription(), "endpoint": endpoint}
    await client.send({"type": "push_subscribe", "subscription": subscription, "ref": "x"})
    error = await client.recv_type("error")
    assert error["code"] == "forbidden" and why in error["message"], error
    assert metric(server, "pushsvc_push_subscribe_refused_total", reason="endpoint") == 1


async def test_hosts_outside_the_allow_list_are_refused() -> None:
    policy = EndpointPolicy(("fcm.googleapis.com", "*.push.services.mozilla.com"), False)
    policy.check_url("https://fcm.googleapis.com/fcm/send/abc")
    policy.check_url("https://updates.push.services.mozilla.com/wpush/v2/abc")
    with pytest.raises(EndpointRefused, match="not an allowed push service"):
        policy.check_url("https://evil.example.com/fcm.googleapis.com")


async def test_the_senders_resolver_refuses_private_addresses_too() -> None:
    """The check again at connect time: a name that turned private (DNS rebinding)."""
    with pytest.raises(EndpointRefused):
        await GuardedResolver(allow_private=False).resolve("localhost", 443)
    found = await GuardedResolver(allow_private=True).resolve("localhost", 443)
    assert found
    assert is_public("8.8.8.8") and is_public("2001:4860:4860::8888")
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ):
        assert not is_public(address), address


async def test_subscriptions_are_capped_per_user(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(max_subscriptions_per_user=2)
    client = await server.connect("alice")
    for name in ("one", "two"):
        assert (await subscribe(client, push_service.browser(name)))["type"] == "reply"
    error = await subscribe(client, push_service.browser("three"))
    assert error["code"] == "forbidden" and "max_subscriptions_per_user" in error["message"]
    assert (await subscribe(client, push_service.browsers["one"]))["result"] == "updated"
    bob = await server.connect("bob")  # the cap is per user
    assert (await subscribe(bob, push_service.browsers["three"]))["type"] == "reply"


async def test_push_unsubscribe(start_push: Start, push_service: PushService) -> None:
    server = await start_push()
    browser = push_service.browser("laptop")
    client = await server.connect("alice")
    await subscribe(client, browser)
    await client.send({"type": "push_unsubscribe", "endpoint": browser.endpoint, "ref": "u"})
    reply = await client.recv_type("reply")
    assert reply == {
        "type": "reply",
        "ref": "u",
        "ok": True,
        "endpoint": browser.endpoint,
        "removed": True,
    }
    await client.send({"type": "push_unsubscribe", "endpoint": browser.endpoint, "ref": "u"})
    assert (await client.recv_type("reply"))["removed"] is False
    client.close()
    await until(lambda: not server.node.online("alice"))
    await notify(server, "alice")
    await browser.expect_no_push(0.5)
    assert metric(server, "pushsvc_push_subscriptions") == 0


async def test_server_api_for_subscriptions(start_push: Start, push_service: PushService) -> None:
    server = await start_push()
    browser = push_service.browser("laptop")
    path = "/api/v1/users/alice/push-subscriptions"
    body = {"subscription": browser.subscription()}
    status, answer, _ = await server.http("POST", path, body)
    assert (status, answer["result"]) == (201, "created")
    status, answer, _ = await server.http("POST", path, body)
    assert (status, answer["result"]) == (200, "updated")
    status, listing, _ = await server.http("GET", path)
    assert status == 200 and [s["endpoint"] for s in listing["subscriptions"]] == [browser.endpoint]
    assert "keys" not in listing["subscriptions"][0]
    status, answer, _ = await server.http("POST", path, {"subscription": {"endpoint": "x"}})
    assert status == 400 and answer["error"] == "bad_request"
    await notify(server, "alice")  # nobody connected: pushed
    await browser.push()
    status, answer, _ = await server.http("DELETE", f"{path}?endpoint={browser.endpoint}")
    assert (status, answer["removed"]) == (200, True)
    status, _, _ = await server.http("DELETE", path)
    assert status == 400
    status, _, _ = await server.http("GET", path, scope="notify")
    assert status == 403  # the server API needs scope publish


async def test_the_hook_hears_every_outcome(start_server: Start, push_service: PushService) -> None:
    heard: list[tuple[str, str, str]] = []
    messages: list[dict[str, Any]] = []

    class Listener:
        @hookimpl
        def pushsvc_push_sent(
            self, user: str, message: dict[str, Any], endpoint: str, result: str
        ) -> None:
            heard.append((user, endpoint, result))
            messages.append(dict(message))

    server: Server = await start_server(push=push_config(), extra=[("listener", Listener())])
    _, body, _ = await server.http("GET", "/api/v1/push/vapid-public-key")
    push_service.vapid_key = body["public_key"]
    browser = push_service.browser("laptop")
    client = await server.connect("alice")
    await subscribe(client, browser)
    client.close()
    await until(lambda: not server.node.online("alice"))
    sent_id = await notify(server, "alice")
    await notify(server, "nobody")
    await browser.push()
    await until(lambda: len(heard) == 2)
    assert sorted(heard) == [("alice", browser.endpoint, "sent"), ("nobody", "", "no_subscription")]
    (pushed,) = [m for m in messages if m["id"] == sent_id]
    assert pushed["title"] == "Hello" and pushed["type"] == "notification"


async def test_a_large_fan_out_takes_queue_slots_only_for_subscriptions(
    start_push: Start, push_service: PushService
) -> None:
    server = await start_push(queue_size=2)
    one, two = push_service.browser("one"), push_service.browser("two")
    for user, browser in (("u7", one), ("u400", two)):
        status, _, _ = await server.http(
            "POST",
            f"/api/v1/users/{user}/push-subscriptions",
            {"subscription": browser.subscription()},
        )
        assert status == 201
    users = [f"u{n}" for n in range(500)]
    message_id = await notify(server, users)
    assert (await one.push()).payload["id"] == (await two.push()).payload["id"] == message_id
    assert metric(server, "pushsvc_push_dropped_total", reason="queue_full") == 0


async def test_bad_push_fields_of_notify_are_400(start_push: Start) -> None:
    server = await start_push()
    for field_name, value in (("push", "sometimes"), ("urgency", "now"), ("topic", "a b")):
        body = {"to": "alice", "title": "t", "message": "m", field_name: value}
        status, answer, _ = await server.http("POST", "/api/v1/notify", body)
        assert status == 400 and answer["message"].startswith(field_name), answer


def test_key_settings_are_checked(tmp_path: Path) -> None:
    from conftest import make_config
    from pushsvc.app import push_keys
    from pushsvc.config import ConfigError

    with pytest.raises(ConfigError, match=r"^push.subject"):
        push_keys(make_config(tmp_path, push={"enabled": True}))
    missing = make_config(
        tmp_path, push={"subject": SUBJECT, "vapid_private_key_file": str(tmp_path / "none.pem")}
    )
    with pytest.raises(ConfigError, match=r"^push.vapid_private_key_file: .*no such file"):
        push_keys(missing)  # a named key file is never created
    (tmp_path / "bad.pem").write_text("not a key")
    bad = make_config(
        tmp_path, push={"subject": SUBJECT, "vapid_private_key_file": str(tmp_path / "bad.pem")}
    )
    with pytest.raises(ConfigError, match="not a PEM P-256 private key"):
        push_keys(bad)
    generated = push_keys(make_config(tmp_path, push={"subject": SUBJECT}))
    (tmp_path / "mine.pem").write_bytes(generated.vapid.private_pem())
    named = make_config(
        tmp_path, push={"subject": SUBJECT, "vapid_private_key_file": str(tmp_path / "mine.pem")}
    )
    assert push_keys(named).public_key == generated.public_key


# -- payload ----------------------------------------------------------------------------------


def test_large_payloads_are_cut_to_title_message_and_id() -> None:
    message = {"type": "notification", "title": "T" * 900, "message": "é" * 8000, "data": {"k": 1}}
    payload = orjson.loads(push_payload("01ID", message))
    assert len(push_payload("01ID", message)) <= MAX_PLAINTEXT
    assert payload["id"] == "01ID" and payload["truncated"] is True and "data" not in payload
    assert payload["title"] == "T" * 900 and payload["message"].startswith("éé")
    small = {"type": "notification", "title": "a", "message": "b", "data": {}}
    assert orjson.loads(push_payload("01ID", small)) == {"id": "01ID", **small}


def test_retry_after_takes_seconds_and_dates() -> None:
    assert retry_after("120") == 120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_the_command_line_names_bad_push_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PUSHSVC_JWT_SECRET": "x" * 32, "PUSHSVC_PUSH__ENABLED": "true"}
    checked = subprocess.run(
        [sys.executable, "-m", "pushsvc", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert checked.returncode == 2 and "push.subject" in checked.stderr
    env |= {
        "PUSHSVC_PUSH__SUBJECT": SUBJECT,
        "PUSHSVC_PUSH__VAPID_PRIVATE_KEY_FILE": str(tmp_path / "absent.pem"),
    }
    served = subprocess.run(
        [sys.executable, "-m", "pushsvc", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert served.returncode == 2 and "push.vapid_private_key_file" in served.stderr


async def test_the_openapi_document_has_the_push_routes_when_enabled(start_push: Start) -> None:
    server = await start_push()
    _, doc, _ = await server.http("GET", "/api/v1/openapi.json")
    key = doc["paths"]["/api/v1/push/vapid-public-key"]["get"]
    assert key["security"] == []
    subscriptions = doc["paths"]["/api/v1/users/{user}/push-subscriptions"]
    assert set(subscriptions) == {"get", "post", "delete"}
    for operation in subscriptions.values():
        for status in ("400", "401", "403", "404", "413", "429", "503"):
            assert status in operation["responses"]
    status, _, _ = await server.http("GET", "/api/v1/users/x/push-subscriptions")
    assert status == 200


@pytest.mark.slow
async def test_schemathesis_finds_no_violation_in_the_push_routes(
    start_push: Start, tmp_path: Path
) -> None:
    import importlib.util
    import uuid

    from test_api_schema import SCHEMATHESIS_CONFIG, SEED, failure_summary

    from conftest import token

    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    server = await start_push()
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    jwt = token(f"st-{uuid.uuid4().hex}", scope="publish", ttl=600)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run"],
        f"{server.base}/api/v1/openapi.json",
        *["--url", server.base, "--header", f"Authorization: Bearer {jwt}", "--checks", "all"],
        *["--max-examples", "50", "--seed", str(SEED), "--request-timeout", "10", "--no-color"],
        *["--include-path-regex", "push"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    output = out.decode(errors="replace")
    assert proc.returncode == 0, failure_summary(output) or output[-4000:]
    assert re.search(r"Tested:\s+4\b", output), output[-2000:]


async def test_the_sender_refuses_a_host_that_resolves_privately_and_does_not_retry(
    tmp_path: Path, push_service: PushService
) -> None:
    """A subscription that passed the check once, whose name now resolves to loopback."""
    from pushsvc.push.keys import VapidKeys
    from pushsvc.push.sender import Sender
    from pushsvc.store import PushSubscription

    keys = VapidKeys.load_or_create(tmp_path / "k.pem", SUBJECT)
    sender = Sender(keys, concurrency=1, timeout=5, allow_private=False)
    browser = push_service.browser("rebound")
    endpoint = f"http://localhost:{push_service.port}/push/rebound"
    sub = browser.subscription()["keys"]
    subscription = PushSubscription("ann", endpoint, sub["p256dh"], sub["auth"], time.time())
    try:
        request = sender.request(subscription, b"{}", ttl=60, urgency="normal", topic=None)
        result = await sender.send(request)
    finally:
        sender.close()
    assert result.refused and "non-public" in result.error
    assert browser.requests == 0


async def test_subscriptions_in_the_redis_store(
    start_server: Start, push_service: PushService, redis_url: str
) -> None:
    """The Redis store keeps the subscriptions too: a push goes out from them."""
    server: Server = await start_server(push=push_config(), store={"url": redis_url})
    status, body, _ = await server.http("GET", "/api/v1/push/vapid-public-key")
    assert status == 200
    push_service.vapid_key = body["public_key"]
    browser = push_service.browser("laptop")
    client = await server.connect("alice")
    assert (await subscribe(client, browser))["result"] == "created"
    assert (await subscribe(client, browser))["result"] == "updated"
    client.close()
    await until(lambda: not server.node.online("alice"))
    message_id = await notify(server, "alice")
    assert (await browser.push()).payload["id"] == message_id
    _, listing, _ = await server.http("GET", "/api/v1/users/alice/push-subscriptions")
    assert [s["endpoint"] for s in listing["subscriptions"]] == [browser.endpoint]
    assert await server.node.store.count_push_subscriptions() == 1  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_a_user_connected_to_another_node_is_not_pushed_until_gone(
    tmp_path: Path,
    push_service: PushService,
    fresh_redis: RedisServer,
    spawn: Callable[..., ServerProcess],
) -> None:
    """Two ``pushsvc serve`` on one Redis: "offline" is decided over the cluster."""
    key_file = tmp_path / "vapid.pem"
    VapidKeys.load_or_create(key_file, SUBJECT)  # one key for both nodes
    after = 3.0  # push.after_seconds
    env = {
        "PUSHSVC_BROKER__URL": fresh_redis.url,
        "PUSHSVC_STORE__URL": fresh_redis.url,  # the registry follows broker.url
        "PUSHSVC_PUSH__ENABLED": "true",
        "PUSHSVC_PUSH__SUBJECT": SUBJECT,
        "PUSHSVC_PUSH__VAPID_PRIVATE_KEY_FILE": str(key_file),
        "PUSHSVC_PUSH__ALLOW_PRIVATE_ENDPOINTS": "true",
        "PUSHSVC_PUSH__ALLOWED_HOSTS": "127.0.0.1",
        "PUSHSVC_PUSH__AFTER_SECONDS": str(after),
        "PUSHSVC_CHAT__AUTO_JOIN": "false",
    }
    a, b = (spawn("--data-dir", str(tmp_path / name), env=env, name=name) for name in ("a", "b"))
    push_service.vapid_key = (await _get_json(a.base + "/api/v1/push/vapid-public-key"))[
        "public_key"
    ]
    browser = push_service.browser("laptop")
    alice = Client(await websocket_connect(f"{b.ws_url}?access_token={token('alice')}"))
    assert (await alice.recv_type("welcome"))["user"] == "alice"
    assert (await subscribe(alice, browser))["result"] == "created"

    # On b only, acked at once: a (which accepts it) pushes neither now nor after_seconds.
    acked = await _notify_via(a, "alice")
    frame = await alice.recv_type("notification")
    assert frame["id"] == acked
    await alice.send({"type": "ack", "id": acked, "ref": "a"})
    assert (await alice.recv_type("reply"))["acked"] == 1
    await browser.expect_no_push(after + 1.0)

    # On b, not acked: pushed after_seconds later, from a (the inbox is shared).
    sent = time.monotonic()
    unacked = await _notify_via(a, "alice")
    assert (await alice.recv_type("notification"))["id"] == unacked
    push = await browser.push(after + WAIT)
    assert push.payload["id"] == unacked
    assert time.monotonic() - sent >= after - 0.5, "pushed before after_seconds"

    # Gone from b: the next notification through a is pushed at once.
    alice.close()
    await until(lambda: not _connected_anywhere(fresh_redis, "alice"))  # b's close is in Redis
    sent = time.monotonic()
    offline = await _notify_via(a, "alice")
    push = await browser.push()
    assert push.payload["id"] == offline
    assert time.monotonic() - sent < after - 0.5, "waited for after_seconds: not seen offline"
    await browser.expect_no_push(1.0)


def _connected_anywhere(redis: RedisServer, user: str) -> bool:
    """What the registry keeps, read with plain commands: a connection of ``user`` on a node."""
    index = index_key("conns", user)
    nodes = redis.command("SMEMBERS", index).split()
    return any(redis.command("EXISTS", f"{index}:{node}") == "1" for node in nodes)


async def _get_json(url: str, **request: Any) -> Any:
    response = await AsyncHTTPClient().fetch(url, **request)
    return orjson.loads(response.body)


async def _notify_via(node: ServerProcess, to: str) -> str:
    headers = {"Authorization": f"Bearer {token('backend', scope='publish')}"}
    body = orjson.dumps({"to": to, "title": "Hello", "message": "You have mail"})
    answer = await _get_json(
        node.base + "/api/v1/notify", method="POST", body=body, headers=headers
    )
    message_id: str = answer["id"]
    return message_id


async def test_users_elsewhere_are_pushed_when_the_registry_fails(
    start_server: Start, push_service: PushService, fresh_redis: RedisServer
) -> None:
    """Fails open: a duplicate of a WebSocket delivery rather than a push lost."""
    cluster = {"url": fresh_redis.url, "node_ttl": 60.0, "timeout": 0.5}
    here: Server = await start_server(push=push_config(), cluster=cluster)
    there: Server = await start_server(push=push_config(), cluster=cluster)
    status, body, _ = await here.http("GET", "/api/v1/push/vapid-public-key")
    push_service.vapid_key = body["public_key"]
    browser = push_service.browser("laptop")
    path = "/api/v1/users/alice/push-subscriptions"
    status, _, _ = await here.http("POST", path, {"subscription": browser.subscription()})
    assert status == 201
    alice = await there.connect("alice")
    await notify(here, "alice")
    await browser.expect_no_push(1.0)  # connected to the other node
    fresh_redis.kill9()
    message_id = await notify(here, "alice")
    assert (await browser.push()).payload["id"] == message_id
    assert metric(here, "pushsvc_cluster_errors_total", operation="online") >= 1
    alice.close()
