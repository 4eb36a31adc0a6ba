"""Wiring: builds the node from the config and serves it until told to stop.

Startup order: plugins, store, broker, node, HTTP application, listening
socket, then READY (systemd). Shutdown (SIGTERM): refuse new work, close
connections with 1001 spread over ``server.drain_seconds``, finish writes,
exit 0. A second SIGTERM or SIGINT skips the pacing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry

from pushsvc import api, logs, sdnotify
from pushsvc import config as config_module
from pushsvc.broker import make_broker
from pushsvc.config import Config
from pushsvc.errors import CloseCode
from pushsvc.handler import WebSocketHandler
from pushsvc.metrics import Metrics
from pushsvc.node import Node
from pushsvc.plugins import Plugins, await_me_maybe, load_plugins
from pushsvc.store import make_store

log = logging.getLogger("pushsvc.app")


def make_app(node: Node) -> tornado.web.Application:
    """The Tornado application: ``/ws``, the HTTP API, metrics, health, plugin routes."""
    routes: list[Any] = [(r"/ws", WebSocketHandler, {"node": node}), *api.routes(node)]
    for rules in node.plugins.hook.pushsvc_register_routes():
        for pattern, handler, kwargs in rules:
            kwargs = {k: (node if k == "node" and v is None else v) for k, v in kwargs.items()}
            routes.append((pattern, handler, kwargs))
    return tornado.web.Application(
        routes,
        log_function=logs.access_log if node.config.log.access_log else lambda handler: None,
        websocket_max_message_size=node.config.server.max_message_bytes,
        xheaders=node.config.server.xheaders,
    )


@dataclass
class Service:
    """A running pushsvc: the node, its HTTP server and its timers."""

    config: Config
    node: Node
    server: tornado.httpserver.HTTPServer
    sockets: list[socket.socket]
    config_path: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _timers: list[asyncio.Task[Any]] = field(default_factory=list)
    _signals: int = 0

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        return int(self.sockets[0].getsockname()[1])

    def start_timers(self) -> None:
        """Start the shared timers (keepalive, retries, sweeps, loop lag, watchdog)."""
        node = self.node
        self._timers = [
            asyncio.ensure_future(_every(node.keepalive.tick_interval(), node.keepalive.tick)),
            asyncio.ensure_future(_every(0.05, node.delivery.tick)),
            asyncio.ensure_future(_every_async(5.0, node.delivery.sweep)),
            asyncio.ensure_future(_every(60.0, self._prune)),
            asyncio.ensure_future(node.metrics.watch_loop_lag()),
        ]
        interval = sdnotify.watchdog_interval()
        if interval:
            self._timers.append(asyncio.ensure_future(_every(interval, self._watchdog)))

    def _prune(self) -> None:
        import time

        now = time.monotonic()
        self.node.user_buckets.prune(now)
        self.node.handshake_buckets.prune(now)

    def _watchdog(self) -> None:
        sdnotify.notify("WATCHDOG=1", f"STATUS=serving {len(self.node.hub.sessions)} connections")

    def install_signals(self) -> None:
        """SIGTERM/SIGINT drain then exit; a second one exits at once; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _on_stop_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self.node.track(asyncio.ensure_future(self.shutdown()))
        else:
            log.warning("second stop signal: closing without pacing")
            self.node.track(asyncio.ensure_future(self.shutdown(pace=False)))

    def reload(self) -> None:
        """Re-read the config; apply reloadable keys, log the rest, keep the old on error."""
        sdnotify.notify("RELOADING=1")
        try:
            new = config_module.load(self.config_path, overrides=self.overrides)
            new.secret()
        except (config_module.ConfigError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            sdnotify.notify("READY=1")
            return
        reloadable, restart = config_module.changed_keys(self.config, new)
        for key in restart:
            log.warning("config key %s changed: takes effect after a restart", key)
        applied = self.node.apply_config(new, reloadable)
        self.config = self.node.config
        if reloadable:
            logs.set_level(self.config.log.level)
            log.info("reloaded: %s", ", ".join(applied) or "nothing")
        else:
            log.info("reloaded: no reloadable key changed")
        sdnotify.notify("READY=1")

    async def shutdown(self, pace: bool = True) -> None:
        """Drain and stop: 503 for new work, paced 1001 closes, finish writes."""
        node = self.node
        if not node.draining:
            node.draining = True
            node.metrics.draining.set(1)
            sdnotify.notify("STOPPING=1")
            log.info(
                "draining %d connections over %.1fs",
                len(node.hub.sessions),
                node.config.server.drain_seconds,
            )
        drain = node.config.server.drain_seconds if pace else 0.0
        clients = list(node.hub.all_clients())
        step = drain / len(clients) if clients and drain else 0.0
        for index, client in enumerate(clients):
            if self._signals > 1 and pace:
                return  # a faster shutdown took over
            # Suggest a reconnect delay that spreads the reconnects over the drain window.
            delay = round(max(1.0, drain - index * step), 1)
            client.close_with(
                CloseCode.GOING_AWAY, f"server draining; reconnect in {delay}s", "drain"
            )
            if step:
                await asyncio.sleep(step)
        await asyncio.sleep(0.2)  # let close frames go out
        self.server.stop()
        await node.delivery.drain()
        for timer in self._timers:
            timer.cancel()
        await await_me_maybe(node.plugins.hook.pushsvc_shutdown(node=node))
        await node.broker.close()
        await node.store.close()
        self.stopped.set()


async def _every(interval: float, fn: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            fn()
        except Exception:
            log.exception("timer %s failed", getattr(fn, "__qualname__", fn))


async def _every_async(interval: float, fn: Callable[[], Any]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()
        except Exception as exc:
            log.warning("timer %s failed: %s", getattr(fn, "__qualname__", fn), exc)


async def start(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    plugins: Plugins | None = None,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    sockets: list[socket.socket] | None = None,
) -> Service:
    """Build and start a service (listening when this returns)."""
    plugins = plugins or load_plugins(config.plugins.disabled, config.auth.default_rooms)
    metrics = Metrics(registry)
    store = make_store(
        config.store_url(),
        synchronous=config.store.synchronous,
        batch_max=config.store.batch_max,
        busy_timeout=config.store.busy_timeout,
    )
    await store.open()
    broker = make_broker(config.broker.url)
    await broker.start()
    metrics.broker_up.set(1 if broker.healthy() else 0)
    node = Node(config, metrics, plugins, broker, store)
    await await_me_maybe(plugins.hook.pushsvc_startup(node=node))
    app = make_app(node)
    server = tornado.httpserver.HTTPServer(app, xheaders=config.server.xheaders)
    if sockets is None:
        sockets = sdnotify.listen_fds() or tornado.netutil.bind_sockets(
            config.server.port, config.server.host, backlog=4096
        )
    server.add_sockets(sockets)
    service = Service(config, node, server, sockets, config_path, overrides or {})
    service.start_timers()
    return service
