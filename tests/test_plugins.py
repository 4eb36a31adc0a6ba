"""Plugins: entry-point loading, conflicts, failures, dispatch, the third-party example."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import tornado.web
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

import pushsvc
from conftest import BIN, SECRET, Client, Server
from pushsvc import CommandError, Field, FrameContext, MessageType, Principal, Reply, hookimpl
from pushsvc.plugin import hookspecs
from pushsvc.plugin.manager import ISOLATED_HOOKS, PluginError, load_plugins

ROOT = Path(__file__).resolve().parent.parent


def fake_distribution(root: Path, name: str, module_source: str, entry: str = "") -> Path:
    """Write an installed-looking distribution (module + dist-info) under ``root``."""
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pushsvc]\n{entry or module} = {module}\n")
    return root


def run_cli(
    *args: str, pythonpath: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {"PUSHSVC_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin", **(env or {})}
    if pythonpath is not None:
        full_env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(BIN / "pushsvc"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_builtins_load_through_the_entry_point_group() -> None:
    plugins = load_plugins()
    by_name = {p.name: p for p in plugins.loaded}
    for name in ("chat", "private", "notification"):
        assert by_name[name].distribution.startswith("pushsvc ")
        assert by_name[name].message_types == (name,)
    assert by_name["poke"].distribution == "pushsvc-poke 1.0.0"
    # Core never names the built-ins.
    for source in (ROOT / "pushsvc").rglob("*.py"):
        assert "pushsvc_plugins" not in source.read_text(), source


def test_cli_lists_plugins() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "chat  (pushsvc " in result.stdout
    assert "poke  (pushsvc-poke 1.0.0" in result.stdout
    assert "private: at-least-once" in result.stdout


def test_cli_lists_hooks_with_marks_and_routes(tmp_path: Path) -> None:
    fake_distribution(
        tmp_path,
        "gatekeeper",
        """
        import tornado.web
        from pushsvc import hookimpl

        class Status(tornado.web.RequestHandler):
            def get(self):
                self.write({})

        @hookimpl(tryfirst=True)
        def pushsvc_authorize_room(principal, room):
            return None

        @hookimpl(trylast=True)
        def pushsvc_connected(principal, session):
            pass

        @hookimpl
        def pushsvc_register_routes():
            return [(r"/gate/status", Status, {})]
    """,
    )
    result = run_cli("plugins", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("gatekeeper  (gatekeeper 1.0, module gatekeeper)\n", 1)[1]
    assert section.startswith(
        "  hooks:\n"
        "    pushsvc_authorize_room  [tryfirst]\n"
        "    pushsvc_connected  [trylast]\n"
        "    pushsvc_register_routes\n"
        "  routes:\n"
        "    /gate/status  gatekeeper.Status\n"
    ), section
    assert "  message types:\n    poke: at-least-once, cost 2" in result.stdout
    assert "    /poke/stats  pushsvc_poke.PokeStats" in result.stdout


def test_hooks_of_and_routes_of() -> None:
    class Handler:
        pass

    class Both:
        @hookimpl(tryfirst=True)
        def pushsvc_authorize_room(self, principal: Principal, room: str) -> bool | None:
            return None

        @hookimpl
        def pushsvc_register_routes(self) -> list[tuple[str, type, dict[str, object]]]:
            return [("/both", Handler, {})]

    plugins = load_plugins(extra=[("both", Both())])
    assert [(h.hook, h.marks) for h in plugins.hooks_of("both")] == [
        ("pushsvc_authorize_room", ("tryfirst",)),
        ("pushsvc_register_routes", ()),
    ]
    assert plugins.routes_of("both") == [("/both", Handler)]
    assert plugins.routes_of("chat") == []


def test_duplicate_type_stops_startup_naming_both(tmp_path: Path) -> None:
    fake_distribution(
        tmp_path,
        "chat-clone",
        """
        from pushsvc import MessageType, hookimpl

        async def handle(ctx):
            return None

        @hookimpl
        def pushsvc_register_message_types():
            return [MessageType("chat", handle)]
    """,
    )
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), pythonpath=tmp_path)
    assert result.returncode != 0
    assert "'chat' is declared by two plugins" in result.stderr
    assert "pushsvc 0.1.0" in result.stderr and "chat-clone 1.0" in result.stderr
    # Disabling one of them resolves it.
    listed = run_cli("plugins", pythonpath=tmp_path, env={"PUSHSVC_PLUGINS__DISABLED": "chat"})
    assert listed.returncode == 0, listed.stderr
    assert "chat  (disabled by plugins.disabled)" in listed.stdout


def test_plugin_that_fails_to_import_stops_startup(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "broken-plugin", "import does_not_exist_anywhere\n")
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), pythonpath=tmp_path)
    assert result.returncode != 0
    assert "plugin 'broken_plugin' (broken-plugin 1.0) failed to load" in result.stderr
    assert "does_not_exist_anywhere" in result.stderr


def test_unknown_hook_is_rejected() -> None:
    class Typo:
        @hookimpl
        def pushsvc_regster_message_types(self) -> list[Any]:
            return []

    with pytest.raises(PluginError, match="unknown hook"):
        load_plugins(extra=[("typo", Typo())])


def test_core_types_cannot_be_taken() -> None:
    class Thief:
        @hookimpl
        def pushsvc_register_message_types(self) -> list[MessageType]:
            async def handle(ctx: FrameContext) -> None:
                return None

            return [MessageType("ack", handle)]

    with pytest.raises(PluginError, match="core command"):
        load_plugins(extra=[("thief", Thief())])


class Crashy:
    """A plugin whose handler raises, and one that authorizes rooms."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        async def boom(ctx: FrameContext) -> Reply:
            raise RuntimeError("kaboom")

        async def deny(ctx: FrameContext) -> Reply:
            raise CommandError("forbidden", "no thanks")

        async def echo(ctx: FrameContext) -> Reply:
            return Reply({"echo": ctx.frame["say"], "user": ctx.principal.user})

        return [
            MessageType("boom", boom),
            MessageType("deny", deny),
            MessageType("echo", echo, {"say": Field(str)}, cost=0.5),
        ]

    @hookimpl
    def pushsvc_authorize_room(self, principal: Any, room: str) -> bool | None:
        if room.startswith("vip-"):
            return principal.user == "vip"
        return None


