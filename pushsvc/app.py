"""Wiring: builds the node from the config and serves it until told to stop.

Startup order: plugins, store, broker, node, HTTP application, listening
socket (adopted from systemd socket activation when present), then the
caller reports READY to systemd.

Shutdown (SIGTERM or SIGINT), in :meth:`Service.shutdown`:

1. refuse new work at once: ``/readyz`` answers 503, WebSocket upgrades get
   503 ``draining``; ``STOPPING=1`` goes to systemd;
2. close the open connections with 1001, spread evenly over
   ``server.drain_seconds``; each close reason suggests a reconnect delay
   (:func:`drain_reason`) so that the reconnects stay spread too;
3. stop listening, let HTTP requests in progress (an accepted ``notify``)
   answer, finish background work and the store's queued writes, exit 0.

A second stop signal during the drain closes the rest at once (still with
1001 and spread reconnect delays) and goes on with step 3: nothing accepted
is lost. SIGHUP re-reads the config (:meth:`Service.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry

from pushsvc import config as config_module
from pushsvc.auth.tokens import Authenticator
from pushsvc.broker import REVOCATIONS_CHANNEL, make_broker
from pushsvc.cluster import RegistryOptions, make_registry
from pushsvc.config import Config, ConfigError
from pushsvc.core.node import Node
from pushsvc.http import routes as http_routes
from pushsvc.http.health import NotFoundHandler
from pushsvc.ops import logs, sdnotify
from pushsvc.ops.metrics import Metrics
from pushsvc.plugin.manager import DefaultRoomPolicy, Plugins, await_each, load_plugins
from pushsvc.protocol.disconnects import DISCONNECTS
from pushsvc.push.keys import VapidKeyError, VapidKeys
from pushsvc.push.sender import Sender
from pushsvc.store import PushSubscriptionStore, StoreOptions, make_store
from pushsvc.transport.pacing import pacer
from pushsvc.transport.upgrade import UpgradeServer

log = logging.getLogger("pushsvc.app")

#: Seconds a restarted pushsvc needs to listen again; added to the reconnect
#: delays suggested in drain close reasons.
RESTART_ALLOWANCE_SECONDS = 1.0
#: Seconds to wait for peers to answer the drain's close frames.
CLOSE_GRACE_SECONDS = 2.0
#: Seconds to wait, once the drain is over, for HTTP requests in progress.
REQUEST_GRACE_SECONDS = 5.0
#: Seconds to wait for background work (disconnect bookkeeping, refills).
BACKGROUND_GRACE_SECONDS = 5.0
#: Seconds between ``STATUS=`` updates when systemd's watchdog is off.
STATUS_INTERVAL_SECONDS = 5.0
#: Seconds between checks while waiting for a condition during shutdown.
_POLL_SECONDS = 0.02
#: Listen backlog when pushsvc binds its own socket.
LISTEN_BACKLOG = 4096
#: Name under which load_plugins registers the built-in room policy.
DEFAULT_ROOM_POLICY = "pushsvc.default_room_policy"
_TIMER_INTERVALS = {
    "delivery_sweep": 5.0,
    "history_trim": 5.0,
    "prune": 60.0,
}


def drain_reason(delay: float) -> str:
    """The close reason of a drain close: ``server draining; reconnect in 2.5s``.

    Clients may parse the delay with ``reconnect in ([0-9.]+)s`` (docs/protocol.md,
    "Close reasons").
    """
    return f"server draining; reconnect in {delay:.1f}s"


def secret_missing(config: Config) -> bool:
    """Whether HS256 tokens are expected but no secret (and no other key) is configured."""
    return (
        not config.secret()
        and "HS256" in config.auth.algorithms
        and not (config.auth.public_key_file or config.auth.jwks_url)
    )


class _TrackedRequest(tornado.httputil.HTTPMessageDelegate):
    """Wraps Tornado's request dispatcher to note when a request has begun."""

    def __init__(
        self,
        inner: tornado.httputil.HTTPMessageDelegate,
        connection: tornado.httputil.HTTPConnection,
        in_progress: set[tornado.httputil.HTTPConnection],
    ) -> None:
        self.inner = inner  # Tornado's dispatcher
        self.connection = connection  # the request's connection (the tracking key)
        self.in_progress = in_progress  # the application's set of unanswered requests

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        """A request arrived: it is in progress until answered."""
        self.in_progress.add(self.connection)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """Pass body bytes on."""
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        """The request was read; the handler runs."""
        self.inner.finish()

    def on_connection_close(self) -> None:
        """The peer went away before the answer."""
        self.in_progress.discard(self.connection)
        self.inner.on_connection_close()


