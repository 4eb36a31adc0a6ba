"""Shared fixtures: a real pushsvc on a free loopback port, real WebSocket clients."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import tornado.netutil
from prometheus_client import CollectorRegistry
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from pushsvc import app
from pushsvc import config as config_module
from pushsvc.auth import tokens
from pushsvc.plugin.manager import load_plugins

#: ``redis_server``, ``redis_url`` and ``fresh_redis``: a real redis-server per test or session.
pytest_plugins = ["redis_server"]

#: Tests of the WebSocket transport run on both event loops: pushsvc serves on uvloop
#: when it is installed, and on asyncio's own loop otherwise.
BOTH_LOOPS = frozenset({"test_wire.py", "test_upgrade.py", "test_gateway.py", "test_pacing.py"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop for every test; uvloop too for the modules in ``BOTH_LOOPS``."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.path.name in BOTH_LOOPS:
        try:
            import uvloop
        except ImportError:  # no uvloop on Windows: the asyncio runs still cover the code
            return factories
        factories["uvloop"] = uvloop.new_event_loop
    return factories


SECRET = "test-secret-that-is-long-enough-for-hs256!"
BIN = Path(sys.executable).parent


def token(sub: str = "alice", **kwargs: Any) -> str:
    """An HS256 token for ``sub`` signed with the test secret."""
    return tokens.mint(SECRET, sub, **kwargs)


#: Async in-memory broker: delivery on a later loop pass, as over a network.
ASYNC_BROKER = "memory://?delivery=async"


def store_url_for(url: str) -> str:
    """``url`` with a key prefix of the running test's own when it names a Redis.

    One Redis then serves a whole run (``PUSHSVC_STORE__URL=redis://... pytest``):
    the servers of a test, in-process or spawned, share their keys (as nodes
    do), and no test sees another's.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return url
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    prefix = "t" + hashlib.sha1(test.encode(), usedforsecurity=False).hexdigest()[:16] + ":"
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def make_config(data_dir: Path, **sections: dict[str, Any]) -> config_module.Config:
    """A config for tests: test secret, data dir, fast timers; ``sections`` override.

    ``PUSHSVC_BROKER__URL`` in the environment sets the broker of in-process
    servers too (spawned ones read it themselves), so a whole test file runs
    on another broker: ``PUSHSVC_BROKER__URL='memory://?delivery=async' pytest``.
    ``PUSHSVC_STORE__URL`` sets the store the same way (see :func:`store_url_for`).
    """
    base: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(data_dir), "heartbeat": 25.0},
        "auth": {"jwt_secret": SECRET},
        "log": {"access_log": False},
    }
    if os.environ.get("PUSHSVC_BROKER__URL"):
        base["broker"] = {"url": os.environ["PUSHSVC_BROKER__URL"]}
    if os.environ.get("PUSHSVC_STORE__URL"):
        base["store"] = {"url": store_url_for(os.environ["PUSHSVC_STORE__URL"])}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_module.build([base])


