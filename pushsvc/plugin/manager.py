"""Plugin loading: the pluggy manager, entry points, and the message-type table.

Built-in message types and third-party ones load the same way, from the
``pushsvc`` entry-point group. The table maps a frame ``type`` to its
:class:`~pushsvc.MessageType` so dispatch is one dict lookup per frame.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import importlib.util
import inspect
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar, cast

import pluggy

from pushsvc.auth.tokens import AuthError
from pushsvc.config import Setting
from pushsvc.plugin import hookspecs
from pushsvc.plugin.api import (
    PLUGIN_API_VERSION,
    HandshakeRequest,
    MessageType,
    Principal,
    hookimpl,
)
from pushsvc.protocol.commands import CORE_TYPES

log = logging.getLogger("pushsvc.plugins")

ENTRY_POINT_GROUP = "pushsvc"
#: Hooks pushsvc calls implementation by implementation (:meth:`Plugins.notify`,
#: :meth:`Plugins.first_result`), so that one plugin's exception stops no other;
#: a wrapper (``wrapper=True``, ``hookwrapper=True``) on them is refused at load.
ISOLATED_HOOKS = frozenset(
    {
        "pushsvc_authenticate",
        "pushsvc_authorize_room",
        "pushsvc_connected",
        "pushsvc_dead_lettered",
        "pushsvc_disconnected",
        "pushsvc_joined",
        "pushsvc_left",
        "pushsvc_push_sent",
        "pushsvc_settings_changed",
        "pushsvc_shutdown",
    }
)
#: Hooks whose result pushsvc uses at once: an ``async def`` implementation is refused at load.
SYNC_HOOKS = frozenset(
    {
        "pushsvc_authorize_room",
        "pushsvc_config_schema",
        "pushsvc_register_message_types",
        "pushsvc_register_routes",
    }
)
#: ``hook`` label of ``pushsvc_plugin_errors_total`` for a message handler's exception.
MESSAGE_HANDLER = "message_handler"
#: ``hook`` label of ``pushsvc_plugin_errors_total`` for an HTTP route's exception.
ROUTE = "route"

ErrorCounter = Callable[[str, str], None]


def report_slow(plugin: str, hook: str, seconds: float, bound: float) -> None:
    """Log that ``plugin``'s ``hook`` kept the event loop for ``seconds`` (over ``bound``)."""
    what = hook.replace("_", " ") if hook in (ROUTE, MESSAGE_HANDLER) else f"hook {hook}"
    log.warning(
        "plugin %s: %s blocked the event loop for %.3f s (plugins.slow_hook_seconds = %g)",
        plugin,
        what,
        seconds,
        bound,
    )


