"""Frame codec: turns client frames into commands and server messages into bytes.

Pure functions, no I/O: :func:`decode_frame` and :func:`validate` never raise
for any input; they return a :class:`Command` or a :class:`FrameError`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pushsvc.protocol import ids
from pushsvc.protocol.codes import ErrorCode
from pushsvc.protocol.fields import Field

MAX_REF_LENGTH = 64
#: Fields a client may send but the server always fills itself.
SERVER_FILLED = ("user", "from", "timestamp")


# Command and FrameError are not frozen: two are built for every frame, and a frozen
# dataclass's __init__ costs three times as much (object.__setattr__ per field). Nothing
# changes one after it is built.


@dataclass(slots=True)
class Command:
    """A decoded client frame: its ``type``, other fields and ``ref``."""

    type: str
    fields: dict[str, Any]
    ref: str | None


@dataclass(slots=True)
class FrameError:
    """Why a frame was refused: becomes an ``error`` frame."""

    code: ErrorCode
    message: str
    ref: str | None = None


def decode_frame(data: str | bytes, *, binary: bool = False) -> Command | FrameError:
    """Decode one WebSocket message into a :class:`Command`.

    ``data`` is the text of a text frame (``bytes`` when it was not valid
    UTF-8) or the payload of a binary frame (``binary=True``).
    """
    if binary:
        return FrameError(ErrorCode.BAD_REQUEST, "binary frames are not supported; send JSON text")
    try:
        obj = orjson.loads(data)  # bytes are checked for UTF-8 by orjson itself
    except orjson.JSONDecodeError as exc:
        if isinstance(data, bytes) and not _is_utf8(data):
            return FrameError(ErrorCode.BAD_REQUEST, "frame is not valid UTF-8")
        return FrameError(ErrorCode.BAD_REQUEST, f"invalid JSON: {exc}")
    if not isinstance(obj, dict):
        return FrameError(ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    ref = obj.pop("ref", None)
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_LENGTH):
        return FrameError(
            ErrorCode.BAD_REQUEST, f"ref: must be a string of at most {MAX_REF_LENGTH} characters"
        )
    kind = obj.pop("type", None)
    if kind is None:
        return FrameError(ErrorCode.BAD_REQUEST, "type: missing", ref)
    if not isinstance(kind, str):
        return FrameError(ErrorCode.BAD_REQUEST, "type: must be a string", ref)
    for name in SERVER_FILLED:
        obj.pop(name, None)
    return Command(kind, obj, ref)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
}


#: What ``max_length`` and ``min_length`` apply to (a tuple: ``str | list`` would build a
#: union object on every check).
_SIZED = (str, list)


def _type_ok(value: Any, wanted: type) -> bool:
    if wanted is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


_EXACT_TYPES: dict[type | tuple[type, ...], frozenset[type]] = {}  # Field.types -> accepted


def _exact_types(types: type | tuple[type, ...]) -> frozenset[type]:
    """The exact value types that satisfy ``types`` (``int`` where ``float`` is asked)."""
    wanted = set(types if isinstance(types, tuple) else (types,))
    if float in wanted:
        wanted.add(int)
    return frozenset(wanted)


def _describe(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


#: A field as :func:`validate` checks it: (name, spec, whether a string of at most
#: ``longest`` characters passes on sight, ``longest``). Most fields are plain
#: strings, checked with one type test and one length test.
_Check = tuple[str, Field, bool, int]
_PLANS: dict[int, tuple[Mapping[str, Field], tuple[_Check, ...]]] = {}  # id(fields) ->
_PLANS_MAX = 10_000  # declarations cached (a plugin building its fields per frame stops it)


def _plan(fields: Mapping[str, Field]) -> tuple[_Check, ...]:
    """The checks of a fields declaration, made once per declaration (kept alive here).

    A declaration is fixed once registered (a message type's or a core
    command's ``fields``): a mapping changed after its first frame keeps its
    first plan.
    """
    cached = _PLANS.get(id(fields))
    if cached is not None and cached[0] is fields:
        return cached[1]
    plan = tuple(
        (
            name,
            spec,
            str in _exact_types(spec.types) and spec.items is None and not spec.extra,
            spec.max_length if spec.max_length is not None else sys.maxsize,
        )
        for name, spec in fields.items()
    )
    if len(_PLANS) < _PLANS_MAX:
        _PLANS[id(fields)] = (fields, plan)
    return plan


def validate(command: Command, fields: Mapping[str, Field]) -> Command | FrameError:
    """Check ``command``'s fields against a message type's declaration.

    Returns the command with only the declared fields, or the first problem
    as ``bad_request`` naming the field.
    """
    given = command.fields
    present = 0  # declared fields the frame has
    for name, spec, plain_string, longest in _plan(fields):
        value = given.get(name)
        if value is None:
            if spec.required:
                return FrameError(ErrorCode.BAD_REQUEST, f"{name}: missing", command.ref)
            continue
        # A non-empty string within its length, where strings need nothing more: the
        # usual field, settled here; anything else takes every check.
        if not (plain_string and type(value) is str and 0 < len(value) <= longest):
            problem = _problem(name, value, spec)
            if problem is not None:
                return FrameError(ErrorCode.BAD_REQUEST, problem, command.ref)
        present += 1
    if present == len(given):  # nothing undeclared (null values aside): the frame as it is
        return command
    clean = {name: given[name] for name in fields if given.get(name) is not None}
    return Command(command.type, clean, command.ref)


def _problem(name: str, value: Any, spec: Field) -> str | None:
    """The first check ``value`` (not None) fails, as the error message, or None."""
    # Decoded JSON holds exact types only, so one set lookup settles most fields.
    exact = _EXACT_TYPES.get(spec.types)
    if exact is None:
        exact = _EXACT_TYPES[spec.types] = _exact_types(spec.types)
    if type(value) not in exact:
        types = spec.types if isinstance(spec.types, tuple) else (spec.types,)
        if not any(_type_ok(value, t) for t in types):
            return f"{name}: must be {_describe(types)}"
    if spec.max_length is not None and isinstance(value, _SIZED) and len(value) > spec.max_length:
        unit = "characters" if isinstance(value, str) else "items"
        return f"{name}: at most {spec.max_length} {unit}"
    items = spec.items
    if (
        items is not None
        and isinstance(value, list)
        and not all(_type_ok(item, items) for item in value)
    ):
        return f"{name}: every item must be {_describe((items,))}"
    if isinstance(value, str) and spec.required and not value:
        return f"{name}: must not be empty"
    if spec.extra:
        problem = _extra_problem(value, spec)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _extra_problem(value: Any, spec: Field) -> str | None:
    """The first failed check among min_length, pattern, choices, validator, or None."""
    if spec.min_length is not None and isinstance(value, _SIZED) and len(value) < spec.min_length:
        unit = "characters" if isinstance(value, str) else "items"
        return f"at least {spec.min_length} {unit}"
    if (
        spec.compiled is not None
        and isinstance(value, str)
        and spec.compiled.fullmatch(value) is None
    ):
        return f"must match {spec.pattern}"
    choices = spec.choices
    if choices is not None:
        try:
            allowed = value in choices
        except TypeError:  # an unhashable value against a frozenset
            allowed = False
        if not allowed:
            return "must be one of " + ", ".join(sorted(repr(c) for c in choices))
    if spec.validator is not None:
        try:
            spec.validator(value)
        except ValueError as exc:
            return str(exc) or "invalid"
    return None


_STAMPED = frozenset(("type", "id", "timestamp"))  # the keys stamp() sets itself


def stamp(message: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Give a message its ``id`` and ``timestamp`` (server clock, ms); ``type`` stays first."""
    message_id = ids.new_id()
    out = {"type": message["type"], "id": message_id}
    for key, value in message.items():
        if key not in _STAMPED:
            out[key] = value
    out["timestamp"] = int(time.time() * 1000)
    return message_id, out


def encode(message: Mapping[str, Any]) -> bytes:
    """Serialise a server message to UTF-8 JSON bytes (once per broadcast)."""
    return orjson.dumps(message)


def error_frame(
    code: str, message: str, ref: str | None = None, retry_after: float | None = None
) -> bytes:
    """Encode an ``error`` frame."""
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    if retry_after is not None:
        out["retry_after"] = round(retry_after, 3)
    return orjson.dumps(out)


def reply_frame(ref: str, fields: Mapping[str, Any] | None = None) -> bytes:
    """Encode a ``reply`` frame for the command that carried ``ref``."""
    out: dict[str, Any] = {"type": "reply", "ref": ref, "ok": True}
    if fields:
        out.update(fields)
    return orjson.dumps(out)


class Broadcast:
    """One encoded payload for many recipients, wrapped once per transport kind.

    The JSON is encoded once by the publisher; a transport that adds its own
    framing (RFC 6455 header) asks :meth:`wrapped`, which computes the framed
    bytes for the first member and returns the same bytes to the rest.
    """

    __slots__ = ("_other", "_wrap", "_wrapped", "payload", "type")

    def __init__(self, payload: bytes, message_type: str) -> None:
        self.payload = payload  # UTF-8 JSON, as every recipient receives it
        self.type = message_type  # metric label
        self._wrap: Callable[[bytes], bytes] | None = None  # the first framing asked for
        self._wrapped = b""  # its result
        self._other: dict[Callable[[bytes], bytes], bytes] | None = None  # other transports'

    def wrapped(self, wrap: Callable[[bytes], bytes]) -> bytes:
        """``wrap(payload)``, computed once per broadcast and framing function."""
        if self._wrap is wrap:
            return self._wrapped
        if self._wrap is None:
            self._wrap, self._wrapped = wrap, wrap(self.payload)
            return self._wrapped
        other = self._other
        if other is None:
            other = self._other = {}
        framed = other.get(wrap)
        if framed is None:
            framed = other[wrap] = wrap(self.payload)
        return framed
