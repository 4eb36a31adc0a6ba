"""The Redis registry: connection counts and room members shared by every node.

Keys (``{...}`` is the Redis Cluster hash tag: every key of one user, or of
one room, lives in one slot, so each Lua script touches a single slot):

- ``pushsvc:node:{<node>}``: this node's heartbeat, ``PX node_ttl``;
- ``pushsvc:conns:{u:<user>}``: set of the node ids with connections of the user;
  ``pushsvc:conns:{u:<user>}:<node>``: hash, connection id -> ``1``;
- ``pushsvc:members:{r:<room>}``: set of the node ids with members in the room;
  ``pushsvc:members:{r:<room>}:<node>``: hash, session id -> user;
- ``pushsvc:nodes``: set of the ids of the nodes started and not closed;
- ``pushsvc:node:{<node>}:members``: hash, ``<session>\\0<room>`` -> user: every
  member of the node (its heartbeat's slot), ``PX 2 * node_ttl``, so it outlives
  the heartbeat key by ``node_ttl``: after a node died the others read from it
  who left which room (:meth:`RedisRegistry.reap`).

A node writes only its own ``...:<node>`` hashes (and deletes a dead node's,
below). Each has a TTL of
``node_ttl``, renewed by the node's heartbeat every ``node_ttl / 3``: when a
node dies, its hashes expire at most ``node_ttl`` after its last heartbeat,
and the scripts that read the index sets drop the node ids whose hash is
gone. The cap check counts and adds in one script, so two nodes cannot both
admit the last connection a user may have.

Every call is bounded by ``cluster.timeout``. When Redis fails, the cap
check allows the connection (fails open) and presence answers with this
node's own members; the writes that failed are redone from the local copy
(:class:`~pushsvc.cluster.memory.LocalEntries`) by the next successful
heartbeat, which also rewrites whatever Redis lost (expired while
unreachable, or a restart without persistence).

Each heartbeat also looks for dead nodes: a node of ``pushsvc:nodes`` whose
heartbeat key is gone. For each one found, once, it reads the dead node's
member list and reports, for each room with members on this node, the dead
node's users now in that room on no live node (the departed callback); then
it deletes the dead node's hashes of those rooms (they would expire anyway).
A dead node's id leaves ``pushsvc:nodes`` once its member list expired too.
These reads, ``online`` and the member list's writes are plain commands in
pipelines (no Lua: a Redis Cluster pipeline takes no script).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Collection, Iterable
from typing import Any, Literal, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pushsvc import redisurl
from pushsvc.cluster.contracts import DepartedCallback, RegistryOptions
from pushsvc.cluster.memory import LocalEntries, new_node_id

log = logging.getLogger("pushsvc.cluster")

PREFIX = "pushsvc:"
#: Field/value pairs per rewrite script call (Lua's unpack has a stack limit).
_CHUNK = 1000
_T = TypeVar("_T")
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


# KEYS[1] this node's member list; ARGV: field, user, ttl ms (one command, not a pipeline).
_ROSTER_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""

#: Every node started and not closed (the dead ones are found among them).
NODES_KEY = f"{PREFIX}nodes"
#: Separates the session and the room in a field of a node's member list.
_SEP = "\0"


def index_key(kind: Kind, name: str) -> str:
    """The index set of a user's connections (``conns``) or a room's members (``members``)."""
    tag = "u" if kind == "conns" else "r"
    return f"{PREFIX}{kind}:{{{tag}:{name}}}"


def node_key(node: str) -> str:
    """A node's heartbeat key."""
    return f"{PREFIX}node:{{{node}}}"


def roster_key(node: str) -> str:
    """A node's list of all its members (``<session>\\0<room>`` -> user), beside its heartbeat."""
    return f"{node_key(node)}:members"


class _Failed(Exception):
    """A Redis call failed or timed out (already logged and counted)."""


