#!/usr/bin/env python3
"""bench/durable.py - end-to-end durable delivery: persisted, delivered, acked per second.

Starts ``pushsvc serve`` (``bench/bench.toml`` plus a fresh data dir, pinned to one CPU
with ``taskset``), connects ``--users`` recipients and ``--senders`` senders from this
process (pinned to another CPU), and runs three phases of ``private`` messages to random
recipients, each of which acks the moment a message arrives:

1. one sender, closed loop (the next frame after the ``reply ok`` of the previous);
2. ``--senders`` concurrent senders, closed loop;
3. a fixed ``--rate`` (default 1,000 msg/s) spread over the senders, open loop: the
   latency figure.

A message is *done* when the recipient's ``ack`` got its ``reply`` (``acked: 1``): it
was persisted (the sender's ``reply ok`` comes only after the commit), delivered over
a real socket, and its ack persisted. The round trip is sender's send → recipient
receives → recipient's ack reply received, all on this process's clock (so it also
holds this client's own queueing). The client is a minimal raw WebSocket client on
uvloop (one masking key per connection, not per frame) so that it costs little.

Prints a table and writes ``bench/results/durable-latest.md`` with the machine
description. Run from the repo root with the venv's python::

    python bench/durable.py                         # defaults: 1,000 users, 100 senders, 10 s
    python bench/durable.py --duration 5 --users 200 --senders 20
    python bench/durable.py --py-spy /tmp/durable.txt   # profile the server in phase 2
    python bench/durable.py --store-url redis-server    # on a redis-server of its own
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import random
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pushsvc.auth import tokens

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")
CONNECT_CONCURRENCY = 64
DRAIN_SECONDS = 15.0  # most time to wait for outstanding messages after a phase
START_SECONDS = 30.0  # most time to wait for the server to listen


# -- a minimal WebSocket client ---------------------------------------------------------


def client_frame(payload: bytes, key: bytes, key_int: int) -> bytes:
    """A final, masked text frame (the connection's fixed masking key)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65536:
        header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = (key * ((n + 3) // 4))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        n, "little"
    )
    return header + key + masked


class Conn(asyncio.Protocol):
    """One WebSocket connection: handshake, then JSON text frames to ``on_message``."""

    def __init__(self, path: str, host: str, on_message: Callable[[Conn, Any], None]) -> None:
        self.path = path  # request path with the token
        self.host = host  # Host header
        self.on_message = on_message  # called with each decoded server frame
        self.transport: asyncio.Transport | None = None  # the socket once connected
        self.buffer = b""  # unparsed bytes
        self.upgraded = False  # past the HTTP 101
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.key = os.urandom(4)  # masking key (fixed per connection: a benchmark client)
        self.key_int = int.from_bytes(self.key, "little")
        self.closed = False  # the server closed or the socket dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        """Parse whole frames out of the stream."""
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status:
                self._fail(f"upgrade refused: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            length = buffer[pos + 1] & 127
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = buffer[pos] & 15
            pos = end
            if opcode == 1:
                self._message(orjson.loads(buffer[start:end]))
            elif opcode == 9:  # ping -> pong
                self._write(client_frame(buffer[start:end], self.key, self.key_int), opcode=10)
            elif opcode == 8:
                self.closed = True
        self.buffer = buffer[pos:]

    def _message(self, frame: Any) -> None:
        if not self.ready.done():
            if frame.get("type") == "welcome":
                self.ready.set_result(None)
            return
        self.on_message(self, frame)

    def _write(self, data: bytes, opcode: int = 1) -> None:
        if opcode != 1:
            data = bytes((0x80 | opcode,)) + data[1:]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, frame: dict[str, Any]) -> None:
        """Send one JSON text frame."""
        self._write(client_frame(orjson.dumps(frame), self.key, self.key_int))

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone."""
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before welcome: {exc}"))


# -- the benchmark ------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Phase:
    """Counters of one phase."""

    name: str
    sent: int = 0  # private frames written
    persisted: int = 0  # reply ok received by senders
    delivered: int = 0  # private frames received by recipients (first time)
    acked: int = 0  # ack replies with acked 1
    duplicates: int = 0  # a message received again (redelivery)
    errors: dict[str, int] = field(default_factory=dict)  # error code -> count
    persist_ms: list[float] = field(default_factory=list)  # send -> reply ok
    round_trip_ms: list[float] = field(default_factory=list)  # send -> ack reply
    window_acked: int = 0  # acked inside the measured window
    window_seconds: float = 0.0  # length of the measured window
    server_cpu: float = 0.0  # server CPU seconds in the window
    loop_cpu: float = 0.0  # of which the server's main (event loop) thread
    client_cpu: float = 0.0  # this process's CPU seconds in the window
    other_cpu: float = 0.0  # CPU seconds of every other process in the window (noise)
    lost: int = 0  # sent but not acked after the drain
    senders: int = 0  # sender connections used
    rate: float | None = None  # fixed send rate, or None for closed loop

    def acked_per_second(self) -> float:
        """Messages done per second in the window."""
        return self.window_acked / self.window_seconds if self.window_seconds else 0.0


class Bench:
    """Clients, phases and figures."""

    def __init__(self, args: argparse.Namespace, secret: str, port: int, pid: int) -> None:
        self.args = args  # command line
        self.secret = secret  # the bench JWT secret
        self.port = port  # server port
        self.pid = pid  # server process id (CPU accounting)
        self.users: list[Conn] = []  # recipients
        self.senders: list[Conn] = []  # senders
        self.phase = Phase("idle")  # the phase being measured
        self.sent_at: dict[str, float] = {}  # key -> send time
        self.seen: set[str] = set()  # keys received by a recipient
        self.counter = 0  # keys handed out
        self.closed_loop = True  # senders send the next frame on reply ok
        self.stopping = False  # phase over: no new sends
        self.measuring = False  # inside the measured window
        self.idle = asyncio.Event()  # nothing outstanding
        self.random = random.Random(42)  # recipient choice

    # -- connections ----------------------------------------------------------------

    async def connect(self, sub: str, on_message: Callable[[Conn, Any], None]) -> Conn:
        token = tokens.mint(self.secret, sub, ttl=86400)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: Conn(f"/ws?access_token={token}", f"127.0.0.1:{self.port}", on_message),
            "127.0.0.1",
            self.port,
        )
        await asyncio.wait_for(conn.ready, 30)
        return conn

    async def connect_all(self) -> None:
        users = [f"u{i}" for i in range(self.args.users)]
        senders = [f"sender{i}" for i in range(self.args.senders)]
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(sub: str, handler: Callable[[Conn, Any], None]) -> Conn:
            async with gate:
                return await self.connect(sub, handler)

        self.users = list(await asyncio.gather(*(one(u, self.on_recipient) for u in users)))
        self.senders = list(await asyncio.gather(*(one(s, self.on_sender) for s in senders)))

    # -- traffic ----------------------------------------------------------------------

    def send_one(self, sender: Conn) -> None:
        self.counter += 1
        key = f"k{self.counter}"
        to = f"u{self.random.randrange(self.args.users)}"
        self.sent_at[key] = time.perf_counter()
        self.phase.sent += 1
        sender.send({"type": "private", "to": to, "text": key, "ref": key})

    def on_sender(self, conn: Conn, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "reply":
            sent = self.sent_at.get(frame["ref"])
            self.phase.persisted += 1
            if sent is not None:
                self.phase.persist_ms.append((time.perf_counter() - sent) * 1000)
            if self.closed_loop and not self.stopping:
                self.send_one(conn)
        elif kind == "error":
            code = frame.get("code", "?")
            self.phase.errors[code] = self.phase.errors.get(code, 0) + 1
            self.sent_at.pop(frame.get("ref", ""), None)
            self._check_idle()
            if self.closed_loop and not self.stopping:
                self.send_one(conn)

    def on_recipient(self, conn: Conn, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "private":
            key = frame["text"]
            if key in self.seen:
                self.phase.duplicates += 1
            else:
                self.seen.add(key)
                self.phase.delivered += 1
            conn.send({"type": "ack", "id": frame["id"], "ref": key})
        elif kind == "reply" and frame.get("acked") == 1:
            now = time.perf_counter()
            sent = self.sent_at.pop(frame["ref"], None)
            self.seen.discard(frame["ref"])
            self.phase.acked += 1
            if sent is not None:
                self.phase.round_trip_ms.append((now - sent) * 1000)
            if self.measuring:
                self.phase.window_acked += 1
            self._check_idle()
        elif kind == "error":
            code = "ack:" + frame.get("code", "?")
            self.phase.errors[code] = self.phase.errors.get(code, 0) + 1

    def _check_idle(self) -> None:
        if self.stopping and not self.sent_at:
            self.idle.set()

    # -- phases -------------------------------------------------------------------------

    async def run_phase(self, name: str, senders: int, rate: float | None) -> Phase:
        self.phase = Phase(name, senders=senders, rate=rate)
        self.sent_at.clear()
        self.seen.clear()
        self.stopping, self.measuring, self.closed_loop = False, False, rate is None
        self.idle.clear()
        active = self.senders[:senders]
        duration = self.args.duration
        warm = min(1.0, duration / 5)
        start = time.perf_counter()
        pacer = None
        if rate is None:
            for sender in active:
                for _ in range(self.args.pipeline):
                    self.send_one(sender)
        else:
            pacer = asyncio.ensure_future(self.pace(active, rate, start + duration))
        await asyncio.sleep(warm)
        self.measuring = True
        server0, client0, all0 = server_cpu(self.pid), self_cpu(), machine_cpu()
        loop0 = server_cpu(self.pid, self.pid)
        t0 = time.perf_counter()
        self.phase.persist_ms.clear()
        self.phase.round_trip_ms.clear()
        await asyncio.sleep(max(0.0, start + duration - time.perf_counter()))
        self.phase.window_seconds = time.perf_counter() - t0
        self.phase.server_cpu = server_cpu(self.pid) - server0
        self.phase.loop_cpu = server_cpu(self.pid, self.pid) - loop0
        self.phase.client_cpu = self_cpu() - client0
        self.phase.other_cpu = max(
            0.0, machine_cpu() - all0 - self.phase.server_cpu - self.phase.client_cpu
        )
        self.measuring = False
        self.stopping = True
        if pacer is not None:
            await pacer
        self._check_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), DRAIN_SECONDS)
        self.phase.lost = len(self.sent_at)
        return self.phase

    async def pace(self, senders: list[Conn], rate: float, end: float) -> None:
        """Open loop: ``rate`` messages per second, round robin over ``senders``."""
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) < end:
            due = int((now - start) * rate)
            while sent < due:
                self.send_one(senders[sent % len(senders)])
                sent += 1
            await asyncio.sleep(0.001)


# -- process helpers ----------------------------------------------------------------------


def server_cpu(pid: int, thread: int | None = None) -> float:
    """CPU seconds (user + system) of process ``pid``, or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def self_cpu() -> float:
    """CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> float:
    """CPU seconds all processes used so far (busy time of every CPU)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    pushsvc = args.pushsvc or str(Path(sys.executable).parent / "pushsvc")
    command = [pushsvc, "serve", "--config", args.config, "--port", str(port)]
    command += ["--data-dir", str(data_dir)]
    if args.server_cpu >= 0 and shutil.which("taskset"):
        command = ["taskset", "-c", str(args.server_cpu), *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PUSHSVC_LOG__LEVEL": "warning"}
    env["PUSHSVC_STORE__SYNCHRONOUS"] = args.synchronous
    if args.store_url:
        env["PUSHSVC_STORE__URL"] = args.store_url
    log = open(data_dir.parent / "server.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_SECONDS
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start; log: {data_dir.parent / 'server.log'}")
        time.sleep(0.05)


def start_redis(args: argparse.Namespace, directory: Path) -> subprocess.Popen[bytes]:
    """A ``redis-server`` for ``--store-url redis-server``: AOF on, everysec, in ``directory``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--store-url redis-server: redis-server is not installed (make tools)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "yes", "--appendfsync", args.appendfsync]
    command += ["--maxmemory-policy", "noeviction", "--logfile", str(directory / "redis.log")]
    if args.redis_cpu >= 0 and shutil.which("taskset"):
        command = ["taskset", "-c", str(args.redis_cpu), *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + START_SECONDS
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            args.store_url = f"redis://127.0.0.1:{port}/0"
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"redis-server did not start; log: {directory / 'redis.log'}")
        time.sleep(0.05)


def machine() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             check=True)  # fmt: skip
        return run.stdout.strip()

    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += " (with uncommitted changes)"
    import tornado

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- Python {platform.python_version()}, Tornado {tornado.version}, {loop}, "
        f"SQLite {sqlite3.sqlite_version}",
        f"- pushsvc commit {commit}",
    ]


# -- report ---------------------------------------------------------------------------------


def rows(phases: list[Phase]) -> list[str]:
    head = (
        "| phase | senders | acked msg/s | persist p50 / p99 ms | round trip p50 / p99 / max ms "
        "| server CPU | server µs/msg (loop + store) | client CPU | others' CPU | sent | acked "
        "| lost | dup "
        "| errors |"
    )
    out = [head, "|" + " --- |" * 14]
    for p in phases:
        per_msg = p.server_cpu / p.window_acked * 1e6 if p.window_acked else 0.0
        loop_per_msg = p.loop_cpu / p.window_acked * 1e6 if p.window_acked else 0.0
        seconds = p.window_seconds or 1.0
        load = p.server_cpu / seconds * 100
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p.errors.items())) or "0"
        rtt = p.round_trip_ms
        out.append(
            f"| {p.name} | {p.senders} | {p.acked_per_second():,.0f} "
            f"| {percentile(p.persist_ms, 50):.2f} / {percentile(p.persist_ms, 99):.2f} "
            f"| {percentile(rtt, 50):.2f} / {percentile(rtt, 99):.2f} / {max(rtt, default=0):.1f} "
            f"| {load:.0f} % | {per_msg:.0f} ({loop_per_msg:.0f} + {per_msg - loop_per_msg:.0f}) "
            f"| {p.client_cpu / seconds * 100:.0f} % "
            f"| {p.other_cpu / seconds * 100:.0f} % | {p.sent:,} | {p.acked:,} | {p.lost} "
            f"| {p.duplicates} | {errors} |"
        )
    return out


def store_description(args: argparse.Namespace) -> str:
    if not args.store_url:
        return f"SQLite, synchronous={args.synchronous}"
    if args.redis_started:
        return (
            f"Redis (redis-server started by the bench, appendfsync {args.appendfsync}, "
            f"CPU {'any' if args.redis_cpu < 0 else args.redis_cpu}; its CPU is in others' CPU)"
        )
    return f"store.url={args.store_url}"


def redis_cpu_line(args: argparse.Namespace, phases: list[Phase]) -> list[str]:
    """The redis-server's CPU per acked message, when the bench started one."""
    acked = sum(p.acked for p in phases)
    if args.redis_cpu_used is None or not acked:
        return []
    per_msg = args.redis_cpu_used / acked * 1e6
    return [
        f"- redis-server CPU: {args.redis_cpu_used:.2f} s for {acked:,} acked messages, "
        f"{per_msg:.0f} µs per acked message (every phase, connecting included)"
    ]


def report(args: argparse.Namespace, phases: list[Phase], started: str) -> str:
    lines = [
        "# Durable delivery benchmark (bench/durable.py)",
        "",
        f"Run {started}: `{' '.join(sys.argv)}`",
        "",
        *machine(),
        f"- server pinned to CPU {args.server_cpu}, client to CPU {args.client_cpu}; "
        f"{args.users:,} recipients connected; store: {store_description(args)}; "
        f"{args.duration:g} s per phase (first {min(1.0, args.duration / 5):g} s not measured); "
        f"closed-loop pipeline {args.pipeline} per sender",
        *([f"- {args.note}"] if args.note else []),
        *redis_cpu_line(args, phases),
        "",
        *rows(phases),
        "",
        "acked msg/s: messages persisted, delivered over a socket and acked (the ack's reply "
        "received) per second. persist: send → the sender's `reply ok` (after the commit). "
        "round trip: send → recipient receives → the recipient's ack `reply` arrives. "
        "server µs/msg: server CPU per acked message, split into the event-loop thread and the "
        "others (the SQLite writer thread). others' CPU: every other process on "
        "the machine during the window (100 % = one core): above ~10 % the figures are "
        "disturbed. lost: sent but not acked within "
        f"{DRAIN_SECONDS:g} s after the phase.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="recipients (one connection each)")
    parser.add_argument("--senders", type=int, default=100, help="concurrent senders (phase 2)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=1000.0, help="msg/s of the fixed-rate phase")
    parser.add_argument("--pipeline", type=int, default=1, help="unanswered frames per sender")
    parser.add_argument("--phases", default="1,N,rate", help="subset of 1,N,rate to run")
    parser.add_argument("--config", default=str(HERE / "bench.toml"), help="server config")
    parser.add_argument("--synchronous", default="normal", choices=("normal", "full"))
    parser.add_argument(
        "--store-url",
        default="",
        help="store.url of the server (default: SQLite in the data dir); 'redis-server': "
        "start one for the run (appendonly yes) and use it",
    )
    parser.add_argument("--appendfsync", default="everysec", choices=("everysec", "always"))
    parser.add_argument("--redis-cpu", type=int, default=-1, help="CPU for redis-server (-1: any)")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU for the server (-1: any)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for this client (-1: any)")
    parser.add_argument("--pushsvc", default=None, help="pushsvc executable")
    parser.add_argument("--out", default=str(HERE / "results" / "durable-latest.md"))
    parser.add_argument("--py-spy", default=None, help="profile the server in phase 2 to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and server log")
    parser.add_argument("--note", default="", help="a line added to the markdown summary")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, secret: str, port: int, pid: int) -> list[Phase]:
    bench = Bench(args, secret, port, pid)
    t = time.perf_counter()
    await bench.connect_all()
    print(
        f"connected {args.users} users + {args.senders} senders in {time.perf_counter() - t:.1f}s"
    )
    wanted = args.phases.split(",")
    phases = []
    if "1" in wanted:
        phases.append(await bench.run_phase("1 sender", 1, None))
        print("\n".join(rows(phases[-1:])))
    if "N" in wanted:
        profiler = None
        if args.py_spy:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            profiler = subprocess.Popen(
                [
                    *(spy, "record", "--pid", str(pid), "--duration", str(int(args.duration))),
                    *("--format", "raw", "--output", args.py_spy, "--nonblocking", "--rate", "250"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        phases.append(await bench.run_phase(f"{args.senders} senders", args.senders, None))
        print("\n".join(rows(phases[-1:])))
        if profiler is not None:
            profiler.wait(60)
    if "rate" in wanted:
        phases.append(await bench.run_phase(f"fixed {args.rate:,.0f}/s", args.senders, args.rate))
        print("\n".join(rows(phases[-1:])))
    for conn in bench.users + bench.senders:
        if conn.transport is not None:
            conn.transport.close()
    return phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = tomllib.loads(Path(args.config).read_text())
    secret = config["auth"]["jwt_secret"]
    if args.client_cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # the server inherits it
    work = Path(tempfile.mkdtemp(prefix="pushsvc-durable-"))
    port = free_port()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    redis = None
    args.redis_started = args.store_url == "redis-server"
    args.redis_cpu_used = None
    if args.redis_started:
        redis = start_redis(args, work / "redis")
        redis_cpu_start = server_cpu(redis.pid)
    try:
        proc = start_server(args, work / "data", port)
    except BaseException:
        if redis is not None:
            redis.terminate()
        raise
    try:
        try:
            import uvloop

            phases = uvloop.run(run(args, secret, port, proc.pid))
        except ImportError:
            phases = asyncio.run(run(args, secret, port, proc.pid))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if redis is not None:
            with contextlib.suppress(OSError):
                args.redis_cpu_used = server_cpu(redis.pid) - redis_cpu_start
            redis.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                redis.wait(30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(args, phases, started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"\nwritten {args.out}")
    if statistics.fmean([p.lost for p in phases] or [0]) > 0:
        print("WARNING: some messages were not acked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
