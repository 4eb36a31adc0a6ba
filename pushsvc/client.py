"""An asyncio client for pushsvc, mirroring the JavaScript client (clients/js/pushsvc.js).

It speaks the wire protocol of docs/protocol.md and takes care of what every
client otherwise gets wrong: reconnecting (exponential backoff with full
jitter, forever by default), the close-code policy (4001 new token, 1008
longer backoff, 1001 the delay in the reason, 4003/1009 final, the rest
reconnect), rooms rejoined after a reconnect (resuming from the last room
message seen: the server replays what was missed, the ``recovery`` event says
whether it could), acks after the handlers ran,
duplicates dropped by ``id``, sends made while the connection is down
(bounded outbox, per-send timeout) and in-band token refresh before ``exp``.

It runs on Tornado's :func:`tornado.websocket.websocket_connect`: Tornado is
already a dependency of pushsvc, so the client needs no new package. It
imports only ``pushsvc.protocol`` of pushsvc (a top layer, like ``cli``).

Usage (docs/client-python.md)::

    async with PushClient("ws://127.0.0.1:8888/ws", token=jwt) as client:
        client.on("chat", lambda m: print(m["user"], m["text"]))
        await client.join("team-blue")
        reply = await client.send("chat", room="team-blue", text="hello")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from pushsvc.protocol.codes import CloseCode

__all__ = [
    "CLOSE_CONNECT_TIMEOUT",
    "CLOSE_DEAD",
    "CLOSE_HANDSHAKE_FAILED",
    "PushClient",
    "PushError",
    "drain_delay",
    "token_claims",
]

log = logging.getLogger("pushsvc.client")

#: Close codes after which the client does not reconnect by itself.
NO_RECONNECT = frozenset({CloseCode.DISCONNECTED_BY_API, CloseCode.MESSAGE_TOO_BIG})
#: Locally chosen close code: no pong (or any frame) in time.
CLOSE_DEAD = 4900
#: Locally chosen close code: no ``welcome`` within the connect timeout.
CLOSE_CONNECT_TIMEOUT = 4901
#: Locally chosen close code: the connection or the upgrade failed (browsers see 1006).
CLOSE_HANDSHAKE_FAILED = 1006

_DRAIN_DELAY = re.compile(r"reconnect in ([0-9]+(?:\.[0-9]+)?)s")

TokenProvider = Callable[[], Awaitable[str] | str]
Handler = Callable[..., Any]
State = Literal["idle", "connecting", "open", "reconnecting", "closed"]


class PushError(Exception):
    """A rejected send or a server ``error`` frame.

    ``code`` is the server's error code (``forbidden``, ``rate_limited``...) or
    one of the client's: ``timeout``, ``outbox_full``, ``connection_lost``,
    ``closed``, ``left``, ``token``, ``handshake``, ``gave_up``.
    """

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame = frame
        retry = frame.get("retry_after") if frame else None
        self.retry_after: float | None = (
            float(retry) if isinstance(retry, int | float) and not isinstance(retry, bool) else None
        )

    def as_dict(self) -> dict[str, Any]:
        """The error as a JSON-ready ``{"code", "message"}`` (plus ``retry_after``)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


