"""Redis URLs to redis-py connection pools: one place for every Redis user of pushsvc.

The store, the broker and the cluster registry each take a URL
(``store.url``, ``broker.url``, ``cluster.url``) and build their pool here,
so every form works for all three:

- ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS),
  ``unix:///path/to/socket?db=N``: one Redis;
- ``redis+sentinel://[user:password@]host1:port1,host2:port2/master-name/db``
  (``rediss+sentinel://`` for TLS to Redis): Redis Sentinel. The master is
  asked of the sentinels on every new connection, so after a failover the
  next connect (the broker's reconnect, the store's next pooled connection)
  reaches the new master without a restart; a connection to a master that
  became a replica fails on its first write (``READONLY``) and is replaced;
- ``redis+cluster://[user:password@]host1:port1,host2:port2`` (``rediss+cluster://``
  for TLS): Redis Cluster. The hosts are startup nodes (any of the masters or
  replicas; the rest are discovered); there is no db number. It is a
  :class:`~redis.asyncio.cluster.RedisCluster` client, not a pool:
  :func:`cluster_client`.

Query parameters a component reads itself (``prefix``, ``max_connections``)
are taken out by that component first; the rest are redis-py's connection
options (``socket_keepalive``, ``ssl_cert_reqs``, ...) and apply to the
connections to Redis. The password is read from the URL, never logged:
:func:`redacted` is the form for messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from pushsvc.config import REDIS_SCHEMES

#: Every URL form, as ``str.startswith`` takes it.
SCHEMES = REDIS_SCHEMES
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: list[tuple[str, int]]  # (host, port) of every sentinel
    master: str  # the monitored master's name
    db: int  # database number on the master
    username: str | None
    password: str | None
    tls: bool  # rediss+sentinel: TLS to the master
    options: dict[str, str]  # redis-py connection options from the query


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """A ``redis+cluster://`` URL, parsed."""

    nodes: list[tuple[str, int]]  # (host, port) of every startup node
    username: str | None
    password: str | None
    tls: bool  # rediss+cluster: TLS to every node
    options: dict[str, str]  # redis-py connection options from the query


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _addresses(url: str, key: str, default_port: int, what: str) -> list[tuple[str, int]]:
    """The ``host:port,host:port`` list of a Sentinel or Cluster URL."""
    hosts = urlsplit(url).netloc.rsplit("@", 1)[-1]
    addresses = []
    for item in hosts.split(","):
        match = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::([0-9]+))?", item)
        if match is None:
            raise ValueError(f"{key}: bad {what} address {item!r} in {redacted(url)!r}")
        addresses.append((match.group(1).strip("[]"), int(match.group(2) or default_port)))
    return addresses


def parse_cluster(url: str, key: str) -> ClusterTarget:
    """Parse ``redis+cluster://h1:p1,h2:p2``; ValueError names ``key``."""
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ValueError(
            f"{key}: a Redis Cluster has only database 0; drop the path {parts.path!r} "
            f"from {redacted(url)!r}"
        )
    return ClusterTarget(
        nodes=_addresses(url, key, 6379, "cluster node"),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme.startswith("rediss"),
        options=dict(parse_qsl(parts.query, keep_blank_values=True)),
    )


def cluster_client(url: str, *, key: str, **kwargs: Any) -> RedisCluster:
    """A redis-py :class:`RedisCluster` client for a ``redis+cluster://`` URL.

    ``kwargs`` are connection options (timeouts, retry, ``max_connections``,
    per node) and win over the URL's query. Connections are made on first use
    (``await client.initialize()`` to connect now). Raises ValueError (naming
    ``key``) for a URL it cannot use.
    """
    target = parse_cluster(url, key)
    kwargs.pop("timeout", None)
    options: dict[str, Any] = {**_typed(target.options), **kwargs}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **options,
    )


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names a Sentinel-monitored master."""
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def parse_sentinel(url: str, key: str) -> SentinelTarget:
    """Parse ``redis+sentinel://h1:p1,h2:p2/master/db``; ValueError names ``key``."""
    parts = urlsplit(url)
    sentinels = _addresses(url, key, 26379, "sentinel")
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"{key}: a Sentinel URL's path is /<master name>[/<db number>], "
            f"not {parts.path!r} in {redacted(url)!r}"
        )
    return SentinelTarget(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme.startswith("rediss"),
        options=dict(parse_qsl(parts.query, keep_blank_values=True)),
    )


