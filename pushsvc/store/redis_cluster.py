"""Redis Cluster: the Redis store's operations cut into steps of single-slot scripts.

:class:`pushsvc.store.redis.RedisStore` on a ``redis+cluster://`` URL sends
every operation that spans hash tags here (:class:`SlotSplit`); operations
that touch one tag run their one-Redis script as they are. A step is a set
of scripts, one slot each, sent together (so they join the loop pass's
batch: one pipeline per master, to every master at once); the steps of an
operation one after the other, in the order that keeps the per-user keys
the truth: the ``{g}`` indexes are written with or before them on additions
and after them on removals, so an index only over-approximates (the sweep
drops entries whose delivery is gone and repairs those a failed step left
behind). An accept is reported only once every script of it succeeded, its
idempotency key last. docs/redis.md, "Store on a cluster", lists every
operation's steps and what a half-failed one leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.crc import key_slot

from pushsvc.store.contracts import (
    ACKED_RETENTION,
    AckResult,
    DeadLetter,
    HistoryStats,
    IdempotencyKey,
    PendingMessage,
    PushSubscription,
    SubscribeResult,
)

#: Entries of each kind (TTL, old acks, old dead letters) one sweep script handles.
SWEEP_CHUNK = 1_000
#: Sweep steps per :meth:`RedisStore.expire` call; the rest waits for the next call.
SWEEP_STEPS = 25


def text(value: Any) -> str:
    """A reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stamp(value: float) -> str:
    """A time as stored (``repr`` of the float: it comes back exactly)."""
    return repr(float(value))


def user_key(prefix: str, user: str, what: str) -> str:
    """``P{u:<user>}:<what>``: the user's slot."""
    return f"{prefix}{{u:{user}}}:{what}"


def message_key(prefix: str, message_id: str) -> str:
    """``P{m:<id>}``: the message's hash."""
    return f"{prefix}{{m:{message_id}}}"


def global_key(prefix: str, what: str) -> str:
    """``P{g}:<what>``: the global indexes' slot."""
    return f"{prefix}{{g}}:{what}"


def room_key(prefix: str, room: str, what: str) -> str:
    """``P{r:<room>}:<what>``: the room's slot."""
    return f"{prefix}{{r:{room}}}:{what}"


# -- the scripts: one slot each ----------------------------------------------------
#
# Every script below touches the keys of one slot only (its routing key, KEYS[1], is
# one of them); they run after the store's common prelude (ukey, mkey, gkey, rkey,
# unref: pushsvc/store/redis.py), the history and push ones after those preludes too.

# ARGV: P, id, type, frame, expires_at, expires_at in ms, n -> 1 stored, 0 already there
_C_MESSAGE = """
local P, id = ARGV[1], ARGV[2]
local m = mkey(P, id)
if redis.call('EXISTS', m) == 1 then return 0 end
redis.call('HSET', m, 't', ARGV[3], 'f', ARGV[4], 'e', ARGV[5], 'n', ARGV[7])
if tonumber(ARGV[7]) == 0 then redis.call('PEXPIREAT', m, ARGV[6]) end
return 1
"""

# ARGV: P, id, user* (users of one slot): their pending deliveries of the message
_C_INBOX = """
local P, id = ARGV[1], ARGV[2]
for i = 3, #ARGV do redis.call('ZADD', ukey(P, ARGV[i], 'p'), 0, id) end
return 1
"""

# ARGV: P, (verb, what, score, member)*: the {g} indexes. Verbs: 'r' ZREM, 'a' ZADD,
# 'n' ZADD NX, 'l' ZADD LT, 'i' INCRBY score (never below 0). Callers put removals first
# (at maxmemory a script is refused only before its first write).
_C_INDEX = """
local P = ARGV[1]
for i = 2, #ARGV, 4 do
  local verb, k = ARGV[i], gkey(P, ARGV[i + 1])
  if verb == 'r' then redis.call('ZREM', k, ARGV[i + 3])
  elseif verb == 'a' then redis.call('ZADD', k, ARGV[i + 2], ARGV[i + 3])
  elseif verb == 'n' then redis.call('ZADD', k, 'NX', ARGV[i + 2], ARGV[i + 3])
  elseif verb == 'l' then redis.call('ZADD', k, 'LT', ARGV[i + 2], ARGV[i + 3])
  elseif redis.call('INCRBY', k, ARGV[i + 2]) < 0 then redis.call('SET', k, 0) end
end
return 1
"""

