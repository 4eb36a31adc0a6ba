#!/usr/bin/env python3
"""bench/soak.py - rounds of clients that connect, join, chat, ack and leave; then leaks.

Starts ``pushsvc serve`` as a child process (a fresh data dir) and runs
``--rounds`` rounds of ``--clients`` clients. In a round every client
connects, joins one of ``--rooms`` rooms, chats there, receives one
``notification`` sent through the server API and acks it; then half leave
with a clean close and half drop their TCP connection (a reset, no close
frame). Before the first round, and after the last once the server is idle,
it reads the server's RSS and open file descriptors (``/proc``) and its
``/metrics`` (connections, pending messages, the event-loop lag histogram):
the figures must come back to the baseline, and the loop lag's p99 stay
under 50 ms. ``--storm N`` then drops N connections at once and reconnects
them with full-jitter backoff, reporting the time until all are back and
every pending message is delivered; ``--restart-storm N`` keeps N clients
(each from its own address) connected across a SIGTERM and a new process.

The loop lag is reported per phase, twice. As the service's monitor sees it
(``pushsvc_event_loop_lag_seconds``, a 0.5 s timer: p99 and max as histogram
buckets) and, finer, from ``bench/loopprobe.py``, which runs the server with
a 1 ms timer that records every gap with the process CPU time spent in it:
"late" is the longest gap and the time-weighted p99 (how late a timer due at
a random moment of the phase would fire), "own" the same from the server's
own CPU time in each gap (with the server pinned to one core, the rest of a
gap is another process holding that core). By default the server runs on
CPU 0 and this load generator on CPU 1 (``--server-cpu``/``--client-cpu``;
-1: not pinned).

``tests/test_soak.py`` runs :func:`run_round` in the suite (a few rounds of
a few dozen clients, in-process) and checks the node's own structures.

Run from the repo root with the venv's python::

    python bench/soak.py                               # 5 rounds of 1,000 clients
    python bench/soak.py --rounds 2 --clients 200      # quicker
    python bench/soak.py --rounds 1 --storm 10000      # and a reconnect storm
    python bench/soak.py --rounds 1 --restart-storm 10000   # clients across a restart
    python bench/soak.py --stacks /tmp/stacks.txt      # what the long loop passes do
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from pushsvc.auth.tokens import mint

SECRET = "soak-secret-that-is-long-enough-for-hs256!"
#: Seconds any single wait of a client may take before the round fails.
STEP_TIMEOUT = 30.0


@dataclass
class RoundStats:
    """What one round did."""

    connected: int = 0
    chats_received: int = 0
    notifications_acked: int = 0
    clean_closes: int = 0
    drops: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Peer:
    """A minimal WebSocket client on asyncio streams (light enough for thousands)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, jwt: str, address: str | None = None) -> Peer:
        """Upgrade; ``address`` is sent as ``X-Real-Ip`` (a server with ``xheaders``)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        real_ip = f"X-Real-Ip: {address}\r\n" if address else ""
        writer.write(
            (
                f"GET /ws?access_token={jwt} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"{real_ip}Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
        return cls(reader, writer)

    def send(self, message: dict[str, object], opcode: int = 0x1) -> None:
        payload = orjson.dumps(message) if opcode == 0x1 else b""
        self.send_raw(opcode, payload)

    def send_raw(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = bytes((0x80 | opcode, 0x80 | size))
        elif size <= 0xFFFF:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(size)

    async def until(self, kind: str) -> dict[str, object]:
        """Read frames (answering pings) until a ``kind`` message arrives."""
        while True:
            opcode, payload = await asyncio.wait_for(self.frame(), STEP_TIMEOUT)
            if opcode == 0x9:
                self.send_raw(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError(f"closed while waiting for {kind}")
            elif opcode == 0x1:
                message = orjson.loads(payload)
                if message.get("type") == kind:
                    return dict(message)

    async def close(self) -> None:
        """A clean close: our close frame, the server's, then EOF."""
        self.send_raw(0x8, (1000).to_bytes(2, "big"))
        try:
            while (await asyncio.wait_for(self.frame(), STEP_TIMEOUT))[0] != 0x8:
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.writer.close()

    def drop(self) -> None:
        """Drop the TCP connection: a reset, no close frame."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def api(base: str, path: str, body: dict[str, object], secret: str = SECRET) -> dict[str, object]:
    """POST to the server API with a backend token (blocking; run in a thread)."""
    request = urllib.request.Request(
        base + path,
        data=orjson.dumps(body),
        headers={
            "Authorization": f"Bearer {mint(secret, 'soak-backend', scope='publish')}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=STEP_TIMEOUT) as response:
        return dict(orjson.loads(response.read()))


_TOKENS: dict[tuple[str, str], str] = {}


def token_of(user: str, secret: str = SECRET) -> str:
    """The user's token, the same in every round (clients reconnect with the token they have)."""
    key = (secret, user)
    if key not in _TOKENS:
        _TOKENS[key] = mint(secret, user)
    return _TOKENS[key]