@pytest.fixture
async def crashy_server(start_server: Any) -> Server:
    server: Server = await start_server(extra=[("crashy", Crashy())])
    return server


async def test_plugin_errors_are_contained(crashy_server: Server) -> None:
    client = await crashy_server.connect("c")
    await client.send({"type": "boom", "ref": "b"})
    error = await client.recv_type("error")
    assert error == {
        "type": "error",
        "code": "internal",
        "message": "plugin crashy failed",
        "ref": "b",
    }
    await client.send({"type": "deny", "ref": "d"})
    assert (await client.recv_type("error"))["code"] == "forbidden"
    await client.send({"type": "echo", "say": "hello", "ref": "e"})
    reply = await client.recv_type("reply")
    assert reply == {"type": "reply", "ref": "e", "ok": True, "echo": "hello", "user": "c"}
    metric = crashy_server.node.metrics.plugin_errors.labels(
        "crashy", "message_handler"
    )._value.get()
    assert metric == 1


async def test_authorize_room_hook_decides_first(crashy_server: Server) -> None:
    vip = await crashy_server.connect("vip")
    other = await crashy_server.connect("other", rooms=["*"])
    await vip.send({"type": "join", "room": "vip-lounge", "ref": "1"})
    assert (await vip.recv_type("reply", "error"))["type"] == "reply"
    await other.send({"type": "join", "room": "vip-lounge", "ref": "2"})
    assert (await other.recv_type("reply", "error"))["code"] == "forbidden"


async def test_disabled_plugin_type_is_unknown(start_server: Any) -> None:
    server = await start_server(plugins={"disabled": ["chat"]})
    client = await server.connect("x")
    await client.send({"type": "chat", "text": "hi"})
    assert (await client.recv_type("error"))["code"] == "unknown_type"


async def test_third_party_plugin_over_a_real_socket(server: Server) -> None:
    sender = await server.connect("ann")
    target = await server.connect("ben")
    await sender.send({"type": "poke", "to": "ben", "emoji": "👋", "ref": "p"})
    reply = await sender.recv_type("reply")
    poke = await target.recv_type("poke")
    assert poke["id"] == reply["id"] and poke["ack"] is True
    assert poke["from"] == "ann" and poke["emoji"] == "👋"
    await target.send({"type": "ack", "id": poke["id"], "ref": "a"})
    assert (await target.recv_type("reply"))["acked"] == 1
    status, body, _ = await server.http("GET", "/poke/stats", auth_header=False)
    assert status == 200 and body["pokes"]["ann"] >= 1


def hook_kind(name: str) -> str:
    """What docs/plugins.md must call a hook's kind, from its spec and how pushsvc calls it."""
    spec = getattr(hookspecs, name).pushsvc_spec
    if spec["firstresult"]:
        return "firstresult"
    if name in ("pushsvc_startup", "pushsvc_shutdown"):
        return "lifecycle"
    if name in ISOLATED_HOOKS:
        return "notification"
    return "collect"


def test_every_hook_is_documented() -> None:
    """One section per hookspec: its exact signature as the heading, its kind, an example."""
    docs = (ROOT / "docs" / "plugins.md").read_text()
    specs = [name for name in dir(hookspecs) if name.startswith("pushsvc_")]
    assert len(specs) >= 12
    headings = [line for line in docs.splitlines() if line.startswith("### `pushsvc_")]
    assert len(headings) == len(specs), headings
    for name in specs:
        function = getattr(hookspecs, name)
        assert function.__doc__ and "Example::" in function.__doc__, name
        signature = f"{name}{inspect.signature(function)}".replace("'", "")
        heading = f"### `{signature}`"
        assert heading in docs, f"docs/plugins.md lacks the section: {heading}"
        section = docs.split(heading, 1)[1].split("\n#", 1)[0]
        kind = hook_kind(name)
        assert section.lstrip().startswith(f"Kind: {kind}."), (name, kind)
        example = section.split("```python\n", 1)[-1]
        assert "```python" in section and "@hookimpl" in example, name
        assert f"def {name}(" in example, name
        assert f"`{name}`" in docs.split("## 3. Hooks", 1)[1].split("### Errors", 1)[0] or (
            kind == "collect"
        ), f"{name} missing from the kinds table"


def test_public_signatures_match_the_docs() -> None:
    """Every ``Name(args)`` of an exported name, and the FrameContext methods, as documented."""
    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = docs[docs.index("## 4. The plugin API") : docs.index("## 5.")]
    context_row = next(line for line in section.splitlines() if line.startswith("| `FrameContext`"))
    mentions = [(m, pushsvc) for m in re.finditer(r"`([A-Za-z]+)\(([^`]+)\)`", section)]
    mentions += [
        (m, pushsvc.FrameContext) for m in re.finditer(r"`([a-z]+)\(([^`]+)\)`", context_row)
    ]
    checked = set()
    for match, owner in mentions:
        name, arguments = match.groups()
        if owner is pushsvc and name not in pushsvc.__all__:
            continue
        target = getattr(owner, name, None)
        if target is None or not callable(target):
            continue
        documented = [
            part.split("=")[0].strip()
            for part in arguments.split(",")
            if part.strip() and part.strip() != "*"
        ]
        actual = [p for p in inspect.signature(target).parameters if p != "self"]
        assert documented == actual, (name, documented, actual)
        checked.add(name)
    assert {"MessageType", "Field", "Setting", "AuthError", "send", "publish", "members"} <= checked


