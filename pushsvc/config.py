"""Configuration: TOML file, then environment, then command line, all validated.

Every key is declared once below with its default, its documentation and its
bounds; ``config/pushsvc.toml`` documents the same keys for operators (a test
keeps the two in step). A bad value raises :class:`ConfigError` naming the key.

Precedence, highest first: command-line flags, ``PUSHSVC_<SECTION>__<KEY>``
environment variables (plus ``PUSHSVC_JWT_SECRET``), the file named by
``--config`` or ``PUSHSVC_CONFIG``, the defaults here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "PUSHSVC_"


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the key's full name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    reloadable: bool = False,
    secret: bool = False,
    schemes: tuple[str, ...] | None = None,
) -> Any:
    """Declare a config key with its default, documentation and checks.

    ``schemes`` lists the URL prefixes a non-empty value may start with.
    """
    meta = {
        "doc": doc,
        "minimum": minimum,
        "choices": choices,
        "schemes": schemes,
        "reloadable": reloadable,
        "secret": secret,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_KINDS: dict[type, Any] = {bool: bool, int: int, float: float, str: str, list: list[str]}


@dataclass(frozen=True)
class Setting:
    """One key a plugin declares for its ``[plugins.<name>]`` section.

    The same checks as pushsvc's own keys (:func:`setting`): the type (taken
    from ``default``: bool, int, float, str or a list of strings, unless
    ``kind`` says otherwise), ``minimum``, ``choices``, ``schemes``. A
    ``reloadable`` key's new value reaches the plugin on ``SIGHUP``
    (``pushsvc_settings_changed``); the others need a restart.
    """

    default: Any
    doc: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    schemes: tuple[str, ...] | None = None
    kind: Any = None
    reloadable: bool = False

    def __post_init__(self) -> None:
        if self.kind is None:
            kind = _KINDS.get(type(self.default))
            if kind is None:
                raise TypeError(f"Setting: no config type for default {self.default!r}")
            object.__setattr__(self, "kind", kind)
        elif self.kind not in _KINDS.values():
            raise TypeError(
                f"Setting: kind must be bool, int, float, str or list[str], not {self.kind!r}"
            )

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The checks, as :func:`setting` stores them."""
        return {
            "minimum": self.minimum,
            "choices": self.choices,
            "schemes": self.schemes,
            "reloadable": self.reloadable,
        }

    def default_value(self) -> Any:
        """The default (a fresh copy of a list)."""
        return list(self.default) if isinstance(self.default, list) else self.default


class _EnvValue(str):
    """A raw ``PUSHSVC_PLUGINS__<NAME>__<KEY>`` value, converted once its type is known."""

    __slots__ = ()


_TYPE_BUCKET = re.compile(r"^([a-z][a-z0-9_.-]{0,63})=(?:(off)|([0-9.]+)(?:/([0-9.]+))?)$")