class Application(tornado.web.Application):
    """Tornado's application, counting requests not yet answered (for shutdown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress: set[tornado.httputil.HTTPConnection] = set()  # unanswered requests

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        """Track the request from its headers to its answer."""
        inner = super().start_request(server_conn, request_conn)
        return _TrackedRequest(inner, request_conn, self.in_progress)

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        """Called once the answer was written (101 for WebSocket upgrades)."""
        self.in_progress.discard(handler.request.connection)
        super().log_request(handler)


def make_app(node: Node, *, dev: bool = False) -> Application:
    """The Tornado application: ``/ws``, the HTTP API, metrics, health, plugin routes.

    The route table (and the OpenAPI document) is built once, here
    (:func:`pushsvc.http.routes.build`); ``dev`` adds the ``--dev`` routes.
    """
    table = http_routes.build(node, dev=dev)
    return Application(
        list(table.rules),
        log_function=logs.access_log if node.config.log.access_log else lambda handler: None,
        websocket_max_message_size=node.config.server.max_message_bytes,
        xheaders=node.config.server.xheaders,
        default_handler_class=NotFoundHandler,
        default_handler_args={"node": node},
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
    app: Application | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0  # what ``pushsvc serve`` exits with once stopped
    _timers: list[asyncio.Task[Any]] = field(default_factory=list)
    _hurry: asyncio.Event = field(default_factory=asyncio.Event)  # skip the pacing
    _shutdown: asyncio.Task[None] | None = None
    _watchdog: bool = False  # systemd expects WATCHDOG=1 pings

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        return int(self.sockets[0].getsockname()[1])

    # -- timers -------------------------------------------------------------------

    def start_timers(self) -> None:
        """Start the shared timers (keepalive, retries, sweeps, loop lag, systemd)."""
        node = self.node
        node.delivery.start_timer()  # resends: a timer armed for the earliest due one
        self._timers = [
            asyncio.ensure_future(_every(node.keepalive.tick_interval(), node.keepalive.tick)),
            asyncio.ensure_future(
                _every_async(_TIMER_INTERVALS["delivery_sweep"], node.delivery.sweep)
            ),
            asyncio.ensure_future(
                _every_async(_TIMER_INTERVALS["history_trim"], node.trim_history)
            ),
            asyncio.ensure_future(_every(_TIMER_INTERVALS["prune"], self._prune)),
            asyncio.ensure_future(node.metrics.watch_loop_lag()),
        ]
        # On the event loop, not a thread: a blocked loop stops the pings and
        # systemd's watchdog restarts the service.
        watchdog = sdnotify.watchdog_interval()
        interval = watchdog or STATUS_INTERVAL_SECONDS
        self._timers.append(asyncio.ensure_future(_every(interval, self._systemd_tick)))
        self._watchdog = watchdog is not None

    def _prune(self) -> None:
        now = time.monotonic()
        self.node.user_buckets.prune(now)
        self.node.handshake_buckets.prune(now)
        self.node.api_buckets.prune(now)
        for buckets in self.node.type_buckets.values():
            buckets.prune(now)

    def status(self) -> str:
        """The ``STATUS=`` line for systemd: what the service does and its connection count."""
        state = "draining" if self.node.draining else "serving"
        return f"STATUS={state} {len(self.node.hub.sessions)} connections"

    def _systemd_tick(self) -> None:
        if self._watchdog:
            sdnotify.notify("WATCHDOG=1", self.status())
        else:
            sdnotify.notify(self.status())

    # -- signals --------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM/SIGINT drain then exit; a second one skips the pacing; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._shutdown is None:
            log.info("%s: shutting down", name)
            self._start_shutdown()
        elif not self._hurry.is_set():
            log.warning("%s again: closing the remaining connections at once", name)
            self._hurry.set()
        else:
            log.warning("%s: already shutting down without pacing", name)

    # -- reload ---------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; apply reloadable keys, log the rest, keep the old on error."""
        if self.node.draining:
            log.warning("reload ignored: shutting down")
            return
        sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self._reload()
        except Exception:
            log.exception("reload failed; the service keeps running")
        finally:
            sdnotify.notify("READY=1", self.status())

    def _reload(self) -> None:
        try:
            new = self._load_new_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        reloadable, restart = config_module.changed_keys(self.config, new)
        for key in restart:
            log.warning("config key %s changed: takes effect after a restart", key)
        if new.secret() != self.node.authenticator.secret and not any(
            key in reloadable for key in ("auth.jwt_secret", "auth.jwt_secret_file")
        ):
            reloadable.append("auth.jwt_secret_file")  # same file, new contents
        applied = self.node.apply_config(new, reloadable)
        self.config = self.node.config
        if "auth.default_rooms" in applied:
            policy = self.node.plugins.manager.get_plugin(DEFAULT_ROOM_POLICY)
            if isinstance(policy, DefaultRoomPolicy):
                policy.default_rooms = tuple(self.config.auth.default_rooms)
        logs.set_level(self.config.log.level)
        log.info("reloaded: %s", ", ".join(applied) if applied else "no reloadable key changed")

    def _load_new_config(self) -> Config:
        """Load and check the config file again (raises ConfigError naming the key)."""
        new = config_module.load(self.config_path, overrides=self.overrides)
        new = new.with_plugin_schemas(self.node.plugins.config_schemas)
        if secret_missing(new):
            raise ConfigError("auth.jwt_secret", "no JWT secret (nor public key) configured")
        try:
            Authenticator(new.auth, new.secret())  # reads auth.public_key_file
        except OSError as exc:
            raise ConfigError("auth.public_key_file", f"cannot read: {exc.strerror}") from exc
        return new

    # -- shutdown -------------------------------------------------------------------

    async def shutdown(self, pace: bool = True) -> None:
        """Drain and stop: 503 for new work, paced 1001 closes, finish writes.

        Calling it again (or a second signal) while it runs skips the rest of
        the pacing. Returns once everything is closed (``stopped`` is set).
        """
        if not pace:
            self._hurry.set()
        task = self._shutdown or self._start_shutdown()
        await asyncio.shield(task)

    def _start_shutdown(self) -> asyncio.Task[None]:
        self._shutdown = asyncio.ensure_future(self._shutdown_steps())
        return self._shutdown

    async def _shutdown_steps(self) -> None:
        started = time.monotonic()
        try:
            self._refuse_new_work()
            await self._close_connections()
            await self._finish_work()
        except Exception:
            log.exception("shutdown failed")
            self.exit_code = 1
        finally:
            log.info("shut down in %.1fs", time.monotonic() - started)
            self.stopped.set()

    def _refuse_new_work(self) -> None:
        node = self.node
        node.draining = True  # /readyz and upgrades answer 503 from now on
        node.metrics.draining.set(1)
        sdnotify.notify("STOPPING=1", self.status())
        log.info(
            "draining %d connections over %.1fs",
            len(node.hub.sessions),
            0.0 if self._hurry.is_set() else node.config.server.drain_seconds,
        )

    async def _close_connections(self) -> None:
        """Close every connection with 1001, spread over ``server.drain_seconds``.

        Client ``i`` of ``n`` has the slot ``i * drain / n``. Paced, it closes
        at its slot and is told to come back after ``drain`` plus the restart
        allowance: the reconnects reach the next process in the order and at
        the pace of the closes. Hurried, the rest close at once and are told
        ``allowance + (slot - now)``: their reconnects keep the spacing.
        """
        node = self.node
        drain = node.config.server.drain_seconds
        clients = list(node.hub.all_clients())
        step = drain / len(clients) if clients else 0.0
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for index, client in enumerate(clients):
            slot = index * step
            if not self._hurry.is_set():
                await self._sleep_unless_hurried(begin + slot - loop.time())
            if self._hurry.is_set():
                delay = RESTART_ALLOWANCE_SECONDS + max(0.0, slot - (loop.time() - begin))
            else:
                delay = drain + RESTART_ALLOWANCE_SECONDS
            client.close(DISCONNECTS.going_away.because(drain_reason(delay)))
        # Handshakes that were past the draining check when it began.
        for client in list(node.hub.all_clients()):
            client.close(DISCONNECTS.going_away.because(drain_reason(RESTART_ALLOWANCE_SECONDS)))
        await _wait_until(lambda: not node.hub.sessions, CLOSE_GRACE_SECONDS)

    async def _sleep_unless_hurried(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), seconds)

    async def _finish_work(self) -> None:
        """Stop listening, answer requests in progress, flush the store, stop timers."""
        node = self.node
        self.server.stop()  # closes the listening sockets
        if self.app is not None:
            app = self.app
            if not await _wait_until(lambda: not app.in_progress, REQUEST_GRACE_SECONDS):
                log.warning("%d HTTP requests unanswered at shutdown", len(app.in_progress))
        await self.server.close_all_connections()  # idle keep-alive connections
        await _bounded(pacer().drained(), "paced connection work")
        await _bounded(node.settle_background(), "background tasks")
        await _bounded(node.delivery.drain(), "delivery bookkeeping")
        if node.push is not None:
            await node.push.close()  # pushes not sent yet are forgotten: the inbox has them
        node.delivery.stop_timer()
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        await node.plugins.call_each("pushsvc_shutdown", node=node)  # each one, errors logged
        await node.cluster.close()  # this node's connections and members leave at once
        await node.broker.close()
        await node.store.close()  # runs every queued write first


