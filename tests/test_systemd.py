"""Tests for the systemd units in systemd/ and for pushsvc.sdnotify.

The unit checks run ``systemd-analyze`` offline (no running systemd needed)
and are skipped when it is not installed. The sdnotify checks talk to real
sockets: a datagram socket standing in for ``$NOTIFY_SOCKET`` and a listening
TCP socket passed to a child process on fd 3, as systemd does.
tests/test_systemd_real.py runs the units under a real systemd.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pushsvc.ops import sdnotify

REPO = Path(__file__).resolve().parent.parent
UNIT_SOURCE = REPO / "systemd"
# File names in systemd/, and the names to verify them under (a template is
# verified through an instance of it).
UNIT_FILES = ("pushsvc.service", "pushsvc@.service", "pushsvc.socket")
SERVICES = ("pushsvc.service", "pushsvc@test.service")
VERIFIED = (*SERVICES, "pushsvc.socket")
INSTALLED_BINARY = "/usr/local/bin/pushsvc"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian/Ubuntu: apt install systemd)"
)


def run_analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze`` without a pager or colours."""
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(
        [ANALYZE, "--no-pager", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    """The [Service] section of a unit in systemd/."""
    return parse_unit((UNIT_SOURCE / name).read_text())["Service"]


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart names an executable that exists here.

    ``systemd-analyze verify`` fails when the binary is missing, and
    /usr/local/bin/pushsvc exists only on a deployed host.
    """
    installed = Path(sys.executable).with_name("pushsvc")
    stand_in = str(installed) if installed.exists() else shutil.which("true") or "/bin/true"
    for name in UNIT_FILES:
        text = (UNIT_SOURCE / name).read_text()
        if name.endswith(".service"):
            assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1, name
            text = text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stand_in} ")
        (tmp_path / name).write_text(text)
    return tmp_path


# --- the units ---


@needs_analyze
@pytest.mark.parametrize("unit", VERIFIED)
def test_unit_verifies(unit_dir: Path, unit: str) -> None:
    result = run_analyze("verify", unit_dir / unit)
    output = result.stdout + result.stderr
    # verify exits 0 on mere warnings ("Unknown key ..."), so read its output
    # too; lines about other units (the host's own) are not ours to judge.
    ours = [line for line in output.splitlines() if "pushsvc" in line]
    assert result.returncode == 0, output
    assert ours == [], output


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure(unit_dir: Path, unit: str) -> None:
    result = run_analyze("security", "--offline=yes", unit_dir / unit)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"systemd-analyze predates --offline (systemd 250): {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", ["pushsvc.service", "pushsvc@.service"])
def test_service_contract(name: str) -> None:
    unit = service(name)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/sh -c 'kill -HUP $MAINPID'",
        "LimitNOFILE": "262144",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {key: unit.get(key, [None])[-1] for key in expected} == expected
    assert "@system-service" in unit["SystemCallFilter"]
    assert "PUSHSVC_AUTH__JWT_SECRET_FILE=%d/jwt_secret" in unit["Environment"]
    assert unit["LoadCredential"][0].startswith("jwt_secret:/etc/pushsvc/")
    (exec_start,) = unit["ExecStart"]
    assert exec_start.startswith(f"{INSTALLED_BINARY} serve --config ${{CONFIGURATION_DIRECTORY}}/")
    assert exec_start.endswith(" --data-dir ${STATE_DIRECTORY}")


def test_stop_timeout_outlasts_the_drain() -> None:
    config = pytest.importorskip("pushsvc.config")
    drain = config.ServerConfig().drain_seconds
    for name in ("pushsvc.service", "pushsvc@.service"):
        (timeout,) = service(name)["TimeoutStopSec"]
        # The drain, then closing the store and the loop, with room to spare.
        assert float(timeout) >= drain + 20, (name, timeout, drain)


def test_secret_credential_reaches_the_config(tmp_path: Path) -> None:
    """The Environment= the units set is a key pushsvc.config understands."""
    config = pytest.importorskip("pushsvc.config")
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyIQ=="
    (tmp_path / "jwt_secret").write_text(secret + "\n")  # as `base64` writes it
    for name in ("pushsvc.service", "pushsvc@.service"):
        environ = dict(
            item.replace("%d", str(tmp_path)).split("=", 1)
            for line in service(name)["Environment"]
            for item in line.split()
            if item.startswith("PUSHSVC_")
        )
        assert config.load(environ=environ).secret() == secret


def test_socket_unit_pairs_with_the_service() -> None:
    sock = parse_unit((UNIT_SOURCE / "pushsvc.socket").read_text())
    assert sock["Socket"]["ListenStream"] == ["8888"]
    assert sock["Socket"].get("Service", ["pushsvc.service"]) == ["pushsvc.service"]
    assert sock["Socket"].get("Accept", ["no"]) == ["no"]
    unit = parse_unit((UNIT_SOURCE / "pushsvc.service").read_text())["Unit"]
    assert "pushsvc.socket" in " ".join(unit["After"])


# Syscall numbers: audit arch, mmap, mprotect, pkey_mprotect.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 9, 10, 329), "aarch64": (0xC00000B7, 222, 226, 288)}

# Installs a seccomp filter with the rules of systemd's MemoryDenyWriteExecute=
# (no mmap with PROT_WRITE|PROT_EXEC, no mprotect/pkey_mprotect to PROT_EXEC),
# then exercises the native code the service loads.
_MDWE_CHILD = """
import ctypes, mmap, struct, sys
audit, nr_mmap, nr_mprotect, nr_pkey = {arch}
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050001
WX, X = 6, 4
prog = [
    (LD, 0, 0, 4), (JEQ, 0, 11, audit),                   # foreign arch: allow
    (LD, 0, 0, 0), (JEQ, 3, 0, nr_mmap), (JEQ, 5, 0, nr_mprotect), (JEQ, 4, 0, nr_pkey),
    (RET, 0, 0, ALLOW),
    (LD, 0, 0, 32), (AND, 0, 0, WX), (JEQ, 4, 3, WX),     # mmap: args[2] & W|X
    (LD, 0, 0, 32), (AND, 0, 0, X), (JEQ, 1, 0, X),       # mprotect: args[2] & X
    (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM),
]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Prog(len(prog), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):
    print("SKIP seccomp unavailable, errno", ctypes.get_errno()); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("filter not effective: W+X mapping allowed")
except OSError:
    pass

import asyncio, sqlite3, ssl, tempfile
import jwt, orjson, tornado.httpserver, tornado.web, tornado.websocket
from cryptography.hazmat.primitives.asymmetric import ec, rsa
try:
    import uvloop
except ImportError:
    uvloop = None
orjson.loads(orjson.dumps({{"type": "chat"}}))
for key, alg in ((ec.generate_private_key(ec.SECP256R1()), "ES256"),
                 (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")):
    jwt.decode(jwt.encode({{"sub": "u"}}, key, algorithm=alg), key.public_key(), algorithms=[alg])
jwt.decode(jwt.encode({{"sub": "u"}}, "k" * 32, algorithm="HS256"), "k" * 32, algorithms=["HS256"])
db = sqlite3.connect(tempfile.mkdtemp() + "/store.sqlite3")
db.execute("pragma journal_mode=wal"); db.execute("create table t(x)"); db.commit()
ssl.create_default_context()
async def serve():
    server = tornado.httpserver.HTTPServer(tornado.web.Application([]))
    server.listen(0, "127.0.0.1")
    server.stop()
(uvloop.run if uvloop else asyncio.run)(serve())
print("OK")
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in _SECCOMP_ARCH,
    reason="seccomp filter written for Linux x86_64/aarch64",
)
def test_memory_deny_write_execute_is_tolerated() -> None:
    """The units set MemoryDenyWriteExecute=yes; the native deps must cope."""
    child = _MDWE_CHILD.format(arch=_SECCOMP_ARCH[platform.machine()])
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK", result.stdout + result.stderr


# --- sdnotify.notify ---


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variables from the environment running the tests."""
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's PID (what systemd checks for NotifyAccess=main)."""
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pids = [
        struct.unpack("3i", payload[:12])[0]
        for level, kind, payload in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    return data, pids[0]


def bind_receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)
    sock.bind(address)
    return sock


def test_notify_without_socket_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.notify("READY=1") is False


def test_notify_path_socket(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with bind_receiver(str(path)) as receiver:
        clean_env.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=listening on :8888") is True
        data, pid = receive(receiver)
    assert data == b"READY=1\nSTATUS=listening on :8888"
    assert pid == os.getpid()


def test_notify_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"pushsvc-test-{uuid.uuid4().hex}"
    with bind_receiver(b"\0" + name.encode()) as receiver:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1") is True
        data, _pid = receive(receiver)
    assert data == b"WATCHDOG=1"


@pytest.mark.parametrize("value", ["/nonexistent/notify", "vsock:2:1234", "relative"])
def test_notify_unusable_socket_returns_false(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_without_states_sends_nothing(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with bind_receiver(str(tmp_path / "notify")) as receiver:
        clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert sdnotify.notify() is False
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)


@pytest.mark.parametrize("state", ["READY", "STATUS=a\nREADY=1"])
def test_notify_rejects_malformed_states(clean_env: pytest.MonkeyPatch, state: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sdnotify.notify(state)


# --- sdnotify.watchdog_interval ---


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("30000000", "nobody", None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
        clean_env.setenv("WATCHDOG_PID", pids.get(pid, pid))
    assert sdnotify.watchdog_interval() == expected


# --- sdnotify.listen_fds ---


def test_listen_fds_not_activated(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.listen_fds() == []


def test_listen_fds_for_another_process(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_FDNAMES", "pushsvc.socket")
    assert sdnotify.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def child_env() -> dict[str, str]:
    """The environment for a child Python that imports pushsvc from this checkout."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# The child plays the activated service: systemd would have put the socket on
# fd 3 and set LISTEN_PID to the service's PID before exec.
_LISTEN_CHILD = """
import json, os, select, socket, sys
passed = int(sys.argv[1])
os.dup2(passed, 3)
os.close(passed)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="pushsvc.socket")
from pushsvc.ops import sdnotify
socks = sdnotify.listen_fds()
(sock,) = socks
select.select([sock], [], [], 5)
conn, _ = sock.accept()
conn.sendall(b"hello")
print(json.dumps({
    "fileno": sock.fileno(),
    "family": int(sock.family),
    "type": int(sock.type),
    "port": sock.getsockname()[1],
    "blocking": sock.getblocking(),
    "inheritable": sock.get_inheritable(),
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "again": len(sdnotify.listen_fds()),
}))
"""


def test_listen_fds_adopts_a_passed_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # Queued in the backlog before the "service" starts, as socket
        # activation does during a restart.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            result = subprocess.run(
                [sys.executable, "-c", _LISTEN_CHILD, str(listener.fileno())],
                pass_fds=(listener.fileno(),),
                capture_output=True,
                text=True,
                timeout=30,
                env=child_env(),
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert client.recv(16) == b"hello"
    report = json.loads(result.stdout)
    assert report == {
        "fileno": sdnotify.SD_LISTEN_FDS_START,
        "family": int(socket.AF_INET),
        "type": int(socket.SOCK_STREAM),
        "port": port,
        "blocking": False,
        "inheritable": False,
        "env": [],
        "again": 0,
    }


def test_listen_fds_on_a_non_socket_raises(tmp_path: Path) -> None:
    child = textwrap.dedent(
        """
        import os, sys
        fd = os.open(sys.argv[1], os.O_RDONLY)
        os.dup2(fd, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
        from pushsvc.ops import sdnotify
        try:
            sdnotify.listen_fds()
        except OSError:
            sys.exit(0)
        sys.exit("no error for a regular file on fd 3")
        """
    )
    (tmp_path / "file").write_text("x")
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "file")],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
