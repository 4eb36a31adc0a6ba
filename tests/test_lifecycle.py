"""The service lifecycle under systemd, emulated with real processes and sockets.

``pushsvc serve`` runs as a child process; the tests play systemd's part:
a unix datagram socket receives the sd_notify states, a listening socket is
handed over as fd 3 for socket activation, and signals stop and reload it.
tests/test_systemd_real.py shows the same behaviour under a real systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import BIN, SECRET, Client, ServerProcess, kill_all, token, wait_until_listening
from pushsvc.auth import tokens

REASON = re.compile(r"^server draining; reconnect in (\d+(?:\.\d+)?)s$")


# -- helpers -----------------------------------------------------------------------


class NotifyListener:
    """Plays systemd's ``$NOTIFY_SOCKET``: collects sd_notify datagrams with their time."""

    def __init__(self) -> None:
        self.address = f"@pushsvc-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.messages: list[tuple[float, list[str]]] = []  # (monotonic time, states)
        self._arrived = asyncio.Event()
        self.on_message: Callable[[list[str]], None] | None = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            states = data.decode().split("\n")
            self.messages.append((time.monotonic(), states))
            if self.on_message is not None:
                self.on_message(states)
            self._arrived.set()

    def states(self) -> list[str]:
        """Every state received so far, in order."""
        return [state for _, states in self.messages for state in states]

    def times(self, state: str) -> list[float]:
        """When ``state`` (exactly) arrived."""
        return [at for at, states in self.messages if state in states]

    async def wait_for(self, state: str, timeout: float = 20.0, count: int = 1) -> float:
        """Wait until ``state`` has arrived ``count`` times; returns when it first did."""
        deadline = time.monotonic() + timeout
        while len(self.times(state)) < count:
            self._arrived.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"no {state} within {timeout}s; got {self.states()}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return self.times(state)[0]

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def notify_socket() -> Any:
    listener = NotifyListener()
    yield listener
    listener.close()


async def connect(
    server: ServerProcess | str, jwt: str | None = None, sub: str = "alice"
) -> Client:
    """A WebSocket client, welcomed."""
    url = server if isinstance(server, str) else server.ws_url
    conn = await websocket_connect(HTTPRequest(f"{url}?access_token={jwt or token(sub)}"))
    client = Client(conn)
    frame = await client.recv()
    assert frame is not None and frame["type"] == "welcome", frame
    client.welcome = frame
    return client


async def http(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the HTTP API with a ``publish`` token; returns (status, parsed body)."""
    data = None if body is None else orjson.dumps(body)
    request = HTTPRequest(
        server.base + path,
        method=method,
        body=data,
        headers={"Authorization": f"Bearer {token('backend', scope='publish')}"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, orjson.loads(response.body) if response.body else None


async def wait_log(server: ServerProcess, text: str, timeout: float = 10.0, count: int = 1) -> str:
    """Wait until ``text`` appears ``count`` times in the server's log; returns the log."""
    deadline = time.monotonic() + timeout
    while (log := server.log()).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log}"
        assert server.proc.poll() is None, f"server exited:\n{log}"
        await asyncio.sleep(0.05)
    return log


async def wait_exit(server: ServerProcess, timeout: float = 30.0) -> int:
    """The exit status, waiting without blocking the loop."""
    deadline = time.monotonic() + timeout
    while (code := server.proc.poll()) is None:
        assert time.monotonic() < deadline, f"still running:\n{server.log()}"
        await asyncio.sleep(0.02)
    return code