async def run_round(port: int, clients: int, rooms: int = 10, secret: str = SECRET) -> RoundStats:
    """One round: every client connects, joins, chats, gets a notification, acks, leaves."""
    stats = RoundStats()
    started = time.monotonic()
    base = f"http://127.0.0.1:{port}"
    users = [f"soak-{n}" for n in range(clients)]
    tokens = {user: token_of(user, secret) for user in users}
    connected = asyncio.Event()
    notified = asyncio.Event()
    ready = 0

    async def client(n: int) -> None:
        nonlocal ready
        user = users[n]
        peer = await Peer.connect(port, tokens[user])
        await peer.until("welcome")
        stats.connected += 1
        room = f"soak-room-{n % rooms}"
        peer.send({"type": "join", "room": room, "ref": "j"})
        await peer.until("reply")
        ready += 1
        if ready == clients:
            connected.set()
        await connected.wait()
        peer.send({"type": "chat", "room": room, "text": f"hello from {user}"})
        await peer.until("chat")
        stats.chats_received += 1
        await notified.wait()
        notification = await peer.until("notification")
        peer.send({"type": "ack", "id": notification["id"]})
        stats.notifications_acked += 1
        await asyncio.sleep(0.05)  # let the ack arrive before a drop
        if n % 2:
            peer.drop()
            stats.drops += 1
        else:
            await peer.close()
            stats.clean_closes += 1

    tasks = [asyncio.ensure_future(client(n)) for n in range(clients)]
    try:
        await asyncio.wait_for(connected.wait(), STEP_TIMEOUT * 2)
        for start in range(0, clients, 1000):
            batch = users[start : start + 1000]
            body = {"to": batch, "title": "soak", "message": "ack me"}
            await asyncio.to_thread(api, base, "/api/v1/notify", body, secret)
        notified.set()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), STEP_TIMEOUT * 2
        )
    except TimeoutError:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stats.errors.append("round timed out")
    stats.errors += [repr(r) for r in results if isinstance(r, BaseException)]
    stats.seconds = time.monotonic() - started
    return stats


async def reconnect_storm(
    port: int, count: int, phases: Phases, base_delay: float = 0.2, cap: float = 5.0
) -> float:
    """Drop ``count`` connections at once; they reconnect with full-jitter backoff.

    Returns the seconds until all are back (and the pending messages of the
    first 1,000 delivered and acked). The connecting and the storm are
    phases of ``phases``.
    """
    users = [f"storm-{n}" for n in range(count)]
    tokens = {user: token_of(user) for user in users}

    async def connect_with_backoff(user: str) -> Peer:
        attempt = 0
        while True:
            try:
                peer = await Peer.connect(port, tokens[user])
                await peer.until("welcome")
                return peer
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(cap, base_delay * 2**attempt)))

    mark = await phases.begin()
    peers = await asyncio.gather(*(connect_with_backoff(u) for u in users))
    await phases.end(f"storm: {count:,} connect", mark)
    await asyncio.sleep(2.0)  # the lag of the first connections is not the storm's
    base = f"http://127.0.0.1:{port}"
    mark = await phases.begin()
    for peer in peers:
        peer.drop()
    body = {"to": users[:1000], "title": "storm", "message": "pending while away"}
    await asyncio.to_thread(api, base, "/api/v1/notify", body)
    started = time.monotonic()

    async def back(user: str) -> None:
        await asyncio.sleep(random.uniform(0, base_delay))  # the clients' first jittered delay
        peer = await connect_with_backoff(user)
        if user in users[:1000]:
            notification = await peer.until("notification")
            peer.send({"type": "ack", "id": notification["id"]})
        peer.drop()

    await asyncio.gather(*(back(u) for u in users))
    seconds = time.monotonic() - started
    await asyncio.sleep(1.0)  # one more lag sample
    await phases.end(f"storm: drop {count:,}, all back", mark)
    return seconds


