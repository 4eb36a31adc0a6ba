"""A kit for testing plugins against a real pushsvc: a server, tokens, clients.

:func:`serve` starts a pushsvc service in this process, listening on a free
loopback port, with every installed plugin (entry points, minus
``plugins.disabled``) plus the plugin objects you pass, on its own
temporary data folder and JWT secret. :class:`TestServer` mints tokens for
it, opens :class:`TestClient` WebSockets and calls its HTTP routes. All of
it is real: sockets, SQLite store, the broker, your plugin's hooks.

With pytest (and pytest-asyncio), the fixtures of :mod:`pushsvc.pytest_plugin`
are registered automatically when pushsvc is installed::

    async def test_poke(pushsvc_server):
        ann = await pushsvc_server.connect("ann")
        ben = await pushsvc_server.connect("ben")
        reply = await ann.request({"type": "poke", "to": "ben"})
        assert (await ben.recv_type("poke"))["id"] == reply["id"]

Without pytest::

    async with serve(("poke", my_plugin), config={"ratelimit": {"rate": 100}}) as server:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import tornado.netutil
from prometheus_client import CollectorRegistry
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from pushsvc import app
from pushsvc import config as config_module
from pushsvc.auth import tokens
from pushsvc.core.node import Node
from pushsvc.plugin.manager import load_plugins

__all__ = ["HttpResponse", "TestClient", "TestServer", "serve"]

#: Seconds a receive waits by default before failing the test.
TIMEOUT = 5.0


class TestClient:
    """A WebSocket connection to the test server, with JSON helpers.

    Every wait is bounded (``timeout`` seconds, :data:`TIMEOUT` by default).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, connection: WebSocketClientConnection, welcome: dict[str, Any]) -> None:
        self.connection = connection  # the Tornado WebSocket
        self.welcome = welcome  # the server's ``welcome`` frame
        self.session: str = welcome["session"]  # this connection's session id
        self.user: str = welcome["user"]  # who is connected
        self._refs = itertools.count(1)

    async def send(self, frame: Mapping[str, Any] | str | bytes, binary: bool = False) -> None:
        """Send a frame: a mapping is encoded as JSON; text and bytes go as they are."""
        data = frame if isinstance(frame, str | bytes) else orjson.dumps(dict(frame)).decode()
        await self.connection.write_message(data, binary=binary)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        """The next frame, decoded; None when the server closed the connection.

        Raises ``TimeoutError`` when nothing arrives within ``timeout``.
        """
        message = await asyncio.wait_for(self.connection.read_message(), timeout)
        return None if message is None else orjson.loads(message)

    async def recv_type(self, *types: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Skip frames until one of ``types`` arrives; fails if the connection closes."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError(f"closed ({self.close_code}) while waiting for {types}")
            if frame["type"] in types:
                return frame

    async def request(self, frame: Mapping[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref``; its ``reply``, or its ``error`` frame."""
        ref = f"t{next(self._refs)}"
        await self.send({**frame, "ref": ref})
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.recv_type("reply", "error", timeout=deadline - time.monotonic())
            if answer.get("ref") == ref:
                return answer

    async def join(self, room: str) -> dict[str, Any]:
        """Join ``room``; the reply (fails on an ``error``)."""
        answer = await self.request({"type": "join", "room": room})
        if answer["type"] != "reply":
            raise AssertionError(f"join {room!r} refused: {answer}")
        return answer

    async def ack(self, *ids: str) -> int:
        """Ack at-least-once messages; how many the server settled."""
        answer = await self.request({"type": "ack", "ids": list(ids)})
        if answer["type"] != "reply":
            raise AssertionError(f"ack refused: {answer}")
        return int(answer["acked"])

    async def expect_nothing(self, seconds: float = 0.3, ignore: Sequence[str] = ()) -> None:
        """Fail if a frame (other than the ``ignore`` types) arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.recv(left)
            except TimeoutError:
                return
            if frame is not None and frame["type"] not in ignore:
                raise AssertionError(f"unexpected frame {frame}")

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait until the server closes the connection; its close code."""
        deadline = time.monotonic() + timeout
        while await asyncio.wait_for(self.connection.read_message(), deadline - time.monotonic()):
            pass
        return self.connection.close_code

    @property
    def close_code(self) -> int | None:
        """The close code, once closed."""
        return self.connection.close_code

    def close(self) -> None:
        """Close the connection (the server sees a client close)."""
        self.connection.close()


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An HTTP answer: status, decoded JSON body (text if not JSON, None if empty), headers."""

    status: int
    body: Any
    headers: Mapping[str, str]


class TestServer:
    """A running pushsvc service (see :func:`serve`)."""

    __test__ = False  # not a pytest test class

    def __init__(self, service: app.Service, secret: str) -> None:
        self.service = service  # the running service
        self.node: Node = service.node  # the node (config, metrics, plugins...)
        self.secret = secret  # the HS256 secret its tokens are signed with
        self.url = f"http://127.0.0.1:{service.port}"  # base URL of the HTTP routes
        self.ws_url = f"ws://127.0.0.1:{service.port}/ws"  # the WebSocket endpoint
        self._clients: list[TestClient] = []

    def token(self, user: str = "alice", **claims: Any) -> str:
        """A token for ``user``: ``scope="publish notify"``, ``rooms=[...]``, ``ttl=``..."""
        return tokens.mint(self.secret, user, **claims)

    async def connect(
        self, user: str = "alice", *, token: str | None = None, **claims: Any
    ) -> TestClient:
        """Open a WebSocket as ``user`` (or with ``token`` as given) and read its ``welcome``.

        ``claims`` go into the minted token (``rooms=["*"]``, ``scope="notify"``).
        """
        jwt = token if token is not None else self.token(user, **claims)
        request = HTTPRequest(self.ws_url, headers={"Authorization": f"Bearer {jwt}"})
        connection = await asyncio.wait_for(websocket_connect(request), TIMEOUT)
        message = await asyncio.wait_for(connection.read_message(), TIMEOUT)
        welcome = orjson.loads(message) if message is not None else None
        if not welcome or welcome.get("type") != "welcome":
            raise AssertionError(f"expected a welcome frame, got {welcome!r}")
        client = TestClient(connection, welcome)
        self._clients.append(client)
        return client

    async def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Call a route. Without ``token``, one for ``backend`` with scope ``publish``
        (what the server API needs); ``token=""`` sends no ``Authorization``."""
        sent = dict(headers or {})
        jwt = self.token("backend", scope="publish") if token is None else token
        if jwt:
            sent.setdefault("Authorization", f"Bearer {jwt}")
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        if method in ("POST", "PUT", "PATCH") and data is None:
            data = b"{}"
        request = HTTPRequest(
            self.url + path, method=method, body=data, headers=sent, request_timeout=TIMEOUT
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        text = response.body or b""
        try:
            parsed = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            parsed = text.decode(errors="replace")
        return HttpResponse(response.code, parsed, dict(response.headers))

    async def stop(self) -> None:
        """Close the clients and shut the service down (idempotent)."""
        for client in self._clients:
            client.close()
        if not self.service.stopped.is_set():
            await self.service.shutdown(pace=False)


@contextlib.asynccontextmanager
async def serve(
    *plugins: tuple[str, object],
    config: Mapping[str, Mapping[str, Any]] | None = None,
    data_dir: str | Path | None = None,
) -> AsyncIterator[TestServer]:
    """Run a pushsvc service for the ``async with`` block.

    Args:
        plugins: ``(name, module_or_object)`` plugins to register besides the
            installed ones (``name`` is what ``plugins.disabled``, metrics
            and logs call it).
        config: config sections, as in the TOML file:
            ``{"ratelimit": {"rate": 100}, "plugins": {"typing": {"rate": 5}}}``.
            ``plugins.disabled`` applies to the installed plugins. Several
            servers on one Redis (``broker.url``) form a cluster; give them
            one ``auth.jwt_secret`` (default: a random one per server).
        data_dir: the state folder; default a temporary one, removed afterwards.
    """
    secret = secrets.token_urlsafe(32)
    folder = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="pushsvc-"))
    sections: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(folder), "host": "127.0.0.1"},
        "auth": {"jwt_secret": secret},
        "log": {"access_log": False},
    }
    for name, values in (config or {}).items():
        sections.setdefault(name, {}).update(values)
    secret = sections["auth"].get("jwt_secret", secret)  # nodes of one test cluster share one
    try:
        built = config_module.build([sections])
        loaded = load_plugins(built.plugins.disabled, built.auth.default_rooms, extra=plugins)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        try:
            service = await app.start(
                built, registry=CollectorRegistry(), plugins=loaded, sockets=sockets
            )
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        server = TestServer(service, secret)
        try:
            yield server
        finally:
            await server.stop()
    finally:
        if data_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
