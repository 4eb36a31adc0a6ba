"""Redis broker: pub/sub between pushsvc nodes, on redis-py's asyncio client (hiredis).

Channels are the contract's (``room:<name>``, ``user:<id>``, ``control:<name>``)
behind a prefix (``pushsvc:`` unless the URL's ``prefix=`` says otherwise), so
a node receives only what its local members need. Payloads are
:meth:`Envelope.to_bytes`, encoded once by the publisher; a receiver parses
the header only (:meth:`Envelope.from_bytes`), never the JSON.

Subscriber: one dedicated connection read by a task of its own (not
redis-py's ``PubSub``: that one reconnects and resubscribes silently inside
its reads, does not say when a SUBSCRIBE is confirmed, and gives up after its
retries; this broker must know all three). Subscribes and unsubscribes made
in the same loop pass go out as one SUBSCRIBE and one UNSUBSCRIBE; an awaited
:meth:`RedisBroker.subscribe` returns once Redis confirmed it. On a lost
connection (restart, ``CLIENT KILL TYPE pubsub``, output buffer limit) it
reconnects with backoff from 50 ms doubling to at most :data:`BACKOFF_MAX`
seconds between tries, resubscribes every wanted channel in one command, and
then calls the gap callback: envelopes published meanwhile were lost.

Publisher: a connection pool; publishes waiting at the same time go out as one
pipeline, in call order. Each is bounded by ``timeout``: past it (or when
Redis refuses) :class:`BrokerUnavailable` is raised and counted.

Liveness: every ``probe_interval`` the node publishes to its own
``control:probe:<node-id>`` channel, subscribed like any other. The broker is
unhealthy while disconnected, while a SUBSCRIBE is unconfirmed for longer than
``timeout``, or when nothing arrived on the subscription for
:data:`PROBE_MISSES` probe intervals (a silent subscription); then it also
drops the connection and resubscribes on a new one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pushsvc.broker.contracts import (
    BrokerStats,
    BrokerUnavailable,
    Envelope,
    GapCallback,
    MessageCallback,
)

log = logging.getLogger("pushsvc.broker")

#: URL schemes this broker takes (``unix://`` is a socket path).
SCHEMES = ("redis", "rediss", "unix")
#: Channel prefix unless the URL's ``prefix=`` parameter sets one.
DEFAULT_PREFIX = "pushsvc:"
#: First wait before reconnecting the subscriber; doubled per failed try.
BACKOFF_MIN = 0.05
#: Longest wait between two reconnect tries (seconds).
BACKOFF_MAX = 2.0
#: Probe intervals without any message on the subscription before it is deemed silent.
PROBE_MISSES = 3
#: Most channels in one SUBSCRIBE or UNSUBSCRIBE command.
CHUNK = 1000
#: :meth:`RedisBroker.start` waits this many timeouts for the first connection.
START_WAITS = 5
_PROBE = b"probe"


class _Expired(Exception):
    """A wait outlived the broker timeout."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class RedisBroker:
    """Fans envelopes out through Redis pub/sub (at most once)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 1.0,
        probe_interval: float = 1.0,
        node_id: str | None = None,
    ) -> None:
        self.url = url  # the redis-py URL (pushsvc's own parameters removed)
        self.prefix = prefix  # before every channel name in Redis
        self.timeout = timeout  # bound of a publish, a connect, a SUBSCRIBE confirmation
        self.probe_interval = probe_interval  # seconds between liveness probes
        self.node_id = node_id or secrets.token_hex(6)  # names the probe channel
        self.probe_channel = f"control:probe:{self.node_id}"
        self._callback: MessageCallback | None = None
        self._gap_callback: GapCallback | None = None
        self._closed = True  # not started, or closed
        self._pool: ConnectionPool | None = None
        self._client: Redis | None = None  # publishes
        self._tasks: list[asyncio.Task[None]] = []  # subscriber, prober
        # -- what the node wants (kept across reconnects) --
        self._wanted: set[str] = set()  # channels to receive (the probe's included)
        self._names: dict[bytes, str] = {}  # prefixed wire name -> channel, for _wanted
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # awaited subscribes
        self._dirty: set[str] = set()  # channels to reconcile in the next batch
        self._kick = asyncio.Event()  # a batch is due, or a reconnect is asked
        # -- the current subscriber connection --
        self._conn: AbstractConnection | None = None
        self._sent: set[str] = set()  # the last command sent for these was SUBSCRIBE
        self._confirmed: set[str] = set()  # Redis confirmed the SUBSCRIBE
        self._inflight: dict[str, int] = {}  # channel -> commands awaiting their reply
        self._sent_at: dict[str, float] = {}  # channel -> when its unconfirmed SUBSCRIBE went
        self._unsynced: set[str] = set()  # wanted channels not yet confirmed since connecting
        self._synced_at: float | None = None  # when every wanted channel was confirmed
        self._reconnected = False  # the current connection replaced a lost one
        self._gap = False  # envelopes may have been lost: call the gap callback once synced
        self._stale = False  # the prober asks for a new connection
        self._silent = False  # dropped as silent: healthy again only once a message arrives
        self._last_message_at: float | None = None  # monotonic, any message received
        self._last_error = "no answer"  # why the last connect failed (for start's error)
        # -- publishes --
        self._outbox: list[tuple[bytes, bytes, asyncio.Future[None], bool]] = []
        self._publisher: asyncio.Task[None] | None = None
        # -- figures --
        self._received = 0
        self._published = 0
        self._publish_errors = 0
        self._timeouts = 0
        self._reconnects = 0
        self._resubscriptions = 0

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 1.0, probe_interval: float = 1.0
    ) -> RedisBroker:
        """Build from ``redis://``, ``rediss://`` or ``unix://`` (``?prefix=`` optional).

        Every other query parameter is redis-py's (``socket_keepalive``,
        ``ssl_cert_reqs``, ...). Raises ``ValueError`` for a bad URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"broker.url: expected redis://, rediss:// or unix://, not {url!r}")
        if (
            parts.scheme != "unix"
            and parts.path not in ("", "/")
            and not re.fullmatch(r"/[0-9]+", parts.path)
        ):
            raise ValueError(f"broker.url: the path must be /<db number>, not {parts.path!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for key, value in query if key == "prefix"]
        if len(prefixes) > 1:
            raise ValueError(f"broker.url: prefix given more than once in {url!r}")
        rest = urlencode([(key, value) for key, value in query if key != "prefix"])
        redis_url = urlunsplit(parts._replace(query=rest))
        broker = cls(
            redis_url,
            prefix=prefixes[0] if prefixes else DEFAULT_PREFIX,
            timeout=timeout,
            probe_interval=probe_interval,
        )
        try:
            broker._make_pool().make_connection()  # type: ignore[no-untyped-call]  # checks its parameters
        except (TypeError, ValueError) as exc:
            raise ValueError(f"broker.url: {exc} in {url!r}") from None
        return broker

    def _make_pool(self) -> ConnectionPool:
        return ConnectionPool.from_url(
            self.url,
            socket_connect_timeout=self.timeout,
            socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),  # once more at once: a pooled socket may be stale
        )

    # -- the Broker protocol -------------------------------------------------------------

    def set_callback(self, callback: MessageCallback) -> None:
        """Where envelopes for subscribed channels go (the local hub)."""
        self._callback = callback

    def set_gap_callback(self, callback: GapCallback) -> None:
        """Called once resubscribed after a lost connection or a failed publish."""
        self._gap_callback = callback

    async def start(self) -> None:
        """Connect and subscribe; raises :class:`BrokerUnavailable` if Redis cannot be reached.

        It tries for :data:`START_WAITS` times ``timeout`` (5 s by default).
        """
        if not self._closed:
            return
        self._closed = False
        self._pool = self._make_pool()
        self._client = Redis(connection_pool=self._pool)
        self._want(self.probe_channel)
        self._tasks = [
            asyncio.ensure_future(self._subscriber()),
            asyncio.ensure_future(self._prober()),
        ]
        deadline = time.monotonic() + START_WAITS * self.timeout
        while self._synced_at is None:
            if time.monotonic() > deadline:
                await self.close()
                raise BrokerUnavailable(
                    f"Redis broker {self._where()} not reachable: {self._last_error}"
                )
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Disconnect; publishes still waiting return without being sent (at most once)."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *([self._publisher] if self._publisher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._publisher = [], None
        for _channel, _data, future, _probe in self._outbox:
            if not future.done():
                future.set_result(None)
        self._outbox = []
        for channel in list(self._waiters):
            self._release(channel)
        if self._client is not None:
            await self._client.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
        self._client = self._pool = None

    def healthy(self) -> bool:
        """Connected, every wanted channel confirmed, and the probe seen recently."""
        if self._closed or self._conn is None or self._synced_at is None:
            return False
        now = time.monotonic()
        if any(now - sent > self.timeout for sent in self._sent_at.values()):
            return False
        return now - self._freshest() <= PROBE_MISSES * self.probe_interval

    def stats(self) -> BrokerStats:
        """Counters since the broker was built, and the subscription's state now."""
        last = self._last_message_at
        return BrokerStats(
            received=self._received,
            published=self._published,
            publish_errors=self._publish_errors,
            timeouts=self._timeouts,
            reconnects=self._reconnects,
            resubscriptions=self._resubscriptions,
            subscriptions=len(self._confirmed),
            last_message_age=None if last is None else time.monotonic() - last,
        )

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel``; returns once Redis confirmed it (at most ``timeout``)."""
        self._want(channel)
        if self._closed or self._conn is None:
            return  # subscribed when the connection is back
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        self._mark(channel)
        if not await self._bounded(future):
            self._timeouts += 1
            log.warning("SUBSCRIBE %s not confirmed within %.1f s", channel, self.timeout)

    async def unsubscribe(self, channel: str) -> None:
        """Deliver nothing more from ``channel``; the UNSUBSCRIBE goes out with the next batch."""
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._names.pop((self.prefix + channel).encode(), None)
        self._release(channel)
        if self._unsynced:
            self._unsynced.discard(channel)
            self._check_synced()
        if self._conn is not None:
            self._mark(channel)

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Publish ``envelope`` on ``channel``; raises :class:`BrokerUnavailable`."""
        await self._publish((self.prefix + channel).encode(), envelope.to_bytes(), False)

    async def _bounded(self, future: asyncio.Future[None]) -> bool:
        """Await ``future`` for at most ``timeout``; False when it timed out.

        A timer rather than ``asyncio.timeout``: callers may run outside a
        Task (eager frame handlers, :mod:`pushsvc.transport.eager`).
        """
        timer = asyncio.get_running_loop().call_later(self.timeout, _expire, future)
        try:
            await future
        except _Expired:
            return False
        finally:
            timer.cancel()
        return True

    # -- subscriptions --------------------------------------------------------------------

    def _want(self, channel: str) -> None:
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._names[(self.prefix + channel).encode()] = channel

    def _mark(self, channel: str) -> None:
        """Reconcile ``channel`` with Redis in the next batch."""
        self._dirty.add(channel)
        self._kick.set()

    def _release(self, channel: str) -> None:
        """Let the subscribes awaiting ``channel`` return."""
        for future in self._waiters.pop(channel, ()):
            if not future.done():
                future.set_result(None)

    def _settle_waiters(self, channels: Iterable[str]) -> None:
        """Release the waiters of channels confirmed with nothing more in flight."""
        for channel in channels:
            if channel in self._waiters and self._is_subscribed(channel):
                self._release(channel)

    def _is_subscribed(self, channel: str) -> bool:
        return channel in self._confirmed and channel not in self._inflight

    async def _subscriber(self) -> None:
        """Keep one subscriber connection up, forever (until :meth:`close`)."""
        delay, lost = BACKOFF_MIN, False
        while not self._closed:
            assert self._pool is not None
            kwargs: dict[str, Any] = dict(self._pool.connection_kwargs)
            kwargs["client_name"] = f"pushsvc-sub-{self.node_id}"
            kwargs["protocol"] = 2  # RESP2: pushes are plain replies, no push-handler pass
            conn: AbstractConnection = self._pool.connection_class(**kwargs)
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except (RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    self._timeouts += 1
                self._last_error = str(exc) or type(exc).__name__
                log.log(
                    logging.DEBUG if lost else logging.WARNING,
                    "Redis broker %s: cannot connect (%s); retrying for ever, every %.2f s at most",
                    self._where(),
                    exc or type(exc).__name__,
                    BACKOFF_MAX,
                )
                lost = True
                await conn.disconnect(nowait=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            if lost:
                self._reconnects += 1
                self._reconnected = self._gap = True
                log.info("Redis broker %s: reconnected; resubscribing", self._where())
            try:
                await self._serve(conn)
            except (RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    self._timeouts += 1
                log.warning(
                    "Redis broker %s: subscriber connection lost (%s)",
                    self._where(),
                    exc or type(exc).__name__,
                )
            finally:
                self._disconnected()
                await conn.disconnect(nowait=True)
            lost = True  # reconnect at once the first time, then back off

    def _disconnected(self) -> None:
        self._conn = None
        self._sent.clear()
        self._confirmed.clear()
        self._inflight.clear()
        self._sent_at.clear()
        self._unsynced.clear()
        self._synced_at = None
        self._gap = True
        for channel in list(self._waiters):
            self._release(channel)  # subscribed again on reconnect

    async def _serve(self, conn: AbstractConnection) -> None:
        """Run one connection: send batches, read replies; returns or raises when it is lost."""
        self._conn = conn
        self._stale = False
        self._dirty = set(self._wanted)
        self._unsynced = set(self._wanted)
        reader = asyncio.ensure_future(self._read(conn))
        waiter: asyncio.Task[Any] | None = None
        try:
            while True:
                self._kick.clear()
                async with asyncio.timeout(self.timeout):
                    await self._flush(conn)
                waiter = asyncio.ensure_future(self._kick.wait())
                await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises what ended it
                    raise ConnectionError("subscriber connection closed")
                if self._stale:
                    raise ConnectionError("silent subscription: no message, not even the probe")
                await asyncio.sleep(0)  # take the subscribes of one more loop pass too
        finally:
            for task in (reader, waiter):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _flush(self, conn: AbstractConnection) -> None:
        """Send one SUBSCRIBE and one UNSUBSCRIBE for what changed since the last batch."""
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        wanted, sent = self._wanted, self._sent
        subscribe = sorted(c for c in dirty if c in wanted and c not in sent)
        unsubscribe = sorted(c for c in dirty if c not in wanted and c in sent)
        now = time.monotonic()
        for command, channels in (("SUBSCRIBE", subscribe), ("UNSUBSCRIBE", unsubscribe)):
            for start in range(0, len(channels), CHUNK):
                chunk = channels[start : start + CHUNK]
                for channel in chunk:
                    self._inflight[channel] = self._inflight.get(channel, 0) + 1
                    if command == "SUBSCRIBE":
                        sent.add(channel)
                        self._sent_at.setdefault(channel, now)
                    else:
                        sent.discard(channel)
                await conn.send_command(command, *(self.prefix + c for c in chunk))
        self._settle_waiters(dirty)

    async def _read(self, conn: AbstractConnection) -> None:
        """Read pushes until the connection fails."""
        prefix_length = len(self.prefix)
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if not isinstance(reply, list) or len(reply) < 3:
                log.warning("unexpected reply on the subscriber connection: %r", reply)
                continue
            kind, name = reply[0], reply[1]
            if kind == b"message":
                self._message(name, reply[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                channel = name.decode(errors="replace")[prefix_length:]
                self._confirm(channel, kind == b"subscribe")

    def _message(self, name: bytes, data: bytes) -> None:
        self._last_message_at = time.monotonic()
        self._silent = False
        channel = self._names.get(name)
        if channel is None:  # unsubscribed since: dropped
            return
        if channel == self.probe_channel:
            if self._gap and self._synced_at is not None:
                self._call_gap()
            return
        try:
            envelope = Envelope.from_bytes(data)
        except ValueError as exc:
            log.warning("malformed envelope on %s dropped: %s", channel, exc)
            return
        self._received += 1
        if self._callback is None:
            return
        try:
            self._callback(channel, envelope)
        except Exception:
            log.exception("broker callback failed on %s", channel)

    def _confirm(self, channel: str, subscribed: bool) -> None:
        left = self._inflight.get(channel, 0) - 1
        if left > 0:
            self._inflight[channel] = left
        else:
            self._inflight.pop(channel, None)
        if subscribed:
            self._confirmed.add(channel)
        else:
            self._confirmed.discard(channel)
        if channel not in self._inflight:
            self._sent_at.pop(channel, None)
        if channel in self._waiters and self._is_subscribed(channel):
            self._release(channel)
        if subscribed and self._unsynced:
            self._unsynced.discard(channel)
            self._check_synced()

    def _check_synced(self) -> None:
        """Every wanted channel is confirmed: healthy again; repair what may be lost."""
        if self._unsynced or self._synced_at is not None or self._conn is None:
            return
        self._synced_at = time.monotonic()
        if self._reconnected:
            self._reconnected = False
            self._resubscriptions += 1
            log.info("Redis broker %s: resubscribed %d channels", self._where(), len(self._wanted))
        if self._gap:
            self._call_gap()

    def _call_gap(self) -> None:
        self._gap = False
        if self._gap_callback is None:
            return
        try:
            self._gap_callback()
        except Exception:
            log.exception("broker gap callback failed")

    # -- liveness -------------------------------------------------------------------------

    def _freshest(self) -> float:
        """The later of the last message and the last full (re)subscription.

        After a connection was dropped as silent only a message counts: a new
        connection on a Redis that still delivers nothing is no better.
        """
        last = self._last_message_at or 0.0
        return last if self._silent else max(self._synced_at or 0.0, last)

    async def _prober(self) -> None:
        """Publish the probe every interval; ask for a new connection when it stops arriving."""
        channel = (self.prefix + self.probe_channel).encode()
        while True:
            await asyncio.sleep(self.probe_interval)
            if self._synced_at is None:
                continue
            bound, now = PROBE_MISSES * self.probe_interval, time.monotonic()
            silent = now - self._freshest()
            # Once per connection: a new one gets its own probes' time before it is dropped.
            if silent > bound and now - self._synced_at > bound and not self._stale:
                log.warning(
                    "Redis broker %s: nothing received for %.1f s; reconnecting",
                    self._where(),
                    silent,
                )
                self._silent = self._stale = True
                self._kick.set()
                continue
            try:
                await self._publish(channel, _PROBE, True)
            except BrokerUnavailable as exc:
                log.debug("probe publish failed: %s", exc)

    # -- publishing -----------------------------------------------------------------------

    async def _publish(self, channel: bytes, data: bytes, probe: bool) -> None:
        if self._closed:
            return
        future = asyncio.get_running_loop().create_future()
        self._outbox.append((channel, data, future, probe))
        if self._publisher is None:
            self._publisher = asyncio.ensure_future(self._send_batches())
        if not await self._bounded(future):
            self._timeouts += 1
            self._publish_errors += 1
            self._gap = True
            raise BrokerUnavailable(
                f"Redis broker did not take the publish within {self.timeout:g} s"
            ) from None
        if not probe and not self._closed:  # closed meanwhile: dropped, not sent
            self._published += 1

    async def _send_batches(self) -> None:
        """Pipeline what is waiting, in call order, until nothing is."""
        try:
            while self._outbox:
                batch = [entry for entry in self._outbox if not entry[2].done()]
                self._outbox = []
                if not batch or self._client is None:
                    continue
                try:
                    async with asyncio.timeout(self.timeout):
                        async with self._client.pipeline(transaction=False) as pipe:
                            for channel, data, _future, _probe in batch:
                                pipe.publish(channel, data)
                            await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                    for _channel, _data, future, _probe in batch:
                        if not future.done():
                            self._publish_errors += 1
                            self._timeouts += isinstance(exc, TimeoutError)
                            self._gap = True
                            future.set_exception(
                                BrokerUnavailable(f"Redis broker publish failed: {reason}")
                            )
                    continue
                for _channel, _data, future, _probe in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._publisher = None

    def _where(self) -> str:
        """The URL without credentials, for logs."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc, query=""))
