"""Run a pushsvc cluster on loopback: one redis-server, N nodes, a round-robin load balancer.

``make cluster`` runs it with three nodes; open http://127.0.0.1:8888 and every
new connection (page, WebSocket, API call) goes to the next node, as behind a
plain TCP load balancer without sticky sessions. Ctrl-C stops everything.

    python contrib/cluster.py [--nodes 3] [--port 8888] [--dir .cluster]

Ports: the balancer on ``--port``, node *i* on ``--port + i``, Redis on
``--port + 100``. State (the Redis AOF, each node's data dir and log) is under
``--dir``; the nodes share one JWT secret (``--dir``/jwt_secret), so a token
from any node's ``POST /dev/token`` works on all of them. The script needs
only ``redis-server`` on the PATH and pushsvc installed (``make cluster``
builds the venv). It is a demo and a test harness, not a deployment:
docs/deploy.md shows a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class RoundRobin:
    """A TCP load balancer: each new connection goes to the next backend that accepts it."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connect the client to a backend and copy bytes both ways until either side closes."""
        for _ in self.backends:
            host, port = self.backends[next(self._next)]
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
                break
            except OSError:
                continue  # that node is down: try the next one
        else:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cluster: {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"cluster: {url} not ready within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="pushsvc processes (default 3)")
    parser.add_argument("--port", type=int, default=8888, help="the balancer's port")
    parser.add_argument("--dir", type=Path, default=Path(".cluster"), help="state directory")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()

    state: Path = args.dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    secret_file = state / "jwt_secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    redis_port = args.port + 100
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs: list[subprocess.Popen[bytes]] = []

    def stop(*_: object, status: int = 0) -> None:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        sys.exit(status)

    signal.signal(signal.SIGTERM, stop)
    redis_dir = state / "redis"
    redis_dir.mkdir(exist_ok=True)
    procs.append(
        subprocess.Popen(
            [
                args.redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "noeviction",
                "--save",
                "",
                "--logfile",
                str(redis_dir / "redis.log"),
            ]
        )
    )
    pushsvc = Path(sys.executable).parent / "pushsvc"
    env = {
        **os.environ,
        "PUSHSVC_AUTH__JWT_SECRET_FILE": str(secret_file),
        "PUSHSVC_BROKER__URL": redis_url,
        "PUSHSVC_STORE__URL": redis_url,
    }
    backends = []
    for index in range(1, args.nodes + 1):
        port = args.port + index
        data_dir = state / f"node{index}"
        data_dir.mkdir(exist_ok=True)
        log = open(data_dir / "pushsvc.log", "ab")  # noqa: SIM115 - lives as long as the node
        command = [str(pushsvc), "serve", "--dev", "--port", str(port), "--data-dir", str(data_dir)]
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        backends.append(("127.0.0.1", port))
    try:
        for (host, port), proc in zip(backends, procs[1:], strict=True):
            _wait_ready(f"http://{host}:{port}/readyz", proc)
    except SystemExit as failed:
        print(f"{failed}; the nodes' logs: {state}/node*/pushsvc.log", file=sys.stderr, flush=True)
        stop(status=1)

    async def serve() -> None:
        balancer = RoundRobin(backends)
        server = await asyncio.start_server(balancer.handle, "127.0.0.1", args.port)
        # Printed once the balancer listens: a script waiting for these lines may connect.
        print(f"cluster: redis {redis_url}; nodes {', '.join(str(p) for _, p in backends)}")
        print(f"cluster: open http://127.0.0.1:{args.port}/ (round robin over the nodes)")
        print(f"cluster: state and logs in {state}; Ctrl-C stops it", flush=True)
        async with server:
            await server.serve_forever()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve())
    except OSError as exc:  # the balancer's port is taken: stop the nodes too
        print(f"cluster: cannot listen on {args.port}: {exc}", file=sys.stderr, flush=True)
        stop(status=1)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