# ARGV: P, client, key, fingerprint, expires_at, expires_at in ms, id, recipients
_C_IDEMPOTENCY = """
local k = ARGV[1] .. '{i:' .. ARGV[2] .. '}:' .. ARGV[3]
redis.call('DEL', k)
redis.call('HSET', k, 'fp', ARGV[4], 'id', ARGV[7], 'n', ARGV[8], 'e', ARGV[5])
redis.call('PEXPIREAT', k, ARGV[6])
return 1
"""

# ARGV: P, user, after_id, limit -> (id, attempts)*
_C_PENDING = """
local P, u = ARGV[1], ARGV[2]
local low = '-'
if ARGV[3] ~= '' then low = '(' .. ARGV[3] end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYLEX', ukey(P, u, 'p'), low, '+', 'LIMIT', 0, ARGV[4])) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', ukey(P, u, 'a'), id) or '0'
end
return out
"""

# ARGV: P, user, id* -> {repeated, number acked, acked id*, other id*} (others: foreign
# or unknown, told apart by the message's slot)
_C_ACK = """
local P, u = ARGV[1], ARGV[2]
local repeated, acked, others = 0, {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'p'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'a'), id)
    redis.call('SADD', ukey(P, u, 'k'), id)
    acked[#acked + 1] = id
  elseif redis.call('SISMEMBER', ukey(P, u, 'k'), id) == 1
      or redis.call('ZSCORE', ukey(P, u, 'x'), id) then
    repeated = repeated + 1
  else
    others[#others + 1] = id
  end
end
local out = {repeated, #acked}
for _, id in ipairs(acked) do out[#out + 1] = id end
for _, id in ipairs(others) do out[#out + 1] = id end
return out
"""

# ARGV: P, user, reason, now, id* -> ids moved from pending to the dead letters
_C_DEAD = """
local P, u, reason, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'p'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'a'), id)
    redis.call('ZADD', ukey(P, u, 'x'), 0, id)
    redis.call('HSET', ukey(P, u, 'r'), id, reason .. '\\n' .. now)
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, user, limit -> (id, "<reason>\\n<dead_at>")*
_C_DEAD_LETTERS = """
local P, u = ARGV[1], ARGV[2]
local out = {}
for _, id in ipairs(redis.call('ZRANGE', ukey(P, u, 'x'), 0, tonumber(ARGV[3]) - 1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', ukey(P, u, 'r'), id) or '\\n0'
end
return out
"""

# ARGV: P, user, id* -> ids made pending again
_C_REQUEUE = """
local P, u = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'r'), id)
    redis.call('HDEL', ukey(P, u, 'a'), id)
    redis.call('ZADD', ukey(P, u, 'p'), 0, id)
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, id, expires_at: the message's expiry grows to expires_at (if stored)
_C_EXTEND = """
local m = mkey(ARGV[1], ARGV[2])
local current = redis.call('HGET', m, 'e')
if current and tonumber(current) < tonumber(ARGV[3]) then redis.call('HSET', m, 'e', ARGV[3]) end
return 1
"""

# ARGV: P, user, id* -> ids of dead letters deleted
_C_DELETE_DEAD = """
local P, u = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'r'), id)
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, id: one delivery less refers to the message
_C_UNREF = """
unref(ARGV[1], ARGV[2])
return 1
"""

# ARGV: P, now, acked before, dead before, chunk
# -> {#due, #acks, #dead, due member*, ack member*, dead member*} (nothing removed)
_C_SWEEP_DUE = """
local P, chunk = ARGV[1], ARGV[5]
local due = redis.call('ZRANGEBYSCORE', gkey(P, 'expiry'), '-inf', ARGV[2], 'LIMIT', 0, chunk)
local acks = redis.call('ZRANGEBYSCORE', gkey(P, 'acked'), '-inf', '(' .. ARGV[3],
  'LIMIT', 0, chunk)
