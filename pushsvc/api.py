"""Deprecated: import :class:`~pushsvc.http.api.ApiHandler` from :mod:`pushsvc`.

Kept so that plugins written against the 0.1 docs (``from pushsvc.api import
ApiHandler``) still load; it will be removed in 1.0.
"""

from pushsvc.http.api import ApiError, ApiHandler, JsonHandler, bad_request

__all__ = ["ApiError", "ApiHandler", "JsonHandler", "bad_request"]