def parse_type_buckets(entries: list[str]) -> dict[str, tuple[float, float] | None]:
    """``ratelimit.type_buckets`` as ``{type: (rate, burst)}``, None for ``off``.

    Raises:
        ConfigError: ``ratelimit.type_buckets`` naming the bad entry.
    """
    parsed: dict[str, tuple[float, float] | None] = {}
    for entry in entries:
        match = _TYPE_BUCKET.match(entry.replace(" ", ""))
        problem = None if match else 'must be "TYPE=RATE/BURST", "TYPE=RATE" or "TYPE=off"'
        if match and not match.group(2):
            try:
                rate = float(match.group(3))
                burst = float(match.group(4)) if match.group(4) else max(1.0, rate)
            except ValueError:
                rate = burst = -1.0
            if not rate > 0 or not burst >= 1:
                problem = "needs a rate above 0 and a burst of at least 1"
        if problem or match is None:
            raise ConfigError("ratelimit.type_buckets", f"{entry!r}: {problem}")
        parsed[match.group(1)] = None if match.group(2) else (rate, burst)
    return parsed


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: listening, origins, frame limits, heartbeat, drain."""

    host: str = setting(
        "127.0.0.1",
        "Listen address; '' for every interface (IPv4 and IPv6), 0.0.0.0 for IPv4 only, "
        ":: for IPv6 only.",
    )
    port: int = setting(8888, "Listen port.", minimum=0)
    data_dir: str = setting("pushsvc-data", "State folder (SQLite store); created if missing.")
    allowed_origins: list[str] = setting(
        [],
        "Allowed browser Origin values, globs allowed ('https://*.example.com', '*'). "
        "Empty: only same-host origins. A request without Origin is always allowed.",
        reloadable=True,
    )
    max_message_bytes: int = setting(
        65536, "Largest accepted client frame; larger frames close with 1009.", minimum=64
    )
    max_buffer_bytes: int = setting(
        4 * 1024 * 1024,
        "Unsent bytes a connection may queue before it is closed as a slow consumer (4008).",
        minimum=1024,
    )
    heartbeat: float = setting(
        25.0, "Seconds between protocol pings; also sent in 'welcome'.", minimum=0.5
    )
    heartbeat_timeout: float = setting(
        20.0, "Seconds without any pong or frame before a connection is closed.", minimum=0.5
    )
    drain_seconds: float = setting(
        10.0, "SIGTERM closes connections with 1001 spread over this many seconds.", minimum=0
    )
    xheaders: bool = setting(
        False, "Trust X-Real-Ip / X-Forwarded-For (only behind a proxy you run)."
    )
    header_timeout: float = setting(
        10.0,
        "Seconds a connection has to send a complete request head, counted from its "
        "accept or from the end of the previous response on a keep-alive connection; "
        "then it is closed without an answer.",
        minimum=0.1,
    )
    max_header_bytes: int = setting(
        16384,
        "Longest request head (request line and headers), on every request of every "
        "connection; a longer one closes the connection without an answer.",
        minimum=1024,
    )
    body_timeout: float = setting(
        60.0, "Seconds to receive a whole request body; then the connection closes.", minimum=0.1
    )


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: how tokens are verified."""

    jwt_secret: str = setting(
        "", "HS256 shared secret (or env PUSHSVC_JWT_SECRET).", reloadable=True, secret=True
    )
    jwt_secret_file: str = setting(
        "", "File holding the HS256 secret (systemd LoadCredential).", reloadable=True
    )
    algorithms: list[str] = setting(
        ["HS256"],
        "Accepted JWT algorithms (allow-list); 'none' is never accepted.",
        reloadable=True,
    )
    audience: str = setting("", "Required 'aud' claim; empty: not checked.", reloadable=True)
    issuer: str = setting("", "Required 'iss' claim; empty: not checked.", reloadable=True)
    leeway: float = setting(
        30.0, "Seconds of clock skew allowed for exp, nbf, iat.", minimum=0, reloadable=True
    )
    require_exp: bool = setting(True, "Reject tokens without 'exp'.", reloadable=True)
    public_key_file: str = setting("", "PEM public key for RS256/ES256 tokens.", reloadable=True)
    jwks_url: str = setting(
        "", "JWKS URL for RS256/ES256 keys, selected by 'kid'.", reloadable=True
    )
    jwks_refresh_interval: float = setting(
        300.0, "Seconds between JWKS refreshes.", minimum=1, reloadable=True
    )
    jwks_min_refetch_interval: float = setting(
        30.0,
        "Least seconds between refetches caused by an unknown 'kid'.",
        minimum=0,
        reloadable=True,
    )
    default_rooms: list[str] = setting(
        ["*"], "Rooms (globs) a token without a 'rooms' claim may join.", reloadable=True
    )


