"""Routes without a token: health, readiness, metrics, the OpenAPI document, and 404s."""

from __future__ import annotations

from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pushsvc.core.node import Node
from pushsvc.http.base import ApiError, JsonHandler
from pushsvc.protocol.codes import ApiErrorCode


class NotFoundHandler(JsonHandler):
    """Every path no route matches: 404 ``not_found`` in JSON, whatever the method."""

    def prepare(self) -> None:
        """Answer 404 before any method runs."""
        path = self.request.path
        message = f"no route for {self.request.method} {path}"
        self.send_api_error(ApiError(HTTPStatus.NOT_FOUND, ApiErrorCode.NOT_FOUND, message))


class OpenApiHandler(JsonHandler):
    """``GET /api/v1/openapi.json``: the OpenAPI 3.1 document of this server's API.

    The document is generated once, from the route table, when the routes are
    built (:func:`pushsvc.http.routes.build`); this handler serves those bytes.
    """

    document: bytes

    def initialize(self, node: Node, document: bytes = b"{}") -> None:
        """Receive the node and the encoded document."""
        super().initialize(node)
        self.document = document

    def get(self) -> None:
        """200 with the document (core routes and the plugins' routes); no token needed."""
        self.set_status(HTTPStatus.OK)
        self.set_header("Content-Type", "application/json")
        self.finish(self.document)


class HealthHandler(JsonHandler):
    """``GET /healthz``: 200 while the process runs."""

    def get(self) -> None:
        """Always 200."""
        self.send_json(200, {"status": "ok"})


_FAILED_CHECK = {"serving": "draining"}  # how a failed check is named in the message


class ReadyHandler(JsonHandler):
    """``GET /readyz``: 200 when it can accept and persist; 503 naming the failed check."""

    async def get(self) -> None:
        """Check store (a real write, bounded by ``store.busy_timeout``), broker, draining."""
        node = self.node
        store_ok = await node.store.check()
        broker_ok = node.broker.healthy()
        # Every check is true when it passes; "serving" is false while the node drains.
        checks = {"store": store_ok, "broker": broker_ok, "serving": not node.draining}
        if all(checks.values()):
            self.send_json(200, {"status": "ready", "checks": checks})
            return
        failed = [_FAILED_CHECK.get(name, name) for name, ok in checks.items() if not ok]
        self.send_json(
            503,
            {
                "error": "unavailable",
                "message": f"not ready: {', '.join(failed)}",
                "checks": checks,
            },
        )


class MetricsHandler(JsonHandler):
    """``GET /metrics``: Prometheus text format."""

    def get(self) -> None:
        """The node's registry."""
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.node.metrics.registry))
