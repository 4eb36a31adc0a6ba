"""pushsvc under a real systemd: a minimal Debian booted with systemd-nspawn (tests/nspawn.py).

tests/test_systemd.py and tests/test_lifecycle.py play systemd's part themselves
(a datagram socket for ``$NOTIFY_SOCKET``, a listening socket on fd 3). Here the
container's own systemd 252 runs the units from systemd/, installed by the shell
block of docs/deploy.md's "Install" section, run as written. Where the test
differs from a real host:

* pip gets ``PIP_CERT`` = the host's CA bundle (the host may reach PyPI through
  a TLS-inspecting proxy the container's fresh bundle does not know), and the
  host's ``PIP_INDEX_URL``/``PIP_EXTRA_INDEX_URL`` if they are http(s);
  ``pip install .`` itself runs unchanged.
* A drop-in moves ``pushsvc.socket`` from 8888 to a free port (the container
  shares the host's network), as docs/deploy.md's "Changing settings" shows.
* The watchdog test adds ``WatchdogSec=4`` in a drop-in for its duration, so
  that a stall is caught in seconds, not the unit's 30 s.

Tests share one booted container and run in file order; each leaves the
service running with the documented config. Needs root, debootstrap and
systemd-nspawn (``CI=true make tools``); skipped with the reason otherwise.
The first run builds the image (about 1.5 minutes), later runs reuse it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_lifecycle import REASON, connect, pings, watch_close
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

import nspawn
from conftest import Client, free_port
from pushsvc.auth import tokens

pytestmark = [
    pytest.mark.slow,
    # Setting up the shared container (the first test) may build the image.
    pytest.mark.timeout(nspawn.BUILD_TIMEOUT + 300),
]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "docs" / "deploy.md"
SOURCE_INSIDE = "/root/pushsvc"  # where the checkout is copied in the container
CONFIG = "/etc/pushsvc/pushsvc.toml"
STORE = "/var/lib/private/pushsvc/pushsvc.sqlite3"  # StateDirectory= under DynamicUser=
CREDENTIAL = "/run/credentials/pushsvc.service/jwt_secret"
UNIT = "pushsvc.service"
WATCHDOG_SEC = 4
#: DynamicUser= picks UIDs from this range (systemd's DYNAMIC_UID_MIN..MAX).
DYNAMIC_UIDS = range(61184, 65519 + 1)
DRAIN_CLIENTS = 50
#: `systemd-analyze security` of the running unit may not exceed today's 1.1. The container's
#: systemd is pinned (Debian 12, 252), so the score is exact, and 1.1 is what the network
#: items docs/deploy.md "Hardening" lists leave; any weakened directive raises it (dropping
#: CapabilityBoundingSet= gives 2.8, SystemCallFilter= 2.6, RestrictNamespaces= 1.8,
#: DynamicUser= 1.4, PrivateDevices= 1.2). tests/test_systemd.py's offline bound (2.0) is
#: looser because it runs on whatever systemd the host has.
MAX_EXPOSURE = 1.1


def install_block() -> str:
    """The shell block of docs/deploy.md's "Install" section, as written."""
    section = DEPLOY.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "docs/deploy.md: no ```sh block under ## Install"
    return match.group(1)


def copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored) into ``dest``."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = REPO / name
            if source.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
    else:  # not a git checkout: everything but the local caches
        ignore = shutil.ignore_patterns(
            ".git", ".venv", "*cache*", ".hypothesis", "build", "*.egg-info"
        )
        shutil.copytree(REPO, dest, ignore=ignore, dirs_exist_ok=True)