@dataclass(frozen=True)
class RateLimitConfig:
    """``[ratelimit]``: token buckets and connection caps."""

    rate: float = setting(20.0, "Frames per second per connection.", minimum=0, reloadable=True)
    burst: float = setting(40.0, "Bucket size per connection.", minimum=1, reloadable=True)
    user_rate: float = setting(
        50.0, "Frames per second per user, over all connections.", minimum=0, reloadable=True
    )
    user_burst: float = setting(100.0, "Bucket size per user.", minimum=1, reloadable=True)
    max_connections_per_user: int = setting(
        20, "Open connections per user; 429 above.", minimum=1, reloadable=True
    )
    max_connections_per_ip: int = setting(
        1000, "Open connections per address; 429 above.", minimum=1, reloadable=True
    )
    handshake_rate: float = setting(
        20.0,
        "Handshakes per second per address (reconnect storms).",
        minimum=0,
        reloadable=True,
    )
    handshake_burst: float = setting(
        200.0, "Handshake bucket size per address.", minimum=1, reloadable=True
    )
    abuse_violations: int = setting(
        20,
        "Rate-limited frames allowed within abuse_window before close 1008.",
        minimum=1,
        reloadable=True,
    )
    abuse_window: float = setting(
        10.0, "Seconds over which abuse_violations are counted.", minimum=0.1, reloadable=True
    )
    type_buckets: list[str] = setting(
        [],
        "Own per-user buckets of message types, overriding what a type declares: "
        '"TYPE=RATE/BURST" (frames per second, bucket size; "TYPE=RATE": burst = rate), '
        '"TYPE=off" for none. E.g. ["typing=2/5", "chat=off"].',
        reloadable=True,
    )

    def __post_init__(self) -> None:
        parse_type_buckets(self.type_buckets)  # raises ConfigError naming the key


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: at-least-once retry policy."""

    ack_timeout: float = setting(10.0, "Seconds to wait for an ack before resending.", minimum=0.01)
    max_attempts: int = setting(8, "Sends before a message is dead-lettered.", minimum=1)
    backoff_max: float = setting(300.0, "Longest wait between resends, seconds.", minimum=0.01)
    ttl: float = setting(
        7 * 86400.0, "Seconds a message may stay pending before it is dead-lettered.", minimum=1
    )
    window: int = setting(
        100, "Unacked messages in flight per connection (redelivery flow control).", minimum=1
    )
    dead_letter_retention: float = setting(
        7 * 86400.0, "Seconds dead letters stay visible through the API.", minimum=0
    )


#: Redis URL forms every Redis user (store, broker, cluster registry) takes
#: (:mod:`pushsvc.redisurl` turns them into connection pools).
REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where accepted messages are persisted."""

    url: str = setting(
        "",
        "'sqlite:///PATH'; empty: sqlite under server.data_dir (pushsvc.sqlite3); "
        "or Redis, shared by every node: 'redis://HOST:PORT/DB', 'rediss://...' (TLS), "
        "'unix:///PATH?db=N', 'redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB' (Sentinel), "
        "'redis+cluster://HOST:PORT,HOST:PORT' (Redis Cluster: startup nodes, no DB), "
        "each taking '?prefix=NAME:' (before every key, default "
        "'pushsvc:', as for the broker) and '?max_connections=N' (default 4); see docs/redis.md.",
        schemes=("sqlite:///", *REDIS_SCHEMES),
    )
    synchronous: str = setting(
        "normal",
        "SQLite durability: 'normal' survives a process crash (kill -9); "
        "'full' also survives power loss, at a cost in throughput.",
        choices=("normal", "full"),
    )
    batch_max: int = setting(512, "Most operations in one group commit.", minimum=1)
    busy_timeout: float = setting(
        5.0,
        "Seconds to wait for a locked database before failing the write; with Redis, "
        "the most any command (connect, reply, a free connection) may take.",
        minimum=0,
    )


