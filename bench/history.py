"""What one room-history append costs: the store alone, as ``Node.publish`` calls it.

Usage: ``.venv/bin/python bench/history.py [--count 20000] [--concurrency 1 100]
[--store-url redis://127.0.0.1:6379/0?prefix=bench:]``

For each concurrency (publications in flight, like that many publishers), it
appends ``--count`` chat frames to 10 rooms and prints wall µs per append,
the writer thread's CPU µs per append (the share of the group commit each
publication pays) and the appends per transaction. The frame is encoded
inside the append (``encode(offset, epoch)``), as the node does. With
``--store-url`` (a Redis store; its keys under the URL's prefix are deleted
first) it prints wall µs, pushsvc's CPU µs and redis-server's CPU µs (``INFO
cpu``) per append, and the appends per pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import orjson

from pushsvc.protocol import frames
from pushsvc.store import HistoryRetention
from pushsvc.store.redis import RedisStore
from pushsvc.store.sqlite import SqliteStore

RETENTION = HistoryRetention(size=1000, ttl=600.0)


def _thread_cpu(name: str) -> float:
    """CPU seconds of the thread called ``name`` (Linux /proc)."""
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks
    return 0.0


async def run(count: int, concurrency: int, folder: str) -> tuple[float, float, float]:
    store = SqliteStore(f"{folder}/c{concurrency}.sqlite3")
    await store.open()
    message = {"type": "chat", "room": "r", "user": "alice", "name": "Alice", "text": "x" * 60}

    async def one(i: int) -> None:
        _, frame = frames.stamp(message)

        def encode(offset: int, epoch: str) -> bytes:
            frame["offset"], frame["epoch"] = offset, epoch
            return frames.encode(frame)

        await store.append(f"room-{i % 10}", "chat", encode, RETENTION)

    before_cpu, before_tx = _thread_cpu("pushsvc-store"), store.transactions
    started = time.perf_counter()
    for start in range(0, count, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + concurrency))))
    wall = time.perf_counter() - started
    cpu = _thread_cpu("pushsvc-store") - before_cpu
    transactions = store.transactions - before_tx
    page = await store.history("room-0", None, 1, reverse=True)
    assert orjson.loads(page.entries[0].frame)["offset"] == page.top
    await store.close()
    return wall / count * 1e6, cpu / count * 1e6, count / max(1, transactions)


async def run_redis(url: str, count: int, concurrency: int) -> tuple[float, float, float, float]:
    store = RedisStore(url)
    await store.open()
    client = store._redis  # the bench's own look at Redis: clean up, read its CPU
    assert client is not None
    async for key in client.scan_iter(match=f"{store.prefix}*", count=1000):
        await client.delete(key)
    message = {"type": "chat", "room": "r", "user": "alice", "name": "Alice", "text": "x" * 60}

    async def one(i: int) -> None:
        _, frame = frames.stamp(message)

        def encode(offset: int, epoch: str) -> bytes:
            frame["offset"], frame["epoch"] = offset, epoch
            return frames.encode(frame)

        await store.append(f"room-{i % 10}", "chat", encode, RETENTION)

    async def redis_cpu() -> float:
        info = await client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    before_redis, before_batches = await redis_cpu(), store.batches
    before_cpu = time.process_time()
    started = time.perf_counter()
    for start in range(0, count, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + concurrency))))
    wall = time.perf_counter() - started
    cpu = time.process_time() - before_cpu
    batches = store.batches - before_batches
    spent = await redis_cpu() - before_redis
    page = await store.history("room-0", None, 1, reverse=True)
    assert orjson.loads(page.entries[0].frame)["offset"] == page.top
    await store.close()
    per = 1e6 / count
    return wall * per, cpu * per, spent * per, count / max(1, batches)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--store-url", help="a Redis store instead of SQLite")
    args = parser.parse_args()
    if args.store_url:
        print("| in flight | wall µs/append | pushsvc CPU µs/append |", end="")
        print(" Redis CPU µs/append | appends/pipeline |")
        print("|---:|---:|---:|---:|---:|")
        for concurrency in args.concurrency:
            count = args.count if concurrency > 1 else min(args.count, 5000)
            wall, cpu, redis, batch = asyncio.run(run_redis(args.store_url, count, concurrency))
            print(f"| {concurrency} | {wall:.1f} | {cpu:.1f} | {redis:.1f} | {batch:.1f} |")
        return
    print("| in flight | wall µs/append | writer CPU µs/append | appends/transaction |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for concurrency in args.concurrency:
            count = args.count if concurrency > 1 else min(args.count, 5000)
            wall, cpu, batch = asyncio.run(run(count, concurrency, folder))
            print(f"| {concurrency} | {wall:.1f} | {cpu:.1f} | {batch:.1f} |")


if __name__ == "__main__":
    main()
