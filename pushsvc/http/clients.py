"""The JavaScript client and the demo chat page, served by pushsvc itself.

Routes (:func:`client_routes`):

- ``/client/pushsvc.js``: the client ES module (``clients/js/pushsvc.js``),
- ``/client/pushsvc.d.ts``: its type declarations,
- ``/client/sw.js``: an example service worker showing Web Push notifications,

and, only when ``demo.enabled`` is true (``pushsvc serve --dev`` sets it):

- ``/client/demo.js``: the demo page's script,
- ``/`` and ``/demo``: the demo chat page;

and, only under ``pushsvc serve --dev``:

- ``POST /dev/token`` ``{"name"}``: ``{"token"}``, an HS256 token for that name
  signed with the server's secret (the one ``--dev`` generated): anyone who can
  reach the port may call it, so it is never registered without ``--dev``.

The files are package data under ``pushsvc/http/static/``; the client's two
files there are symlinks to ``clients/js/`` (one source of truth), copied into
wheels by setuptools. They are read once and answered from memory with an
``ETag`` (``If-None-Match`` gets 304) and ``Cache-Control``: a short
``max-age`` because the URLs are not versioned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
import tornado.web

from pushsvc.auth import tokens
from pushsvc.core.node import Node
from pushsvc.http.base import ApiError, JsonHandler, bad_request
from pushsvc.protocol.codes import ApiErrorCode

#: Content type of JavaScript (RFC 9239).
JAVASCRIPT = "text/javascript; charset=utf-8"
#: Content type of TypeScript declarations (no registered type; the common one).
TYPESCRIPT = "application/typescript; charset=utf-8"
#: Seconds browsers and proxies may reuse the client without asking again.
CLIENT_MAX_AGE = 300
#: The demo page's Content-Security-Policy: its own scripts only, WebSockets to any host.
DEMO_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
#: Longest name ``POST /dev/token`` accepts (it becomes the token's ``sub`` and ``name``).
DEV_NAME_MAX = 64
#: Seconds a ``POST /dev/token`` token is valid.
DEV_TOKEN_TTL = 86400


@dataclass(frozen=True)
class Asset:
    """One served file: its bytes, ``ETag`` and headers."""

    body: bytes
    etag: str
    content_type: str
    cache_control: str


@cache
def asset(name: str, content_type: str, cache_control: str) -> Asset:
    """The package data file ``static/<name>``, read once."""
    body = resources.files("pushsvc.http").joinpath("static", name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, etag, content_type, cache_control)


class AssetHandler(tornado.web.RequestHandler):
    """``GET``/``HEAD`` of one static file with caching headers."""

    def initialize(self, name: str, content_type: str, cache_control: str) -> None:
        """``name`` under ``static/``; the answer's content type and ``Cache-Control``."""
        self.asset = asset(name, content_type, cache_control)

    def compute_etag(self) -> str | None:
        """The file's hash, so Tornado answers 304 to a matching ``If-None-Match``."""
        return self.asset.etag

    def set_default_headers(self) -> None:
        """Headers of every answer, errors included."""
        self.set_header("X-Content-Type-Options", "nosniff")

    def _asset_headers(self) -> None:
        self.set_header("Content-Type", self.asset.content_type)
        self.set_header("Cache-Control", self.asset.cache_control)
        if self.asset.content_type.startswith("text/html"):
            self.set_header("Content-Security-Policy", DEMO_CSP)
            self.set_header("Referrer-Policy", "no-referrer")
        else:
            self.set_header("Access-Control-Allow-Origin", "*")

    def get(self) -> None:
        """The file (or 304 when the client's copy is current)."""
        self._asset_headers()
        self.write(self.asset.body)

    def head(self) -> None:
        """The headers of ``GET``, without the body."""
        self._asset_headers()
        self.set_header("Content-Length", str(len(self.asset.body)))


class DevTokenHandler(JsonHandler):
    """``POST /dev/token`` ``{"name": "alice"}``: ``{"token": JWT}`` (``--dev`` only).

    The name is the token's ``sub`` (the user id) and display ``name``; no
    scope (a chat user, not an API client), default rooms, one day.
    """

    def post(self) -> None:
        """Mint a token for the name in the JSON body."""
        try:
            data = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            self.send_api_error(bad_request("body: not JSON"))
            return
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name.strip():
            self.send_api_error(bad_request("name: a non-empty string is required"))
            return
        name = name.strip()
        if len(name) > DEV_NAME_MAX or not name.isprintable():
            self.send_api_error(bad_request(f"name: up to {DEV_NAME_MAX} printable characters"))
            return
        secret = self.node.config.secret()
        if not secret:
            message = "no HS256 secret configured"
            self.send_api_error(ApiError(503, ApiErrorCode.UNAVAILABLE, message))
            return
        self.set_header("Cache-Control", "no-store")
        token = tokens.mint(secret, name, ttl=DEV_TOKEN_TTL, name=name)
        self.send_json(200, {"token": token})


Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


def client_routes(
    *, demo: bool = False, dev: bool = False, node: Node | None = None
) -> list[Route]:
    """Routes of the client module and its types; of the demo page and script when
    ``demo``; of ``POST /dev/token`` when ``dev`` (its handler gets ``node``).
    """
    client_cache = f"public, max-age={CLIENT_MAX_AGE}"

    def route(pattern: str, name: str, content_type: str, cache_control: str) -> Route:
        kwargs = {"name": name, "content_type": content_type, "cache_control": cache_control}
        return (pattern, AssetHandler, kwargs)

    routes = [
        route(r"/client/pushsvc\.js", "pushsvc.js", JAVASCRIPT, client_cache),
        route(r"/client/pushsvc\.d\.ts", "pushsvc.d.ts", TYPESCRIPT, client_cache),
        route(r"/client/sw\.js", "sw.js", JAVASCRIPT, "no-cache"),  # browsers check SWs anyway
    ]
    if demo:
        html = "text/html; charset=utf-8"
        routes += [
            route(r"/client/demo\.js", "demo.js", JAVASCRIPT, "no-cache"),
            route(r"/", "index.html", html, "no-cache"),
            route(r"/demo", "index.html", html, "no-cache"),
        ]
    if dev:
        routes.append((r"/dev/token", DevTokenHandler, {"node": node}))
    return routes