def _set_nodelay(sockets: list[socket.socket]) -> None:
    """Set TCP_NODELAY on TCP listeners: accepted sockets inherit it (Linux)."""
    for listener in sockets:
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll ``done`` until it is true or ``seconds`` pass; returns its last value."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_SECONDS)
    return True


async def _bounded(work: Awaitable[Any], what: str) -> None:
    try:
        await asyncio.wait_for(work, BACKGROUND_GRACE_SECONDS)
    except TimeoutError:
        log.warning("shutdown: %s did not finish within %.0fs", what, BACKGROUND_GRACE_SECONDS)


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


async def build_node(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    plugins: Plugins | None = None,
) -> Node:
    """Build the node from the config and open its store and broker (no HTTP, no timers).

    Order: plugins, metrics, store, broker, cluster registry, node,
    revocations, the plugins' ``pushsvc_startup`` hooks. A transport, a test
    or a tool builds on this; :func:`start` adds the HTTP application, the
    listening sockets and the timers.
    """
    plugins = plugins or load_plugins(config.plugins.disabled, config.auth.default_rooms)
    config = config.with_plugin_schemas(plugins.config_schemas)  # [plugins.<name>] tables
    keys = push_keys(config) if config.push.enabled else None  # a bad key stops us here
    metrics = Metrics(registry)
    store = make_store(
        config.store_url(),
        StoreOptions(
            synchronous=config.store.synchronous,
            batch_max=config.store.batch_max,
            busy_timeout=config.store.busy_timeout,
        ),
    )
    await store.open()
    store = metrics.instrument_store(store)
    broker = make_broker(
        config.broker.url,
        timeout=config.broker.timeout,
        probe_interval=config.broker.probe_interval,
    )
    await broker.start()
    metrics.broker_up.set(1 if broker.healthy() else 0)
    errors = metrics.cluster_errors
    cluster = make_registry(
        config.cluster_url(),
        RegistryOptions(
            node_ttl=config.cluster.node_ttl,
            timeout=config.cluster.timeout,
            on_error=lambda operation: errors.labels(operation).inc(),
        ),
    )
    await cluster.start()
    node = Node(config, metrics, plugins, broker, store, cluster)
    metrics.bind(node)
    await broker.subscribe(REVOCATIONS_CHANNEL)  # before the load: none is missed in between
    await node.revocations.load()
    if keys is not None:
        await _enable_push(node, config, keys)
    await await_each(plugins.hook.pushsvc_startup(node=node))
    return node


