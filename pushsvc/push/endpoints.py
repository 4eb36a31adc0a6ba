"""Which push endpoints the server may fetch: the guard against server-side request forgery.

A subscription's endpoint is a URL a client chose, and the server POSTs to
it. Unchecked, a client could make the server reach its own network (an
admin port on 127.0.0.1, a cloud metadata service on 169.254.169.254). So:

- the URL must be ``https:`` without user info, and its host must match
  ``push.allowed_hosts`` (globs; the big browsers' push services by default);
- every address its host resolves to must be public: no loopback, private,
  link-local, shared (CGNAT), multicast, reserved or unspecified address, and
  none of those inside an IPv4-mapped IPv6 address;
- the check runs at subscribe time (a clear error for the client) and again
  in the resolver of the HTTP client that sends the pushes
  (:class:`GuardedResolver`), so a DNS answer that changes in between (DNS
  rebinding) is refused too; redirects are never followed.

``push.allow_private_endpoints = true`` lifts the address check and allows
``http:`` (tests and labs only).
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import tornado.netutil

from pushsvc.config import PushConfig


class EndpointRefused(ValueError):
    """The endpoint may not be fetched; the message says why."""


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """What endpoints are acceptable (``push.allowed_hosts``, ``push.allow_private_endpoints``)."""

    allowed_hosts: tuple[str, ...] = ()  # globs; empty: any host
    allow_private: bool = False  # loopback, private addresses and http: too

    @classmethod
    def from_config(cls, config: PushConfig) -> EndpointPolicy:
        """The policy the ``[push]`` section sets."""
        hosts = tuple(host.lower() for host in config.allowed_hosts)
        return cls(hosts, config.allow_private_endpoints)

    def check_url(self, endpoint: str) -> str:
        """Check scheme, user info and host of ``endpoint``; returns the host (lowercase)."""
        try:
            parts = urlsplit(endpoint)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise EndpointRefused(f"endpoint: not a URL ({exc})") from exc
        schemes = ("https", "http") if self.allow_private else ("https",)
        if parts.scheme not in schemes:
            raise EndpointRefused("endpoint: must be an https: URL")
        if parts.username is not None or parts.password is not None:
            raise EndpointRefused("endpoint: no user info allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise EndpointRefused("endpoint: no host")
        if self.allowed_hosts and not any(
            fnmatch.fnmatchcase(host, glob) for glob in self.allowed_hosts
        ):
            raise EndpointRefused(f"endpoint: host {host} is not an allowed push service")
        if not self.allow_private and _literal(host) is not None:
            check_address(host)
        return host

    async def check(self, endpoint: str) -> None:
        """Check the URL and every address its host resolves to (raises EndpointRefused)."""
        host = self.check_url(endpoint)
        if self.allow_private or _literal(host) is not None:
            return
        port = urlsplit(endpoint).port or 443
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise EndpointRefused(f"endpoint: host {host} does not resolve") from exc
        for _family, _type, _proto, _name, address in infos:
            check_address(str(address[0]))


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public(address: str) -> bool:
    """Whether ``address`` is a global unicast address (IPv4-mapped IPv6 unwrapped)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_address(address: str) -> None:
    """Raise :class:`EndpointRefused` unless ``address`` is public."""
    if not is_public(address):
        raise EndpointRefused(f"endpoint: resolves to a non-public address ({address})")


class GuardedResolver(tornado.netutil.Resolver):
    """Tornado's resolver, refusing hosts with any non-public address (unless allowed)."""

    def initialize(self, allow_private: bool = False, **kwargs: Any) -> None:
        """Wrap the default resolver."""
        self.inner = tornado.netutil.DefaultLoopResolver()  # the real lookup
        self.allow_private = allow_private  # push.allow_private_endpoints

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        """Resolve ``host``; raises EndpointRefused if any address is not public."""
        found: Sequence[tuple[int, Any]] = await self.inner.resolve(host, port, family)
        if not self.allow_private:
            for _family, address in found:
                check_address(str(address[0]))
        return list(found)

    def close(self) -> None:
        """Close the wrapped resolver."""
        self.inner.close()