class RedisRegistry:
    """:class:`~pushsvc.cluster.contracts.Registry` on Redis (``redis://``, ``rediss://``)."""

    def __init__(self, url: str, options: RegistryOptions | None = None) -> None:
        self.node_id = new_node_id()
        self.url = url
        self.options = options or RegistryOptions()
        self.local = LocalEntries()  # what this node wrote (answers when Redis does not)
        self._ttl_ms = max(1, int(self.options.node_ttl * 1000))
        self._client: Any = None  # redis.asyncio.Redis once started
        self._scripts: dict[str, Any] = {}
        self._ok = False
        self._dirty: set[tuple[Kind, str]] = set()  # hashes to rewrite from ``local``
        self._heartbeat: asyncio.Task[None] | None = None
        self._departed: DepartedCallback | None = None  # told of dead nodes' members
        self._roster_dirty = False  # this node's member list must be rewritten from ``local``
        self._roster_ops: list[tuple[str, str | None]] = []  # its changes not sent yet, in order
        self._roster_task: asyncio.Task[None] | None = None  # sends them
        self._reaped: set[str] = set()  # dead nodes reported already

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, write the heartbeat key and start the heartbeat (raises if unreachable)."""
        timeout = self.options.timeout
        pool = redisurl.connection_pool(
            self.url,
            key="cluster.url",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),  # at once, once: a pooled connection Redis closed
        )
        self._client = redis.asyncio.Redis(connection_pool=pool)
        for name, source in (
            ("reserve", _RESERVE),
            ("put", _PUT),
            ("refresh", _REFRESH),
            ("users", _USERS),
            ("roster_put", _ROSTER_PUT),
        ):
            self._scripts[name] = self._client.register_script(source)
        try:
            await asyncio.wait_for(
                self._client.set(node_key(self.node_id), "1", px=self._ttl_ms), timeout
            )
        except (RedisError, OSError, TimeoutError):
            await self._client.aclose()
            raise
        self._ok = True
        with contextlib.suppress(_Failed):  # else the next heartbeat adds it
            await self._call("heartbeat", self._client.sadd(NODES_KEY, self.node_id))
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        """Stop the heartbeat and delete this node's entries (they would expire anyway)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._client is None:
            return
        owned = self._owned()
        with contextlib.suppress(_Failed):
            await self._call("close", self._delete_own(owned))
        if self._roster_task is not None:
            self._roster_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._roster_task
        with contextlib.suppress(_Failed):
            await self._call("close", self._forget_node())
        self._ok = False
        await self._client.aclose()
        self._client = None

    async def _delete_own(self, owned: list[tuple[Kind, str]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for kind, name in owned:
            index = index_key(kind, name)
            pipe.delete(f"{index}:{self.node_id}")
            pipe.srem(index, self.node_id)
        pipe.delete(node_key(self.node_id))
        await pipe.execute()

    async def _forget_node(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(roster_key(self.node_id))
        pipe.srem(NODES_KEY, self.node_id)
        await pipe.execute()

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
        self._roster_write(room, session, user)  # queued in the order of the local changes
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
        self._roster_write(room, session, None)
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

    async def online(self, users: Collection[str]) -> set[str]:
        """Those of ``users`` with a connection on a live node; this node's own when Redis fails.

        Two pipelines per 1000 users, of plain commands (no script: Redis
        Cluster pipelines take none): the index sets, then whether each
        node's hash exists (an expired one is a dead node).
        """
        names = list(dict.fromkeys(users))
        found: set[str] = set()
        try:
            for start in range(0, len(names), _CHUNK):
                chunk = names[start : start + _CHUNK]
                hashes = await self._node_hashes("online", "conns", chunk)
                pipe = self._client.pipeline(transaction=False)
                for _, key in hashes:
                    pipe.exists(key)
                flags = await self._call("online", pipe.execute()) if hashes else []
                found.update(user for (user, _), up in zip(hashes, flags, strict=True) if up)
        except _Failed:
            return {user for user in names if user in self.local.users}
        return found

    async def _node_hashes(
        self, operation: str, kind: Kind, names: list[str], skip: Collection[str] = ()
    ) -> list[tuple[str, str]]:
        """(name, hash key) for each node in the index sets of ``names``, but ``skip``."""
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.smembers(index_key(kind, name))
        indexes: list[set[bytes]] = await self._call(operation, pipe.execute())
        return [
            (name, f"{index_key(kind, name)}:{node.decode()}")
            for name, nodes in zip(names, indexes, strict=True)
            for node in sorted(nodes)
            if node.decode() not in skip
        ]

    def set_departed_callback(self, callback: DepartedCallback | None) -> None:
        """Where :meth:`reap` reports the members of dead nodes."""
        self._departed = callback

    # -- this node's member list, and the dead nodes' ------------------------------

    def _roster_write(self, room: str, session: str, user: str | None) -> None:
        """Queue a change of this node's member list (``user`` None: a removal).

        Sent in order by one task: what was queued during a loop pass goes in
        one pipeline (a reconnect storm costs one round trip per pass, not per
        join); a failure leaves the list to the heartbeat's rewrite.
        """
        self._roster_ops.append((f"{session}{_SEP}{room}", user))
        if self._roster_task is None:
            self._roster_task = asyncio.ensure_future(self._roster_send())

    async def _roster_send(self) -> None:
        key = roster_key(self.node_id)
        try:
            while self._roster_ops:
                ops, self._roster_ops = self._roster_ops, []
                if len(ops) == 1:
                    field, user = ops[0]
                    work = (
                        self._client.hdel(key, field)
                        if user is None
                        else self._scripts["roster_put"](
                            keys=[key], args=[field, user, 2 * self._ttl_ms]
                        )
                    )
                else:
                    pipe = self._client.pipeline(transaction=False)  # no script: no SCRIPT EXISTS
                    for field, user in ops:
                        if user is None:
                            pipe.hdel(key, field)
                        else:
                            pipe.hset(key, field, user)
                    pipe.pexpire(key, 2 * self._ttl_ms)
                    work = pipe.execute()
                try:
                    await self._call("roster", work)
                except _Failed:
                    self._roster_dirty = True
        finally:
            self._roster_task = None

    def _roster(self) -> dict[str, str]:
        """This node's member list as Redis should have it, from ``local``."""
        return {
            f"{session}{_SEP}{room}": user
            for room, members in self.local.rooms.items()
            for session, user in members.items()
        }

    async def _keep_roster(self) -> None:
        """Renew this node's member list and registration; rewrite the list when needed."""
        key = roster_key(self.node_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(NODES_KEY, self.node_id)
        pipe.pexpire(key, 2 * self._ttl_ms)
        _, renewed = await self._call("heartbeat", pipe.execute())
        if not self._roster_dirty and (renewed or not self.local.rooms):
            return
        self._roster_dirty = False
        roster = self._roster()
        # Not atomic, and need not be: only the other nodes read it, once this one is dead.
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(key)
        pairs = list(roster.items())
        for start in range(0, len(pairs), _CHUNK):
            pipe.hset(key, mapping=dict(pairs[start : start + _CHUNK]))
        if pairs:
            pipe.pexpire(key, 2 * self._ttl_ms)
        try:
            await self._call("heartbeat", pipe.execute())
        except _Failed:
            self._roster_dirty = True
            raise
        if self._roster() != roster:  # changed meanwhile: again next time
            self._roster_dirty = True

    async def reap(self) -> None:
        """Find the nodes that died since the last call and report their departed members.

        Run by every heartbeat after this node's own keys are renewed: a node
        dead at ``t`` is found by ``t + node_ttl + node_ttl / 3`` at the latest
        (its heartbeat key expires within ``node_ttl``; this node looks every
        ``node_ttl / 3``). Each dead node is reported once per node (then
        remembered); a call that fails reports nothing and is redone next time.
        """
        known = await self._call("departed", self._client.smembers(NODES_KEY))
        others = sorted(n.decode() for n in known if n.decode() != self.node_id)
        if not others:
            self._reaped.clear()
            return
        pipe = self._client.pipeline(transaction=False)
        for node in others:
            pipe.exists(node_key(node))
            pipe.exists(roster_key(node))
        flags = await self._call("departed", pipe.execute())
        dead = [node for i, node in enumerate(others) if not flags[2 * i]]
        expired = [n for i, n in enumerate(others) if not flags[2 * i] and not flags[2 * i + 1]]
        self._reaped.intersection_update(dead)  # alive again: may die again
        new = [node for node in dead if node not in self._reaped and node not in expired]
        if expired:
            await self._call("departed", self._client.srem(NODES_KEY, *expired))
        if not new:
            return
        for node in new:
            log.warning("cluster registry: node %s is dead (no heartbeat for node_ttl)", node)
        if not self.local.rooms:  # no member here to tell
            self._reaped.update(new)
            return
        pipe = self._client.pipeline(transaction=False)
        for node in new:
            pipe.hgetall(roster_key(node))
        rosters: list[dict[bytes, bytes]] = await self._call("departed", pipe.execute())
        departed: dict[str, set[str]] = {}  # room with members here -> users of the dead
        for roster in rosters:
            for field, user in roster.items():
                room = field.decode().partition(_SEP)[2]
                if room in self.local.rooms:
                    departed.setdefault(room, set()).add(user.decode())
        rooms = sorted(departed)
        reports: list[tuple[str, list[str]]] = []
        for start in range(0, len(rooms), _CHUNK):
            chunk = rooms[start : start + _CHUNK]
            hashes = await self._node_hashes("departed", "members", chunk, skip=dead)
            pipe = self._client.pipeline(transaction=False)
            for _, key in hashes:
                pipe.hvals(key)
            found: list[list[bytes]] = (
                await self._call("departed", pipe.execute()) if hashes else []
            )
            present: dict[str, set[str]] = {}  # room -> users on the live nodes
            for (room, _), users in zip(hashes, found, strict=True):
                present.setdefault(room, set()).update(user.decode() for user in users)
            for room in chunk:
                gone = departed[room] - present.get(room, set())
                if gone:
                    reports.append((room, sorted(gone)))
        self._reaped.update(new)
        for room, left in reports:
            try:
                if self._departed is not None:
                    self._departed(room, left)
            except Exception:
                log.exception("cluster registry: reporting the departed of %r failed", room)
        if rooms:  # they expire anyway; the member lists agree with the events sooner
            with contextlib.suppress(_Failed):
                await self._call("departed", self._delete_dead(new, rooms))

    async def _delete_dead(self, nodes: list[str], rooms: list[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for room in rooms:
            index = index_key("members", room)
            for node in nodes:
                pipe.delete(f"{index}:{node}")
            pipe.srem(index, *nodes)
        await pipe.execute()

    # -- plumbing -----------------------------------------------------------------

    async def _call(self, operation: str, work: Awaitable[_T]) -> _T:
        """Run one Redis call within ``timeout``; raises :class:`_Failed` (counted)."""
        try:
            result = await asyncio.wait_for(work, self.options.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._ok:
                log.warning("cluster registry: %s failed: %s", operation, exc or type(exc).__name__)
            self._ok = False
            if self.options.on_error is not None:
                self.options.on_error(operation)
            raise _Failed(operation) from exc
        self._ok = True
        return result

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
        """Renew this node's keys; rewrite the hashes that failed or that Redis lost."""
        await self._call(
            "heartbeat", self._client.set(node_key(self.node_id), "1", px=self._ttl_ms)
        )
        owned = [key for key in self._owned() if key not in self._dirty]
        for start in range(0, len(owned), _CHUNK):
            chunk = owned[start : start + _CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for kind, name in chunk:
                index = index_key(kind, name)
                await self._scripts["refresh"](
                    keys=[index, f"{index}:{self.node_id}"],
                    args=[self.node_id, self._ttl_ms],
                    client=pipe,
                )  # queued on the pipeline
            renewed = await self._call("heartbeat", pipe.execute())
            self._dirty.update(key for key, ok in zip(chunk, renewed, strict=True) if not ok)
        dirty = list(self._dirty)
        for start in range(0, len(dirty), _CHUNK):
            await self._rewrite(dirty[start : start + _CHUNK])
        await self._keep_roster()
        await self.reap()

    async def _rewrite(self, hashes: list[tuple[Kind, str]]) -> None:
        """Replace these hashes of this node with the local copy (one pipeline)."""
        snapshots = [self._pairs(kind, name) for kind, name in hashes]
        pipe = self._client.pipeline(transaction=False)
        for (kind, name), pairs in zip(hashes, snapshots, strict=True):
            index = index_key(kind, name)
            keys = [index, f"{index}:{self.node_id}"]
            for offset in _chunks(pairs):
                replace = "1" if offset == 0 else "0"
                chunk = pairs[offset : offset + 2 * _CHUNK]
                await self._scripts["put"](
                    keys=keys, args=[self.node_id, self._ttl_ms, replace, *chunk], client=pipe
                )  # queued on the pipeline
        await self._call("heartbeat", pipe.execute())
        for key, pairs in zip(hashes, snapshots, strict=True):
            if self._pairs(*key) == pairs:  # else changed meanwhile: again next time
                self._dirty.discard(key)


def _chunks(pairs: list[str]) -> Iterable[int]:
    """Start offsets of the chunks of ``pairs`` (one chunk, empty, when there are none)."""
    return range(0, max(len(pairs), 1), 2 * _CHUNK)