async def restart_storm(
    data_dir: str, port: int, count: int, launch: Launch, phases: Phases
) -> None:
    """``count`` clients from ``count`` addresses; the server restarts under them.

    The server runs with its default per-address limits (``server.xheaders``:
    each client has its own ``X-Real-Ip``) and a 2 s drain. On SIGTERM it
    closes every connection with 1001; the clients reconnect with full-jitter
    backoff while the old process drains and the new one starts on the same
    port. Prints the time until all are back, the accepted handshakes per
    second and the refusals.
    """
    settings = {"PUSHSVC_SERVER__XHEADERS": "true", "PUSHSVC_SERVER__DRAIN_SECONDS": "2"}
    addresses = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(count)]
    users = [f"restart-{n}" for n in range(count)]
    old, _probe = start_server(data_dir, port, settings, launch)
    back = 0
    all_back = asyncio.Event()

    async def client(n: int) -> None:
        nonlocal back
        attempt, connected_once = 0, False
        while True:
            try:
                peer = await Peer.connect(port, token_of(users[n]), addresses[n])
                await peer.until("welcome")
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))
                continue
            attempt = 0
            if connected_once:
                back += 1
                if back == count:
                    all_back.set()
                await all_back.wait()
                peer.drop()
                return
            connected_once = True
            ready.append(n)
            while True:  # until the drain closes it
                try:
                    await peer.until("never sent")
                except TimeoutError:
                    continue
                except (ConnectionError, asyncio.IncompleteReadError):
                    break
            peer.writer.close()

    ready: list[int] = []
    tasks = [asyncio.ensure_future(client(n)) for n in range(count)]
    while len(ready) < count:
        await asyncio.sleep(0.1)
    started = time.monotonic()
    old.terminate()  # SIGTERM: 1001 to everyone over 2 s, then exit
    await asyncio.to_thread(old.wait, 60)
    new, phases.probe = start_server(data_dir, port, settings, launch)
    phases.pid = new.pid
    restarted = time.monotonic() - started
    mark = await phases.begin()
    await asyncio.wait_for(all_back.wait(), 300)
    seconds = time.monotonic() - started
    await phases.end(f"restart: {count:,} back on the new process", mark)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    pattern = r'^pushsvc_handshakes_total\{.*reason="handshake_rate".*\} (\S+)$'
    refused = sum(float(v) for v in re.findall(pattern, text, re.M))
    print(
        f"restart storm: {count} clients from {count} addresses; the new process served "
        f"{restarted:.1f}s after SIGTERM; all back in {seconds:.1f}s "
        f"({count / max(0.001, seconds - restarted):.0f} accepted handshakes/s on the new "
        f"process); {refused:.0f} refused by the handshake bucket"
    )
    await asyncio.gather(*tasks)
    new.terminate()
    await asyncio.to_thread(new.wait, 60)


