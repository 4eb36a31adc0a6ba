"""A real ``redis-server`` for tests, started on a free loopback port in the test's tmp dir.

Tests never use a Redis they did not start. :class:`RedisServer` runs one
``redis-server`` process (``appendonly`` on by default, so a restart keeps
what was written) and can stop, ``kill -9``, restart, pause and ``DEBUG
SLEEP`` it, the faults the Redis tests need. The fixtures:

- ``redis_server``: one server for the whole session, flushed before each
  test that asks for ``redis_url`` (contract suites, quick tests);
- ``fresh_redis``: a server of its own for a test that stops or breaks it;
- ``redis_sentinel``: a master, a replica and three sentinels (failover tests);
- ``redis_cluster``: a three-master Redis Cluster (sharded pub/sub, hash tags) of the
  test's own; ``redis_cluster_url``: one shared by the session, flushed per test.

Without a ``redis-server`` binary these fixtures skip with the reason.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pushsvc.store import redis as redis_store

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (Debian package redis-server; make tools installs it)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, its bus port (+10000) free too."""
    while True:
        port = _free_port()
        if port > 55535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """One ``redis-server`` process on loopback, owned by a test."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        extra: Sequence[str] = (),
        sentinel_config: str | None = None,
    ) -> None:
        self.directory = directory  # its working dir (AOF, RDB, log)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.appendonly = appendonly
        self.extra = list(extra)  # more ``--option value`` arguments
        #: run as a sentinel with this config text (written to sentinel.conf)
        self.sentinel_config = sentinel_config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        assert REDIS_SERVER is not None, NO_REDIS
        if self.sentinel_config is not None:
            conf = self.directory / "sentinel.conf"
            if not conf.exists():  # sentinels rewrite their config: keep what they wrote
                conf.write_text(self.sentinel_config)
            return [
                REDIS_SERVER,
                str(conf),
                "--sentinel",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--logfile",
                str(self.directory / "redis.log"),
            ]
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


class RedisSentinelSetup:
    """A master, one replica and three sentinels watching them as ``mymaster``."""

    MASTER_NAME = "mymaster"

    def __init__(self, directory: Path) -> None:
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(directory / "replica")
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.master.port)]
        config = (
            f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {self.MASTER_NAME} 5000\n"
            f"sentinel parallel-syncs {self.MASTER_NAME} 1\n"
        )
        self.sentinels = [
            RedisServer(directory / f"sentinel{i}", sentinel_config=config) for i in range(3)
        ]

    @property
    def url(self) -> str:
        """``redis+sentinel://`` with every sentinel, the master name and db 0."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.MASTER_NAME}/0"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        _wait(lambda: "master_link_status:up" in self.replica.command("INFO", "replication"))
        for sentinel in self.sentinels:
            sentinel.start()
        _wait(lambda: self.master_port() == self.master.port)

    def master_port(self) -> int | None:
        """The master's port as the first live sentinel reports it."""
        for sentinel in self.sentinels:
            try:
                reply = sentinel.command(
                    "SENTINEL", "get-master-addr-by-name", self.MASTER_NAME
                ).split("\n")
            except (OSError, RuntimeError):
                continue
            if len(reply) == 2 and reply[1]:
                return int(reply[1])
        return None

    def failover(self, timeout: float = 30.0) -> None:
        """Kill the master (``kill -9``) and wait until the sentinels promoted the replica."""
        self.master.kill9()
        _wait(lambda: self.master_port() == self.replica.port, timeout)
        _wait(lambda: "role:master" in self.replica.command("INFO", "replication"), timeout)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.kill9()


class RedisClusterSetup:
    """Three masters in cluster mode (no replicas): 16384 slots split three ways."""

    def __init__(self, directory: Path) -> None:
        self.nodes = [RedisServer(directory / f"node{i}") for i in range(3)]
        for node in self.nodes:
            node.port = _free_cluster_port()  # Redis refuses ports whose bus port is > 65535
            node.extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.directory / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node (any one is enough to discover the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli is not installed (Debian package redis-tools)"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in self.nodes:
            _wait(lambda node=node: "cluster_state:ok" in node.command("CLUSTER", "INFO"))

    def stop(self) -> None:
        for node in self.nodes:
            node.kill9()


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis setup: not ready within {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelSetup]:
    """A sentinel-watched master and replica of this test's own; killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    setup = RedisSentinelSetup(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def _running_cluster(directory: Path) -> Iterator[RedisClusterSetup]:
    """Start a cluster in ``directory`` (skip without the binaries); kill it afterwards."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed (Debian package redis-tools)")
    setup = RedisClusterSetup(directory)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterSetup]:
    """A three-master Redis Cluster of this test's own; killed at teardown."""
    yield from _running_cluster(tmp_path / "cluster")


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSetup]:
    """One three-master cluster for the whole session (emptied per test through
    ``redis_cluster_url``), for the contract suites."""
    yield from _running_cluster(tmp_path_factory.mktemp("cluster-shared"))


@pytest.fixture
def redis_cluster_url(shared_redis_cluster: RedisClusterSetup) -> str:
    """The URL of the shared cluster, every master emptied for this test."""
    for node in shared_redis_cluster.nodes:
        node.flush()
    return shared_redis_cluster.url


def strict_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Redis refuse any script that touches keys of two slots.

    Redis 7 lets a script without flags reach keys of several slots when one
    master serves them all (as a 3-master cluster often does), so the suite
    alone would not catch a script spanning slots. With a ``#!lua`` shebang
    Redis refuses that ("keys that do not hash to the same slot"). The store
    runs its scripts without it (a flagged script is refused whole at
    ``maxmemory``, an ack included), so the tests add it.
    """
    strict = {
        name: (f"#!lua\n{source}", hashlib.sha1(f"#!lua\n{source}".encode()).hexdigest())
        for name, (source, _sha) in redis_store.SCRIPTS.items()
    }
    monkeypatch.setattr(redis_store, "SCRIPTS", strict)


def strict_registry_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Redis refuse any script of the cluster registry that touches keys of two slots.

    Redis 7 lets a script without flags reach keys of several slots when one
    master serves them all (as a 3-master cluster often does), so a test on a
    small cluster alone would not catch a script spanning slots; with a
    ``#!lua`` shebang Redis refuses it ("keys that do not hash to the same
    slot"). The registry runs its scripts without it (Redis 6 has no shebang).
    """
    from pushsvc.cluster import redis as registry

    strict = {name: f"#!lua\n{source}" for name, source in registry.SCRIPTS.items()}
    monkeypatch.setattr(registry, "SCRIPTS", strict)
