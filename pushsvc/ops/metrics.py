"""Prometheus metrics: every series pushsvc exports, on an injected registry.

No label carries a user id, room name, session or anything else unbounded:
``type`` is a registered message type, a core command or a server frame
(:data:`OTHER_TYPE` for anything else, e.g. a type published over the API
that no plugin declared), and every other label has a fixed set of values
that the code writes as literals. docs/operations.md lists every series.

Besides the series, this module times every store operation
(:func:`Metrics.instrument_store`) and binds the state gauges (broker,
draining, ready) to the node so they are read at scrape time.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pushsvc.broker import BrokerStats
from pushsvc.protocol.commands import CORE_TYPES, SERVER_TYPES
from pushsvc.protocol.disconnects import CLIENT_CLOSE_LABEL, every_disconnect
from pushsvc.version import __version__

if TYPE_CHECKING:
    from pushsvc.store import Store

#: ``result`` of a handshake: ``ok`` or the refusal's ``error`` code (PROTOCOL §1).
HANDSHAKE_RESULTS = (
    "ok",
    "unauthorized",
    "forbidden_origin",
    "too_many_connections",
    "unavailable",
)
#: ``reason`` of a handshake that carries none (``ok``, or a refusal without one).
NO_REASON = "none"
#: Label value for anything that is not a short lowercase code.
OTHER = "other"
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Frame types the server itself sends or parses, besides the plugins' types.
SERVER_TYPES = frozenset({"invalid", "unknown", *SERVER_TYPES, *CORE_TYPES})
#: Label value for a message type that no plugin declared (bounded cardinality).
OTHER_TYPE = OTHER
#: ``bucket`` of a rate-limited frame, handshake or API call (``type``: a message type's own).
RATE_LIMIT_BUCKETS = ("connection", "user", "type", "handshake", "api")
#: Store operations timed by :func:`Metrics.instrument_store` (others are timed too).
STORE_OPERATIONS = (
    "accept",
    "pending",
    "ack",
    "record_attempts",
    "dead_letter",
    "expire",
    "dead_letters",
    "requeue",
    "delete_dead",
    "stats",
    "check",
    "append",
    "history",
    "trim_history",
)
#: ``outcome`` of a join that asked to resume (``since``): recovered, or why not.
RECOVERY_OUTCOMES = (
    "recovered",
    "epoch_changed",
    "too_far_behind",
    "history_expired",
    "history_disabled",
    "unavailable",
)
#: ``source`` of history publications sent again: a resuming join, a gap repair.
REPLAY_SOURCES = ("resume", "repair")
#: Store methods that are not operations (not timed).
_STORE_LIFECYCLE = frozenset({"open", "close"})
#: ``reason`` labels of ``pushsvc_closes_total``: the client's closes and every server one.
CLOSE_REASONS = (CLIENT_CLOSE_LABEL, *dict.fromkeys(d.label for d in every_disconnect()))
#: ``result`` of a Web Push request: accepted, subscription gone (404/410), refused
#: for good (4xx), to be retried (429, 5xx, no answer).
PUSH_RESULTS = ("sent", "expired", "rejected", "retry")
#: ``reason`` a push was given up: queue full, store unreadable, attempts spent, TTL over.
PUSH_DROP_REASONS = ("queue_full", "store", "attempts", "expired")
#: ``reason`` a subscription was deleted: by the user, or the push service said 404/410.
PUSH_DELETE_REASONS = ("unsubscribed", "expired")
#: ``reason`` a push_subscribe was refused: the endpoint, or the per-user cap.
PUSH_REFUSE_REASONS = ("endpoint", "limit")
#: Buckets of the chat fan-out histogram (connections a broadcast went to).
FANOUT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def code_label(value: str) -> str:
    """``value`` when it is a short lowercase code, else :data:`OTHER` (bounded labels)."""
    return value if _CODE.match(value) else OTHER


MAX_CACHED_CHILDREN = 1024  # per counter; label values past this are looked up each time


class LoopValue:
    """A series' value without a lock: what the per-message series count into.

    prometheus-client guards each value with a mutex, and its ``inc()`` is
    three Python calls and a lock (0.6 µs; a histogram's ``observe`` 1.1 µs);
    a durable message counts about twenty of them. Every series installed
    here (:func:`loop_value`) is changed only on the event-loop thread, so a
    plain float does: ``inc`` is one call, and prometheus-client reads the
    same object at scrape time (``get``). It is also what
    :meth:`TypedCounter.labels` returns: ``labels(t).inc()`` stays the call.
    """

    __slots__ = ("_exemplar", "amount")

    def __init__(self, amount: float = 0.0) -> None:
        self.amount = amount  # the series' value
        self._exemplar: Any = None  # prometheus-client's exemplar slot (unused by pushsvc)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (event-loop thread only)."""
        self.amount += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        """Set the value (prometheus-client's value interface)."""
        self.amount = value

    def get(self) -> float:
        """The value (read at scrape time)."""
        return self.amount

    def set_exemplar(self, exemplar: Any) -> None:
        """prometheus-client's value interface."""
        self._exemplar = exemplar

    def get_exemplar(self) -> Any:
        """prometheus-client's value interface."""
        return self._exemplar

    @property
    def _value(self) -> LoopValue:
        """Itself: ``labels(t)._value.get()`` reads a child as with prometheus-client."""
        return self


def _lockless(value: Any) -> LoopValue:
    return value if isinstance(value, LoopValue) else LoopValue(value.get())


def loop_value(child: Any) -> LoopValue:
    """Give a counter child a :class:`LoopValue` (idempotent: one per child).

    Checked at import (below): prometheus-client keeps a child's value in
    ``_value``, a histogram's in ``_sum`` and the list ``_buckets``.
    """
    if not LOCKLESS:  # pragma: no cover - a prometheus-client change
        return _LockedValue(child)
    value = child._value = _lockless(child._value)
    return value


class LoopHistogram:
    """A histogram (without labels, or one child) observed without locks (event loop only).

    ``observe`` adds to the sum and to the first bucket whose bound is not
    below the value (a bisection), as prometheus-client does with a loop,
    three lock round trips and an exemplar check.
    """

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._bounds = list(histogram._upper_bounds)  # the last one is +Inf
        buckets = histogram._buckets
        buckets[:] = [_lockless(bucket) for bucket in buckets]
        self._buckets: list[LoopValue] = buckets
        self._sum = histogram._sum = _lockless(histogram._sum)

    def observe(self, amount: float, count: int = 1) -> None:
        """Record ``amount`` (seconds), ``count`` times."""
        self._sum.amount += amount * count
        self._buckets[bisect.bisect_left(self._bounds, amount)].amount += count


class _LockedValue(LoopValue):
    """The fallback when prometheus-client's internals moved: count through its own child."""

    __slots__ = ("_child",)

    def __init__(self, child: Any) -> None:  # no LoopValue.__init__: it would set amount
        self._exemplar = None
        self._child = child  # prometheus-client's child, with its lock

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` through prometheus-client."""
        self._child.inc(amount)

    @property  # the slot of LoopValue, through the child here
    def amount(self) -> float:
        """The value; ``amount += n`` (what the hot paths write) adds through the child."""
        return self.get()

    @amount.setter
    def amount(self, value: float) -> None:
        self._child.inc(value - self.get())

    def get(self) -> float:
        """The value, as prometheus-client holds it."""
        return float(self._child._value.get())


class _LockedHistogram(LoopHistogram):
    """The fallback when prometheus-client's internals moved: observe through it."""

    __slots__ = ("_histogram",)

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram  # prometheus-client's histogram, with its locks

    def observe(self, amount: float, count: int = 1) -> None:
        """Record ``amount`` through prometheus-client, ``count`` times."""
        for _ in range(count):
            self._histogram.observe(amount)


def _lockless_values_work() -> bool:
    """Whether prometheus-client still keeps values where :class:`LoopValue` puts them.

    When not (a prometheus-client release changed its internals), pushsvc
    logs a warning and counts through prometheus-client's own locked values:
    slower per message, never wrong.
    """
    registry = CollectorRegistry()
    counter = Counter("check", "", ["label"], registry=registry)
    histogram = Histogram("check_seconds", "", buckets=(1.0,), registry=registry)
    try:
        value = counter.labels("x")
        value._value = _lockless(value._value)
        value._value.inc(2)
        LoopHistogram(histogram).observe(0.5)
        return registry.get_sample_value("check_total", {"label": "x"}) == 2 and (
            registry.get_sample_value("check_seconds_bucket", {"le": "1.0"}) == 1
        )
    except Exception:  # pragma: no cover - a prometheus-client change
        return False


#: Whether the per-message series count without locks (:func:`loop_value`).
LOCKLESS = _lockless_values_work()
if not LOCKLESS:  # pragma: no cover - a prometheus-client change
    logging.getLogger("pushsvc.metrics").warning(
        "prometheus-client's internals changed: per-message metrics use its locked values "
        "(correct, slower); pushsvc.ops.metrics needs an update"
    )


def loop_histogram(histogram: Histogram) -> LoopHistogram:
    """A :class:`LoopHistogram` for ``histogram`` (or a child), or the locked fallback."""
    return LoopHistogram(histogram) if LOCKLESS else _LockedHistogram(histogram)


class TypedCounter:
    """A counter whose first label, the message ``type``, is kept to known types."""

    def __init__(self, counter: Counter, known: Callable[[str], bool]) -> None:
        self.counter = counter  # the registered series
        self._known = known  # whether a type may be a label value
        self._children: dict[tuple[str, ...], LoopValue] = {}  # label values -> child's value
        self._by_kind: dict[str, LoopValue] = {}  # the same, for counters of one label

    def count(self, kind: str) -> None:
        """Add one to the child for ``kind`` alone: ``labels(kind).inc()`` in one call."""
        child = self._by_kind.get(kind)
        if child is None:
            child = self.labels(kind)
            if len(self._by_kind) < MAX_CACHED_CHILDREN:
                self._by_kind[kind] = child
        child.amount += 1

    def labels(self, kind: str, *rest: str) -> LoopValue:
        """The value of the child for ``kind`` (:data:`OTHER_TYPE` when undeclared) and ``rest``.

        Children are cached: prometheus-client's own ``labels()`` costs about
        a microsecond, and this runs several times per frame. Event-loop
        thread only (:class:`LoopValue`).
        """
        key = (kind, *rest)
        child = self._children.get(key)
        if child is None:
            child = loop_value(
                self.counter.labels(kind if self._known(kind) else OTHER_TYPE, *rest)
            )
            if len(self._children) < MAX_CACHED_CHILDREN:
                self._children[key] = child
        return child

    def forget_children(self) -> None:
        """Drop cached children (the known types changed)."""
        self._children.clear()
        self._by_kind.clear()


class FrameCounts:
    """A frames counter and a bytes counter by ``type``, counted together (one lookup)."""

    def __init__(self, frames: TypedCounter, size: TypedCounter) -> None:
        self._frames = frames  # frames by type
        self._size = size  # their bytes by type
        self._pairs: dict[str, tuple[LoopValue, LoopValue]] = {}  # type -> both values

    def count(self, kind: str, size: int) -> None:
        """One frame of ``size`` bytes (event-loop thread only)."""
        pair = self._pairs.get(kind)
        if pair is None:
            pair = (self._frames.labels(kind), self._size.labels(kind))
            if len(self._pairs) < MAX_CACHED_CHILDREN:
                self._pairs[kind] = pair
        pair[0].amount += 1
        pair[1].amount += size

    def forget_children(self) -> None:
        """Drop cached values (the known types changed)."""
        self._pairs.clear()


class Observed(Protocol):
    """What the state gauges read at scrape time (implemented by the node)."""

    draining: bool  # shutdown began

    def message_types(self) -> Iterable[str]:
        """The registered message types (the ``type`` label's known values)."""
        ...

    def broker_healthy(self) -> bool:
        """Whether the broker reaches the other nodes."""
        ...

    def store_healthy(self) -> bool:
        """Whether the last store write succeeded."""
        ...

    def cluster_healthy(self) -> bool:
        """Whether the last call to the cluster registry succeeded."""
        ...

    def broker_stats(self) -> BrokerStats:
        """The broker's figures now."""
        ...

    def jwks_failures(self) -> int:
        """JWKS fetches that failed (0 without a JWKS URL)."""
        ...


#: Broker counters read at scrape time: series name (without ``_total``), help, field.
BROKER_COUNTERS = (
    (
        "pushsvc_broker_received",
        "Envelopes received from the broker (probes excluded).",
        "received",
    ),
    (
        "pushsvc_broker_published",
        "Envelopes published to the broker (probes excluded).",
        "published",
    ),
    (
        "pushsvc_broker_publish_errors",
        "Publishes the broker did not take (answered unavailable; timeouts included).",
        "publish_errors",
    ),
    (
        "pushsvc_broker_timeouts",
        "Broker publishes, connects and subscribes that gave up after broker.timeout.",
        "timeouts",
    ),
    (
        "pushsvc_broker_reconnects",
        "Broker subscriber connections re-established after a loss.",
        "reconnects",
    ),
    (
        "pushsvc_broker_resubscriptions",
        "Full resubscribes confirmed after a broker reconnect.",
        "resubscriptions",
    ),
)


class BrokerCollector(Collector):
    """The broker's figures as series, read from :meth:`Observed.broker_stats` at scrape time."""

    def __init__(self) -> None:
        self.service: Observed | None = None  # set by :meth:`Metrics.bind`

    def collect(self) -> Iterable[Metric]:
        """One sample per series; before :meth:`Metrics.bind`, the zero figures."""
        stats = self.service.broker_stats() if self.service is not None else BrokerStats()
        for name, doc, field in BROKER_COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(stats, field))
        yield GaugeMetricFamily(
            "pushsvc_broker_subscriptions",
            "Broker channels subscribed now (confirmed by the broker).",
            value=stats.subscriptions,
        )
        age = GaugeMetricFamily(
            "pushsvc_broker_last_message_age_seconds",
            "Seconds since the last message on the broker subscription (the probe arrives every"
            " broker.probe_interval); absent before the first.",
        )
        if stats.last_message_age is not None:
            age.add_metric([], stats.last_message_age)
        yield age

    def describe(self) -> Iterable[Metric]:
        """The series, without reading the broker (registration time)."""
        return self.collect()


class Metrics:
    """All pushsvc series, registered on ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = registry if registry is not None else CollectorRegistry()
        self._jwks_bound = False  # the JWKS failure collector is registered (by bind)
        self.known_types: set[str] = set(SERVER_TYPES)  # type label values (plus plugins')
        r = self.registry
        typed = self._typed_counter
        Info("pushsvc_build", "pushsvc version.", registry=r).info({"version": __version__})
        self.connections = Gauge("pushsvc_connections", "Open WebSocket connections.", registry=r)
        self.handshakes = Counter(
            "pushsvc_handshakes_total",
            "WebSocket handshakes by result (ok or the refusal's error code) and reason.",
            ["result", "reason"],
            registry=r,
        )
        self.frames_received = typed("pushsvc_frames_received_total", "Client frames received")
        self.received_bytes = typed("pushsvc_received_bytes_total", "Client frame bytes received")
        self.frames_sent = typed("pushsvc_frames_sent_total", "Frames sent to clients")
        self.sent_bytes = typed("pushsvc_sent_bytes_total", "Frame bytes sent to clients")
        self.received = FrameCounts(self.frames_received, self.received_bytes)  # per frame in
        self.sent = FrameCounts(self.frames_sent, self.sent_bytes)  # per frame out
        self.broadcast_recipients = Histogram(
            "pushsvc_broadcast_recipients",
            "Local connections one room broadcast (chat fan-out) went to.",
            buckets=FANOUT_BUCKETS,
            registry=r,
        )
        self.frame_errors = Counter(
            "pushsvc_frame_errors_total", "Error frames sent, by code.", ["code"], registry=r
        )
        self.rate_limited = Counter(
            "pushsvc_rate_limited_total",
            "Frames, handshakes or API calls refused by a rate limit, by bucket.",
            ["bucket"],
            registry=r,
        )
        self.closes = Counter(
            "pushsvc_closes_total", "Connections closed, by reason.", ["reason"], registry=r
        )
        self.plugin_errors = Counter(
            "pushsvc_plugin_errors_total",
            "Exceptions raised by plugins, by plugin and hook (or message_handler, route).",
            ["plugin", "hook"],
            registry=r,
        )
        self.messages_accepted = typed(
            "pushsvc_messages_accepted_total", "Messages accepted (persisted when at-least-once)"
        )
        self.messages_delivered = typed(
            "pushsvc_messages_delivered_total", "Messages written to a client connection"
        )
        self.messages_acked = typed(
            "pushsvc_messages_acked_total", "At-least-once messages settled by an ack"
        )
        self.messages_redelivered = typed(
            "pushsvc_messages_redelivered_total",
            "At-least-once messages sent again (retry or reconnect)",
        )
        self.messages_dead_lettered = typed(
            "pushsvc_messages_dead_lettered_total",
            "At-least-once messages given up (reason: max_attempts or ttl)",
            "reason",
        )
        self.acks_ignored = Counter(
            "pushsvc_acks_ignored_total",
            "Ack ids that settled nothing, by reason.",
            ["reason"],
            registry=r,
        )
        self.pending_messages = Gauge(
            "pushsvc_pending_messages", "Unacked at-least-once deliveries in the store.", registry=r
        )
        self.oldest_pending_age = Gauge(
            "pushsvc_oldest_pending_age_seconds", "Age of the oldest unacked delivery.", registry=r
        )
        self.ack_latency = Histogram(
            "pushsvc_ack_latency_seconds",
            "From a message's (last) send on a connection to its ack.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_latency_loop = loop_histogram(self.ack_latency)  # what delivery observes
        self.store_seconds = Histogram(
            "pushsvc_store_operation_seconds",
            "Store operation latency as the caller sees it (queue and group commit).",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "pushsvc_store_errors_total", "Store operations that failed.", ["operation"], registry=r
        )
        self.history_recoveries = Counter(
            "pushsvc_history_recoveries_total",
            "Joins that asked to resume a room, by outcome (recovered or the reason).",
            ["outcome"],
            registry=r,
        )
        self.history_replayed = Counter(
            "pushsvc_history_replayed_total",
            "Room publications sent from the history, by source (resume, repair).",
            ["source"],
            registry=r,
        )
        self.history_gaps_repaired = Counter(
            "pushsvc_history_gaps_repaired_total",
            "Offset gaps in a room's feed filled from the history on live connections.",
            registry=r,
        )
        self.history_lost = Counter(
            "pushsvc_history_lost_total",
            "Room publications missed by this node and not found in the history.",
            registry=r,
        )
        self.history_duplicates = Counter(
            "pushsvc_history_duplicates_total",
            "Room publications dropped because this node had delivered their offset already.",
            registry=r,
        )
        self.history_append_failures = Counter(
            "pushsvc_history_append_failures_total",
            "Room publications sent live only because the history append failed.",
            registry=r,
        )
        self.history_entries = Gauge(
            "pushsvc_history_entries", "Room publications kept in the history.", registry=r
        )
        self.history_rooms = Gauge(
            "pushsvc_history_rooms", "Rooms with a history (an epoch) in the store.", registry=r
        )
        self.broker_up = Gauge("pushsvc_broker_up", "1 while the broker is connected.", registry=r)
        self.cluster_up = Gauge(
            "pushsvc_cluster_up",
            "1 while the last call to the cluster registry (caps, presence) succeeded.",
            registry=r,
        )
        self.cluster_errors = Counter(
            "pushsvc_cluster_errors_total",
            "Cluster registry calls that failed or timed out (a reserve: let in, fail open).",
            ["operation"],
            registry=r,
        )
        self.draining = Gauge(
            "pushsvc_draining", "1 while the node drains for shutdown.", registry=r
        )
        self.ready = Gauge(
            "pushsvc_ready",
            "1 while /readyz would answer 200 (last store write ok, broker up, not draining).",
            registry=r,
        )
        self.broker = BrokerCollector()  # the pushsvc_broker_* figures
        r.register(self.broker)
        self.loop_lag = Histogram(
            "pushsvc_event_loop_lag_seconds",
            "How late a 0.5 s timer fired on the event loop.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_requests = Counter(
            "pushsvc_push_requests_total", "Web Push requests by result.", ["result"], registry=r
        )
        self.push_seconds = Histogram(
            "pushsvc_push_request_seconds",
            "Web Push request latency (the push service's answer).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_latency = Histogram(
            "pushsvc_push_latency_seconds",
            "From a push entering the queue to the push service accepting it (last attempt).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_dropped = Counter(
            "pushsvc_push_dropped_total", "Pushes given up, by reason.", ["reason"], registry=r
        )
        self.push_subscriptions = Gauge(
            "pushsvc_push_subscriptions", "Web Push subscriptions stored.", registry=r
        )
        self.push_subscriptions_deleted = Counter(
            "pushsvc_push_subscriptions_deleted_total",
            "Web Push subscriptions deleted, by reason.",
            ["reason"],
            registry=r,
        )
        self.push_subscribe_refused = Counter(
            "pushsvc_push_subscribe_refused_total",
            "push_subscribe refused, by reason.",
            ["reason"],
            registry=r,
        )
        for series, values in (
            (self.push_requests, PUSH_RESULTS),
            (self.push_dropped, PUSH_DROP_REASONS),
            (self.push_subscriptions_deleted, PUSH_DELETE_REASONS),
            (self.push_subscribe_refused, PUSH_REFUSE_REASONS),
        ):
            for value in values:
                series.labels(value)
        self.handshakes.labels("ok", NO_REASON)
        for reason in CLOSE_REASONS:
            self.closes.labels(reason)
        for bucket in RATE_LIMIT_BUCKETS:
            self.rate_limited.labels(bucket)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for outcome in RECOVERY_OUTCOMES:
            self.history_recoveries.labels(outcome)
        for source in REPLAY_SOURCES:
            self.history_replayed.labels(source)

    def _typed_counter(self, name: str, doc: str, *labels: str) -> TypedCounter:
        """A counter labelled by message ``type`` (then ``labels``)."""
        counter = Counter(name, f"{doc}, by type.", ["type", *labels], registry=self.registry)
        return TypedCounter(counter, self.known_types.__contains__)

    def handshake(self, result: str, reason: str = "") -> None:
        """Count a handshake: ``ok``, or a refusal's error code and reason."""
        self.handshakes.labels(
            code_label(result), code_label(reason) if reason else NO_REASON
        ).inc()

    def bind(self, service: Observed) -> None:
        """Read the state gauges from ``service`` at scrape time; learn its message types."""
        self.known_types.update(service.message_types())
        for series in vars(self).values():
            if isinstance(series, TypedCounter | FrameCounts):
                series.forget_children()  # looked up before the plugin types were known
        self.broker_up.set_function(lambda: float(service.broker_healthy()))
        self.cluster_up.set_function(lambda: float(service.cluster_healthy()))
        self.broker.service = service
        self.draining.set_function(lambda: float(service.draining))
        self.ready.set_function(
            lambda: float(
                service.store_healthy() and service.broker_healthy() and not service.draining
            )
        )
        if not self._jwks_bound:
            self.registry.register(_JwksFailures(service))
            self._jwks_bound = True

    def instrument_store(self, store: Store) -> Store:
        """``store`` with every async operation timed and its failures counted."""
        return cast("Store", _TimedStore(store, self))

    async def watch_loop_lag(self, interval: float = 0.5) -> None:
        """Measure event-loop lag forever (run as a task)."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, time.monotonic() - start - interval))


class _JwksFailures:
    """``pushsvc_jwks_fetch_failures_total``, read from the node at scrape time."""

    def __init__(self, service: Observed) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []  # nothing is read at registration

    def collect(self) -> Iterable[CounterMetricFamily]:
        """One sample: the failed fetches of the JWKS cache in force."""
        yield CounterMetricFamily(
            "pushsvc_jwks_fetch_failures",
            "JWKS fetches that failed (down, slow, garbage); the cached keys stay in use.",
            value=self.service.jwks_failures(),
        )


class _TimedStore:
    """Wraps a store: each coroutine method is timed under its own name.

    Any method a store implementation adds is timed without a change here;
    other attributes pass through unchanged. A store whose ``self_timed``
    operations return a future (no coroutine to await in a wrapper) gets a
    recorder through ``time_operations(record)`` and reports them as they
    settle: the same series, one coroutine layer less per message.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner  # the real store
        self._metrics = metrics
        self._self_timed: frozenset[str] = frozenset(getattr(inner, "self_timed", ()))
        self._timed_series: dict[str, tuple[LoopHistogram, Any]] = {}  # name -> (seconds, errors)
        if self._self_timed:
            inner.time_operations(self._record)  # type: ignore[attr-defined]

    def _record(self, name: str, seconds: float, failed: bool, count: int) -> None:
        """``count`` self-timed operations settled: observe their latency, or count failures."""
        series = self._timed_series.get(name)
        if series is None:
            series = self._timed_series[name] = (
                loop_histogram(self._metrics.store_seconds.labels(name)),
                self._metrics.store_errors.labels(name),
            )
        if failed:
            series[1].inc(count)
        else:
            series[0].observe(seconds, count)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in self._self_timed:
            self.__dict__[name] = attr  # timed by the store as it settles
            return attr
        if name.startswith("_") or name in _STORE_LIFECYCLE:
            return attr
        if not inspect.iscoroutinefunction(attr):
            return attr
        seconds = loop_histogram(self._metrics.store_seconds.labels(name))
        errors = self._metrics.store_errors.labels(name)

        @functools.wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await attr(*args, **kwargs)
            except Exception:
                errors.inc()
                raise
            seconds.observe(time.perf_counter() - started)
            return result

        self.__dict__[name] = timed  # wrap once
        return timed
