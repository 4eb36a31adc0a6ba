"""Redis broker: pub/sub between pushsvc nodes, on redis-py's asyncio client (hiredis).

Channels are the contract's (``room:<name>``, ``user:<id>``, ``control:<name>``)
behind a prefix (``pushsvc:`` unless the URL's ``prefix=`` says otherwise), so
a node receives only what its local members need. Payloads are
:meth:`Envelope.to_bytes`, encoded once by the publisher; a receiver parses
the header only (:meth:`Envelope.from_bytes`), never the JSON.

Subscriber: one dedicated connection per Redis (a :class:`_Link`, one per
master on a Redis Cluster) read by a task of its own (not redis-py's
``PubSub``/``ClusterPubSub``: those reconnect and resubscribe silently inside
their reads, do not say when a SUBSCRIBE is confirmed, give up after their
retries, and the cluster one sends one SSUBSCRIBE per channel and polls each
master in turn; this broker must know all of it). Subscribes and unsubscribes
made in the same loop pass go out as one SUBSCRIBE and one UNSUBSCRIBE (on a
cluster: one SSUBSCRIBE and one SUNSUBSCRIBE per partition, below, in one
write per master); an awaited :meth:`RedisBroker.subscribe` returns once Redis
confirmed it. On a lost connection (restart, ``CLIENT KILL TYPE pubsub``,
output buffer limit) a link reconnects with backoff from 50 ms doubling to at
most :data:`BACKOFF_MAX` seconds between tries, resubscribes every wanted
channel in one command, and then calls the gap callback: envelopes published
meanwhile were lost.

Redis Cluster (``redis+cluster://``): sharded pub/sub, ``SPUBLISH`` and
``SSUBSCRIBE`` (Redis 7). SSUBSCRIBE takes channels of one hash slot only,
so channels are spread over ``partitions`` (default
:data:`DEFAULT_PARTITIONS`) hash tags, each of one slot:
``<prefix>{<tag>}:<channel>``, the partition being ``crc32(channel) %
partitions``; the tags are chosen so that their slots spread evenly over the
16384 (:func:`partition_tags`). Every node of a deployment must use the same
``partitions``. A master that gives up a slot (migration, failover) drops
its subscriptions of that slot with an unsolicited ``sunsubscribe``: the
broker then rereads the slot map and resubscribes them on the new owner
(counted as a resubscription, then the gap callback), as it does when a
master stays unreachable. Control channels (revocations) are sharded like
the others: every node subscribes to them on their master.

Publisher: a connection pool (on a cluster, each master's pool); publishes
waiting at the same time go out as one pipeline per Redis, in call order.
Each is bounded by ``timeout``: past it (or when Redis refuses)
:class:`BrokerUnavailable` is raised and counted.

Liveness: every ``probe_interval`` the node publishes to its own
``control:probe:<node-id>`` channel (on a cluster one per master, in a
partition of that master), subscribed like any other. The broker is
unhealthy while a link is disconnected, while a SUBSCRIBE is unconfirmed for
longer than ``timeout``, or when nothing arrived on a link for
:data:`PROBE_MISSES` probe intervals (a silent subscription); then that link
also drops its connection and resubscribes on a new one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, MovedError, RedisError, TryAgainError

from pushsvc import redisurl
from pushsvc.broker.contracts import (
    BrokerStats,
    BrokerUnavailable,
    Envelope,
    GapCallback,
    MessageCallback,
)

log = logging.getLogger("pushsvc.broker")

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
#: Redis Cluster: hash-tag partitions of the channels unless ``partitions=`` says otherwise.
DEFAULT_PARTITIONS = 32
#: Most partitions ``partitions=`` may ask for.
MAX_PARTITIONS = 256
#: Failed connects of a cluster link between two rereads of the slot map.
REFRESH_AFTER_FAILURES = 3
_PROBE = b"probe"


#: A publish waiting: wire channel, partition, payload, its future, whether it is a probe.
_Entry = tuple[bytes, int, bytes, "asyncio.Future[None]", bool]


class _Expired(Exception):
    """A wait outlived the broker timeout."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def partition_tags(count: int) -> list[str]:
    """The hash tags of ``count`` partitions: tag ``k`` hashes into the ``k``-th of
    ``count`` equal ranges of the 16384 slots, so the partitions spread over the
    masters as evenly as the slots do. The same on every node (a pure function)."""
    tags = []
    for k in range(count):
        low = k * REDIS_CLUSTER_HASH_SLOTS // count
        high = (k + 1) * REDIS_CLUSTER_HASH_SLOTS // count
        j = 0
        while not low <= key_slot(f"{k}.{j}".encode()) < high:
            j += 1
        tags.append(f"{k}.{j}")
    return tags


