"""The Redis registry: connection counts and room members shared by every node.

Keys (``{...}`` is the Redis Cluster hash tag: every key of one user, or of
one room, lives in one slot, so each Lua script touches a single slot):

- ``pushsvc:node:{<node>}``: this node's heartbeat, ``PX node_ttl``;
- ``pushsvc:conns:{u:<user>}``: set of the node ids with connections of the user;
  ``pushsvc:conns:{u:<user>}:<node>``: hash, connection id -> ``1``;
- ``pushsvc:members:{r:<room>}``: set of the node ids with members in the room;
  ``pushsvc:members:{r:<room>}:<node>``: hash, session id -> user.

A node writes only its own ``...:<node>`` hashes. Each has a TTL of
``node_ttl``, renewed by the node's heartbeat every ``node_ttl / 3``: when a
node dies, its hashes expire at most ``node_ttl`` after its last heartbeat,
and the scripts that read the index sets drop the node ids whose hash is
gone. The cap check counts and adds in one script, so two nodes cannot both
admit the last connection a user may have.

On a Redis Cluster (``redis+cluster://``) the scripts run as they are (each
on its one slot, routed by its first key); pipelines are split by master and
sent concurrently, never as ``MULTI``, so a master that is down fails only
the calls for its own slots, and a master that forgot the scripts (restarted)
gets them again on ``NOSCRIPT``.

Every call is bounded by ``cluster.timeout``. When Redis fails, the cap
check allows the connection (fails open) and presence answers with this
node's own members; the writes that failed are redone from the local copy
(:class:`~pushsvc.cluster.memory.LocalEntries`) by the next successful
heartbeat, which also rewrites whatever Redis lost (expired while
unreachable, or a restart without persistence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, Literal, TypeVar

import redis.asyncio
from redis.asyncio.cluster import PipelineCommand
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc import redisurl
from pushsvc.cluster.contracts import RegistryOptions
from pushsvc.cluster.memory import LocalEntries, new_node_id

log = logging.getLogger("pushsvc.cluster")

PREFIX = "pushsvc:"
#: Field/value pairs per rewrite script call (Lua's unpack has a stack limit).
_CHUNK = 1000
_T = TypeVar("_T")
#: One pipelined command: the key that routes it (its slot), and the command.
Call = tuple[str, tuple[Any, ...]]
Kind = Literal["conns", "members"]

# KEYS[1] index set, KEYS[2] this node's hash; ARGV: node, connection, limit, ttl ms.
_RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 1 end
local total = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local count = redis.call('HLEN', KEYS[1] .. ':' .. node)
  if count == 0 then redis.call('SREM', KEYS[1], node) else total = total + count end
end
if total >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], '1')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# KEYS[1] index set, KEYS[2] this node's hash; ARGV: node, ttl ms, replace ('1'/'0'),
# then field, value pairs.
_PUT = """
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
if #ARGV < 5 then
  if ARGV[3] == '1' then redis.call('SREM', KEYS[1], ARGV[1]) end
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS[1] index set, KEYS[2] this node's hash; ARGV: node, ttl ms. 0: the hash is gone.
_REFRESH = """
if redis.call('PEXPIRE', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS[1] index set; ARGV: limit (-1: none). Distinct values of the live nodes' hashes.
_USERS = """
local limit = tonumber(ARGV[1])
local seen, users = {}, {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local values = redis.call('HVALS', KEYS[1] .. ':' .. node)
  if #values == 0 then redis.call('SREM', KEYS[1], node) end
  for _, user in ipairs(values) do
    if not seen[user] then
      seen[user] = true
      users[#users + 1] = user
      if limit >= 0 and #users > limit then return users end
    end
  end
end
return users
"""


#: Every script by name. Each touches the keys of one hash tag only (its KEYS'),
#: so it runs whole on one Redis Cluster slot.
SCRIPTS = {"reserve": _RESERVE, "put": _PUT, "refresh": _REFRESH, "users": _USERS}


def index_key(kind: Kind, name: str) -> str:
    """The index set of a user's connections (``conns``) or a room's members (``members``)."""
    tag = "u" if kind == "conns" else "r"
    return f"{PREFIX}{kind}:{{{tag}:{name}}}"


def node_key(node: str) -> str:
    """A node's heartbeat key."""
    return f"{PREFIX}node:{{{node}}}"


class _Failed(Exception):
    """A Redis call failed or timed out (already logged and counted)."""


class RedisRegistry:
    """:class:`~pushsvc.cluster.contracts.Registry` on Redis (any :mod:`pushsvc.redisurl` form,
    Redis Cluster included)."""

    def __init__(self, url: str, options: RegistryOptions | None = None) -> None:
        self.node_id = new_node_id()
        self.url = url
        self.sharded = redisurl.is_cluster(url)  # Redis Cluster: one pipeline per master
        self.options = options or RegistryOptions()
        self.local = LocalEntries()  # what this node wrote (answers when Redis does not)
        self._ttl_ms = max(1, int(self.options.node_ttl * 1000))
        self._client: Any = None  # redis.asyncio.Redis once started
        self._scripts: dict[str, Any] = {}
        self._ok = False
        self._dirty: set[tuple[Kind, str]] = set()  # hashes to rewrite from ``local``
        self._heartbeat: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, write the heartbeat key and start the heartbeat (raises if unreachable)."""
        timeout = self.options.timeout
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1),  # at once, once: a pooled connection Redis closed
        }
        if self.sharded:
            self._client = redisurl.cluster_client(self.url, key="cluster.url", **options)
        else:
            pool = redisurl.connection_pool(self.url, key="cluster.url", **options)
            self._client = redis.asyncio.Redis(connection_pool=pool)
        for name, source in SCRIPTS.items():
            self._scripts[name] = self._client.register_script(source)
        try:
            await asyncio.wait_for(
                self._client.set(node_key(self.node_id), "1", px=self._ttl_ms), timeout
            )
            if self.sharded:  # pipelines do not load scripts on a cluster
                await asyncio.wait_for(self._load_scripts(), timeout)
        except (RedisError, OSError, TimeoutError):
            await self._client.aclose()
            raise
        self._ok = True
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD every script on every master (a restarted one forgot them)."""
        for source in SCRIPTS.values():
            await self._client.script_load(source)

    async def close(self) -> None:
        """Stop the heartbeat and delete this node's entries (they would expire anyway)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._client is None:
            return
        calls: list[Call] = []
        for kind, name in self._owned():
            index = index_key(kind, name)
            calls.append((index, ("DEL", f"{index}:{self.node_id}")))
            calls.append((index, ("SREM", index, self.node_id)))
        calls.append((node_key(self.node_id), ("DEL", node_key(self.node_id))))
        await self._pipelined("close", calls)
        self._ok = False
        await self._client.aclose()
        self._client = None

    def healthy(self) -> bool:
        """Whether the last Redis call succeeded."""
        return self._ok

    # -- the contract -------------------------------------------------------------

    async def reserve_user(self, user: str, connection: str, limit: int) -> bool:
        """Count ``connection`` atomically against ``limit`` on all live nodes; fails open."""
        index = index_key("conns", user)
        self.local.add_connection(user, connection)
        try:
            admitted = await self._call(
                "reserve",
                self._scripts["reserve"](
                    keys=[index, f"{index}:{self.node_id}"],
                    args=[self.node_id, connection, limit, self._ttl_ms],
                ),
            )
        except _Failed:
            self._dirty.add(("conns", user))
            return True
        if not admitted:
            self.local.remove_connection(user, connection)
            return False
        if connection not in self.local.users.get(user, ()):  # released meanwhile
            self._dirty.add(("conns", user))
        return True

    async def release_user(self, user: str, connection: str) -> None:
        """Stop counting ``connection``."""
        self.local.remove_connection(user, connection)
        await self._remove_field("release", "conns", user, connection)
        if connection in self.local.users.get(user, ()):  # counted again meanwhile
            self._dirty.add(("conns", user))

    async def joined(self, room: str, user: str, session: str) -> None:
        """Add ``session`` to this node's members of ``room``."""
        self.local.add_member(room, user, session)
        index = index_key("members", room)
        try:
            await self._call(
                "joined",
                self._scripts["put"](
                    keys=[index, f"{index}:{self.node_id}"],
                    args=[self.node_id, self._ttl_ms, "0", session, user],
                ),
            )
        except _Failed:
            self._dirty.add(("members", room))
            return
        if session not in self.local.rooms.get(room, {}):  # left meanwhile
            self._dirty.add(("members", room))

    async def left(self, room: str, user: str, session: str) -> None:
        """Remove ``session`` from this node's members of ``room``."""
        self.local.remove_member(room, session)
        await self._remove_field("left", "members", room, session)
        if session in self.local.rooms.get(room, {}):  # joined again meanwhile
            self._dirty.add(("members", room))

    async def room_users(self, room: str, limit: int | None = None) -> list[str]:
        """Distinct users in ``room`` on the live nodes; this node's own when Redis fails."""
        most = -1 if limit is None else limit
        try:
            found: list[bytes] = await self._call(
                "room_users", self._scripts["users"](keys=[index_key("members", room)], args=[most])
            )
        except _Failed:
            return self.local.room_users(room)
        return sorted(user.decode() for user in found)

    # -- plumbing -----------------------------------------------------------------

    async def _call(self, operation: str, work: Awaitable[_T]) -> _T:
        """Run one Redis call within ``timeout``; raises :class:`_Failed` (counted)."""
        try:
            result = await asyncio.wait_for(work, self.options.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc)
            raise _Failed(operation) from exc
        self._ok = True
        return result

    def _failed(self, operation: str, exc: BaseException) -> None:
        """Log (once until a call succeeds) and count a failed call."""
        if self._ok:
            log.warning("cluster registry: %s failed: %s", operation, exc or type(exc).__name__)
        self._ok = False
        if self.options.on_error is not None:
            self.options.on_error(operation)

    async def _remove_field(self, operation: str, kind: Kind, name: str, field: str) -> None:
        key = f"{index_key(kind, name)}:{self.node_id}"
        try:
            await self._call(operation, self._client.hdel(key, field))
        except _Failed:
            self._dirty.add((kind, name))

    def _owned(self) -> list[tuple[Kind, str]]:
        """Every hash this node has entries in."""
        owned: list[tuple[Kind, str]] = [("conns", user) for user in self.local.users]
        owned += [("members", room) for room in self.local.rooms]
        return owned

    def _pairs(self, kind: Kind, name: str) -> list[str]:
        """The field/value pairs of one of this node's hashes, from ``local``."""
        if kind == "conns":
            return [item for c in sorted(self.local.users.get(name, ())) for item in (c, "1")]
        members = self.local.rooms.get(name, {})
        return [item for session, user in members.items() for item in (session, user)]

    async def _beat(self) -> None:
        """Every ``node_ttl / 3``: renew the heartbeat key and this node's hashes."""
        while True:
            await asyncio.sleep(self.options.heartbeat)
            try:
                await self.heartbeat()
            except _Failed:
                pass
            except Exception:
                log.exception("cluster registry heartbeat failed")

    async def heartbeat(self) -> None:
        """Renew this node's keys; rewrite the hashes that failed or that Redis lost.

        On a cluster a master that fails fails only the renewals of its own
        keys (this node's heartbeat key included): the others go on.
        """
        own = node_key(self.node_id)
        calls: list[Call] = [(own, ("SET", own, "1", "PX", self._ttl_ms))]
        owned = [key for key in self._owned() if key not in self._dirty]
        if not owned:
            await self._pipelined("heartbeat", calls)
        for start in range(0, len(owned), _CHUNK):
            chunk = owned[start : start + _CHUNK]
            for kind, name in chunk:
                index = index_key(kind, name)
                keys = [index, f"{index}:{self.node_id}"]
                calls.append((index, self._evalsha("refresh", keys, [self.node_id, self._ttl_ms])))
            renewed = await self._pipelined("heartbeat", calls)
            renewed = renewed[len(calls) - len(chunk) :]
            self._dirty.update(key for key, ok in zip(chunk, renewed, strict=True) if ok != 1)
            calls = []
        dirty = list(self._dirty)
        for start in range(0, len(dirty), _CHUNK):
            await self._rewrite(dirty[start : start + _CHUNK])

    async def _rewrite(self, hashes: list[tuple[Kind, str]]) -> None:
        """Replace these hashes of this node with the local copy (one pipeline per Redis)."""
        snapshots = [self._pairs(kind, name) for kind, name in hashes]
        calls: list[Call] = []
        owners: list[int] = []  # call -> index in ``hashes``
        for number, ((kind, name), pairs) in enumerate(zip(hashes, snapshots, strict=True)):
            index = index_key(kind, name)
            keys = [index, f"{index}:{self.node_id}"]
            for offset in _chunks(pairs):
                replace = "1" if offset == 0 else "0"
                chunk = pairs[offset : offset + 2 * _CHUNK]
                args = [self.node_id, self._ttl_ms, replace, *chunk]
                calls.append((index, self._evalsha("put", keys, args)))
                owners.append(number)
        results = await self._pipelined("heartbeat", calls)
        failed = {owners[i] for i, result in enumerate(results) if isinstance(result, Exception)}
        for number, (key, pairs) in enumerate(zip(hashes, snapshots, strict=True)):
            if number not in failed and self._pairs(*key) == pairs:  # else again next time
                self._dirty.discard(key)

    # -- pipelines: one per Redis, or one per cluster master --------------------------

    def _evalsha(self, script: str, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self._scripts[script].sha, len(keys), *keys, *args)

    async def _pipelined(self, operation: str, calls: list[Call]) -> list[Any]:
        """Run ``calls`` as one pipeline (one Redis) or one per master (a cluster), at once.

        Returns each call's reply in order; a call whose reply is an error, or
        whose pipeline failed, gets an exception (counted once per pipeline).
        On a cluster each master's pipeline stands alone: a master that is down
        fails its own calls only, so the others' entries are still renewed. A
        master that forgot the scripts (restarted) gets them again, then the
        pipeline is sent once more.
        """
        results: list[Any] = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        for number, (key, _command) in enumerate(calls):
            groups.setdefault(self._master_of(key), []).append(number)

        async def run(master: str, numbers: list[int]) -> None:
            commands = [calls[number][1] for number in numbers]
            for attempt in range(2):
                try:
                    replies = await self._call(operation, self._execute(master, commands))
                except _Failed as exc:
                    replies = [exc] * len(numbers)
                    break
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                    with contextlib.suppress(_Failed):
                        await self._call(operation, self._load_scripts())
                    continue
                errors = [r for r in replies if isinstance(r, Exception)]
                if errors:
                    self._failed(operation, errors[0])
                    if any(isinstance(r, (MovedError, AskError)) for r in errors):
                        with contextlib.suppress(_Failed):  # the slot map changed: reread it
                            await self._call(operation, self._client.nodes_manager.initialize())
                break
            for number, reply in zip(numbers, replies, strict=True):
                results[number] = reply

        await asyncio.gather(*(run(master, numbers) for master, numbers in groups.items()))
        return results

    def _master_of(self, key: str) -> str:
        """The name of the master serving ``key`` ("" on one Redis, or when unknown)."""
        if not self.sharded:
            return ""
        try:
            return str(self._client.get_node_from_key(key).name)
        except RedisError:
            return ""

    async def _execute(self, master: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline of ``commands``; replies in order, errors as values."""
        if not self.sharded:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute(raise_on_error=False))
        node = self._client.get_node(node_name=master) if master else None
        if node is None:
            raise RedisConnectionError("no master known for these keys")
        queued = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
        await node.execute_pipeline(queued)
        return [command.result for command in queued]


def _chunks(pairs: list[str]) -> Iterable[int]:
    """Start offsets of the chunks of ``pairs`` (one chunk, empty, when there are none)."""
    return range(0, max(len(pairs), 1), 2 * _CHUNK)
