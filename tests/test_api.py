"""The server API (PROTOCOL §4 and extensions) over a real in-process server and real HTTP.

Covers every endpoint's answers and error bodies, authentication and scope,
404/405/413/429, field validation (400 naming the field), the recipients cap,
``Idempotency-Key`` on notify (also across a restart), dead letters (list,
requeue to connected clients, delete) and token revocation (jti and user,
closing open connections, refusing handshakes and ``auth`` frames, surviving
a restart).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from conftest import SECRET, Client, Server, token
from pushsvc.auth import tokens

Start = Callable[..., Any]
NOTE = {"title": "Hi", "message": "hello"}


async def raw(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """Any request (DELETE with a body too); returns status, parsed JSON, headers."""
    request = HTTPRequest(
        server.base + path,
        method=method,
        body=body,
        headers=headers or {},
        allow_nonstandard_methods=True,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    parsed = orjson.loads(response.body) if response.body else None
    return response.code, parsed, dict(response.headers)


def bearer(sub: str = "backend", scope: str = "publish", **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, scope=scope, **kwargs)}"}


def assert_error(status: int, body: Any, expected: int, code: str, field: str = "") -> None:
    assert status == expected, body
    assert set(body) >= {"error", "message"} and body["error"] == code, body
    if field:
        assert body["message"].startswith(f"{field}:"), body


async def notify(server: Server, body: dict[str, Any], **kwargs: Any) -> tuple[int, Any, Any]:
    return await server.http("POST", "/api/v1/notify", body, **kwargs)


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


# -- publish, notify, pending, disconnect, presence -------------------------------------


async def test_publish_fans_out_to_room_members(server: Server) -> None:
    alice = await server.connect("alice")
    await alice.send({"type": "join", "room": "news", "ref": "j"})
    await alice.recv_type("reply")
    status, body, _ = await server.http(
        "POST", "/api/v1/publish", {"room": "news", "text": "extra!", "data": {"n": 1}}
    )
    assert status == 202 and set(body) == {"id"}
    chat = await alice.recv_type("chat")
    assert chat["id"] == body["id"] and chat["room"] == "news" and chat["text"] == "extra!"
    assert chat["user"] == "backend" and chat["data"] == {"n": 1}
    status, body, _ = await server.http(
        "POST", "/api/v1/publish", {"room": "news", "type": "alert", "text": None}
    )
    assert status == 202
    alert = await alice.recv_type("alert")
    assert alert["id"] == body["id"] and "text" not in alert


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{", "body"),
        (b"[1]", "body"),
        ({}, "room"),
        ({"room": 5}, "room"),
        ({"room": ""}, "room"),
        ({"room": "r" * 201}, "room"),
        ({"room": "r", "type": "Chat!"}, "type"),
        ({"room": "r", "type": ""}, "type"),
        ({"room": "r", "type": "join"}, "type"),
        ({"room": "r", "type": "private"}, "type"),
        ({"room": "r", "type": 1}, "type"),
        ({"room": "r", "text": 5}, "text"),
        ({"room": "r", "data": [1]}, "data"),
    ],
)
async def test_publish_bad_fields_name_the_field(server: Server, body: Any, field: str) -> None:
    status, answer, _ = await server.http("POST", "/api/v1/publish", body)
    assert_error(status, answer, 400, "bad_request", field)


async def test_notify_persists_then_delivers_and_lists_pending(server: Server) -> None:
    bob = await server.connect("bob")
    status, body, _ = await notify(server, {"to": ["bob", "carol", "bob"], **NOTE, "data": {}})
    assert status == 202 and body["recipients"] == 2 and len(body["id"]) == 26
    frame = await bob.recv_type("notification")
    assert frame["id"] == body["id"] and frame["ack"] is True and frame["title"] == "Hi"
    status, pending, _ = await server.http("GET", "/api/v1/users/carol/pending")
    assert status == 200 and [m["id"] for m in pending["messages"]] == [body["id"]]
    assert pending["messages"][0]["attempts"] == 0 and pending["messages"][0]["message"] == "hello"
    status, body2, _ = await notify(server, {"to": "carol", **NOTE, "ttl": 30})
    status, page, _ = await server.http("GET", "/api/v1/users/carol/pending?limit=1")
    assert [m["id"] for m in page["messages"]] == [body["id"]]
    after = urllib.parse.quote(body["id"])
    status, page, _ = await server.http("GET", f"/api/v1/users/carol/pending?after={after}")
    assert [m["id"] for m in page["messages"]] == [body2["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "t", "message": "m"}, "to"),
        ({"to": [], "title": "t", "message": "m"}, "to"),
        ({"to": [""], "title": "t", "message": "m"}, "to"),
        ({"to": ["a", 5], "title": "t", "message": "m"}, "to"),
        ({"to": 5, "title": "t", "message": "m"}, "to"),
        ({"to": ["a", "b", "c", "d"], "title": "t", "message": "m"}, "to"),
        ({"to": "a", "message": "m"}, "title"),
        ({"to": "a", "title": "t" * 1001, "message": "m"}, "title"),
        ({"to": "a", "title": "t", "message": 1}, "message"),
        ({"to": "a", "title": "t", "message": "m", "data": "x"}, "data"),
        ({"to": "a", "title": "t", "message": "m", "ttl": 0}, "ttl"),
        ({"to": "a", "title": "t", "message": "m", "ttl": -5}, "ttl"),
        ({"to": "a", "title": "t", "message": "m", "ttl": "1"}, "ttl"),
        ({"to": "a", "title": "t", "message": "m", "ttl": True}, "ttl"),
    ],
)
async def test_notify_bad_fields_and_recipient_cap(
    start_server: Start, body: dict[str, Any], field: str
) -> None:
    server = await start_server(api={"max_recipients": 3})
    status, answer, _ = await notify(server, body)
    assert_error(status, answer, 400, "bad_request", field)
    status, pending, _ = await server.http("GET", "/api/v1/users/a/pending")
    assert pending == {"messages": []}  # nothing was stored


async def test_pending_query_validation(server: Server) -> None:
    for query in ("limit=0", "limit=1001", "limit=x", "limit=-1", "limit=%D9%A5"):
        status, body, _ = await server.http("GET", f"/api/v1/users/u/pending?{query}")
        assert_error(status, body, 400, "bad_request", "limit")
    status, body, _ = await server.http("GET", f"/api/v1/users/u/pending?after={'9' * 65}")
    assert_error(status, body, 400, "bad_request", "after")


async def test_disconnect_closes_every_connection_of_the_user(server: Server) -> None:
    first, second = await server.connect("dave"), await server.connect("dave")
    other = await server.connect("erin")
    status, body, _ = await server.http(
        "POST", "/api/v1/users/dave/disconnect", {"reason": "maintenance"}
    )
    assert status == 200 and body == {"closed": 2}
    for client in (first, second):
        assert await client.closed() == 4003 and client.close_reason == "maintenance"
    await other.send({"type": "ping", "ref": "p"})
    assert (await other.recv_type("pong"))["ref"] == "p"
    status, body, _ = await server.http("POST", "/api/v1/users/nobody/disconnect")
    assert status == 200 and body == {"closed": 0}
    for reason in (5, "x" * 101, "€" * 50):
        status, body, _ = await server.http(
            "POST", "/api/v1/users/dave/disconnect", {"reason": reason}
        )
        assert_error(status, body, 400, "bad_request", "reason")


async def test_room_presence_lists_distinct_users(server: Server) -> None:
    clients = [await server.connect(u) for u in ("zoe", "adam", "adam")]
    for client in clients:
        await client.send({"type": "join", "room": "team a", "ref": "j"})
        await client.recv_type("reply")
    status, body, _ = await server.http("GET", "/api/v1/rooms/team%20a/presence")
    assert status == 200 and body == {"users": ["adam", "zoe"]}
    status, body, _ = await server.http("GET", "/api/v1/rooms/lobby/presence")
    assert body == {"users": ["adam", "zoe"]}  # auto-joined default room
    status, body, _ = await server.http("GET", "/api/v1/rooms/empty/presence")
    assert status == 200 and body == {"users": []}
    clients[0].close()
    await wait_for(lambda: _presence_is(server, "team%20a", ["adam"]))


async def _presence_is(server: Server, room: str, users: list[str]) -> bool:
    _, body, _ = await server.http("GET", f"/api/v1/rooms/{room}/presence")
    return bool(body == {"users": users})


# -- authentication, scope, routes, limits ------------------------------------------------

ENDPOINTS = [
    ("POST", "/api/v1/publish"),
    ("POST", "/api/v1/notify"),
    ("GET", "/api/v1/users/u/pending"),
    ("POST", "/api/v1/users/u/disconnect"),
    ("GET", "/api/v1/rooms/r/presence"),
    ("GET", "/api/v1/users/u/dead-letters"),
    ("DELETE", "/api/v1/users/u/dead-letters"),
    ("POST", "/api/v1/users/u/dead-letters/requeue"),
    ("POST", "/api/v1/users/u/dead-letters/delete"),
    ("GET", "/api/v1/revocations"),
    ("POST", "/api/v1/revocations"),
]


async def test_every_endpoint_needs_a_valid_publish_token(server: Server) -> None:
    expired = tokens.mint(SECRET, "backend", ttl=-120, scope="publish")
    forged = tokens.mint("another-secret-that-is-long-enough-too!", "backend", scope="publish")
    cases: list[tuple[dict[str, str], int, str, str | None]] = [
        ({}, 401, "unauthorized", "missing_token"),
        ({"Authorization": "Bearer not-a-jwt"}, 401, "unauthorized", "malformed"),
        ({"Authorization": f"Bearer {expired}"}, 401, "unauthorized", "expired"),
        ({"Authorization": f"Bearer {forged}"}, 401, "unauthorized", "bad_signature"),
        (bearer(scope="notify"), 403, "forbidden", None),
        (bearer(scope=""), 403, "forbidden", None),
    ]
    for method, path in ENDPOINTS:
        body = None if method == "GET" else b"{}"
        for headers, status, code, reason in cases:
            got, answer, response_headers = await raw(server, method, path, body, headers)
            assert_error(got, answer, status, code)
            assert answer.get("reason") == reason, (method, path, answer)
            if status == 401:
                assert response_headers["Www-Authenticate"].startswith("Bearer")


async def test_unknown_routes_and_methods_answer_json(server: Server) -> None:
    for method, path in [
        ("GET", "/api/v1/nope"),
        ("POST", "/nope"),
        ("GET", "/api/v1/users/u"),
        ("DELETE", "/api/v1/users//pending"),
    ]:
        status, body, headers = await raw(server, method, path, None if method != "POST" else b"")
        assert_error(status, body, 404, "not_found")
        assert headers["Content-Type"].startswith("application/json")
    status, body, headers = await raw(server, "GET", "/api/v1/publish", headers=bearer())
    assert_error(status, body, 405, "method_not_allowed")
    assert headers["Allow"] == "POST"
    status, body, headers = await raw(server, "PUT", "/api/v1/revocations", b"{}", bearer())
    assert status == 405 and headers["Allow"] == "GET, POST"


async def test_body_over_the_limit_is_413(start_server: Start) -> None:
    server = await start_server(api={"max_body_bytes": 1024})
    big = {"room": "r", "text": "x" * 2000}
    status, body, _ = await server.http("POST", "/api/v1/publish", big)
    assert_error(status, body, 413, "too_large")
    status, body, _ = await notify(server, {"to": "u", "title": "t", "message": "x" * 2000})
    assert_error(status, body, 413, "too_large")
    status, body, _ = await server.http("POST", "/api/v1/publish", {"room": "r", "text": "ok"})
    assert status == 202


async def test_rate_limit_per_api_client_with_retry_after(start_server: Start) -> None:
    server = await start_server(api={"rate": 0.5, "burst": 3})
    answers = [await server.http("GET", "/api/v1/rooms/r/presence") for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 429]
    status, body, headers = answers[-1]
    assert_error(status, body, 429, "rate_limited")
    assert headers["Retry-After"] == "2"
    status, _, _ = await server.http("GET", "/api/v1/rooms/r/presence", sub="other-backend")
    assert status == 200  # another API client has its own bucket


async def test_rate_zero_never_refills_and_caps_retry_after(start_server: Start) -> None:
    server = await start_server(api={"rate": 0, "burst": 1})
    assert (await server.http("GET", "/api/v1/revocations"))[0] == 200
    status, body, headers = await server.http("GET", "/api/v1/revocations")
    assert_error(status, body, 429, "rate_limited")
    assert headers["Retry-After"] == "3600"


async def test_store_failure_is_503_with_retry_after(server: Server) -> None:
    await server.node.store.close()
    status, body, headers = await notify(server, {"to": "u", **NOTE})
    assert_error(status, body, 503, "unavailable")
    assert headers["Retry-After"] == "1"
    for method, path in [
        ("GET", "/api/v1/users/u/pending"),
        ("GET", "/api/v1/users/u/dead-letters"),
    ]:
        status, body, headers = await server.http(method, path)
        assert_error(status, body, 503, "unavailable")
    status, body, _ = await server.http("POST", "/api/v1/revocations", {"jti": "x"})
    assert_error(status, body, 503, "unavailable")
    status, body, _ = await server.http("GET", "/api/v1/revocations")
    assert status == 200 and body == {"revocations": []}  # nothing was revoked


# -- Idempotency-Key -------------------------------------------------------------------


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def pending_ids(server: Server, user: str) -> list[str]:
    _, body, _ = await server.http("GET", f"/api/v1/users/{user}/pending")
    return [m["id"] for m in body["messages"]]


async def test_idempotency_key_replays_the_first_answer(server: Server) -> None:
    frank = await server.connect("frank")
    body = {"to": ["frank", "gina"], **NOTE}
    status, first, headers = await notify(server, body, headers=key("order-1"))
    assert status == 202 and "Idempotent-Replayed" not in headers
    status, again, headers = await notify(
        server, dict(reversed(body.items())), headers=key("order-1")
    )
    assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
    assert await pending_ids(server, "gina") == [first["id"]]
    assert (await frank.recv_type("notification"))["id"] == first["id"]
    await frank.expect_nothing(0.3)
    # Another body with the same key: refused, nothing stored.
    status, answer, _ = await notify(server, {**body, "title": "other"}, headers=key("order-1"))
    assert_error(status, answer, 409, "idempotency_mismatch", "Idempotency-Key")
    # Keys are per API client, and a new key is a new message.
    status, other, _ = await notify(server, body, headers=key("order-1"), sub="backend-2")
    assert status == 202 and other["id"] != first["id"]
    status, third, _ = await notify(server, body, headers=key("order-2"))
    assert third["id"] not in (first["id"], other["id"])
    assert len(await pending_ids(server, "gina")) == 3


async def test_concurrent_retries_with_one_key_store_one_message(server: Server) -> None:
    body = {"to": "hank", **NOTE}
    answers = await asyncio.gather(*(notify(server, body, headers=key("k")) for _ in range(8)))
    assert {a[0] for a in answers} == {202}
    assert len({a[1]["id"] for a in answers}) == 1
    assert await pending_ids(server, "hank") == [answers[0][1]["id"]]


@pytest.mark.parametrize("value", ["", "x" * 256, "two words", "naïve"])
async def test_malformed_idempotency_key_is_400(server: Server, value: str) -> None:
    headers = {"Idempotency-Key": value.encode().decode("latin-1")}
    status, body, _ = await notify(server, {"to": "u", **NOTE}, headers=headers)
    assert_error(status, body, 400, "bad_request", "Idempotency-Key")
    assert await pending_ids(server, "u") == []


async def test_idempotency_survives_a_restart(start_server: Start) -> None:
    server = await start_server()
    status, first, _ = await notify(server, {"to": "ivy", **NOTE}, headers=key("restart"))
    await server.service.shutdown(pace=False)
    server = await start_server()
    status, again, headers = await notify(server, {"to": "ivy", **NOTE}, headers=key("restart"))
    assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
    assert await pending_ids(server, "ivy") == [first["id"]]


async def test_idempotency_window_expires_and_zero_turns_it_off(start_server: Start) -> None:
    server = await start_server(api={"idempotency_window": 0.3})
    _, first, _ = await notify(server, {"to": "jay", **NOTE}, headers=key("w"))
    await asyncio.sleep(0.4)
    _, second, headers = await notify(server, {"to": "jay", **NOTE}, headers=key("w"))
    assert second["id"] != first["id"] and "Idempotent-Replayed" not in headers
    await server.service.shutdown(pace=False)
    server = await start_server(api={"idempotency_window": 0})
    _, third, _ = await notify(server, {"to": "jay", **NOTE}, headers=key("w"))
    _, fourth, _ = await notify(server, {"to": "jay", **NOTE}, headers=key("w"))
    assert len({first["id"], second["id"], third["id"], fourth["id"]}) == 4


# -- dead letters -------------------------------------------------------------------------

DYING = {"delivery": {"max_attempts": 1, "ack_timeout": 0.1}}


async def dead_letters(server: Server, user: str) -> list[dict[str, Any]]:
    status, body, _ = await server.http("GET", f"/api/v1/users/{user}/dead-letters")
    assert status == 200, body
    return list(body["messages"])


async def make_dead_letter(server: Server, client: Client, user: str) -> str:
    """Notify ``user``, let ``client`` ignore it until it is dead-lettered; returns its id."""
    _, body, _ = await notify(server, {"to": user, **NOTE})
    assert (await client.recv_type("notification"))["id"] == body["id"]

    async def dead() -> bool:
        return body["id"] in [m["id"] for m in await dead_letters(server, user)]

    await wait_for(dead)
    return str(body["id"])


async def test_dead_letters_list_and_requeue_to_a_connected_client(start_server: Start) -> None:
    server = await start_server(**DYING)
    kim = await server.connect("kim")
    message_id = await make_dead_letter(server, kim, "kim")
    [letter] = await dead_letters(server, "kim")
    assert letter["id"] == message_id and letter["reason"] == "max_attempts"
    assert letter["type"] == "notification" and letter["title"] == "Hi"
    assert abs(letter["dead_at"] - time.time()) < 10
    status, body, _ = await server.http(
        "POST", "/api/v1/users/kim/dead-letters/requeue", {"ids": [message_id, "01UNKNOWN"]}
    )
    assert status == 200 and body == {"requeued": 1, "ids": [message_id]}
    again = await kim.recv_type("notification")
    assert again["id"] == message_id  # same id: clients drop duplicates by id
    await kim.send({"type": "ack", "id": message_id, "ref": "a"})
    assert (await kim.recv_type("reply"))["acked"] == 1
    assert await dead_letters(server, "kim") == []
    assert await pending_ids(server, "kim") == []


async def test_requeue_for_an_offline_user_delivers_on_connect(start_server: Start) -> None:
    server = await start_server(**DYING)
    lee = await server.connect("lee")
    message_id = await make_dead_letter(server, lee, "lee")
    lee.close()
    await asyncio.sleep(0.1)
    status, body, _ = await server.http(
        "POST", "/api/v1/users/lee/dead-letters/requeue", {"ids": [message_id]}
    )
    assert status == 200 and body == {"requeued": 1, "ids": [message_id]}
    assert await pending_ids(server, "lee") == [message_id]
    lee = await server.connect("lee")
    assert (await lee.recv_type("notification"))["id"] == message_id


async def test_delete_dead_letters_with_delete_or_post(start_server: Start) -> None:
    server = await start_server(**DYING)
    mia = await server.connect("mia")
    first = await make_dead_letter(server, mia, "mia")
    second = await make_dead_letter(server, mia, "mia")
    status, body, _ = await raw(
        server,
        "DELETE",
        "/api/v1/users/mia/dead-letters",
        orjson.dumps({"ids": [first, "nope"]}),
        bearer(),
    )
    assert status == 200 and body == {"deleted": 1}
    status, body, _ = await server.http(
        "POST", "/api/v1/users/mia/dead-letters/delete", {"ids": [second, first]}
    )
    assert status == 200 and body == {"deleted": 1}
    assert await dead_letters(server, "mia") == []
    status, body, _ = await server.http(
        "POST", "/api/v1/users/mia/dead-letters/requeue", {"ids": [first]}
    )
    assert body == {"requeued": 0, "ids": []}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ids": []},
        {"ids": "x"},
        {"ids": [5]},
        {"ids": [""]},
        {"ids": ["x" * 65]},
        {"ids": ["x"] * 1001},
    ],
)
@pytest.mark.parametrize("action", ["requeue", "delete"])
async def test_dead_letter_ids_are_validated(server: Server, body: Any, action: str) -> None:
    status, answer, _ = await server.http("POST", f"/api/v1/users/u/dead-letters/{action}", body)
    assert_error(status, answer, 400, "bad_request", "ids")


# -- revocation ---------------------------------------------------------------------------


async def revoke(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, answer, _ = await server.http("POST", "/api/v1/revocations", body)
    assert status == 200, answer
    return dict(answer)


async def refused(server: Server, jwt: str) -> Any:
    error = await server.handshake(f"?access_token={jwt}")
    assert isinstance(error, HTTPClientError) and error.code == 401
    assert error.response is not None
    return orjson.loads(error.response.body)


async def test_revoke_by_jti_closes_holders_and_refuses_handshakes(server: Server) -> None:
    revoked = await server.connect("nia", extra={"jti": "t1"})
    kept = await server.connect("nia", extra={"jti": "t2"})
    answer = await revoke(server, {"jti": "t1"})
    assert answer["jti"] == "t1" and answer["closed"] == 1 and answer["expires_at"] is None
    assert await revoked.closed() == 4001 and revoked.close_reason == "token revoked"
    await kept.send({"type": "ping", "ref": "p"})
    assert (await kept.recv_type("pong"))["ref"] == "p"
    body = await refused(server, token("nia", extra={"jti": "t1"}))
    assert body == {"error": "unauthorized", "reason": "revoked"}
    # The auth frame with a revoked token is refused; the connection keeps its token.
    await kept.send({"type": "auth", "token": token("nia", extra={"jti": "t1"}), "ref": "a"})
    error = await kept.recv_type("error")
    assert error["code"] == "forbidden" and "revoked" in error["message"]
    await kept.send({"type": "ping", "ref": "p2"})
    assert (await kept.recv_type("pong"))["ref"] == "p2"
    status, listing, _ = await server.http("GET", "/api/v1/revocations")
    assert status == 200
    assert [entry["jti"] for entry in listing["revocations"]] == ["t1"]


async def test_revoke_user_until_covers_tokens_issued_before(server: Server) -> None:
    now = int(time.time())
    old = await server.connect("omar", extra={"iat": now - 60})
    other_user = await server.connect("pia", extra={"iat": now - 60})
    answer = await revoke(server, {"user": "omar", "until": now - 30})
    assert answer["user"] == "omar" and answer["until"] == now - 30 and answer["closed"] == 1
    assert await old.closed() == 4001
    await other_user.send({"type": "ping"})
    await other_user.recv_type("pong")
    assert (await refused(server, token("omar", extra={"iat": now - 31})))["reason"] == "revoked"
    fresh = await server.connect("omar", extra={"iat": now - 30})  # iat == until: allowed
    no_iat = jwt_without_iat("omar")
    assert (await refused(server, no_iat))["reason"] == "revoked"
    # A later cut-off closes the newer connection; an earlier one never lowers it.
    answer = await revoke(server, {"user": "omar"})
    assert answer["until"] >= now and answer["closed"] == 1
    assert await fresh.closed() == 4001
    answer = await revoke(server, {"user": "omar", "until": 1})
    assert answer["until"] >= now and answer["closed"] == 0


def jwt_without_iat(sub: str) -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


async def test_revoked_api_token_gets_401(server: Server) -> None:
    headers = bearer("ops", extra={"jti": "api-1"})
    status, _, _ = await raw(server, "GET", "/api/v1/revocations", headers=headers)
    assert status == 200
    await revoke(server, {"jti": "api-1"})
    status, body, _ = await raw(server, "GET", "/api/v1/revocations", headers=headers)
    assert_error(status, body, 401, "unauthorized")
    assert body["reason"] == "revoked"


async def test_revocations_survive_a_restart(start_server: Start) -> None:
    server = await start_server()
    await revoke(server, {"jti": "persisted", "expires_at": time.time() + 3600})
    await revoke(server, {"user": "quinn", "until": time.time() + 5})
    await revoke(server, {"jti": "gone", "expires_at": time.time() + 0.2})
    await server.service.shutdown(pace=False)
    await asyncio.sleep(0.3)
    server = await start_server()
    assert (await refused(server, token("rob", extra={"jti": "persisted"})))["reason"] == "revoked"
    assert (await refused(server, token("quinn")))["reason"] == "revoked"
    await (await server.connect("rob", extra={"jti": "gone"})).send({"type": "ping"})  # expired
    _, listing, _ = await server.http("GET", "/api/v1/revocations")
    assert [(e.get("jti"), e.get("user")) for e in listing["revocations"]] == [
        ("persisted", None),
        (None, "quinn"),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "jti or user"),
        ({"jti": "a", "user": "b"}, "jti or user"),
        ({"jti": ""}, "jti"),
        ({"jti": 5}, "jti"),
        ({"user": "u" * 257}, "user"),
        ({"jti": "a", "until": 5}, "until"),
        ({"user": "u", "until": -1}, "until"),
        ({"user": "u", "until": "soon"}, "until"),
        ({"user": "u", "expires_at": True}, "expires_at"),
    ],
)
async def test_revocation_bad_fields(server: Server, body: dict[str, Any], field: str) -> None:
    status, answer, _ = await server.http("POST", "/api/v1/revocations", body)
    assert_error(status, answer, 400, "bad_request", field)
    assert (await server.http("GET", "/api/v1/revocations"))[1] == {"revocations": []}


async def test_requeue_while_the_window_is_busy_still_reaches_the_client(
    start_server: Start,
) -> None:
    """A requeued id is older than what the window already sent: it must still go out."""
    server = await start_server(delivery={"max_attempts": 1, "ack_timeout": 0.3, "window": 1})
    una = await server.connect("una")
    old = await make_dead_letter(server, una, "una")
    _, newer, _ = await notify(server, {"to": "una", **NOTE})
    assert (await una.recv_type("notification"))["id"] == newer["id"]  # the window is full
    status, body, _ = await server.http(
        "POST", "/api/v1/users/una/dead-letters/requeue", {"ids": [old]}
    )
    assert status == 200 and body["requeued"] == 1
    await una.send({"type": "ack", "id": newer["id"]})  # frees the window
    assert (await una.recv_type("notification"))["id"] == old