def write_config(path: Path, text: str) -> str:
    """Write a TOML config atomically (the service may re-read it any time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return str(path)


def listener_socket() -> socket.socket:
    """A listening TCP socket, as a systemd ``.socket`` unit holds it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``pushsvc serve`` socket-activated: the socket as fd 3, LISTEN_FDS, LISTEN_PID."""
    started: list[ServerProcess] = []

    def start(sock: socket.socket, name: str = "activated", wait: bool = True) -> ServerProcess:
        fd = sock.fileno()
        port = sock.getsockname()[1]
        # The wrapper moves the socket to fd 3 and sets LISTEN_PID to its own pid,
        # which exec hands on to pushsvc (sh can't: dash redirects fds 0-9 only).
        command = [sys.executable, "-c", ACTIVATE, str(fd), str(BIN / "pushsvc"), "serve"]
        command += ["--data-dir", str(tmp_path / "data"), "--port", "1"]  # --port unused
        log_path = tmp_path / f"{name}.log"
        env = {**os.environ, "PUSHSVC_JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, pass_fds=(fd,)
            )
        server = ServerProcess(proc, port, log_path)  # type: ignore[arg-type]
        started.append(server)
        if wait:
            wait_until_listening(server)
        return server

    yield start
    kill_all(started)


# -- sd_notify and the watchdog ----------------------------------------------------------


def lock_database(data_dir: Path) -> sqlite3.Connection:
    """Create the store's file and hold an exclusive lock on it, so opening it waits."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "pushsvc.sqlite3", isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS held (x)")
    db.execute("BEGIN EXCLUSIVE")
    return db


async def test_ready_watchdog_status_stopping(
    spawn: Callable[..., ServerProcess], notify_socket: NotifyListener, tmp_path: Path
) -> None:
    """READY=1 only once the port answers and the store is open; WATCHDOG=1 every
    half WATCHDOG_USEC from the loop; STATUS= counts connections; STOPPING=1 on SIGTERM."""
    port_at_ready: list[bool] = []

    def on_message(states: list[str]) -> None:
        # Checked inside the datagram callback: the port must answer right now.
        if "READY=1" in states and not port_at_ready:
            with socket.socket() as probe:
                port_at_ready.append(probe.connect_ex(("127.0.0.1", server.port)) == 0)

    notify_socket.on_message = on_message
    held = lock_database(tmp_path / "data")  # the store cannot open until released
    env = {
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "1000000",
        "PUSHSVC_STORE__BUSY_TIMEOUT": "30",
    }
    server = spawn(env=env, wait=False)
    await asyncio.sleep(1.5)
    assert "READY=1" not in notify_socket.states(), "READY before the store was open"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "listening before the store"
    held.rollback()
    held.close()
    released = time.monotonic()
    ready = await notify_socket.wait_for("READY=1")
    assert ready > released
    assert port_at_ready == [True]
    assert "listening on" in server.log()
    status, body = await http(server, "GET", "/readyz")
    assert status == 200 and body["checks"]["store"] is True

    client = await connect(server)
    await asyncio.sleep(3.0)
    pings = [at for at in notify_socket.times("WATCHDOG=1") if at > ready]
    assert len(pings) >= 4, pings  # every 0.5 s
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0
    assert "STATUS=serving 1 connections" in notify_socket.states()

    server.proc.send_signal(signal.SIGTERM)
    await notify_socket.wait_for("STOPPING=1", timeout=5)
    assert await client.closed(timeout=15) == 1001
    assert await wait_exit(server) == 0
    stopping = notify_socket.times("STOPPING=1")[0]
    assert any(
        "STATUS=draining" in s
        for at, states in notify_socket.messages
        if at >= stopping
        for s in states
    )


# -- socket activation -------------------------------------------------------------------


async def test_socket_activation(activated: Callable[..., ServerProcess]) -> None:
    """The child serves the socket passed as fd 3 (LISTEN_FDS=1, LISTEN_PID = its pid)."""
    sock = listener_socket()
    try:
        server = activated(sock)
        assert f"127.0.0.1:{server.port}" in server.log()
        client = await connect(server)
        await client.send({"type": "ping", "ref": "p"})
        assert (await client.recv_type("pong"))["ref"] == "p"
        client.close()
        assert server.terminate() == 0
    finally:
        sock.close()