class Deployed:
    """The booted container with pushsvc installed, and what the tests need to reach it."""

    def __init__(self, container: nspawn.Container, port: int) -> None:
        self.c = container
        self.port = port
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.base = f"http://127.0.0.1:{port}"
        # The secret deploy.md's step 2 generated: what the service must have read.
        self.secret = container.path("/etc/pushsvc/jwt_secret").read_text().strip()
        self.config = container.path(CONFIG).read_text()

    def token(self, sub: str, **kwargs: Any) -> str:
        return tokens.mint(self.secret, sub, **kwargs)

    async def connect(self, sub: str = "alice") -> Client:
        return await connect(self.ws_url, jwt=self.token(sub), sub=sub)

    async def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = HTTPRequest(
            self.base + path,
            method=method,
            body=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {self.token('backend', scope='publish')}"},
            request_timeout=10,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        return response.code, orjson.loads(response.body) if response.body else None

    def write_config(self, text: str) -> None:
        """Replace the config atomically, root-owned 0644 as deploy.md's step 3 leaves it."""
        path = self.c.path(CONFIG)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)

    def running(self) -> dict[str, str]:
        """Make sure the service runs (clearing any start limit); its state."""
        self.c.systemctl("reset-failed", UNIT, check=False)
        self.c.systemctl("start", UNIT)
        return self.c.wait_state(UNIT, "active")

    def main_pid(self) -> int:
        return int(self.c.show(UNIT, "MainPID")["MainPID"])

    def monotonic(self, name: str) -> float:
        """A ``...TimestampMonotonic`` property in seconds (the tests' own clock)."""
        return int(self.c.show(UNIT, name)[name]) / 1e6


def pip_env() -> dict[str, str]:
    """pip's environment inside: trust the host's CAs, use its index if it names one."""
    env = {}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            env[name] = value
    return env


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployed]:
    """A booted container with pushsvc installed as docs/deploy.md says, and running."""
    if reason := nspawn.unavailable():
        pytest.skip(reason)
    logs = Path(tempfile.mkdtemp(prefix="pushsvc-nspawn-"))
    try:
        image, built = nspawn.build_image(logs / "debootstrap.log")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot build the Debian image with debootstrap here: {error}")
    booting = time.monotonic()
    try:
        with nspawn.boot(image, logs / "console.log") as container:
            booted = time.monotonic() - booting
            installing = time.monotonic()
            port = free_port()
            dropin = container.path("/etc/systemd/system/pushsvc.socket.d/test-port.conf")
            dropin.parent.mkdir(parents=True)
            dropin.write_text(f"[Socket]\nListenStream=\nListenStream={port}\n")
            copy_checkout(container.path(SOURCE_INSIDE))
            env = pip_env()
            if Path("/etc/ssl/certs/ca-certificates.crt").exists():
                shutil.copy(
                    "/etc/ssl/certs/ca-certificates.crt", container.path("/root/host-ca.crt")
                )
                env["PIP_CERT"] = "/root/host-ca.crt"
            container.path("/root/install.sh").write_text(install_block())
            result = container.run(
                "bash",
                "-euo",
                "pipefail",
                "-c",
                f"cd {SOURCE_INSIDE} && . /root/install.sh",
                env=env,
                check=False,
                timeout=300,
            )
            output = result.stdout + result.stderr
            if result.returncode != 0 and re.search(
                r"Could not fetch URL|Max retries exceeded|No matching distribution", output
            ):
                pytest.skip(
                    f"pip in the container cannot reach the package index:\n{output[-1500:]}"
                )
            assert result.returncode == 0, f"docs/deploy.md's install block failed:\n{output}"
            state = container.wait_state(UNIT, "active", SubState="running")
            print(
                f"\nnspawn: image {'reused' if built < 5 else 'built'} in {built:.1f}s, "
                f"boot {booted:.1f}s, install (deploy.md) {time.monotonic() - installing:.1f}s, "
                f"port {port}, {UNIT} main PID {state['MainPID']}"
            )
            yield Deployed(container, port)
    except RuntimeError as error:
        pytest.skip(f"systemd-nspawn cannot boot a container here: {error}")
    finally:
        shutil.rmtree(logs, ignore_errors=True)


# -- Type=notify -----------------------------------------------------------------------------


# Run by the container's python3 (SQLite resolves /proc/PID/root to the host's /): holds an
# exclusive lock on the store until its stdin closes. The -wal and -shm files SQLite creates
# for it are handed to the store's owner, whom the service runs as.
LOCK_STORE = """
import os, sqlite3, sys
owner = os.stat(sys.argv[1])
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
for suffix in ("-wal", "-shm"):
    if os.path.exists(sys.argv[1] + suffix):
        os.chown(sys.argv[1] + suffix, owner.st_uid, owner.st_gid)
print("locked", flush=True)
sys.stdin.read()
db.rollback()
"""


