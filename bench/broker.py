#!/usr/bin/env python3
"""bench/broker.py - the Redis broker's cost per message: one Redis vs a 3-master Redis Cluster.

In one process, a publishing and a subscribing :class:`RedisBroker` (two
nodes' brokers) exchange ``--messages`` LIVE envelopes (150-byte frames) over
``--channels`` room channels (spread over the partitions, so over every master
of the cluster), ``--window`` publishes in flight. It starts its own
``redis-server`` processes (tests/redis_server.py; appendonly off does not
matter here: pub/sub writes nothing).

Printed per topology: pushsvc CPU per message (this process's CPU time, both
brokers: publish, pipeline, read, envelope header parse, callback), Redis CPU
per message (``INFO cpu`` summed over the servers) and wall messages/s. On
a shared 2-core machine the wall figure is noise; the CPU figures are the
ones to compare, and even they move by 10-20 % between runs.

    python bench/broker.py                     # 20,000 messages, 100 channels, window 100
    python bench/broker.py --messages 5000 --channels 10
    valgrind --tool=callgrind python bench/broker.py --rounds 1 --only cluster \
        --warmup 200 --timeout 30 --messages 500     # and --messages 1500: instructions
        # per message = the difference of the two totals / 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pushsvc.broker import Envelope, EnvelopeKind  # noqa: E402
from pushsvc.broker.redis import RedisBroker  # noqa: E402
from redis_server import RedisClusterSetup, RedisServer  # noqa: E402

FRAME = b'{"type":"chat","room":"r","from":"alice","text":"' + b"x" * 100 + b'"}'


def redis_cpu(servers: list[RedisServer]) -> float:
    total = 0.0
    for server in servers:
        for line in server.command("INFO", "cpu").splitlines():
            if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                total += float(line.split(":")[1])
    return total


async def measure(url: str, servers: list[RedisServer], args: argparse.Namespace) -> str:
    received = 0
    done = asyncio.Event()
    target = 0

    def on_message(channel: str, envelope: Envelope) -> None:
        nonlocal received
        received += 1
        if received >= target:
            done.set()

    publisher = RedisBroker.from_url(url, timeout=args.timeout, probe_interval=5.0)
    subscriber = RedisBroker.from_url(url, timeout=args.timeout, probe_interval=5.0)
    subscriber.set_callback(on_message)
    await publisher.start()
    await subscriber.start()
    channels = [f"room:bench{n}" for n in range(args.channels)]
    await asyncio.gather(*(subscriber.subscribe(channel) for channel in channels))

    async def run(count: int) -> None:
        nonlocal target
        sent = 0
        while sent < count:
            batch = min(args.window, count - sent)
            target = received + batch
            done.clear()
            await asyncio.gather(
                *(
                    publisher.publish(
                        channels[(sent + i) % len(channels)],
                        Envelope(EnvelopeKind.LIVE, "chat", f"m{sent + i}", FRAME),
                    )
                    for i in range(batch)
                )
            )
            await asyncio.wait_for(done.wait(), 10 * args.timeout)
            sent += batch

    await run(args.warmup)
    cpu, rcpu, wall = time.process_time(), redis_cpu(servers), time.monotonic()
    await run(args.messages)
    cpu = time.process_time() - cpu
    rcpu = redis_cpu(servers) - rcpu
    wall = time.monotonic() - wall
    await publisher.close()
    await subscriber.close()
    n = args.messages
    return (
        f"pushsvc CPU {cpu / n * 1e6:6.1f} µs/msg   Redis CPU {rcpu / n * 1e6:6.1f} µs/msg   "
        f"{n / wall:8.0f} msg/s wall"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2000, help="messages before measuring")
    parser.add_argument("--timeout", type=float, default=2.0, help="broker.timeout (valgrind: 30)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each topology")
    parser.add_argument("--only", choices=["redis", "cluster"], help="one topology only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        single = RedisServer(Path(work) / "single", appendonly=False)
        cluster = RedisClusterSetup(Path(work) / "cluster")
        single.start()
        cluster.start()
        try:
            for round_ in range(args.rounds):
                for name, url, servers in (
                    ("one Redis      ", single.url, [single]),
                    ("Cluster (3 m.) ", cluster.url, cluster.nodes),
                ):
                    if args.only and (args.only == "cluster") != url.startswith("redis+cluster"):
                        continue
                    print(f"round {round_ + 1} {name}", await measure(url, servers, args))
        finally:
            single.kill9()
            cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())
