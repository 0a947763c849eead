"""The Lua scripts of the Redis store: every write that must be atomic is one script.

A script runs alone in Redis, so each is what a transaction is in the SQLite store: all of
it or (on an error it raises before writing) none of it. Scripts compute the keys they touch
from the store's prefix (``ARGV[1]``), so the store needs one Redis primary (or a Redis
Cluster with the prefix in a hash tag, ``{tether}``, putting every key in one slot).

Conventions shared with :mod:`hub.store.redis_codec`:

- A credential is one field of ``P:cred``: ``rev,revoked,uses,n,expires;`` then a JSON body.
  The header holds what scripts change (revision, revoked flag, uses left) and read
  (expiry), as text, so that no script decodes or re-encodes JSON (Lua's cjson would round
  the timestamps to 14 digits). ``n`` is the revision it was created with (its order),
  empty while that is still its revision.
- Revisions come from ``P:cred:rev``; a Redis that lost its data starts them again from its
  clock in milliseconds, above every revision a hub saw before, so hubs syncing since an
  old revision still see every new change.
- ``P:hist`` holds an agent's heartbeat samples then, after ``\\30``, its sessions: lines of
  JSON, newest first, each list capped.
- Bulk commands are cut in slices of 4,000 arguments: Lua's ``unpack`` stops near 8,000.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["SCRIPTS", "Script"]

PRELUDE = r"""
local p = ARGV[1]
local SLICE = 4000
local function bulk(command, key, items)
  local n = #items
  for i = 1, n, SLICE do
    redis.call(command, key, unpack(items, i, math.min(i + SLICE - 1, n)))
  end
end
local function hmget(key, fields)
  local out = {}
  local n = #fields
  for i = 1, n, SLICE do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, n)))
    for j = 1, #got do out[i + j - 1] = got[j] end
  end
  return out
end
local function keep(text, lines)
  local pos = 0
  for _ = 1, lines do
    pos = string.find(text, '\n', pos + 1, true)
    if not pos then return text end
  end
  return string.sub(text, 1, pos - 1)
end
local function split(value)
  if not value or value == '' then return '', '' end
  local at = string.find(value, '\30', 1, true)
  if at then return string.sub(value, 1, at - 1), string.sub(value, at + 1) end
  return value, ''
end
local function join(samples, sessions)
  if sessions == '' then return samples end
  return samples .. '\30' .. sessions
end
local function cred_parse(value)
  local rev, revoked, uses, n, expires, body =
    string.match(value, '^(%d+),(%d),([^,]*),(%d*),([^;]*);(.*)$')
  return {rev = rev, revoked = revoked, uses = uses, n = n, expires = expires, body = body}
end
local function next_rev()
  local key = p .. ':cred:rev'
  if redis.call('EXISTS', key) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', key, now[1] .. string.format('%03d', math.floor(now[2] / 1000)))
  end
  return redis.call('INCR', key)