def check_path(url: str, key: str) -> None:
    """Refuse a path that is not ``/<db>`` (one Redis), ``/<master>[/<db>]`` (Sentinel)
    or empty (Cluster)."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        parse_sentinel(url, key)
    elif parts.scheme in CLUSTER_SCHEMES:
        parse_cluster(url, key)
    elif parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]+", parts.path):
        raise ValueError(f"{key}: the path must be /<db number>, not {parts.path!r}")


def connection_pool(
    url: str,
    *,
    key: str,
    blocking: bool = False,
    **kwargs: Any,
) -> aioredis.ConnectionPool:
    """A redis-py pool for ``url`` (any form of :data:`SCHEMES` but Cluster).

    ``kwargs`` are connection options (timeouts, retry, ``max_connections``)
    and win over the URL's query. ``blocking``: a pool that waits for a free
    connection up to ``timeout`` (one Redis only; a Sentinel pool raises
    instead, so keep ``max_connections`` at or above the connections in use).
    Raises ValueError (naming ``key``) for a URL it cannot use, and for a
    Cluster URL (:func:`cluster_client` is its client).
    """
    if is_cluster(url):
        raise ValueError(f"{key}: {redacted(url)!r} is a Redis Cluster; use cluster_client")
    if not is_sentinel(url):
        check_path(url, key)
        pool_class = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
        if not blocking:
            kwargs.pop("timeout", None)
        return pool_class.from_url(url, **kwargs)
    target = parse_sentinel(url, key)
    kwargs.pop("timeout", None)
    options: dict[str, Any] = {**_typed(target.options), **kwargs}
    credentials = {"username": target.username, "password": target.password}
    sentinel_options = {
        name: options[name]
        for name in ("socket_timeout", "socket_connect_timeout")
        if name in options
    }
    manager = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs={**sentinel_options, **credentials},
        **options,
    )
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.master,
        manager,
        db=target.db,
        ssl=target.tls,
        **credentials,
        **options,
    )


def _typed(options: dict[str, str]) -> dict[str, Any]:
    """redis-py's URL query parsing for a Sentinel URL's options (numbers, booleans)."""
    if not options:
        return {}
    query = "&".join(f"{name}={value}" for name, value in options.items())
    probe = urlunsplit(("redis", "localhost", "/0", query, ""))
    parsed: dict[str, Any] = dict(aioredis.connection.parse_url(probe))
    for name in ("host", "port", "db", "path", "username", "password"):
        parsed.pop(name, None)
    return parsed


def take_params(url: str, names: tuple[str, ...], key: str) -> tuple[str, dict[str, str]]:
    """Take a component's own query parameters (``prefix``, ...) out of ``url``.

    Returns ``url`` without them (the rest is redis-py's) and those given.
    Raises ValueError (naming ``key``) for one of ``names`` given twice.
    """
    parts = urlsplit(url)
    given: dict[str, str] = {}
    rest = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in names:
            rest.append((name, value))
        elif name in given:
            raise ValueError(f"{key}: {name} given more than once in {redacted(url)!r}")
        else:
            given[name] = value
    return urlunsplit(parts._replace(query=urlencode(rest))), given


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def where(url: str) -> str:
    """A short description of where ``url`` points (for logs): host:port or the sentinels."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        target = parse_sentinel(url, "url")
        return f"master {target.master!r} via sentinels {parts.netloc.rsplit('@', 1)[-1]}"
    if parts.scheme in CLUSTER_SCHEMES:
        return f"cluster via {parts.netloc.rsplit('@', 1)[-1]}"
    if parts.scheme == "unix":
        return parts.path
    return parts.netloc.rsplit("@", 1)[-1]
