"""The broker's Lua scripts, and running them by SHA (loaded once per server, again after a
restart emptied its script cache).

Every script touches keys of one channel only (``<name>``, ``<name>:nodes``, ...), which
share the channel's hash tag, so each runs on the one Redis Cluster node owning that slot.
Times are Redis's clock (``TIME``), so nodes with skewed clocks agree on what has expired.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_PUBLISH = _NOW.join(("""
-- KEYS[1]: the channel, KEYS[2]: its registry of serving nodes (score: expiry, ms)
-- ARGV[1]: the payload. Returns {receivers, nodes serving}: the difference was missed.
local receivers = redis.call('%s', KEYS[1], ARGV[1])
""", """
return {receivers, redis.call('ZCOUNT', KEYS[2], now, '+inf')}
"""))

_REGISTER = """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
"""


_PUBLISH_HISTORY = _NOW.join(("""
-- KEYS[1]: the channel, KEYS[2]: its registry of serving nodes, KEYS[3]: its history stream,
-- KEYS[4]: its position (hash: e = epoch, o = last offset)
-- ARGV[1]: the frame header, ARGV[2]: the packet up to the offset's digits, ARGV[3]: messages
-- kept, ARGV[4]: how long they are kept (ms), ARGV[5]: how long the position is kept (ms),
-- ARGV[6]: the epoch to begin with if the stream has none, ARGV[7]: the publishing node
-- (its id and epoch, hex), ARGV[8]: the frame's sequence from that node.
-- Numbers, keeps, trims and publishes the message in one step: no hole, no duplicate. A
-- replay (a client library re-sending a pipeline whose replies were lost) is not applied
-- again: the position remembers each node's last sequence and the offset it got.
-- Returns {receivers, nodes serving, offset, epoch, 1 if the stream began now}; offset -1:
-- a replay of an earlier frame than the last applied, whose offset is no longer known.
""", """
local epoch = redis.call('HGET', KEYS[4], 'e')
local fresh = 0
if not epoch then
  epoch = ARGV[6]
  fresh = 1
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[4], 'e', epoch, 'o', 0)
else
  local last = redis.call('HGET', KEYS[4], ARGV[7])
  if last then
    local space = string.find(last, ' ')
    local sequence = tonumber(string.sub(last, 1, space - 1))
    if sequence >= tonumber(ARGV[8]) then
      local applied = -1
      if sequence == tonumber(ARGV[8]) then applied = tonumber(string.sub(last, space + 1)) end
      return {0, redis.call('ZCOUNT', KEYS[2], now, '+inf'), applied, epoch, 0}
    end
  end
end
local offset = redis.call('HINCRBY', KEYS[4], 'o', 1)
redis.call('HSET', KEYS[4], ARGV[7], ARGV[8] .. ' ' .. offset)
local packet = ARGV[2] .. offset .. ',"epoch":"' .. epoch .. '"}]'
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], '0-' .. offset, 'f', packet, 't', now)
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
local receivers = redis.call('%s', KEYS[1], ARGV[1] .. offset .. '|' .. packet)
return {receivers, redis.call('ZCOUNT', KEYS[2], now, '+inf'), offset, epoch, fresh}
"""))

HISTORY_READ = _NOW + """
-- KEYS[1]: a history stream, KEYS[2]: its position. ARGV[1]: read offsets above this (-1:
-- all), ARGV[2]: at most this many, ARGV[3]: '1' newest first, ARGV[4]: the epoch to begin
-- with if the stream has none, ARGV[5]: how long a begun position is kept (ms), ARGV[6]:
-- how long messages are kept (ms). Expired entries (older than that, not yet trimmed) are
-- skipped here, so a read of N returns N live ones when there are.
-- Returns {epoch, last offset, now (ms), 1 if the stream began now, entries, 1 if any
-- wanted entry had expired}.
local epoch = redis.call('HGET', KEYS[2], 'e')
local fresh = 0
if not epoch then
  epoch = ARGV[4]
  fresh = 1
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local top = redis.call('HGET', KEYS[2], 'o')
local low = '-'
if tonumber(ARGV[1]) >= 0 then low = '(0-' .. ARGV[1] end
local oldest = now - tonumber(ARGV[6])
local limit = tonumber(ARGV[2])
local entries = {}
local expired = 0
local function live(entry)  -- entry[2] = {'f', packet, 't', ms}
  if tonumber(entry[2][4]) < oldest then
    expired = 1
    return false
  end
  return true
end
if ARGV[3] == '1' then  -- newest first: the expired ones are at the end
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', low, 'COUNT', limit)) do
    if live(entry) then table.insert(entries, entry) end
  end