class Client:
    """A real WebSocket client with JSON helpers."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.welcome: dict[str, Any] = {}

    async def send(self, frame: dict[str, Any] | str | bytes, binary: bool = False) -> None:
        data = orjson.dumps(frame).decode() if isinstance(frame, dict) else frame
        await self.conn.write_message(data, binary=binary)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next frame decoded, or None when the connection closed."""
        message = await asyncio.wait_for(self.conn.read_message(), timeout)
        return None if message is None else orjson.loads(message)

    async def recv_type(self, *types: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip frames until one of ``types`` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            assert frame is not None, f"closed ({self.close_code}) while waiting for {types}"
            if frame["type"] in types:
                return frame

    async def expect_nothing(self, seconds: float = 0.3, ignore: tuple[str, ...] = ()) -> None:
        """Assert no frame (other than ``ignore`` types) arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.recv(left)
            except TimeoutError:
                return
            assert frame is None or frame["type"] in ignore, f"unexpected frame {frame}"

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; returns the close code."""
        deadline = time.monotonic() + timeout
        while await asyncio.wait_for(self.conn.read_message(), deadline - time.monotonic()):
            pass
        return self.conn.close_code

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason

    def close(self) -> None:
        self.conn.close()


class Server:
    """A started service with helpers to connect and call it."""

    def __init__(self, service: app.Service) -> None:
        self.service = service
        self.node = service.node
        self.port = service.port
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    async def connect(
        self,
        sub: str = "alice",
        *,
        welcome: bool = True,
        query: bool = True,
        headers: dict[str, str] | None = None,
        **claims: Any,
    ) -> Client:
        jwt = token(sub, **claims)
        if query:
            request = HTTPRequest(f"{self.ws_url}?access_token={jwt}", headers=headers)
        else:
            request = HTTPRequest(
                self.ws_url, headers={"Authorization": f"Bearer {jwt}", **(headers or {})}
            )
        client = Client(await websocket_connect(request, max_message_size=50 * 1024 * 1024))
        if welcome:
            frame = await client.recv()
            assert frame is not None and frame["type"] == "welcome", frame
            client.welcome = frame
        return client

    async def handshake(
        self, url_suffix: str = "", headers: dict[str, str] | None = None
    ) -> HTTPResponse | HTTPClientError:
        """A raw upgrade request; returns the HTTP error for refused handshakes."""
        request = HTTPRequest(self.ws_url + url_suffix, headers=headers)
        try:
            conn = await websocket_connect(request)
        except HTTPClientError as exc:
            return exc
        conn.close()
        raise AssertionError("handshake was accepted")

    async def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        sub: str = "backend",
        scope: str = "publish",
        headers: dict[str, str] | None = None,
        auth_header: bool = True,
    ) -> tuple[int, Any, dict[str, str]]:
        all_headers = dict(headers or {})
        if auth_header:
            all_headers.setdefault("Authorization", f"Bearer {token(sub, scope=scope)}")
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        if method in ("POST", "PUT") and data is None:
            data = b"{}"
        request = HTTPRequest(self.base + path, method=method, body=data, headers=all_headers)
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        text = response.body or b""
        try:
            parsed = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            parsed = text.decode()
        return response.code, parsed, dict(response.headers)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def start_server(data_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start services with custom config sections; all are stopped at teardown.

    ``extra`` registers plugin objects directly (``load_plugins(extra=...)``);
    ``dev`` serves the ``pushsvc serve --dev`` routes too.
    """
    services: list[app.Service] = []

    async def start(
        *, extra: Sequence[tuple[str, object]] = (), dev: bool = False, **sections: dict[str, Any]
    ) -> Server:
        config = make_config(data_dir, **sections)
        plugins = load_plugins(config.plugins.disabled, config.auth.default_rooms, extra=extra)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        service = await app.start(
            config, registry=CollectorRegistry(), plugins=plugins, sockets=sockets, dev=dev
        )
        services.append(service)
        return Server(service)

    yield start
    for service in services:
        if not service.stopped.is_set():
            await service.shutdown(pace=False)


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> Server:
    server: Server = await start_server()
    return server


# -- subprocesses ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``pushsvc serve`` as a child process."""

    def __init__(self, proc: subprocess.Popen[str], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.base = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def spawn_server(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait: bool = True,
    name: str = "server",
    pass_fds: tuple[int, ...] = (),
) -> ServerProcess:
    """Run ``pushsvc serve`` and wait for its "listening" line."""
    port = port or free_port()
    log_path = tmp_path / f"{name}.log"
    full_env = {**os.environ, "PUSHSVC_JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
    if full_env.get("PUSHSVC_STORE__URL"):
        full_env["PUSHSVC_STORE__URL"] = store_url_for(full_env["PUSHSVC_STORE__URL"])
    command = [str(BIN / "pushsvc"), "serve", "--port", str(port), *args]
    if "--data-dir" not in args:
        command += ["--data-dir", str(tmp_path / "data")]
    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        text=True,
        pass_fds=pass_fds,
    )
    server = ServerProcess(proc, port, log_path)
    if wait:
        wait_until_listening(server)
    return server


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``pushsvc serve`` subprocesses; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs: Any) -> ServerProcess:
        server = spawn_server(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield start
    kill_all(started)


def wait_until_listening(server: ServerProcess, seconds: float = 20) -> None:
    """Wait for the "listening on" line; fail with the log if the server died or hung."""
    deadline = time.monotonic() + seconds
    while "listening on" not in server.log():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server did not start:\n{server.log()}")
        time.sleep(0.05)


def kill_all(servers: list[ServerProcess]) -> None:
    """Kill the servers still running (fixture teardown)."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def which(binary: str) -> str | None:
    return shutil.which(binary)


def find_id(text: str) -> list[str]:
    return re.findall(r"[0-9A-HJKMNP-TV-Z]{26}", text)
