"""The JavaScript client and the demo chat page, served by pushsvc itself.

Routes (:func:`client_routes`):

- ``/client/pushsvc.js``: the client ES module (``clients/js/pushsvc.js``),
- ``/client/pushsvc.d.ts``: its type declarations,
- ``/client/demo.js``: the demo page's script,
- ``/``: the demo chat page.

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

import tornado.web

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


Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


def client_routes() -> list[Route]:
    """Routes of the client module, its types, the demo script and the demo page ``/``."""
    client_cache = f"public, max-age={CLIENT_MAX_AGE}"

    def route(pattern: str, name: str, content_type: str, cache_control: str) -> Route:
        kwargs = {"name": name, "content_type": content_type, "cache_control": cache_control}
        return (pattern, AssetHandler, kwargs)

    return [
        route(r"/client/pushsvc\.js", "pushsvc.js", JAVASCRIPT, client_cache),
        route(
            r"/client/pushsvc\.d\.ts",
            "pushsvc.d.ts",
            "application/typescript; charset=utf-8",
            client_cache,
        ),
        route(r"/client/demo\.js", "demo.js", JAVASCRIPT, "no-cache"),
        route(r"/", "index.html", "text/html; charset=utf-8", "no-cache"),
    ]
