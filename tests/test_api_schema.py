"""The OpenAPI 3.1 document at ``/api/v1/openapi.json``, and schemathesis against the real server.

The schemathesis run (``st run``, every check: no 5xx, status codes, content
types, headers and bodies conform to the document, schema-violating input
refused, schema-valid input accepted) drives the in-process server from a
subprocess with a bounded number of examples and a fixed seed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, token
from pushsvc import ApiHandler, Config, hookimpl, openapi
from pushsvc.http import limits

Start = Callable[..., Any]
#: Every route of PROTOCOL §4 and the extensions, with its methods.
EXPECTED = {
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/metrics": {"get"},
    "/api/v1/openapi.json": {"get"},
    "/api/v1/publish": {"post"},
    "/api/v1/notify": {"post"},
    "/api/v1/users/{user}/pending": {"get"},
    "/api/v1/users/{user}/disconnect": {"post"},
    "/api/v1/users/{user}/dead-letters": {"get", "delete"},
    "/api/v1/users/{user}/dead-letters/requeue": {"post"},
    "/api/v1/users/{user}/dead-letters/delete": {"post"},
    "/api/v1/rooms/{room}/presence": {"get"},
    "/api/v1/rooms/{room}/history": {"get"},
    "/api/v1/revocations": {"get", "post"},
}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"}
EXAMPLES_PER_OPERATION = 50
SEED = 20261126


async def document(server: Server) -> dict[str, Any]:
    status, body, headers = await server.http("GET", "/api/v1/openapi.json", auth_header=False)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict)
    return body


async def test_document_describes_every_route(server: Server) -> None:
    doc = await document(server)
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"]
    assert {path: set(item) for path, item in doc["paths"].items()} == EXPECTED
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert doc["security"] == [{"bearerAuth": []}]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] and operation["summary"]
            if path in PUBLIC:
                assert operation["security"] == [], path
                continue
            assert "security" not in operation  # the bearer requirement applies
            for status in ("400", "401", "403", "404", "413", "429", "503"):
                assert status in operation["responses"], (method, path, status)
            if method in ("post", "delete"):
                assert "requestBody" in operation, (method, path)


async def test_document_covers_the_routes_the_app_serves(server: Server) -> None:
    """Every documented path answers something other than 404; notify comes from its plugin."""
    doc = await document(server)
    for path in doc["paths"]:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        status, _, _ = await server.http("GET", concrete)
        assert status != 404, path
    notify = doc["paths"]["/api/v1/notify"]["post"]
    assert "409" in notify["responses"]
    assert notify["parameters"][0]["name"] == "Idempotency-Key"
    request = notify["requestBody"]["content"]["application/json"]["schema"]
    assert request["properties"]["to"]["anyOf"][1]["maxItems"] == 10000


async def test_document_follows_config_and_plugins(start_server: Start) -> None:
    server = await start_server(api={"max_recipients": 7})
    doc = await document(server)
    request = doc["paths"]["/api/v1/notify"]["post"]["requestBody"]["content"]
    assert request["application/json"]["schema"]["properties"]["to"]["anyOf"][1]["maxItems"] == 7
    publish = doc["paths"]["/api/v1/publish"]["post"]["requestBody"]["content"]
    not_publishable = publish["application/json"]["schema"]["properties"]["type"]["anyOf"][0]
    assert {"join", "private", "notification"} <= set(not_publishable["not"]["enum"])
    await server.service.shutdown(pace=False)
    server = await start_server(plugins={"disabled": ["notification"]})
    doc = await document(server)
    assert "/api/v1/notify" not in doc["paths"]
    assert (await server.http("POST", "/api/v1/notify", {}))[0] == 404


def test_limits_in_the_document_are_the_api_limits() -> None:
    assert limits.MAX_IDS == 1000 and limits.MAX_LIMIT == 1000 and limits.MAX_ROOM_LENGTH == 200


class CountingRoutes:
    """A plugin whose ``pushsvc_register_routes`` counts its calls and describes its route."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def pushsvc_register_routes(self) -> list[tuple[str, type, dict[str, Any]]]:
        self.calls += 1
        return [(r"/api/v1/counted", CountedHandler, {"node": None})]


class CountedHandler(ApiHandler):
    """``GET /api/v1/counted``: a plugin API route built on the public ``ApiHandler``."""

    async def get(self) -> None:
        self.send_json(200, {"user": self.principal.user})

    @classmethod
    def openapi_paths(cls, config: Config) -> dict[str, Any]:
        ok = (200, "who asked", {"type": "object"})
        return {
            "/api/v1/counted": {
                "get": openapi.operation("Counted", operation_id="counted", tag="test", ok=ok)
            }
        }


async def test_routes_hook_runs_once_and_the_document_is_served_from_memory(
    start_server: Start,
) -> None:
    plugin = CountingRoutes()
    server = await start_server(extra=[("counting", plugin)])
    assert plugin.calls == 1  # the route table was built at startup
    first = await document(server)
    assert "/api/v1/counted" in first["paths"]
    for _ in range(3):
        assert await document(server) == first
    assert plugin.calls == 1  # neither the requests nor the document ran the hook again
    status, body, _ = await server.http("GET", "/api/v1/counted", sub="ops")
    assert status == 200 and body == {"user": "ops"}
    assert plugin.calls == 1


# -- schemathesis ---------------------------------------------------------------------

SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "409", "413", "422", "429"]

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "401", "403", "404", "409", "413", "429"]
"""


def failure_summary(output: str) -> str:
    """The failure lines of an ``st run`` output, without the (huge) curl commands."""
    keep = re.compile(r"^(_{3,}|- ST\d+|\s+Expected|\s+Invalid component|\[\d{3}\]|.*failures? in)")
    lines = [line[:300] for line in output.splitlines() if keep.match(line)]
    return "\n".join(lines[-80:])


@pytest.mark.slow
async def test_schemathesis_finds_no_violation(start_server: Start, tmp_path: Path) -> None:
    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    server = await start_server(api={"rate": 1_000_000, "burst": 1_000_000})
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    # A client of its own: generated revocations cannot revoke the token in use.
    client = f"schemathesis-{uuid.uuid4().hex}"
    jwt = token(client, scope="publish", ttl=600, extra={"jti": uuid.uuid4().hex})
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.base}/api/v1/openapi.json",
        "--url",
        server.base,
        "--header",
        f"Authorization: Bearer {jwt}",
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--seed",
        str(SEED),
        "--request-timeout",
        "10",
        "--no-color",
    ]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(  # cwd: st keeps a .schemathesis/ cache there
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    output = out.decode(errors="replace")
    assert proc.returncode == 0, failure_summary(output) or output[-4000:]
    assert "No issues found" in output, output[-2000:]
    tested = re.search(r"Tested:\s+(\d+)", output)
    operations = sum(map(len, EXPECTED.values())) - 1  # st does not test the document itself
    assert tested is not None and int(tested.group(1)) == operations
    assert time.monotonic() - started < 60
