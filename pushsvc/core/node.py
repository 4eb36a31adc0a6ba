"""Node is the service on this process: a thin facade over the parts.

It builds the parts and wires them to each other (the hub, the broker, the
store and delivery tracker, the authenticator, the rate limits) and
implements the small interfaces the other layers ask for: what a session
needs (:class:`~pushsvc.core.session.SessionServices`), what a plugin may do
(:class:`~pushsvc.plugin.api.Node`), what the metrics read
(:class:`~pushsvc.ops.metrics.Observed`). No part reaches into the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import types
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any

from pushsvc.auth import revocation
from pushsvc.auth.revocation import Revocations
from pushsvc.auth.tokens import Authenticator
from pushsvc.broker import (
    REVOCATIONS_CHANNEL,
    Broker,
    BrokerStats,
    BrokerUnavailable,
    Envelope,
    EnvelopeKind,
    room_channel,
    user_channel,
)
from pushsvc.cluster import Registry
from pushsvc.cluster.memory import MemoryRegistry
from pushsvc.config import Config, parse_type_buckets
from pushsvc.core.hub import PRESENCE_FRAME, Hub
from pushsvc.core.keepalive import Keepalive
from pushsvc.core.ratelimit import KeyedBuckets
from pushsvc.core.session import Joined, Session
from pushsvc.delivery.tracker import Delivery as DeliveryTracker
from pushsvc.ops.metrics import Metrics
from pushsvc.plugin.api import CommandError, Delivery, Guarantee, HandshakeRequest, Principal
from pushsvc.plugin.manager import Plugins, RegisteredType
from pushsvc.protocol import frames
from pushsvc.protocol.codes import RETRY_AFTER_UNAVAILABLE, ErrorCode
from pushsvc.protocol.webpush import PushOptions, parse_subscription
from pushsvc.push.sender import Sender
from pushsvc.push.service import PushService
from pushsvc.store import (
    HistoryPage,
    HistoryRetention,
    IdempotencyKey,
    PushSubscriptionStore,
    Revocation,
    Store,
    StoreUnavailable,
)

log = logging.getLogger("pushsvc.node")

#: Room publications with their history append in flight past which ``publish``
#: waits for its own (backpressure on publishers when the store is slow).
RECORDING_MAX = 10_000


class Node:
    """The pushsvc service of this process."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        plugins: Plugins,
        broker: Broker,
        store: Store,
        cluster: Registry | None = None,
    ) -> None:
        limits = config.ratelimit
        self.config = config  # the configuration in force (replaced on reload)
        self.metrics = metrics  # Prometheus series
        self.plugins = plugins  # hooks and message types
        plugins.count_error = self._plugin_failed  # pushsvc_plugin_errors_total{plugin, hook}
        plugins.slow_after = config.plugins.slow_hook_seconds  # log hooks that block the loop
        self.broker = broker  # other nodes
        self.store = store  # durable messages
        self.cluster = cluster or MemoryRegistry()  # caps and presence over every node
        self.delivery = DeliveryTracker(
            config.delivery, store, broker, metrics, self._dead_lettered
        )  # at-least-once tracking
        self.hub = Hub(
            broker, metrics, self.delivery, self.cluster, store, config.history.max_recovery
        )  # local connections and rooms, gap repair from the history
        self.delivery.serve_locally(self.hub.user_clients)  # if the broker is in-process
        self.authenticator = Authenticator(config.auth, config.secret())  # token checks
        self.user_buckets = KeyedBuckets(limits.user_rate, limits.user_burst)  # per user
        self.handshake_buckets = KeyedBuckets(limits.handshake_rate, limits.handshake_burst)
        self.type_buckets: Mapping[str, KeyedBuckets] = {}  # type -> own per-user bucket
        self._configure_type_buckets(time.monotonic())
        self.api_buckets = KeyedBuckets(config.api.rate, config.api.burst)  # per API client
        self.keepalive = Keepalive(
            self.hub.all_clients,
            self.hub.sessions.get,
            config.server.heartbeat,
            config.server.heartbeat_timeout,
        )
        self.revocations = Revocations(store)  # revoked tokens (loaded by app.start)
        self.hub.on_control = self.on_control  # control: broadcasts (revocations)
        broker.set_gap_callback(self.on_broker_gap)  # envelopes may have been lost
        self.cluster.set_departed_callback(self.departed)  # members of dead nodes
        self.draining = False  # True once shutdown began: refuse new work
        self.push: PushService | None = None  # Web Push, when push.enabled (enable_push)
        self._tasks: set[asyncio.Future[Any]] = set()  # background work to finish on shutdown
        self._recording = 0  # room publications whose history append is in flight

    def track(self, task: asyncio.Future[Any]) -> None:
        """Keep background work (a task or future) until it ends; its errors are logged."""
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def settle_background(self) -> None:
        """Wait for tracked background work (shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def enable_push(self, sender: Sender, subscriptions: PushSubscriptionStore) -> PushService:
        """Turn Web Push on (``push.enabled``): the caller starts the returned service."""
        self.push = PushService(
            self.config.push,
            sender,
            subscriptions,
            self.store,
            self.metrics,
            self,
            self._push_sent,
        )
        return self.push

    def _push_sent(self, user: str, message: Any, endpoint: str, result: str) -> None:
        self.plugins.notify(
            "pushsvc_push_sent", user=user, message=message, endpoint=endpoint, result=result
        )

    def online(self, user: str) -> bool:
        """Whether ``user`` has an open connection on this node."""
        return bool(self.hub.user_clients(user))

    async def online_users(self, users: Sequence[str]) -> set[str]:
        """Those of ``users`` with a connection on any node (Web Push's "offline" test).

        Users connected here are not looked up; the others are, in one batch
        (the cluster registry). When the registry fails it answers with this
        node's own connections: the users elsewhere then count as offline
        and are pushed (a duplicate push rather than a lost one).
        """
        here = {user for user in users if user in self.hub.users}
        rest = [user for user in users if user not in here]
        if rest:
            here |= await self.cluster.online(rest)
        return here

    def welcome_frame(self, session: Session) -> bytes:
        """The ``welcome`` frame for a new connection (with the VAPID key when push is on)."""
        welcome: dict[str, Any] = {
            "type": "welcome",
            "message": f"Welcome, {session.principal.name or session.principal.user}!",
            "user": session.principal.user,
            "session": session.session,
            "heartbeat": self.config.server.heartbeat,
        }
        if self.push is not None:
            welcome["push"] = {"vapid_public_key": self.push.public_key}
        return frames.encode(welcome)

    def apply_config(self, new: Config, changed: Sequence[str]) -> list[str]:
        """Apply the reloadable ``changed`` keys of ``new``; returns the keys applied.

        Keys that need a restart keep their running values. Reloadable plugin
        settings (``plugins.<name>.<key>``) are applied too, and each plugin
        whose settings changed hears it through ``pushsvc_settings_changed``.
        """
        plugin_keys = [key for key in changed if key.count(".") >= 2 and key[:8] == "plugins."]
        if plugin_keys:
            self._apply_plugin_settings(new, plugin_keys)
            changed = [key for key in changed if key not in plugin_keys]
        applied = self._apply_core_keys(new, changed)
        return [*applied, *plugin_keys]

    def _apply_plugin_settings(self, new: Config, keys: Sequence[str]) -> None:
        by_plugin: dict[str, list[str]] = {}
        for key in keys:
            _, name, setting = key.split(".", 2)
            by_plugin.setdefault(name, []).append(setting)
        values = dict(self.config.plugin_values)
        for name, settings in by_plugin.items():
            merged = dict(values.get(name, {}))
            merged.update({key: new.plugin(name)[key] for key in settings})
            values[name] = types.MappingProxyType(merged)
        self.config = dataclasses.replace(self.config, plugin_values=values)
        for name, settings in by_plugin.items():
            self.plugins.notify_plugin(
                name, "pushsvc_settings_changed", settings=values[name], changed=settings
            )

    def _apply_core_keys(self, new: Config, changed: Sequence[str]) -> list[str]:
        sections: dict[str, Any] = {}
        for key in changed:
            section, _, name = key.partition(".")
            current = sections.get(section, getattr(self.config, section))
            sections[section] = dataclasses.replace(
                current, **{name: getattr(getattr(new, section), name)}
            )
        if not sections:
            return []
        self.config = dataclasses.replace(self.config, **sections)
        if "auth" in sections:
            self.authenticator = Authenticator(self.config.auth, self.config.secret())
        if "ratelimit" in sections:
            limits, now = self.config.ratelimit, time.monotonic()
            self.user_buckets.reconfigure(limits.user_rate, limits.user_burst, now)
            self.handshake_buckets.reconfigure(limits.handshake_rate, limits.handshake_burst, now)
            for client in self.hub.all_clients():
                client.reconfigure_limits(limits, now)
            self._configure_type_buckets(now)
        if "api" in sections:
            api = self.config.api
            self.api_buckets.reconfigure(api.rate, api.burst, time.monotonic())
        return list(changed)

    def _configure_type_buckets(self, now: float) -> None:
        """Per-type buckets: each type's declaration, then ``ratelimit.type_buckets``."""
        wanted = {
            name: registered.message_type.bucket for name, registered in self.plugins.types.items()
        }
        for name, bucket in parse_type_buckets(self.config.ratelimit.type_buckets).items():
            if name not in wanted:
                log.warning("ratelimit.type_buckets: no loaded plugin declares type %r", name)
                continue
            wanted[name] = bucket
        current = dict(self.type_buckets)
        buckets: dict[str, KeyedBuckets] = {}
        for name, bucket in wanted.items():
            if bucket is None:
                continue
            if name in current:
                current[name].reconfigure(*bucket, now)  # keep the users' levels
                buckets[name] = current[name]
            else:
                buckets[name] = KeyedBuckets(*bucket)
        self.type_buckets = buckets

    def _plugin_failed(self, plugin: str, hook: str) -> None:
        self.metrics.plugin_errors.labels(plugin, hook).inc()

    def _dead_lettered(self, user: str, message: dict[str, Any], reason: str) -> None:
        self.plugins.notify("pushsvc_dead_lettered", user=user, message=message, reason=reason)

    def on_broker_gap(self) -> None:
        """Envelopes may have been lost (a broker reconnect): refill every window from the store.

        At-least-once messages whose DURABLE envelope was lost reach the open
        connections this way; at-most-once ones lost meanwhile stay lost.
        """
        log.warning("broker envelopes may have been lost: reloading pending deliveries")
        self.delivery.resync()

    async def _publish(self, channel: str, envelope: Envelope) -> None:
        """Publish an envelope the caller must know was sent.

        Raises:
            CommandError: ``unavailable`` (with ``retry_after``) when the broker
                did not take it: nothing was sent.
        """
        try:
            await self.broker.publish(channel, envelope)
        except BrokerUnavailable as exc:
            raise CommandError(
                ErrorCode.UNAVAILABLE,
                f"not sent, broker unavailable: {exc}",
                RETRY_AFTER_UNAVAILABLE,
            ) from exc

    # -- what the session and the metrics need ---------------------------------

    def message_type(self, name: str) -> RegisteredType | None:
        """The plugin message type registered as ``name``, if any."""
        return self.plugins.types.get(name)

    def message_types(self) -> list[str]:
        """Every registered plugin message type."""
        return list(self.plugins.types)

    def broker_healthy(self) -> bool:
        """Whether the broker reaches the other nodes."""
        return self.broker.healthy()

    def broker_stats(self) -> BrokerStats:
        """The broker's figures (for the metrics)."""
        return self.broker.stats()

    def store_healthy(self) -> bool:
        """Whether the last store write succeeded."""
        return self.store.healthy()

    def cluster_healthy(self) -> bool:
        """Whether the last call to the cluster registry succeeded."""
        return self.cluster.healthy()

    def jwks_failures(self) -> int:
        """JWKS fetches that failed since the last (re)load of the auth keys."""
        jwks = self.authenticator.jwks
        return 0 if jwks is None else jwks.failures

    def token_refreshed(self, session: Session) -> None:
        """``session`` holds a new token: re-arm its expiry."""
        self.keepalive.track_expiry(session)

    def ack(self, session: Session, ids: Sequence[str]) -> Coroutine[Any, Any, int]:
        """Settle at-least-once messages for ``session``'s user; awaited: how many.

        Returns the delivery's coroutine itself (no coroutine of its own: one
        layer less between an ack frame and its commit).
        """
        return self.delivery.ack(session, ids)

    # -- Web Push subscriptions ---------------------------------------------------

    def _push_service(self) -> PushService:
        if self.push is None:
            raise CommandError(ErrorCode.FORBIDDEN, "Web Push is not enabled (push.enabled)")
        return self.push

    async def push_subscribe(self, user: str, subscription: Any) -> str:
        """Store a browser's subscription for ``user``; ``created`` or ``updated``.

        Raises:
            CommandError: ``bad_request`` (malformed), ``forbidden`` (push off,
                endpoint refused, too many), ``unavailable`` (store).
        """
        push = self._push_service()
        try:
            keys = parse_subscription(subscription)
        except ValueError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, f"subscription: {exc}") from exc
        return await push.subscribe(user, keys)

    async def push_unsubscribe(self, user: str, endpoint: str) -> bool:
        """Forget ``user``'s subscription ``endpoint``; whether there was one."""
        return await self._push_service().unsubscribe(user, endpoint)

    # -- authentication ---------------------------------------------------------

    async def authenticate(self, token: str | None) -> Principal:
        """Verify a token (raises :class:`~pushsvc.auth.AuthError`, ``revoked`` included)."""
        principal = await self.authenticator.verify(token)
        self.revocations.check(principal)
        return principal

    async def authenticate_client(
        self, token: str | None, request: HandshakeRequest | None = None
    ) -> Principal:
        """Authenticate a WebSocket client: ``pushsvc_authenticate`` first, then the JWT.

        ``request`` is the upgrade request (None for an ``auth`` frame).
        Raises :class:`~pushsvc.auth.AuthError` like :meth:`authenticate`.
        """
        principal = await self.plugins.authenticate(token, request)
        if principal is None:
            return await self.authenticate(token)
        self.revocations.check(principal)
        return principal

    # -- rooms ------------------------------------------------------------------

    def may_join(self, principal: Principal, room: str) -> bool:
        """Whether ``principal`` may join ``room`` (plugins first, then the token)."""
        return self.plugins.authorize_room(principal, room)

    def is_member(self, session: str, room: str) -> bool:
        """Whether the local connection ``session`` is in ``room``."""
        client = self.hub.sessions.get(session)
        return client is not None and room in client.rooms

    async def join(
        self,
        session: Session,
        room: str,
        *,
        check: bool = True,
        since: tuple[int, str] | None = None,
    ) -> Joined:
        """Join ``session`` to ``room`` and tell the other members.

        Returns the room's history position for the ``reply`` (``offset``,
        ``epoch``) and, with ``since`` (the last offset and epoch the client
        saw), whether what it missed can be recovered; the caller sends the
        reply, then :meth:`Joined.finish` sends the recovered publications,
        then the live ones held meanwhile (no gap, no duplicate).

        Raises:
            CommandError: ``forbidden`` when the token does not allow the room
                or the connection is in too many rooms.
        """
        if check and not self.may_join(session.principal, room):
            raise CommandError(ErrorCode.FORBIDDEN, f"not allowed to join {room!r}")
        if room not in session.rooms and (
            len(session.rooms) >= self.config.chat.max_rooms_per_connection
        ):
            raise CommandError(ErrorCode.FORBIDDEN, "too many rooms on this connection")
        retention = self.retention(room)
        hold = since is not None and retention is not None
        if await self.hub.join(session, room, hold=hold):
            await self._presence(room, "join", session)
            self._room_hook("pushsvc_joined", session, room)
        if retention is None:
            if since is None:
                return Joined({})
            return self._not_recovered(session, room, "history_disabled", None, hold)
        limit = 0 if since is None else self.config.history.max_recovery + 1
        try:
            page = await self.store.history(room, None if since is None else since[0], limit)
        except StoreUnavailable:
            if since is None:
                return Joined({})
            return self._not_recovered(session, room, "unavailable", None, hold)
        except BaseException:  # a bug or a cancellation: never leave the room held
            if hold:
                self.hub.release_room(session, room, 0, "")
            raise
        if since is None:
            return Joined({"offset": page.top, "epoch": page.epoch})
        reason = self._recovery_problem(since, page)
        if reason is not None:
            return self._not_recovered(session, room, reason, page, hold)
        entries = [e for e in page.entries if e.offset <= page.top]
        self.metrics.history_recoveries.labels("recovered").inc()
        self.metrics.history_replayed.labels("resume").inc(len(entries))

        def finish() -> None:
            for entry in entries:
                session.send(entry.frame, entry.type)
            self.hub.release_room(session, room, page.top, page.epoch)

        fields = {
            "offset": page.top,
            "epoch": page.epoch,
            "recovered": True,
            "recovered_count": len(entries),
        }
        return Joined(fields, finish)

    def _recovery_problem(self, since: tuple[int, str], page: HistoryPage) -> str | None:
        """Why the publications after ``since`` cannot all be replayed from ``page``, or None."""
        offset, epoch = since
        if epoch != page.epoch and not (epoch == "" and offset == 0):
            return "epoch_changed"  # "" and 0: the client saw the room before any history
        if offset > page.top:
            return "epoch_changed"  # not the history the client saw
        if page.top - offset > self.config.history.max_recovery:
            return "too_far_behind"
        if page.earliest > offset + 1:
            return "history_expired"
        return None

    def _not_recovered(
        self, session: Session, room: str, reason: str, page: HistoryPage | None, hold: bool
    ) -> Joined:
        self.metrics.history_recoveries.labels(reason).inc()
        fields: dict[str, Any] = {"recovered": False, "recovered_count": 0, "reason": reason}
        if page is not None:
            fields = {"offset": page.top, "epoch": page.epoch, **fields}
        if not hold:
            return Joined(fields)
        top, epoch = (0, "") if page is None else (page.top, page.epoch)

        def finish() -> None:
            self.hub.release_room(session, room, top, epoch)

        return Joined(fields, finish)

    def retention(self, room: str) -> HistoryRetention | None:
        """How much of ``room``'s history is kept; None: none (``history.*``)."""
        kept = self.config.history.retention(room)
        return None if kept is None else HistoryRetention(*kept)

    async def room_history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """A page of ``room``'s history (the ``history`` command and the HTTP API).

        Raises:
            CommandError: ``unavailable`` when the store failed.
        """
        try:
            return await self.store.history(room, since, limit, reverse=reverse)
        except StoreUnavailable as exc:
            raise CommandError(
                ErrorCode.UNAVAILABLE, f"history unavailable: {exc}", RETRY_AFTER_UNAVAILABLE
            ) from exc

    async def trim_history(self) -> None:
        """Drop expired history and update its gauges (call every few seconds)."""
        stats = await self.store.trim_history(time.time())
        self.metrics.history_entries.set(stats.entries)
        self.metrics.history_rooms.set(stats.rooms)

    async def leave(self, session: Session, room: str) -> None:
        """Remove ``session`` from ``room`` and tell the other members."""
        if await self.hub.leave(session, room):
            await self._presence(room, "leave", session)
            self._room_hook("pushsvc_left", session, room)

    def _room_hook(self, hook: str, session: Session, room: str) -> None:
        self.plugins.notify(hook, principal=session.principal, session=session.session, room=room)

    async def _presence(self, room: str, event: str, session: Session) -> None:
        if len(self.hub.members(room)) > self.config.chat.presence_max_members:
            return
        frame = frames.encode(
            {"type": "presence", "room": room, "event": event, "user": session.principal.user}
        )
        envelope = Envelope(EnvelopeKind.PRESENCE, "presence", session.session, frame)
        try:
            await self.broker.publish(room_channel(room), envelope)
        except BrokerUnavailable as exc:  # at most once: the join or leave itself stands
            log.warning("presence %s in %s not sent: %s", event, room, exc)

    def departed(self, room: str, users: list[str]) -> None:
        """``users`` left ``room`` with a node that died: a ``presence`` leave to the members here.

        The cluster registry calls this once per dead node and room, on every
        node with members in the room, so each connection gets one ``leave``
        per user; users still in the room on this node are left out.
        """
        members = self.hub.members(room)
        if not members or len(members) > self.config.chat.presence_max_members:
            return
        here = {client.principal.user for client in members}
        for user in users:
            if user in here:
                continue
            leave = {"type": "presence", "room": room, "event": "leave", "user": user}
            frame = frames.encode(leave)
            self.hub.on_envelope(
                room_channel(room), Envelope(EnvelopeKind.PRESENCE, PRESENCE_FRAME, "", frame)
            )

    async def presence(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users with a connection in ``room`` on any node, sorted.

        With ``limit``, a list longer than ``limit`` means "more than
        ``limit``" and may be incomplete. When the cluster registry is
        unreachable, the users on this node.
        """
        return await self.cluster.room_users(room, limit)

    # -- connections ------------------------------------------------------------

    async def connected(self, session: Session) -> None:
        """Register an opened, welcomed connection."""
        await self.hub.add(session)
        self.keepalive.track_expiry(session)
        chat = self.config.chat
        if (
            chat.auto_join
            and chat.default_room
            and self.may_join(session.principal, chat.default_room)
        ):
            await self.join(session, chat.default_room, check=False)
        self.plugins.notify(
            "pushsvc_connected", principal=session.principal, session=session.session
        )
        await self.delivery.connected(session)

    async def disconnected(self, session: Session, code: int | None) -> None:
        """Forget a closed connection."""
        rooms = await self.hub.remove(session)
        for room in rooms:
            await self._presence(room, "leave", session)
            self._room_hook("pushsvc_left", session, room)
        self.delivery.disconnected(session)
        self.plugins.notify(
            "pushsvc_disconnected", principal=session.principal, session=session.session, code=code
        )

    async def disconnect_user(self, user: str, reason: str) -> int:
        """Close every connection of ``user`` (on every node) with 4003; returns local count."""
        count = len(self.hub.user_clients(user))
        await self._publish(
            user_channel(user), Envelope(EnvelopeKind.DISCONNECT, "", "", reason.encode())
        )
        return count

    # -- revocations (every node) --------------------------------------------------

    async def revoke(self, entry: Revocation) -> tuple[Revocation, int]:
        """Store ``entry``, apply it here and publish it to every node.

        Returns what the store kept and how many local connections were
        closed. Raises ``StoreUnavailable``: nothing was revoked then.
        """
        stored = await self.revocations.persist(entry)
        envelope = revocation.to_envelope(stored)
        closed = self.on_revoked(envelope)  # the path the other nodes take too
        try:
            await self.broker.publish(REVOCATIONS_CHANNEL, envelope)
        except Exception:  # stored: other nodes load it at their next start
            log.exception("broker publish failed for a revocation of %s", stored.subject)
        return stored, closed

    def on_control(self, channel: str, envelope: Envelope) -> None:
        """A ``control:`` envelope from the broker (the hub hands them here)."""
        if channel == REVOCATIONS_CHANNEL and envelope.kind is EnvelopeKind.REVOKED:
            try:
                self.on_revoked(envelope)
            except ValueError as exc:
                log.warning("malformed revocation envelope dropped: %s", exc)
        else:
            log.warning("unexpected envelope kind %s on %s", envelope.kind, channel)

    def on_revoked(self, envelope: Envelope) -> int:
        """Apply a REVOKED envelope: cache it, close the local holders; returns how many."""
        entry = revocation.from_envelope(envelope)
        hub = self.hub
        holders = (
            hub.all_clients() if entry.kind == revocation.JTI else hub.user_clients(entry.subject)
        )
        return self.revocations.apply(entry, holders)

    # -- messages ---------------------------------------------------------------

    def _live(self, message: dict[str, Any]) -> Envelope:
        """Stamp, encode and count an at-most-once message."""
        message_id, frame = frames.stamp(message)
        self.metrics.messages_accepted.labels(frame["type"]).inc()
        return Envelope(EnvelopeKind.LIVE, frame["type"], message_id, frames.encode(frame))

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        exclude: str | None = None,
        *,
        history: bool = False,
        defer: list[Awaitable[None]] | None = None,
    ) -> str:
        """Fan ``message`` out to ``room``'s members on every node (at most once).

        ``exclude`` is a session left out (on whichever node it is): the
        envelope then goes as :attr:`EnvelopeKind.PRESENCE`, whose ``id`` is
        that session.

        With ``history`` (and a room that keeps one, ``history.*``) it is
        appended to the room's history first and carries ``offset`` and
        ``epoch``; the fan-out follows the commit, in the order of the
        ``publish`` calls. This returns once it is recorded and fanned out,
        unless ``defer`` is given: then it returns once the append is
        queued and adds what to await to ``defer`` (the session answers the
        frame after it, without holding the connection's next frames, which
        so join the same group commit). Past :data:`RECORDING_MAX` appends
        in flight it waits anyway (backpressure). If the append fails the
        message is published live only. Returns the message id.

        Raises:
            CommandError: ``unavailable`` when the broker did not take it
                (from what ``defer`` gets, when given); a recorded one is in
                the history then, so a resume or a gap repair may deliver it.
        """
        if "type" not in message:
            raise ValueError("message needs a 'type'")
        retention = self.retention(room) if history else None
        if retention is None:
            envelope = self._live(message)
            message_id = envelope.id
            if exclude is not None:
                envelope = dataclasses.replace(envelope, kind=EnvelopeKind.PRESENCE, id=exclude)
            await self._publish(room_channel(room), envelope)
            return message_id
        message_id, frame = frames.stamp(message)
        frame.setdefault("room", room)  # an offset means nothing without its room
        self.metrics.messages_accepted.labels(frame["type"]).inc()
        task = asyncio.ensure_future(self._recorded(room, message_id, frame, retention, exclude))
        self._tasks.add(task)
        task.add_done_callback(self._recorded_done)
        self._recording += 1
        if defer is None or self._recording > RECORDING_MAX:
            await asyncio.shield(task)
        else:
            defer.append(task)
        return message_id

    def _recorded_done(self, task: asyncio.Task[None]) -> None:
        self._recording -= 1
        if not task.cancelled() and isinstance(task.exception(), CommandError):
            self._tasks.discard(task)  # the publisher is told (``unavailable``)
            return
        self._task_done(task)

    async def _recorded(
        self,
        room: str,
        message_id: str,
        frame: dict[str, Any],
        retention: HistoryRetention,
        exclude: str | None,
    ) -> None:
        """Append to the history (encoded there, once, with its position), then fan out."""
        kind = frame["type"]

        def encode(offset: int, epoch: str) -> bytes:  # runs in the store's write
            frame["offset"], frame["epoch"] = offset, epoch
            return frames.encode(frame)

        try:
            appended = await self.store.append(room, kind, encode, retention)
        except StoreUnavailable as exc:
            self.metrics.history_append_failures.inc()
            log.warning("room %r: history append failed, published live only: %s", room, exc)
            frame.pop("offset", None)
            frame.pop("epoch", None)
            envelope = Envelope(EnvelopeKind.LIVE, kind, message_id, frames.encode(frame))
        else:
            envelope = Envelope(
                EnvelopeKind.LIVE, kind, message_id, appended.frame, appended.offset, appended.epoch
            )
        if exclude is not None:
            envelope = dataclasses.replace(envelope, kind=EnvelopeKind.PRESENCE, id=exclude)
        await self._publish(room_channel(room), envelope)

    async def send(
        self,
        to: Sequence[str],
        message: dict[str, Any],
        guarantee: Guarantee,
        ttl: float | None = None,
        idempotency: IdempotencyKey | None = None,
        push: PushOptions | None = None,
    ) -> Delivery:
        """Deliver ``message`` to every connection of the users in ``to``.

        At-least-once messages are persisted for every recipient before this
        returns (raises ``CommandError`` ``unavailable`` if the store fails),
        together with ``idempotency`` when given; then they go to Web Push as
        ``push`` (or the message type's ``push`` mode) says, when it is enabled.
        At-most-once messages raise ``CommandError`` ``unavailable`` when the
        broker did not take them (users before the failing one may have received it).
        """
        if "type" not in message:
            raise ValueError("message needs a 'type'")
        recipients = list(dict.fromkeys(to))
        if guarantee is Guarantee.AT_LEAST_ONCE:
            message_id = await self.delivery.accept(recipients, message, ttl, idempotency)
            if self.push is not None:
                self._push(recipients, message_id, message, push or PushOptions(), ttl)
            return Delivery(message_id, recipients)
        envelope = self._live(message)
        for user in recipients:
            await self._publish(user_channel(user), envelope)
        return Delivery(envelope.id, recipients)

    def _push(
        self,
        recipients: Sequence[str],
        message_id: str,
        message: dict[str, Any],
        options: PushOptions,
        ttl: float | None,
    ) -> None:
        """Hand an accepted message to Web Push, with the type's mode unless overridden."""
        assert self.push is not None
        if options.mode is None:
            registered = self.plugins.types.get(message["type"])
            mode = registered.message_type.push if registered is not None else "never"
            options = dataclasses.replace(options, mode=mode)
        lifetime = self.config.delivery.ttl
        self.push.accepted(
            recipients, message_id, message, options, min(ttl, lifetime) if ttl else lifetime
        )

    async def requeue_dead_letters(self, user: str, ids: Sequence[str]) -> list[str]:
        """Requeue dead letters of ``user`` for ``delivery.ttl`` more; returns the ids requeued."""
        return await self.delivery.requeue(user, ids, time.time() + self.config.delivery.ttl)
