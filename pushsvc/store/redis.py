"""Redis store: the inbox in a Redis shared by every node (``store.url = "redis://..."``).

Every operation is one Lua script (``EVALSHA``; the scripts are loaded at open
and again on ``NOSCRIPT`` after a Redis restart), so it is atomic: accept
stores the message, one pending delivery per recipient and the idempotency key
in one script, whatever the number of recipients. The operations submitted in
one pass of the event loop go to Redis together, pipelined in one write on one
connection (one round trip, like SQLite's group commit), with up to
``CONNECTIONS`` pipelines in flight (one per connection): one round trip per
accepted message at most, fewer under load. Operations in different pipelines
are not ordered with each other (each caller awaits its own). Places with
more: :meth:`RedisStore.expire` runs one script per step of at most
``SWEEP_CHUNK`` entries of each kind (at most ``SWEEP_STEPS`` steps per call,
so no script holds Redis long), and :meth:`RedisStore.open` sends ``SCRIPT
LOAD`` and ``CONFIG GET`` (or ``INFO``).

Keys (``P`` is the prefix, ``pushsvc:`` unless the URL says ``?prefix=...``,
put before each key as is, as the broker does with its channels; one Redis
serves several deployments with different prefixes)::

    P{m:<id>}            HASH  t type, f frame, e expires_at, n deliveries referring to it
    P{u:<user>}:p        ZSET  the user's pending ids (score 0: ordered by id, ZRANGEBYLEX)
    P{u:<user>}:a        HASH  id -> attempts (pending deliveries sent at least once)
    P{u:<user>}:k        SET   ids the user acked (kept ACKED_RETENTION: "repeated")
    P{u:<user>}:x        ZSET  the user's dead-letter ids (score 0: ordered by id)
    P{u:<user>}:r        HASH  dead id -> "<reason>\\n<dead_at>"
    P{i:<client>}:<key>  HASH idempotency key: fp, id, n, e; Redis expires it at e
    P{g}:pending         ZSET  "<id>\\n<user>" per pending delivery (score 0): stats
    P{g}:expiry          ZSET  the same members, score expires_at: the TTL sweep
    P{g}:acked           ZSET  "<id>\\n<user>" per acked delivery, score acked at: retention
    P{g}:dead            ZSET  "<id>\\n<user>" per dead letter, score dead at: retention
    P{g}:rev             HASH  "<kind>\\n<subject>" -> "<until>\\n<created_at>\\n<expires_at>"
    P{g}:revexp          ZSET  revocations with an expiry, score expires_at
    P{g}:probe           STRING the write of check()
    P{g:<n>}:probe       STRING the same on each master of a cluster (n: one of its slots)
    P{r:<room>}:h        HASH  room history: e epoch, n latest offset, x epoch forgotten at
    P{r:<room>}:l        ZSET  its entries "<offset>\\n<created>\\n<expires>\\n<type>\\n<frame>",
                               scored by offset
    P{g}:hrooms          ZSET  rooms with a history, score: oldest entry's expiry (none: x)
    P{g}:hentries        STRING entries kept, all rooms
    P{w:<endpoint>}      HASH  a Web Push subscription: u user, k p256dh, a auth, c created_at
    P{u:<user>}:w        ZSET  the user's endpoints, score created_at
    P{g}:push            STRING subscriptions stored, all users

Room history. :meth:`RedisStore.append` is one script like the others: the
frame is encoded once, before it, with random stand-ins for the offset and
the epoch, and the script splices the room's next offset and its epoch in
(a new random epoch for a room without one), so an append is atomic, takes
no offset when it fails and is never visible before its entry. An encoder
whose frame does not hold each stand-in exactly once is served by a read
and a conditional append, retried (``APPEND_TRIES``). :meth:`RedisStore.history`
is one script; :meth:`RedisStore.trim_history` one per ``SWEEP_CHUNK`` rooms
whose oldest entry expired (at most ``SWEEP_STEPS``). A room's keys share the
hash tag ``{r:<room>}``.

Times are stored as the strings Python wrote (``repr`` of a float), so they
come back exactly; Lua compares them with ``tonumber``.

Cluster. A user's keys share the hash tag ``{u:<user>}``, a message's keys
``{m:<id>}``, the global indexes ``{g}``. On one Redis (a standalone client, or the
primary the sentinels name) a script may touch any key, so accept, ack and the
sweep each update the user's keys, the message and the global indexes in one
atomic script. With ``redis+cluster://`` (``self.cluster``) every script touches
one slot and declares one of its keys (``EVALSHA sha 1 key``: a moved slot is
answered MOVED, not run): the operations that span tags are
:class:`pushsvc.store.redis_cluster.SlotSplit`'s, steps of ``c_*`` scripts, one
slot each, sent together within a step (the
commands of one loop pass go as one pipeline per master, to every master at once:
:meth:`RedisStore._cluster_batch`). The per-user keys are the truth; the global
indexes are written with or before them on additions and after them on removals,
so the indexes only over-approximate (the sweep skips members whose delivery is
gone and repairs those a failed step left behind). An accept is reported only once
every script of it succeeded, the idempotency key last; docs/redis.md, "Store on a
cluster", lists the steps and what a half-failed operation leaves. The frame is
stored once per message (``{m:<id>}``), not per recipient: memory O(frame +
recipients), at the price of a second read on Cluster for :meth:`RedisStore.pending`.

Failures. Every command is bounded by ``busy_timeout`` (socket connect and
reply); an operation queued behind a pipeline that is timing out waits for it
first, so the worst case is a few times ``busy_timeout``. A timeout, a lost
connection or an error reply (e.g. OOM at ``maxmemory``) raises
:class:`StoreUnavailable` and makes :meth:`RedisStore.healthy` False until a
batch succeeds; the client reconnects by itself, no reopen needed. A
connection given up on is closed, so a command Redis had postponed (``CLIENT
PAUSE``) never runs. Nothing is retried but this: a pooled connection Redis
closed (restart, ``CLIENT KILL``) before any reply came is replaced and the
batch sent again on the new one (should Redis have run it before closing, it
runs twice: accept of an id already stored does nothing, an ack reports its
ids repeated). Any other failure during a round trip fails its whole batch,
although Redis may have run part of it by then (the reply was lost): a
timed-out accept may have been stored although the sender was told
``unavailable`` (at-least-once: a send retried without an idempotency key may
then be stored twice).

At ``maxmemory`` (``noeviction``) Redis refuses a script only before its
first write (scripts without flags), so no script is cut in half: accept,
whose first write adds memory, is refused whole (``StoreUnavailable``), while
ack, dead_letter, delete_dead and the sweep start by removing and keep
working, so a full Redis can still drain.

Durability is Redis's (``appendonly``, ``appendfsync``; docs/redis.md, "Store
durability"). :meth:`RedisStore.open` warns when the eviction policy could
drop keys or the AOF is off. No state is kept in the process besides the
connection pool: :meth:`RedisStore.may_have_pending` always says True (another
node may have accepted a message a moment ago).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc import redisurl
from pushsvc.protocol import ids
from pushsvc.store.contracts import (
    ACKED_RETENTION,
    EPOCH_RETENTION,
    AckResult,
    Appended,
    DeadLetter,
    HistoryEntry,
    HistoryPage,
    HistoryRetention,
    HistoryStats,
    IdempotencyKey,
    IdempotentResult,
    PendingMessage,
    PushSubscription,
    Revocation,
    StoreStats,
    StoreUnavailable,
    SubscribeResult,
)
from pushsvc.store.redis_cluster import (
    CLUSTER_SCRIPTS,
    PUSH_DROP,
    PUSH_PUT,
    SWEEP_CHUNK,
    SWEEP_STEPS,
    TRIM_ROOMS,
    SlotSplit,
    global_key,
    room_key,
    user_key,
)
from pushsvc.store.redis_cluster import stamp as _time
from pushsvc.store.redis_cluster import text as _text

log = logging.getLogger("pushsvc.store")

#: Key prefix unless the URL's ``prefix=`` sets one (as the broker's: separator included).
DEFAULT_PREFIX = "pushsvc:"
#: Connections to Redis, each with one pipeline (a batch of operations) in flight at a
#: time; ``?max_connections=N`` in the URL changes it.
CONNECTIONS = 4
#: Reads and tries of an append whose frame needs its position before the script.
APPEND_TRIES = 100
#: Eviction policies that never drop a key (``volatile-*`` would drop only keys with a
#: TTL, which here are idempotency keys only, but a policy must be chosen on purpose).
SAFE_POLICIES = ("noeviction",)

# Shared Lua functions; P is the prefix, u a user, id a message id.
_PRELUDE = """
local function ukey(P, u, what) return P .. '{u:' .. u .. '}:' .. what end
local function mkey(P, id) return P .. '{m:' .. id .. '}' end
local function gkey(P, what) return P .. '{g}:' .. what end
local function rkey(P, room, what) return P .. '{r:' .. room .. '}:' .. what end
local function unref(P, id)
  local k = mkey(P, id)
  if redis.call('HINCRBY', k, 'n', -1) <= 0 then redis.call('DEL', k) end
