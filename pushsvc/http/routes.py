"""The route table of the service, built once at startup.

:func:`build` collects the core routes (``/ws``, the server API, health,
metrics) and the rules of every plugin's ``pushsvc_register_routes`` hook —
the hook runs once, here — and generates the OpenAPI document from that table
once; ``GET /api/v1/openapi.json`` serves it from memory.

Imports go one way: this module imports the handler modules and
:mod:`pushsvc.http.openapi`; none of them imports it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import orjson
import tornado.web

from pushsvc.core.node import Node
from pushsvc.http import openapi
from pushsvc.http.clients import client_routes
from pushsvc.http.dead_letters import (
    DeadLettersDeleteHandler,
    DeadLettersHandler,
    DeadLettersRequeueHandler,
)
from pushsvc.http.health import HealthHandler, MetricsHandler, OpenApiHandler, ReadyHandler
from pushsvc.http.limits import at_least_once_types
from pushsvc.http.messages import (
    DisconnectHandler,
    HistoryHandler,
    PendingHandler,
    PresenceHandler,
    PublishHandler,
)
from pushsvc.http.push import PushSubscriptionsHandler, VapidPublicKeyHandler
from pushsvc.http.revocations import RevocationsHandler
from pushsvc.plugin.manager import ROUTE, Plugins
from pushsvc.transport.upgrade import UpgradeHandler

#: A Tornado rule: (pattern, handler class, initialize kwargs).
Rule = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes the application serves and the OpenAPI document generated from them."""

    rules: Sequence[Rule]  # core routes first, then the plugins' in hook order
    document: dict[str, Any]  # the OpenAPI document (served encoded)


def core_routes(node: Node, document_kwargs: dict[str, Any] | None = None) -> list[Rule]:
    """The core HTTP routes (``/ws`` excluded); ``document_kwargs``: the OpenAPI route's."""
    kwargs = {"node": node}
    user = r"/api/v1/users/([^/]+)"
    return [
        (r"/healthz", HealthHandler, kwargs),
        (r"/readyz", ReadyHandler, kwargs),
        (r"/metrics", MetricsHandler, kwargs),
        (r"/api/v1/openapi\.json", OpenApiHandler, document_kwargs or kwargs),
        (r"/api/v1/publish", PublishHandler, kwargs),
        (rf"{user}/pending", PendingHandler, kwargs),
        (rf"{user}/disconnect", DisconnectHandler, kwargs),
        (rf"{user}/dead-letters", DeadLettersHandler, kwargs),
        (rf"{user}/dead-letters/requeue", DeadLettersRequeueHandler, kwargs),
        (rf"{user}/dead-letters/delete", DeadLettersDeleteHandler, kwargs),
        (r"/api/v1/rooms/([^/]+)/presence", PresenceHandler, kwargs),
        (r"/api/v1/rooms/([^/]+)/history", HistoryHandler, kwargs),
        (r"/api/v1/revocations", RevocationsHandler, kwargs),
        *(
            [
                (r"/api/v1/push/vapid-public-key", VapidPublicKeyHandler, kwargs),
                (rf"{user}/push-subscriptions", PushSubscriptionsHandler, kwargs),
            ]
            if node.push is not None  # push.enabled; otherwise 404 like any unknown path
            else []
        ),
    ]


def plugin_routes(node: Node) -> list[Rule]:
    """The rules of the plugins' ``pushsvc_register_routes`` hook (runs it once).

    A kwarg ``{"node": None}`` receives the node. Each handler class is
    served as a subclass that logs an uncaught exception with its plugin's
    name and counts it (``pushsvc_plugin_errors_total{hook="route"}``);
    Tornado answers it with a 500 (JSON ``internal`` for an ``ApiHandler``).
    """
    rules: list[Rule] = []
    plugins = node.plugins
    for impl in reversed(plugins.hook.pushsvc_register_routes.get_hookimpls()):
        registered = cast(Sequence[tuple[str, Any, dict[str, Any]]], impl.function())
        for pattern, handler, kwargs in registered:
            kwargs = {k: (node if k == "node" and v is None else v) for k, v in kwargs.items()}
            rules.append((pattern, _isolated(handler, impl.plugin_name, plugins), kwargs))
    return rules


def _isolated(
    handler: type[tornado.web.RequestHandler], plugin: str, plugins: Plugins
) -> type[tornado.web.RequestHandler]:
    """``handler`` with its uncaught exceptions logged with ``plugin``'s name and counted."""

    def log_exception(
        self: tornado.web.RequestHandler,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(value, tornado.web.HTTPError):  # an answer, not a failure
            handler.log_exception(self, typ, value, tb)
            return
        plugins.failed(plugin, ROUTE, value, f"{self.request.method} {self.request.path}")

    namespace = {
        "log_exception": log_exception,
        "__module__": handler.__module__,
        "__qualname__": handler.__qualname__,
        "__doc__": handler.__doc__,
    }
    return cast(type[tornado.web.RequestHandler], type(handler.__name__, (handler,), namespace))


def build(node: Node, *, dev: bool = False) -> RouteTable:
    """The route table: ``/ws``, the core routes, the plugins' routes, and their document.

    ``dev`` (``pushsvc serve --dev``) adds the development-only routes (``POST /dev/token``).
    """
    document_kwargs: dict[str, Any] = {"node": node}
    rules: list[Rule] = [
        (r"/ws", UpgradeHandler, {"node": node}),
        *core_routes(node, document_kwargs),
        # the JavaScript client, the demo page (demo.enabled), POST /dev/token (--dev)
        *client_routes(demo=node.config.demo.enabled, dev=dev, node=node),
        *plugin_routes(node),
    ]
    document = openapi.document(node.config, rules, at_least_once_types(node))
    document_kwargs["document"] = orjson.dumps(document)
    return RouteTable(tuple(rules), document)