class RedisBroker:
    """Fans envelopes out through Redis pub/sub (at most once)."""

    in_process = False  # this node's own subscriptions hear it back from Redis

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 1.0,
        probe_interval: float = 1.0,
        node_id: str | None = None,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        self.url = url  # the redis-py URL (pushsvc's own parameters removed)
        self.prefix = prefix  # before every channel name in Redis
        self.timeout = timeout  # bound of a publish, a connect, a SUBSCRIBE confirmation
        self.probe_interval = probe_interval  # seconds between liveness probes
        self.node_id = node_id or secrets.token_hex(6)  # names the probe channels
        self.sharded = redisurl.is_cluster(url)  # Redis Cluster: SSUBSCRIBE / SPUBLISH
        self.partitions = partitions if self.sharded else 1  # hash-tag partitions
        self._tags = partition_tags(self.partitions) if self.sharded else [""]
        self._slots = [key_slot(tag.encode()) for tag in self._tags]  # partition -> slot
        self._wire_prefix = [  # partition -> what goes before the channel name
            (f"{prefix}{{{tag}}}:" if self.sharded else prefix).encode() for tag in self._tags
        ]
        self._callback: MessageCallback | None = None
        self._gap_callback: GapCallback | None = None
        self._closed = True  # not started, or closed
        self._pool: ConnectionPool | None = None  # one Redis
        self._client: Redis | None = None  # publishes (one Redis)
        self._cluster: RedisCluster | None = None  # the slot map and the masters' pools
        self._tasks: list[asyncio.Task[None]] = []  # prober, slot-map refresher
        # -- what the node wants (kept across reconnects) --
        self._wanted: set[str] = set()  # channels to receive (the probes included)
        self._names: dict[bytes, str] = {}  # wire name -> channel, for _wanted
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # awaited subscribes
        self._pinned: dict[str, int] = {}  # probe channel -> its partition (its link's)
        self._probes: dict[str, _Link] = {}  # probe channel -> the link it checks
        # -- links: subscriber connections --
        self._links: dict[str, _Link] = {}  # "host:port" (or "") -> link
        self._owners: list[str] = [""] * self.partitions  # partition -> link name
        self._route: dict[str, _Link] = {}  # wanted channel -> the link subscribing it
        self._refresh_asked = asyncio.Event()  # a link asks for a new slot map
        self._gap = False  # a publish failed: repair once a probe arrives
        self._last_error = "no answer"  # why the last connect failed (for start's error)
        # -- publishes --
        self._outboxes: dict[str, list[_Entry]] = {}  # link name -> publishes waiting
        self._publishers: dict[str, asyncio.Task[None]] = {}  # link name -> its sender
        self._probing: set[asyncio.Task[None]] = set()  # probe publishes in flight
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
        """Build from any form of :mod:`pushsvc.redisurl` (``?prefix=`` optional;
        ``?partitions=`` on a cluster).

        Every other query parameter is redis-py's (``socket_keepalive``,
        ``ssl_cert_reqs``, ...). Raises ``ValueError`` for a bad URL.
        """
        if not url.startswith(redisurl.SCHEMES):
            raise ValueError(
                f"broker.url: expected one of {', '.join(redisurl.SCHEMES)}, "
                f"not {redisurl.redacted(url)!r}"
            )
        redisurl.check_path(url, "broker.url")
        sharded = redisurl.is_cluster(url)
        ours = ("prefix", "partitions") if sharded else ("prefix",)
        redis_url, given = redisurl.take_params(url, ours, "broker.url")
        prefix = given.get("prefix", DEFAULT_PREFIX)
        partitions = DEFAULT_PARTITIONS
        if sharded:
            if "{" in prefix or "}" in prefix:
                raise ValueError(
                    "broker.url: on a Redis Cluster the prefix may not hold '{' or '}' "
                    f"(the channel's hash tag follows it), not {prefix!r}"
                )
            try:
                partitions = int(given.get("partitions", DEFAULT_PARTITIONS))
            except ValueError:
                partitions = 0
            if not 1 <= partitions <= MAX_PARTITIONS:
                raise ValueError(
                    f"broker.url: partitions must be an integer from 1 to {MAX_PARTITIONS}, "
                    f"not {given.get('partitions')!r}"
                )
        broker = cls(
            redis_url,
            prefix=prefix,
            timeout=timeout,
            probe_interval=probe_interval,
            partitions=partitions,
        )
        try:
            if sharded:
                for node in broker._make_cluster().get_nodes():  # checks its parameters
                    node.connection_class(**node.connection_kwargs)
            else:
                broker._make_pool().make_connection()  # type: ignore[no-untyped-call]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"broker.url: {exc} in {redisurl.redacted(url)!r}") from None
        return broker

    def _make_pool(self) -> ConnectionPool:
        return redisurl.connection_pool(
            self.url,
            key="broker.url",
            socket_connect_timeout=self.timeout,
            socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),  # once more at once: a pooled socket may be stale
        )

    def _make_cluster(self) -> RedisCluster:
        return redisurl.cluster_client(
            self.url,
            key="broker.url",
            socket_connect_timeout=self.timeout,
            socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),
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
        deadline = time.monotonic() + START_WAITS * self.timeout
        if self.sharded:
            self._cluster = self._make_cluster()
            try:
                async with asyncio.timeout(START_WAITS * self.timeout):
                    await self._cluster.initialize()
            except (RedisError, OSError, TimeoutError) as exc:
                await self.close()
                raise BrokerUnavailable(
                    f"Redis broker {self._where()} not reachable: {exc or type(exc).__name__}"
                ) from None
            self._apply_owners(self._read_owners())
            self._tasks.append(asyncio.ensure_future(self._refresher()))
        else:
            self._pool = self._make_pool()
            self._client = Redis(connection_pool=self._pool)
            self._apply_owners([""])
        self._tasks.append(asyncio.ensure_future(self._prober()))
        while not all(link.synced_at is not None for link in self._links.values()):
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
        links = list(self._links.values())
        tasks = [
            *self._tasks,
            *self._publishers.values(),
            *self._probing,
            *(link.task for link in links if link.task is not None),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._publishers, self._probing = [], {}, set()
        self._links, self._route, self._probes = {}, {}, {}
        for outbox in self._outboxes.values():
            for _channel, _partition, _data, future, _probe in outbox:
                if not future.done():
                    future.set_result(None)
        self._outboxes = {}
        for channel in list(self._waiters):
            self._release(channel)
        if self._client is not None:
            await self._client.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
        if self._cluster is not None:
            await self._cluster.aclose()
        self._client = self._pool = self._cluster = None

    def healthy(self) -> bool:
        """Every link connected, every wanted channel confirmed, every probe seen recently."""
        if self._closed or not self._links:
            return False
        now = time.monotonic()
        return all(link.healthy(now) for link in self._links.values())

    def stats(self) -> BrokerStats:
        """Counters since the broker was built, and the subscriptions' state now.

        ``last_message_age`` is the stalest link's (on a cluster, the master
        heard from longest ago), so a silent master shows.
        """
        now = time.monotonic()
        ages = [now - link.last_message_at for link in self._links.values() if link.last_message_at]
        return BrokerStats(
            received=self._received,
            published=self._published,
            publish_errors=self._publish_errors,
            timeouts=self._timeouts,
            reconnects=self._reconnects,
            resubscriptions=self._resubscriptions,
            subscriptions=sum(len(link.confirmed) for link in self._links.values()),
            last_message_age=max(ages) if ages else None,
        )

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel``; returns once Redis confirmed it (at most ``timeout``)."""
        link = self._want(channel)
        if self._closed or link is None or link.conn is None:
            return  # subscribed when the connection is back
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        link.mark(channel)
        if not await self._bounded(future):
            self._timeouts += 1
            log.warning("SUBSCRIBE %s not confirmed within %.1f s", channel, self.timeout)

    async def unsubscribe(self, channel: str) -> None:
        """Deliver nothing more from ``channel``; the UNSUBSCRIBE goes out with the next batch."""
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._names.pop(self._wire(channel), None)
        self._release(channel)
        link = self._route.pop(channel, None)
        if link is not None:
            link.drop(channel)

    async def publish(self, channel: str, envelope: Envelope) -> None:
        """Publish ``envelope`` on ``channel``; raises :class:`BrokerUnavailable`."""
        if self.sharded:
            partition = self._partition(channel)
            wire = self._wire_prefix[partition] + channel.encode()
        else:
            partition, wire = 0, (self.prefix + channel).encode()
        await self._publish(wire, partition, envelope.to_bytes(), False)

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

    # -- channels, partitions, links ----------------------------------------------------

    def _partition(self, channel: str) -> int:
        if self.partitions == 1:
            return 0
        pinned = self._pinned.get(channel)
        if pinned is not None:
            return pinned
        return zlib.crc32(channel.encode()) % self.partitions

    def _wire(self, channel: str) -> bytes:
        """The channel's name in Redis."""
        return self._wire_prefix[self._partition(channel)] + channel.encode()

    def _channel_of(self, wire: bytes) -> str:
        """The channel a wire name stands for (also one unsubscribed since)."""
        channel = self._names.get(wire)
        if channel is not None:
            return channel
        rest = wire[len(self.prefix.encode()) :]
        if self.sharded:
            rest = rest.partition(b"}:")[2]
        return rest.decode(errors="replace")

    def _want(self, channel: str) -> _Link | None:
        """Add ``channel`` to what the node wants; the link that subscribes it."""
        if channel in self._wanted:
            return self._route.get(channel)
        self._wanted.add(channel)
        self._names[self._wire(channel)] = channel
        link = self._links.get(self._owners[self._partition(channel)])
        if link is not None:
            self._route[channel] = link
            link.channels.add(channel)
        return link

    def _release(self, channel: str) -> None:
        """Let the subscribes awaiting ``channel`` return."""
        for future in self._waiters.pop(channel, ()):
            if not future.done():
                future.set_result(None)

    def _read_owners(self) -> list[str]:
        """Partition -> name of the master serving its slot, from the client's slot map."""
        assert self._cluster is not None
        owners = []
        for partition, slot in enumerate(self._slots):
            try:
                node = self._cluster.nodes_manager.get_node_from_slot(slot)
            except RedisError:  # slot not covered: keep the last known owner
                owners.append(self._owners[partition])
                continue
            owners.append(node.name)
        return owners

    def _apply_owners(self, owners: list[str]) -> None:
        """Move channels to the links of their partitions' owners; start and retire links."""
        self._owners = owners
        for name in dict.fromkeys(owners):
            if name not in self._links and (name or not self.sharded):
                link = _Link(self, name)
                self._links[name] = link
                link.task = asyncio.ensure_future(link.run())
        for channel in list(self._wanted):
            partition = self._partition(channel)
            if channel in self._probes:
                continue  # probes follow their link, below
            old, new = self._route.get(channel), self._links.get(owners[partition])
            if old is new or new is None:
                continue
            if old is not None:
                old.forget(channel)
            self._route[channel] = new
            new.move_in(channel)
        for name, link in list(self._links.items()):
            owned = [p for p, owner in enumerate(owners) if owner == name]
            if not owned:
                self._retire(link)
                continue
            self._pin_probe(link, owned[0])

    def _pin_probe(self, link: _Link, partition: int) -> None:
        """Give ``link`` a probe channel in ``partition`` (one of its own)."""
        name = f"control:probe:{self.node_id}"
        if self.sharded:
            name = f"{name}.{partition}"
        if link.probe == name:
            return
        if link.probe:
            old = link.probe
            self._probes.pop(old, None)
            self._wanted.discard(old)
            self._names.pop(self._wire(old), None)
            self._route.pop(old, None)
            link.drop(old)
            self._pinned.pop(old, None)
        link.probe = name
        self._pinned[name] = partition
        self._probes[name] = link
        self._want(name)
        if link.conn is not None:
            link.mark(name)

    def _retire(self, link: _Link) -> None:
        """``link`` serves no partition any more: stop it (its channels moved already)."""
        self._links.pop(link.name, None)
        if link.probe:
            probe = link.probe
            self._probes.pop(probe, None)
            self._wanted.discard(probe)
            self._names.pop(self._wire(probe), None)
            self._route.pop(probe, None)
            self._pinned.pop(probe, None)
        for channel in list(link.channels):
            if self._route.get(channel) is link:
                del self._route[channel]
        if link.task is not None:
            link.task.cancel()
        log.info("Redis broker: %s serves none of the partitions any more", link.name)

    def ask_refresh(self) -> None:
        """A link saw the slot map change (or its master stays unreachable): reread it."""
        self._refresh_asked.set()

    async def _refresher(self) -> None:
        """Reread the slot map when asked; move the channels whose partition changed master."""
        assert self._cluster is not None
        delay = BACKOFF_MIN
        while True:
            await self._refresh_asked.wait()
            self._refresh_asked.clear()
            try:
                async with asyncio.timeout(self.timeout * 2):
                    await self._cluster.nodes_manager.initialize()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("Redis broker: slot map not reread: %s", exc or type(exc).__name__)
                self._refresh_asked.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            owners = self._read_owners()
            if owners != self._owners:
                log.info("Redis broker: the slot map changed; moving subscriptions")
                self._apply_owners(owners)
            for link in self._links.values():
                link.resubscribe_dropped()
            await asyncio.sleep(BACKOFF_MIN)  # at most a few rereads a second

    # -- gaps -----------------------------------------------------------------------------

    def call_gap(self) -> None:
        self._gap = False
        if self._gap_callback is None:
            return
        try:
            self._gap_callback()
        except Exception:
            log.exception("broker gap callback failed")

    def deliver(self, link: _Link, name: bytes, data: bytes) -> None:
        """A message read by ``link``."""
        channel = self._names.get(name)
        if channel is None:  # unsubscribed since: dropped
            return
        if channel in self._probes:
            if self._gap and link.synced_at is not None:
                self.call_gap()
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

    # -- liveness -------------------------------------------------------------------------

    async def _prober(self) -> None:
        """Publish the probes every interval; ask for a new connection when one stops arriving."""
        while True:
            await asyncio.sleep(self.probe_interval)
            for link in list(self._links.values()):
                if link.synced_at is None or not link.probe or link.probing:
                    continue
                if link.check_silent():
                    continue
                task = asyncio.ensure_future(self._probe(link))
                self._probing.add(task)
                task.add_done_callback(self._probing.discard)

    async def _probe(self, link: _Link) -> None:
        """Publish ``link``'s probe (a slow master delays only its own)."""
        link.probing = True
        try:
            await self._publish(self._wire(link.probe), self._pinned[link.probe], _PROBE, True)
        except BrokerUnavailable as exc:
            log.debug("probe publish failed: %s", exc)
        finally:
            link.probing = False

    # -- publishing -----------------------------------------------------------------------

    async def _publish(self, channel: bytes, partition: int, data: bytes, probe: bool) -> None:
        if self._closed:
            return
        future = asyncio.get_running_loop().create_future()
        name = self._owners[partition]
        outbox = self._outboxes.get(name)
        if outbox is None:
            self._outboxes[name] = [(channel, partition, data, future, probe)]
        else:
            outbox.append((channel, partition, data, future, probe))
        if name not in self._publishers:
            self._publishers[name] = asyncio.ensure_future(self._send_batches(name))
        if not await self._bounded(future):
            self._timeouts += 1
            self._publish_errors += 1
            self._gap = True
            raise BrokerUnavailable(
                f"Redis broker did not take the publish within {self.timeout:g} s"
            ) from None
        if not probe and not self._closed:  # closed meanwhile: dropped, not sent
            self._published += 1

    def _fail(self, batch: Iterable[tuple[Any, ...]], exc: BaseException) -> None:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        for entry in batch:
            future = entry[3]
            if not future.done():
                self._publish_errors += 1
                self._timeouts += isinstance(exc, TimeoutError)
                self._gap = True
                future.set_exception(BrokerUnavailable(f"Redis broker publish failed: {reason}"))

    def _enqueue(self, entry: _Entry) -> None:
        """Queue a publish for the sender of its Redis (on a cluster: its master's)."""
        name = self._owners[entry[1]]
        self._outboxes.setdefault(name, []).append(entry)
        if name not in self._publishers:
            self._publishers[name] = asyncio.ensure_future(self._send_batches(name))

    async def _send_batches(self, name: str) -> None:
        """Pipeline what waits for one Redis, in call order, until nothing does.

        One sender per master: a slow or unreachable master delays only the
        publishes to its own slots.
        """
        try:
            while self._outboxes.get(name):
                batch = [entry for entry in self._outboxes.pop(name) if not entry[3].done()]
                if not batch:
                    continue
                if self.sharded:
                    await self._send_sharded(name, batch)
                    continue
                if self._client is None:
                    continue
                try:
                    async with asyncio.timeout(self.timeout):
                        async with self._client.pipeline(transaction=False) as pipe:
                            for channel, _partition, data, _future, _probe in batch:
                                pipe.publish(channel, data)
                            await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    self._fail(batch, exc)
                    continue
                for entry in batch:
                    if not entry[3].done():
                        entry[3].set_result(None)
        finally:
            self._publishers.pop(name, None)

    async def _send_sharded(self, name: str, batch: list[_Entry]) -> None:
        """SPUBLISH ``batch`` on master ``name`` in one pipeline. A MOVED reply
        rereads the slot map and queues that publish again (within its timeout)."""
        node = self._cluster.get_node(node_name=name) if self._cluster else None
        if node is None:
            self.ask_refresh()
            self._fail(batch, RedisError(f"{name or 'a partition'} has no known master"))
            return
        commands = [
            PipelineCommand(i, "SPUBLISH", channel, data)
            for i, (channel, _p, data, _f, _probe) in enumerate(batch)
        ]
        try:
            async with asyncio.timeout(self.timeout):
                await node.execute_pipeline(commands)
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail(batch, exc)
            self.ask_refresh()  # a failover may have moved its slots
            return
        retry: list[_Entry] = []
        for entry, command in zip(batch, commands, strict=True):
            result, future = command.result, entry[3]
            if future.done():
                continue
            if isinstance(result, (MovedError, AskError, TryAgainError)):
                self.ask_refresh()
                retry.append(entry)
            elif isinstance(result, BaseException):
                self._fail([entry], result)
            else:
                future.set_result(None)
        if retry:
            await asyncio.sleep(BACKOFF_MIN)  # the refresher rereads the slot map meanwhile
            for entry in retry:
                self._enqueue(entry)

    def _where(self) -> str:
        """Where the broker's Redis is, without credentials, for logs."""
        return redisurl.where(self.url)


class _Link:
    """One subscriber connection: to the one Redis, or to one master of a cluster.

    It subscribes the channels routed to it (``channels``), batching each loop
    pass's changes, reconnects and resubscribes when the connection is lost,
    and tracks its own liveness (its probe channel, ``probe``).
    """

    def __init__(self, broker: RedisBroker, name: str) -> None:
        self.broker = broker
        self.name = name  # "host:port" of its master on a cluster, "" for one Redis
        self.task: asyncio.Task[None] | None = None  # runs :meth:`run`
        self.channels: set[str] = set()  # wanted channels routed here
        self.probe = ""  # this link's probe channel
        self.dirty: set[str] = set()  # channels to reconcile in the next batch
        self.kick = asyncio.Event()  # a batch is due, or a reconnect is asked
        # -- the current connection --
        self.conn: AbstractConnection | None = None
        self.sent: set[str] = set()  # the last command sent for these was (S)SUBSCRIBE
        self.confirmed: set[str] = set()  # Redis confirmed the (S)SUBSCRIBE
        self.inflight: dict[str, int] = {}  # channel -> commands awaiting their reply
        self.sent_at: dict[str, float] = {}  # channel -> when its unconfirmed SUBSCRIBE went
        self.unsynced: set[str] = set()  # channels not yet confirmed since (re)subscribing
        self.synced_at: float | None = None  # when every channel was confirmed
        self.reconnected = False  # resubscribing after a loss (counted once synced)
        self.gap = False  # envelopes may have been lost: call the gap callback once synced
        self.stale = False  # the prober asks for a new connection
        self.silent = False  # dropped as silent: healthy again only once a message arrives
        self.last_message_at: float | None = None  # monotonic, any message on this link
        self.failures = 0  # connects failed in a row
        self.probing = False  # its probe publish is in flight
        sharded = broker.sharded
        self._commands = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._kinds = (
            (b"smessage", b"ssubscribe", b"sunsubscribe")
            if sharded
            else (b"message", b"subscribe", b"unsubscribe")
        )

    # -- state ----------------------------------------------------------------------------

    def mark(self, channel: str) -> None:
        """Reconcile ``channel`` with Redis in the next batch."""
        self.dirty.add(channel)
        self.kick.set()

    def drop(self, channel: str) -> None:
        """``channel`` is not wanted any more: UNSUBSCRIBE it with the next batch."""
        self.channels.discard(channel)
        if self.unsynced:
            self.unsynced.discard(channel)
            self.check_synced()
        if self.conn is not None:
            self.mark(channel)

    def forget(self, channel: str) -> None:
        """``channel`` moved to another master: drop it here without a command."""
        self.channels.discard(channel)
        for state in (self.sent, self.confirmed, self.unsynced, self.dirty):
            state.discard(channel)
        self.inflight.pop(channel, None)
        self.sent_at.pop(channel, None)
        self.check_synced()

    def move_in(self, channel: str) -> None:
        """``channel`` moved here from another master: subscribe it, then repair the gap."""
        self.channels.add(channel)
        if self.conn is None:
            return  # subscribed with the rest on connect
        self.unsynced.add(channel)
        self.synced_at = None
        self.reconnected = self.gap = True
        self.mark(channel)

    def resubscribe_dropped(self) -> None:
        """Subscribe again what the server dropped (a slot moved away and back)."""
        if self.conn is None:
            return
        for channel in self.channels:
            if channel not in self.sent and channel not in self.dirty:
                self.move_in(channel)

    def is_subscribed(self, channel: str) -> bool:
        return channel in self.confirmed and channel not in self.inflight

    def healthy(self, now: float) -> bool:
        if self.conn is None or self.synced_at is None:
            return False
        if any(now - sent > self.broker.timeout for sent in self.sent_at.values()):
            return False
        return now - self.freshest() <= PROBE_MISSES * self.broker.probe_interval

    def freshest(self) -> float:
        """The later of the last message and the last full (re)subscription.

        After a connection was dropped as silent only a message counts: a new
        connection on a Redis that still delivers nothing is no better.
        """
        last = self.last_message_at or 0.0
        return last if self.silent else max(self.synced_at or 0.0, last)

    def check_silent(self) -> bool:
        """True (and a reconnect asked) when nothing arrived for too long."""
        if self.synced_at is None:
            return False
        bound, now = PROBE_MISSES * self.broker.probe_interval, time.monotonic()
        silent = now - self.freshest()
        # Once per connection: a new one gets its own probes' time before it is dropped.
        if silent > bound and now - self.synced_at > bound and not self.stale:
            log.warning(
                "Redis broker %s: nothing received for %.1f s; reconnecting", self.where(), silent
            )
            self.silent = self.stale = True
            self.kick.set()
            return True
        return False

    def where(self) -> str:
        return self.name or self.broker._where()

    # -- the connection -------------------------------------------------------------------

    def _connection(self) -> AbstractConnection:
        broker = self.broker
        if broker.sharded:
            assert broker._cluster is not None
            node: ClusterNode | None = broker._cluster.get_node(node_name=self.name)
            if node is None:
                raise ConnectionError(f"{self.name} is not in the cluster's slot map")
            kwargs: dict[str, Any] = dict(node.connection_kwargs)
            connection_class: Callable[..., AbstractConnection] = node.connection_class
        else:
            assert broker._pool is not None
            kwargs = dict(broker._pool.connection_kwargs)
            connection_class = broker._pool.connection_class
        kwargs["client_name"] = f"pushsvc-sub-{broker.node_id}"
        kwargs["protocol"] = 2  # RESP2: pushes are plain replies, no push-handler pass
        return connection_class(**kwargs)

    async def run(self) -> None:
        """Keep one subscriber connection up, forever (until closed or retired)."""
        broker = self.broker
        delay, lost = BACKOFF_MIN, False
        while not broker._closed:
            conn: AbstractConnection | None = None
            try:
                conn = self._connection()
                async with asyncio.timeout(broker.timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:  # closed or retired while connecting
                if conn is not None:
                    await conn.disconnect(nowait=True)
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    broker._timeouts += 1
                broker._last_error = str(exc) or type(exc).__name__
                log.log(
                    logging.DEBUG if lost else logging.WARNING,
                    "Redis broker %s: cannot connect (%s); retrying for ever, every %.2f s at most",
                    self.where(),
                    exc or type(exc).__name__,
                    BACKOFF_MAX,
                )
                lost = True
                self.failures += 1
                if broker.sharded and self.failures % REFRESH_AFTER_FAILURES == 0:
                    broker.ask_refresh()  # a failover may have moved its slots
                if conn is not None:
                    await conn.disconnect(nowait=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, self.failures = BACKOFF_MIN, 0
            if lost:
                broker._reconnects += 1
                self.reconnected = self.gap = True
                log.info("Redis broker %s: reconnected; resubscribing", self.where())
            try:
                await self._serve(conn)
            except (RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    broker._timeouts += 1
                log.warning(
                    "Redis broker %s: subscriber connection lost (%s)",
                    self.where(),
                    exc or type(exc).__name__,
                )
            finally:
                self._disconnected()
                await conn.disconnect(nowait=True)
            lost = True  # reconnect at once the first time, then back off

    def _disconnected(self) -> None:
        self.conn = None
        self.sent.clear()
        self.confirmed.clear()
        self.inflight.clear()
        self.sent_at.clear()
        self.unsynced.clear()
        self.synced_at = None
        self.gap = True
        for channel in self.channels:
            self.broker._release(channel)  # subscribed again on reconnect

    async def _serve(self, conn: AbstractConnection) -> None:
        """Run one connection: send batches, read replies; returns or raises when it is lost."""
        self.conn = conn
        self.stale = False
        self.dirty = set(self.channels)
        self.unsynced = set(self.channels)
        reader = asyncio.ensure_future(self._read(conn))
        waiter: asyncio.Task[Any] | None = None
        try:
            while True:
                self.kick.clear()
                async with asyncio.timeout(self.broker.timeout):
                    await self._flush(conn)
                waiter = asyncio.ensure_future(self.kick.wait())
                await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises what ended it
                    raise ConnectionError("subscriber connection closed")
                if self.stale:
                    raise ConnectionError("silent subscription: no message, not even the probe")
                await asyncio.sleep(0)  # take the subscribes of one more loop pass too
        finally:
            for task in (reader, waiter):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _flush(self, conn: AbstractConnection) -> None:
        """Send one SUBSCRIBE and one UNSUBSCRIBE (per partition) for what changed."""
        dirty, self.dirty = self.dirty, set()
        if not dirty:
            return
        broker, wanted, sent = self.broker, self.channels, self.sent
        subscribe = sorted(c for c in dirty if c in wanted and c not in sent)
        unsubscribe = sorted(c for c in dirty if c not in wanted and c in sent)
        now = time.monotonic()
        commands: list[tuple[Any, ...]] = []
        for command, channels in zip(self._commands, (subscribe, unsubscribe), strict=True):
            by_partition: dict[int, list[str]] = {}
            for channel in channels:
                by_partition.setdefault(broker._partition(channel), []).append(channel)
            for partition, group in by_partition.items():
                prefix = broker._wire_prefix[partition]
                for start in range(0, len(group), CHUNK):
                    chunk = group[start : start + CHUNK]
                    for channel in chunk:
                        self.inflight[channel] = self.inflight.get(channel, 0) + 1
                        if command == self._commands[0]:
                            sent.add(channel)
                            self.sent_at.setdefault(channel, now)
                        else:
                            sent.discard(channel)
                    commands.append((command, *(prefix + c.encode() for c in chunk)))
        if commands:
            await conn.send_packed_command(conn.pack_commands(commands))
        for channel in dirty:
            if channel in broker._waiters and self.is_subscribed(channel):
                broker._release(channel)

    async def _read(self, conn: AbstractConnection) -> None:
        """Read pushes until the connection fails."""
        message, subscribed, unsubscribed = self._kinds
        broker = self.broker
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if not isinstance(reply, list) or len(reply) < 3:
                log.warning("unexpected reply on the subscriber connection: %r", reply)
                continue
            kind, name = reply[0], reply[1]
            if kind == message:
                self.last_message_at = time.monotonic()
                self.silent = False
                broker.deliver(self, name, reply[2])
            elif kind in (subscribed, unsubscribed):
                self._confirm(broker._channel_of(name), kind == subscribed)

    def _confirm(self, channel: str, subscribed: bool) -> None:
        inflight = self.inflight.get(channel, 0)
        if not subscribed and inflight == 0 and channel in self.sent:
            # Not ours: the master gave the slot up (migration, failover).
            log.info(
                "Redis broker %s: %s dropped by the server; rereading the slot map",
                self.where(),
                channel,
            )
            self.sent.discard(channel)
            self.confirmed.discard(channel)
            self.broker.ask_refresh()
            return
        left = inflight - 1
        if left > 0:
            self.inflight[channel] = left
        else:
            self.inflight.pop(channel, None)
        if subscribed:
            self.confirmed.add(channel)
        else:
            self.confirmed.discard(channel)
        if channel not in self.inflight:
            self.sent_at.pop(channel, None)
        if channel in self.broker._waiters and self.is_subscribed(channel):
            self.broker._release(channel)
        if subscribed and self.unsynced:
            self.unsynced.discard(channel)
            self.check_synced()

    def check_synced(self) -> None:
        """Every channel is confirmed: healthy again; repair what may be lost."""
        if self.unsynced or self.synced_at is not None or self.conn is None:
            return
        self.synced_at = time.monotonic()
        broker = self.broker
        if self.reconnected:
            self.reconnected = False
            broker._resubscriptions += 1
            log.info("Redis broker %s: resubscribed %d channels", self.where(), len(self.channels))
        if self.gap:
            self.gap = False
            broker.call_gap()