local dead = redis.call('ZRANGEBYSCORE', gkey(P, 'dead'), '-inf', '(' .. ARGV[4],
  'LIMIT', 0, chunk)
local out = {#due, #acks, #dead}
for _, list in ipairs({due, acks, dead}) do
  for _, member in ipairs(list) do out[#out + 1] = member end
end
return out
"""

# ARGV: P, now, (kind, user, id)* (users of one slot) -> one result per entry.
# Kinds: 'e' expired (-> 'd' dead-lettered now; 'k' acked, 'x' dead already: the index
# lagged; '-' gone), 'o' an orphan (its message is gone: dropped; -> as 'e' but never
# 'd'), 'k' an ack past its retention, 'x' a dead letter past it (-> '1' dropped, '0').
_C_SWEEP_USERS = """
local P, now = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 3 do
  local kind, u, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local r = '-'
  if kind == 'e' or kind == 'o' then
    if redis.call('ZREM', ukey(P, u, 'p'), id) == 1 then
      redis.call('HDEL', ukey(P, u, 'a'), id)
      if kind == 'e' then
        redis.call('ZADD', ukey(P, u, 'x'), 0, id)
        redis.call('HSET', ukey(P, u, 'r'), id, 'ttl\\n' .. now)
        r = 'd'
      end
    elseif redis.call('SISMEMBER', ukey(P, u, 'k'), id) == 1 then r = 'k'
    elseif redis.call('ZSCORE', ukey(P, u, 'x'), id) then r = 'x' end
  elseif kind == 'k' then
    if redis.call('SREM', ukey(P, u, 'k'), id) == 1 then r = '1' else r = '0' end
  else
    r = '0'
    if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
      redis.call('HDEL', ukey(P, u, 'r'), id)
      r = '1'
    end
  end
  out[#out + 1] = r
end
return out
"""

# ARGV: P, now, room* (rooms of one slot) -> (entries dropped, new index score or '' when
# the room's history is gone)*
TRIM_ROOMS = """
local P, now = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local room = ARGV[i]
  local h, l = rkey(P, room, 'h'), rkey(P, room, 'l')
  local dropped = 0
  while true do
    local first = redis.call('ZRANGE', l, 0, 0)
    if not first[1] or tonumber(field(first[1], 3)) > now then break end
    redis.call('ZREM', l, first[1])
    dropped = dropped + 1
  end
  local forget = redis.call('HGET', h, 'x')
  local score = ''
  if redis.call('ZCARD', l) == 0 and (not forget or tonumber(forget) <= now) then
    redis.call('DEL', h, l)
  else
    local first = redis.call('ZRANGE', l, 0, 0)
    score = forget or ARGV[2]
    if first[1] then score = field(first[1], 3) end
  end
  out[#out + 1] = dropped
  out[#out + 1] = score
end
return out
"""

# ARGV: P, user, endpoint, created_at, limit -> 'mine' | 'new' | 'limit' (the user's cap,
# checked and taken atomically in the user's slot)
_C_PUSH_CLAIM = """
local P, u, ep = ARGV[1], ARGV[2], ARGV[3]
local w = ukey(P, u, 'w')
if redis.call('ZSCORE', w, ep) then
  redis.call('ZADD', w, ARGV[4], ep)
  return 'mine'
end
if redis.call('ZCARD', w) >= tonumber(ARGV[5]) then return 'limit' end
redis.call('ZADD', w, ARGV[4], ep)
return 'new'
"""

# ARGV: P, endpoint, user, p256dh, auth, created_at -> the previous owner or ''
PUSH_PUT = """
local h = wkey(ARGV[1], ARGV[2])
local owner = redis.call('HGET', h, 'u') or ''
redis.call('HSET', h, 'u', ARGV[3], 'k', ARGV[4], 'a', ARGV[5], 'c', ARGV[6])
return owner
"""

# ARGV: P, endpoint, user -> 1 when it was the user's (deleted), else 0
PUSH_DROP = """
local h = wkey(ARGV[1], ARGV[2])
if redis.call('HGET', h, 'u') ~= ARGV[3] then return 0 end
redis.call('DEL', h)
return 1
"""


#: name -> Lua body of every script that needs only the store's common prelude.
CLUSTER_SCRIPTS = {
    "c_message": _C_MESSAGE,
    "c_inbox": _C_INBOX,
    "c_index": _C_INDEX,
    "c_idempotency": _C_IDEMPOTENCY,
    "c_pending": _C_PENDING,
    "c_ack": _C_ACK,
    "c_dead": _C_DEAD,
    "c_dead_letters": _C_DEAD_LETTERS,
    "c_requeue": _C_REQUEUE,
    "c_extend": _C_EXTEND,
    "c_delete_dead": _C_DELETE_DEAD,
    "c_unref": _C_UNREF,
    "c_sweep_due": _C_SWEEP_DUE,
    "c_sweep_users": _C_SWEEP_USERS,
    "c_push_claim": _C_PUSH_CLAIM,
}

#: Queue one command: ``(*command, script=None, key=...)`` -> its reply's future.
Call = Callable[..., asyncio.Future[Any]]


class SlotSplit:
    """The operations of :class:`~pushsvc.store.redis.RedisStore` that span slots, as
    steps of single-slot scripts; every command goes through the store's batches."""

    def __init__(
        self,
        prefix: str,
        call: Call,
        script: Call,
        gather: Callable[[Sequence[asyncio.Future[Any]]], Awaitable[list[Any]]],
        later: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self.prefix = prefix  # before every key
        self._call = call  # RedisStore._call: one command, routed by its key's slot
        self._script = script  # RedisStore._script: EVALSHA of a script, by slot
        self._all = gather  # RedisStore._all: await every future, raise the first failure
        self._later = later  # RedisStore._later: a write nobody waits for

    def _u(self, user: str, what: str) -> str:
        return user_key(self.prefix, user, what)

    def _m(self, message_id: str) -> str:
        return message_key(self.prefix, message_id)

    def _g(self, what: str) -> str:
        return global_key(self.prefix, what)

    def _groups(self, users: Sequence[str]) -> list[tuple[str, list[str]]]:
        """``users`` by slot: (a key of the slot, the users hashed to it)*, in order."""
        groups: dict[int, tuple[str, list[str]]] = {}
        for user in users:
            key = self._u(user, "p")
            groups.setdefault(key_slot(key.encode()), (key, []))[1].append(user)
        return list(groups.values())

    def _index(self, entries: Sequence[tuple[str, str, Any, str]]) -> asyncio.Future[Any]:
        """Update the {g} indexes: (verb, key name, score, member)*, removals first."""
        ordered = sorted(entries, key=lambda entry: entry[0] != "r")
        args = [value for entry in ordered for value in entry]
        return self._script("c_index", *args, key=self._g("pending"))

    async def _messages(self, message_ids: Sequence[str], *fields: str) -> list[list[Any]]:
        """``HMGET`` of each message's hash (each its own slot): one step."""
        calls = [self._call("HMGET", self._m(i), *fields, key=self._m(i)) for i in message_ids]
        return await self._all(calls)

    async def accept(
        self,
        message_id: str,
        message_type: str,
        frame: bytes,
        users: list[str],
        expires_at: float,
        idempotency: IdempotencyKey | None,
        recipients: int,
    ) -> None:
        """The message, the index entries and each slot's inbox entries at once; then
        the idempotency key, only once all of them are written."""
        e = stamp(expires_at)
        message = self._m(message_id)
        calls = [
            self._script(
                "c_message",
                message_id,
                message_type,
                frame,
                e,
                int(expires_at * 1000),
                len(users),
                key=message,
            )
        ]
        if users:
            members = [f"{message_id}\n{user}" for user in users]
            calls.append(
                self._index(
                    [("a", "pending", 0, m) for m in members]
                    + [("a", "expiry", e, m) for m in members]
                )
            )
            for key, group in self._groups(users):
                calls.append(self._script("c_inbox", message_id, *group, key=key))
        await self._all(calls)
        if idempotency is not None:
            name = f"{self.prefix}{{i:{idempotency.client}}}:{idempotency.key}"
            await self._script(
                "c_idempotency",
                idempotency.client,
                idempotency.key,
                idempotency.fingerprint,
                stamp(idempotency.expires_at),
                int(idempotency.expires_at * 1000),
                message_id,
                recipients,
                key=name,
            )

    async def pending(self, user: str, after_id: str, limit: int) -> list[PendingMessage]:
        """The user's ids and attempts (its slot), then the messages (theirs)."""
        flat = await self._script("c_pending", user, after_id, limit, key=self._u(user, "p"))
        found = [text(flat[i]) for i in range(0, len(flat), 2)]
        messages = await self._messages(found, "t", "f", "e")
        return [
            PendingMessage(message_id, text(m[0]), bytes(m[1]), int(flat[2 * i + 1]), float(m[2]))
            for i, (message_id, m) in enumerate(zip(found, messages, strict=True))
            if m[0] is not None  # an orphan of a half-failed accept: not a message
        ]

    async def ack(self, user: str, wanted: list[str]) -> AckResult:
        """The user's keys; then the index, with the message types (and foreign or unknown)."""
        flat = await self._script("c_ack", user, *wanted, key=self._u(user, "p"))
        repeated, count = int(flat[0]), int(flat[1])
        acked = [text(i) for i in flat[2 : 2 + count]]
        others = [text(i) for i in flat[2 + count :]]
        now = stamp(time.time())
        members = [f"{i}\n{user}" for i in acked]
        entries = [("r", "pending", 0, m) for m in members] + [
            ("r", "expiry", 0, m) for m in members
        ]
        calls = [self._call("HGET", self._m(i), "t", key=self._m(i)) for i in acked + others]
        if acked:
            calls.append(self._index(entries + [("a", "acked", now, m) for m in members]))
        kinds = await self._all(calls)
        foreign = sum(1 for kind in kinds[count : count + len(others)] if kind is not None)
        return AckResult(
            acked=[(i, text(kind or b"")) for i, kind in zip(acked, kinds, strict=False)],
            repeated=repeated,
            foreign=foreign,
            unknown=len(others) - foreign,
        )

    async def frames(self, wanted: list[str]) -> dict[str, tuple[str, bytes]]:
        """One ``HMGET`` per message, one step."""
        messages = await self._messages(wanted, "t", "f")
        return {
            i: (text(m[0]), bytes(m[1]))
            for i, m in zip(wanted, messages, strict=True)
            if m[0] is not None
        }

    async def dead_letter(
        self, user: str, ids: Sequence[str], reason: str, now: float
    ) -> list[DeadLetter]:
        """The user's keys; then the index, with the frames."""
        at = stamp(now)
        moved = [
            text(i)
            for i in await self._script("c_dead", user, reason, at, *ids, key=self._u(user, "p"))
        ]
        if not moved:
            return []
        members = [f"{i}\n{user}" for i in moved]
        index = self._index(
            [("r", "pending", 0, m) for m in members]
            + [("r", "expiry", 0, m) for m in members]
            + [("a", "dead", at, m) for m in members]
        )
        found = [self._call("HMGET", self._m(i), "t", "f", key=self._m(i)) for i in moved]
        messages = await self._all([*found, index])
        return [
            DeadLetter(user, i, text(m[0] or b""), bytes(m[1] or b""), reason, now)
            for i, m in zip(moved, messages, strict=False)
        ]

    async def dead_letters(self, user: str, limit: int) -> list[DeadLetter]:
        """The user's dead letters (its slot), then their messages."""
        flat = await self._script("c_dead_letters", user, limit, key=self._u(user, "p"))
        found = [text(flat[i]) for i in range(0, len(flat), 2)]
        messages = await self._messages(found, "t", "f")
        letters = []
        for i, (message_id, m) in enumerate(zip(found, messages, strict=True)):
            reason, _, dead_at = text(flat[2 * i + 1]).partition("\n")
            letters.append(
                DeadLetter(
                    user,
                    message_id,
                    text(m[0] or b""),
                    bytes(m[1] or b""),
                    reason,
                    float(dead_at),
                )
            )
        return letters

    async def requeue(self, user: str, ids: Sequence[str], expires_at: float) -> list[str]:
        """The user's keys; then the messages' expiry and the index."""
        e = stamp(expires_at)
        moved = [
            text(i) for i in await self._script("c_requeue", user, *ids, key=self._u(user, "p"))
        ]
        if not moved:
            return []
        members = [f"{i}\n{user}" for i in moved]
        calls = [self._script("c_extend", i, e, key=self._m(i)) for i in moved]
        calls.append(
            self._index(
                [("r", "dead", 0, m) for m in members]
                + [("a", "pending", 0, m) for m in members]
                + [("a", "expiry", e, m) for m in members]  # the sweep re-scores later ones
            )
        )
        await self._all(calls)
        return moved

    async def delete_dead(self, user: str, ids: list[str]) -> int:
        """The user's keys; then the index and the messages' counts."""
        gone = [
            text(i) for i in await self._script("c_delete_dead", user, *ids, key=self._u(user, "p"))
        ]
        if gone:
            calls = [self._script("c_unref", i, key=self._m(i)) for i in gone]
            calls.append(self._index([("r", "dead", 0, f"{i}\n{user}") for i in gone]))
            await self._all(calls)
        return len(gone)

    async def sweep(self, now: float, retention: float) -> tuple[list[DeadLetter], bool]:
        """One step of :meth:`expire`; also whether a kind filled its chunk."""
        at = stamp(now)
        flat = await self._script(
            "c_sweep_due",
            at,
            stamp(now - ACKED_RETENTION),
            stamp(now - retention),
            SWEEP_CHUNK,
            key=self._g("expiry"),
        )
        counts = [int(flat[0]), int(flat[1]), int(flat[2])]
        members = [text(m) for m in flat[3:]]
        due, acks, dead = (
            members[: counts[0]],
            members[counts[0] : counts[0] + counts[1]],
            members[counts[0] + counts[1] :],
        )
        split = [tuple(m.split("\n", 1)) for m in due]
        distinct = list(dict.fromkeys(i for i, _ in split))
        messages = dict(zip(distinct, await self._messages(distinct, "e", "t", "f"), strict=True))
        entries: dict[str, tuple[str, list[tuple[str, str, str, str]]]] = {}  # by slot

        def add(kind: str, member: str) -> None:
            message_id, user = member.split("\n", 1)
            key = self._u(user, "p")
            slot = str(key_slot(key.encode()))
            entries.setdefault(slot, (key, []))[1].append((kind, user, message_id, member))

        index: list[tuple[str, str, Any, str]] = []
        for member, (message_id, _user) in zip(due, split, strict=True):
            expiry = messages[message_id][0]
            if expiry is not None and float(expiry) > now:  # requeued by another recipient
                index.append(("a", "expiry", text(expiry), member))
            else:
                add("e" if expiry is not None else "o", member)
        for member in acks:
            add("k", member)
        for member in dead:
            add("x", member)
        groups = list(entries.values())
        results = await self._all(
            [
                self._script(
                    "c_sweep_users",
                    at,
                    *(v for kind, user, i, _ in group for v in (kind, user, i)),
                    key=key,
                )
                for key, group in groups
            ]
        )
        letters: list[DeadLetter] = []
        unref: list[str] = []
        for (_key, group), replies in zip(groups, results, strict=True):
            for (kind, user, message_id, member), reply in zip(group, replies, strict=True):
                result = text(reply)
                if kind in ("e", "o"):
                    index += [("r", "expiry", 0, member), ("r", "pending", 0, member)]
                    if result == "d":
                        index.append(("a", "dead", at, member))
                        _e, t, f = messages[message_id]
                        letters.append(
                            DeadLetter(
                                user, message_id, text(t or b""), bytes(f or b""), "ttl", now
                            )
                        )
                    elif result in ("k", "x"):  # its index entry lagged (a step failed)
                        index.append(("n", "acked" if result == "k" else "dead", at, member))
                else:
                    index.append(("r", "acked" if kind == "k" else "dead", 0, member))
                    if result == "1":
                        unref.append(message_id)
        calls = [self._script("c_unref", i, key=self._m(i)) for i in unref]
        if index:
            calls.append(self._index(index))
        await self._all(calls)
        return letters, max(counts) >= SWEEP_CHUNK

    def _r(self, room: str, what: str) -> str:
        return room_key(self.prefix, room, what)

    async def trim_history(self, now: float) -> HistoryStats:
        """Per chunk: what is due; each room slot group; the index and count. Then the figures."""
        at = stamp(now)
        index_key = self._g("hrooms")
        for _ in range(SWEEP_STEPS):
            due = await self._call(
                "ZRANGEBYSCORE", index_key, "-inf", at, "LIMIT", 0, SWEEP_CHUNK, key=index_key
            )
            rooms: dict[int, tuple[str, list[str]]] = {}
            for room in map(text, due):
                key = self._r(room, "h")
                rooms.setdefault(key_slot(key.encode()), (key, []))[1].append(room)
            groups = list(rooms.values())
            results = await self._all(
                [self._script("c_trim_rooms", at, *group, key=key) for key, group in groups]
            )
            index: list[tuple[str, str, Any, str]] = []
            dropped = 0
            for (_key, group), flat in zip(groups, results, strict=True):
                for room, i in zip(group, range(0, len(flat), 2), strict=True):
                    dropped += int(flat[i])
                    score = text(flat[i + 1])
                    index.append(
                        ("a", "hrooms", score, room) if score else ("r", "hrooms", 0, room)
                    )
            if dropped:
                index.append(("i", "hentries", -dropped, ""))
            if index:
                await self._index(index)
            if len(due) < SWEEP_CHUNK:
                break
        count, entries = await self._all(
            [
                self._call("ZCARD", index_key, key=index_key),
                self._call("GET", self._g("hentries"), key=index_key),
            ]
        )
        return HistoryStats(int(count), max(0, int(entries or 0)))

    async def add_push(self, sub: PushSubscription, limit: int) -> SubscribeResult:
        """The user's cap (taken in the user's slot), then the endpoint's hash, then the
        previous owner's list and the count."""
        claim = text(
            await self._script(
                "c_push_claim",
                sub.user,
                sub.endpoint,
                stamp(sub.created_at),
                limit,
                key=self._u(sub.user, "w"),
            )
        )
        if claim == "limit":
            return "limit"
        endpoint = f"{self.prefix}{{w:{sub.endpoint}}}"
        owner = text(
            await self._script(
                "c_push_put",
                sub.endpoint,
                sub.user,
                sub.p256dh,
                sub.auth,
                stamp(sub.created_at),
                key=endpoint,
            )
        )
        if owner == sub.user:
            return "updated"
        if owner:  # the browser changed hands
            previous = self._u(owner, "w")
            await self._call("ZREM", previous, sub.endpoint, key=previous)
        else:
            await self._index([("i", "push", 1, "")])
        return "created"

    async def remove_push(self, user: str, endpoint: str) -> bool:
        """The endpoint (its owner's only), then the user's list and the count."""
        name = f"{self.prefix}{{w:{endpoint}}}"
        removed = bool(int(await self._script("c_push_drop", endpoint, user, key=name)))
        mine = self._u(user, "w")
        calls = [self._call("ZREM", mine, endpoint, key=mine)]
        if removed:
            calls.append(self._index([("i", "push", -1, "")]))
        await self._all(calls)
        return removed

    async def push_list(self, user: str) -> list[PushSubscription]:
        """The user's endpoints (its slot), then each endpoint's hash."""
        mine = self._u(user, "w")
        endpoints = [text(e) for e in await self._call("ZRANGE", mine, 0, -1, key=mine)]
        names = [f"{self.prefix}{{w:{e}}}" for e in endpoints]
        found = await self._all([self._call("HMGET", n, "k", "a", "c", key=n) for n in names])
        return [
            PushSubscription(user, e, text(s[0]), text(s[1]), float(s[2]))
            for e, s in zip(endpoints, found, strict=True)
            if s[0] is not None
        ]

    async def append(self, head: list[Any], *rest: Any) -> Any:
        """The append script's reply: the room's script, and the {g} index
        after it, not waited for: it over-approximates, ``ZADD LT`` never delays the
        sweep of a room already in it, and the count is a figure)."""
        room = head[0]
        self._later(self._index([("l", "hrooms", head[3], room)]))
        reply = await self._script("c_append", *head, *rest, key=self._r(room, "h"))
        if int(reply[0]) and int(reply[2]):
            self._later(self._index([("i", "hentries", int(reply[2]), "")]))
        return reply
