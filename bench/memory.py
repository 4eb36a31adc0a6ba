#!/usr/bin/env python3
"""bench/memory.py - what one idle, authenticated connection costs, and in which objects.

Runs pushsvc in this process (``bench/bench.toml``, a fresh data dir, the
event loop ``pushsvc serve`` uses) and opens ``--connections`` WebSocket
connections from a child process, each of which joins the room ``bench`` like
the peer harness's clients. Between a snapshot taken with the server warm and
one with every connection open, it reports per connection:

- the growth of the process's RSS;
- ``tracemalloc``'s growth of Python allocations, by source file;
- the live objects that appeared, by type (``sys.getsizeof``, so a C object
  such as uvloop's transport counts its own struct only).

Run from the repo root with the venv's python::

    python bench/memory.py                      # 10,000 connections
    python bench/memory.py --connections 2000   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import tracemalloc
from pathlib import Path

from prometheus_client import CollectorRegistry

from pushsvc import app
from pushsvc import config as config_module
from pushsvc.auth import tokens
from pushsvc.plugin.manager import load_plugins

HERE = Path(__file__).resolve().parent

CLIENT = textwrap.dedent(
    """
    import asyncio, base64, os, sys
    port, count, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    JOIN = b'{"type":"join","room":"bench"}'
    def frame(payload):
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return bytes((0x81, 0x80 | len(payload))) + key + masked
    async def one(held):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws?access_token={token} HTTP/1.1\\r\\nHost: x\\r\\n"
                      "Upgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                      f"Sec-WebSocket-Key: {key}\\r\\n"
                      "Sec-WebSocket-Version: 13\\r\\n\\r\\n").encode())
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(frame(JOIN))
        held.append((reader, writer))
    async def main():
        held, gate = [], asyncio.Semaphore(64)
        async def guarded():
            async with gate:
                await one(held)
        await asyncio.gather(*(guarded() for _ in range(count)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    asyncio.run(main())
    """
)


def rss_kib() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def live_objects() -> collections.Counter[str]:
    """Bytes of live objects tracked by the collector, by type name."""
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        sizes[type(obj).__qualname__] += sys.getsizeof(obj)
    return sizes


async def connect(port: int, count: int, token: str) -> subprocess.Popen[str]:
    """Start the client process; returns once its connections are open."""
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port), str(count), token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
    if line.strip() != "ready":
        raise SystemExit(f"client failed (exit {child.wait()})")
    return child


async def measure(count: int) -> None:
    """Open ``count`` connections and print what they cost."""
    settings = tomllib.loads((HERE / "bench.toml").read_text())
    with tempfile.TemporaryDirectory(prefix="pushsvc-memory.") as data_dir:
        settings.setdefault("server", {})["data_dir"] = data_dir
        settings["log"] = {"access_log": False}
        config = config_module.build([settings])
        plugins = load_plugins(config.plugins.disabled, config.auth.default_rooms)
        service = await app.start(config, registry=CollectorRegistry(), plugins=plugins)
        token = tokens.mint(config.auth.jwt_secret or "", "bench", ttl=3600)
        warm = await open_all(service, 100, token)  # imports, caches, first-use objects
        await close_all(service, warm)
        gc.collect()
        rss_before, objects_before = rss_kib(), live_objects()
        child = await open_all(service, count, token)
        rss_after, objects_after = rss_kib(), live_objects()
        await close_all(service, child)
        # A second round under tracemalloc (which costs memory of its own, so the
        # RSS figure above comes from the first round).
        tracemalloc.start()
        snapshot_before = tracemalloc.take_snapshot()
        child = await open_all(service, count, token)
        snapshot_after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        await close_all(service, child)
        await service.shutdown(pace=False)
    report(count, (rss_before, snapshot_before, objects_before),
           (rss_after, snapshot_after, objects_after))  # fmt: skip


async def open_all(service: app.Service, count: int, token: str) -> subprocess.Popen[str]:
    """Open ``count`` connections; returns once the server settled with all of them."""
    child = await connect(service.port, count, token)
    while len(service.node.hub.sessions) < count:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # joins answered, presence settled
    gc.collect()
    return child


async def close_all(service: app.Service, child: subprocess.Popen[str]) -> None:
    """Close the client's connections and wait until the server dropped them."""
    child.communicate("")
    while service.node.hub.sessions:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    gc.collect()


Sample = tuple[int, tracemalloc.Snapshot, collections.Counter[str]]  # RSS, traces, objects


def report(count: int, before: Sample, after: Sample) -> None:
    """Print the per-connection growth (and write it to ``bench/results``)."""
    lines: list[str] = []
    out = lines.append
    rss0, snap0, objs0 = before
    rss1, snap1, objs1 = after
    out("# Memory per idle connection (bench/memory.py)\n")
    out(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
        f"{platform.python_version()}, {type(asyncio.get_event_loop_policy()).__module__}\n"
    )
    out(f"{count:,} idle authenticated connections (each joined one room)\n")
    out(f"RSS growth: {(rss1 - rss0) / count:.2f} KiB per connection\n")
    stats = snap1.compare_to(snap0, "filename")
    traced = sum(s.size_diff for s in stats)
    out(f"tracemalloc growth: {traced / count / 1024:.2f} KiB per connection, by file:\n")
    out("| file | bytes per connection |\n|---|---:|")
    for stat in stats[:10]:
        name = stat.traceback[0].filename
        short = "/".join(Path(name).parts[-2:])
        out(f"| {short} | {stat.size_diff / count:.0f} |")
    out("\nLive objects by type (sys.getsizeof), per connection:\n")
    out("| type | bytes per connection |\n|---|---:|")
    grown = {name: objs1[name] - objs0.get(name, 0) for name in objs1}
    for name, size in sorted(grown.items(), key=lambda item: -item[1])[:12]:
        if size / count >= 8:
            out(f"| {name} | {size / count:.0f} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    (HERE / "results" / "memory-latest.md").write_text(text)


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    if os.name != "posix":
        raise SystemExit("needs /proc (Linux)")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(measure(args.connections))


if __name__ == "__main__":
    main()
