"""Plugins: entry-point loading, conflicts, failures, dispatch, the third-party example."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pushsvc
from conftest import BIN, SECRET, Server
from pushsvc import CommandError, Field, FrameContext, MessageType, Principal, Reply, hookimpl
from pushsvc.plugin import hookspecs
from pushsvc.plugin.manager import PluginError, load_plugins

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
    metric = crashy_server.node.metrics.plugin_errors.labels("crashy")._value.get()
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


def test_every_hook_is_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    specs = [name for name in dir(hookspecs) if name.startswith("pushsvc_")]
    assert len(specs) >= 7
    for name in specs:
        function = getattr(hookspecs, name)
        assert function.__doc__ and "Example::" in function.__doc__, name
        signature = f"{name}{inspect.signature(function)}".replace("'", "")
        assert signature in docs, f"docs/plugins.md lacks the signature: {signature}"


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
        "plugin broken: hook pushsvc_connected raised" in r.getMessage() for r in caplog.records
    )


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
