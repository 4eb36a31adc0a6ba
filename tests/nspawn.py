"""A minimal Debian booted under a real systemd with ``systemd-nspawn``, for the tests.

``tests/test_systemd_real.py`` installs pushsvc in it the way docs/deploy.md says
and drives it with ``systemctl``. The pieces:

* :func:`build_image` runs ``debootstrap --variant=minbase`` once into a cache
  directory (``PUSHSVC_NSPAWN_IMAGE``, default ``/var/cache/pushsvc-test/...``)
  and reuses it on later runs; it is never modified afterwards.
* :func:`boot` starts ``systemd-nspawn --boot --volatile=overlay`` on it: every
  boot starts from the pristine tree, its writes go to a tmpfs that vanishes
  with the container. The container shares the host's network namespace, so
  the tests reach the service on ``127.0.0.1`` and the service's monotonic
  clock is the tests' own.
* :class:`Container` runs commands in it through ``nsenter -t <its PID 1> -a``
  and reads its files through ``/proc/<PID 1>/root``.

Everything needs root, ``debootstrap``, ``systemd-nspawn`` (Debian package
systemd-container) and ``nsenter``; :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

#: Debian release of the container (its systemd is the one docs/deploy.md names).
SUITE = "bookworm"
#: What the container needs beyond minbase: an init, a bus for systemctl, Python for the venv.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
#: The cached tree; a stamp file inside names the suite and packages it was built with.
IMAGE = Path(os.environ.get("PUSHSVC_NSPAWN_IMAGE", f"/var/cache/pushsvc-test/nspawn-{SUITE}"))
STAMP = ".pushsvc-image"
BUILD_TIMEOUT = 600.0
BOOT_TIMEOUT = 90.0
#: PATH and no pager or colours for the commands run inside.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def unavailable() -> str | None:
    """Why a container cannot be booted here, or None if it may."""
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "booting a systemd container needs root (debootstrap, systemd-nspawn, nsenter)"
    missing = [
        f"{tool} (Debian package {package})"
        for tool, package in (
            ("debootstrap", "debootstrap"),
            ("systemd-nspawn", "systemd-container"),
            ("nsenter", "util-linux"),
        )
        if shutil.which(tool) is None
    ]
    if missing:
        return "not installed: " + ", ".join(missing) + " (`CI=true make tools` installs them)"
    return None


def _stamp() -> str:
    return f"{SUITE} minbase {','.join(PACKAGES)}\n"


def build_image(log: Path) -> tuple[Path, float]:
    """The debootstrapped tree, built unless the cache holds one; (path, seconds spent).

    Built into a temporary sibling and renamed, under a lock, so that an
    interrupted build or two test runs at once never leave a half tree.

    Raises:
        RuntimeError: debootstrap failed (the message ends with its last lines).
    """
    started = time.monotonic()
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    with open(IMAGE.parent / f"{IMAGE.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = IMAGE / STAMP
        if stamp.exists() and stamp.read_text() == _stamp():
            return IMAGE, time.monotonic() - started
        partial = IMAGE.with_name(f"{IMAGE.name}.partial")
        for stale in (partial, IMAGE):
            _remove_tree(stale)
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(partial),
        ]
        if mirror := os.environ.get("PUSHSVC_DEBIAN_MIRROR"):
            command.append(mirror)
        with open(log, "w") as out:
            build = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            returncode: int | str = build.wait(BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(build.pid, signal.SIGKILL)  # debootstrap and its dpkg, chroot, wget
            build.wait(10)
            returncode = f"nothing: killed after {BUILD_TIMEOUT:.0f}s"
        finally:
            _unmount_under(partial)  # debootstrap mounts /proc and /sys in the target
        if returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            raise RuntimeError(f"{' '.join(command)} exited {returncode}:\n{tail}")
        (partial / STAMP).write_text(_stamp())
        partial.rename(IMAGE)
    return IMAGE, time.monotonic() - started


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path.resolve()) if path.exists() else str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # "\040" is a space
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_under(path: Path) -> None:
    """Unmount whatever an interrupted debootstrap left mounted in ``path``."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30, check=False)


def _remove_tree(path: Path) -> None:
    """Delete ``path``, never through a mount (a bound /dev or /proc would be the host's)."""
    if not path.exists():
        return
    _unmount_under(path)
    if mounted := _mounts_under(path):
        raise RuntimeError(f"will not delete {path}: still mounted there: {mounted}")
    shutil.rmtree(path)


