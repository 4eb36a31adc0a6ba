"""Every row of the pre-upgrade table (PROTOCOL §1), over real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.websocket import websocket_connect

from conftest import SECRET, Server, token

Start = Any


def body(error: Any) -> dict[str, Any]:
    assert isinstance(error, HTTPClientError), error
    assert error.response is not None
    return orjson.loads(error.response.body)


async def refused(
    server: Server, suffix: str = "", headers: dict[str, str] | None = None, status: int = 401
) -> dict[str, Any]:
    error = await server.handshake(suffix, headers)
    assert isinstance(error, HTTPClientError) and error.code == status, error
    return body(error)


async def test_missing_token(server: Server) -> None:
    assert await refused(server) == {"error": "unauthorized", "reason": "missing_token"}


async def test_bad_signature(server: Server) -> None:
    bad = jwt.encode({"sub": "a", "exp": time.time() + 60}, "other-secret-of-enough-length-123")
    assert (await refused(server, f"?access_token={bad}"))["reason"] == "bad_signature"


async def test_alg_none(server: Server) -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = json.dumps({"sub": "a", "exp": int(time.time()) + 60}).encode()
    payload = base64.urlsafe_b64encode(claims).rstrip(b"=").decode()
    result = await refused(server, f"?access_token={header}.{payload}.")
    assert result["reason"] == "algorithm_not_allowed"


async def test_wrong_algorithm(server: Server) -> None:
    hs512 = jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET * 2, algorithm="HS512")
    result = await refused(server, f"?access_token={hs512}")
    assert result["reason"] == "algorithm_not_allowed"


async def test_expired_and_not_yet_valid(start_server: Start) -> None:
    server = await start_server(auth={"leeway": 1.0})
    expired = token("a", ttl=-10)
    assert (await refused(server, f"?access_token={expired}"))["reason"] == "expired"
    early = token("a", extra={"nbf": int(time.time()) + 60})
    assert (await refused(server, f"?access_token={early}"))["reason"] == "not_yet_valid"
    # within the leeway: accepted
    client = await server.connect("a", extra={"nbf": int(time.time()) + 1})
    client.close()


async def test_audience_and_issuer(start_server: Start) -> None:
    server = await start_server(auth={"audience": "app", "issuer": "https://id.example"})
    good = {"aud": "app", "iss": "https://id.example"}
    client = await server.connect("a", extra=good)
    client.close()
    wrong_aud = token("a", extra={**good, "aud": "other"})
    assert (await refused(server, f"?access_token={wrong_aud}"))["reason"] == "bad_audience"
    wrong_iss = token("a", extra={**good, "iss": "https://evil"})
    assert (await refused(server, f"?access_token={wrong_iss}"))["reason"] == "bad_issuer"


async def test_missing_sub_and_exp(server: Server) -> None:
    no_sub = jwt.encode({"exp": time.time() + 60}, SECRET)
    assert (await refused(server, f"?access_token={no_sub}"))["reason"] == "missing_claim"
    no_exp = jwt.encode({"sub": "a"}, SECRET)
    assert (await refused(server, f"?access_token={no_exp}"))["reason"] == "missing_claim"
    garbage = await refused(server, "?access_token=not.a.jwt")
    assert garbage["reason"] == "malformed"


async def test_header_token(server: Server) -> None:
    client = await server.connect("alice", query=False)
    assert client.welcome["user"] == "alice"
    client.close()


def _pem_pair(kind: str) -> tuple[Any, bytes]:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public


async def test_rs256_public_key_and_algorithm_confusion(
    start_server: Start, tmp_path: Path
) -> None:
    key, public = _pem_pair("rsa")
    pem = tmp_path / "public.pem"
    pem.write_bytes(public)
    server = await start_server(
        auth={"algorithms": ["RS256", "HS256"], "public_key_file": str(pem)}
    )
    good = jwt.encode({"sub": "r", "exp": time.time() + 60}, key, algorithm="RS256")
    conn = await websocket_connect(f"{server.ws_url}?access_token={good}")
    assert orjson.loads(await conn.read_message())["user"] == "r"
    conn.close()
    # An HS256 token signed with the RSA *public key* as the HMAC secret.
    forged_header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    claims = json.dumps({"sub": "r", "exp": int(time.time()) + 60}).encode()
    forged_payload = base64.urlsafe_b64encode(claims).rstrip(b"=")
    signing_input = forged_header + b"." + forged_payload
    signature = base64.urlsafe_b64encode(
        hmac.new(public, signing_input, hashlib.sha256).digest()
    ).rstrip(b"=")
    forged = (signing_input + b"." + signature).decode()
    assert (await refused(server, f"?access_token={forged}"))["reason"] == "bad_signature"


class Jwks(tornado.web.RequestHandler):
    keys: dict[str, Any] = {}
    fetches = 0

    def get(self) -> None:
        Jwks.fetches += 1
        self.write({"keys": list(Jwks.keys.values())})


async def test_es256_jwks_rotation_by_kid(start_server: Start) -> None:
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    http = HTTPServer(tornado.web.Application([(r"/jwks", Jwks)]))
    http.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    try:
        key1, _ = _pem_pair("ec")
        key2, _ = _pem_pair("ec")
        jwk1 = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key1.public_key()))
        jwk2 = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key2.public_key()))
        Jwks.keys = {"k1": {**jwk1, "kid": "k1", "alg": "ES256", "use": "sig"}}
        Jwks.fetches = 0
        server = await start_server(
            auth={
                "algorithms": ["ES256"],
                "jwks_url": f"http://127.0.0.1:{port}/jwks",
                "jwks_min_refetch_interval": 0.0,
            }
        )

        one = jwt.encode(
            {"sub": "e", "exp": time.time() + 60}, key1, algorithm="ES256", headers={"kid": "k1"}
        )
        conn = await websocket_connect(f"{server.ws_url}?access_token={one}")
        assert orjson.loads(await conn.read_message())["user"] == "e"
        conn.close()
        # Rotation: a token with a new kid makes pushsvc refetch the key set once.
        Jwks.keys["k2"] = {**jwk2, "kid": "k2", "alg": "ES256", "use": "sig"}
        two = jwt.encode(
            {"sub": "e", "exp": time.time() + 60}, key2, algorithm="ES256", headers={"kid": "k2"}
        )
        conn = await websocket_connect(f"{server.ws_url}?access_token={two}")
        assert orjson.loads(await conn.read_message())["user"] == "e"
        conn.close()
        assert Jwks.fetches == 2
        unknown = jwt.encode(
            {"sub": "e", "exp": time.time() + 60}, key2, algorithm="ES256", headers={"kid": "nope"}
        )
        assert (await refused(server, f"?access_token={unknown}"))["reason"] == "unknown_kid"
    finally:
        http.stop()


async def test_origin_allow_list(start_server: Start) -> None:
    server = await start_server(server={"allowed_origins": ["https://*.example.com"]})
    jwt_ = token("o")
    result = await refused(server, f"?access_token={jwt_}", {"Origin": "https://evil.com"}, 403)
    assert result == {"error": "forbidden_origin"}
    for origin in ("https://app.example.com", f"http://127.0.0.1:{server.port}"):
        request = HTTPRequest(f"{server.ws_url}?access_token={jwt_}", headers={"Origin": origin})
        conn = await websocket_connect(request)
        assert orjson.loads(await conn.read_message())["type"] == "welcome"
        conn.close()


async def test_connection_caps(start_server: Start) -> None:
    server = await start_server(
        ratelimit={"max_connections_per_user": 2, "max_connections_per_ip": 3}
    )
    a1 = await server.connect("a")
    a2 = await server.connect("a")
    result = await refused(server, f"?access_token={token('a')}", status=429)
    assert result == {"error": "too_many_connections", "reason": "per_user"}
    b1 = await server.connect("b")
    result = await refused(server, f"?access_token={token('c')}", status=429)
    assert result == {"error": "too_many_connections", "reason": "per_ip"}
    a1.close()
    await a1.closed()
    for _ in range(50):  # the slot is released once the server saw the close
        if server.node.hub.reserved_users.get("a") == 1:
            break
        await asyncio.sleep(0.02)
    a3 = await server.connect("a")
    for client in (a2, a3, b1):
        client.close()


async def test_handshake_rate_per_address(start_server: Start) -> None:
    server = await start_server(ratelimit={"handshake_rate": 0.5, "handshake_burst": 2})
    for _ in range(2):
        (await server.connect("h")).close()
    error = await server.handshake(f"?access_token={token('h')}")
    assert isinstance(error, HTTPClientError) and error.code == 429
    assert body(error)["reason"] == "handshake_rate"
    assert error.response is not None and int(error.response.headers["Retry-After"]) >= 1


async def test_draining_refuses_with_503(server: Server) -> None:
    server.node.draining = True
    result = await refused(server, f"?access_token={token('d')}", status=503)
    assert result == {"error": "unavailable", "reason": "draining"}
    server.node.draining = False


@pytest.mark.parametrize("path", ["/ws"])
async def test_plain_get_without_upgrade(server: Server, path: str) -> None:
    status, _body, _headers = await server.http(
        "GET", path + f"?access_token={token('x')}", auth_header=False
    )
    assert status == 400
