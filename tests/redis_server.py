"""A real ``redis-server`` for tests, started on a free loopback port in the test's tmp dir.

Tests never use a Redis they did not start. :class:`RedisServer` runs one
``redis-server`` process (``appendonly`` on by default, so a restart keeps
what was written) and can stop, ``kill -9``, restart, pause and ``DEBUG
SLEEP`` it, the faults the Redis tests need. The fixtures:

- ``redis_server``: one server for the whole session, flushed before each
  test that asks for ``redis_url`` (contract suites, quick tests);
- ``fresh_redis``: a server of its own for a test that stops or breaks it.

Without a ``redis-server`` binary these fixtures skip with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (Debian package redis-server; make tools installs it)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on loopback, owned by a test."""

    def __init__(
        self, directory: Path, *, appendonly: bool = True, extra: Sequence[str] = ()
    ) -> None:
        self.directory = directory  # its working dir (AOF, RDB, log)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.appendonly = appendonly
        self.extra = list(extra)  # more ``--option value`` arguments
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        assert REDIS_SERVER is not None, NO_REDIS
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.directory / "redis.log"),
            "--enable-debug-command",
            "local",
            *self.extra,
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart on the same port and data) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log()}")
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            except RuntimeError as exc:  # "LOADING": still reading the AOF after a restart
                if not str(exc).startswith("LOADING"):
                    raise
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """Stop it (SIGTERM: the AOF is flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill9(self) -> None:
        """Kill it without letting it flush (``kill -9``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Stop and start again on the same port and data."""
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def command(self, *args: str, timeout: float = 5.0) -> str:
        """Run one command over a plain socket (RESP); returns the reply as text.

        Independent of redis-py on purpose: the tests check the server, not
        the client under test. Errors raise ``RuntimeError``.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            parts = [f"*{len(args)}\r\n".encode()]
            for arg in args:
                data = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"".join(parts))
            reader = sock.makefile("rb")
            return _read_reply(reader)

    def flush(self) -> None:
        """Empty every database."""
        self.command("FLUSHALL")


def _read_reply(reader: object) -> str:
    read = reader.readline  # type: ignore[attr-defined]
    line: bytes = read()
    if not line:
        raise OSError("connection closed")
    prefix, rest = line[:1], line[1:].rstrip(b"\r\n")
    if prefix in (b"+", b":"):
        return rest.decode()
    if prefix == b"-":
        raise RuntimeError(rest.decode())
    if prefix == b"$":
        size = int(rest)
        if size < 0:
            return ""
        data: bytes = reader.read(size + 2)  # type: ignore[attr-defined]
        return data[:-2].decode(errors="replace")
    if prefix == b"*":
        count = int(rest)
        return "\n".join(_read_reply(reader) for _ in range(max(0, count)))
    raise RuntimeError(f"unexpected reply {line!r}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` shared by the session (flushed per test through ``redis_url``)."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.kill9()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the shared server, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of this test's own, to stop, kill or break; killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill9()