@dataclass(frozen=True)
class BrokerConfig:
    """``[broker]``: how nodes exchange messages."""

    url: str = setting(
        "memory://",
        "'memory://' (one process; delivery inside publish), 'memory://?delivery=async'"
        " (delivery on a later loop pass, as over a network; for tests), or Redis pub/sub"
        " between nodes: 'redis://[user:password@]host:port/db', 'rediss://...' (TLS),"
        " 'unix:///path/redis.sock?db=0', 'redis+sentinel://host:port,host:port/master/db'"
        " (Sentinel); '?prefix=' sets the channel prefix (default 'pushsvc:').",
        schemes=("memory://", *REDIS_SCHEMES),
    )
    timeout: float = setting(
        1.0,
        "Seconds a Redis publish, connect or SUBSCRIBE may take before it counts as failed"
        " (a publish then answers 'unavailable').",
        minimum=0.01,
    )
    probe_interval: float = setting(
        1.0,
        "Seconds between the Redis liveness probes a node publishes to itself; the broker is"
        " unhealthy when nothing arrived for 3 intervals.",
        minimum=0.05,
    )


#: URL prefixes ``cluster.url`` accepts (``pushsvc.cluster.make_registry``).
CLUSTER_SCHEMES = ("memory://", *REDIS_SCHEMES)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: what the nodes share about their connections (caps, presence)."""

    url: str = setting(
        "",
        "Where the nodes count each user's connections (ratelimit.max_connections_per_user"
        " holds across nodes) and list each room's users (presence): a Redis URL as for"
        " broker.url; 'memory://': this process only. Empty: broker.url when that is"
        " a Redis URL, else 'memory://'.",
        schemes=CLUSTER_SCHEMES,
    )
    node_ttl: float = setting(
        15.0,
        "Seconds a node's connections and room members keep counting after its last"
        " heartbeat (sent every node_ttl/3): the users of a crashed node leave presence and"
        " free their connection slots within this bound; the other nodes send their"
        " presence leave events within node_ttl + node_ttl/3.",
        minimum=0.3,
    )
    timeout: float = setting(
        1.0,
        "Seconds one call to the cluster registry may take. On a failure or timeout the"
        " per-user cap lets the connection in (fails open, counted in"
        " pushsvc_cluster_errors_total) and presence lists this node's members only.",
        minimum=0.01,
    )


@dataclass(frozen=True)
class ChatConfig:
    """``[chat]``: rooms."""

    default_room: str = setting("lobby", "Room of a 'chat' frame without 'room'.")
    auto_join: bool = setting(
        True, "Join every connection to default_room on connect (when its token allows)."
    )
    presence_max_members: int = setting(
        100, "Rooms larger than this send no presence events (they cost N² frames).", minimum=0
    )
    max_rooms_per_connection: int = setting(100, "Rooms one connection may join.", minimum=1)


@dataclass(frozen=True)
class HistoryConfig:
    """``[history]``: room history, resume after a reconnect, gap repair (docs/delivery.md)."""

    enabled: bool = setting(
        True,
        "Record room publications (chat, API publish, plugin types that opt in) with a "
        "per-room offset and epoch, in the store's group commit; off: no offsets, and a "
        "join with 'since' answers recovered false (history_disabled).",
    )
    size: int = setting(1000, "Most publications kept per room.", minimum=1)
    ttl: float = setting(600.0, "Seconds a publication is kept.", minimum=1)
    max_recovery: int = setting(
        1000,
        "Most publications one resuming join replays (and one gap repair fetches); "
        "a client further behind gets recovered false (too_far_behind).",
        minimum=1,
    )
    rooms: list[str] = setting(
        [],
        "Per-room overrides, each 'PATTERN SIZE TTL' (a glob as in a token's rooms; the "
        "first match wins; SIZE 0: no history for those rooms), e.g. 'ticker-* 0 0'.",
    )

    def __post_init__(self) -> None:
        self.overrides  # noqa: B018 - parse now: a bad rule fails at load, naming the key

    @functools.cached_property
    def overrides(self) -> tuple[tuple[str, int, float], ...]:
        """The ``rooms`` rules parsed: (pattern, size, ttl), in order."""
        rules = []
        for rule in self.rooms:
            parts = rule.split()
            try:
                pattern, size, ttl = parts[0], int(parts[1]), float(parts[2])
                if len(parts) != 3 or size < 0 or ttl < 0:
                    raise ValueError(rule)
            except (IndexError, ValueError):
                raise ConfigError(
                    "history.rooms",
                    f"{rule!r} is not 'PATTERN SIZE TTL' (SIZE an integer >= 0, TTL seconds >= 0)",
                ) from None
            rules.append((pattern, size, ttl))
        return tuple(rules)

    def retention(self, room: str) -> tuple[int, float] | None:
        """(size, ttl) of ``room``'s history, or None when the room keeps none."""
        if not self.enabled:
            return None
        size, ttl = self.size, self.ttl
        for pattern, rule_size, rule_ttl in self.overrides:
            if fnmatch.fnmatchcase(room, pattern):
                size, ttl = rule_size, rule_ttl
                break
        return (size, ttl) if size > 0 and ttl > 0 else None


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP server API for app backends."""

    max_body_bytes: int = setting(1024 * 1024, "Largest request body; 413 above.", minimum=64)
    max_buffered_bytes: int = setting(
        64 * 1024 * 1024,
        "Request body bytes all API requests in flight may buffer together; a request "
        "whose Content-Length (or, chunked, max_body_bytes) does not fit gets 503.",
        minimum=64,
    )
    rate: float = setting(
        200.0, "Requests per second per API client (token sub).", minimum=0, reloadable=True
    )
    burst: float = setting(400.0, "Bucket size per API client.", minimum=1, reloadable=True)
    max_recipients: int = setting(10000, "Recipients in one notify call; 400 above.", minimum=1)
    idempotency_window: float = setting(
        86400.0,
        "Seconds an Idempotency-Key is remembered by notify; 0 ignores the header.",
        minimum=0,
    )


#: Push services of the major browsers (``push.allowed_hosts`` default): Chrome and
#: Edge-on-Chromium (FCM), Firefox (Mozilla autopush), Edge legacy (WNS), Safari (Apple).
DEFAULT_PUSH_HOSTS = [
    "fcm.googleapis.com",
    "*.push.services.mozilla.com",
    "*.notify.windows.com",
    "*.push.apple.com",
]


@dataclass(frozen=True)
class PushConfig:
    """``[push]``: offline notifications through Web Push (VAPID, RFC 8030/8291/8292)."""

    enabled: bool = setting(
        False,
        "Send at-least-once messages that opt in (notification) through Web Push to users "
        "who are offline. Needs a VAPID key (push.vapid_private_key_file) and push.subject.",
    )
    subject: str = setting(
        "",
        "VAPID 'sub' claim: a mailto: or https: contact for the push services (required "
        "when enabled).",
    )
    vapid_private_key_file: str = setting(
        "",
        "PEM file of the VAPID P-256 private key (systemd LoadCredential); empty: "
        "vapid_private_key.pem under server.data_dir, generated on first start.",
    )
    max_subscriptions_per_user: int = setting(
        10,
        "Push subscriptions (browsers) one user may register; push_subscribe refuses more.",
        minimum=1,
    )
    allowed_hosts: list[str] = setting(
        DEFAULT_PUSH_HOSTS,
        "Push service hosts (globs) a subscription endpoint may name; empty: any public host.",
    )
    allow_private_endpoints: bool = setting(
        False,
        "Accept endpoints on loopback, private or link-local addresses and over http: "
        "(tests and labs only: endpoints are fetched by the server).",
    )
    after_seconds: float = setting(
        30.0,
        "Push a message to a connected user who has not acked it after this many seconds; "
        "0: connected users are never pushed.",
        minimum=0,
    )
    ttl: float = setting(
        86400.0,
        "Web Push TTL header, seconds the push service keeps an undelivered push (capped "
        "by the message's own TTL).",
        minimum=1,
    )
    urgency: str = setting(
        "normal",
        "Default Urgency header (RFC 8030 5.3).",
        choices=("very-low", "low", "normal", "high"),
    )
    concurrency: int = setting(8, "Push requests in flight at once.", minimum=1)
    queue_size: int = setting(
        10000, "Pushes waiting for a free request slot; more are dropped (counted).", minimum=1
    )
    timeout: float = setting(10.0, "Seconds one push request may take.", minimum=0.1)
    max_attempts: int = setting(
        5, "Sends of one push (429, 5xx, network errors are retried).", minimum=1
    )
    backoff: float = setting(
        1.0, "Seconds before the first retry, doubled each time (Retry-After wins).", minimum=0
    )
    backoff_max: float = setting(300.0, "Longest wait between retries, seconds.", minimum=0)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: logging."""

    level: str = setting(
        "info", "Log level.", choices=("debug", "info", "warning", "error"), reloadable=True
    )
    format: str = setting("text", "'text' or 'json' (one object a line).", choices=("text", "json"))
    access_log: bool = setting(True, "Log every HTTP request (tokens redacted).")


