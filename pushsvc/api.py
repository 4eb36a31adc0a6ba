"""Deprecated alias: import :class:`ApiHandler` from :mod:`pushsvc` instead.

Kept so that plugins written against the 0.1 docs (``from pushsvc.api import
ApiHandler``) still load; importing it warns (``DeprecationWarning``) and it
will be removed in 1.0. The names live in :mod:`pushsvc.http.base` now.
"""

import warnings

from pushsvc.http.base import ApiError, ApiHandler, JsonHandler, bad_request

warnings.warn(
    "pushsvc.api is deprecated; use 'from pushsvc import ApiHandler' (removed in 1.0)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["ApiError", "ApiHandler", "JsonHandler", "bad_request"]
