"""Prometheus metrics: every series pushsvc exports, on an injected registry.

No label carries a user id, room name, session or anything else unbounded:
``type`` is a registered message type or core command (``unknown`` for
anything else), and every other label has a fixed set of values listed here.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pushsvc import __version__

HANDSHAKE_RESULTS = (
    "ok",
    "unauthorized",
    "forbidden_origin",
    "too_many_connections",
    "handshake_rate",
    "unavailable",
)
CLOSE_REASONS = (
    "client",
    "rate_abuse",
    "slow_consumer",
    "token_expired",
    "oversize",
    "heartbeat",
    "api",
    "drain",
    "internal",
)
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


class Metrics:
    """All pushsvc series, registered on ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("pushsvc_build", "pushsvc version.", registry=r).info({"version": __version__})
        self.connections = Gauge("pushsvc_connections", "Open WebSocket connections.", registry=r)
        self.handshakes = Counter(
            "pushsvc_handshakes_total", "WebSocket handshakes by result.", ["result"], registry=r
        )
        self.frames_received = Counter(
            "pushsvc_frames_received_total", "Client frames received by type.", ["type"], registry=r
        )
        self.received_bytes = Counter(
            "pushsvc_received_bytes_total",
            "Client frame bytes received by type.",
            ["type"],
            registry=r,
        )
        self.frames_sent = Counter(
            "pushsvc_frames_sent_total", "Frames sent to clients by type.", ["type"], registry=r
        )
        self.sent_bytes = Counter(
            "pushsvc_sent_bytes_total", "Frame bytes sent to clients by type.", ["type"], registry=r
        )
        self.broadcast_recipients = Histogram(
            "pushsvc_broadcast_recipients",
            "Local connections one room broadcast went to.",
            buckets=(1, 10, 100, 1000, 10000, 100000),
            registry=r,
        )
        self.frame_errors = Counter(
            "pushsvc_frame_errors_total", "Error frames sent, by code.", ["code"], registry=r
        )
        self.rate_limited = Counter(
            "pushsvc_rate_limited_total",
            "Frames or handshakes refused by a rate limit, by bucket.",
            ["bucket"],
            registry=r,
        )
        self.closes = Counter(
            "pushsvc_closes_total", "Connections closed, by reason.", ["reason"], registry=r
        )
        self.plugin_errors = Counter(
            "pushsvc_plugin_errors_total",
            "Exceptions raised by plugin handlers.",
            ["plugin"],
            registry=r,
        )
        self.messages_accepted = Counter(
            "pushsvc_messages_accepted_total",
            "Messages accepted (persisted when at-least-once).",
            ["type"],
            registry=r,
        )
        self.messages_delivered = Counter(
            "pushsvc_messages_delivered_total",
            "Messages written to a client connection.",
            ["type"],
            registry=r,
        )
        self.messages_acked = Counter(
            "pushsvc_messages_acked_total",
            "At-least-once messages settled by an ack.",
            ["type"],
            registry=r,
        )
        self.messages_redelivered = Counter(
            "pushsvc_messages_redelivered_total",
            "At-least-once messages sent again (retry or reconnect).",
            ["type"],
            registry=r,
        )
        self.messages_dead_lettered = Counter(
            "pushsvc_messages_dead_lettered_total",
            "At-least-once messages given up, by reason.",
            ["type", "reason"],
            registry=r,
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
            "From a message's send to its ack.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "pushsvc_store_operation_seconds",
            "Store operation latency (one group commit).",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "pushsvc_store_errors_total", "Store operations that failed.", ["operation"], registry=r
        )
        self.broker_up = Gauge("pushsvc_broker_up", "1 while the broker is connected.", registry=r)
        self.draining = Gauge(
            "pushsvc_draining", "1 while the node drains for shutdown.", registry=r
        )
        self.loop_lag = Histogram(
            "pushsvc_event_loop_lag_seconds",
            "How late a 0.5 s timer fired on the event loop.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for result in HANDSHAKE_RESULTS:
            self.handshakes.labels(result)
        for reason in CLOSE_REASONS:
            self.closes.labels(reason)

    async def watch_loop_lag(self, interval: float = 0.5) -> None:
        """Measure event-loop lag forever (run as a task)."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, time.monotonic() - start - interval))