@dataclass(frozen=True)
class PluginsConfig:
    """``[plugins]``: plugin loading."""

    disabled: list[str] = setting([], "Plugin names (entry-point names) not to load.")
    slow_hook_seconds: float = setting(
        0.1,
        "Log a warning naming the plugin when one of its hooks or message handlers holds "
        "the event loop (runs without awaiting) longer than this; 0 turns the check off.",
        minimum=0,
    )


@dataclass(frozen=True)
class DemoConfig:
    """``[demo]``: the demo chat page."""

    enabled: bool = setting(
        False,
        "Serve the demo chat page at / and /demo (pushsvc serve --dev turns it on). "
        "Off: both answer 404; /client/pushsvc.js is served either way.",
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration; sections are attributes."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    push: PushConfig = field(default_factory=PushConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    #: ``[plugins.<name>]`` tables as read (file, environment), not yet checked.
    plugin_tables: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, repr=False, metadata={"section": False}
    )
    #: Checked plugin values, by plugin name (see :meth:`with_plugin_schemas`).
    plugin_values: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, metadata={"section": False}
    )
    #: ``plugins.<name>.<key>`` of the plugin settings declared ``reloadable``.
    plugin_reloadable: frozenset[str] = field(
        default_factory=frozenset, repr=False, metadata={"section": False}
    )

    def plugin(self, name: str) -> Mapping[str, Any]:
        """Plugin ``name``'s checked settings: every key of its schema, defaults filled in.

        Raises:
            KeyError: the plugin declares no ``pushsvc_config_schema`` (or is not loaded).
        """
        try:
            return self.plugin_values[name]
        except KeyError:
            raise KeyError(
                f"plugin {name!r} declares no settings (pushsvc_config_schema)"
            ) from None

    def with_plugin_schemas(self, schemas: Mapping[str, Mapping[str, Setting]]) -> Config:
        """This config with each plugin's ``[plugins.<name>]`` table checked against its schema.

        Raises:
            ConfigError: naming ``plugins.<name>.<key>`` for a bad or unknown key,
                or ``plugins.<name>`` for a table no loaded plugin declares
                (a table of a plugin in ``plugins.disabled`` is ignored).
        """
        for name in self.plugin_tables:
            if name not in schemas and name not in self.plugins.disabled:
                raise ConfigError(
                    f"plugins.{name}", "no loaded plugin of that name declares settings"
                )
        values: dict[str, Mapping[str, Any]] = {}
        reloadable = frozenset(
            f"plugins.{name}.{key}"
            for name, schema in schemas.items()
            for key, spec in schema.items()
            if spec.reloadable
        )
        for name, schema in schemas.items():
            table = self.plugin_tables.get(name, {})
            for key in table:
                if key not in schema:
                    known = ", ".join(schema) or "none"
                    raise ConfigError(f"plugins.{name}.{key}", f"unknown key (known: {known})")
            checked: dict[str, Any] = {}
            for key, spec in schema.items():
                if key not in table:
                    checked[key] = spec.default_value()
                    continue
                value = table[key]
                if isinstance(value, _EnvValue):
                    value = _from_env(spec.kind, str(value))
                checked[key] = _convert(f"plugins.{name}.{key}", value, spec.kind, spec)
            values[name] = types.MappingProxyType(checked)
        return dataclasses.replace(self, plugin_values=values, plugin_reloadable=reloadable)

    def secret(self) -> str:
        """The HS256 secret, read from ``auth.jwt_secret_file`` when set."""
        if self.auth.jwt_secret_file:
            try:
                return Path(self.auth.jwt_secret_file).read_text().strip()
            except OSError as exc:
                raise ConfigError("auth.jwt_secret_file", f"cannot read: {exc}") from exc
        return self.auth.jwt_secret

    def vapid_key_path(self) -> Path:
        """``push.vapid_private_key_file``, or ``vapid_private_key.pem`` in ``server.data_dir``."""
        if self.push.vapid_private_key_file:
            return Path(self.push.vapid_private_key_file)
        return Path(self.server.data_dir) / "vapid_private_key.pem"

    def store_url(self) -> str:
        """``store.url``, or the SQLite file under ``server.data_dir``."""
        return self.store.url or f"sqlite:///{Path(self.server.data_dir) / 'pushsvc.sqlite3'}"

    def cluster_url(self) -> str:
        """``cluster.url``, or ``broker.url`` when that is a Redis URL, or ``memory://``."""
        if self.cluster.url:
            return self.cluster.url
        if self.broker.url.startswith(REDIS_SCHEMES):
            return self.broker.url
        return "memory://"


