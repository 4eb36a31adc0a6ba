"""Revocations cross nodes: a REVOKED envelope on ``control:revocations``.

Over a real ``pushsvc serve`` process (both in-memory broker modes), then the
envelope itself: one from the broker (another node's revocation) is applied
like the local API path, and malformed ones are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import ASYNC_BROKER, Client, Server, ServerProcess, token
from pushsvc.auth import revocation
from pushsvc.broker import REVOCATIONS_CHANNEL, Envelope, EnvelopeKind
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.store import Revocation


async def connect(base: str, jwt: str) -> Client:
    client = Client(await websocket_connect(f"{base}?access_token={jwt}"))
    frame = await client.recv()
    assert frame is not None and frame["type"] == "welcome", frame
    return client


async def refused_reason(ws_url: str, jwt: str) -> str:
    with pytest.raises(HTTPClientError) as refused:
        (await websocket_connect(f"{ws_url}?access_token={jwt}")).close()
    assert refused.value.code == 401 and refused.value.response is not None
    return str(orjson.loads(refused.value.response.body)["reason"])


@pytest.mark.parametrize("url", ["memory://", ASYNC_BROKER], ids=["sync", "async"])
async def test_api_revocation_closes_and_refuses_over_a_real_server(
    spawn: Callable[..., ServerProcess], url: str
) -> None:
    server = spawn(env={"PUSHSVC_BROKER__URL": url})
    now = int(time.time())
    victim_token = token("vera", extra={"iat": now - 60})
    victim = await connect(server.ws_url, victim_token)
    bystander = await connect(server.ws_url, token("walt"))
    request = HTTPRequest(
        f"{server.base}/api/v1/revocations",
        method="POST",
        body=orjson.dumps({"user": "vera"}),
        headers={"Authorization": f"Bearer {token('ops', scope='publish')}"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    body = orjson.loads(response.body)
    assert response.code == 200 and body["user"] == "vera" and body["closed"] == 1, body
    assert await victim.closed() == 4001 and victim.close_reason == DISCONNECTS.revoked.reason
    assert await refused_reason(server.ws_url, victim_token) == revocation.AUTH_REASON
    await bystander.send({"type": "ping", "ref": "p"})
    assert (await bystander.recv_type("pong"))["ref"] == "p"
    bystander.close()


def user_revocation(user: str, until: float) -> Revocation:
    return Revocation(revocation.USER, user, until, until, None)


async def test_revoked_envelope_from_the_broker_is_applied(server: Server) -> None:
    """Another node's revocation (not in this node's store) closes and refuses here."""
    held = await server.connect("zoe", extra={"jti": "z-1"})
    other = await server.connect("zoe", extra={"jti": "z-2"})
    entry = Revocation(revocation.JTI, "z-1", None, time.time(), None)
    await server.node.broker.publish(REVOCATIONS_CHANNEL, revocation.to_envelope(entry))
    assert await held.closed() == 4001 and held.close_reason == DISCONNECTS.revoked.reason
    body = await server.handshake(f"?access_token={token('zoe', extra={'jti': 'z-1'})}")
    assert isinstance(body, HTTPClientError) and body.code == 401
    status, listing, _ = await server.http("GET", "/api/v1/revocations")
    assert status == 200 and [e.get("jti") for e in listing["revocations"]] == ["z-1"]
    await other.send({"type": "ping", "ref": "p"})
    assert (await other.recv_type("pong"))["ref"] == "p"


async def test_local_revocation_goes_through_the_envelope(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = server.node
    published: list[tuple[str, Envelope]] = []
    applied: list[Envelope] = []
    publish, on_revoked = node.broker.publish, node.on_revoked

    async def record_publish(channel: str, envelope: Envelope) -> None:
        published.append((channel, envelope))
        await publish(channel, envelope)

    def record_apply(envelope: Envelope) -> int:
        applied.append(envelope)
        return on_revoked(envelope)

    monkeypatch.setattr(node.broker, "publish", record_publish)
    monkeypatch.setattr(node, "on_revoked", record_apply)
    client = await server.connect("yan")
    status, body, _ = await server.http("POST", "/api/v1/revocations", {"user": "yan"})
    assert status == 200 and body["closed"] == 1
    assert await client.closed() == 4001
    revoked = [(ch, e) for ch, e in published if e.kind is EnvelopeKind.REVOKED]
    assert [ch for ch, _ in revoked] == [REVOCATIONS_CHANNEL]
    assert applied[0] == revoked[0][1]  # the local path applied the envelope it published
    assert revocation.from_envelope(applied[0]).subject == "yan"


async def test_malformed_revocation_envelopes_are_dropped(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "pushsvc.node")
    client = await server.connect("xia")
    bad = [
        Envelope(EnvelopeKind.REVOKED, "", "", b'{"kind": "user", "subject": "xia"}'),
        Envelope(EnvelopeKind.REVOKED, "", "", b'{"kind": "nope", "subject": "xia"}'),
        Envelope(EnvelopeKind.REVOKED, "", "", b"[]"),
        Envelope(EnvelopeKind.LIVE, "chat", "", b"{}"),
    ]
    for envelope in bad:
        await server.node.broker.publish(REVOCATIONS_CHANNEL, envelope)
    await asyncio.sleep(0.05)
    assert len(server.node.revocations) == 0
    assert caplog.text.count("malformed revocation envelope") == 3
    assert "unexpected envelope kind" in caplog.text
    await client.send({"type": "ping", "ref": "p"})
    assert (await client.recv_type("pong"))["ref"] == "p"


@pytest.mark.parametrize(
    "entry",
    [
        Revocation(revocation.JTI, "j-1", None, 1000.5, None),
        Revocation(revocation.JTI, "j-2", None, 1000.0, 2000.0),
        Revocation(revocation.USER, "u", 999.0, 1000.0, None),
    ],
)
def test_revocation_envelope_round_trips(entry: Revocation) -> None:
    envelope = revocation.to_envelope(entry)
    assert envelope.kind is EnvelopeKind.REVOKED
    assert revocation.from_envelope(Envelope.from_bytes(envelope.to_bytes())) == entry


async def test_a_user_cut_off_only_grows_whatever_the_arrival_order(server: Server) -> None:
    later, earlier = user_revocation("ula", 2000.0), user_revocation("ula", 1000.0)
    for entry in (later, earlier):
        server.node.on_revoked(revocation.to_envelope(entry))
    assert [e.until for e in server.node.revocations.listing()] == [2000.0]