def token_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, unverified (only to read ``exp``), or None."""
    try:
        part = token.split(".")[1]
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        claims = orjson.loads(data)
    except (IndexError, ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def drain_delay(reason: str | None) -> float | None:
    """Seconds a 1001 close reason asks for (``server draining; reconnect in 2.5s``), or None."""
    match = _DRAIN_DELAY.search(reason or "")
    return float(match.group(1)) if match else None


def _retry_after(exc: HTTPClientError) -> float | None:
    """Seconds of a refused upgrade's ``Retry-After`` (429, 503), capped at 3600."""
    value = exc.response.headers.get("Retry-After") if exc.response is not None else None
    try:
        return min(3600.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


class _Queued:
    """A send waiting in the outbox."""

    __slots__ = ("deadline", "frame", "future", "timer")

    def __init__(
        self, frame: dict[str, Any], future: asyncio.Future[dict[str, Any]], deadline: float
    ) -> None:
        self.frame = frame
        self.future = future
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None


def _settle(
    future: asyncio.Future[dict[str, Any]],
    result: dict[str, Any] | None = None,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result or {})


class PushClient:
    """A pushsvc connection that reconnects, rejoins, acks and queues by itself.

    ``token`` is a JWT string, or a callable returning (an awaitable of) a
    fresh one; with a callable the client refreshes in-band before ``exp``
    and fetches a new token after a 4001 close or a refused handshake.
    Times are in seconds. Start it with ``async with`` or :meth:`connect`;
    stop it with :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | TokenProvider,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        max_attempts: int | None = None,
        policy_delay: float = 15.0,
        drain_jitter: float = 1.0,
        connect_timeout: float = 10.0,
        send_timeout: float = 10.0,
        outbox_size: int = 100,
        ack_mode: Literal["auto", "manual"] = "auto",
        ack_delay: float = 0.02,
        dedupe_size: int = 1000,
        ping_interval: float | None = None,
        pong_timeout: float = 10.0,
        refresh_before: float = 30.0,
        max_message_size: int = 10 * 1024 * 1024,
    ) -> None:
        if not token:
            raise TypeError("PushClient: token is required")
        self.url = url
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.policy_delay = policy_delay
        self.drain_jitter = drain_jitter
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.outbox_size = outbox_size
        self.ack_mode = ack_mode
        self.ack_delay = ack_delay
        self.dedupe_size = dedupe_size
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.refresh_before = refresh_before
        self.max_message_size = max_message_size
        #: ``idle``, ``connecting``, ``open``, ``reconnecting`` or ``closed``.
        self.state: State = "idle"
        #: The last ``welcome`` frame.
        self.welcome: dict[str, Any] | None = None
        #: Rooms the client is in (rejoined after every reconnect).
        self.rooms: set[str] = set()
        #: Room -> (offset, epoch) of the last room message seen: sent as ``since``
        #: when the room is rejoined, so the server replays what was missed.
        self.positions: dict[str, tuple[int, str]] = {}
        #: Code and reason of the last close.
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._token: str | None = token if isinstance(token, str) else None
        self._token_fn: TokenProvider | None = None if isinstance(token, str) else token
        self._token_task: asyncio.Task[str] | None = None
        self._token_stale = False
        self._handlers: dict[str, list[Handler]] = {}
        self._conn: WebSocketClientConnection | None = None
        self._attempt = 0
        self._ref_counter = 0
        self._pending: dict[str, tuple[asyncio.Future[dict[str, Any]], asyncio.TimerHandle]] = {}
        self._outbox: list[_Queued] = []
        self._room_waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._seen: OrderedDict[str, bool] = OrderedDict()
        self._ack_queue: list[str] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._opened = asyncio.Event()
        self._closing = False
        self._drop_code: int | None = None
        self._last_frame = 0.0
        self._retry_after: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> PushClient:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        """Start connecting (and reconnecting) in the background; returns at once."""
        if self._runner is not None and not self._runner.done():
            return
        self._closing = False
        self._attempt = 0
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def wait_open(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the client is connected; returns the ``welcome`` frame.

        Raises ``PushError("timeout")`` after ``timeout`` seconds (default
        ``connect_timeout``) or ``PushError("closed")`` once it closed for good.
        """
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while self.state != "open" or self.welcome is None:
            if self.state == "closed":
                raise PushError("closed", f"client is closed ({self.close_code})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PushError("timeout", f"not connected within {timeout} s")
            self._opened.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), min(left, 0.5))
        return self.welcome

    async def wait_closed(self) -> None:
        """Wait until the client stopped for good (``close()``, 4003, 1009, gave up)."""
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._runner)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good: queued and pending sends are rejected with ``closed``."""
        self._closing = True
        self._fail_all("closed", "client closed")
        conn = self._conn
        if conn is not None:
            conn.close(code, reason)
        self._wake.set()
        runner = self._runner
        if runner is not None and not runner.done():
            try:
                await asyncio.wait_for(asyncio.shield(runner), 5)
            except TimeoutError:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
        for task in list(self._tasks):
            task.cancel()
        self.state = "closed"
        self._opened.set()

    async def _run(self) -> None:
        try:
            while not self._closing:
                was_open, code, reason = await self._session()
                self.close_code, self.close_reason = code, reason
                self._fail_pending(
                    "connection_lost", f"connection closed ({code}) before the reply; not resent"
                )
                self._emit("close", code, reason)
                if self._stopping():
                    break
                if code in NO_RECONNECT:
                    self._fail_all(
                        "closed",
                        f"closed by the server ({code}{': ' + reason if reason else ''});"
                        " not reconnecting",
                    )
                    break
                # 4001: expired or revoked; a handshake refused again and again may be too.
                if code == CloseCode.TOKEN_EXPIRED or (not was_open and self._attempt >= 1):
                    self._token_stale = True
                if self.max_attempts is not None and self._attempt >= self.max_attempts:
                    self._fail_all("closed", "gave up reconnecting")
                    self._emit(
                        "error", PushError("gave_up", f"gave up after {self._attempt} attempts")
                    )
                    break
                self._attempt += 1
                delay = self._delay(code, reason)
                self.state = "reconnecting"
                self._emit("reconnecting", self._attempt, delay)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self.state = "closed"
            self._conn = None
            self._opened.set()

    def _stopping(self) -> bool:
        return self._closing  # a method: mypy does not narrow it across awaits

    def _is_open(self) -> bool:
        return self.state == "open"

    def _delay(self, code: int, reason: str) -> float:
        cap = min(self.max_delay, self.min_delay * 2 ** (self._attempt - 1))
        delay = random.uniform(0, cap)  # full jitter
        if code == CloseCode.POLICY_VIOLATION:
            delay = max(delay, self.policy_delay + random.uniform(0, self.policy_delay))
        if self._retry_after is not None:  # a 429 or 503 handshake said how long
            delay = max(delay, self._retry_after + random.uniform(0, self.drain_jitter))
            self._retry_after = None
        elif code == CloseCode.GOING_AWAY:
            asked = drain_delay(reason)
            if asked is not None:
                delay = asked + random.uniform(0, self.drain_jitter)
        return delay

    async def _session(self) -> tuple[bool, int, str]:
        """One connection, from the token to its close: ``(was_open, code, reason)``."""
        self.state = "connecting"
        try:
            token = await self._get_token(self._token_stale or self._token_expiring())
            self._token_stale = False
        except Exception as exc:
            self._emit("error", PushError("token", f"token provider failed: {exc}"))
            return False, CLOSE_HANDSHAKE_FAILED, "token provider failed"
        request = HTTPRequest(
            self.url,
            headers={"Authorization": f"Bearer {token}"},
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
        )
        try:
            conn = await asyncio.wait_for(
                websocket_connect(request, max_message_size=self.max_message_size),
                self.connect_timeout,
            )
        except HTTPClientError as exc:
            if exc.code == 401:
                self._token_stale = True
            self._retry_after = _retry_after(exc)
            self._emit("error", PushError("handshake", f"upgrade refused: {exc}"))
            return False, CLOSE_HANDSHAKE_FAILED, f"upgrade refused ({exc.code})"
        except (OSError, TimeoutError) as exc:
            self._emit("error", PushError("handshake", f"cannot connect: {exc}"))
            return False, CLOSE_HANDSHAKE_FAILED, str(exc)
        if self._closing:
            conn.close()
            return False, 1000, "client closed"
        self._conn = conn
        self._drop_code = None
        self._last_frame = time.monotonic()
        was_open = False
        ping: asyncio.Task[None] | None = None
        refresh: asyncio.Task[None] | None = None
        try:
            first = await asyncio.wait_for(conn.read_message(), self.connect_timeout)
            frame = self._decode(first)
            if frame is None or frame.get("type") != "welcome":
                conn.close()
                if first is None:
                    return False, conn.close_code or CLOSE_HANDSHAKE_FAILED, conn.close_reason or ""
                return False, CLOSE_CONNECT_TIMEOUT, "no welcome"
            was_open = True
            self._on_welcome(frame)
            ping = self._spawn(self._ping_loop(conn, frame))
            refresh = self._spawn(self._refresh_loop())
            while True:
                message = await conn.read_message()
                if message is None:
                    break
                self._on_message(message)
        except TimeoutError:
            conn.close()
            return False, CLOSE_CONNECT_TIMEOUT, "connect timeout"
        finally:
            self._conn = None
            for task in (ping, refresh):
                if task is not None:
                    task.cancel()
        code = self._drop_code or conn.close_code or CLOSE_HANDSHAKE_FAILED
        reason = "no pong" if self._drop_code else conn.close_reason or ""
        return was_open, code, reason

    def _on_welcome(self, frame: dict[str, Any]) -> None:
        self.welcome = frame
        self.state = "open"
        self._attempt = 0
        # Rejoin first: frames run in order on a connection, so queued chats find their room.
        for room in list(self.rooms):
            self._send_join(room)
        queued, self._outbox = self._outbox, []
        for item in queued:
            if item.timer is not None:
                item.timer.cancel()
            if not item.future.done():
                self._transmit(item.frame, item.future, item.deadline)
        self._opened.set()
        self._emit("open", frame)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- events ----------------------------------------------------------------------

    def on(self, type: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for frames of ``type``, every frame (``"message"``) or an event.

        Events: ``open`` (welcome), ``close`` (code, reason), ``reconnecting``
        (attempt, delay in seconds), ``error`` (exception). Frame handlers get
        the frame and may be coroutine functions. Returns a function that
        removes the handler.
        """
        self._handlers.setdefault(type, []).append(handler)
        return lambda: self.off(type, handler)

    def off(self, type: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` for ``type``, or every handler of ``type``."""
        handlers = self._handlers.get(type)
        if not handlers:
            return
        if handler is None:
            handlers.clear()
        elif handler in handlers:
            handlers.remove(handler)

    def _emit(self, type: str, *args: Any) -> None:
        for handler in list(self._handlers.get(type, ())):
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    self._spawn(self._await_event(type, result))
            except Exception as exc:
                if type == "error":
                    log.exception("error handler failed")
                else:
                    self._emit("error", exc)

    async def _await_event(self, type: str, result: Awaitable[Any]) -> None:
        try:
            await result
        except Exception as exc:
            if type != "error":
                self._emit("error", exc)

    # -- tokens ----------------------------------------------------------------------

    def _token_expiring(self) -> bool:
        if not self._token:
            return True
        claims = token_claims(self._token)
        exp = claims.get("exp") if claims else None
        return isinstance(exp, int | float) and exp - time.time() < 5

    async def _get_token(self, force: bool) -> str:
        if self._token_fn is None or (not force and self._token):
            assert self._token is not None
            return self._token
        return await self.refresh_token()

    async def refresh_token(self) -> str:
        """Get a fresh token from the provider; concurrent calls share one provider call."""
        if self._token_fn is None:
            assert self._token is not None
            return self._token
        if self._token_task is None or self._token_task.done():
            self._token_task = asyncio.get_running_loop().create_task(self._call_provider())
        return await asyncio.shield(self._token_task)

    async def _call_provider(self) -> str:
        assert self._token_fn is not None
        token = self._token_fn()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError("token provider returned no string")
        self._token = token
        return token

    async def _refresh_loop(self) -> None:
        """Refresh in-band (``auth`` frame) ``refresh_before`` seconds before ``exp``."""
        if self._token_fn is None or not self.refresh_before:
            return
        while self.state == "open":
            claims = token_claims(self._token or "")
            exp = claims.get("exp") if claims else None
            if not isinstance(exp, int | float):
                return
            left = exp - time.time()
            await asyncio.sleep(max(0.0, left - min(self.refresh_before, left / 2)))
            if not self._is_open():
                return
            try:
                token = await self.refresh_token()
                await self._request({"type": "auth", "token": token}, self.send_timeout)
            except Exception as exc:
                error = exc if isinstance(exc, PushError) else PushError("token", str(exc))
                self._emit("error", error)
                # try again soon; the server closes with 4001 at exp and the reconnect refreshes
                await asyncio.sleep(2.0)

    # -- sending ---------------------------------------------------------------------

    async def send(
        self,
        type: str,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **fields: Any,
    ) -> dict[str, Any]:
        """Send a command with a ``ref``; returns the server's ``reply`` frame.

        Raises :class:`PushError` with the server's error code, or ``timeout``
        (no reply, or no connection, within ``timeout``, default
        ``send_timeout``), ``outbox_full``, ``connection_lost`` (sent, but the
        connection closed before the reply: not resent) or ``closed``.
        """
        return await self.send_frame({**fields, "type": type}, timeout=timeout)

    async def send_frame(
        self,
        frame: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """:meth:`send` for a ready frame (a dict with ``type``)."""
        timeout = self.send_timeout if timeout is None else timeout
        frame = {k: v for k, v in frame.items() if k != "ref"}
        if self.state == "closed" or self._closing:
            raise PushError("closed", "client is closed")
        if self.state == "open":
            return await self._request(frame, timeout)
        if len(self._outbox) >= self.outbox_size:
            raise PushError("outbox_full", f"outbox full ({self.outbox_size} queued sends)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        item = _Queued(frame, future, time.monotonic() + timeout)

        def expire() -> None:
            if item in self._outbox:
                self._outbox.remove(item)
            _settle(
                future, error=PushError("timeout", f"no connection within {timeout} s; not sent")
            )

        item.timer = loop.call_later(timeout, expire)
        self._outbox.append(item)
        try:
            return await future
        finally:
            item.timer.cancel()
            if item in self._outbox:
                self._outbox.remove(item)

    async def _request(self, frame: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._transmit(frame, future, time.monotonic() + timeout)
        return await future

    def _transmit(
        self, frame: dict[str, Any], future: asyncio.Future[dict[str, Any]], deadline: float
    ) -> None:
        """Send now with a fresh ``ref``; ``future`` settles by the reply or the deadline."""
        self._ref_counter += 1
        ref = f"p{self._ref_counter}"

        def expire() -> None:
            if ref in self._pending:
                del self._pending[ref]
                _settle(
                    future,
                    error=PushError("timeout", f"no reply for {frame['type']} within the timeout"),
                )

        timer = asyncio.get_running_loop().call_later(
            max(0.001, deadline - time.monotonic()), expire
        )
        self._pending[ref] = (future, timer)
        future.add_done_callback(lambda _: self._forget(ref, future))
        if not self._write({**frame, "ref": ref}):
            self._forget(ref, future)
            _settle(future, error=PushError("connection_lost", "socket not open; not sent"))

    def _forget(self, ref: str, future: asyncio.Future[dict[str, Any]]) -> None:
        entry = self._pending.get(ref)
        if entry is not None and entry[0] is future:
            del self._pending[ref]
            entry[1].cancel()

    def _write(self, frame: dict[str, Any]) -> bool:
        conn = self._conn
        if conn is None or self.state != "open":
            return False
        try:
            written = conn.write_message(orjson.dumps(frame).decode())
        except WebSocketClosedError:
            return False
        written.add_done_callback(lambda f: f.cancelled() or f.exception())
        return True

    def _fail_pending(self, code: str, message: str) -> None:
        pending, self._pending = self._pending, {}
        for future, timer in pending.values():
            timer.cancel()
            _settle(future, error=PushError(code, message))

    def _fail_all(self, code: str, message: str) -> None:
        self._fail_pending(code, message)
        queued, self._outbox = self._outbox, []
        for item in queued:
            if item.timer is not None:
                item.timer.cancel()
            _settle(item.future, error=PushError(code, f"{message}; not sent"))
        waiters, self._room_waiters = self._room_waiters, {}
        for futures in waiters.values():
            for future in futures:
                _settle(future, error=PushError(code, message))

    # -- rooms -----------------------------------------------------------------------

    async def join(self, room: str) -> dict[str, Any]:
        """Join ``room`` now or on the next connection; returns the server's reply.

        The room is rejoined after every reconnect, with ``since`` the last
        room message seen (:attr:`positions`): the server replays what was
        missed before live messages, and the ``recovery`` event gets
        ``{"room", "recovered", "recovered_count", "reason"}`` (``recovered``
        False: something was lost, reload the room). A refusal
        (``forbidden``, ``bad_request``) raises :class:`PushError` and
        forgets the room.
        """
        if self.state == "closed" or self._closing:
            raise PushError("closed", "client is closed")
        self.rooms.add(room)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._room_waiters.setdefault(room, []).append(future)
        if self.state == "open":
            self._send_join(room)
        return await future

    def _send_join(self, room: str) -> None:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        frame: dict[str, Any] = {"type": "join", "room": room}
        position = self.positions.get(room)
        if position is not None:
            frame["since"] = {"offset": position[0], "epoch": position[1]}
        self._transmit(frame, future, time.monotonic() + self.send_timeout)

        def done(f: asyncio.Future[dict[str, Any]]) -> None:
            error = f.exception()
            if isinstance(error, PushError):
                if error.code not in ("connection_lost", "closed"):
                    if error.code != "timeout":  # refused: forget the room
                        self.rooms.discard(room)
                    self._emit("error", error)
                if error.code == "connection_lost":
                    return  # rejoined (and settled) on the next connection
            self._settle_room(room, None if error else f.result(), error)

        future.add_done_callback(done)

    def _settle_room(
        self, room: str, reply: dict[str, Any] | None, error: BaseException | None
    ) -> None:
        for future in self._room_waiters.pop(room, []):
            _settle(future, reply, error)

    async def leave(self, room: str) -> dict[str, Any] | None:
        """Leave ``room`` and stop rejoining it; the server's reply, or None when offline."""
        self.rooms.discard(room)
        self.positions.pop(room, None)
        self._settle_room(room, None, PushError("left", f"left {room} before joining it"))
        if self.state != "open":
            return None
        return await self._request({"type": "leave", "room": room}, self.send_timeout)

    # -- receiving -------------------------------------------------------------------

    @staticmethod
    def _decode(message: str | bytes | None) -> dict[str, Any] | None:
        if message is None:
            return None
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return None
        return frame

    def _on_message(self, message: str | bytes) -> None:
        self._last_frame = time.monotonic()
        frame = self._decode(message)
        if frame is None:
            return
        kind = frame["type"]
        ref = frame.get("ref")
        if kind in ("reply", "error") and isinstance(ref, str) and ref in self._pending:
            future, timer = self._pending.pop(ref)
            timer.cancel()
            if kind == "reply" and "publications" not in frame:
                self._joined(frame)
            if kind == "reply":
                _settle(future, frame)
            else:
                code = str(frame.get("code") or "error")
                _settle(future, error=PushError(code, str(frame.get("message") or code), frame))
            return
        if kind == "error":
            code = str(frame.get("code") or "error")
            self._emit("error", PushError(code, str(frame.get("message") or code), frame))
            return
        if kind == "pong":
            return
        if not self._advance(frame):
            return  # a room message seen already (replayed after a reconnect)
        message_id = frame.get("id")
        if isinstance(message_id, str):
            if message_id in self._seen:
                # a redelivery: ack it again when it was acked (the ack may have been lost)
                if frame.get("ack") is True and self._seen[message_id]:
                    self._queue_ack(message_id)
                return
            self._remember(message_id, False)
        self._spawn(self._dispatch(frame))

    def _joined(self, reply: dict[str, Any]) -> None:
        """A join's reply: note the room's position; tell whether what was missed came back."""
        room, offset, epoch = reply.get("room"), reply.get("offset"), reply.get("epoch")
        if not isinstance(room, str) or not isinstance(offset, int) or not isinstance(epoch, str):
            return
        recovered = reply.get("recovered")
        if recovered is not True:  # when True, the replayed messages move the position
            known = self.positions.get(room)
            if known is None or known[1] != epoch or known[0] < offset:
                self.positions[room] = (offset, epoch)
        if recovered is not None:
            self._emit(
                "recovery",
                {
                    "room": room,
                    "recovered": recovered,
                    "recovered_count": reply.get("recovered_count", 0),
                    "reason": reply.get("reason"),
                },
            )

    def _advance(self, frame: dict[str, Any]) -> bool:
        """Move a room's position to this message; False when it was seen already."""
        room, offset, epoch = frame.get("room"), frame.get("offset"), frame.get("epoch")
        if not isinstance(room, str) or not isinstance(offset, int) or not isinstance(epoch, str):
            return True
        known = self.positions.get(room)
        if known is not None and known[1] == epoch and offset <= known[0]:
            return False
        self.positions[room] = (offset, epoch)
        return True

    def _remember(self, message_id: str, acked: bool) -> None:
        self._seen.pop(message_id, None)
        self._seen[message_id] = acked
        while len(self._seen) > self.dedupe_size:
            self._seen.popitem(last=False)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        handlers = [*self._handlers.get(frame["type"], ()), *self._handlers.get("message", ())]
        failed = False
        for handler in handlers:
            try:
                result = handler(frame)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                failed = True
                self._emit("error", exc)
        message_id = frame.get("id")
        if frame.get("ack") is True and isinstance(message_id, str):
            if failed:
                self._seen.pop(message_id, None)  # let the redelivery run the handlers again
            elif self.ack_mode == "auto":
                self.ack(message_id)

    def ack(self, *messages: str | dict[str, Any]) -> None:
        """Acknowledge messages by id (or the frames themselves); batched into one ``ack``."""
        for message in messages:
            message_id = message.get("id") if isinstance(message, dict) else message
            if not isinstance(message_id, str):
                continue
            self._remember(message_id, True)
            self._queue_ack(message_id)

    def _queue_ack(self, message_id: str) -> None:
        if message_id not in self._ack_queue:
            self._ack_queue.append(message_id)
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.ack_delay, self._flush_acks
            )

    def _flush_acks(self) -> None:
        self._ack_timer = None
        while self._ack_queue and self.state == "open":
            ids, self._ack_queue = self._ack_queue[:1000], self._ack_queue[1000:]
            self._write({"type": "ack", "ids": ids})
        # not connected: the server redelivers unacked messages and the duplicate is acked then
        self._ack_queue = []

    # -- heartbeat -------------------------------------------------------------------

    async def _ping_loop(self, conn: WebSocketClientConnection, welcome: dict[str, Any]) -> None:
        beat = welcome.get("heartbeat")
        heartbeat = float(beat) if isinstance(beat, int | float) and beat > 0 else 50.0
        interval = self.ping_interval if self.ping_interval is not None else heartbeat / 2
        tick = max(0.05, min(interval, 1.0))
        while self._conn is conn:
            await asyncio.sleep(tick)
            if time.monotonic() - self._last_frame < interval:
                continue
            sent = time.monotonic()
            self._write({"type": "ping"})
            while self._last_frame < sent:
                if time.monotonic() - sent > self.pong_timeout:
                    if self._conn is conn:
                        self._drop_code = CLOSE_DEAD
                        conn.close(CLOSE_DEAD, "no pong")
                        if conn.protocol is not None:
                            conn.protocol._abort()
                    return
                await asyncio.sleep(min(tick, 0.1))
