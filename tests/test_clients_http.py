"""The JavaScript client and the demo page served over HTTP (pushsvc.http.clients)."""

from __future__ import annotations

from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from conftest import Server
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


async def test_type_declarations_and_demo_script(server: Server) -> None:
    types = await get(server, "/client/pushsvc.d.ts")
    assert types.code == 200
    assert types.headers["Content-Type"].startswith("application/typescript")
    assert types.body == (ROOT / "clients/js/pushsvc.d.ts").read_bytes()
    demo = await get(server, "/client/demo.js")
    assert demo.code == 200
    assert demo.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert b'from "/client/pushsvc.js"' in demo.body
    assert b"innerHTML" not in demo.body and b"insertAdjacentHTML" not in demo.body


async def test_demo_page(server: Server) -> None:
    response = await get(server, "/")
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert b'<script type="module" src="/client/demo.js">' in response.body
    head = await get(server, "/", method="HEAD")
    assert head.code == 200
    assert head.headers["Content-Length"] == str(len(response.body))


async def test_other_paths_still_404_in_json(server: Server) -> None:
    response = await get(server, "/client/other.js")
    assert response.code == 404
    assert response.headers["Content-Type"].startswith("application/json")


def test_routes_shape() -> None:
    routes = client_routes()
    assert {pattern for pattern, _, _ in routes} == {
        r"/client/pushsvc\.js",
        r"/client/pushsvc\.d\.ts",
        r"/client/demo\.js",
        r"/",
    }