# -- the server process ------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics(base: str) -> dict[str, float]:
    """The server's gauges and the loop-lag histogram (``lag<=LE``: samples up to LE s)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for name in ("pushsvc_connections", "pushsvc_pending_messages"):
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        values[name] = float(match.group(1)) if match else float("nan")
    buckets = [
        (float(le), float(count))
        for le, count in re.findall(
            r'^pushsvc_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+-]+)$', text, re.M
        )
    ]
    for le, count in buckets:
        values[f"lag<={le}"] = count
    return values


def lag_p99(before: dict[str, float], after: dict[str, float]) -> tuple[float, int]:
    """The loop lag's p99 between two readings (a bucket's upper bound, s) and the samples."""
    bounds = sorted(float(k[5:]) for k in after if k.startswith("lag<="))
    counts = [after[f"lag<={b}"] - before.get(f"lag<={b}", 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    p99 = next((b for b, n in zip(bounds, counts, strict=True) if n >= 0.99 * total), 0.0)
    return p99, int(total)


def lag_max(before: dict[str, float], after: dict[str, float]) -> float:
    """The loop lag's largest sample between two readings (its bucket's upper bound, s)."""
    bounds = sorted(float(k[5:]) for k in after if k.startswith("lag<="))
    counts = [after[f"lag<={b}"] - before.get(f"lag<={b}", 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    return next((b for b, n in zip(bounds, counts, strict=True) if n >= total), 0.0)


# -- the loop lag per phase: the monitor's histogram and the probe's gaps -----------------


def weighted_p99(lates: list[float], seconds: float) -> float:
    """The lateness a timer due at a random moment of ``seconds`` exceeds 1 % of the time.

    A gap of ``late`` seconds (the loop busy past the probe's due time)
    makes a timer due during it fire late by ``late - x`` after ``x`` of
    it: the time in which a timer would be over ``x`` late is the sum of
    ``max(0, late - x)`` over the gaps.
    """
    budget = 0.01 * seconds
    ordered = sorted(lates, reverse=True)
    total = 0.0
    for k, late in enumerate(ordered):
        total += late
        below = ordered[k + 1] if k + 1 < len(ordered) else 0.0
        if total - (k + 1) * below > budget:
            return (total - budget) / (k + 1)
    return 0.0


@dataclass
class ProbeFigures:
    """The probe's records of one phase (seconds)."""

    late: list[float] = field(default_factory=list)  # each gap past the probe's period
    own: list[float] = field(default_factory=list)  # the same, by the server's CPU time
    collections: list[tuple[int, float]] = field(default_factory=list)  # (generation, s)


def probe_figures(path: Path, start: float, end: float) -> ProbeFigures:
    """What the probe wrote for ``start`` to ``end`` (``time.monotonic()``, shared by processes)."""
    figures = ProbeFigures()
    if not path.exists():
        return figures
    period = 0.001
    for line in path.read_text().splitlines():
        kind, at, *rest = line.split()
        if not start <= float(at) <= end:
            continue
        if kind == "G":
            gap, cpu, _thread = (float(v) for v in rest)
            late = max(0.0, gap - period)
            figures.late.append(late)
            figures.own.append(min(late, cpu))
        elif kind == "C":
            figures.collections.append((int(rest[0]), float(rest[1])))
    return figures


def process_cpu(pid: int) -> float:
    """CPU seconds ``pid`` used so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Mark:
    """The start of a phase."""

    at: float
    metrics: dict[str, float]
    server_cpu: float
    client_cpu: float


class Phases:
    """Reports the loop lag of each phase of the soak, and keeps the lines for a summary."""

    def __init__(self, base: str, pid: int, probe: Path | None) -> None:
        self.base = base
        self.pid = pid  # the server (changed by the restart storm)
        self.probe = probe  # the probe's output (None: no probe)
        self.rows: list[dict[str, object]] = []

    async def begin(self) -> Mark:
        values = await asyncio.to_thread(metrics, self.base)
        return Mark(time.monotonic(), values, process_cpu(self.pid), time.process_time())

    async def end(self, name: str, mark: Mark) -> dict[str, object]:
        """Report the phase begun at ``mark``; returns its figures (ms, %)."""
        now = time.monotonic()
        after = await asyncio.to_thread(metrics, self.base)
        seconds = max(now - mark.at, 1e-6)
        server_cpu, client_cpu = process_cpu(self.pid), time.process_time()
        if self.probe is not None:
            await asyncio.sleep(1.2)  # the probe writes its file once a second
        p99, samples = lag_p99(mark.metrics, after)
        row: dict[str, object] = {
            "phase": name,
            "seconds": seconds,
            "monitor_p99_ms": p99 * 1000,
            "monitor_max_ms": lag_max(mark.metrics, after) * 1000,
            "monitor_samples": samples,
            "server_cpu_pct": 100 * (server_cpu - mark.server_cpu) / seconds,
            "client_cpu_pct": 100 * (client_cpu - mark.client_cpu) / seconds,
        }
        if self.probe is not None:
            figures = probe_figures(self.probe, mark.at, now)
            full = [s for generation, s in figures.collections if generation == 2]
            row |= {
                "late_max_ms": 1000 * max(figures.late, default=0.0),
                "late_p99_ms": 1000 * weighted_p99(figures.late, seconds),
                "own_max_ms": 1000 * max(figures.own, default=0.0),
                "own_p99_ms": 1000 * weighted_p99(figures.own, seconds),
                "gc2": len(full),
                "gc": len(figures.collections),
                "gc_max_ms": 1000 * max((s for _g, s in figures.collections), default=0.0),
                "gc_total_ms": 1000 * sum(s for _g, s in figures.collections),
            }
        self.rows.append(row)
        print(f"  lag, {format_row(row)}", flush=True)
        return row

    def table(self) -> str:
        """The phases as a Markdown table."""
        head = (
            "| phase | s | monitor p99 / max ms (samples) | probe late p99 / max ms "
            "| own CPU p99 / max ms | GCs: n, longest / all ms (gen-2) | server / client CPU % |\n"
            "|---|---:|---|---|---|---|---|\n"
        )
        return head + "".join(markdown_row(row) for row in self.rows)


def format_row(row: dict[str, object]) -> str:
    """One phase on one line."""
    text = (
        f"{row['phase']}: {row['seconds']:.1f}s; monitor p99 <= {row['monitor_p99_ms']:.0f} ms, "
        f"max <= {row['monitor_max_ms']:.0f} ms ({row['monitor_samples']} samples)"
    )
    if "late_max_ms" in row:
        text += (
            f"; probe late p99 {row['late_p99_ms']:.1f} ms, max {row['late_max_ms']:.1f} ms; "
            f"own CPU p99 {row['own_p99_ms']:.1f} ms, max {row['own_max_ms']:.1f} ms; "
            f"GCs {row['gc']} (longest {row['gc_max_ms']:.1f} ms, {row['gc_total_ms']:.0f} ms "
            f"in all; gen-2: {row['gc2']})"
        )
    return (
        text + f"; CPU server {row['server_cpu_pct']:.0f} %, client {row['client_cpu_pct']:.0f} %"
    )


def markdown_row(row: dict[str, object]) -> str:
    probe = (
        f"{row['late_p99_ms']:.1f} / {row['late_max_ms']:.1f} | "
        f"{row['own_p99_ms']:.1f} / {row['own_max_ms']:.1f} | "
        f"{row['gc']}, {row['gc_max_ms']:.1f} / {row['gc_total_ms']:.0f} ({row['gc2']})"
        if "late_max_ms" in row
        else "- | - | -"
    )
    return (
        f"| {row['phase']} | {row['seconds']:.1f} | {row['monitor_p99_ms']:.0f} / "
        f"{row['monitor_max_ms']:.0f} ({row['monitor_samples']}) | {probe} | "
        f"{row['server_cpu_pct']:.0f} / {row['client_cpu_pct']:.0f} |\n"
    )


#: The soak's clients all come from 127.0.0.1: the per-address limits are lifted for it.
LIFTED = {
    "PUSHSVC_RATELIMIT__MAX_CONNECTIONS_PER_IP": "100000",
    "PUSHSVC_RATELIMIT__HANDSHAKE_RATE": "100000",
    "PUSHSVC_RATELIMIT__HANDSHAKE_BURST": "100000",
}


@dataclass
class Launch:
    """How the server process runs: pinned to a CPU, under the probe."""

    cpu: int = -1  # the CPU the server is pinned to (taskset); -1: not pinned
    probe: bool = True  # run under bench/loopprobe.py
    stacks: str | None = None  # the probe samples long passes' stacks to this file
    attribute: bool = False  # the probe times the server's callbacks (``A`` lines)
    keep: str | None = None  # the probe writes in this directory (else the data dir)
    gc0: int = 0  # the server's generation-0 GC threshold (0: pushsvc's own)
    started: int = 0  # processes started (each writes its own probe file)

    def command(self, data_dir: str, port: int) -> tuple[list[str], Path | None]:
        """The command line of a new server process, and where its probe writes."""
        bin_dir = Path(sys.executable).parent
        serve = ["serve", "--port", str(port), "--data-dir", data_dir]
        command = [str(bin_dir / "pushsvc"), *serve]
        probe = None
        if self.probe:
            self.started += 1
            probe = Path(self.keep or data_dir) / f"loopprobe-{self.started}.txt"
            extra = ["--stacks", f"{self.stacks}.{self.started}"] if self.stacks else []
            extra += ["--attribute"] if self.attribute else []
            extra += ["--gc0", str(self.gc0)] if self.gc0 else []
            command = [sys.executable, str(Path(__file__).parent / "loopprobe.py"), str(probe),
                       *extra, "--", *serve]  # fmt: skip
        if self.cpu >= 0:
            command = ["taskset", "-c", str(self.cpu), *command]
        return command, probe


def start_server(
    data_dir: str,
    port: int,
    settings: dict[str, str] | None = None,
    launch: Launch | None = None,
) -> tuple[subprocess.Popen[bytes], Path | None]:
    """``pushsvc serve`` with ``settings`` (``PUSHSVC_...`` variables; default: LIFTED).

    Returns the process and the file its probe writes (None: no probe).
    """
    env = {**os.environ, "PUSHSVC_JWT_SECRET": SECRET, "PUSHSVC_LOG__ACCESS_LOG": "false"}
    env.update(LIFTED if settings is None else settings)
    command, probe = (launch or Launch(probe=False)).command(data_dir, port)
    log = open(Path(data_dir) / "server.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return proc, probe
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("pushsvc did not start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def settle(base: str, seconds: float = 15.0) -> None:
    """Wait until the server reports no connection and no pending message.

    The pending gauge is refreshed by the delivery sweep (every 5 s).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = metrics(base)
        if now["pushsvc_connections"] == 0 and now["pushsvc_pending_messages"] == 0:
            await asyncio.sleep(1.0)  # background work after the last close
            return
        await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--storm", type=int, default=0, help="then a reconnect storm of N")
    parser.add_argument(
        "--restart-storm", type=int, default=0, help="then N clients across a server restart"
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="pin the server (-1: no)")
    parser.add_argument("--client-cpu", type=int, default=1, help="pin this script (-1: no)")
    parser.add_argument("--no-probe", action="store_true", help="run without bench/loopprobe.py")
    parser.add_argument("--stacks", default=None, help="sample long loop passes' stacks to FILE.N")
    parser.add_argument(
        "--attribute", action="store_true", help="the probe times the server's callbacks"
    )
    parser.add_argument("--keep-probe", default=None, help="write the probe's files in DIR")
    parser.add_argument("--gc0", type=int, default=0, help="the server's gen-0 GC threshold")
    parser.add_argument("--table", default=None, help="append the phases' table to FILE")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = os.cpu_count() or 1
    pinned = args.server_cpu >= 0 and args.client_cpu >= 0 and cpus >= 2
    if pinned and shutil.which("taskset"):
        os.sched_setaffinity(0, {args.client_cpu})
        launch = Launch(args.server_cpu, not args.no_probe, args.stacks, args.attribute)
    else:
        launch = Launch(-1, not args.no_probe, args.stacks, args.attribute)
    launch.keep, launch.gc0 = args.keep_probe, args.gc0
    print(
        f"server on CPU {launch.cpu}, load generator on CPU {args.client_cpu}"
        if launch.cpu >= 0
        else "server and load generator not pinned",
        "(probe on)" if launch.probe else "(no probe)",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        proc, probe = start_server(data_dir, port, None, launch)
        phases = Phases(base, proc.pid, probe)
        try:
            await run_round(port, 50, args.rooms)  # warm up the code paths and caches
            await settle(base)
            before = (rss_mib(proc.pid), open_fds(proc.pid), metrics(base))
            print(f"baseline: RSS {before[0]:.1f} MiB, {before[1]} fds")
            first = await phases.begin()
            for number in range(1, args.rounds + 1):
                mark = await phases.begin()
                stats = await run_round(port, args.clients, args.rooms)
                print(
                    f"round {number}: {stats.connected} connected, {stats.chats_received} chats, "
                    f"{stats.notifications_acked} acked, {stats.clean_closes} clean closes, "
                    f"{stats.drops} drops in {stats.seconds:.1f}s; "
                    f"RSS {rss_mib(proc.pid):.1f} MiB; errors: {stats.errors[:3]}"
                )
                await phases.end(f"round {number}", mark)
            await phases.end(f"rounds 1-{args.rounds}", first)
            await settle(base)
            after = (rss_mib(proc.pid), open_fds(proc.pid), metrics(base))
            p99, samples = lag_p99(before[2], after[2])
            print(
                f"after: RSS {after[0] - before[0]:+.1f} MiB, fds {after[1] - before[1]:+d}, "
                f"connections {after[2]['pushsvc_connections']:.0f}, "
                f"pending {after[2]['pushsvc_pending_messages']:.0f}, "
                f"loop lag p99 <= {p99 * 1000:.0f} ms ({samples} samples)"
            )
            if args.storm:
                seconds = await reconnect_storm(port, args.storm, phases)
                print(
                    f"reconnect storm: {args.storm} back, {min(args.storm, 1000)} pending "
                    f"delivered in {seconds:.1f}s"
                )
                await settle(base)
                storm = metrics(base)
                print(
                    f"after the storm: connections {storm['pushsvc_connections']:.0f}, "
                    f"pending {storm['pushsvc_pending_messages']:.0f}, "
                    f"RSS {rss_mib(proc.pid):.1f} MiB"
                )
        finally:
            proc.terminate()
            proc.wait(30)
        if args.restart_storm:
            await restart_storm(data_dir, port, args.restart_storm, launch, phases)
    print(phases.table())
    if args.table:
        with open(args.table, "a") as handle:
            handle.write(phases.table() + "\n")


if __name__ == "__main__":
    asyncio.run(main())
