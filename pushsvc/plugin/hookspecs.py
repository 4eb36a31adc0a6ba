"""The hooks pushsvc calls; plugins implement them with ``@pushsvc.hookimpl``.

Naming: ``pushsvc_register_*`` hooks return lists that pushsvc collects from
every plugin; ``pushsvc_authorize_*`` hooks are *firstresult* (stops at first
non-None result); past-tense hooks (``pushsvc_connected``...) notify and
their results are ignored. Hooks marked "may return an awaitable" can be
``async def``. An implementation may take fewer arguments than the spec, so
adding an argument later does not break plugins.

Per-frame work does not go through a hook chain: a plugin registers a
:class:`~pushsvc.MessageType` whose handler is looked up by the frame's
``type`` in one dict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import pluggy

from pushsvc.config import Setting
from pushsvc.plugin.api import HandshakeRequest, MessageType, Principal

hookspec = pluggy.HookspecMarker("pushsvc")

# -- startup ------------------------------------------------------------------


@hookspec
def pushsvc_register_message_types() -> Sequence[MessageType]:
    """Declare message types this plugin adds to the protocol.

    Called once at startup. Two plugins declaring the same ``name`` stop
    startup naming both; the core commands (``join``, ``leave``, ``ack``,
    ``auth``, ``ping``, ``push_subscribe``, ``push_unsubscribe``) cannot be
    declared.

    Example::

        from pushsvc import Field, Guarantee, MessageType, Reply, hookimpl

        async def handle_poke(ctx):
            delivery = await ctx.send(ctx.frame["to"], {"type": "poke"})
            return Reply({"id": delivery.id})

        @hookimpl
        def pushsvc_register_message_types():
            return [MessageType("poke", handle_poke, {"to": Field(str)},
                                guarantee=Guarantee.AT_LEAST_ONCE, cost=2)]
    """
    raise NotImplementedError


@hookspec
def pushsvc_config_schema() -> Mapping[str, Setting]:
    """Declare the plugin's settings: its ``[plugins.<name>]`` table, key -> :class:`Setting`.

    Called once, when the plugins load. pushsvc checks the table (and
    ``PUSHSVC_PLUGINS__<NAME>__<KEY>`` variables) against it, fills in the
    defaults, and hands the values to the plugin as
    ``node.config.plugin("<name>")``. A bad value stops ``serve`` and
    ``check-config`` naming ``plugins.<name>.<key>``.

    Example::

        @hookimpl
        def pushsvc_config_schema():
            return {"rate": Setting(2.0, "Typing events per second.", minimum=0)}
    """
    raise NotImplementedError


@hookspec
def pushsvc_settings_changed(settings: Mapping[str, Any], changed: Sequence[str]) -> None:
    """The plugin's ``reloadable`` settings changed on ``SIGHUP``; only that plugin is called.

    ``settings`` is the plugin's whole table as ``node.config.plugin(name)``
    now returns it; ``changed`` lists the keys that changed. Keys not
    declared ``reloadable`` keep their values until a restart. May be
    ``async def`` (run as a task); an exception is logged and counted and the
    new values stay applied.

    Example::

        @hookimpl
        def pushsvc_settings_changed(settings, changed):
            if "rate" in changed:
                limiter.rate = settings["rate"]
    """


@hookspec
def pushsvc_register_routes() -> Sequence[tuple[str, type, Mapping[str, Any]]]:
    """Add HTTP routes to the server, as Tornado ``(pattern, handler, kwargs)`` rules.

    Routes are served on the same port as ``/ws``; prefix them with the
    plugin's name. Each handler's ``initialize(**kwargs)`` gets the kwargs;
    the :class:`~pushsvc.plugin_api.Node` is passed as ``node`` when the
    kwargs ask for it with ``{"node": None}``. Called once at startup: the
    route table and the OpenAPI document generated from it are kept.

    Example::

        import tornado.web

        class PokeStats(tornado.web.RequestHandler):
            def get(self):
                self.write({"pokes": COUNT})

        @hookimpl
        def pushsvc_register_routes():
            return [(r"/poke/stats", PokeStats, {})]
    """
    raise NotImplementedError


@hookspec
def pushsvc_startup(node: Any) -> Awaitable[None] | None:
    """The service is about to listen; start background work here.

    ``node`` is the :class:`~pushsvc.plugin_api.Node`. May return an awaitable.

    Example::

        @hookimpl
        async def pushsvc_startup(node):
            await my_client.connect()
    """


@hookspec
def pushsvc_shutdown(node: Any) -> Awaitable[None] | None:
    """The service has drained and is about to exit; release resources.

    May return an awaitable. Each implementation is awaited in turn; one that
    raises is logged and counted and the others still run.

    Example::

        @hookimpl
        async def pushsvc_shutdown(node):
            await my_client.close()
    """


# -- connections ----------------------------------------------------------------


@hookspec(firstresult=True)
def pushsvc_authorize_room(principal: Principal, room: str) -> bool | None:
    """May ``principal`` join ``room``? Stops at first non-None result.

    Return True to allow, False to refuse (``forbidden``), None to let the
    next plugin decide. The built-in default (tried last) allows the rooms
    matching the token's ``rooms`` claim, or ``auth.default_rooms`` when the
    token has none.

    Example::

        @hookimpl
        def pushsvc_authorize_room(principal, room):
            if room.startswith("user-"):
                return room == f"user-{principal.user}"
            return None
    """


@hookspec(firstresult=True)
def pushsvc_authenticate(
    token: str | None, request: HandshakeRequest | None
) -> Principal | Awaitable[Principal | None] | None:
    """Authenticate a WebSocket client before the JWT check. Stops at the first non-None result.

    ``token`` is what the client sent as its bearer token (``Authorization:
    Bearer``, else ``access_token``; None when it sent neither); ``request`` is
    the upgrade request (headers, address, cookies), or None for an ``auth``
    frame on an open connection. Return a :class:`Principal` to accept (the
    token is then not checked as a JWT), None to let the next plugin and
    finally the JWT check decide, or raise :class:`AuthError` (``reason``: a
    short code) to refuse with 401 ``unauthorized`` and that reason. May be
    ``async def``. Revocations still apply to the principal returned. Any
    other exception refuses the client (reason ``plugin_error``) and is
    counted. The server API (``/api/v1/...``) does not call this hook.

    Example::

        from pushsvc import AuthError, Principal, hookimpl

        @hookimpl
        async def pushsvc_authenticate(token, request):
            if token is None or not token.startswith("key_"):
                return None  # a JWT: let pushsvc check it
            user = await api_keys.lookup(token)
            if user is None:
                raise AuthError("unknown_key", "no such API key")
            return Principal(user, None, frozenset(), None, expires_at=None)
    """


@hookspec
def pushsvc_joined(principal: Principal, session: str, room: str) -> None:
    """Connection ``session`` joined ``room`` (a ``join`` frame, or ``chat.auto_join``).

    Called after the join, once per connection and room; not for a ``join``
    of a room the connection is already in. May be ``async def`` (run as a
    task).

    Example::

        @hookimpl
        def pushsvc_joined(principal, session, room):
            log.info("%s joined %s", principal.user, room)
    """


@hookspec
def pushsvc_left(principal: Principal, session: str, room: str) -> None:
    """Connection ``session`` left ``room`` (a ``leave`` frame, or it closed).

    A closing connection calls it for each of its rooms, before
    ``pushsvc_disconnected``. May be ``async def`` (run as a task).

    Example::

        @hookimpl
        def pushsvc_left(principal, session, room):
            typing_state.discard((room, principal.user))
    """


@hookspec
def pushsvc_connected(principal: Principal, session: str) -> None:
    """A WebSocket connection was authenticated and welcomed.

    Example::

        @hookimpl
        def pushsvc_connected(principal, session):
            log.info("%s connected (%s)", principal.user, session)
    """


@hookspec
def pushsvc_disconnected(principal: Principal, session: str, code: int | None) -> None:
    """A WebSocket connection closed; ``code`` is the close code, if known.

    Example::

        @hookimpl
        def pushsvc_disconnected(principal, session, code):
            last_seen[principal.user] = time.time()
    """


# -- delivery ------------------------------------------------------------------


@hookspec
def pushsvc_dead_lettered(user: str, message: Mapping[str, Any], reason: str) -> None:
    """An at-least-once message to ``user`` was given up (``max_attempts`` or ``ttl``).

    ``message`` is the frame as the client would have seen it; ``reason`` is
    ``"max_attempts"`` or ``"ttl"``. Use it to fall back to e-mail or
    mobile push. The message stays visible through the API until
    ``delivery.dead_letter_retention`` passes.

    Example::

        @hookimpl
        def pushsvc_dead_lettered(user, message, reason):
            mailer.queue(user, message.get("title"), message.get("message"))
    """


@hookspec
def pushsvc_push_sent(user: str, message: Mapping[str, Any], endpoint: str, result: str) -> None:
    """A Web Push to one of ``user``'s subscriptions ended (``push.enabled``).

    ``message`` is the push payload (``id``, ``type``, ``title``, ``message``,
    ``data``...); ``endpoint`` the subscription's push service URL (empty for
    ``no_subscription``); ``result`` one of ``"sent"`` (the push service took
    it), ``"expired"`` (404/410: the subscription was deleted), ``"rejected"``
    (another 4xx), ``"gave_up"`` (retries or the TTL ran out), and
    ``"no_subscription"`` (the user has none: a plugin may use another channel,
    e.g. mobile push through FCM or APNs). Called on the event loop: queue
    slow work.

    Example::

        @hookimpl
        def pushsvc_push_sent(user, message, endpoint, result):
            if result in ("no_subscription", "gave_up"):
                mobile.queue(user, message.get("title"), message.get("message"))
    """