def sections() -> dict[str, type[Any]]:
    """Section name -> its dataclass."""
    hints = typing.get_type_hints(Config)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(Config) if f.metadata.get("section", True)
    }


def keys(section_cls: type[Any]) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    """Key name -> (type, field) of one section."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_cls)}


def _convert(key: str, value: Any, kind: Any, spec: dataclasses.Field[Any] | Setting) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, not {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, not {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, not {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, not {value!r}")
    elif typing.get_origin(kind) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, not {value!r}")
        value = list(value)
    minimum = spec.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, not {value!r}")
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; not {value!r}")
    schemes = spec.metadata.get("schemes")
    if schemes and value and not value.startswith(schemes):
        raise ConfigError(key, f"must start with {' or '.join(schemes)}; not {value!r}")
    return value


def _from_env(kind: Any, raw: str) -> Any:
    if kind is str:
        return raw
    if typing.get_origin(kind) is list:
        if raw.strip().startswith("["):
            return tomllib.loads(f"v = {raw}")["v"]
        return [part for part in raw.replace(",", " ").split() if part]
    try:
        return tomllib.loads(f"v = {raw.strip().lower() if kind is bool else raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build(layers: list[Mapping[str, Mapping[str, Any]]]) -> Config:
    """Build a :class:`Config` from layers of ``{section: {key: value}}``, lowest first.

    Raises:
        ConfigError: on an unknown section or key, or a bad value.
    """
    merged: dict[str, dict[str, Any]] = {}
    tables: dict[str, dict[str, Any]] = {}
    known = sections()
    for layer in layers:
        for section, values in layer.items():
            if section not in known:
                raise ConfigError(_quoted(section), f"unknown section (known: {', '.join(known)})")
            if not isinstance(values, Mapping):
                raise ConfigError(section, "must be a table")
            section_keys = keys(known[section])
            for key, value in values.items():
                if section == "plugins" and key not in section_keys and isinstance(value, Mapping):
                    tables.setdefault(key, {}).update(value)  # [plugins.<name>], checked later
                    continue
                if key not in section_keys:
                    raise ConfigError(f"{section}.{_quoted(key)}", "unknown key")
                kind, spec = section_keys[key]
                merged.setdefault(section, {})[key] = _convert(
                    f"{section}.{key}", value, kind, spec
                )
    return Config(
        **{name: known[name](**merged.get(name, {})) for name in known}, plugin_tables=tables
    )


def _quoted(name: str) -> str:
    """A TOML key as it is written: bare, or quoted (``""``, ``"a b"``)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Read ``PUSHSVC_<SECTION>__<KEY>`` variables (and ``PUSHSVC_JWT_SECRET``)."""
    layer: dict[str, dict[str, Any]] = {}
    known = sections()
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in known:
            raise ConfigError(name, f"unknown section {section!r}")
        section_keys = keys(known[section])
        if section == "plugins" and "__" in key:
            plugin, _, plugin_key = key.partition("__")
            plugins = layer.setdefault("plugins", {})
            plugins.setdefault(plugin, {})[plugin_key] = _EnvValue(raw)
            continue
        if key not in section_keys:
            raise ConfigError(name, f"unknown key {section}.{key}")
        layer.setdefault(section, {})[key] = _from_env(section_keys[key][0], raw)
    if environ.get("PUSHSVC_JWT_SECRET"):
        layer.setdefault("auth", {})["jwt_secret"] = environ["PUSHSVC_JWT_SECRET"]
    return layer


def file_layer(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load the effective configuration (file, environment, overrides)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("PUSHSVC_CONFIG") or None
    layers: list[Mapping[str, Mapping[str, Any]]] = []
    if path:
        layers.append(file_layer(path))
    layers.append(env_layer(environ))
    if overrides:
        layers.append(overrides)
    config = build(layers)
    config.secret()  # an unreadable secret file fails now, naming the key
    return config


def to_toml(config: Config) -> str:
    """Render the effective config as TOML, with secrets hidden."""
    lines: list[str] = []
    for name in sections():
        section = getattr(config, name)
        lines.append(f"[{name}]")
        for key, (_kind, spec) in keys(type(section)).items():
            value = getattr(section, key)
            if spec.metadata.get("secret") and value:
                value = "<set>"
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    for plugin, values in config.plugin_values.items():
        if values:
            lines.append(f"[plugins.{plugin}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
    return "\n".join(lines)


def documented_defaults() -> str:
    """The reference config file: every key, its documentation and default, commented out.

    ``config/pushsvc.toml`` is this text (``pushsvc check-config --reference``
    prints it); a test keeps the two identical.
    """
    lines = [
        "# pushsvc configuration reference (TOML).",
        "#",
        "# Every key is listed with its documentation and its default value, commented",
        "# out: uncomment to change. Precedence, highest first: command-line flags,",
        "# environment variables PUSHSVC_<SECTION>__<KEY> (e.g. PUSHSVC_RATELIMIT__RATE=5;",
        "# lists as TOML arrays or comma-separated), this file, the defaults.",
        "# PUSHSVC_JWT_SECRET sets auth.jwt_secret. Keys marked (reloadable) take",
        "# effect on SIGHUP (systemctl reload) without dropping connections.",
        "#",
        "# Generated from pushsvc/config.py by `pushsvc check-config --reference`.",
    ]
    for name, section_cls in sections().items():
        lines += ["", f"[{name}]"]
        for key, (_kind, spec) in keys(section_cls).items():
            default = (
                spec.default
                if spec.default_factory is dataclasses.MISSING
                else (spec.default_factory())
            )
            doc = spec.metadata["doc"]
            if spec.metadata.get("reloadable"):
                doc += " (reloadable)"
            lines += [f"# {line}" for line in textwrap.wrap(doc, 78)]
            lines.append(f"# {key} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def changed_keys(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Keys whose values differ, split into (reloadable, needing a restart)."""
    reloadable: list[str] = []
    restart: list[str] = []
    for name in sections():
        old_section, new_section = getattr(old, name), getattr(new, name)
        for key, (_kind, spec) in keys(type(old_section)).items():
            if getattr(old_section, key) != getattr(new_section, key):
                target = reloadable if spec.metadata.get("reloadable") else restart
                target.append(f"{name}.{key}")
    for plugin in sorted({*old.plugin_values, *new.plugin_values}):
        old_values = old.plugin_values.get(plugin, {})
        new_values = new.plugin_values.get(plugin, {})
        for key in sorted({*old_values, *new_values}):
            if old_values.get(key) != new_values.get(key):
                name = f"plugins.{plugin}.{key}"
                (reloadable if name in new.plugin_reloadable else restart).append(name)
    return reloadable, restart
