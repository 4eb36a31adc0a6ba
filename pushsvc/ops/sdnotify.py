"""Speaks systemd's service protocols: sd_notify(3) states, the watchdog and socket activation.

A dependency-free re-implementation of the three parts of libsystemd that a
``Type=notify`` service needs, so the daemon can run under systemd without
``python-systemd`` and unchanged without it (every function is a harmless
no-op when the service manager did not set its environment variables):

* :func:`notify` sends state strings such as ``READY=1``, ``WATCHDOG=1``,
  ``RELOADING=1``, ``STOPPING=1`` or ``STATUS=...`` to ``$NOTIFY_SOCKET``.
* :func:`watchdog_interval` says how often to send ``WATCHDOG=1``.
* :func:`listen_fds` adopts the listening sockets of a ``.socket`` unit.

Typical use in the serve command::

    socks = sdnotify.listen_fds() or tornado.netutil.bind_sockets(port, host)
    server.add_sockets(socks)
    sdnotify.notify("READY=1", f"STATUS=listening on {host}:{port}")
    if (interval := sdnotify.watchdog_interval()) is not None:
        PeriodicCallback(lambda: sdnotify.notify("WATCHDOG=1"), interval * 1000).start()

The watchdog ping belongs on the event loop, not on a thread: a wedged loop
must stop the pings so that systemd restarts the service.
"""

from __future__ import annotations

import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify", "watchdog_interval"]

#: First file descriptor systemd passes for socket activation (after stdio).
SD_LISTEN_FDS_START = 3

# Seconds a notification may wait on a busy service manager before it is
# dropped; keeps a stalled PID 1 from freezing the event loop.
_SEND_TIMEOUT = 2.0

# Variables consumed by listen_fds(), removed so that children don't see them.
_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _socket_address(value: str) -> bytes | None:
    """Turns ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address.

    Args:
        value: The variable's value: an absolute path, or ``@name`` for a
            socket in the Linux abstract namespace.

    Returns:
        The address as bytes (abstract names start with a NUL byte), or None
        for forms this module does not speak (such as ``vsock:``).
    """
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def notify(*states: str) -> bool:
    """Sends state changes to the service manager, like sd_notify(3).

    All states go out in one datagram, so ``notify("READY=1", "STATUS=up")``
    is applied atomically.

    Args:
        *states: ``KEY=VALUE`` assignments, for example ``"READY=1"``,
            ``"WATCHDOG=1"``, ``"RELOADING=1"``, ``"STOPPING=1"`` or
            ``"STATUS=draining 120 connections"``.

    Returns:
        True if the datagram was sent; False when ``$NOTIFY_SOCKET`` is unset
        or unusable (not running under ``Type=notify``), when no state was
        given, or when sending failed. Failures are not raised: a missed
        notification must not take the service down.

    Raises:
        ValueError: If a state lacks ``=`` or contains a newline, which would
            corrupt the newline-separated message.
    """
    for state in states:
        if "=" not in state or "\n" in state:
            raise ValueError(f"not a KEY=VALUE notification state: {state!r}")
    value = os.environ.get("NOTIFY_SOCKET", "")
    address = _socket_address(value) if value else None
    if address is None or not states:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Says how often this process should send ``WATCHDOG=1``.

    Reads ``$WATCHDOG_USEC`` (set from ``WatchdogSec=``) and, if present,
    ``$WATCHDOG_PID``, which must name this process: a child that inherited
    the variables must not ping on its parent's behalf.

    Returns:
        Half the watchdog timeout in seconds (the interval systemd
        recommends), or None when the watchdog is off, meant for another
        process, or the variables are malformed.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        timeout = int(usec)
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if timeout <= 0:
        return None
    return timeout / 2 / 1_000_000


def listen_fds() -> list[socket.socket]:
    """Adopts the sockets passed by systemd socket activation, like sd_listen_fds(3).

    The descriptors start at :data:`SD_LISTEN_FDS_START` (3); ``$LISTEN_FDS``
    counts them and ``$LISTEN_PID`` must equal this process's PID, otherwise
    they were meant for an ancestor and are left alone. The variables
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from
    the environment in every case, so child processes do not inherit them.

    The returned sockets are close-on-exec and non-blocking, ready for
    ``tornado.httpserver.HTTPServer.add_sockets`` or asyncio (a blocking
    listener would stall Tornado's accept loop). Call this once, early: a
    second call returns an empty list.

    Returns:
        The passed sockets in order, or an empty list when the process was
        not socket-activated.

    Raises:
        OSError: If a passed descriptor is not a socket (for example a FIFO
            from ``ListenFIFO=``) or is not open.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for name in _LISTEN_ENV:
        os.environ.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