end
local function cred_store(id, c, log_max)
  local rev = next_rev()
  -- The creation order: empty while it is the revision itself (a new credential).
  local n = c.n
  if n == nil then n = '' elseif n == '' then n = c.rev end
  redis.call('HSET', p .. ':cred', id, string.format('%d,%s,%s,%s,%s;', rev, c.revoked,
    c.uses, n, c.expires) .. c.body)
  local log = p .. ':cred:log'
  redis.call('ZADD', log, rev, id)
  local excess = redis.call('ZCARD', log) - log_max
  if excess > 0 then
    local gone = redis.call('ZRANGE', log, 0, excess - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', log, 0, excess - 1)
    redis.call('SET', p .. ':cred:floor', gone[#gone])
  end
  return rev
end
"""

#: ARGV: p, job_id, job, running, ncommands, naudit, then per command
#: (id, agent_id, seq, open, value), then the audit entries. A job that exists is left
#: alone (0): the cluster may send a dispatch again after a failover.
ADD_JOB = r"""
local job_id = ARGV[2]
if redis.call('HEXISTS', p .. ':jobs', job_id) == 1 then return 0 end
local ncmd, naudit = tonumber(ARGV[5]), tonumber(ARGV[6])
local jn = redis.call('INCR', p .. ':jobs:n')
redis.call('HSET', p .. ':jobs', job_id, ARGV[3])
redis.call('ZADD', p .. ':jobs:order', jn, job_id)
if ARGV[4] == '1' then redis.call('ZADD', p .. ':jobs:running', jn, job_id) end
if ncmd > 0 then
  local base = redis.call('INCRBY', p .. ':cmds:n', ncmd) - ncmd
  local top = tonumber(redis.call('GET', p .. ':cmds:top') or '0')
  local values, order, open = {}, {}, {}
  local i = 7
  for k = 1, ncmd do
    local id, agent, seq = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local n = base + k
    values[#values + 1] = id
    values[#values + 1] = ARGV[i + 4]
    order[#order + 1] = n
    order[#order + 1] = id
    if ARGV[i + 3] == '1' then
      open[#open + 1] = n
      open[#open + 1] = id
    end
    redis.call('ZADD', p .. ':agent:' .. agent .. ':cmds', n, id)
    if seq > top then top = seq end
    i = i + 5
  end
  bulk('HSET', p .. ':cmds', values)
  bulk('ZADD', p .. ':cmds:order', order)
  bulk('ZADD', p .. ':job:' .. job_id .. ':cmds', order)
  if #open > 0 then bulk('ZADD', p .. ':cmds:open', open) end
  redis.call('SET', p .. ':cmds:top', string.format('%d', top))
end
local first = 7 + 5 * ncmd
for k = 0, naudit - 1 do redis.call('XADD', p .. ':audit', '*', 'e', ARGV[first + k]) end
return 1
"""

#: KEYS: the fence key, when the ledger leader is fenced. ARGV: p, fence token, ncommands,
#: njobs, naudit, then per command (id, open, value), per job (id, running, value), then
#: the audit entries. Commands not stored are skipped (an UPDATE in SQL terms).
SAVE_COMMANDS = r"""
if #KEYS > 0 and redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return redis.error_reply('FENCED not the ledger leader')
end
local ncmd, njobs, naudit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cmds = p .. ':cmds'
local values, closed = {}, {}
local i = 6
for _ = 1, ncmd do
  local id = ARGV[i]
  if redis.call('HEXISTS', cmds, id) == 1 then
    values[#values + 1] = id
    values[#values + 1] = ARGV[i + 2]
    if ARGV[i + 1] == '0' then closed[#closed + 1] = id end
  end
  i = i + 3
end
if #values > 0 then bulk('HSET', cmds, values) end
if #closed > 0 then bulk('ZREM', p .. ':cmds:open', closed) end
for _ = 1, njobs do
  local id = ARGV[i]
  local n = redis.call('ZSCORE', p .. ':jobs:order', id)
  if not n then
    n = redis.call('INCR', p .. ':jobs:n')
    redis.call('ZADD', p .. ':jobs:order', n, id)
  end
  redis.call('HSET', p .. ':jobs', id, ARGV[i + 2])
  if ARGV[i + 1] == '1' then
    redis.call('ZADD', p .. ':jobs:running', n, id)
  else
    redis.call('ZREM', p .. ':jobs:running', id)
  end
  i = i + 3
end
for _ = 1, naudit do
  redis.call('XADD', p .. ':audit', '*', 'e', ARGV[i])
  i = i + 1
end
return 1
"""

#: ARGV: p, log_max, id, uses, revoked, expires, body. Returns the revision.
ADD_CREDENTIAL = r"""
local id = ARGV[3]
if redis.call('HEXISTS', p .. ':cred', id) == 1 then
  return redis.error_reply('EXISTS credential ' .. id)
end
return cred_store(id, {uses = ARGV[4], revoked = ARGV[5], expires = ARGV[6], body = ARGV[7]},
  tonumber(ARGV[2]))
"""

#: ARGV: p, log_max, id, jwt prefix, body of a JWT's revocation. Returns the stored value,
#: or nil for an unknown id (a JWT's id is never unknown: its revocation is stored).
REVOKE_CREDENTIAL = r"""
local id, log_max = ARGV[3], tonumber(ARGV[2])
local key = p .. ':cred'
local value = redis.call('HGET', key, id)
if not value then
  if string.sub(id, 1, #ARGV[4]) ~= ARGV[4] then return false end
  cred_store(id, {uses = '', revoked = '1', expires = '', body = ARGV[5]}, log_max)
  return redis.call('HGET', key, id)
end
local c = cred_parse(value)
if c.revoked == '1' then return value end
c.revoked = '1'
cred_store(id, c, log_max)
return redis.call('HGET', key, id)
"""

#: ARGV: p, ids. Deletes those of the credentials that are revoked (their retention is over)
#: and their change-log entries. Returns how many were deleted.
PURGE_CREDENTIALS = r"""
local key, log = p .. ':cred', p .. ':cred:log'
local deleted = 0
for i = 2, #ARGV do
  local value = redis.call('HGET', key, ARGV[i])
  if value and cred_parse(value).revoked == '1' then
    redis.call('HDEL', key, ARGV[i])
    redis.call('ZREM', log, ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
"""

#: ARGV: p, log_max, key id, agent id, now, issued id, issued uses, issued revoked,
#: issued expires, issued body, nrevoke, ids to revoke. Returns the issued key's revision,
#: or 0 when the enrollment key is unknown, revoked, expired or spent.
ENROLL = r"""
local log_max = tonumber(ARGV[2])
local key_id, agent_id, issued_id = ARGV[3], ARGV[4], ARGV[6]
local creds = p .. ':cred'
local value = redis.call('HGET', creds, key_id)
if not value then return 0 end
local c = cred_parse(value)
if c.revoked == '1' then return 0 end
if c.expires ~= '' and tonumber(c.expires) <= tonumber(ARGV[5]) then return 0 end
local enrolled = p .. ':enrolled:' .. key_id
local known = redis.call('SISMEMBER', enrolled, agent_id) == 1
if not known and c.uses ~= '' and tonumber(c.uses) <= 0 then return 0 end
if redis.call('HEXISTS', creds, issued_id) == 1 then
  return redis.error_reply('EXISTS credential ' .. issued_id)
end
if not known then
  if c.uses ~= '' then
    c.uses = string.format('%d', tonumber(c.uses) - 1)
    cred_store(key_id, c, log_max)
  end
  redis.call('SADD', enrolled, agent_id)
end
for k = 1, tonumber(ARGV[11]) do
  local old = ARGV[11 + k]
  local found = redis.call('HGET', creds, old)
  if found then
    local oc = cred_parse(found)
    if oc.revoked == '0' then
      oc.revoked = '1'
      cred_store(old, oc, log_max)
    end
  end
end
return cred_store(issued_id, {uses = ARGV[7], revoked = ARGV[8], expires = ARGV[9],
  body = ARGV[10]}, log_max)
"""

#: ARGV: p, revision. Returns {0} when the changes since it are no longer all in the log
#: (the caller reads every credential), else {1, id, value, id, value, ...}.
CREDENTIALS_SINCE = r"""
local since = tonumber(ARGV[2])
local floor = tonumber(redis.call('GET', p .. ':cred:floor') or '0')
local current = tonumber(redis.call('GET', p .. ':cred:rev') or '0')
if since < floor or since > current then return {0} end
local ids = redis.call('ZRANGEBYSCORE', p .. ':cred:log', '(' .. ARGV[2], '+inf')
local values = hmget(p .. ':cred', ids)
local out = {1}
for k = 1, #ids do
  out[#out + 1] = ids[k]
  out[#out + 1] = values[k]
end
return out
"""

#: ARGV: p, id, open, value.
SAVE_ALERT = r"""
local id = ARGV[2]
local n = redis.call('ZSCORE', p .. ':alerts:order', id)
if not n then
  n = redis.call('INCR', p .. ':alerts:n')
  redis.call('ZADD', p .. ':alerts:order', n, id)
end
redis.call('HSET', p .. ':alerts', id, ARGV[4])
if ARGV[3] == '1' then
  redis.call('ZADD', p .. ':alerts:open', n, id)
else
  redis.call('ZREM', p .. ':alerts:open', id)
end
return 1
"""

#: ARGV: p, samples kept, then (agent id, sample line) pairs; a line starts ``[<ms>,``.
#: A sample with the time of the newest one already kept is a repeat and is skipped.
SAMPLES = r"""
local kept = tonumber(ARGV[2])
local key = p .. ':hist'
local agents, lines = {}, {}
for i = 3, #ARGV, 2 do
  agents[#agents + 1] = ARGV[i]
  lines[#lines + 1] = ARGV[i + 1]
end
local old = hmget(key, agents)
local out = {}
for k = 1, #agents do
  local samples, sessions = split(old[k])
  local line = lines[k]
  if string.match(samples, '^%[(%-?%d+),') ~= string.match(line, '^%[(%-?%d+),') then
    if samples ~= '' then line = keep(line .. '\n' .. samples, kept) end
    out[#out + 1] = agents[k]
    out[#out + 1] = join(line, sessions)
  end
end
if #out > 0 then bulk('HSET', key, out) end
return #out / 2
"""

#: ARGV: p, sessions kept, open tail, then (kind, agent id, line prefix, payload) per
#: change, in the order made. ``o`` adds the payload line (once); ``c`` closes the open line
#: with that prefix: its open tail (``,null,null,null]``) becomes the payload.
SESSIONS = r"""
local kept, tail = tonumber(ARGV[2]), ARGV[3]
local key = p .. ':hist'
local agents, index = {}, {}
for i = 4, #ARGV, 4 do
  local agent = ARGV[i + 1]
  if not index[agent] then
    agents[#agents + 1] = agent
    index[agent] = #agents
  end
end
local old = hmget(key, agents)
local samples, sessions = {}, {}
for k = 1, #agents do samples[k], sessions[k] = split(old[k]) end
local changed = {}
for i = 4, #ARGV, 4 do
  local kind, k, prefix, payload = ARGV[i], index[ARGV[i + 1]], ARGV[i + 2], ARGV[i + 3]
  local text = sessions[k]
  local found = false
  local out = {}
  for line in string.gmatch(text, '[^\n]+') do
    if not found and string.sub(line, 1, #prefix) == prefix then
      found = true
      if kind == 'c' and string.sub(line, -#tail) == tail then
        line = string.sub(line, 1, #line - #tail) .. payload
        changed[k] = true
      end
    end
    out[#out + 1] = line
  end
  if kind == 'c' then
    sessions[k] = table.concat(out, '\n')
  elseif not found then
    sessions[k] = keep(text == '' and payload or (payload .. '\n' .. text), kept)
    changed[k] = true
  end
end
local values = {}
for k = 1, #agents do
  if changed[k] then
    values[#values + 1] = agents[k]
    values[#values + 1] = join(samples[k], sessions[k])
  end
end
if #values > 0 then bulk('HSET', key, values) end
return #values / 2
"""

#: ARGV: p, then audit entries: appended together or not at all.
AUDIT = r"""
for i = 2, #ARGV do redis.call('XADD', p .. ':audit', '*', 'e', ARGV[i]) end
return #ARGV - 1
"""

#: ARGV: p, retention in seconds. Trims the audit stream by Redis's own clock.
TRIM_AUDIT = r"""
local now = redis.call('TIME')
local oldest = (tonumber(now[1]) - tonumber(ARGV[2])) * 1000
if oldest <= 0 then return 0 end
return redis.call('XTRIM', p .. ':audit', 'MINID', string.format('%.0f', oldest))
"""


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


def _script(name: str, body: str) -> Script:
    return Script(name, PRELUDE + body)


SCRIPTS: dict[str, Script] = {
    script.name: script
    for script in (
        _script("add_job", ADD_JOB),
        _script("save_commands", SAVE_COMMANDS),
        _script("add_credential", ADD_CREDENTIAL),
        _script("revoke_credential", REVOKE_CREDENTIAL),
        _script("purge_credentials", PURGE_CREDENTIALS),
        _script("enroll", ENROLL),
        _script("credentials_since", CREDENTIALS_SINCE),
        _script("save_alert", SAVE_ALERT),
        _script("samples", SAMPLES),
        _script("sessions", SESSIONS),
        _script("audit", AUDIT),
        _script("trim_audit", TRIM_AUDIT),
    )
}
