"""The Lua scripts behind every task transition.

Each transition that can race is one script, so it is atomic on the Redis server. Conventions:

* ``now`` is passed in by the caller (seconds since the epoch, as text).
* A claim increments the task's ``fence`` and returns it. ``start``, ``renew`` and ``finish``
  only act when the caller's fence equals the stored one; otherwise they return
  ``fenced:<state>`` and change nothing, so a worker whose claim was taken over can never touch
  the task again.
* Holder liveness is the field ``instance`` of the holder's worker record: a worker name reused
  by a new process is a different instance, so it does not keep its predecessor's claims alive.
* Every record carries a TTL at all times; indexes (``inflight``, ``due``) are sorted sets that
  Redis deletes when they empty.
* Scripts read a record's fields with one ``HMGET`` and write them with one ``HSET``: Redis
  counts (and pays for) every command a script runs, so the per-step and per-heartbeat cost is
  kept to a handful of commands.
"""

from dagster_taskiq.lifecycle.keys import INDEX_TTL_SECONDS

# Shared by every script that ends a task: a finished step wakes the orchestrator that waits on
# its run's wake list (a short list, one entry is enough; it gets its TTL when it is created, and
# the orchestrator drains it on every wake-up).
_WAKE_STEP_WAITERS = """
local function wake_step_waiters(kind, wake_key)
  if kind == 'step' then
    local length = redis.call('LPUSH', wake_key, '1')
    if length == 1 then
      redis.call('EXPIRE', wake_key, 3600)
    elseif length > 16 then
      redis.call('LTRIM', wake_key, 0, 15)
    end
  end
end
"""

# KEYS: task, inflight, due, run index.
# ARGV: now, due_at, record ttl, task id, run index field, then field/value pairs of the record.
REGISTER = """
redis.call('DEL', KEYS[1])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
for _, v in ipairs({'state', 'queued', 'fence', '0', 'submitted_at', ARGV[1]}) do
  fields[#fields + 1] = v
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return 1
"""

# KEYS: task, due. ARGV: now, due_at, fence seen at send time.
# Record that the broker accepted the task's message (only if nobody claimed it since).
MARK_SENT = """
local r = redis.call('HMGET', KEYS[1], 'state', 'fence', 'task_id')
if r[1] ~= 'queued' or r[2] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'sent_at', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], r[3])
return 1
"""

# KEYS: task, due. ARGV: worker, instance, now, digest, due_at, prefix of worker keys.
# Returns {result, fence}.
CLAIM = """
local r = redis.call('HMGET', KEYS[1], 'state', 'digest', 'worker', 'instance', 'task_id')
local state = r[1]
if not state then return {'unknown', 0} end
if ARGV[4] ~= '' and r[2] ~= ARGV[4] then
  return {'mismatch', 0}
end
local take = false
if state == 'queued' then
  take = true
elseif state == 'claimed' then
  local holder, instance = r[3], r[4]
  local live = holder and redis.call('HGET', ARGV[6] .. holder, 'instance')
  if not live or live ~= instance then take = true end
elseif state == 'revoked' or state == 'revoking' then
  return {'revoked', 0}
end
if not take then return {'duplicate', 0} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'state', 'claimed', 'worker', ARGV[1], 'instance', ARGV[2],
           'claimed_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('ZADD', KEYS[2], ARGV[5], r[5])
return {'claimed', fence}
"""

# KEYS: task, lease, due. ARGV: fence, now, pid, lease ms, due_at.
START = """
local r = redis.call('HMGET', KEYS[1], 'state', 'fence', 'task_id')
local state = r[1]
if not state then return 'fenced:unknown' end
if state ~= 'claimed' or r[2] ~= ARGV[1] then
  return 'fenced:' .. state
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'heartbeat', ARGV[2],
           'pid', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], r[3])
return 'running'
"""

# KEYS: task, lease, due, run index. ARGV: fence, now, lease ms, due_at, record ttl.
# A running task's lease is renewed only while it has not lapsed (``SET .. XX``): once it expired,
# nothing can revive it (the task is about to be, or already is, declared lost). A claimed task's
# claim is kept due later. Once less than half of the record's TTL is left, the record and its
# run index get the full TTL again (the run index never has less than the record: both got the
# same TTL at registration, and later registrations only extend the index). Returns the state,
# 'expired', or 'fenced:<state>'.
RENEW = """
local r = redis.call('HMGET', KEYS[1], 'state', 'fence', 'task_id')
local state = r[1]
if not state then return 'fenced:unknown' end
if r[2] ~= ARGV[1] then return 'fenced:' .. state end
local task_id = r[3]
if state == 'claimed' then
  redis.call('ZADD', KEYS[3], ARGV[4], task_id)
  return state
end
if state ~= 'running' and state ~= 'revoking' then return 'fenced:' .. state end
if not redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3], 'XX') then return 'expired' end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], task_id)
local ttl = tonumber(ARGV[5])
if redis.call('TTL', KEYS[1]) * 2 < ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
  if redis.call('TTL', KEYS[4]) < ttl then redis.call('EXPIRE', KEYS[4], ttl) end
end
return state
"""