def lock_store(deployed: Deployed) -> subprocess.Popen[str]:
    """A process holding the service's SQLite store locked; close its stdin to release."""
    holder = subprocess.Popen(
        deployed.c.command("python3", "-c", LOCK_STORE, STORE),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


async def test_start_returns_only_when_ready(deployed: Deployed) -> None:
    """Type=notify: `systemctl start` blocks, the unit `activating`, while the process runs
    but cannot open its store; once READY=1 it returns and the service answers at once."""
    c = deployed.c
    deployed.running()
    c.systemctl("stop", UNIT)
    held = lock_store(deployed)
    try:
        began = time.monotonic()
        start = subprocess.Popen(
            c.command("systemctl", "start", UNIT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        c.wait_state(UNIT, "activating", timeout=10)
        await asyncio.sleep(2.0)  # within store.busy_timeout (5 s)
        waiting = c.show(UNIT, "ActiveState", "SubState", "MainPID")
        assert start.poll() is None, "systemctl start returned before READY=1"
        assert waiting["ActiveState"] == "activating" and waiting["SubState"] == "start", waiting
        assert int(waiting["MainPID"]) > 0, waiting
    finally:
        released = time.monotonic()  # the lock goes when the holder reads EOF, after this
        assert held.stdin is not None
        held.stdin.close()
        held.wait(10)
    assert start.wait(15) == 0, start.stdout.read() if start.stdout else ""
    returned = time.monotonic()
    status, body = await deployed.http("GET", "/readyz")
    ready_at = deployed.monotonic("ActiveEnterTimestampMonotonic")
    print(
        f"\nType=notify: systemctl start blocked {released - began:.1f}s while the store was "
        f"locked; READY=1 {ready_at - released:.2f}s after its release, "
        f"start returned {returned - released:.2f}s after it"
    )
    assert status == 200 and body["status"] == "ready", body
    assert released < ready_at <= returned
    assert int(waiting["MainPID"]) == deployed.main_pid()


# -- reload ----------------------------------------------------------------------------------


async def test_reload_applies_a_limit_without_dropping_connections(deployed: Deployed) -> None:
    """`systemctl reload` (SIGHUP): a lower ratelimit.burst applies to a connection that
    stayed open, in the same process; systemd sees RELOADING=1 then READY=1."""
    c = deployed.c
    deployed.running()
    pid = deployed.main_pid()
    client = await deployed.connect()
    assert await pings(client, 5) == ["pong"] * 5  # deploy.md's burst = 40
    lowered = deployed.config.replace("rate = 20\nburst = 40", "rate = 0.1\nburst = 3")
    assert lowered != deployed.config, "docs/deploy.md's config changed: update this test"
    cursor = c.cursor()
    try:
        deployed.write_config(lowered)
        c.systemctl("reload", UNIT)
        journal = c.wait_journal("reloaded:", cursor)
        c.wait_state(UNIT, "active", SubState="running")
        assert re.search(r"reloaded: .*ratelimit\.burst", journal), journal
        # systemd's own lines: the unit went through reloading (RELOADING=1 ... READY=1).
        c.wait_journal("Reloaded pushsvc.service", cursor)
        await asyncio.sleep(1.0)  # let the old bucket refill to the new burst
        assert await pings(client, 4) == ["pong", "pong", "pong", "rate_limited"]
        assert client.close_code is None
        assert deployed.main_pid() == pid
        print(f"\nreload: burst 40 -> 3 on the open connection, main PID {pid} throughout")
    finally:
        client.close()
        deployed.write_config(deployed.config)
        cursor = c.cursor()
        c.systemctl("reload", UNIT)
        c.wait_journal("reloaded:", cursor)


# -- watchdog --------------------------------------------------------------------------------


async def test_watchdog_restarts_a_stalled_process(deployed: Deployed) -> None:
    """SIGSTOP the daemon: its WATCHDOG=1 pings stop, systemd aborts it after WatchdogSec
    (the journal shows the Python traceback) and Restart=on-failure starts a new one."""
    c = deployed.c
    dropin = c.path("/etc/systemd/system/pushsvc.service.d/test-watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
    try:
        c.systemctl("daemon-reload")
        c.systemctl("reset-failed", UNIT, check=False)
        c.systemctl("restart", UNIT)
        before = c.wait_state(UNIT, "active", SubState="running")
        assert c.show(UNIT, "WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
        await asyncio.sleep(WATCHDOG_SEC)  # a few pings: the watchdog is fed while it runs
        assert deployed.main_pid() == int(before["MainPID"])
        cursor = c.cursor()
        c.run("sh", "-c", f"kill -STOP {before['MainPID']}")  # no /bin/kill in minbase
        stalled = time.monotonic()
        after = c.wait_state(
            UNIT,
            "active",
            timeout=WATCHDOG_SEC + 2 + 20,
            NRestarts=str(int(before["NRestarts"]) + 1),
        )
        restarted = time.monotonic() - stalled
        journal = c.wait_journal("Fatal Python error: Aborted", cursor)
        print(f"\nwatchdog: stalled process replaced after {restarted:.1f}s")
        assert after["MainPID"] != before["MainPID"]
        assert "Watchdog timeout" in journal, journal
        assert "Failed with result 'watchdog'" in journal, journal
        assert "Current thread" in journal or "Thread 0x" in journal, journal  # faulthandler
        # Not before the pings were due: at least WatchdogSec minus one ping interval.
        assert restarted >= WATCHDOG_SEC / 2 - 0.5
        assert (await deployed.http("GET", "/readyz"))[0] == 200
    finally:
        dropin.unlink()
        c.systemctl("daemon-reload")
        c.systemctl("reset-failed", UNIT, check=False)
        c.systemctl("restart", UNIT)
        c.wait_state(UNIT, "active")


# -- socket activation -----------------------------------------------------------------------


async def attempt(deployed: Deployed, sub: str) -> tuple[float, str]:
    """One WebSocket connection attempt: when it began and how it ended."""
    began = time.monotonic()
    try:
        client = await asyncio.wait_for(deployed.connect(sub), 20)
    except HTTPClientError as error:
        return began, f"http {error.code}"
    except Exception as error:  # refused, reset, timed out: what must not happen
        return began, f"{type(error).__name__}: {error}"
    client.close()
    return began, "welcome"


async def test_socket_keeps_connection_attempts_during_a_restart(deployed: Deployed) -> None:
    """Attempts every 50 ms through `systemctl restart`: those made while no daemon ran
    wait in pushsvc.socket's backlog and are served by the new process; none is refused."""
    c = deployed.c
    deployed.running()
    old = deployed.main_pid()
    attempts: list[asyncio.Future[tuple[float, str]]] = []
    restart = await asyncio.create_subprocess_exec(
        *c.command("systemctl", "restart", UNIT),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    done_at: float | None = None
    while done_at is None or time.monotonic() < done_at + 1.0:
        attempts.append(asyncio.ensure_future(attempt(deployed, f"u{len(attempts)}")))
        await asyncio.sleep(0.05)
        if done_at is None and restart.returncode is not None:
            done_at = time.monotonic()
        assert time.monotonic() < deadline, "systemctl restart did not return"
    assert await restart.wait() == 0
    results = await asyncio.wait_for(asyncio.gather(*attempts), 30)
    assert deployed.main_pid() != old
    down = deployed.monotonic("InactiveEnterTimestampMonotonic")  # the old process gone
    up = deployed.monotonic("ActiveEnterTimestampMonotonic")  # the new one's READY=1
    outcomes = Counter(outcome for _, outcome in results)
    in_gap = [outcome for began, outcome in results if down <= began < up]
    print(
        f"\nsocket activation: {len(results)} attempts, {dict(outcomes)}; "
        f"{len(in_gap)} made in the {up - down:.2f}s without a ready daemon"
    )
    assert in_gap, "no attempt fell between the old process's exit and the new one's READY=1"
    assert set(in_gap) == {"welcome"}, in_gap
    # The old process answers 503 (draining) while it stops; nothing else is allowed.
    assert set(outcomes) <= {"welcome", "http 503"}, outcomes


# -- stop: the paced drain -------------------------------------------------------------------


async def test_stop_drains_with_spread_closes(deployed: Deployed) -> None:
    """`systemctl stop` with 50 clients: each closed with 1001 and a reconnect delay, spread
    over server.drain_seconds (10 in deploy.md's config); exit 0 well inside TimeoutStopSec."""
    c = deployed.c
    deployed.running()
    drain = float(re.search(r"drain_seconds = (\S+)", deployed.config).group(1))  # type: ignore[union-attr]
    clients = [await deployed.connect(f"user{i}") for i in range(DRAIN_CLIENTS)]
    watchers = [asyncio.ensure_future(watch_close(client)) for client in clients]
    timeout_stop = int(c.show(UNIT, "TimeoutStopUSec")["TimeoutStopUSec"].rstrip("s"))
    began = time.monotonic()
    stop = await asyncio.create_subprocess_exec(
        *c.command("systemctl", "stop", UNIT), stderr=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(stop.wait(), timeout_stop + 15) == 0
    stopped = time.monotonic() - began
    closes = await asyncio.wait_for(asyncio.gather(*watchers), 10)
    result = c.show(UNIT, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    times = sorted(close.at - began for close in closes)
    per_second = Counter(int(t) for t in times)
    delays = [float(REASON.match(close.reason or "").group(1)) for close in closes]  # type: ignore[union-attr]
    print(
        f"\nstop: {len(closes)} closes from {times[0]:.2f}s to {times[-1]:.2f}s, busiest second "
        f"{max(per_second.values())}, reconnect delays {min(delays)}..{max(delays)}s; "
        f"systemctl stop took {stopped:.2f}s (TimeoutStopSec={timeout_stop}s)"
    )
    try:
        assert {close.code for close in closes} == {1001}
        assert times[0] < 1.5
        assert times[-1] - times[0] >= 0.8 * drain
        assert max(per_second.values()) <= DRAIN_CLIENTS // 4
        assert stopped < timeout_stop
        assert stopped < drain + 5
        # Exited by itself with 0, not SIGKILLed at TimeoutStopSec.
        assert result == {
            "Result": "success",
            "ExecMainCode": "1",  # CLD_EXITED
            "ExecMainStatus": "0",
            "ActiveState": "inactive",
        }, result
    finally:
        deployed.running()


# -- DynamicUser, StateDirectory, LoadCredential ---------------------------------------------


def process_uid(c: nspawn.Container, pid: int) -> int:
    status = c.run("cat", f"/proc/{pid}/status").stdout
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


async def test_dynamic_user_state_directory_and_credential(deployed: Deployed) -> None:
    """The daemon runs as a transient UID, owns only /var/lib/private/pushsvc, reads the
    secret from its credential (never from the environment), and what it stored before a
    restart is there after it."""
    c = deployed.c
    deployed.running()
    pid = deployed.main_pid()
    uid = process_uid(c, pid)
    assert uid in DYNAMIC_UIDS, uid

    # StateDirectory=: /var/lib/pushsvc -> private/pushsvc, owned by that UID, 0700.
    assert os.readlink(c.path("/var/lib/pushsvc")) == "private/pushsvc"
    state = c.path("/var/lib/private/pushsvc").stat()
    assert (state.st_uid, state.st_mode & 0o777) == (uid, 0o700)
    store = c.path(STORE).stat()
    assert (store.st_uid, store.st_mode & 0o777) == (uid, 0o600)  # UMask=0077

    # LoadCredential=: the root-only file, copied for the service; not in its environment.
    source = c.path("/etc/pushsvc/jwt_secret").stat()
    assert (source.st_uid, source.st_mode & 0o777) == (0, 0o600)
    assert c.path(CREDENTIAL).read_text().strip() == deployed.secret
    environ = c.run("cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/pushsvc.service" in environ
    assert f"PUSHSVC_AUTH__JWT_SECRET_FILE={CREDENTIAL}" in environ
    assert not any(deployed.secret in variable for variable in environ)
    assert deployed.secret not in c.systemctl("show", UNIT)
    # The daemon read it: a token signed with it is welcomed, any other refused.
    alice = await deployed.connect("alice")
    assert alice.welcome["user"] == "alice"
    alice.close()
    with pytest.raises(HTTPClientError) as refused:
        await connect(deployed.ws_url, jwt=tokens.mint("another-secret-" * 4, "alice"))
    assert refused.value.code == 401

    # The state persists: a notification accepted for an offline user survives a restart.
    status, body = await deployed.http(
        "POST", "/api/v1/notify", {"to": "bob", "title": "t", "message": "kept"}
    )
    assert status == 202, body
    c.systemctl("restart", UNIT)
    c.wait_state(UNIT, "active", SubState="running")
    assert deployed.main_pid() != pid
    bob = await deployed.connect("bob")
    frame = await bob.recv_type("notification", timeout=10)
    assert (frame["id"], frame["message"]) == (body["id"], "kept")
    bob.close()
    print(
        f"\nDynamicUser: UID {uid} -> {process_uid(c, deployed.main_pid())} after the restart; "
        f"notification {body['id']} kept across it"
    )


# -- systemd-analyze security ----------------------------------------------------------------


def test_security_exposure_on_the_running_system(deployed: Deployed) -> None:
    """`systemd-analyze security pushsvc.service` of the unit as loaded (with its drop-ins)
    by the running systemd: no worse than today's 1.1 (see ``MAX_EXPOSURE``)."""
    deployed.running()
    out = deployed.c.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", out)
    assert match, out
    exposure = float(match.group(1))
    print(f"\nsystemd-analyze security {UNIT} (running systemd 252): {exposure} {match.group(2)}")
    assert exposure <= MAX_EXPOSURE, out


# -- pushsvc@.service ------------------------------------------------------------------------


def instances_block(port: int) -> str:
    """docs/deploy.md's "Several instances" block: on ``port``, without `journalctl -f`."""
    section = DEPLOY.read_text().split("\n### Several instances\n", 1)[1].split("\n### ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "docs/deploy.md: no ```sh block under ### Several instances"
    block = match.group(1)
    assert "port = 8901" in block, "docs/deploy.md's instance block changed: update this test"
    lines = [line for line in block.splitlines() if not line.rstrip().endswith(" -f")]
    return "\n".join(lines).replace("port = 8901", f"port = {port}") + "\n"


async def test_instance_template(deployed: Deployed) -> None:
    """The last test (it takes pushsvc.service down): `pushsvc@eu1` from docs/deploy.md's
    "Several instances" block serves with its own secret and port, and reloads; on a host
    that ran pushsvc.service it first fails with 238/STATE_DIRECTORY, as documented."""
    c = deployed.c
    c.systemctl("disable", "--now", "pushsvc.socket", UNIT)
    port = free_port()
    cursor = c.cursor()
    c.path("/root/instances.sh").write_text(instances_block(port))
    first = c.run("bash", "-eu", "/root/instances.sh", check=False, timeout=120)
    assert first.returncode != 0  # the main service's /var/lib/pushsvc is in the way
    c.wait_journal("status=238/STATE_DIRECTORY", cursor, unit="pushsvc@eu1.service")

    # What docs/deploy.md says to do about it: the main service's state out of the way.
    c.run("rm", "-r", "/var/lib/pushsvc", "/var/lib/private/pushsvc")
    c.systemctl("reset-failed", "pushsvc@eu1.service")
    c.run("bash", "-eu", "/root/instances.sh", timeout=120)
    c.wait_state("pushsvc@eu1.service", "active", SubState="running")
    secret = c.path("/etc/pushsvc/eu1.jwt_secret").read_text().strip()
    client = await connect(f"ws://127.0.0.1:{port}/ws", jwt=tokens.mint(secret, "eve"), sub="eve")
    assert client.welcome["user"] == "eve"
    client.close()
    state = c.path("/var/lib/private/pushsvc/eu1").stat()
    assert state.st_uid in DYNAMIC_UIDS and state.st_mode & 0o777 == 0o700
    c.wait_journal("Reloaded pushsvc@eu1.service", cursor, unit="pushsvc@eu1.service")
    print(f"\npushsvc@eu1: served on port {port} with its own secret, reloaded")
