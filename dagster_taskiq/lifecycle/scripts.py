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
"""

from dagster_taskiq.lifecycle.keys import INDEX_TTL_SECONDS

# Shared by every script that ends a task: a finished step wakes the orchestrator that waits on
# its run's wake list (a short, expiring list; one entry is enough).
_WAKE_STEP_WAITERS = """
local function wake_step_waiters(task_key, wake_key)
  if redis.call('HGET', task_key, 'kind') == 'step' then
    redis.call('LPUSH', wake_key, '1')
    redis.call('LTRIM', wake_key, 0, 15)
    redis.call('EXPIRE', wake_key, 3600)
  end
end
"""

# KEYS: task, inflight, due, run index.
# ARGV: now, due_at, record ttl, then field/value pairs of the record.
REGISTER = """
redis.call('DEL', KEYS[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'fence', 0, 'submitted_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local task_id = redis.call('HGET', KEYS[1], 'task_id')
redis.call('ZADD', KEYS[2], ARGV[1], task_id)
redis.call('ZADD', KEYS[3], ARGV[2], task_id)
local field = redis.call('HGET', KEYS[1], 'index_field')
redis.call('HSET', KEYS[4], field, task_id)
redis.call('EXPIRE', KEYS[4], ARGV[3])
return 1
"""

# KEYS: task, due. ARGV: now, due_at, fence seen at send time.
# Record that the broker accepted the task's message (only if nobody claimed it since).
MARK_SENT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'sent_at', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'task_id'))
return 1
"""

# KEYS: task, due. ARGV: worker, instance, now, digest, due_at, prefix of worker keys.
# Returns {result, fence}.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'unknown', 0} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'digest') ~= ARGV[4] then
  return {'mismatch', 0}
end
local take = false
if state == 'queued' then
  take = true
elseif state == 'claimed' then
  local holder = redis.call('HGET', KEYS[1], 'worker')
  local instance = redis.call('HGET', KEYS[1], 'instance')
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
redis.call('ZADD', KEYS[2], ARGV[5], redis.call('HGET', KEYS[1], 'task_id'))
return {'claimed', fence}
"""

# KEYS: task, lease, due. ARGV: fence, now, pid, lease ms, due_at.
START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'fenced:unknown' end
if state ~= 'claimed' or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 'fenced:' .. state
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'heartbeat', ARGV[2],
           'pid', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], redis.call('HGET', KEYS[1], 'task_id'))
return 'running'
"""

# KEYS: task, lease, due, run index. ARGV: fence, now, lease ms, due_at, index ttl.
# A running task's lease is renewed only while it has not lapsed: once it expired, nothing can
# revive it (the task is about to be, or already is, declared lost). A claimed task's claim is
# kept due later. Returns the state, 'expired', or 'fenced:<state>'.
RENEW = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'fenced:unknown' end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 'fenced:' .. state end
local task_id = redis.call('HGET', KEYS[1], 'task_id')
if state == 'claimed' then
  redis.call('ZADD', KEYS[3], ARGV[4], task_id)
  return state
end
if state ~= 'running' and state ~= 'revoking' then return 'fenced:' .. state end
if redis.call('EXISTS', KEYS[2]) == 0 then return 'expired' end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], task_id)
if redis.call('TTL', KEYS[4]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[4], ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return state
"""

# KEYS: task, lease, inflight, due, run index, wake list, result.
# ARGV: fence, now, status, final state, ttl, outcome (serdes), result value (taskiq JSON).
# Only the holder of the current fence can finish a claimed, running or revoking task.
FINISH = _WAKE_STEP_WAITERS + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'fenced:unknown' end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 'fenced:' .. state end
if state ~= 'claimed' and state ~= 'running' and state ~= 'revoking' then
  return 'fenced:' .. state
end
local final = ARGV[4]
if state == 'revoking' and final == 'done' then final = 'revoked' end
redis.call('HSET', KEYS[1], 'state', final, 'finished_at', ARGV[2], 'status', ARGV[3],
           'outcome', ARGV[6])
redis.call('DEL', KEYS[2])
local task_id = redis.call('HGET', KEYS[1], 'task_id')
redis.call('ZREM', KEYS[3], task_id)
redis.call('ZREM', KEYS[4], task_id)
redis.call('EXPIRE', KEYS[1], ARGV[5])
if redis.call('TTL', KEYS[5]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[5], ARGV[5]) end
redis.call('SET', KEYS[7], ARGV[7], 'EX', ARGV[5])
wake_step_waiters(KEYS[1], KEYS[6])
return final
"""

# KEYS: task, inflight, due, wake list. ARGV: now, ttl.
# Queued or claimed: revoked at once (it never starts). Running: revoking (its worker stops the
# process and finishes it). Returns the state it was in.
REVOKE = _WAKE_STEP_WAITERS + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
local live = state == 'queued' or state == 'claimed' or state == 'running'
if live and ARGV[3] and ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'revoke_reason', ARGV[3])
end
local task_id = redis.call('HGET', KEYS[1], 'task_id')
if state == 'queued' or state == 'claimed' then
  redis.call('HSET', KEYS[1], 'state', 'revoked', 'finished_at', ARGV[1], 'status', 'revoked')
  redis.call('ZREM', KEYS[2], task_id)
  redis.call('ZREM', KEYS[3], task_id)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  wake_step_waiters(KEYS[1], KEYS[4])
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'revoking', 'revoked_at', ARGV[1])
end
return state
"""

# KEYS: task, due. ARGV: now, due_at, prefix of worker keys.
# A task claimed by a worker instance that is gone goes back to 'queued', unsent: the caller
# (or, failing that, the next sweep) sends its registered message again. Returns 1 if released.
RELEASE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'claimed' then return 0 end
local holder = redis.call('HGET', KEYS[1], 'worker')
local live = holder and redis.call('HGET', ARGV[3] .. holder, 'instance')
if live and live == redis.call('HGET', KEYS[1], 'instance') then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'requeued_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'worker', 'instance', 'claimed_at', 'sent_at')
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'task_id'))
return 1
"""

# KEYS: task, lease, inflight, due, wake list. ARGV: now, ttl.
# A running (or revoking) task whose lease lapsed is lost. Returns 1 if it was marked.
MARK_LOST = _WAKE_STEP_WAITERS + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'revoking' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'lost', 'finished_at', ARGV[1], 'status', 'lost')
local task_id = redis.call('HGET', KEYS[1], 'task_id')
redis.call('ZREM', KEYS[3], task_id)
redis.call('ZREM', KEYS[4], task_id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
wake_step_waiters(KEYS[1], KEYS[5])
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

# KEYS: worker record, workers index. ARGV: name, instance, ttl ms, then field/value pairs.
# Register (or refresh) a worker's liveness record; refused while another live instance holds
# the name. Returns 1, or 0 when the name is taken.
REGISTER_WORKER = """
local holder = redis.call('HGET', KEYS[1], 'instance')
if holder and holder ~= ARGV[2] then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'instance', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], """ + str(INDEX_TTL_SECONDS) + """)
return 1
"""

# KEYS: worker record, workers index, shutdown key. ARGV: name, instance.
# Remove a worker's record, only if it is still this instance's.
REMOVE_WORKER = """
if redis.call('HGET', KEYS[1], 'instance') == ARGV[2] then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
