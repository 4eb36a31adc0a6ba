"""For operators: health endpoints, the rules file, the dashboard, and a real Prometheus.

The Prometheus binaries come from the Debian package ``prometheus``
(``make check`` installs it in CI); the tests that need them skip, naming
the missing binary, when it is absent.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from conftest import Server, free_port

Start = Callable[..., Any]
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "pushsvc-rules.yml"
RULES_TEST = ROOT / "contrib" / "prometheus" / "pushsvc-rules.test.yml"
PROMETHEUS_CONFIG = ROOT / "contrib" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "pushsvc-dashboard.json"
DOCS = ROOT / "docs" / "operations.md"
METRIC_NAME = re.compile(r"\b(pushsvc_[a-z0-9_]+)\b")
#: What the dashboard's template variables become outside Grafana.
DASHBOARD_VARIABLES = {"$__rate_interval": "5s", "$job": "pushsvc", "$instance": ".*"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; `make tools` installs it in CI)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (Debian package 'prometheus'; `make tools` installs it in CI)",
)


# -- health -------------------------------------------------------------------------


async def test_healthz_and_readyz(server: Server) -> None:
    status, body, _ = await server.http("GET", "/healthz", auth_header=False)
    assert (status, body) == (200, {"status": "ok"})
    status, body, _ = await server.http("GET", "/readyz", auth_header=False)
    assert status == 200
    assert body == {
        "status": "ready",
        "checks": {"store": True, "broker": True, "serving": True},
    }


async def test_readyz_names_draining(server: Server) -> None:
    server.node.draining = True
    try:
        status, body, _ = await server.http("GET", "/readyz", auth_header=False)
        assert status == 503
        assert body["error"] == "unavailable"
        assert body["message"] == "not ready: draining"
        assert body["checks"] == {"store": True, "broker": True, "serving": False}
        status, _body, _ = await server.http("GET", "/healthz", auth_header=False)
        assert status == 200  # alive while draining
    finally:
        server.node.draining = False


async def test_readyz_names_a_store_that_refuses_writes(
    start_server: Start, data_dir: Path
) -> None:
    server = await start_server(store={"busy_timeout": 0.1})
    holder = sqlite3.connect(data_dir / "pushsvc.sqlite3", timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # a second writer holds the write lock
    try:
        started = time.monotonic()
        status, body, _ = await server.http("GET", "/readyz", auth_header=False)
        assert status == 503
        assert body["message"] == "not ready: store"
        assert body["checks"] == {"store": False, "broker": True, "serving": True}
        assert time.monotonic() - started < 2  # bounded by store.busy_timeout
    finally:
        holder.rollback()
        holder.close()
    status, body, _ = await server.http("GET", "/readyz", auth_header=False)
    assert status == 200 and body["checks"]["store"] is True


# -- rules, scrape config, dashboard --------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """Every sample name a scrape of ``text`` can hold (families with no sample too)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def rule_exprs() -> list[str]:
    """The ``expr`` of every rule (the file is plain YAML; no YAML library needed)."""
    exprs: list[str] = []
    lines = RULES.read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("expr:"):
            continue
        inline = stripped[len("expr:") :].strip()
        if inline != "|":
            exprs.append(inline)
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(part for part in block if part))
    return exprs


def substitute(expr: str) -> str:
    for variable, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@needs_promtool