def test_the_plugin_api_version_is_documented_and_checked() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f'`pushsvc.PLUGIN_API_VERSION` is `"{pushsvc.PLUGIN_API_VERSION}"`' in docs
    major, minor = map(int, pushsvc.PLUGIN_API_VERSION.split("."))

    def plugin(version: object) -> object:
        class Versioned:
            PUSHSVC_PLUGIN_API = version

        return Versioned()

    for ok in (f"{major}.0", f"{major}", pushsvc.PLUGIN_API_VERSION):
        load_plugins(extra=[("fine", plugin(ok))])
    for too_new in (f"{major}.{minor + 1}", f"{major + 1}.0"):
        with pytest.raises(PluginError, match=f"needs plugin API {too_new}; this pushsvc"):
            load_plugins(extra=[("new", plugin(too_new))])
    with pytest.raises(PluginError, match=r"must be a 'MAJOR\.MINOR' string"):
        load_plugins(extra=[("odd", plugin(1.1))])


def test_python_m_pushsvc() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pushsvc", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("pushsvc ")


def test_api_handler_is_public_and_import_pushsvc_stays_light() -> None:
    """``from pushsvc import ApiHandler`` works; ``import pushsvc`` alone loads no HTTP layer."""
    script = textwrap.dedent(
        """
        import sys
        import pushsvc
        heavy = sorted(
            m for m in sys.modules
            if m.startswith(("pushsvc.http", "pushsvc.core", "pushsvc.transport", "tornado.web"))
        )
        assert not heavy, heavy
        assert "ApiHandler" in pushsvc.__all__ and "ApiHandler" in dir(pushsvc)
        from pushsvc import ApiError, ApiHandler, openapi
        from pushsvc.http.base import ApiHandler as Base
        assert ApiHandler is Base and "pushsvc.http.base" in sys.modules
        assert ApiError.__module__ == "pushsvc.http.base"
        assert openapi.__name__ == "pushsvc.http.openapi"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        _ = pushsvc.NoSuchName


def test_pushsvc_api_is_a_deprecated_alias() -> None:
    script = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from pushsvc.api import ApiError, ApiHandler, JsonHandler, bad_request
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught
        import pushsvc
        assert ApiHandler is pushsvc.ApiHandler and ApiError is pushsvc.ApiError
        assert bad_request("x: y").status == 400 and issubclass(ApiHandler, JsonHandler)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_builtin_plugins_import_only_the_public_api() -> None:
    """``plugins/*.py`` import from ``pushsvc`` itself, never from its submodules."""
    for source in sorted((ROOT / "plugins").glob("*.py")):
        for line in source.read_text().splitlines():
            if line.startswith(("from pushsvc", "import pushsvc")):
                assert line.startswith("from pushsvc import "), f"{source.name}: {line}"


def test_every_public_name_is_documented() -> None:
    """docs/plugins.md section 4 lists every name of ``pushsvc.__all__``, and nothing else."""
    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = docs[docs.index("## 4. The plugin API") : docs.index("## 5.")]
    names = set(pushsvc.__all__) - {"__version__"}
    rows = {
        line.split("|")[1].strip().strip("`").split("(")[0].split("`")[0]
        for line in section.splitlines()
        if line.startswith("| `")
    }
    for name in names:
        assert f"| `{name}" in section or f"/ `{name}" in section, name
        assert getattr(pushsvc, name) is not None
    handler = pushsvc.ApiHandler
    members = rows - names - {"Guarantee.AT_MOST_ONCE", "Reply"}
    for member in members:
        assert hasattr(handler, member) or member in ("node", "principal"), member
    for helper in ("operation", "nullable", "json_body", "json_response", "path_param"):
        assert f"`{helper}()`" in section and callable(getattr(pushsvc.openapi, helper))
    signature = inspect.signature(handler.send)
    assert list(signature.parameters) == [
        "self",
        "to",
        "message",
        "guarantee",
        "ttl",
        "idempotency",
        "push",
    ]
    assert "`send(to, message, guarantee, ttl=None, *, idempotency=None, push=None)`" in section


class AsyncLifecycle:
    """A plugin whose startup and shutdown hooks are ``async def``."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    async def pushsvc_startup(self, node: Any) -> None:
        await asyncio.sleep(0)
        self.events.append("startup")

    @hookimpl
    async def pushsvc_shutdown(self, node: Any) -> None:
        await asyncio.sleep(0)
        self.events.append("shutdown")


class FailingStartup:
    @hookimpl
    async def pushsvc_startup(self, node: Any) -> None:
        raise RuntimeError("the plugin's database is unreachable")


async def test_async_startup_and_shutdown_hooks_run(start_server: Any) -> None:
    plugin = AsyncLifecycle()
    server = await start_server(extra=[("lifecycle", plugin)])
    assert plugin.events == ["startup"]
    await server.service.shutdown(pace=False)
    assert plugin.events == ["startup", "shutdown"]


async def test_an_async_startup_hook_that_raises_stops_startup(start_server: Any) -> None:
    with pytest.raises(RuntimeError, match="database is unreachable"):
        await start_server(extra=[("failing", FailingStartup())])


class RaisesOnConnect:
    @hookimpl
    def pushsvc_connected(self, principal: Any, session: str) -> None:
        raise RuntimeError("first plugin broke")


class RecordsLast:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(trylast=True)
    def pushsvc_connected(self, principal: Any) -> None:
        self.seen.append(principal.user)


async def test_one_plugins_failing_hook_does_not_silence_the_others(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = RecordsLast()
    server = await start_server(extra=[("recorder", recorder), ("broken", RaisesOnConnect())])
    await server.connect("alice")
    for _ in range(100):
        if recorder.seen:
            break
        await asyncio.sleep(0.01)
    assert recorder.seen == ["alice"]
    assert any(
        "plugin broken: hook pushsvc_connected raised RuntimeError" in r.getMessage()
        for r in caplog.records
    )
    errors = server.node.metrics.plugin_errors
    assert errors.labels("broken", "pushsvc_connected")._value.get() == 1
    assert errors.labels("recorder", "pushsvc_connected")._value.get() == 0


class AsyncRaisesOnDisconnect:
    @hookimpl
    async def pushsvc_disconnected(self, principal: Any, session: str) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async plugin broke")


async def test_an_async_notification_hook_error_is_counted(start_server: Any) -> None:
    server = await start_server(extra=[("asyncbroken", AsyncRaisesOnDisconnect())])
    client = await server.connect("alice")
    client.close()
    counter = server.node.metrics.plugin_errors.labels("asyncbroken", "pushsvc_disconnected")
    for _ in range(200):
        if counter._value.get():
            break
        await asyncio.sleep(0.01)
    assert counter._value.get() == 1


class RaisesOnAuthorize:
    @hookimpl(tryfirst=True)
    def pushsvc_authorize_room(self, principal: Any, room: str) -> bool | None:
        if room.startswith("bad-"):
            raise RuntimeError("the room service is down")
        return None


async def test_a_firstresult_hook_that_raises_refuses_and_is_counted(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(extra=[("gate", RaisesOnAuthorize())])
    client = await server.connect("alice", rooms=["*"])
    await client.send({"type": "join", "room": "bad-one", "ref": "1"})
    error = await client.recv_type("error")
    assert error["code"] == "forbidden" and error["ref"] == "1"
    assert server.node.metrics.plugin_errors.labels("gate", "pushsvc_authorize_room")._value.get()
    assert any(
        "plugin gate: hook pushsvc_authorize_room raised RuntimeError" in r.getMessage()
        for r in caplog.records
    )
    # The connection goes on, and the next call asks every plugin again.
    await client.send({"type": "join", "room": "lobby", "ref": "2"})
    assert (await client.recv_type("reply"))["room"] == "lobby"


class BrokenRoutes:
    class Broken(tornado.web.RequestHandler):
        def get(self) -> None:
            raise RuntimeError("route broke")

    class BrokenApi(pushsvc.ApiHandler):
        async def get(self) -> None:
            raise RuntimeError("api route broke")

    @hookimpl
    def pushsvc_register_routes(self) -> list[tuple[str, type, dict[str, Any]]]:
        return [
            (r"/broken", self.Broken, {}),
            (r"/broken-api", self.BrokenApi, {"node": None}),
        ]


async def test_a_raising_route_is_logged_with_its_plugin_and_counted(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(extra=[("routes", BrokenRoutes())])
    status, _body, _ = await server.http("GET", "/broken", auth_header=False)
    assert status == 500
    status, body, _ = await server.http("GET", "/broken-api")
    assert status == 500 and body["error"] == "internal"
    assert server.node.metrics.plugin_errors.labels("routes", "route")._value.get() == 2
    assert any(
        "plugin routes: route (GET /broken) raised RuntimeError" in r.getMessage()
        for r in caplog.records
    )
    # Other routes and plugins go on.
    status, body, _ = await server.http("GET", "/poke/stats", auth_header=False)
    assert status == 200
    # A handled HTTP error is an answer, not a plugin failure.
    status, _body, _ = await server.http("POST", "/broken", auth_header=False)
    assert status == 405
    assert server.node.metrics.plugin_errors.labels("routes", "route")._value.get() == 2


def test_a_wrapper_on_an_isolated_hook_is_refused() -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def pushsvc_connected(self, principal: Any, session: str) -> Any:
            return (yield)

    with pytest.raises(PluginError, match="pushsvc_connected cannot be a wrapper"):
        load_plugins(extra=[("wrapping", Wrapping())])


def test_check_config_names_the_plugin_file_and_line_of_an_import_error(tmp_path: Path) -> None:
    fake_distribution(
        tmp_path,
        "typing-plugin",
        """
        import os

        SETTINGS = {"rate": 1}
        RATE = os.environ["typing_rate"]
        """,
        entry="typing",
    )
    module = tmp_path / "typing_plugin.py"
    result = run_cli("check-config", pythonpath=tmp_path)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "plugin 'typing' (typing-plugin 1.0) failed to load" in result.stderr
    assert "KeyError: 'typing_rate'" in result.stderr
    assert f"at {module}, line 5" in result.stderr  # the plugin's line, not os.py's
    # Disabled, it is not loaded: the config is fine again.
    ok = run_cli("check-config", pythonpath=tmp_path, env={"PUSHSVC_PLUGINS__DISABLED": "typing"})
    assert ok.returncode == 0, ok.stderr
    assert "[server]" in ok.stdout


def test_check_config_names_a_syntax_error_and_a_failing_register_hook(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "syntax-plugin", "x = 1\ndef broken(:\n    pass\n")
    result = run_cli("check-config", pythonpath=tmp_path)
    assert result.returncode == 3
    assert "plugin 'syntax_plugin' (syntax-plugin 1.0) failed to load: SyntaxError" in result.stderr
    assert f"at {tmp_path / 'syntax_plugin.py'}, line 2" in result.stderr


def test_register_hook_error_names_the_plugin_and_line() -> None:
    class Faulty:
        @hookimpl
        def pushsvc_register_message_types(self) -> list[MessageType]:
            return [{"x": 1}["y"]]  # type: ignore[list-item]

    with pytest.raises(PluginError) as info:
        load_plugins(extra=[("faulty", Faulty())])
    error = info.value
    assert error.plugin == "faulty" and error.file == __file__
    assert (
        error.line is not None
        and '{"x": 1}["y"]' in (Path(__file__).read_text().splitlines()[error.line - 1])
    )
    assert "failed in pushsvc_register_message_types: KeyError: 'y'" in str(error)


TYPING_PLUGIN = """
    from pushsvc import Setting, hookimpl

    @hookimpl
    def pushsvc_config_schema():
        return {"rate": Setting(2.0, "Typing events per second.", minimum=0)}
"""


def test_check_config_checks_plugin_settings(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "typing-plugin", TYPING_PLUGIN, entry="typing")
    config = tmp_path / "c.toml"
    config.write_text("[plugins.typing]\nrate = -1\n")
    bad = run_cli("check-config", "--config", str(config), pythonpath=tmp_path)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert "pushsvc: bad config: plugins.typing.rate: must be at least 0" in bad.stderr
    env = {"PUSHSVC_PLUGINS__TYPING__RATE": "4"}
    good = run_cli("check-config", "--config", str(config), pythonpath=tmp_path, env=env)
    assert good.returncode == 0, good.stderr
    assert "[plugins.typing]\nrate = 4.0\n" in good.stdout


def test_plugin_reads_its_settings_from_the_node_config() -> None:
    from pushsvc import Config, Setting

    class Typing:
        @hookimpl
        def pushsvc_config_schema(self) -> dict[str, Setting]:
            return {"rate": Setting(2.0, "Rate.", minimum=0)}

    plugins = load_plugins(extra=[("typing", Typing())])
    assert set(plugins.config_schemas) == {"typing"}
    config = Config().with_plugin_schemas(plugins.config_schemas)
    assert config.plugin("typing") == {"rate": 2.0}

    class NotASetting:
        @hookimpl
        def pushsvc_config_schema(self) -> dict[str, object]:
            return {"rate": 2.0}

    with pytest.raises(
        PluginError, match=r"declares setting 'rate' as 2\.0, not a pushsvc\.Setting"
    ):
        load_plugins(extra=[("bad", NotASetting())])


class Typing:
    """``typing``: to the room's other connections; the reply lists the room's members."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        async def typing(ctx: FrameContext) -> Reply:
            room = ctx.frame["room"]
            message = {"type": "typing", "room": room, "user": ctx.principal.user}
            message_id = await ctx.publish(room, message, exclude=ctx.session)
            return Reply({"id": message_id, "members": await ctx.members(room)})

        return [MessageType("typing", typing, {"room": Field(str)})]


@pytest.mark.parametrize("broker", ["memory://", "memory://?delivery=async"])
async def test_publish_excludes_a_session_and_members_lists_the_room(
    start_server: Any, broker: str
) -> None:
    """``memory://?delivery=async`` sends the envelope through its wire form: the session
    left out travels in it, as it reaches the other nodes."""
    server = await start_server(extra=[("typing", Typing())], broker={"url": broker})
    sender = await server.connect("ann", rooms=["*"])
    same_user = await server.connect("ann", rooms=["*"])
    other = await server.connect("ben", rooms=["*"])
    for client in (sender, same_user, other):
        await client.send({"type": "join", "room": "r", "ref": "j"})
        await client.recv_type("reply")
    await sender.send({"type": "typing", "room": "r", "ref": "t"})
    reply = await sender.recv_type("reply")
    assert reply["members"] == ["ann", "ben"]
    for client in (same_user, other):
        frame = await client.recv_type("typing")
        assert frame["id"] == reply["id"] and frame["user"] == "ann"
    await sender.expect_nothing(0.2, ignore=("presence",))
    delivered = server.node.metrics.messages_delivered.labels("typing")._value.get()
    assert delivered == 2


class RecordedTyping:
    """``note``: recorded in the room's history, to the room's other connections."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        async def note(ctx: FrameContext) -> Reply:
            room = ctx.frame["room"]
            message = {"type": "note", "room": room, "text": ctx.frame["text"]}
            return Reply({"id": await ctx.publish(room, message, exclude=ctx.session)})

        fields = {"room": Field(str), "text": Field(str)}
        return [MessageType("note", note, fields, history=True)]


@pytest.mark.parametrize("broker", ["memory://", "memory://?delivery=async"])
async def test_a_recorded_publication_with_exclude(start_server: Any, broker: str) -> None:
    """Left out live, but in the history: it carries an offset and a resume replays it."""
    server = await start_server(
        extra=[("note", RecordedTyping())], broker={"url": broker}, chat={"auto_join": False}
    )
    sender = await server.connect("ann", rooms=["*"])
    other = await server.connect("ben", rooms=["*"])
    for client in (sender, other):
        await client.send({"type": "join", "room": "r", "ref": "j"})
        await client.recv_type("reply")
    for text in ("one", "two"):
        await sender.send({"type": "note", "room": "r", "text": text, "ref": text})
        assert (await sender.recv_type("reply"))["ok"] is True
    got = [await other.recv_type("note") for _ in range(2)]
    assert [(f["text"], f["offset"]) for f in got] == [("one", 1), ("two", 2)]
    await sender.expect_nothing(0.2, ignore=("presence",))
    again = await server.connect("ann", rooms=["*"])
    since = {"offset": 0, "epoch": got[0]["epoch"]}
    await again.send({"type": "join", "room": "r", "since": since, "ref": "j"})
    reply = await again.recv_type("reply")
    assert reply["recovered"] is True and reply["recovered_count"] == 2
    assert [(await again.recv_type("note"))["text"] for _ in range(2)] == ["one", "two"]


class RoomEvents:
    """Records ``pushsvc_joined`` / ``pushsvc_left`` (one async, one sync)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    @hookimpl
    async def pushsvc_joined(self, principal: Any, session: str, room: str) -> None:
        self.events.append(("joined", principal.user, room))

    @hookimpl
    def pushsvc_left(self, principal: Any, room: str) -> None:
        self.events.append(("left", principal.user, room))

    @hookimpl
    def pushsvc_disconnected(self, principal: Any) -> None:
        self.events.append(("disconnected", principal.user, ""))


async def test_joined_and_left_hooks(start_server: Any) -> None:
    plugin = RoomEvents()
    server = await start_server(extra=[("rooms", plugin)], chat={"auto_join": False})
    client = await server.connect("ann", rooms=["*"])
    for frame in (
        {"type": "join", "room": "r1", "ref": "1"},
        {"type": "join", "room": "r1", "ref": "2"},  # already in: no second event
        {"type": "leave", "room": "r1", "ref": "3"},
        {"type": "join", "room": "r2", "ref": "4"},
    ):
        await client.send(frame)
        await client.recv_type("reply")
    client.close()
    for _ in range(200):
        if plugin.events and plugin.events[-1][0] == "disconnected":
            break
        await asyncio.sleep(0.01)
    assert plugin.events == [
        ("joined", "ann", "r1"),
        ("left", "ann", "r1"),
        ("joined", "ann", "r2"),
        ("left", "ann", "r2"),
        ("disconnected", "ann", ""),
    ]


class ApiKeys:
    """Accepts ``key_good`` tokens and a ``sid`` cookie; refuses other ``key_`` tokens."""

    @hookimpl
    async def pushsvc_authenticate(
        self, token: str | None, request: pushsvc.HandshakeRequest | None
    ) -> Principal | None:
        await asyncio.sleep(0)
        if token == "key_boom":
            raise RuntimeError("the key store is down")
        if token is not None and token.startswith("key_"):
            if token != "key_good":
                raise pushsvc.AuthError("unknown_key", "no such API key")
            return Principal("keyed", "Keyed", frozenset(), ("*",), None)
        if token is None and request is not None and request.cookie("sid") == "s3cret":
            return Principal("cookie", None, frozenset(), None, None)
        return None


async def raw_connect(
    server: Server, suffix: str = "", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Connect with no minted token: ``(101, Client)``, or ``(status, error body)``."""
    try:
        conn = await websocket_connect(HTTPRequest(server.ws_url + suffix, headers=headers))
    except HTTPClientError as exc:
        return exc.code, orjson.loads(exc.response.body if exc.response else b"null")
    client = Client(conn)
    client.welcome = await client.recv_type("welcome")
    return 101, client


async def test_authenticate_hook_accepts_keys_and_cookies_before_the_jwt(
    start_server: Any,
) -> None:
    server = await start_server(extra=[("keys", ApiKeys())])
    status, keyed = await raw_connect(server, "?access_token=key_good")
    assert status == 101 and keyed.welcome["user"] == "keyed"
    status, cookie = await raw_connect(server, headers={"Cookie": "theme=dark; sid=s3cret"})
    assert status == 101 and cookie.welcome["user"] == "cookie"
    # An auth frame goes through the hook too.
    await keyed.send({"type": "auth", "token": "key_good", "ref": "a"})
    assert (await keyed.recv_type("reply", "error"))["type"] == "reply"
    await keyed.send({"type": "auth", "token": "key_nope", "ref": "b"})
    error = await keyed.recv_type("error")
    assert error["code"] == "forbidden" and "unknown_key" in error["message"]
    # A JWT still works when no plugin decides.
    jwt_client = await server.connect("ann")
    assert jwt_client.welcome["user"] == "ann"
    # Refusals: the plugin's own reason; a plugin error fails closed and is counted.
    assert await raw_connect(server, "?access_token=key_nope") == (
        401,
        {"error": "unauthorized", "reason": "unknown_key"},
    )
    assert await raw_connect(server, "?access_token=key_boom") == (
        401,
        {"error": "unauthorized", "reason": "plugin_error"},
    )
    errors = server.node.metrics.plugin_errors.labels("keys", "pushsvc_authenticate")
    assert errors._value.get() == 1
    assert await raw_connect(server) == (401, {"error": "unauthorized", "reason": "missing_token"})
    # The server API does not take plugin credentials.
    status, _body, _ = await server.http(
        "GET", "/api/v1/rooms/lobby/presence", headers={"Authorization": "Bearer key_good"}
    )
    assert status == 401


class Buckets:
    """``typing`` with a bucket of its own, ``say`` and ``heavy`` on the shared ones."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        async def ok(ctx: FrameContext) -> Reply:
            return Reply()

        return [
            MessageType("typing", ok, rate=0.001, burst=2),
            MessageType("say", ok),
            MessageType("heavy", ok, {"n": Field(int)}, cost=3),
        ]


async def answers(client: Client, frame: dict[str, Any], count: int) -> list[str]:
    """Send ``frame`` ``count`` times; the reply or the error code of each."""
    out = []
    for i in range(count):
        await client.send({**frame, "ref": str(i)})
        answer = await client.recv_type("reply", "error")
        out.append("ok" if answer["type"] == "reply" else f"{answer['code']} {answer['message']}")
    return out


async def test_a_type_with_its_own_bucket_spares_the_shared_ones(start_server: Any) -> None:
    slow = {"rate": 0.001, "burst": 5, "user_rate": 0.001, "user_burst": 50}
    server = await start_server(
        extra=[("buckets", Buckets())],
        ratelimit={**slow, "abuse_violations": 1000},
        chat={"auto_join": False},
    )
    client = await server.connect("ann")
    limited = "rate_limited rate limit exceeded"
    assert await answers(client, {"type": "typing"}, 4) == [
        "ok",
        "ok",
        f"{limited} (type)",
        f"{limited} (type)",
    ]
    # Refused typing frames took nothing from the connection's bucket: 5 - 2 = 3 left.
    assert await answers(client, {"type": "say"}, 4) == [
        "ok",
        "ok",
        "ok",
        f"{limited} (connection)",
    ]
    assert server.node.metrics.rate_limited.labels("type")._value.get() == 2

    # The cost rule: a frame of a declared type costs its cost even when its fields are bad;
    # anything naming no declared type costs 1.
    other = await server.connect("ben")
    bad = await answers(other, {"type": "heavy", "n": "x"}, 2)
    assert [a.split()[0] for a in bad] == ["bad_request", "rate_limited"]  # 5 - 3 = 2 < 3
    assert (await answers(other, {"type": "nope"}, 1))[0].startswith("unknown_type")
    assert (await answers(other, {"type": "nope"}, 1))[0].startswith("unknown_type")
    assert (await answers(other, {"type": "nope"}, 1))[0].startswith("rate_limited")


def test_message_type_bucket_is_checked() -> None:
    async def ok(ctx: FrameContext) -> None:
        return None

    assert MessageType("t", ok).bucket is None
    assert MessageType("t", ok, rate=0.5).bucket == (0.5, 1.0)
    assert MessageType("t", ok, rate=4).bucket == (4, 4)
    assert MessageType("t", ok, rate=4, burst=10).bucket == (4, 10)
    for kwargs, problem in (
        ({"rate": 0}, "rate must be above 0"),
        ({"burst": 3}, "burst needs a rate"),
        ({"rate": 1, "burst": 0.5}, "burst needs a rate and must be >= 1"),
        ({"cost": -1}, "cost must be at least 0"),
    ):
        with pytest.raises(ValueError, match=problem):
            MessageType("t", ok, **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_new_plugin_writes_a_distribution_that_installs_and_passes_its_tests(
    tmp_path: Path,
) -> None:
    made = run_cli("new-plugin", "shout", "--directory", str(tmp_path))
    assert made.returncode == 0, made.stderr
    root = tmp_path / "pushsvc-shout"
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {
        "setup.cfg",
        "pyproject.toml",
        "README.md",
        "pushsvc_shout/__init__.py",
        "tests/test_shout.py",
    }
    again = run_cli("new-plugin", "shout", "--directory", str(tmp_path))
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = run_cli("new-plugin", "Shout!", "--directory", str(tmp_path))
    assert bad.returncode == 2 and "lowercase" in bad.stderr
    assert run_cli("new-plugin", "join", "--directory", str(tmp_path)).returncode == 2

    # Installed with pip (into a folder of its own, not this environment) ...
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), root],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    listed = run_cli("plugins", pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    assert "shout  (pushsvc-shout 0.1.0, module pushsvc_shout)" in listed.stdout
    assert "shout: at-most-once, cost 1, own bucket 5/s burst 10" in listed.stdout
    assert "    pushsvc_joined\n" in listed.stdout
    # ... its generated tests pass, run as its author would (its own rootdir and config).
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(site)},
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout


async def test_the_testing_kit_drives_the_builtin_plugins(pushsvc_server: Any) -> None:
    """``pushsvc.testing`` (its pytest fixtures are registered by the entry point)."""
    ann = await pushsvc_server.connect("ann")
    ben = await pushsvc_server.connect("ben")
    assert ann.user == "ann" and ann.session
    chat = await ann.request({"type": "chat", "text": "hi"})  # both are in the default room
    assert chat["type"] == "reply"
    assert (await ben.recv_type("chat"))["id"] == chat["id"]
    private = await ann.request({"type": "private", "to": "ben", "text": "psst"})
    message = await ben.recv_type("private")
    assert message["id"] == private["id"] and await ben.ack(message["id"]) == 1
    refused = await ann.request({"type": "notification", "to": "ben", "title": "t", "message": "m"})
    assert refused["code"] == "forbidden"  # needs scope notify
    response = await pushsvc_server.http(
        "POST", "/api/v1/notify", {"to": "ben", "title": "t", "message": "m"}
    )
    assert response.status == 202 and response.body["recipients"] == 1
    assert (await pushsvc_server.http("GET", "/api/v1/openapi.json", token="")).status == 200
    assert (await pushsvc_server.http("POST", "/api/v1/notify", {}, token="")).status == 401


class ShutdownFails:
    @hookimpl
    async def pushsvc_shutdown(self, node: Any) -> None:
        raise RuntimeError("cannot close")


async def test_a_failing_shutdown_hook_stops_no_other(start_server: Any) -> None:
    plugin = AsyncLifecycle()
    server = await start_server(extra=[("lifecycle", plugin), ("fails", ShutdownFails())])
    await server.service.shutdown(pace=False)
    assert plugin.events == ["startup", "shutdown"]
    errors = server.node.metrics.plugin_errors.labels("fails", "pushsvc_shutdown")
    assert errors._value.get() == 1


class Blocking:
    """A handler and a hook that hold the event loop (``time.sleep``) after an await."""

    @hookimpl
    def pushsvc_register_message_types(self) -> list[MessageType]:
        async def stall(ctx: FrameContext) -> Reply:
            await asyncio.sleep(0)
            time.sleep(0.15)
            return Reply({"done": True})

        return [MessageType("stall", stall)]

    @hookimpl
    def pushsvc_connected(self, principal: Any) -> None:
        time.sleep(0.15)

    @hookimpl
    async def pushsvc_disconnected(self, principal: Any) -> None:
        await asyncio.sleep(0)
        time.sleep(0.15)


async def test_hooks_that_block_the_loop_are_logged_with_their_plugin(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(
        extra=[("blocker", Blocking())], plugins={"slow_hook_seconds": 0.05}
    )
    client = await server.connect("ann")
    await client.send({"type": "stall", "ref": "s"})
    assert (await client.recv_type("reply"))["done"] is True
    client.close()
    expected = [
        "plugin blocker: hook pushsvc_connected blocked the event loop for",
        "plugin blocker: message handler blocked the event loop for",
        "plugin blocker: hook pushsvc_disconnected blocked the event loop for",
    ]
    for _ in range(200):
        messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        if all(any(e in m for m in messages) for e in expected):
            break
        await asyncio.sleep(0.01)
    for text in expected:
        assert any(text in m and "(plugins.slow_hook_seconds = 0.05)" in m for m in messages), text


class Tunable:
    """A reloadable ``rate`` and a ``mode`` that needs a restart."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], list[str]]] = []

    @hookimpl
    def pushsvc_config_schema(self) -> dict[str, Any]:
        return {
            "rate": pushsvc.Setting(1.0, "Rate.", minimum=0, reloadable=True),
            "mode": pushsvc.Setting("a", "Mode."),
        }

    @hookimpl
    def pushsvc_settings_changed(self, settings: Any, changed: Any) -> None:
        self.seen.append((dict(settings), list(changed)))


async def test_reloadable_plugin_settings_reach_the_plugin_on_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tornado.netutil
    from prometheus_client import CollectorRegistry

    from pushsvc import app
    from pushsvc import config as config_module

    path = tmp_path / "pushsvc.toml"
    head = f'[server]\ndata_dir = "{tmp_path / "d"}"\n[auth]\njwt_secret = "{SECRET}"\n'
    path.write_text(head + "[plugins.tunable]\nrate = 1\n")
    plugin = Tunable()
    service = await app.start(
        config_module.load(str(path)),
        registry=CollectorRegistry(),
        plugins=load_plugins(extra=[("tunable", plugin), ("other", Tunable())]),
        config_path=str(path),
        sockets=tornado.netutil.bind_sockets(0, "127.0.0.1"),
    )
    try:
        path.write_text(head + '[plugins.tunable]\nrate = 5\nmode = "b"\n')
        service._reload()
        assert plugin.seen == [({"rate": 5.0, "mode": "a"}, ["rate"])]
        assert service.node.config.plugin("tunable") == {"rate": 5.0, "mode": "a"}
        assert (
            "config key plugins.tunable.mode changed: takes effect after a restart" in caplog.text
        )
        assert "reloaded: plugins.tunable.rate" in caplog.text
    finally:
        await service.shutdown(pace=False)


async def test_type_buckets_are_overridden_in_config_and_reloaded(start_server: Any) -> None:
    import dataclasses

    slow = {"rate": 0.001, "burst": 50, "user_rate": 0.001, "user_burst": 50}
    server = await start_server(
        extra=[("buckets", Buckets())],
        ratelimit={**slow, "abuse_violations": 1000, "type_buckets": ["typing=off", "say=0.001"]},
        chat={"auto_join": False},
    )
    client = await server.connect("ann")
    limited = "rate_limited rate limit exceeded (type)"
    assert await answers(client, {"type": "typing"}, 3) == ["ok", "ok", "ok"]  # declared 2: off
    assert await answers(client, {"type": "say"}, 2) == ["ok", limited]  # burst = max(1, rate)
    # A reload applies a new value (the level of a kept bucket stays).
    config = server.node.config
    new = dataclasses.replace(
        config, ratelimit=dataclasses.replace(config.ratelimit, type_buckets=["typing=0.001/1"])
    )
    assert server.node.apply_config(new, ["ratelimit.type_buckets"]) == ["ratelimit.type_buckets"]
    assert await answers(client, {"type": "typing"}, 2) == ["ok", limited]
    assert await answers(client, {"type": "say"}, 1) == ["ok"]  # its own bucket is gone


def test_type_buckets_config_is_checked() -> None:
    from pushsvc.config import ConfigError, parse_type_buckets

    assert parse_type_buckets(["typing=2/5", "poke=0.5", "chat=off"]) == {
        "typing": (2.0, 5.0),
        "poke": (0.5, 1.0),
        "chat": None,
    }
    for bad in ("typing", "typing=0", "typing=2/0.5", "Typing=1", "typing=fast", "typing=1..2"):
        with pytest.raises(ConfigError, match=r"ratelimit\.type_buckets: '"):
            parse_type_buckets([bad])


async def test_the_testing_kit_without_pytest_fixtures() -> None:
    """``serve()`` as a context manager: extra plugins, config sections, a failing start."""
    from pushsvc.testing import serve

    async with serve(("crashy", Crashy()), config={"chat": {"auto_join": False}}) as server:
        assert server.node.config.chat.auto_join is False
        client = await server.connect("ann", rooms=["*"])
        assert (await client.request({"type": "echo", "say": "x"}))["echo"] == "x"
        assert (await client.request({"type": "boom"}))["code"] == "internal"
        assert (await client.join("lobby"))["room"] == "lobby"
        await client.expect_nothing(0.1)
    assert server.service.stopped.is_set()
    with pytest.raises(RuntimeError, match="database is unreachable"):
        async with serve(("failing", FailingStartup())):
            pass


async def test_publish_exclude_and_members_across_two_nodes(redis_url: str) -> None:
    """Two nodes on one Redis (broker and cluster registry): the session left out is on
    one node, its user's other connection and another user on the other; members lists
    the room's users of both nodes."""
    from pushsvc.testing import serve

    config = {
        "broker": {"url": redis_url},
        "chat": {"auto_join": False},
        "auth": {"jwt_secret": SECRET},
    }
    async with (
        serve(("typing", Typing()), config=config) as one,
        serve(("typing", Typing()), config=config) as two,
    ):
        sender = await one.connect("ann", rooms=["*"])
        other_tab = await two.connect("ann", rooms=["*"])
        ben = await two.connect("ben", rooms=["*"])
        for client in (sender, other_tab, ben):
            await client.join("r")
        reply = await sender.request({"type": "typing", "room": "r"})
        assert reply["members"] == ["ann", "ben"]
        for client in (other_tab, ben):
            assert (await client.recv_type("typing"))["id"] == reply["id"]
        await sender.expect_nothing(0.3, ignore=("presence",))


def test_an_async_hook_where_the_answer_is_needed_at_once_is_refused() -> None:
    class AsyncAuthorizer:
        @hookimpl
        async def pushsvc_authorize_room(self, principal: Any, room: str) -> bool:
            return True

    with pytest.raises(PluginError, match="pushsvc_authorize_room cannot be async def"):
        load_plugins(extra=[("asyncauth", AsyncAuthorizer())])


async def test_an_awaitable_answer_to_authorize_room_refuses(start_server: Any) -> None:
    """A sync function that returns a coroutine would be truthy (allowed): it refuses."""

    class Sneaky:
        @hookimpl(tryfirst=True)
        def pushsvc_authorize_room(self, principal: Any, room: str) -> Any:
            async def later() -> bool:
                return True

            return later()

    server = await start_server(extra=[("sneaky", Sneaky())], chat={"auto_join": False})
    client = await server.connect("ann", rooms=["*"])
    await client.send({"type": "join", "room": "r", "ref": "1"})
    assert (await client.recv_type("error"))["code"] == "forbidden"
    errors = server.node.metrics.plugin_errors.labels("sneaky", "pushsvc_authorize_room")
    assert errors._value.get() == 1