class Container:
    """A booted container: commands through nsenter, files through /proc/PID/root."""

    def __init__(self, nspawn: subprocess.Popen[bytes], pid1: int, console: Path) -> None:
        self.nspawn = nspawn  # the systemd-nspawn process (ours, stopped at teardown)
        self.pid1 = pid1  # the container's systemd, as the host numbers it
        self.console = console  # the container's console output
        self.root = Path(f"/proc/{pid1}/root")

    def path(self, inside: str) -> Path:
        """A path inside the container, as the host reaches it."""
        return self.root / inside.lstrip("/")

    def command(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """The host command that runs ``args`` inside, with a clean environment."""
        variables = [f"{key}={value}" for key, value in {**INSIDE_ENV, **(env or {})}.items()]
        return ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *variables, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside; with ``check``, a failure raises with its output."""
        result = subprocess.run(
            self.command(*args, env=env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """``systemctl ARGS`` inside; its standard output."""
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``."""
        args = [arg for name in properties for arg in ("-p", name)]
        out = self.systemctl("show", unit, *args)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's current position, for :meth:`journal` ``after``."""
        out = self.run("journalctl", "--show-cursor", "-n", "0", "--no-pager").stdout
        return out.strip().rsplit("cursor: ", 1)[-1]

    def journal(self, unit: str = "pushsvc.service", after: str | None = None) -> str:
        """The journal of ``unit`` (and systemd's lines about it), after a cursor."""
        args = ["journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit]
        if after:
            args.append(f"--after-cursor={after}")
        return self.run(*args).stdout

    def wait_journal(
        self, text: str, after: str | None, timeout: float = 15.0, unit: str = "pushsvc.service"
    ) -> str:
        """Wait until ``text`` is in the journal of ``unit`` after ``after``; the journal."""
        deadline = time.monotonic() + timeout
        while text not in (journal := self.journal(unit, after)):
            assert time.monotonic() < deadline, f"{text!r} not in the journal:\n{journal}"
            time.sleep(0.1)
        return journal

    def wait_state(
        self, unit: str, active: str, timeout: float = 30.0, **expected: str
    ) -> dict[str, str]:
        """Wait until ``unit`` has ActiveState ``active`` (and the ``expected`` properties)."""
        names = ("ActiveState", "SubState", "MainPID", "NRestarts", *expected)
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, *names)
            if props["ActiveState"] == active and all(
                props.get(k) == v for k, v in expected.items()
            ):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{unit}: {props}, not {active} {expected} within {timeout}s:\n"
                    + self.journal(unit)[-4000:]
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut the container down (SIGTERM asks nspawn for a clean poweroff), then kill."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)


def _child_of(pid: int) -> int | None:
    """The first child process of ``pid`` (nspawn's child is the container's PID 1)."""
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
    return None


def _serving(pid1: int) -> bool:
    """Whether ``pid1`` is a systemd that systemctl can talk to."""
    with contextlib.suppress(OSError):
        return (
            Path(f"/proc/{pid1}/comm").read_text().strip() == "systemd"
            and Path(f"/proc/{pid1}/root/run/systemd/private").exists()
        )
    return False


@contextlib.contextmanager
def boot(image: Path, console: Path) -> Iterator[Container]:
    """Boot ``image`` with a volatile overlay; the container is shut down on exit.

    Raises:
        RuntimeError: the container did not reach ``running`` (or ``degraded``)
            within ``BOOT_TIMEOUT``; the message holds what it printed.
    """
    command = [
        "systemd-nspawn",
        f"--directory={image}",
        f"--machine=pushsvc-{uuid.uuid4().hex[:8]}",
        "--boot",
        # No systemd on the host to register with or to create a scope in.
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        "--console=read-only",
    ]
    with open(console, "wb") as out:
        nspawn = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    container: Container | None = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        # The container's PID 1 is systemd once its private bus socket exists.
        while (pid1 := _child_of(nspawn.pid)) is None or not _serving(pid1):
            if nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{' '.join(command)} did not start a container:\n"
                    + console.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.05)
        container = Container(nspawn, pid1, console)
        state = "offline"
        while state == "offline" and time.monotonic() < deadline:  # offline: no bus yet
            try:
                state = container.run(
                    "systemctl",
                    "is-system-running",
                    "--wait",
                    check=False,
                    timeout=max(1.0, deadline - time.monotonic()),
                ).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "still starting"
            if state == "offline":
                time.sleep(0.1)
        if state not in ("running", "degraded"):
            raise RuntimeError(
                f"the container's systemd is {state!r}, not running:\n"
                + console.read_text(errors="replace")[-2000:]
            )
        yield container
    finally:
        if container is not None:
            container.stop()
        elif nspawn.poll() is None:
            nspawn.kill()
            nspawn.wait(10)
