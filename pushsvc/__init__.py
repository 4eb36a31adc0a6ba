"""pushsvc: a notification push microservice.

App clients hold a WebSocket to pushsvc, authenticated by JWT; app backends
push through its HTTP API; plugins add message types through pluggy hooks.

The public API for plugin authors is re-exported here (docs/plugins.md):

- :data:`hookimpl` marks hook implementations (see :mod:`pushsvc.hookspecs`).
- :class:`MessageType`, :class:`Guarantee`, :class:`Field` declare a type.
- :class:`FrameContext` is what a message handler receives; :class:`Delivery`
  is what its ``send`` returns.
- :class:`Reply` and :class:`CommandError` are what a handler answers with.
- :class:`PushOptions` says whether and how a message also goes out through Web Push.
- :class:`ApiHandler`, :class:`ApiError`, :class:`IdempotencyKey`, :class:`Config`
  and the module :mod:`openapi <pushsvc.http.openapi>` are for plugin HTTP routes.

``ApiHandler``, ``ApiError`` and ``openapi`` are loaded on first use (PEP 562):
``import pushsvc`` alone imports neither Tornado's handlers nor the core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pushsvc.config import Config, Setting
from pushsvc.plugin.api import (
    PLUGIN_API_VERSION,
    AuthError,
    CommandError,
    Delivery,
    Field,
    FrameContext,
    Guarantee,
    HandshakeRequest,
    MessageType,
    Principal,
    PushOptions,
    Reply,
    hookimpl,
)
from pushsvc.store import IdempotencyKey

if TYPE_CHECKING:
    from pushsvc.http import openapi
    from pushsvc.http.base import ApiError, ApiHandler

from pushsvc.version import __version__

#: Names loaded on first access: name -> (module, attribute or None for the module).
_LAZY: dict[str, tuple[str, str | None]] = {
    "ApiError": ("pushsvc.http.base", "ApiError"),
    "ApiHandler": ("pushsvc.http.base", "ApiHandler"),
    "openapi": ("pushsvc.http.openapi", None),
}

__all__ = [
    "PLUGIN_API_VERSION",
    "ApiError",
    "ApiHandler",
    "AuthError",
    "CommandError",
    "Config",
    "Delivery",
    "Field",
    "FrameContext",
    "Guarantee",
    "HandshakeRequest",
    "IdempotencyKey",
    "MessageType",
    "Principal",
    "PushOptions",
    "Reply",
    "Setting",
    "__version__",
    "hookimpl",
    "openapi",
]


def __getattr__(name: str) -> Any:
    """Import the HTTP names (``ApiHandler``, ``ApiError``, ``openapi``) on first use."""
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
