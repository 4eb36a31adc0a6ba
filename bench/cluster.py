#!/usr/bin/env python3
"""bench/cluster.py - fan-out through Redis over 1, 2 and 3 nodes: deliveries/s, CPU/delivery.

For each node count it starts a fresh ``redis-server`` (appendonly off: pub/sub
and the registry only; the durable figure is bench/durable.py ``--store-url``)
and that many ``pushsvc serve`` processes (``bench/bench.toml``, broker and
store on that Redis), connects ``--members`` members of one room spread round
robin over the nodes (one probe member per node parses every frame; the
others only count frames), and a publisher on the first node sends ``chat``
frames for ``--duration`` seconds, at most ``--window`` of them not yet seen
by every probe (closed loop: the slowest node sets the pace).

Printed per node count: deliveries/s (frames received by all members),
latency p50/p99 (publish -> every probe, this process's clock), the CPU
seconds each pushsvc node and Redis spent per delivery (``/proc``), and how
many messages each node received from the broker
(``pushsvc_broker_received_total``: the routing check). On a 2-core machine
the nodes, Redis and this client share two CPUs, so deliveries/s flattens
with more nodes; the per-delivery CPU costs are the figures that carry to a
machine with a core per node (docs/performance.md extrapolates from them).

    python bench/cluster.py                       # 1, 2, 3 nodes; 1,000 members; 10 s each
    python bench/cluster.py --nodes 3 --members 300 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from durable import Conn, free_port, machine, percentile, server_cpu  # noqa: E402

from pushsvc.auth import tokens  # noqa: E402


class Counter(Conn):
    """A member that counts text frames without decoding them (the cheap majority)."""

    count = 0  # frames received by every Counter (class-wide)

    def _message(self, frame: Any) -> None:
        if not self.ready.done():
            if frame.get("type") == "welcome":
                self.ready.set_result(None)
            return
        if frame.get("type") == "chat":
            Counter.count += 1


@dataclass
class Run:
    """One node count's figures."""

    nodes: int
    members: int
    published: int = 0
    deliveries: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    node_cpu: list[float] = field(default_factory=list)  # CPU seconds per node
    redis_cpu: float = 0.0
    broker_received: list[float] = field(default_factory=list)

    def per_second(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        per = max(1, self.deliveries)
        node_us = "/".join(f"{cpu / per * 1e6:.2f}" for cpu in self.node_cpu)
        total_node_us = sum(self.node_cpu) / per * 1e6
        return (
            f"| {self.nodes} | {self.members:,} | {self.published:,} | {self.per_second():,.0f} | "
            f"{percentile(self.latencies, 50) * 1000:.1f} / "
            f"{percentile(self.latencies, 99) * 1000:.1f} | {node_us} ({total_node_us:.2f}) | "
            f"{self.redis_cpu / per * 1e6:.3f} | "
            f"{'/'.join(f'{r:,.0f}' for r in self.broker_received)} |"
        )


HEADER = (
    "| nodes | members | messages | deliveries/s | latency p50 / p99 ms | "
    "node µs/delivery (sum) | Redis µs/delivery | broker msgs received per node |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def start_redis(work: Path, port: int) -> subprocess.Popen[bytes]:
    redis = shutil.which("redis-server")
    if redis is None:
        raise SystemExit("bench/cluster.py needs redis-server (Debian package redis-server)")
    proc = subprocess.Popen(
        [redis, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
         "--appendonly", "no", "--logfile", str(work / "redis.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_port(port, proc)
    return proc


def start_node(
    args: argparse.Namespace, work: Path, port: int, redis_url: str
) -> subprocess.Popen[bytes]:
    pushsvc = str(Path(sys.executable).parent / "pushsvc")
    data = work / f"node-{port}"
    data.mkdir()
    command = [
        pushsvc,
        "serve",
        "--config",
        args.config,
        "--port",
        str(port),
        "--data-dir",
        str(data),
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PUSHSVC_LOG__LEVEL": "warning",
        "PUSHSVC_BROKER__URL": redis_url,
        "PUSHSVC_STORE__URL": redis_url,
    }
    log = open(data / "server.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    _wait_port(port, proc)
    return proc


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"process {proc.args[0]} did not listen on {port}")
        time.sleep(0.05)


def broker_received(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^pushsvc_broker_received_total(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match and 'kind="probe"' not in (match.group(1) or ""):
            total += float(match.group(2))
    return total


async def connect(cls: type[Conn], port: int, path: str, handler: Any) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: cls(path, f"127.0.0.1:{port}", handler), "127.0.0.1", port
    )
    await asyncio.wait_for(conn.ready, 30)
    return conn


async def run_one(args: argparse.Namespace, nodes: int, secret: str) -> Run:
    work = Path(tempfile.mkdtemp(prefix="pushsvc-cluster-"))
    redis_port = free_port()
    redis = start_redis(work, redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    ports = [free_port() for _ in range(nodes)]
    procs = [start_node(args, work, port, redis_url) for port in ports]
    run = Run(nodes, args.members)
    try:
        token = tokens.mint(secret, "bench", ttl=3600)
        path = f"/ws?access_token={token}"
        sent_at: dict[str, float] = {}
        seen: dict[str, int] = {}
        done = asyncio.Event()
        window = asyncio.Semaphore(args.window)

        def on_probe(conn: Conn, frame: dict[str, Any]) -> None:
            if frame.get("type") != "chat":
                return
            text = frame["text"]
            count = seen[text] = seen.get(text, 0) + 1
            if count == nodes:
                run.latencies.append(time.perf_counter() - sent_at.pop(text))
                del seen[text]
                window.release()

        members: list[Conn] = []
        sem = asyncio.Semaphore(64)

        async def member(index: int) -> None:
            async with sem:
                port = ports[index % nodes]
                probe = index < nodes
                conn = await connect(Conn if probe else Counter, port, path, on_probe)
                conn.send({"type": "join", "room": "fan"})
                members.append(conn)

        await asyncio.gather(*(member(i) for i in range(args.members)))
        publisher = await connect(Conn, ports[0], path, lambda conn, frame: None)
        publisher.send({"type": "join", "room": "fan"})  # chat goes to rooms one is in
        await asyncio.sleep(1.0)  # joins settled, subscriptions confirmed
        received_before = [broker_received(port) for port in ports]
        cpu_before = [server_cpu(proc.pid) for proc in procs]
        redis_before = server_cpu(redis.pid)
        Counter.count = 0
        start = time.perf_counter()
        end = start + args.duration
        n = 0
        while time.perf_counter() < end:
            await window.acquire()
            text = f"m{n}"
            sent_at[text] = time.perf_counter()
            publisher.send({"type": "chat", "room": "fan", "text": text})
            n += 1
        for _ in range(args.window):  # drain: every message seen by every probe
            try:
                await asyncio.wait_for(window.acquire(), 30)
            except TimeoutError:
                missing = sorted(sent_at, key=lambda t: int(t[1:]))[:5]
                raise SystemExit(
                    f"{len(sent_at)} messages not seen by every probe after 30 s, e.g. {missing}"
                ) from None
        run.seconds = time.perf_counter() - start
        run.published = n
        run.deliveries = Counter.count + len(run.latencies) * nodes
        run.node_cpu = [server_cpu(p.pid) - b for p, b in zip(procs, cpu_before, strict=True)]
        run.redis_cpu = server_cpu(redis.pid) - redis_before
        run.broker_received = [
            broker_received(port) - before
            for port, before in zip(ports, received_before, strict=True)
        ]
        for conn in [*members, publisher]:
            if conn.transport is not None:
                conn.transport.close()
        del done
    finally:
        for proc in [*procs, redis]:
            proc.terminate()
        for proc in [*procs, redis]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run")
    parser.add_argument("--members", type=int, default=1000, help="members of the room")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per node count")
    parser.add_argument("--window", type=int, default=20, help="messages in flight")
    parser.add_argument("--config", default=str(HERE / "bench.toml"))
    parser.add_argument("--out", default=str(HERE / "results" / "cluster-latest.md"))
    args = parser.parse_args(argv)
    secret = tomllib.loads(Path(args.config).read_text())["auth"]["jwt_secret"]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs = []
    print(HEADER)
    for nodes in (int(n) for n in args.nodes.split(",")):
        try:
            import uvloop

            result = uvloop.run(run_one(args, nodes, secret))
        except ImportError:
            result = asyncio.run(run_one(args, nodes, secret))
        runs.append(result)
        print(result.row(), flush=True)
    lines = [
        f"# bench/cluster.py, {started}",
        "",
        *machine(),
        f"- {args.members:,} members of one room, {args.duration:g} s a row, window {args.window}",
        "",
        HEADER,
        *(run.row() for run in runs),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