class StepTimer:
    """Await ``awaitable``, timing each step it runs between two suspensions.

    A step longer than ``bound`` seconds held the event loop (every other
    connection waited): :func:`report_slow` names the plugin. Costs about half
    a microsecond per await; time spent suspended (I/O, sleeps) is not counted.
    """

    __slots__ = ("_awaitable", "_bound", "_hook", "_plugin")

    def __init__(self, awaitable: Awaitable[T], bound: float, plugin: str, hook: str) -> None:
        self._awaitable = awaitable
        self._bound = bound
        self._plugin = plugin
        self._hook = hook

    def _check(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > self._bound:
            report_slow(self._plugin, self._hook, elapsed, self._bound)

    def __await__(self) -> Generator[Any, Any, Any]:
        awaitable = self._awaitable
        # A coroutine is its own iterator: no wrapper to send through.
        iterator: Any = (
            awaitable if type(awaitable) is types.CoroutineType else awaitable.__await__()
        )
        value: Any = None
        error: BaseException | None = None
        clock, bound = time.perf_counter, self._bound
        while True:
            started = clock()
            try:
                yielded = iterator.send(value) if error is None else iterator.throw(error)
            except StopIteration as stop:
                if clock() - started > bound:
                    self._check(started)
                return stop.value
            except BaseException:
                self._check(started)
                raise
            if clock() - started > bound:  # _check, inline: this runs for every step
                self._check(started)
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # thrown in by the task (cancellation)
                value, error = None, exc


T = TypeVar("T")


class PluginError(RuntimeError):
    """A plugin could not be loaded or conflicts with another; stops startup.

    ``plugin`` is its entry-point name when one plugin is to blame; ``file``
    and ``line`` say where its code failed, when it raised.
    """

    def __init__(
        self,
        message: str,
        plugin: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.file = file
        self.line = line


def _plugin_root(module: str) -> str | None:
    """The folder (or file) of ``module``'s top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module.partition(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return os.path.realpath(next(iter(spec.submodule_search_locations)))
    return os.path.realpath(spec.origin) if spec.origin else None


def _where(exc: BaseException, module: str | None = None) -> tuple[str, int] | None:
    """The file and line where a plugin's code raised ``exc``.

    A syntax error names its own place. Otherwise the innermost frame in the
    plugin's package (``module``'s top-level folder) wins, so an error raised
    inside the standard library (``os.environ["x"]``) points at the plugin
    line that called it; else the innermost frame outside importlib.
    """
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno or 0
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<frozen") and frame.filename != __file__
    ]
    root = _plugin_root(module) if module else None
    if root is not None:
        inside = [
            frame
            for frame in frames
            if os.path.realpath(frame.filename) == root
            or os.path.realpath(frame.filename).startswith(root + os.sep)
        ]
        frames = inside or frames
    if not frames:
        return None
    return frames[-1].filename, frames[-1].lineno or 0


def _failed(name: str, dist: str, what: str, exc: Exception, module: str | None) -> PluginError:
    where = _where(exc, module)
    at = f" at {where[0]}, line {where[1]}" if where else ""
    return PluginError(
        f"plugin {name!r} ({dist}) {what}: {type(exc).__name__}: {exc}{at}",
        plugin=name,
        file=where[0] if where else None,
        line=where[1] if where else None,
    )


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A plugin pushsvc loaded: its entry-point name and distribution."""

    name: str  # entry-point name (what ``plugins.disabled`` lists)
    distribution: str  # the installed distribution that provides it
    module: str  # the module registered with pluggy
    message_types: tuple[str, ...]  # the types it declared


@dataclass(frozen=True, slots=True)
class HookImplementation:
    """One hook a plugin implements, and its pluggy marks."""

    hook: str  # the hook's name, e.g. ``pushsvc_authorize_room``
    marks: tuple[str, ...]  # of ``tryfirst``, ``trylast``, ``wrapper``, ``hookwrapper``


@dataclass(frozen=True, slots=True)
class RegisteredType:
    """A message type and the plugin that declared it."""

    message_type: MessageType
    plugin: str  # entry-point name of the declaring plugin


class DefaultRoomPolicy:
    """Built-in room authorization: the ``rooms`` claim, else ``auth.default_rooms``.

    Registered ``trylast`` so any plugin can decide first.
    """

    def __init__(self, default_rooms: Sequence[str]) -> None:
        self.default_rooms = tuple(default_rooms)  # globs for tokens without 'rooms'

    @hookimpl(trylast=True)
    def pushsvc_authorize_room(self, principal: Principal, room: str) -> bool:
        """Allow the rooms matching the claim or the default globs."""
        patterns = principal.rooms if principal.rooms is not None else self.default_rooms
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in patterns)


