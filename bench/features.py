"""What each feature costs per operation, so a change that costs 20 % shows up.

Usage: .venv/bin/python bench/features.py [--out bench/results/features-latest.md]

Times the pieces that run per frame, per delivery or per handshake, each on
its own (best of several runs of many iterations), and prints microseconds
per operation. Compare with the committed figures before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado

from pushsvc.auth import tokens
from pushsvc.broker import Envelope, EnvelopeKind
from pushsvc.config import AuthConfig
from pushsvc.core.ratelimit import KeyedBuckets, TokenBucket
from pushsvc.ops.metrics import Metrics
from pushsvc.plugin.manager import MESSAGE_HANDLER, StepTimer
from pushsvc.protocol import frames, ids
from pushsvc.protocol.commands import CORE_COMMANDS
from pushsvc.protocol.fields import Field
from pushsvc.transport import tornado_compat

SECRET = "features-benchmark-secret-0123456789abcdef"


def per_op(fn: Callable[[], object], number: int = 20_000, repeat: int = 5) -> float:
    """Best microseconds per call over ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


async def _handler() -> None:
    return None


def _drive(awaitable: Any) -> None:
    """Run an awaitable that never suspends, without an event loop."""
    try:  # noqa: SIM105 - contextlib.suppress would add its own cost to the figures
        awaitable.__await__().send(None)
    except StopIteration:
        pass


def measure() -> list[tuple[str, str, float]]:
    chat = '{"type":"chat","room":"bench","text":"hello world, this is a benchmark message"}'
    command = frames.decode_frame(chat)
    assert isinstance(command, frames.Command)
    room = CORE_COMMANDS["join"].fields["room"]
    chat_fields = {"room": room, "text": room}
    checked_fields = {
        "room": Field(str, max_length=200, pattern=r"[a-z0-9-]+", choices={"bench", "other"}),
        "text": Field(str, max_length=4000, min_length=1),
    }
    bucket = TokenBucket(1e9, 1e9, 0.0)
    users = KeyedBuckets(1e9, 1e9)
    metrics = Metrics()
    child = metrics.frames_sent.labels("chat")
    authenticator = tokens.Authenticator(AuthConfig(jwt_secret=SECRET), SECRET)
    token = tokens.mint(SECRET, "bench", ttl=3600)
    loop = asyncio.new_event_loop()
    verify = authenticator._verify  # the uncached path
    payload = frames.encode({"type": "chat", "room": "bench", "text": "x" * 80})
    envelope = Envelope(EnvelopeKind.LIVE, "chat", ids.new_id(), payload)
    wire = envelope.to_bytes()
    message = {"type": "chat", "room": "bench", "user": "u", "name": "u", "text": "hello"}
    return [
        ("frame", "decode_frame (chat, 80 B)", per_op(lambda: frames.decode_frame(chat))),
        ("frame", "validate (2 fields)", per_op(lambda: frames.validate(command, chat_fields))),
        (
            "frame",
            "validate (2 fields, pattern/choices/min_length)",
            per_op(lambda: frames.validate(command, checked_fields)),
        ),
        ("frame", "rate limit: connection bucket", per_op(lambda: bucket.try_take(1.0))),
        ("frame", "rate limit: user bucket (dict)", per_op(lambda: users.try_take("u", 1.0))),
        (
            "frame",
            "metric: counter.labels(t).inc()",
            per_op(lambda: metrics.frames_received.labels("chat").inc()),
        ),
        ("frame", "plugin handler: call and await", per_op(lambda: _drive(_handler()))),
        (
            "frame",
            "plugin handler: through StepTimer (slow_hook_seconds)",
            per_op(lambda: _drive(StepTimer(_handler(), 0.1, "bench", MESSAGE_HANDLER))),
        ),
        ("message", "id (ULID)", per_op(ids.new_id)),
        (
            "message",
            "stamp + encode (chat)",
            per_op(lambda: frames.encode(frames.stamp(message)[1])),
        ),
        (
            "message",
            "broker envelope to/from bytes",
            per_op(lambda: Envelope.from_bytes(envelope.to_bytes())),
        ),
        (
            "delivery",
            "text_frame (100 B, once per broadcast)",
            per_op(lambda: tornado_compat.text_frame(payload)),
        ),
        ("delivery", "metric: pre-bound counter inc", per_op(child.inc)),
        (
            "handshake",
            "JWT verify HS256 (uncached)",
            per_op(lambda: loop.run_until_complete(verify(token)), number=2_000),
        ),
        (
            "handshake",
            "JWT verify (cached token)",
            per_op(lambda: loop.run_until_complete(authenticator.verify(token)), number=2_000),
        ),
        ("wire", "Envelope bytes on the broker", float(len(wire))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/features-latest.md")
    args = parser.parse_args()
    rows = measure()
    lines = [
        "# pushsvc feature costs",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
        f"Tornado {tornado.version}, {platform.processor() or platform.machine()}.",
        "Best of 5 runs; microseconds per operation (the last row is bytes).",
        "",
        "| where | operation | µs/op |",
        "|---|---|---:|",
    ]
    lines += [f"| {where} | {name} | {value:.3f} |" for where, name, value in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