end
local function split(member)
  local cut = string.find(member, '\\n', 1, true)
  return string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
end
-- Move one pending delivery to the dead letters; nil unless it was pending.
local function to_dead(P, u, id, reason, now)
  if redis.call('ZREM', ukey(P, u, 'p'), id) == 0 then return nil end
  redis.call('HDEL', ukey(P, u, 'a'), id)
  redis.call('ZADD', ukey(P, u, 'x'), 0, id)
  redis.call('HSET', ukey(P, u, 'r'), id, reason .. '\\n' .. now)
  local member = id .. '\\n' .. u
  redis.call('ZREM', gkey(P, 'pending'), member)
  redis.call('ZREM', gkey(P, 'expiry'), member)
  redis.call('ZADD', gkey(P, 'dead'), now, member)
  return redis.call('HMGET', mkey(P, id), 't', 'f')
end
"""

# ARGV: P, id, type, frame, expires_at, expires_at in ms, n, user*n, [client, key,
# fingerprint, key expires_at, key expires_at in ms, recipients]
_ACCEPT = """
local P, id, e = ARGV[1], ARGV[2], ARGV[5]
local m = mkey(P, id)
if redis.call('EXISTS', m) == 1 then return 0 end
local n = tonumber(ARGV[7])
redis.call('HSET', m, 't', ARGV[3], 'f', ARGV[4], 'e', e, 'n', n)
if n == 0 then redis.call('PEXPIREAT', m, ARGV[6]) end  -- no delivery will drop it
for i = 8, 7 + n do
  local u = ARGV[i]
  local member = id .. '\\n' .. u
  redis.call('ZADD', ukey(P, u, 'p'), 0, id)
  redis.call('ZADD', gkey(P, 'pending'), 0, member)
  redis.call('ZADD', gkey(P, 'expiry'), e, member)
end
local j = 8 + n
if ARGV[j] then
  local k = P .. '{i:' .. ARGV[j] .. '}:' .. ARGV[j + 1]
  redis.call('DEL', k)
  redis.call('HSET', k, 'fp', ARGV[j + 2], 'id', id, 'n', ARGV[j + 5], 'e', ARGV[j + 3])
  redis.call('PEXPIREAT', k, ARGV[j + 4])
end
return 1
"""

# ARGV: P, user, after_id, limit -> flat (id, type, frame, attempts, expires_at)*
_PENDING = """
local P, u = ARGV[1], ARGV[2]
local low = '-'
if ARGV[3] ~= '' then low = '(' .. ARGV[3] end
local out = {}
local found = redis.call('ZRANGEBYLEX', ukey(P, u, 'p'), low, '+', 'LIMIT', 0, ARGV[4])
for _, id in ipairs(found) do
  local m = redis.call('HMGET', mkey(P, id), 't', 'f', 'e')
  if m[1] then
    local a = redis.call('HGET', ukey(P, u, 'a'), id) or '0'
    out[#out + 1] = id; out[#out + 1] = m[1]; out[#out + 1] = m[2]
    out[#out + 1] = a; out[#out + 1] = m[3]
  end
end
return out
"""

# ARGV: P, user, now, id* -> repeated, foreign, unknown, (id, type)*
_ACK = """
local P, u, now = ARGV[1], ARGV[2], ARGV[3]
local repeated, foreign, unknown = 0, 0, 0
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'p'), id) == 1 then
    local member = id .. '\\n' .. u
    redis.call('HDEL', ukey(P, u, 'a'), id)
    redis.call('SADD', ukey(P, u, 'k'), id)
    redis.call('ZREM', gkey(P, 'pending'), member)
    redis.call('ZREM', gkey(P, 'expiry'), member)
    redis.call('ZADD', gkey(P, 'acked'), now, member)
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', mkey(P, id), 't') or ''
  elseif redis.call('SISMEMBER', ukey(P, u, 'k'), id) == 1
      or redis.call('ZSCORE', ukey(P, u, 'x'), id) then
    repeated = repeated + 1
  elseif redis.call('EXISTS', mkey(P, id)) == 1 then
    foreign = foreign + 1
  else
    unknown = unknown + 1
  end
end
table.insert(out, 1, unknown); table.insert(out, 1, foreign); table.insert(out, 1, repeated)
return out
"""

# ARGV: P, user, (id, attempts)*
_ATTEMPTS = """
local P, u = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('ZSCORE', ukey(P, u, 'p'), id) then
    local current = tonumber(redis.call('HGET', ukey(P, u, 'a'), id) or '0')
    if count > current then redis.call('HSET', ukey(P, u, 'a'), id, ARGV[i + 1]) end
  end