async def test_socket_activation_loses_no_connection_attempt(
    activated: Callable[..., ServerProcess],
) -> None:
    """Connections made while no process serves the socket wait in the kernel backlog
    and are served by the next process: before the first start and across a restart."""
    sock = listener_socket()
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    try:
        early = asyncio.ensure_future(connect(url, sub="early"))
        await asyncio.sleep(0.3)  # connected at TCP level, request sent, nobody accepts
        assert not early.done()
        first = activated(sock, name="first")
        client = await asyncio.wait_for(early, 10)
        assert client.welcome["user"] == "early"
        first.proc.send_signal(signal.SIGTERM)
        assert await client.closed(15) == 1001
        assert await wait_exit(first) == 0

        during_restart = asyncio.ensure_future(connect(url, sub="restart"))
        await asyncio.sleep(0.3)
        assert not during_restart.done()
        second = activated(sock, name="second")
        client = await asyncio.wait_for(during_restart, 10)
        assert client.welcome["user"] == "restart"
        client.close()
        assert second.terminate() == 0
    finally:
        sock.close()


# -- paced drain ---------------------------------------------------------------------------


@dataclass
class Closed:
    at: float  # monotonic
    code: int | None
    reason: str | None


async def watch_close(client: Client) -> Closed:
    """Read until the server closes; when it did, with what."""
    while await client.conn.read_message() is not None:
        pass
    return Closed(time.monotonic(), client.close_code, client.close_reason)


DRAIN_CONFIG = """
[server]
drain_seconds = {drain}
[ratelimit]
max_connections_per_ip = 5000
handshake_rate = 5000.0
handshake_burst = 5000.0
[chat]
auto_join = false
[log]
access_log = false
"""


async def connect_many(server: ServerProcess, count: int) -> list[Client]:
    clients: list[Client] = []
    for start in range(0, count, 50):
        batch = [connect(server, sub=f"user{i}") for i in range(start, min(count, start + 50))]
        clients += await asyncio.gather(*batch)
    return clients


async def notify_bob(server: ServerProcess, text: str) -> str:
    status, body = await http(
        server, "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": text}
    )
    assert status == 202, body
    return str(body["id"])


async def expect_delivered(server: ServerProcess, ids: list[str]) -> None:
    bob = await connect(server, sub="bob")
    got = []
    for _ in ids:
        frame = await bob.recv_type("notification")
        got.append(frame["id"])
    assert sorted(got) == sorted(ids)
    bob.close()