else  -- oldest first: skip past the expired ones at the start
  while #entries < limit do
    local wanted = limit - #entries
    local batch = redis.call('XRANGE', KEYS[1], low, '+', 'COUNT', wanted)
    for _, entry in ipairs(batch) do
      if live(entry) then table.insert(entries, entry) end
    end
    if #batch < wanted then break end
    low = '(' .. batch[#batch][1]
  end
end
return {epoch, top, now, fresh, entries, expired}
"""


class LuaScript:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


PUBLISH = LuaScript(_PUBLISH % "PUBLISH")
SPUBLISH = LuaScript(_PUBLISH % "SPUBLISH")
PUBLISH_HISTORY = LuaScript(_PUBLISH_HISTORY % "PUBLISH")
SPUBLISH_HISTORY = LuaScript(_PUBLISH_HISTORY % "SPUBLISH")
READ_HISTORY = LuaScript(HISTORY_READ)

REGISTER = LuaScript(_NOW + """
-- KEYS: registries of nodes serving channels (several when they share a server or slot)
-- ARGV[1]: this node's id, ARGV[2]: how long the entry lives without a refresh (ms)
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. now)
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
""")

PRESENCE_BEAT = LuaScript(_NOW + """
-- KEYS[1]: nodes holding presence entries in a channel, KEYS[2]: its presence hash,
-- KEYS[3]: its occupancy hash (if any). ARGV[1]: this node's id, ARGV[2]: ttl (ms).
-- The hashes live as long as a node refreshes.
""" + _REGISTER + """
redis.call('PEXPIRE', KEYS[2], ttl * 2)
redis.call('PEXPIRE', KEYS[3], ttl * 2)
return 1
""")

OCCUPANCY = LuaScript(_NOW + """
-- KEYS[1]: nodes holding presence entries in a channel, KEYS[2]: its occupancy hash
-- (node id -> that node's subscribed connections). ARGV[1]: node id, ARGV[2]: ttl (ms),
-- ARGV[3]: this node's count now. Returns {before, after}: the live nodes' total before and
-- after this write. Dead nodes' counts are dropped (they no longer make it occupied).
local live = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  live[node] = true
end
local fields = redis.call('HGETALL', KEYS[2])
local before, others = 0, 0
for i = 1, #fields, 2 do
  local count = tonumber(fields[i + 1])
  if fields[i] == ARGV[1] then
    before = before + count
  elseif live[fields[i]] then
    before, others = before + count, others + count
  else
    redis.call('HDEL', KEYS[2], fields[i])
  end
end
local mine = tonumber(ARGV[3])
if mine > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], mine)
""" + _REGISTER + """
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return {before, others + mine}
""")

PRESENCE_ADD = LuaScript(_NOW + """
-- KEYS[1]: nodes holding presence entries, KEYS[2]: the presence hash (member -> node..info)
-- ARGV[1]: node id, ARGV[2]: ttl (ms), then pairs: member, node id .. info JSON
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
""" + _REGISTER + """
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return 1
""")

PRESENCE_READ = LuaScript(_NOW + """
-- KEYS[1]: nodes holding presence entries (score: expiry), KEYS[2]: the presence hash
-- ARGV[1]: length of a node id, ARGV[2]: the reader's node id. Returns {member, info, ...}
-- of other live nodes' entries (the reader knows its own) and deletes the entries of nodes
-- that stopped refreshing (they died).
local live = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  live[node] = true
end
local width = tonumber(ARGV[1])
local entries = redis.call('HGETALL', KEYS[2])
local found, dead = {}, {}
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local node = string.sub(value, 1, width)
  if node == ARGV[2] and live[node] then
    -- the reader's own entry: it answers from its own record
  elseif live[node] then
    found[#found + 1] = entries[i]
    found[#found + 1] = string.sub(value, width + 1)
  else
    dead[#dead + 1] = entries[i]
    if #dead == 1000 then
      redis.call('HDEL', KEYS[2], unpack(dead))
      dead = {}
    end
  end
end
if #dead > 0 then redis.call('HDEL', KEYS[2], unpack(dead)) end
return found
""")

PRESENCE_REMOVE = LuaScript("""
-- KEYS[1]: a presence hash, ARGV: members to forget
return redis.call('HDEL', KEYS[1], unpack(ARGV))
""")
PRESENCE_PAIRS = 500
"""Members one PRESENCE_ADD or PRESENCE_REMOVE call carries at most (Lua's unpack limit)."""

Arg = bytes | str | int | float
Call = tuple[LuaScript, Sequence[bytes], Sequence[Arg]]


async def run_script(client: aioredis.Redis, script: LuaScript, keys: Sequence[bytes],
                     args: Sequence[Arg]) -> Any:
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await client.script_load(script.source)
        return await client.evalsha(script.sha, len(keys), *keys, *args)


async def _pipeline(client: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


async def run_pipelined(client: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Run ``calls`` in one pipeline, in order: a result or an exception for each.

    A server that forgot a script (restarted) answers NOSCRIPT to every call of it; those
    are loaded and run again, still in their order.
    """
    results = await _pipeline(client, calls)
    missing = [index for index, result in enumerate(results)
               if isinstance(result, NoScriptError)]
    if missing:
        for script in {calls[index][0].sha: calls[index][0] for index in missing}.values():
            await client.script_load(script.source)
        again = await _pipeline(client, [calls[index] for index in missing])
        for index, result in zip(missing, again, strict=True):
            results[index] = result
    return results


QUEUE_ADD = LuaScript(_NOW + """
-- KEYS[1]: a work queue (sorted set: item -> when it is due, ms). ARGV[1]: the most it may
-- hold; ARGV[2..]: items, due now. Returns how many did not fit.
local refused = 0
for i = 2, #ARGV do
  if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], now, ARGV[i])
  else
    refused = refused + 1
  end
end
return refused
""")

QUEUE_CLAIM = LuaScript(_NOW + """
-- KEYS[1]: a work queue. ARGV[1]: at most this many, ARGV[2]: lease (ms). The due items,
-- oldest first, each due again when its lease ends (unless settled before).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, item in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), item)
end
return due
""")

QUEUE_SETTLE = LuaScript(_NOW + """
-- KEYS[1]: a work queue. ARGV[1]: the item done, ARGV[2]: its retry ('' for none), due
-- after ARGV[3] ms.
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
end
return 1
""")

