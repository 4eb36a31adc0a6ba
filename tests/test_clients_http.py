"""The JavaScript client and the demo page served over HTTP (pushsvc.http.clients)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.websocket import websocket_connect

from conftest import SECRET, Client, Server
from pushsvc.http.clients import client_routes

ROOT = Path(__file__).resolve().parent.parent


async def get(server: Server, path: str, method: str = "GET", **headers: str) -> HTTPResponse:
    request = HTTPRequest(server.base + path, method=method, headers=headers)
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def test_client_module_is_javascript_with_caching_headers(server: Server) -> None:
    response = await get(server, "/client/pushsvc.js")
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["Cache-Control"] == "public, max-age=300"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.body == (ROOT / "clients/js/pushsvc.js").read_bytes()
    etag = response.headers["Etag"]
    again = await get(server, "/client/pushsvc.js", **{"If-None-Match": etag})
    assert again.code == 304
    assert again.body == b""


async def test_type_declarations(server: Server) -> None:
    types = await get(server, "/client/pushsvc.d.ts")
    assert types.code == 200
    assert types.headers["Content-Type"].startswith("application/typescript")
    assert types.body == (ROOT / "clients/js/pushsvc.d.ts").read_bytes()


async def test_demo_script(start_server: Any) -> None:
    server = await start_server(demo={"enabled": True})
    demo = await get(server, "/client/demo.js")
    assert demo.code == 200
    assert demo.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert b'from "/client/pushsvc.js"' in demo.body
    assert b"innerHTML" not in demo.body and b"insertAdjacentHTML" not in demo.body
    assert b"outerHTML" not in demo.body and b"document.write" not in demo.body


@pytest.mark.parametrize("path", ["/", "/demo"])
async def test_demo_page(start_server: Any, path: str) -> None:
    server = await start_server(demo={"enabled": True})
    response = await get(server, path)
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert b'<script type="module" src="/client/demo.js">' in response.body
    assert b'name="viewport"' in response.body
    head = await get(server, path, method="HEAD")
    assert head.code == 200
    assert head.headers["Content-Length"] == str(len(response.body))


@pytest.mark.parametrize("path", ["/", "/demo", "/client/demo.js", "/dev/token"])
async def test_demo_is_off_by_default(server: Server, path: str) -> None:
    assert server.service.config.demo.enabled is False
    response = await get(server, path)
    assert response.code == 404
    assert response.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(response.body)["error"] == "not_found"
    client = await get(server, "/client/pushsvc.js")  # the client is served either way
    assert client.code == 200


async def test_dev_token_only_with_dev(start_server: Any) -> None:
    demo_only = await start_server(demo={"enabled": True})
    code, _, _ = await demo_only.http("POST", "/dev/token", {"name": "alice"})
    assert code == 404
    server = await start_server(dev=True)
    code, body, headers = await server.http("POST", "/dev/token", {"name": " Alice B "})
    assert code == 200, body
    assert headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "Alice B" and claims["name"] == "Alice B"
    assert "scope" not in claims or not claims["scope"]
    url = f"{server.ws_url}?access_token={body['token']}"
    ws = Client(await websocket_connect(url))
    welcome = await ws.recv_type("welcome")
    assert welcome["user"] == "Alice B"
    ws.close()
    for bad in ({}, {"name": ""}, {"name": 5}, {"name": "x" * 65}, {"name": "a\nb"}, b"nope"):
        code, body, _ = await server.http("POST", "/dev/token", bad)
        assert code == 400, (bad, body)
        assert body["error"] == "bad_request" and body["message"].split(":")[0] in ("name", "body")


async def test_other_paths_still_404_in_json(server: Server) -> None:
    response = await get(server, "/client/other.js")
    assert response.code == 404
    assert response.headers["Content-Type"].startswith("application/json")


def test_routes_shape() -> None:
    always = {r"/client/pushsvc\.js", r"/client/pushsvc\.d\.ts", r"/client/sw\.js"}
    assert {pattern for pattern, _, _ in client_routes()} == always
    demo = {r"/client/demo\.js", r"/", r"/demo"}
    assert {pattern for pattern, _, _ in client_routes(demo=True)} == always | demo
    assert {pattern for pattern, _, _ in client_routes(dev=True)} == always | {r"/dev/token"}


async def test_example_service_worker(server: Server) -> None:
    """/client/sw.js: the Web Push example service worker (docs/webpush.md), always served."""
    response = await get(server, "/client/sw.js")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/javascript")
    body = response.body.decode()
    assert 'addEventListener("push"' in body and "showNotification" in body
    assert 'addEventListener("notificationclick"' in body and "focus()" in body