def test_rules_pass_promtool_check_and_unit_tests() -> None:
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        result = subprocess.run(
            ["promtool", *command], capture_output=True, text=True, timeout=60, cwd=RULES.parent
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_example_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_required_alerts() -> None:
    text = RULES.read_text()
    alerts = set(re.findall(r"- alert: (\w+)", text))
    required = {
        "PushsvcAckLatencyHigh",
        "PushsvcBacklogGrowing",
        "PushsvcDeadLetters",
        "PushsvcRedeliveryRatioHigh",
        "PushsvcEventLoopLag",
        "PushsvcStoreErrors",
        "PushsvcNotReady",
    }
    assert required <= alerts
    assert "deriv(pushsvc_pending_messages" in text


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "pushsvc"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert len(panels) >= 20
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["title"] and panel["description"]


async def test_dashboard_and_rules_use_only_exported_metrics(server: Server) -> None:
    client = await server.connect("dash")
    await client.send({"type": "chat", "text": "hi"})
    await client.recv_type("chat")
    status, text, _ = await server.http("GET", "/metrics", auth_header=False)
    assert status == 200
    exported = exposed_names(text)
    used: set[str] = set()
    for expr in [*dashboard_exprs(), *rule_exprs()]:
        names = set(METRIC_NAME.findall(expr))
        assert names or "up{" in expr, expr
        used |= names
        assert names <= exported, f"{expr}: {sorted(names - exported)} not in /metrics"
    # Every family of issue 4 is on the dashboard.
    for family in (
        "pushsvc_connections",
        "pushsvc_handshakes_total",
        "pushsvc_frames_received_total",
        "pushsvc_frames_sent_total",
        "pushsvc_received_bytes_total",
        "pushsvc_sent_bytes_total",
        "pushsvc_broadcast_recipients_bucket",
        "pushsvc_messages_accepted_total",
        "pushsvc_messages_delivered_total",
        "pushsvc_messages_acked_total",
        "pushsvc_messages_redelivered_total",
        "pushsvc_messages_dead_lettered_total",
        "pushsvc_pending_messages",
        "pushsvc_oldest_pending_age_seconds",
        "pushsvc_ack_latency_seconds_bucket",
        "pushsvc_rate_limited_total",
        "pushsvc_closes_total",
        "pushsvc_plugin_errors_total",
        "pushsvc_store_operation_seconds_bucket",
        "pushsvc_store_errors_total",
        "pushsvc_broker_up",
        "pushsvc_event_loop_lag_seconds_bucket",
    ):
        assert family in used, family


async def test_docs_reference_lists_every_exported_family(server: Server) -> None:
    status, text, _ = await server.http("GET", "/metrics", auth_header=False)
    assert status == 200
    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in text_string_to_metric_families(text)
    }
    rows = re.findall(r"^\| `(pushsvc_[a-z0-9_]+)` \| (\w+) \|", DOCS.read_text(), re.MULTILINE)
    assert dict(rows) == exported


# -- a real Prometheus ----------------------------------------------------------------


class Prometheus:
    """A ``prometheus`` process on a free loopback port, storage under tmp."""

    def __init__(self, tmp_path: Path, target_port: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = tmp_path / "prometheus.yml"
        shutil.copy(RULES, tmp_path / RULES.name)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES.name}\n"
            "scrape_configs:\n  - job_name: pushsvc\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log_path = tmp_path / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )

    async def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        response = await AsyncHTTPClient().fetch(
            f"{self.base}{path}?{query}", raise_error=False, request_timeout=5
        )
        is_json = response.headers.get("Content-Type", "").startswith("application/json")
        return response.code, (orjson.loads(response.body) if is_json else response.body)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                code, _ = await self.get("/-/ready")
            except OSError:
                code = 0
            if code == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready:\n{self.log_path.read_text()}")

    async def query(self, expr: str) -> list[dict[str, Any]]:
        code, body = await self.get("/api/v1/query", query=expr)
        assert code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value_when(
        self, expr: str, check: Callable[[float], bool], timeout: float
    ) -> float | None:
        """Query until the (single) value of ``expr`` passes ``check``."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            result = await self.query(expr)
            if result:
                last = float(result[0]["value"][1])
                if check(last):
                    return last
            await asyncio.sleep(0.2)
        return last

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        instance = Prometheus(tmp_path, target_port)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


@needs_prometheus
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_real_prometheus_scrapes_pushsvc(
    server: Server, prometheus_factory: Callable[[int], Prometheus]
) -> None:
    started = time.monotonic()
    prometheus = prometheus_factory(server.port)
    await prometheus.wait_ready(timeout=15)
    up = await prometheus.value_when('up{job="pushsvc"}', lambda v: v == 1, timeout=10)
    assert up == 1, prometheus.log_path.read_text()
    counter = 'sum(pushsvc_frames_received_total{job="pushsvc"}) or vector(0)'
    before = await prometheus.value_when(counter, lambda v: True, timeout=5)
    assert before == 0

    alice = await server.connect("alice")
    bob = await server.connect("bob")
    for index in range(5):
        await alice.send({"type": "chat", "text": f"m{index}"})
    await alice.send({"type": "private", "to": "bob", "text": "x"})
    private = await bob.recv_type("private")
    await bob.send({"type": "ack", "id": private["id"], "ref": "a"})
    assert (await bob.recv_type("reply"))["acked"] == 1

    moved = await prometheus.value_when(counter, lambda v: v >= 7, timeout=10)
    assert moved is not None and moved >= 7
    chat = await prometheus.value_when(
        'pushsvc_messages_delivered_total{job="pushsvc", type="chat"}', lambda v: v >= 10, 5
    )
    assert chat == 10
    # Every dashboard and alert expression is valid PromQL on real data.
    for expr in [*map(substitute, dashboard_exprs()), *rule_exprs()]:
        await prometheus.query(expr)
    code, rules = await prometheus.get("/api/v1/rules")
    assert code == 200
    groups = rules["data"]["groups"]
    assert [group["name"] for group in groups] == ["pushsvc"]
    assert all(rule["health"] in ("ok", "unknown") for rule in groups[0]["rules"])
    assert time.monotonic() - started < 30