class Plugins:
    """The plugin manager and what was loaded through it."""

    def __init__(
        self,
        manager: pluggy.PluginManager,
        loaded: list[LoadedPlugin],
        types: dict[str, RegisteredType],
        config_schemas: dict[str, Mapping[str, Setting]] | None = None,
    ) -> None:
        self.manager = manager  # the pluggy manager
        self.config_schemas = config_schemas or {}  # plugin name -> its settings
        self.hook = manager.hook  # shortcut for calling hooks
        self.loaded = loaded  # entry-point plugins, in load order
        self.types = types  # frame type -> declaration
        #: counts an exception by (plugin, hook); the node binds it to the metric
        self.count_error: ErrorCounter = _count_nothing
        #: seconds a hook may hold the event loop before it is logged (0: not timed)
        self.slow_after = 0.0

    def _call(self, impl: Any, hook_name: str, arguments: Mapping[str, Any]) -> Any:
        """Call one implementation; time it, and each step of what it returns to await."""
        started = time.perf_counter()
        result = impl.function(**arguments)
        bound = self.slow_after
        if bound > 0:
            elapsed = time.perf_counter() - started
            if elapsed > bound:
                report_slow(impl.plugin_name, hook_name, elapsed, bound)
            if inspect.isawaitable(result):
                result = StepTimer(result, bound, impl.plugin_name, hook_name)
        return result

    def failed(
        self, plugin: str, hook: str, exc: BaseException | None = None, detail: str = ""
    ) -> None:
        """Log and count an exception a plugin's ``hook`` raised.

        ``exc`` is the exception (default: the one being handled); ``detail``
        is added to the log line (a route's method and path).
        """
        self.count_error(plugin, hook)
        error = exc if exc is not None else sys.exc_info()[1]
        what = hook.replace("_", " ") if hook in (ROUTE, MESSAGE_HANDLER) else f"hook {hook}"
        where = f" ({detail})" if detail else ""
        log.error(
            "plugin %s: %s%s raised %s",
            plugin,
            what,
            where,
            type(error).__name__,
            exc_info=error,
        )

    def hooks_of(self, name: str) -> list[HookImplementation]:
        """The hooks plugin ``name`` implements, sorted by hook name, with their marks."""
        found: list[HookImplementation] = []
        for hook_name in sorted(vars(self.hook)):
            caller = getattr(self.hook, hook_name)
            if not hasattr(caller, "get_hookimpls"):
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin_name != name:
                    continue
                marks = tuple(
                    mark
                    for mark in ("tryfirst", "trylast", "wrapper", "hookwrapper")
                    if getattr(impl, mark, False)
                )
                found.append(HookImplementation(hook_name, marks))
        return found

    def routes_of(self, name: str) -> list[tuple[str, type]]:
        """``(pattern, handler class)`` of the routes plugin ``name`` registers.

        Calls that plugin's ``pushsvc_register_routes`` (what ``pushsvc
        plugins`` shows); the service itself calls the hook once, at startup.
        """
        routes: list[tuple[str, type]] = []
        for impl in self.hook.pushsvc_register_routes.get_hookimpls():
            if impl.plugin_name == name:
                for rule in cast(Iterable[Sequence[Any]], impl.function()):
                    routes.append((str(rule[0]), cast(type, rule[1])))
        return routes

    def authorize_room(self, principal: Principal, room: str) -> bool:
        """First result of ``pushsvc_authorize_room`` (the default policy decides last).

        A plugin that raises refuses the room (fail closed).
        """
        return bool(
            self.first_result("pushsvc_authorize_room", False, principal=principal, room=room)
        )

    async def authenticate(
        self, token: str | None, request: HandshakeRequest | None
    ) -> Principal | None:
        """First result of ``pushsvc_authenticate``; None: no plugin decided (check the JWT).

        Raises:
            AuthError: a plugin refused (its own reason), or one raised
                anything else or returned something other than a
                ``Principal`` (``plugin_error``, fail closed; logged and counted).
        """
        hook_name = "pushsvc_authenticate"
        arguments = {"token": token, "request": request}
        for impl in reversed(self.hook.pushsvc_authenticate.get_hookimpls()):
            try:
                result = await await_me_maybe(
                    self._call(impl, hook_name, {name: arguments[name] for name in impl.argnames})
                )
                if result is not None and not isinstance(result, Principal):
                    raise TypeError(f"returned {result!r}, not a pushsvc.Principal")
            except AuthError:
                raise
            except Exception as exc:
                self.failed(impl.plugin_name, hook_name, exc)
                raise AuthError("plugin_error", f"plugin {impl.plugin_name} failed") from exc
            if result is not None:
                return result
        return None

    def first_result(self, hook_name: str, on_error: Any, **kwargs: Any) -> Any:
        """Call a firstresult hook implementation by implementation; the first non-None wins.

        An implementation that raises is logged with its plugin's name and
        counted, and the call answers ``on_error`` (the refusal) without
        asking the next plugins: they cannot know what the failing one would
        have decided. The next call asks every plugin again.
        """
        caller = getattr(self.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            arguments = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            try:
                result = self._call(impl, hook_name, arguments)
                if inspect.isawaitable(result):  # would be truthy: refuse instead
                    _discard(result)
                    raise TypeError(f"{hook_name} returned an awaitable; it must answer at once")
            except Exception as exc:
                self.failed(impl.plugin_name, hook_name, exc)
                return on_error
            if result is not None:
                return result
        return None

    def notify_plugin(self, plugin: str, hook_name: str, **kwargs: Any) -> None:
        """:meth:`notify` for the implementations of one plugin only."""
        self.notify(hook_name, _only=plugin, **kwargs)

    def notify(self, hook_name: str, _only: str | None = None, **kwargs: Any) -> None:
        """Call every implementation of a notification hook; one plugin's error stops no other.

        pluggy stops a hook call at the first implementation that raises; here
        each implementation is called on its own, in pluggy's order (``tryfirst``
        ... ``trylast``), and an error is logged with the plugin's name and
        counted in ``pushsvc_plugin_errors_total{plugin, hook}``. An
        implementation that returns an awaitable is run as a task (its error
        is logged and counted the same way).
        """
        caller = getattr(self.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            if _only is not None and impl.plugin_name != _only:
                continue
            arguments = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            try:
                result = self._call(impl, hook_name, arguments)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    task.add_done_callback(
                        functools.partial(self._report, hook_name, impl.plugin_name)
                    )
            except Exception as exc:
                self.failed(impl.plugin_name, hook_name, exc)

    async def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call and await every implementation in turn; an exception stops no other.

        For ``pushsvc_shutdown``: one plugin's failure must not keep the
        others (or the store) from closing. Errors are logged and counted.
        """
        caller = getattr(self.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            arguments = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            try:
                await await_me_maybe(self._call(impl, hook_name, arguments))
            except Exception as exc:
                self.failed(impl.plugin_name, hook_name, exc)

    def _report(self, hook_name: str, plugin: str, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failed(plugin, hook_name, task.exception())


def _discard(awaitable: Any) -> None:
    """Close a coroutine that will not be awaited (no "never awaited" warning)."""
    if isinstance(awaitable, StepTimer):
        awaitable = awaitable._awaitable
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _count_nothing(plugin: str, hook: str) -> None:
    """The error counter of :class:`Plugins` not bound to metrics (``pushsvc plugins``)."""


def _parse_version(version: object) -> tuple[int, int] | None:
    if not isinstance(version, str):
        return None
    major, dot, minor = version.partition(".")
    if not (major.isdigit() and (not dot or minor.isdigit())):
        return None
    return int(major), int(minor or 0)


def _check_api_version(name: str, dist: str, plugin: object) -> None:
    """Refuse a plugin whose ``PUSHSVC_PLUGIN_API`` this pushsvc does not provide.

    Compatible: the same major version, and a minor one not above ours.
    """
    required = getattr(plugin, "PUSHSVC_PLUGIN_API", None)
    if required is None:
        return
    wanted = _parse_version(required)
    major, _, minor = PLUGIN_API_VERSION.partition(".")
    ours = int(major), int(minor)
    if wanted is None:
        raise PluginError(
            f"plugin {name!r} ({dist}): PUSHSVC_PLUGIN_API must be a 'MAJOR.MINOR' string, "
            f"not {required!r}",
            plugin=name,
        )
    if wanted[0] != ours[0] or wanted[1] > ours[1]:
        raise PluginError(
            f"plugin {name!r} ({dist}) needs plugin API {required}; this pushsvc provides "
            f"{PLUGIN_API_VERSION} (compatible: {ours[0]}.0 to {PLUGIN_API_VERSION})",
            plugin=name,
        )


def _distribution_of(entry_point: metadata.EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def load_plugins(
    disabled: Iterable[str] = (),
    default_rooms: Sequence[str] = ("*",),
    extra: Iterable[tuple[str, object]] = (),
) -> Plugins:
    """Build the plugin manager and load every ``pushsvc`` entry point.

    Args:
        disabled: entry-point names not to load (``plugins.disabled``).
        default_rooms: globs for the built-in room policy.
        extra: ``(name, module_or_object)`` plugins registered directly
            (tests, embedding).

    Raises:
        PluginError: a plugin failed to import, implements an unknown hook,
            or declares a message type another plugin (or core) owns.
    """
    manager = pluggy.PluginManager("pushsvc")
    manager.add_hookspecs(hookspecs)
    blocked = set(disabled)
    sources: list[tuple[str, str, object]] = []
    seen: set[str] = set()
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in seen:
            continue  # the same distribution on sys.path twice
        seen.add(entry_point.name)
        if entry_point.name in blocked:
            log.info("plugin %s disabled by plugins.disabled", entry_point.name)
            continue
        dist = _distribution_of(entry_point)
        try:
            plugin = entry_point.load()
        except Exception as exc:
            failure = _failed(entry_point.name, dist, "failed to load", exc, entry_point.module)
            raise failure from exc
        sources.append((entry_point.name, dist, plugin))
    sources.extend((name, "registered directly", plugin) for name, plugin in extra)

    for name, dist, plugin in sources:
        _check_api_version(name, dist, plugin)
        try:
            manager.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r}: {exc}", plugin=name) from exc
    manager.register(DefaultRoomPolicy(default_rooms), name="pushsvc.default_room_policy")
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {exc.plugin!r} implements an unknown hook: {exc}",
            plugin=manager.get_name(exc.plugin),
        ) from exc
    for hook_name in sorted(SYNC_HOOKS):
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if inspect.iscoroutinefunction(impl.function):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {hook_name} cannot be async def "
                    "(pushsvc uses its answer at once)",
                    plugin=impl.plugin_name,
                )
    for hook_name in sorted(ISOLATED_HOOKS):
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {hook_name} cannot be a wrapper "
                    "(pushsvc calls it implementation by implementation)",
                    plugin=impl.plugin_name,
                )

    dists = {name: dist for name, dist, _plugin in sources}
    declared_by: dict[str, list[MessageType]] = {}
    for impl in manager.hook.pushsvc_register_message_types.get_hookimpls():
        try:
            declared = list(cast(Iterable[MessageType], impl.function()))
        except Exception as exc:
            dist = dists.get(impl.plugin_name, "registered directly")
            module = getattr(impl.function, "__module__", None)
            what = "failed in pushsvc_register_message_types"
            raise _failed(impl.plugin_name, dist, what, exc, module) from exc
        declared_by[impl.plugin_name] = declared
    types: dict[str, RegisteredType] = {}
    for name, dist, _plugin in sources:
        for message_type in declared_by.get(name, ()):
            if not isinstance(message_type, MessageType):
                raise PluginError(
                    f"plugin {name!r} ({dist}) returned {message_type!r}, not a pushsvc.MessageType"
                )
            if message_type.name in CORE_TYPES:
                raise PluginError(
                    f"plugin {name!r} ({dist}) declares message type "
                    f"{message_type.name!r}, which is a core command"
                )
            if message_type.name in types:
                owner = types[message_type.name].plugin
                raise PluginError(
                    f"message type {message_type.name!r} is declared by two plugins: "
                    f"{owner!r} ({dists[owner]}) and {name!r} ({dist}); "
                    "disable one with plugins.disabled"
                )
            types[message_type.name] = RegisteredType(message_type, name)
    config_schemas: dict[str, Mapping[str, Setting]] = {}
    for impl in manager.hook.pushsvc_config_schema.get_hookimpls():
        dist = dists.get(impl.plugin_name, "registered directly")
        try:
            schema = dict(cast(Mapping[str, Setting], impl.function()))
        except Exception as exc:
            module = getattr(impl.function, "__module__", None)
            raise _failed(
                impl.plugin_name, dist, "failed in pushsvc_config_schema", exc, module
            ) from exc
        for key, spec in schema.items():
            if not isinstance(spec, Setting):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} ({dist}) declares setting {key!r} as "
                    f"{spec!r}, not a pushsvc.Setting",
                    plugin=impl.plugin_name,
                )
        config_schemas[impl.plugin_name] = schema
    loaded = [
        LoadedPlugin(
            name,
            dist,
            getattr(plugin, "__name__", type(plugin).__name__),
            tuple(t.name for t in declared_by.get(name, ())),
        )
        for name, dist, plugin in sources
    ]
    return Plugins(manager, loaded, types, config_schemas)


async def await_me_maybe(value: T | Awaitable[T]) -> T:
    """Await ``value`` if a hook returned an awaitable, else return it."""
    if inspect.isawaitable(value):
        return await value
    return value


async def await_each(results: Sequence[Any]) -> list[Any]:
    """The results of a (not firstresult) hook call, each awaited if it is awaitable.

    pluggy is synchronous: an ``async def`` implementation returns a coroutine
    in the result list. They are awaited one by one, in the order pluggy
    called them, so an exception stops the caller (startup fails) instead of
    being lost with a "never awaited" warning.
    """
    return [await await_me_maybe(result) for result in results]