def check_push(config: Config) -> None:
    """Check the ``[push]`` keys that need no I/O (``check-config``); raises ConfigError."""
    if config.push.enabled and not config.push.subject.startswith(("mailto:", "https://")):
        raise ConfigError("push.subject", "a mailto: or https:// contact is required")


def push_keys(config: Config) -> VapidKeys:
    """The VAPID keys ``push.*`` names (generated under ``server.data_dir`` if missing).

    Raises:
        ConfigError: naming the key at fault.
    """
    check_push(dataclasses.replace(config, push=dataclasses.replace(config.push, enabled=True)))
    try:
        return VapidKeys.load_or_create(
            config.vapid_key_path(),
            config.push.subject,
            create=not config.push.vapid_private_key_file,
        )
    except VapidKeyError as exc:
        raise ConfigError("push.vapid_private_key_file", str(exc)) from exc


async def _enable_push(node: Node, config: Config, keys: VapidKeys) -> None:
    store = node.store
    if not isinstance(store, PushSubscriptionStore):
        raise ConfigError("push.enabled", f"store {config.store_url()} keeps no push subscriptions")
    sender = Sender(
        keys,
        concurrency=config.push.concurrency,
        timeout=config.push.timeout,
        allow_private=config.push.allow_private_endpoints,
    )
    await node.enable_push(sender, store).start()


async def start(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    plugins: Plugins | None = None,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    sockets: list[socket.socket] | None = None,
    dev: bool = False,
) -> Service:
    """Build and start a service; it accepts connections when this returns.

    Without ``sockets``, adopts systemd's (socket activation) or binds
    ``server.host:server.port``. The store and broker are open before any
    socket is served, so a caller may report READY right after. ``dev``
    (``pushsvc serve --dev``) serves the development-only routes too.
    """
    node = await build_node(config, registry=registry, plugins=plugins)
    app = make_app(node, dev=dev)
    server = UpgradeServer(
        app,
        xheaders=config.server.xheaders,
        idle_connection_timeout=config.server.header_timeout,  # Tornado's head timeout
        max_header_size=config.server.max_header_bytes,
        body_timeout=config.server.body_timeout,
        max_body_size=config.api.max_body_bytes,
    )
    server.node = node
    if sockets is None:
        sockets = sdnotify.listen_fds() or tornado.netutil.bind_sockets(
            config.server.port, config.server.host, backlog=LISTEN_BACKLOG
        )
    _set_nodelay(sockets)
    await server.listen_fast(sockets, LISTEN_BACKLOG)
    service = Service(node.config, node, server, sockets, config_path, overrides or {}, app)
    service.start_timers()
    return service
