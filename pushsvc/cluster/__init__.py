"""Cluster: what the nodes know about each other's connections (interface and factory).

The :class:`Registry` counts each user's connections over every node (the
per-user connection cap) and lists each room's users over every node
(presence), with per-node liveness: a node's entries stop counting within
``cluster.node_ttl`` seconds of its last heartbeat.

``cluster.url`` selects the implementation (empty: ``broker.url`` when that
is a Redis URL, else ``memory://``): ``memory://`` (this process is the
whole cluster; the default) or a Redis URL (shared by every node on that
Redis; any form of :mod:`pushsvc.redisurl`).
"""

from __future__ import annotations

from pushsvc.cluster.contracts import DepartedCallback, ErrorCallback, Registry, RegistryOptions
from pushsvc.config import CLUSTER_SCHEMES, REDIS_SCHEMES

__all__ = ["DepartedCallback", "ErrorCallback", "Registry", "RegistryOptions", "make_registry"]


def make_registry(url: str, options: RegistryOptions | None = None) -> Registry:
    """Build the registry for ``url``; raises ``ValueError`` for an unsupported scheme."""
    if url.startswith("memory://"):
        from pushsvc.cluster.memory import MemoryRegistry

        return MemoryRegistry(options)
    if url.startswith(REDIS_SCHEMES):
        from pushsvc.cluster.redis import RedisRegistry

        return RedisRegistry(url, options)
    supported = ", ".join(CLUSTER_SCHEMES)
    raise ValueError(f"cluster.url: unsupported scheme in {url!r} (supported: {supported})")