@pytest.mark.slow
async def test_paced_drain(spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """SIGTERM with 200 clients: 503 at once for readiness and upgrades, 1001 closes spread
    over drain_seconds with a reconnect delay each, exit 0, accepted work survives."""
    config = write_config(tmp_path / "drain.toml", DRAIN_CONFIG.format(drain=4.0))
    server = spawn("--config", config)
    clients = await connect_many(server, 200)
    watchers = [asyncio.ensure_future(watch_close(c)) for c in clients]

    sigterm = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    while (await http(server, "GET", "/readyz"))[0] != 503:
        assert time.monotonic() - sigterm < 1.0
    readyz_503 = time.monotonic() - sigterm
    with pytest.raises(HTTPClientError) as refused:
        await connect(server, sub="late")
    assert refused.value.code == 503
    upgrade_503 = time.monotonic() - sigterm
    accepted = await notify_bob(server, "accepted during the drain")

    closes = await asyncio.wait_for(asyncio.gather(*watchers), 15)
    assert await wait_exit(server) == 0
    exited = time.monotonic() - sigterm

    assert {c.code for c in closes} == {1001}
    delays = [float(REASON.match(c.reason or "").group(1)) for c in closes]  # type: ignore[union-attr]
    times = sorted(c.at - sigterm for c in closes)
    span = times[-1] - times[0]
    buckets = Counter(int(t / 0.5) for t in times)
    print(
        f"\ndrain: readyz 503 after {readyz_503 * 1000:.0f} ms, upgrade 503 after "
        f"{upgrade_503 * 1000:.0f} ms; closes from {times[0]:.2f}s to {times[-1]:.2f}s "
        f"(span {span:.2f}s), busiest 0.5s bucket {max(buckets.values())}/200, "
        f"delays {min(delays)}..{max(delays)}s, exit after {exited:.2f}s"
    )
    assert times[0] < 0.5
    assert span >= 3.0
    assert max(buckets.values()) <= 50  # no more than 25% in any 0.5 s
    assert all(d >= 1.0 for d in delays)
    assert exited < 4.0 + 3.0

    restarted = spawn("--config", config, name="restarted")
    await expect_delivered(restarted, [accepted])


@pytest.mark.slow
async def test_second_signal_skips_the_pacing(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A second SIGTERM during a long drain closes the rest at once and exits 0; what was
    accepted before it is delivered after a restart."""
    config = write_config(tmp_path / "drain.toml", DRAIN_CONFIG.format(drain=30.0))
    server = spawn("--config", config)
    clients = await connect_many(server, 50)
    watchers = [asyncio.ensure_future(watch_close(c)) for c in clients]

    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.0)
    accepted = [await notify_bob(server, f"during drain {i}") for i in range(5)]
    assert sum(w.done() for w in watchers) < 10  # still pacing: 30 s for 50
    second = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(server, timeout=5) == 0
    exited = time.monotonic() - second
    closes = await asyncio.wait_for(asyncio.gather(*watchers), 5)
    print(f"\nsecond SIGTERM: exited after {exited:.2f}s")
    assert exited < 3.0
    assert {c.code for c in closes} == {1001}
    hurried = [float(REASON.match(c.reason or "").group(1)) for c in closes[10:]]  # type: ignore[union-attr]
    assert len(set(hurried)) > 10, "reconnect delays of the hurried closes are spread"
    assert "closing the remaining connections at once" in server.log()

    restarted = spawn("--config", config, name="restarted")
    await expect_delivered(restarted, accepted)


# -- reload ----------------------------------------------------------------------------------


RELOAD_CONFIG = """
[ratelimit]
rate = {rate}
burst = {burst}
[delivery]
ack_timeout = {ack_timeout}
"""


async def pings(client: Client, count: int) -> list[str]:
    """Send ``count`` pings at once; the type of each answer, in order."""
    for i in range(count):
        await client.send({"type": "ping", "ref": str(i)})
    answers = []
    for _ in range(count):
        frame = await client.recv_type("pong", "error")
        answers.append(frame["type"] if frame["type"] == "pong" else frame["code"])
    return answers


async def test_reload_rate_limit_on_open_connection(
    spawn: Callable[..., ServerProcess], notify_socket: NotifyListener, tmp_path: Path
) -> None:
    """SIGHUP: a lower burst applies to a connection that stayed open; a changed
    non-reloadable key is logged as needing a restart; a bad config is refused."""
    path = tmp_path / "pushsvc.toml"
    write_config(path, RELOAD_CONFIG.format(rate=0.1, burst=100, ack_timeout=10))
    server = spawn("--config", str(path), env={"NOTIFY_SOCKET": notify_socket.address})
    await notify_socket.wait_for("READY=1")
    client = await connect(server)
    assert await pings(client, 5) == ["pong"] * 5

    write_config(path, RELOAD_CONFIG.format(rate=0.1, burst=3, ack_timeout=20))
    server.proc.send_signal(signal.SIGHUP)
    log = await wait_log(server, "reloaded:")
    assert "ratelimit.burst" in log
    assert "config key delivery.ack_timeout changed: takes effect after a restart" in log
    await notify_socket.wait_for("READY=1", count=2)
    assert notify_socket.states().count("RELOADING=1") == 1
    states = notify_socket.states()
    assert states.index("RELOADING=1") < len(states) - 1 - states[::-1].index("READY=1")
    assert await pings(client, 4) == ["pong", "pong", "pong", "rate_limited"]

    write_config(path, RELOAD_CONFIG.format(rate=-1, burst=100, ack_timeout=20))
    server.proc.send_signal(signal.SIGHUP)
    log = await wait_log(server, "reload refused")
    assert re.search(r"reload refused, keeping the running config: ratelimit\.rate: .*-1", log)
    await notify_socket.wait_for("READY=1", count=3)  # back to running
    assert await pings(client, 1) == ["rate_limited"]  # still burst 3, not 100
    assert server.proc.poll() is None
    assert (await http(server, "GET", "/readyz"))[0] == 200


SECRET_A = "rotation-secret-A-long-enough-for-hs256-0123456789"
SECRET_B = "rotation-secret-B-long-enough-for-hs256-0123456789"


async def test_reload_rotates_jwt_secret(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """auth.jwt_secret changed by SIGHUP: new handshakes need the new secret, open
    connections stay; the same for new contents of auth.jwt_secret_file."""
    path = tmp_path / "pushsvc.toml"
    write_config(path, f'[auth]\njwt_secret = "{SECRET_A}"\n')
    server = spawn("--config", str(path), env={"PUSHSVC_JWT_SECRET": ""})
    old = await connect(server, tokens.mint(SECRET_A, "alice"))

    write_config(path, f'[auth]\njwt_secret = "{SECRET_B}"\n')
    server.proc.send_signal(signal.SIGHUP)
    assert "reloaded: auth.jwt_secret" in await wait_log(server, "reloaded:")
    with pytest.raises(HTTPClientError) as refused:
        await connect(server, tokens.mint(SECRET_A, "carol"))
    assert refused.value.code == 401
    await connect(server, tokens.mint(SECRET_B, "carol"))
    assert await pings(old, 1) == ["pong"]

    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text(SECRET_A + "\n")
    write_config(path, f'[auth]\njwt_secret_file = "{secret_file}"\n')
    server.proc.send_signal(signal.SIGHUP)
    await wait_log(server, "reloaded:", count=2)
    await connect(server, tokens.mint(SECRET_A, "dave"))
    secret_file.write_text(SECRET_B + "\n")  # rotated in place, config unchanged
    server.proc.send_signal(signal.SIGHUP)
    assert "reloaded: auth.jwt_secret_file" in await wait_log(server, "reloaded:", count=3)
    with pytest.raises(HTTPClientError):
        await connect(server, tokens.mint(SECRET_A, "erin"))
    await connect(server, tokens.mint(SECRET_B, "erin"))
    assert await pings(old, 1) == ["pong"]


async def test_reload_refuses_config_without_secret(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A reload that would leave HS256 without a secret is refused, naming the key."""
    path = tmp_path / "pushsvc.toml"
    write_config(path, f'[auth]\njwt_secret = "{SECRET_A}"\n')
    server = spawn("--config", str(path), env={"PUSHSVC_JWT_SECRET": ""})
    write_config(path, "[auth]\n")
    server.proc.send_signal(signal.SIGHUP)
    log = await wait_log(server, "reload refused")
    assert "auth.jwt_secret: no JWT secret" in log
    await connect(server, tokens.mint(SECRET_A, "alice"))


# -- the secret at startup ------------------------------------------------------------------


def test_serve_refuses_to_start_without_secret(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn(env={"PUSHSVC_JWT_SECRET": ""}, wait=False)
    assert server.proc.wait(20) == 2
    assert "no JWT secret configured" in server.log()
    assert "--dev" in server.log()


async def test_serve_dev_generates_secret(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn("--dev", env={"PUSHSVC_JWT_SECRET": ""})
    log = server.log()
    assert "--dev: generated JWT secret" in log
    match = re.search(r"try token: (\S+)", log)
    assert match is not None
    client = await connect(server, match.group(1))
    assert client.welcome["user"] == "dev"


async def test_reload_default_rooms(spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """auth.default_rooms is reloadable: it reaches the built-in room policy."""
    path = tmp_path / "pushsvc.toml"
    write_config(path, '[auth]\ndefault_rooms = ["*"]\n')
    server = spawn("--config", str(path))
    client = await connect(server)
    await client.send({"type": "join", "room": "news", "ref": "1"})
    assert (await client.recv_type("reply", "error"))["type"] == "reply"
    write_config(path, '[auth]\ndefault_rooms = ["lobby"]\n')
    server.proc.send_signal(signal.SIGHUP)
    assert "auth.default_rooms" in await wait_log(server, "reloaded:")
    await client.send({"type": "join", "room": "sports", "ref": "2"})
    frame = await client.recv_type("reply", "error")
    assert frame["type"] == "error" and frame["code"] == "forbidden", frame
