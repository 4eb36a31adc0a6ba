"""pushsvc: a notification push microservice.

App clients hold a WebSocket to pushsvc, authenticated by JWT; app backends
push through its HTTP API; plugins add message types through pluggy hooks.

The public API for plugin authors is re-exported here:

- :data:`hookimpl` marks hook implementations (see :mod:`pushsvc.hookspecs`).
- :class:`MessageType`, :class:`Guarantee`, :class:`Field` declare a type.
- :class:`FrameContext` is what a message handler receives.
- :class:`Reply` and :class:`CommandError` are what a handler answers with.
"""

from pushsvc.plugin.api import (
    CommandError,
    Field,
    FrameContext,
    Guarantee,
    MessageType,
    Principal,
    Reply,
    hookimpl,
)
from pushsvc.version import __version__

__all__ = [
    "CommandError",
    "Field",
    "FrameContext",
    "Guarantee",
    "MessageType",
    "Principal",
    "Reply",
    "__version__",
    "hookimpl",
]