end
return 0
"""

# ARGV: P, user, reason, now, id* -> (id, type, frame)* of those that moved
_DEAD_LETTER = """
local P, u, reason, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 5, #ARGV do
  local m = to_dead(P, u, ARGV[i], reason, now)
  if m then out[#out + 1] = ARGV[i]; out[#out + 1] = m[1] or ''; out[#out + 1] = m[2] or '' end
end
return out
"""

# ARGV: P, now, acked before, dead before, chunk
# -> expired, acks dropped, dead dropped, (user, id, type, frame)* dead-lettered now
_SWEEP = """
local P, now, chunk = ARGV[1], ARGV[2], ARGV[5]
local out = {}
local due = redis.call('ZRANGEBYSCORE', gkey(P, 'expiry'), '-inf', now, 'LIMIT', 0, chunk)
for _, member in ipairs(due) do
  local id, u = split(member)
  local e = redis.call('HGET', mkey(P, id), 'e')
  if e and tonumber(e) > tonumber(now) then
    redis.call('ZADD', gkey(P, 'expiry'), e, member)  -- requeued by another recipient
  else
    local m = to_dead(P, u, id, 'ttl', now)
    redis.call('ZREM', gkey(P, 'expiry'), member)
    if m then
      out[#out + 1] = u; out[#out + 1] = id; out[#out + 1] = m[1] or ''
      out[#out + 1] = m[2] or ''
    end
  end
end
local acks = redis.call('ZRANGEBYSCORE', gkey(P, 'acked'), '-inf', '(' .. ARGV[3],
  'LIMIT', 0, chunk)
for _, member in ipairs(acks) do
  local id, u = split(member)
  redis.call('ZREM', gkey(P, 'acked'), member)
  if redis.call('SREM', ukey(P, u, 'k'), id) == 1 then unref(P, id) end
end
local dead = redis.call('ZRANGEBYSCORE', gkey(P, 'dead'), '-inf', '(' .. ARGV[4],
  'LIMIT', 0, chunk)
for _, member in ipairs(dead) do
  local id, u = split(member)
  redis.call('ZREM', gkey(P, 'dead'), member)
  if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'r'), id)
    unref(P, id)
  end
end
table.insert(out, 1, #dead); table.insert(out, 1, #acks); table.insert(out, 1, #due)
return out
"""

# ARGV: P, user, limit -> (id, type, frame, reason and dead_at)*
_DEAD_LETTERS = """
local P, u = ARGV[1], ARGV[2]
local out = {}
for _, id in ipairs(redis.call('ZRANGE', ukey(P, u, 'x'), 0, tonumber(ARGV[3]) - 1)) do
  local m = redis.call('HMGET', mkey(P, id), 't', 'f')
  out[#out + 1] = id; out[#out + 1] = m[1] or ''; out[#out + 1] = m[2] or ''
  out[#out + 1] = redis.call('HGET', ukey(P, u, 'r'), id) or '\\n0'
end
return out
"""

# ARGV: P, user, expires_at, id* -> ids requeued
_REQUEUE = """
local P, u, e = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
    local member = id .. '\\n' .. u
    redis.call('HDEL', ukey(P, u, 'r'), id)
    redis.call('HDEL', ukey(P, u, 'a'), id)
    redis.call('ZADD', ukey(P, u, 'p'), 0, id)
    redis.call('ZREM', gkey(P, 'dead'), member)
    redis.call('ZADD', gkey(P, 'pending'), 0, member)
    local current = redis.call('HGET', mkey(P, id), 'e')
    local expiry = e
    if current and tonumber(current) > tonumber(e) then expiry = current end
    redis.call('HSET', mkey(P, id), 'e', expiry)
    redis.call('ZADD', gkey(P, 'expiry'), expiry, member)
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, user, id* -> how many dead letters went
_DELETE_DEAD = """
local P, u = ARGV[1], ARGV[2]
local count = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', ukey(P, u, 'x'), id) == 1 then
    redis.call('HDEL', ukey(P, u, 'r'), id)
    redis.call('ZREM', gkey(P, 'dead'), id .. '\\n' .. u)
    unref(P, id)
    count = count + 1
  end
end
return count
"""

# ARGV: P -> pending count, oldest member or ''
_STATS = """
local P = ARGV[1]
local first = redis.call('ZRANGE', gkey(P, 'pending'), 0, 0)
return {redis.call('ZCARD', gkey(P, 'pending')), first[1] or ''}
"""

# ARGV: P, id* -> (id, type, frame)* of the stored ones
_FRAMES = """
local P = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local m = redis.call('HMGET', mkey(P, ARGV[i]), 't', 'f')
  if m[1] then out[#out + 1] = ARGV[i]; out[#out + 1] = m[1]; out[#out + 1] = m[2] end
end
return out
"""

# ARGV: P, kind, subject, until, created_at, expires_at ('' for None) -> stored triple
_REVOKE = """
local P, field = ARGV[1], ARGV[2] .. '\\n' .. ARGV[3]
local untl, created, expires = ARGV[4], ARGV[5], ARGV[6]
local old = redis.call('ZRANGEBYSCORE', gkey(P, 'revexp'), '-inf', created, 'LIMIT', 0, 1000)
for _, f in ipairs(old) do
  redis.call('HDEL', gkey(P, 'rev'), f)
  redis.call('ZREM', gkey(P, 'revexp'), f)
end
local current = redis.call('HGET', gkey(P, 'rev'), field)
if current then
  local cu, cc, ce = string.match(current, '^(.-)\\n(.-)\\n(.*)$')
  if cu ~= '' and (untl == '' or tonumber(cu) > tonumber(untl)) then untl = cu end
  if ce == '' or expires == '' then expires = ''
  elseif tonumber(ce) > tonumber(expires) then expires = ce end
  created = cc
end
redis.call('HSET', gkey(P, 'rev'), field, untl .. '\\n' .. created .. '\\n' .. expires)
if expires == '' then redis.call('ZREM', gkey(P, 'revexp'), field)
else redis.call('ZADD', gkey(P, 'revexp'), expires, field) end
return {untl, created, expires}
"""

# A history entry is the member "<offset>\n<created_at>\n<expires_at>\n<type>\n<frame>"
# of the room's ZSET, scored by its offset.
_HISTORY_PRELUDE = """
local function field(member, n)  -- the n-th newline-separated field (n < 5)
  local start = 1
  for _ = 2, n do start = string.find(member, '\\n', start, true) + 1 end
  local stop = string.find(member, '\\n', start, true)
  return string.sub(member, start, stop - 1)
end
-- Re-score the room in the sweep index: its oldest entry's expiry, or when none
-- is left the time its epoch is forgotten.
local function rescore(P, room, l, forget)
  local first = redis.call('ZRANGE', l, 0, 0)
  local score = forget
  if first[1] then score = field(first[1], 3) end
  redis.call('ZADD', gkey(P, 'hrooms'), score, room)
end
"""

# The {g} index of an append: updated in the script on one Redis; on a cluster
# (another slot) by a script of its own, after the room's (SlotSplit.append).
_HISTORY_INDEX = """
local function index(P, room, l, forget, added)
  redis.call('INCRBY', gkey(P, 'hentries'), added)
  rescore(P, room, l, forget)
end
"""
_HISTORY_NO_INDEX = """
local function index(P, room, l, forget, added) end
"""

# ARGV: P, room, type, created_at, expires_at, new epoch, size, forget at, mode, a, b, c,
# [epoch, top] -> {offset, epoch, entries added} (mode 'cas' and another position:
# {0, epoch, top})
# Modes: 'oe' (frame = a .. offset .. b .. epoch .. c), 'eo' (a .. epoch .. b .. offset
# .. c), 'cas' (frame = a, made for ARGV[13], ARGV[14]: stored only at that position).
_APPEND = """
local P, room = ARGV[1], ARGV[2]
local h, l = rkey(P, room, 'h'), rkey(P, room, 'l')
local epoch = redis.call('HGET', h, 'e')
local top = 0
if epoch then
  top = tonumber(redis.call('HGET', h, 'n'))
else
  epoch = ARGV[6]
  redis.call('DEL', l)  -- a new epoch: nothing of an older one may stay
end
local mode = ARGV[9]
if mode == 'cas' and (epoch ~= ARGV[13] or top ~= tonumber(ARGV[14])) then
  return {0, epoch, top}
end
local offset = top + 1
local o = string.format('%d', offset)
local frame
if mode == 'oe' then frame = ARGV[10] .. o .. ARGV[11] .. epoch .. ARGV[12]
elseif mode == 'eo' then frame = ARGV[10] .. epoch .. ARGV[11] .. o .. ARGV[12]
else frame = ARGV[10] end
redis.call('HSET', h, 'e', epoch, 'n', offset)
redis.call('ZADD', l, offset, o .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[3]
  .. '\\n' .. frame)
local added = 1
local size = tonumber(ARGV[7])
if offset > size then
  added = added - redis.call('ZREMRANGEBYSCORE', l, '-inf', offset - size)
end
index(P, room, l, ARGV[8], added)
redis.call('HSET', h, 'x', ARGV[8])
return {offset, epoch, added}
"""

# ARGV: P, room, since ('' for none), limit, reverse ('1' or ''), now
# -> {epoch, top, earliest, member*}; {'', 0, 1} for a room without history
_HISTORY = """
local P, room, limit, now = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[6])
local h, l = rkey(P, room, 'h'), rkey(P, room, 'l')
local position = redis.call('HMGET', h, 'e', 'n')
if not position[1] then return {'', 0, 1} end
local top = tonumber(position[2])
local out = {position[1], top, top + 1}
local low = '-inf'
while true do  -- the smallest unexpired offset
  local found = redis.call('ZRANGEBYSCORE', l, low, '+inf', 'LIMIT', 0, 100)
  if #found == 0 then break end
  local hit = false
  for _, member in ipairs(found) do
    if tonumber(field(member, 3)) > now then
      out[3] = tonumber(field(member, 1)); hit = true; break
    end
  end
  if hit then break end
  low = '(' .. field(found[#found], 1)
end
if limit <= 0 then return out end
local reverse = ARGV[5] == '1'
local bound
if reverse then
  bound = '(' .. (ARGV[3] == '' and tostring(top + 1) or ARGV[3])
else
  bound = '(' .. (ARGV[3] == '' and '0' or ARGV[3])
end
while #out - 3 < limit do
  local found
  if reverse then
    found = redis.call('ZREVRANGEBYSCORE', l, bound, '-inf', 'LIMIT', 0, limit)
  else
    found = redis.call('ZRANGEBYSCORE', l, bound, '+inf', 'LIMIT', 0, limit)
  end
  if #found == 0 then break end
  for _, member in ipairs(found) do
    if #out - 3 < limit and tonumber(field(member, 3)) > now then out[#out + 1] = member end
  end
  bound = '(' .. field(found[#found], 1)
end
return out
"""

# ARGV: P, now, chunk -> {rooms looked at, rooms kept, entries kept}
_TRIM_HISTORY = """
local P, now, chunk = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local index = gkey(P, 'hrooms')
local due = redis.call('ZRANGEBYSCORE', index, '-inf', ARGV[2], 'LIMIT', 0, chunk)
local dropped = 0
for _, room in ipairs(due) do
  local h, l = rkey(P, room, 'h'), rkey(P, room, 'l')
  while true do
    local first = redis.call('ZRANGE', l, 0, 0)
    if not first[1] or tonumber(field(first[1], 3)) > now then break end
    redis.call('ZREM', l, first[1])
    dropped = dropped + 1
  end
  local forget = redis.call('HGET', h, 'x')
  if redis.call('ZCARD', l) == 0 and (not forget or tonumber(forget) <= now) then
    redis.call('DEL', h, l)
    redis.call('ZREM', index, room)
  else
    rescore(P, room, l, forget or ARGV[2])
  end
end
local entries = redis.call('DECRBY', gkey(P, 'hentries'), dropped)
if entries < 0 then redis.call('SET', gkey(P, 'hentries'), 0); entries = 0 end
return {#due, redis.call('ZCARD', index), entries}
"""

# Web Push subscriptions: P{w:<endpoint>} HASH u user, k p256dh, a auth, c created_at;
# P{u:<user>}:w ZSET the user's endpoints, score created_at; P{g}:push STRING the count.
_PUSH_PRELUDE = """
local function wkey(P, endpoint) return P .. '{w:' .. endpoint .. '}' end
"""

# ARGV: P, user, endpoint, p256dh, auth, created_at, limit -> 'created'|'updated'|'limit'
_PUSH_ADD = """
local P, u, ep, c = ARGV[1], ARGV[2], ARGV[3], ARGV[6]
local h = wkey(P, ep)
local owner = redis.call('HGET', h, 'u')
if owner ~= u and redis.call('ZCARD', ukey(P, u, 'w')) >= tonumber(ARGV[7]) then
  return 'limit'
end
if owner and owner ~= u then redis.call('ZREM', ukey(P, owner, 'w'), ep) end
redis.call('HSET', h, 'u', u, 'k', ARGV[4], 'a', ARGV[5], 'c', c)
redis.call('ZADD', ukey(P, u, 'w'), c, ep)
if not owner then redis.call('INCR', gkey(P, 'push')) end
if owner == u then return 'updated' end
return 'created'
"""

# ARGV: P, user, endpoint -> 1 when it was the user's, else 0
_PUSH_REMOVE = """
local P, u, ep = ARGV[1], ARGV[2], ARGV[3]
local h = wkey(P, ep)
if redis.call('HGET', h, 'u') ~= u then return 0 end
redis.call('DEL', h)
redis.call('ZREM', ukey(P, u, 'w'), ep)
redis.call('DECR', gkey(P, 'push'))
return 1
"""

# ARGV: P, user -> (endpoint, p256dh, auth, created_at)*, oldest first
_PUSH_LIST = """
local P, u = ARGV[1], ARGV[2]
local out = {}
for _, ep in ipairs(redis.call('ZRANGE', ukey(P, u, 'w'), 0, -1)) do
  local s = redis.call('HMGET', wkey(P, ep), 'k', 'a', 'c')
  if s[1] then
    out[#out + 1] = ep; out[#out + 1] = s[1]; out[#out + 1] = s[2]; out[#out + 1] = s[3]
  end
end
return out
"""


def _optional(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None


class StoreUrl(NamedTuple):
    """``store.url`` parsed: redis-py's URL and the store's own parameters."""

    url: str  # for redis-py (the store's parameters taken out)
    prefix: str  # before every key
    connections: int  # pooled connections, pipelines in flight
    min_replicas: int = 0  # replicas that must confirm each batch (WAIT), 0: none
    replica_timeout: float = 0.5  # seconds WAIT waits for them


#: The store's own URL parameters, taken out before redis-py sees the URL.
_OWN = ("prefix", "max_connections", "min_replicas", "replica_timeout")


def parse_url(url: str) -> StoreUrl:
    """Split ``store.url`` into redis-py's URL and the store's own parameters.

    ``?prefix=`` (default ``pushsvc:``, put before every key as is, like the
    broker's channel prefix), ``?max_connections=`` (default CONNECTIONS),
    ``?min_replicas=`` (default 0) and ``?replica_timeout=`` (seconds, default
    0.5) are taken out; the rest is redis-py's. Raises ValueError for a prefix
    holding ``{``, ``}`` or a newline (they would break the hash tags and
    members), numbers out of range, or a parameter given twice.
    """
    redis_url, given = redisurl.take_params(url, _OWN, "store.url")
    own = {"prefix": DEFAULT_PREFIX, "max_connections": str(CONNECTIONS)}
    own |= {"min_replicas": "0", "replica_timeout": "0.5"}
    own |= given
    prefix, connections = own["prefix"], own["max_connections"]
    if any(c in prefix for c in "{}\n"):
        raise ValueError(f"store.url: prefix must not hold {{, }} or a newline: {prefix!r}")
    if not connections.isdigit() or int(connections) < 1:
        raise ValueError(f"store.url: max_connections must be a positive integer: {connections!r}")
    if not own["min_replicas"].isdigit():
        raise ValueError(
            f"store.url: min_replicas must be an integer >= 0: {own['min_replicas']!r}"
        )
    try:
        replica_timeout = float(own["replica_timeout"])
    except ValueError:
        replica_timeout = -1.0
    if not 0 < replica_timeout <= 60:
        raise ValueError(
            f"store.url: replica_timeout must be seconds in (0, 60]: {own['replica_timeout']!r}"
        )
    return StoreUrl(
        redis_url,
        prefix,
        int(connections),
        int(own["min_replicas"]),
        replica_timeout,
    )


_SCRIPTS = {
    "accept": _ACCEPT,
    "pending": _PENDING,
    "ack": _ACK,
    "attempts": _ATTEMPTS,
    "dead_letter": _DEAD_LETTER,
    "sweep": _SWEEP,
    "dead_letters": _DEAD_LETTERS,
    "requeue": _REQUEUE,
    "delete_dead": _DELETE_DEAD,
    "stats": _STATS,
    "frames": _FRAMES,
    "revoke": _REVOKE,
    "append": _HISTORY_PRELUDE + _HISTORY_INDEX + _APPEND,
    "history": _HISTORY_PRELUDE + _HISTORY,
    "trim_history": _HISTORY_PRELUDE + _TRIM_HISTORY,
    "push_add": _PUSH_PRELUDE + _PUSH_ADD,
    "push_remove": _PUSH_PRELUDE + _PUSH_REMOVE,
    "push_list": _PUSH_PRELUDE + _PUSH_LIST,
    # Redis Cluster (one slot each: pushsvc/store/redis_cluster.py)
    **CLUSTER_SCRIPTS,
    "c_append": _HISTORY_PRELUDE + _HISTORY_NO_INDEX + _APPEND,
    "c_trim_rooms": _HISTORY_PRELUDE + TRIM_ROOMS,
    "c_push_put": _PUSH_PRELUDE + PUSH_PUT,
    "c_push_drop": _PUSH_PRELUDE + PUSH_DROP,
}
#: name -> (Lua source, its SHA-1 for EVALSHA)
SCRIPTS = {
    name: (source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())
    for name, source in ((name, _PRELUDE + body) for name, body in _SCRIPTS.items())
}


class _Op:
    __slots__ = ("command", "future", "script", "slot")

    def __init__(
        self,
        command: tuple[Any, ...],
        script: str | None,
        future: asyncio.Future[Any],
        slot: int = -1,
    ):
        self.command = command  # the arguments of one Redis command
        self.script = script  # the script EVALSHA runs (reloaded on NOSCRIPT), or None
        self.future = future  # resolved with the reply
        self.slot = slot  # Redis Cluster: the slot of the command's keys (-1: one Redis)


#: Where a batch goes: the one Redis (its client) or one master of a cluster.
_Target = aioredis.Redis | ClusterNode
#: Seconds between two topology refreshes started by failures (a MOVED refreshes at once).
REFRESH_INTERVAL = 1.0


class RedisStore:
    """The Redis implementation of :class:`pushsvc.store.Store` (every contract) and of
    :class:`pushsvc.store.PushSubscriptionStore`."""

    def __init__(self, url: str, *, busy_timeout: float = 5.0) -> None:
        # redis-py's URL; the key prefix; connections (pipelines in flight)
        parsed = parse_url(url)
        self.url, self.prefix, self.connections = parsed.url, parsed.prefix, parsed.connections
        #: WAIT for this many replicas after each batch (Sentinel: a failover keeps what
        #: was reported done); a batch they do not confirm is reported unavailable
        self.min_replicas = parsed.min_replicas
        self.replica_timeout = min(parsed.replica_timeout, busy_timeout / 2)  # WAIT < a read
        self.busy_timeout = busy_timeout  # seconds any command may take
        #: a Redis Cluster URL: operations split by slot, batches sent to each master
        self.cluster = redisurl.is_cluster(url)
        self._redis: aioredis.Redis | None = None  # the client, while open (one Redis)
        self._nodes: RedisCluster | None = None  # the client, while open (Cluster)
        self._failing: set[str] = set()  # targets whose last batch failed ("": one Redis)
        self._outbox: list[_Op] = []  # submitted, not yet sent
        self._senders: set[asyncio.Task[None]] = set()  # each sends one pipeline at a time
        self._starting = False  # a sender is started and has not taken the outbox yet
        self._batches = 0  # pipelines sent
        self._operations = 0  # operations in those pipelines
        self._refresh: asyncio.Task[None] | None = None  # a cluster topology refresh
        self._refreshed = 0.0  # when the last one started (monotonic)
        self._background: set[asyncio.Future[Any]] = set()  # writes nobody awaits
        #: the operations spanning slots, on a cluster
        self._split = SlotSplit(self.prefix, self._call, self._script, self._all, self._later)

    @property
    def batches(self) -> int:
        """Pipelines sent so far (read-only; fewer than operations under load)."""
        return self._batches

    @property
    def operations(self) -> int:
        """Operations sent so far (read-only; ``operations / batches`` is the batch)."""
        return self._operations

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Connect, load the scripts, warn about unsafe persistence settings.

        On a cluster: discover the masters, and load and check on every one.
        """
        if self.cluster:
            await self._open_cluster()
            return
        pool = redisurl.connection_pool(
            self.url,
            key="store.url",
            blocking=True,
            max_connections=self.connections,
            timeout=self.busy_timeout,
            socket_timeout=self.busy_timeout,
            socket_connect_timeout=self.busy_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            await _load_scripts(client)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"cannot reach Redis at {redisurl.redacted(self.url)}: {exc}"
            ) from exc
        self._redis = client
        await self._check_settings(client)

    async def _open_cluster(self) -> None:
        client = redisurl.cluster_client(
            self.url,
            key="store.url",
            # each sender holds at most one connection per master; the rest: discovery
            max_connections=self.connections + 2,
            socket_timeout=self.busy_timeout,
            socket_connect_timeout=self.busy_timeout,
        )
        try:
            await asyncio.wait_for(client.initialize(), self.busy_timeout * 2)
            masters = client.get_primaries()
            await asyncio.gather(*(_load_scripts(node) for node in masters))
        except (RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"cannot reach the Redis Cluster at {redisurl.redacted(self.url)}: {exc}"
            ) from exc
        self._nodes = client
        for node in masters:
            await self._check_settings(node, f" on {node.name}")

    async def _check_settings(self, target: _Target, where: str = "") -> None:
        """Log a warning when Redis may evict keys or keeps no AOF (never fails)."""
        policy = appendonly = None
        try:
            found = await _round_trip(
                target, [("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "GET", "appendonly")]
            )
            if any(isinstance(reply, Exception) for reply in found):
                # CONFIG disabled or renamed (managed Redis): INFO instead
                memory, persistence = await _round_trip(
                    target, [("INFO", "memory"), ("INFO", "persistence")]
                )
                if isinstance(memory, Exception) or isinstance(persistence, Exception):
                    raise memory if isinstance(memory, Exception) else persistence
                info = _info(memory) | _info(persistence)
                policy = info.get("maxmemory_policy") or None
                appendonly = "yes" if info.get("aof_enabled") == "1" else "no"
            else:
                values: dict[str, str] = {}
                for reply in found:  # a map (RESP3, some parsers) or [name, value]
                    pairs = reply.items() if isinstance(reply, dict) else [tuple(reply)]
                    values |= {_text(name): _text(value) for name, value in pairs}
                policy, appendonly = values.get("maxmemory-policy"), values.get("appendonly")
        except (RedisError, OSError) as exc:
            log.warning("cannot read the Redis settings%s: %s", where, exc)
        if policy is not None and policy not in SAFE_POLICIES:
            log.warning(
                "Redis maxmemory-policy is %r%s: at maxmemory Redis may evict pending messages "
                "silently; set maxmemory-policy noeviction (docs/redis.md)",
                policy,
                where,
            )
        if appendonly == "no":
            log.warning(
                "Redis appendonly is off%s: a Redis crash loses what was accepted since the "
                "last snapshot; set appendonly yes (docs/redis.md)",
                where,
            )

    async def close(self) -> None:
        """Send what is submitted, then close the connections (again: does nothing)."""
        while self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        if self._refresh is not None:
            await asyncio.gather(self._refresh, return_exceptions=True)
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()
        nodes, self._nodes = self._nodes, None
        if nodes is not None:
            await nodes.aclose()

    def healthy(self) -> bool:
        """Whether the last batch sent to each Redis (each master of a cluster) reached it
        and every command in it succeeded."""
        return not self._failing

    async def check(self) -> bool:
        """Write a probe key (on every master of a cluster), bounded by ``busy_timeout``;
        updates :meth:`healthy`."""
        now = _time(time.time())
        if self._nodes is None:
            probes = [f"{self.prefix}{{g}}:probe"]
        else:
            probes = _probe_keys(self._nodes, self.prefix)
        try:
            await self._all([self._call("SET", key, now, key=key) for key in probes])
        except StoreUnavailable:
            return False
        return True

    # -- batches: what is submitted in one loop pass goes in one pipeline -------------

    def _call(self, *command: Any, script: str | None = None, key: str = "") -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply or StoreUnavailable.

        ``key``: on a cluster, a key of the command's slot (where it is sent).
        """
        if self._redis is None and self._nodes is None:
            raise StoreUnavailable("store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        slot = key_slot(key.encode()) if self.cluster else -1
        self._outbox.append(_Op(command, script, future, slot))
        if not self._starting and len(self._senders) < self.connections:
            # It starts on the next loop pass: the commands of this pass join its batch.
            self._starting = True
            sender = asyncio.get_running_loop().create_task(self._send())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return future

    def _script(self, name: str, *args: Any, key: str = "") -> asyncio.Future[Any]:
        """EVALSHA the script ``name``; on a cluster it goes to the slot of ``key``, which
        every key it touches shares (declared, so a moved slot is answered MOVED)."""
        if not self.cluster:
            return self._call("EVALSHA", SCRIPTS[name][1], 0, self.prefix, *args, script=name)
        return self._call(
            "EVALSHA", SCRIPTS[name][1], 1, key, self.prefix, *args, script=name, key=key
        )

    async def _all(self, futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
        """Await every one (none is left unretrieved); raise the first failure."""
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _later(self, future: asyncio.Future[Any]) -> None:
        """A write nobody waits for (a derived figure): its failure is only logged."""
        self._background.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("Redis store: an index update failed: %s", future.exception())

    async def _send(self) -> None:
        """Send the outbox as one pipeline (one round trip), again until it is empty.

        Up to ``connections`` senders run at once, so batches of operations submitted
        while others are in flight need not wait for them; operations of
        different batches are therefore not ordered (each caller awaits its own).
        On a cluster a batch is one pipeline per master, sent to all at once.
        """
        self._starting = False
        while self._outbox:
            if self._redis is not None:
                batch, self._outbox = self._outbox, []
                await self._pipeline(self._redis, "", batch)
            elif self._nodes is not None:
                batch, self._outbox = self._outbox, []
                await self._cluster_batch(self._nodes, batch)
            else:
                break

    async def _cluster_batch(self, client: RedisCluster, batch: list[_Op]) -> None:
        """``batch`` grouped by the master of each slot, one pipeline to each at once.

        Commands answered MOVED (their slot moved: not run) are sent once more after a
        topology refresh; a second MOVED, an ASK (a slot being migrated) or a master
        that cannot be reached fails those operations with StoreUnavailable.
        """
        moved = await self._route(client, batch, redirect=True)
        if moved:
            await self._refresh_topology(client, at_once=True)
            await self._route(client, moved, redirect=False)

    async def _route(self, client: RedisCluster, ops: list[_Op], *, redirect: bool) -> list[_Op]:
        groups: dict[str, tuple[ClusterNode, list[_Op]]] = {}
        for op in ops:
            try:
                node = client.nodes_manager.get_node_from_slot(op.slot)
            except RedisClusterException as exc:  # slot not covered
                _settle(op, StoreUnavailable(f"Redis Cluster: {exc}"))
                continue
            groups.setdefault(node.name, (node, []))[1].append(op)
        sent = [
            self._pipeline(node, name, group, redirect) for name, (node, group) in groups.items()
        ]
        moved = await asyncio.gather(*sent)
        return [op for group in moved for op in group]

    async def _refresh_topology(self, client: RedisCluster, *, at_once: bool = False) -> None:
        """Ask the cluster which master serves which slots again (one at a time)."""
        if self._refresh is None:
            if not at_once and time.monotonic() - self._refreshed < REFRESH_INTERVAL:
                return
            self._refreshed = time.monotonic()
            self._refresh = asyncio.get_running_loop().create_task(self._reinitialize(client))
        refresh = self._refresh
        if at_once:
            await asyncio.gather(refresh, return_exceptions=True)

    async def _reinitialize(self, client: RedisCluster) -> None:
        try:
            await asyncio.wait_for(client.nodes_manager.initialize(), self.busy_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("Redis Cluster: cannot refresh the slot map: %s", exc)
        finally:
            self._refresh = None

    async def _pipeline(
        self, target: _Target, name: str, batch: list[_Op], redirect: bool = False
    ) -> list[_Op]:
        """One round trip to ``target`` (named ``name`` in the health set); returns the
        operations answered MOVED when ``redirect`` (not settled), else none."""
        replies: list[Any]
        # WAIT rides in the same round trip, after the batch's writes.
        wait = ("WAIT", self.min_replicas, max(1, int(self.replica_timeout * 1000)))
        tail = [wait] if self.min_replicas else []
        try:
            replies = await _round_trip(target, [*(op.command for op in batch), *tail])
            confirmed = replies.pop() if tail else 0
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # Redis restarted without our scripts: load them, run those again
                await _load_scripts(target)
                again = await _round_trip(target, [*(batch[i].command for i in missing), *tail])
                confirmed = again.pop() if tail else 0
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            if tail and (isinstance(confirmed, Exception) or int(confirmed) < self.min_replicas):
                raise StoreUnavailable(  # written on the primary: a retry may duplicate
                    f"{confirmed} of {self.min_replicas} replicas confirmed within "
                    f"{self.replica_timeout:g} s"
                )
        except Exception as exc:  # RedisError, OSError, or a bug: fail the batch, never hang
            if not self._failing:
                log.error(
                    "Redis store unavailable%s, nothing of this batch reported done: %s",
                    f" ({name})" if name else "",
                    exc,
                )
            self._failing.add(name)
            error = StoreUnavailable(f"Redis: {exc}")
            for op in batch:
                _settle(op, error)
            if self._nodes is not None:  # a master down or failed over: look again soon
                await self._refresh_topology(self._nodes)
            return []
        self._batches += 1
        self._operations += len(batch)
        failed: list[str] = []
        moved: list[_Op] = []
        for op, reply in zip(batch, replies, strict=True):
            if redirect and isinstance(reply, MovedError):
                moved.append(op)
            elif isinstance(reply, Exception):  # e.g. OOM at maxmemory: this command only
                failed.append(f"{op.script or op.command[0]}: {_describe(reply)}")
                _settle(op, StoreUnavailable(f"Redis: {_describe(reply)}"))
            else:
                _settle(op, None, reply)
        if failed:
            if not self._failing:  # once per outage, as for a failed batch
                log.error("Redis store commands failed (%d), e.g. %s", len(failed), failed[0])
            self._failing.add(name)
        elif name in self._failing:
            self._failing.discard(name)
            if not self._failing:
                log.warning("Redis store operations succeed again")
        return moved

    # -- inbox ------------------------------------------------------------------

    async def accept(
        self,
        message_id: str,
        message_type: str,
        frame: bytes,
        recipients: Sequence[str],
        expires_at: float,
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        """Persist a message and one pending delivery per recipient: one EVALSHA (on a
        cluster: one per slot, then the idempotency key)."""
        users = list(dict.fromkeys(recipients))
        if self.cluster:
            await self._split.accept(
                message_id, message_type, frame, users, expires_at, idempotency, len(recipients)
            )
            return
        args: list[Any] = [message_id, message_type, frame, _time(expires_at)]
        args += [int(expires_at * 1000), len(users), *users]
        if idempotency is not None:
            args += [
                idempotency.client,
                idempotency.key,
                idempotency.fingerprint,
                _time(idempotency.expires_at),
                int(idempotency.expires_at * 1000),
                len(recipients),
            ]
        await self._script("accept", *args)

    def may_have_pending(self, user: str) -> bool:
        """Always True: another node may have accepted a message for ``user`` just now."""
        return True

    async def pending(self, user: str, after_id: str, limit: int) -> list[PendingMessage]:
        """The oldest pending deliveries of ``user`` after ``after_id``."""
        if self.cluster:
            return await self._split.pending(user, after_id, limit)
        flat = await self._script("pending", user, after_id, limit)
        return [
            PendingMessage(
                _text(flat[i]),
                _text(flat[i + 1]),
                bytes(flat[i + 2]),
                int(flat[i + 3]),
                float(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    async def ack(self, user: str, ids: Sequence[str]) -> AckResult:
        """Settle ``user``'s pending deliveries among ``ids``."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return AckResult(acked=[])
        if self.cluster:
            return await self._split.ack(user, wanted)
        flat = await self._script("ack", user, _time(time.time()), *wanted)
        acked = [(_text(flat[i]), _text(flat[i + 1])) for i in range(3, len(flat), 2)]
        return AckResult(
            acked=acked, repeated=int(flat[0]), foreign=int(flat[1]), unknown=int(flat[2])
        )

    async def record_attempts(self, user: str, attempts: Sequence[tuple[str, int]]) -> None:
        """Store send counts (never lowering them)."""
        if attempts:
            await self._script(
                "attempts",
                user,
                *(v for pair in attempts for v in pair),
                key=user_key(self.prefix, user, "a"),
            )

    async def stats(self) -> StoreStats:
        """Pending deliveries and the oldest one's creation time (O(1) in Redis)."""
        count, oldest = await self._script("stats", key=global_key(self.prefix, "pending"))
        first = _text(oldest).split("\n", 1)[0]
        return StoreStats(int(count), ids.timestamp_ms(first) if first else None)

    async def frames(self, ids: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """Type and frame of the stored messages among ``ids``."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        if self.cluster:
            return await self._split.frames(wanted)
        flat = await self._script("frames", *wanted)
        return {
            _text(flat[i]): (_text(flat[i + 1]), bytes(flat[i + 2])) for i in range(0, len(flat), 3)
        }

    # -- dead letters -------------------------------------------------------------

    async def dead_letter(self, user: str, ids: Sequence[str], reason: str) -> list[DeadLetter]:
        """Move pending deliveries to the dead letters."""
        if not ids:
            return []
        now = time.time()
        if self.cluster:
            return await self._split.dead_letter(user, ids, reason, now)
        flat = await self._script("dead_letter", user, reason, _time(now), *ids)
        return [
            DeadLetter(user, _text(flat[i]), _text(flat[i + 1]), bytes(flat[i + 2]), reason, now)
            for i in range(0, len(flat), 3)
        ]

    async def expire(self, now: float, retention: float) -> list[DeadLetter]:
        """Dead-letter what passed its TTL; drop old acks, old dead letters, orphan messages.

        One script per step of at most SWEEP_CHUNK entries of each kind, at
        most SWEEP_STEPS steps per call, so no script holds Redis for long.
        """
        dead: list[DeadLetter] = []
        args = (_time(now), _time(now - ACKED_RETENTION), _time(now - retention), SWEEP_CHUNK)
        for _ in range(SWEEP_STEPS):
            if self.cluster:
                letters, more = await self._split.sweep(now, retention)
                dead += letters
                if not more:
                    break
                continue
            flat = await self._script("sweep", *args)
            for i in range(3, len(flat), 4):
                dead.append(
                    DeadLetter(
                        _text(flat[i]),
                        _text(flat[i + 1]),
                        _text(flat[i + 2]),
                        bytes(flat[i + 3]),
                        "ttl",
                        now,
                    )
                )
            if max(int(flat[0]), int(flat[1]), int(flat[2])) < SWEEP_CHUNK:
                break
        return dead

    async def dead_letters(self, user: str, limit: int) -> list[DeadLetter]:
        """``user``'s dead letters, oldest first."""
        if limit <= 0:
            return []
        if self.cluster:
            return await self._split.dead_letters(user, limit)
        flat = await self._script("dead_letters", user, limit)
        letters = []
        for i in range(0, len(flat), 4):
            reason, _, dead_at = _text(flat[i + 3]).partition("\n")
            letters.append(
                DeadLetter(
                    user,
                    _text(flat[i]),
                    _text(flat[i + 1]),
                    bytes(flat[i + 2]),
                    reason,
                    float(dead_at),
                )
            )
        return letters

    async def requeue(self, user: str, ids: Sequence[str], expires_at: float) -> list[str]:
        """Make dead letters pending again with fresh attempts and TTL."""
        if not ids:
            return []
        if self.cluster:
            return await self._split.requeue(user, ids, expires_at)
        done = await self._script("requeue", user, _time(expires_at), *ids)
        return [_text(i) for i in done]

    async def delete_dead(self, user: str, ids: Sequence[str]) -> int:
        """Delete dead letters of ``user``."""
        if not ids:
            return 0
        if self.cluster:
            return await self._split.delete_dead(user, list(dict.fromkeys(ids)))
        return int(await self._script("delete_dead", user, *dict.fromkeys(ids)))

    # -- idempotency keys, revocations --------------------------------------------

    async def idempotent_result(self, client: str, key: str, now: float) -> IdempotentResult | None:
        """What ``client``'s request with ``key`` created, unless unknown or expired."""
        name = f"{self.prefix}{{i:{client}}}:{key}"
        fp, message_id, count, expires = await self._call(
            "HMGET", name, "fp", "id", "n", "e", key=name
        )
        if message_id is None or float(expires) <= now:
            return None
        return IdempotentResult(_text(message_id), int(count), _text(fp))

    async def revoke(self, revocation: Revocation) -> Revocation:
        """Persist a revocation; a user's ``until`` and any ``expires_at`` only grow."""
        until, created, expires = await self._script(
            "revoke",
            revocation.kind,
            revocation.subject,
            "" if revocation.until is None else _time(revocation.until),
            _time(revocation.created_at),
            "" if revocation.expires_at is None else _time(revocation.expires_at),
            key=global_key(self.prefix, "rev"),
        )
        return Revocation(
            revocation.kind,
            revocation.subject,
            _optional(until),
            float(_text(created)),
            _optional(expires),
        )

    async def revocations(self, now: float) -> list[Revocation]:
        """Every revocation not expired at ``now``, oldest first."""
        flat = await self._call(
            "HGETALL", global_key(self.prefix, "rev"), key=global_key(self.prefix, "rev")
        )
        stored = dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, list) else flat
        found = []
        for field, value in stored.items():
            kind, _, subject = _text(field).partition("\n")
            until, created, expires = _text(value).split("\n")
            revocation = Revocation(
                kind, subject, _optional(until), float(created), _optional(expires)
            )
            if revocation.expires_at is None or revocation.expires_at > now:
                found.append(revocation)
        found.sort(key=lambda r: (r.created_at, r.kind, r.subject))
        return found

    # -- room history -------------------------------------------------------------

    async def append(
        self,
        room: str,
        message_type: str,
        encode: Callable[[int, str], bytes],
        retention: HistoryRetention,
    ) -> Appended:
        """Give the publication the room's next offset and store it: one EVALSHA.

        ``encode`` runs once, before the script, with stand-ins for the offset
        and the epoch; the script puts the real ones in their place (the
        frame's bytes around them are sent as they are). A frame in which a
        stand-in is not found exactly once (it wrote them other than as their
        text) is stored at the position it was encoded for instead, read
        first and tried again until no other append came in between.
        """
        now = time.time()
        expires_at = now + retention.ttl
        head: list[Any] = [
            room,
            message_type,
            _time(now),
            _time(expires_at),
            ids.epoch(),
            retention.size,
            _time(expires_at + EPOCH_RETENTION),
        ]
        offset_mark, epoch_mark = str(secrets.randbelow(9 * 10**17) + 10**17), ids.epoch()
        template = encode(int(offset_mark), epoch_mark)
        parts = _split_template(template, offset_mark.encode(), epoch_mark.encode())
        if parts is not None:
            mode, a, b, c = parts
            offset, epoch, *_ = await self._appended(head, mode, a, b, c)
            epoch = _text(epoch)
            o = b"%d" % int(offset)
            e = epoch.encode()
            frame = a + o + b + e + c if mode == "oe" else a + e + b + o + c
            return Appended(int(offset), epoch, frame)
        page = await self.history(room, None, 0)
        epoch, top = page.epoch or _text(head[4]), page.top
        for _ in range(APPEND_TRIES):
            frame = encode(top + 1, epoch)
            reply = await self._appended(head, "cas", frame, "", "", epoch, top)
            if int(reply[0]):
                return Appended(int(reply[0]), epoch, frame)
            epoch, top = _text(reply[1]), int(reply[2])
        raise StoreUnavailable(f"room {room!r}: {APPEND_TRIES} appends came in between")

    async def history(
        self, room: str, since: int | None, limit: int, *, reverse: bool = False
    ) -> HistoryPage:
        """Entries of ``room`` after (or, reversed, before) ``since``, and its position."""
        flat = await self._script(
            "history",
            room,
            "" if since is None else since,
            limit,
            "1" if reverse else "",
            _time(time.time()),
            key=room_key(self.prefix, room, "h"),
        )
        entries = []
        for member in flat[3:]:
            offset, created, _expires, kind, frame = bytes(member).split(b"\n", 4)
            entries.append(HistoryEntry(int(offset), kind.decode(), frame, float(created)))
        return HistoryPage(_text(flat[0]), int(flat[1]), int(flat[2]), entries)

    async def trim_history(self, now: float) -> HistoryStats:
        """Drop expired entries and forgotten epochs, SWEEP_CHUNK rooms per script."""
        if self.cluster:
            return await self._split.trim_history(now)
        for _ in range(SWEEP_STEPS):
            looked, rooms, entries = await self._script("trim_history", _time(now), SWEEP_CHUNK)
            if int(looked) < SWEEP_CHUNK:
                break
        return HistoryStats(int(rooms), int(entries))

    # -- Web Push subscriptions ---------------------------------------------------

    async def add_push_subscription(
        self, subscription: PushSubscription, limit: int
    ) -> SubscribeResult:
        """Store a subscription (its endpoint moves to this user) unless at ``limit``."""
        sub = subscription
        if self.cluster:
            return await self._split.add_push(sub, limit)
        result = _text(
            await self._script(
                "push_add",
                sub.user,
                sub.endpoint,
                sub.p256dh,
                sub.auth,
                _time(sub.created_at),
                limit,
            )
        )
        if result == "created":
            return "created"
        return "updated" if result == "updated" else "limit"

    async def remove_push_subscription(self, user: str, endpoint: str) -> bool:
        """Delete ``user``'s subscription with ``endpoint``."""
        if self.cluster:
            return await self._split.remove_push(user, endpoint)
        return bool(int(await self._script("push_remove", user, endpoint)))

    async def push_subscriptions(self, user: str) -> list[PushSubscription]:
        """``user``'s subscriptions, oldest first (ties by endpoint)."""
        if self.cluster:
            return await self._split.push_list(user)
        flat = await self._script("push_list", user)
        return [
            PushSubscription(
                user, _text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2]), float(flat[i + 3])
            )
            for i in range(0, len(flat), 4)
        ]

    async def count_push_subscriptions(self) -> int:
        """Every user's subscriptions together."""
        count = await self._call(
            "GET", global_key(self.prefix, "push"), key=global_key(self.prefix, "push")
        )
        return 0 if count is None else int(count)

    async def _appended(self, head: list[Any], *rest: Any) -> Any:
        """The append script's reply (on a cluster: SlotSplit.append)."""
        if not self.cluster:
            return await self._script("append", *head, *rest)
        return await self._split.append(head, *rest)


async def _load_scripts(target: _Target) -> None:
    """``SCRIPT LOAD`` every script (at open, and after Redis forgot them)."""
    replies = await _round_trip(
        target, [("SCRIPT", "LOAD", source) for source, _ in SCRIPTS.values()]
    )
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _describe(error: Exception) -> str:
    """An error reply as a message (redis-py's redirections say only slot and address)."""
    if isinstance(error, AskError):  # MovedError is one too
        host, port = error.node_addr
        if isinstance(error, MovedError):
            return f"slot {error.slot_id} moved to {host}:{port} (MOVED)"
        return f"slot {error.slot_id} is being migrated to {host}:{port} (ASK)"
    if isinstance(error, TryAgainError):
        return "a slot is being migrated (TRYAGAIN)"
    return str(error)


def _info(reply: Any) -> dict[str, str]:
    """An ``INFO`` reply's ``name:value`` lines."""
    fields = {}
    for line in _text(reply).splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _probe_keys(client: RedisCluster, prefix: str) -> list[str]:
    """One key per master (``P{g:<n>}:probe``, the first ``n`` whose slot it serves)."""
    keys = []
    for node in client.get_primaries():
        for n in range(100_000):
            key = f"{prefix}{{g:{n}}}:probe"
            try:
                owner = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            except RedisClusterException:
                continue
            if owner.name == node.name:
                keys.append(key)
                break
    return keys


def _split_template(
    template: bytes, offset_mark: bytes, epoch_mark: bytes
) -> tuple[str, bytes, bytes, bytes] | None:
    """``(mode, a, b, c)``: ``template`` around its one offset and one epoch stand-in.

    Mode ``oe``: the offset comes first (``a offset b epoch c``), ``eo``: the
    epoch. None when either is not there exactly once.
    """
    if template.count(offset_mark) != 1 or template.count(epoch_mark) != 1:
        return None
    at_offset, at_epoch = template.index(offset_mark), template.index(epoch_mark)
    if at_offset < at_epoch:
        a, rest = template.split(offset_mark)
        b, c = rest.split(epoch_mark)
        return "oe", a, b, c
    a, rest = template.split(epoch_mark)
    b, c = rest.split(offset_mark)
    return "eo", a, b, c


def _settle(op: _Op, error: BaseException | None, value: Any = None) -> None:
    if op.future.done():
        return
    if error is not None:
        op.future.set_exception(error)
    else:
        op.future.set_result(value)


async def _round_trip(target: _Target, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write on one pooled connection, read every reply.

    ``target``: the one Redis's client or a cluster master (a ClusterNode: its own
    connections, at most ``max_connections``).

    An error reply is returned in its place (a ResponseError); a timeout or a
    lost connection raises, and the connection is closed, so a command Redis
    has not run yet never runs. A reused connection that turns out closed
    before any reply (Redis restarted or killed it while it sat in the pool)
    is replaced and the commands sent once more.
    """
    node = target if isinstance(target, ClusterNode) else None
    pool = None if node is not None else target.connection_pool  # type: ignore[union-attr]
    if node is not None:
        conn = node.acquire_connection()
        await node.disconnect_if_needed(conn)  # marked by a slot map refresh: reconnect
    else:
        conn = await pool.get_connection()  # type: ignore[union-attr]
    packed = b"".join(map(_pack, commands))
    try:
        reused = conn.is_connected
        if reused and await conn.can_read():  # closed by Redis, or stale data
            await conn.disconnect()
            reused = False
        replies: list[Any] = []
        try:
            await conn.send_packed_command(packed, check_health=False)
            replies.append(await _reply(conn))
        except RedisConnectionError:
            if not reused:
                raise
            await conn.disconnect()
            await conn.send_packed_command(packed, check_health=False)
            replies.append(await _reply(conn))
        for _ in commands[1:]:
            replies.append(await _reply(conn))
        return replies
    except BaseException:
        await conn.disconnect()  # replies may still be on the way: never reuse it
        raise
    finally:
        if node is not None:
            node.release(conn)
        else:
            await pool.release(conn)  # type: ignore[union-attr]


async def _reply(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:  # an error reply: this command's result
        return exc


def _pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
