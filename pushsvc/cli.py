"""Command line: ``pushsvc serve | token | check-config | plugins | new-plugin | listen | send``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pushsvc import config as config_module
from pushsvc.auth import tokens
from pushsvc.config import Config, ConfigError
from pushsvc.ops import logs
from pushsvc.plugin.manager import PluginError, load_plugins
from pushsvc.version import __version__

log = logging.getLogger("pushsvc")

#: Allocations between young-generation collections (CPython's default is 700).
#: Every message allocates short-lived containers; with the default, survivors of
#: in-flight work reach the old generation and force full collections (~35 ms with
#: 1,000 connections) every second or so: see docs/delivery.md for the figures.
GC_GEN0_THRESHOLD = 50_000
GC_OLDER_THRESHOLD = 20  # collections of a generation before the next one is collected


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushsvc", description="Notification push service.")
    parser.add_argument("--version", action="version", version=f"pushsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--config", help="TOML config file (default: $PUSHSVC_CONFIG)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--data-dir", help="state folder (server.data_dir)")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: generate a JWT secret when none is set, serve the demo "
        "page (demo.enabled) and POST /dev/token",
    )

    token = commands.add_parser("token", help="print an HS256 token signed with the secret")
    token.add_argument("--config", help="TOML config file")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--scope", default="", help='space-separated, e.g. "publish notify"')
    token.add_argument("--rooms", default=None, help='space-separated globs, e.g. "a b*"')
    token.add_argument("--ttl", type=float, default=3600, help="seconds until expiry")
    token.add_argument("--name", default=None, help="display name")
    token.add_argument("--secret", default=None, help="secret to sign with (default: config)")

    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", help="TOML config file")
    check.add_argument(
        "--reference", action="store_true", help="print every key with its doc and default"
    )

    plugins = commands.add_parser("plugins", help="list loaded plugins and their message types")
    plugins.add_argument("--config", help="TOML config file")

    new_plugin = commands.add_parser(
        "new-plugin", help="write a plugin distribution to start from (pushsvc-NAME/)"
    )
    new_plugin.add_argument(
        "name", metavar="NAME", help="plugin and message type name, e.g. typing"
    )
    new_plugin.add_argument(
        "--directory", default=".", help="where to create pushsvc-NAME/ (default: here)"
    )

    listen = commands.add_parser(
        "listen", help="connect as a client and print every incoming frame as a JSON line"
    )
    _client_arguments(listen)
    listen.add_argument("--room", action="append", default=[], help="room to join (repeatable)")
    listen.add_argument("--no-ack", action="store_true", help="do not ack at-least-once messages")

    send = commands.add_parser(
        "send", help="send one frame with a ref and print the reply (or the error) as JSON"
    )
    _client_arguments(send)
    send.add_argument("type", metavar="TYPE", help="frame type, e.g. chat, join, private")
    send.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="K=V",
        help="a string field (K:=V for a JSON value); repeatable",
    )
    send.add_argument("--json", default=None, help="the fields as one JSON object")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds for the reply")
    return parser


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--url", default="ws://127.0.0.1:8888/ws", help="WebSocket URL of /ws")
    parser.add_argument("--token", required=True, help="JWT (see pushsvc token)")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server: dict[str, Any] = {}
    for flag, key in (("host", "host"), ("port", "port"), ("data_dir", "data_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            server[key] = value
    return {"server": server} if server else {}


def _serve(args: argparse.Namespace, config: Config) -> int:
    from pushsvc.app import secret_missing

    overrides = _overrides(args)
    if args.dev:  # the demo page at / and /demo (make run)
        overrides.setdefault("demo", {})["enabled"] = True
        config = dataclasses.replace(config, demo=dataclasses.replace(config.demo, enabled=True))
    if secret_missing(config):
        if not args.dev:
            print(
                "pushsvc: no JWT secret configured: set auth.jwt_secret, auth.jwt_secret_file "
                "or PUSHSVC_JWT_SECRET (or run with --dev for a generated one)",
                file=sys.stderr,
            )
            return 2
        secret = secrets.token_urlsafe(32)
        overrides.setdefault("auth", {})["jwt_secret"] = secret
        config = dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, jwt_secret=secret)
        )
        print(f"pushsvc: --dev: generated JWT secret {secret}", file=sys.stderr)
        print(
            f"pushsvc: --dev: try token: {tokens.mint(secret, 'dev', ttl=86400)}", file=sys.stderr
        )
    try:
        import uvloop
    except ImportError:  # a platform uvloop does not support: asyncio's loop serves too
        log.warning("uvloop is not installed: running on asyncio's own event loop (slower)")
        runner = asyncio.run
    else:
        runner = uvloop.run
    return int(runner(_run(config, args.config, overrides, dev=args.dev)))


def _tune_gc() -> None:
    """Collect less often, and never scan what startup built (modules, plugins, config)."""
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)
    gc.freeze()


async def _run(
    config: Config, path: str | None, overrides: dict[str, dict[str, Any]], *, dev: bool = False
) -> int:
    from pushsvc import app
    from pushsvc.ops import sdnotify

    try:
        service = await app.start(config, config_path=path, overrides=overrides, dev=dev)
    except PluginError as exc:
        print(f"pushsvc: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:  # found at startup (e.g. push.vapid_private_key_file)
        print(f"pushsvc: bad config: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.exception("startup failed")
        print(f"pushsvc: startup failed: {exc}", file=sys.stderr)
        return 1
    service.install_signals()
    _tune_gc()
    host, port = service.sockets[0].getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    logs.announce(f"pushsvc listening on http://{where} (ws://{where}/ws)")
    if config.demo.enabled:
        logs.announce(f"pushsvc demo chat page: http://{where}/demo")
    # Listening, store and broker open: only now may systemd start dependents.
    sdnotify.notify("READY=1", service.status())
    await service.stopped.wait()
    log.info("stopped (exit status %d)", service.exit_code)
    return service.exit_code


def _token(args: argparse.Namespace, config: Config) -> int:
    secret = args.secret or config.secret()
    if not secret:
        print("pushsvc: no JWT secret: set auth.jwt_secret or PUSHSVC_JWT_SECRET", file=sys.stderr)
        return 2
    rooms = args.rooms.split() if args.rooms is not None else None
    print(
        tokens.mint(secret, args.sub, ttl=args.ttl, scope=args.scope, rooms=rooms, name=args.name)
    )
    return 0


def _plugins(config: Config) -> int:
    plugins = load_plugins(config.plugins.disabled, config.auth.default_rooms)
    for plugin in plugins.loaded:
        print(f"{plugin.name}  ({plugin.distribution}, module {plugin.module})")
        if plugin.message_types:
            print("  message types:")
        for name in plugin.message_types:
            declared = plugins.types[name].message_type
            scope = f", scope {declared.scope}" if declared.scope else ""
            bucket = declared.bucket
            own = f", own bucket {bucket[0]:g}/s burst {bucket[1]:g}" if bucket else ""
            print(
                f"    {name}: {declared.guarantee.value}, cost {declared.cost:g}{scope}{own}"
                f"  {declared.description}"
            )
        hooks = plugins.hooks_of(plugin.name)
        if hooks:
            print("  hooks:")
        for hook in hooks:
            marks = f"  [{', '.join(hook.marks)}]" if hook.marks else ""
            print(f"    {hook.hook}{marks}")
        routes = plugins.routes_of(plugin.name)
        if routes:
            print("  routes:")
        for pattern, handler in routes:
            print(f"    {pattern}  {handler.__module__}.{handler.__qualname__}")
    for name in config.plugins.disabled:
        print(f"{name}  (disabled by plugins.disabled)")
    return 0


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """``--json`` then ``--field`` values; raises ValueError naming the bad one."""
    fields: dict[str, Any] = {}
    if args.json is not None:
        try:
            loaded = json.loads(args.json)
        except ValueError as exc:
            raise ValueError(f"--json: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError("--json: not a JSON object")
        fields.update(loaded)
    for item in args.field:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--field {item!r}: expected K=V or K:=JSON")
        if key.endswith(":"):
            try:
                fields[key[:-1]] = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"--field {item!r}: {exc}") from None
        else:
            fields[key] = value
    return fields


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, separators=(",", ":")), flush=True)


async def _listen(args: argparse.Namespace) -> int:
    from pushsvc.client import PushClient, PushError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(signum, stop.set)
    client = PushClient(args.url, token=args.token, ack_mode="manual" if args.no_ack else "auto")
    client.on("open", _print_json)
    client.on("message", _print_json)
    client.on("error", lambda exc: print(f"pushsvc: {exc}", file=sys.stderr, flush=True))
    client.on(
        "close",
        lambda code, reason: print(f"pushsvc: closed {code} {reason}", file=sys.stderr),
    )

    async def join(room: str) -> None:
        with contextlib.suppress(PushError):  # reported by the "error" handler
            await client.join(room)

    async with client:
        for room in args.room:
            loop.create_task(join(room))  # noqa: RUF006 - settled by close()
        stopped = loop.create_task(stop.wait())
        closed = loop.create_task(client.wait_closed())
        await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        final = closed.done()
    return 1 if final else 0


async def _send(args: argparse.Namespace, fields: dict[str, Any]) -> int:
    from pushsvc.client import PushClient, PushError

    async with PushClient(args.url, token=args.token, send_timeout=args.timeout) as client:
        client.on("error", lambda exc: print(f"pushsvc: {exc}", file=sys.stderr, flush=True))
        try:
            reply = await client.send(args.type, **fields)
        except PushError as exc:
            _print_json({"type": "error", **exc.as_dict()})
            return 1
    _print_json(reply)
    return 0


def _client_command(args: argparse.Namespace) -> int:
    if args.command == "listen":
        return asyncio.run(_listen(args))
    try:
        fields = _fields(args)
    except ValueError as exc:
        print(f"pushsvc: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_send(args, fields))


def _new_plugin(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pushsvc import scaffold

    try:
        root = scaffold.write(args.name, Path(args.directory))
    except ValueError as exc:
        print(f"pushsvc: new-plugin: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"pushsvc: new-plugin: {exc.filename} exists already", file=sys.stderr)
        return 2
    print(f"wrote {root}: cd {root} && pip install -e '.[test]' && pytest")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pushsvc`` command."""
    args = _parser().parse_args(argv)
    if args.command == "new-plugin":  # needs no config
        return _new_plugin(args)
    try:
        config = config_module.load(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"pushsvc: bad config: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log.level, config.log.format)
    try:
        if args.command == "serve":
            return _serve(args, config)
        if args.command in ("listen", "send"):
            return _client_command(args)
        if args.command == "token":
            return _token(args, config)
        if args.command == "check-config":
            if args.reference:
                print(config_module.documented_defaults(), end="")
                return 0
            # A plugin that fails to load would stop serve: say so now, exit 3.
            plugins = load_plugins(config.plugins.disabled, config.auth.default_rooms)
            config = config.with_plugin_schemas(plugins.config_schemas)  # exit 2 naming the key
            from pushsvc.app import check_push

            check_push(config)  # exit 2 naming push.subject
            print(config_module.to_toml(config), end="")
            return 0
        return _plugins(config)
    except ConfigError as exc:
        print(f"pushsvc: bad config: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:
        print(f"pushsvc: {exc}", file=sys.stderr)
        return 3