# KEYS: task, lease, inflight, due, run index, wake list, result.
# ARGV: fence, now, status, final state, ttl, outcome (serdes), result value (taskiq JSON).
# Only the holder of the current fence can finish a claimed, running or revoking task.
FINISH = _WAKE_STEP_WAITERS + """
local r = redis.call('HMGET', KEYS[1], 'state', 'fence', 'task_id', 'kind')
local state = r[1]
if not state then return 'fenced:unknown' end
if r[2] ~= ARGV[1] then return 'fenced:' .. state end
if state ~= 'claimed' and state ~= 'running' and state ~= 'revoking' then
  return 'fenced:' .. state
end
local final = ARGV[4]
if state == 'revoking' and final == 'done' then final = 'revoked' end
redis.call('HSET', KEYS[1], 'state', final, 'finished_at', ARGV[2], 'status', ARGV[3],
           'outcome', ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], r[3])
redis.call('ZREM', KEYS[4], r[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if redis.call('TTL', KEYS[5]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[5], ARGV[5]) end
redis.call('SET', KEYS[7], ARGV[7], 'EX', ARGV[5])
wake_step_waiters(r[4], KEYS[6])
return final
"""

# KEYS: task, inflight, due, wake list. ARGV: now, ttl, reason, prefix of revocation lists.
# Queued or claimed: revoked at once (it never starts). Running: revoking (its worker stops the
# process and finishes it); the task id is pushed to its worker's revocation list, which the
# worker reads on its next heartbeat. Returns the state it was in.
REVOKE = _WAKE_STEP_WAITERS + """
local r = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'kind', 'worker')
local state = r[1]
if not state then return 'unknown' end
local live = state == 'queued' or state == 'claimed' or state == 'running'
if live and ARGV[3] and ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'revoke_reason', ARGV[3])
end
if state == 'queued' or state == 'claimed' then
  redis.call('HSET', KEYS[1], 'state', 'revoked', 'finished_at', ARGV[1], 'status', 'revoked')
  redis.call('ZREM', KEYS[2], r[2])
  redis.call('ZREM', KEYS[3], r[2])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  wake_step_waiters(r[3], KEYS[4])
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'revoking', 'revoked_at', ARGV[1])
  if r[4] and ARGV[4] then
    local notices = ARGV[4] .. r[4]
    redis.call('RPUSH', notices, r[2])
    redis.call('LTRIM', notices, -1000, -1)
    redis.call('EXPIRE', notices, 3600)
  end
end
return state
"""

# KEYS: task, due. ARGV: now, due_at, prefix of worker keys.
# A task claimed by a worker instance that is gone goes back to 'queued', unsent: the caller
# (or, failing that, the next sweep) sends its registered message again. Returns 1 if released.
RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'state', 'worker', 'instance', 'task_id')
if r[1] ~= 'claimed' then return 0 end
local holder = r[2]
local live = holder and redis.call('HGET', ARGV[3] .. holder, 'instance')
if live and live == r[3] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'requeued_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'worker', 'instance', 'claimed_at', 'sent_at')
redis.call('ZADD', KEYS[2], ARGV[2], r[4])
return 1
"""

# KEYS: task, lease, inflight, due, wake list. ARGV: now, ttl.
# A running (or revoking) task whose lease lapsed is lost. Returns 1 if it was marked.
MARK_LOST = _WAKE_STEP_WAITERS + """
local r = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'kind')
local state = r[1]
if state ~= 'running' and state ~= 'revoking' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'lost', 'finished_at', ARGV[1], 'status', 'lost')
redis.call('ZREM', KEYS[3], r[2])
redis.call('ZREM', KEYS[4], r[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
wake_step_waiters(r[3], KEYS[5])
return 1
"""

# KEYS: due. ARGV: now, limit, look again after (seconds).
# Take up to ``limit`` tasks that are due and push them back by the given delay, so that
# concurrent sweepers do not take the same task at once.
TAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local later = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], later, id) end
return ids
"""

# KEYS: worker record, workers index, shutdown key, revocation list.
# ARGV: name, instance, ttl ms, '1' to refresh the index's TTL, then field/value pairs.
# Register (or refresh) a worker's liveness record; refused while another live instance holds
# the name. The name is added to the index (and the index's TTL renewed) when the record is new
# and when the caller asks (it does so about once a minute), not on every beat. Returns {1, or 0
# when the name is taken; whether a shutdown was requested; ids of this worker's tasks revoked
# since the last beat}.
REGISTER_WORKER = """
local shutdown = redis.call('EXISTS', KEYS[3])
local holder = redis.call('HGET', KEYS[1], 'instance')
if holder and holder ~= ARGV[2] then return {0, shutdown, {}} end
local revoked = redis.call('LRANGE', KEYS[4], 0, -1)
if #revoked > 0 then redis.call('DEL', KEYS[4]) end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'instance'
fields[#fields + 1] = ARGV[2]
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- A record that lived on since the last beat means the name is in the index already (it is
-- pruned only of names whose record is gone); the index itself lives days past the last refresh.
if not holder or ARGV[4] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], """ + str(INDEX_TTL_SECONDS) + """)
end
return {1, shutdown, revoked}
"""

# KEYS: worker record, workers index, shutdown key, revocation list. ARGV: name, instance.
# Remove a worker's record, only if it is still this instance's.
REMOVE_WORKER = """
if redis.call('HGET', KEYS[1], 'instance') == ARGV[2] then
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
