"""The heartbeat, claim and revocation key store, kept in Redis.

taskiq only knows whether a result exists. This module adds what Dagster needs to supervise work:

* a **task record** per task (``queued`` → ``claimed`` → ``running`` → ``done``, or ``revoked`` /
  ``lost``) holding the queue, priority, the worker that claimed it and the original message;
* a **heartbeat key** per running task whose TTL is the executor's ``heartbeat_timeout``;
* a **liveness record** per worker, refreshed every heartbeat interval;
* **revocation**: a state change that a claim refuses and that the worker's heartbeat loop acts on;
* a **dead-letter list** for messages a worker refused to run.

All state changes that race are single Lua scripts, so claims are exactly-once.
"""

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

QUEUED = "queued"
CLAIMED = "claimed"
RUNNING = "running"
DONE = "done"
REVOKED = "revoked"
REVOKING = "revoking"
LOST = "lost"
#: States in which a task still needs a worker or is held by one.
ACTIVE_STATES = frozenset({QUEUED, CLAIMED, RUNNING, REVOKING})

# KEYS[1] task hash, KEYS[2] prefix of worker keys. ARGV: worker, now.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'claimed', 'worker', ARGV[1], 'claimed_at', ARGV[2])
  return 'claimed'
end
if state == 'claimed' then
  local holder = redis.call('HGET', KEYS[1], 'worker')
  if holder == ARGV[1] or redis.call('EXISTS', KEYS[2] .. holder) == 0 then
    redis.call('HSET', KEYS[1], 'state', 'claimed', 'worker', ARGV[1], 'claimed_at', ARGV[2])
    return 'claimed'
  end
end
if state == 'revoked' or state == 'revoking' then return 'revoked' end
return 'duplicate:' .. state
"""

# KEYS[1] task hash, KEYS[2] heartbeat key. ARGV: worker, now, pid, ttl_ms.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
local holder = redis.call('HGET', KEYS[1], 'worker')
if state ~= 'claimed' or holder ~= ARGV[1] then return state or 'unknown' end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'heartbeat', ARGV[2],
           'pid', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 'running'
"""

# KEYS[1] task hash, KEYS[2] in-flight zset. ARGV: task id, now.
_REVOKE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
if state == 'queued' or state == 'claimed' then
  redis.call('HSET', KEYS[1], 'state', 'revoked', 'finished_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return state
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'revoking', 'revoked_at', ARGV[2])
end
return state
"""

# KEYS[1] task hash, KEYS[2] heartbeat key, KEYS[3] in-flight zset.
# ARGV: task id, now, status, ttl seconds, final state, prefix of run wake-up lists,
# prefix of run index hashes.
# A finished step task also wakes its run's orchestrator (see KeyStore.wait_run_wake), and the
# run's index lives on for ``ttl`` seconds after its latest task ends.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', ARGV[2], 'status', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local kind, run_id = unpack(redis.call('HMGET', KEYS[1], 'kind', 'run_id'))
if ARGV[7] and run_id then redis.call('EXPIRE', ARGV[7] .. run_id, ARGV[4]) end
if ARGV[6] and kind == 'step' and run_id then
  local wake = ARGV[6] .. run_id
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, 15)
  redis.call('EXPIRE', wake, 3600)
end
return 1
"""

# KEYS[1] task hash, KEYS[2] heartbeat key.
# ARGV: worker, heartbeat ttl ms, now, prefix of run index hashes, index ttl seconds.
# Refresh a running task's heartbeat, only while this worker runs it (never after it finished or
# was declared lost), and keep its run's index alive however long the step runs (the index TTL
# exceeds result_ttl by the lease, so a late heartbeat never lets it lapse). Returns state.
_BEAT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
if (state == 'running' or state == 'revoking')
   and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[1], 'heartbeat', ARGV[3])
  local run_id = redis.call('HGET', KEYS[1], 'run_id')
  if run_id then redis.call('EXPIRE', ARGV[4] .. run_id, ARGV[5]) end
end
return state
"""

# KEYS[1] task hash, KEYS[2] prefix of worker keys. ARGV: now.
# Put a task claimed by a dead worker back to 'queued'; return its message.
_RELEASE_ORPHAN = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'claimed' then return false end
local holder = redis.call('HGET', KEYS[1], 'worker')
if holder and redis.call('EXISTS', KEYS[2] .. holder) == 1 then return false end
redis.call('HSET', KEYS[1], 'state', 'queued', 'requeued_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'worker', 'claimed_at')
return redis.call('HGET', KEYS[1], 'message')
"""

# KEYS[1] task hash. ARGV: placeholder holder name, now.
# Undo a release whose resend failed: mark the task claimed by a holder that never exists, so the
# next orphan scan or health check releases and sends it again.
_UNRELEASE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'worker', ARGV[1], 'claimed_at', ARGV[2])
return 1
"""

# KEYS[1] task hash, KEYS[2] heartbeat key, KEYS[3] in-flight zset. ARGV: task id, now, ttl.
_MARK_LOST = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'revoking' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'lost', 'finished_at', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """A task as the key store sees it."""

    task_id: str
    kind: str
    run_id: str
    step_key: str | None
    queue: str
    priority: int
    state: str
    worker: str | None
    submitted_at: float
    claimed_at: float | None
    started_at: float | None
    finished_at: float | None
    last_heartbeat: float | None
    heartbeat_timeout: float
    status: str | None
    pid: int | None
    heartbeat_alive: bool

    @property
    def is_active(self) -> bool:
        """Whether the task still waits for, or is held by, a worker."""
        return self.state in ACTIVE_STATES

    def describe(self) -> str:
        """One line naming the task, its run and step, queue and state."""
        what = f"step '{self.step_key}'" if self.step_key else "run"
        holder = f" on worker {self.worker}" if self.worker else ""
        return (
            f"task {self.task_id} ({what} of run {self.run_id}, queue '{self.queue}') is "
            f"{self.state}{holder}"
        )


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker's liveness record."""

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    running: tuple[str, ...]
    started_at: float
    last_heartbeat: float

    def as_mapping(self) -> dict[str, str]:
        """The record as Redis hash fields."""
        return {
            "name": self.name,
            "host": self.host,
            "pid": str(self.pid),
            "queues": json.dumps(list(self.queues)),
            "concurrency": str(self.concurrency),
            "running": json.dumps(list(self.running)),
            "started_at": repr(self.started_at),
            "last_heartbeat": repr(self.last_heartbeat),
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, str]) -> "WorkerInfo":
        """Parse the Redis hash written by :meth:`as_mapping`."""
        return cls(
            name=data["name"],
            host=data.get("host", "?"),
            pid=int(data.get("pid", "0")),
            queues=tuple(json.loads(data.get("queues", "[]"))),
            concurrency=int(data.get("concurrency", "0")),
            running=tuple(json.loads(data.get("running", "[]"))),
            started_at=float(data.get("started_at", "0")),
            last_heartbeat=float(data.get("last_heartbeat", "0")),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class KeyStore:
    """Async access to the key store. One instance per event loop (it owns a Redis client)."""

    def __init__(self, redis: Redis, prefix: str, result_ttl: int = 86400) -> None:
        self.redis = redis
        self.prefix = prefix
        self.result_ttl = result_ttl
        self._claim = redis.register_script(_CLAIM)
        self._start = redis.register_script(_START)
        self._revoke = redis.register_script(_REVOKE)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE_ORPHAN)
        self._mark_lost = redis.register_script(_MARK_LOST)
        self._beat = redis.register_script(_BEAT)
        self._unrelease = redis.register_script(_UNRELEASE)

    # -- key names -------------------------------------------------------------------------
    def task_key(self, task_id: str) -> str:
        """Hash holding a task's record."""
        return f"{self.prefix}:task:{task_id}"

    def heartbeat_key(self, task_id: str) -> str:
        """Key whose TTL says a running task is alive."""
        return f"{self.prefix}:hb:{task_id}"

    def worker_key(self, name: str) -> str:
        """Hash holding a worker's liveness record (it expires when the worker dies)."""
        return f"{self.prefix}:worker:{name}"

    @property
    def inflight_key(self) -> str:
        """Sorted set of unfinished task ids, scored by submit time."""
        return f"{self.prefix}:inflight"

    @property
    def workers_key(self) -> str:
        """Set of worker names ever registered (pruned when listed)."""
        return f"{self.prefix}:workers"

    @property
    def dead_letter_key(self) -> str:
        """List of messages that workers refused to run."""
        return f"{self.prefix}:dead_letter"

    def run_index_key(self, run_id: str) -> str:
        """Hash of a run's tasks: step key (or ``__run__``) to the latest task id."""
        return f"{self.prefix}:run:{run_id}"

    def run_wake_key(self, run_id: str) -> str:
        """List a worker pushes to when one of the run's step tasks finishes."""
        return f"{self.prefix}:wake:{run_id}"

    def shutdown_key(self, name: str) -> str:
        """Key that asks worker ``name`` to shut down gracefully."""
        return f"{self.prefix}:shutdown:{name}"

    # -- tasks -----------------------------------------------------------------------------
    async def register(
        self,
        *,
        task_id: str,
        kind: str,
        run_id: str,
        step_key: str | None,
        queue: str,
        priority: int,
        heartbeat_timeout: float,
        message: bytes,
    ) -> None:
        """Record a task as ``queued`` before it is sent, and index it by run and step."""
        now = time.time()
        fields: dict[str | bytes, Any] = {
            "task_id": task_id,
            "kind": kind,
            "run_id": run_id,
            "step_key": step_key or "",
            "queue": queue,
            "priority": priority,
            "state": QUEUED,
            "submitted_at": repr(now),
            "heartbeat_timeout": repr(heartbeat_timeout),
            "message": message,
        }
        index = self.run_index_key(run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.task_key(task_id), mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(self.inflight_key, {task_id: now})
            pipe.hset(index, step_key or "__run__", task_id)
            pipe.expire(index, self.result_ttl)
            await pipe.execute()

    async def claim(self, task_id: str, worker: str) -> str:
        """Claim a task for ``worker``.

        Returns ``claimed``, ``revoked``, ``unknown`` (no record) or ``duplicate:<state>``.
        """
        result = await self._claim(
            keys=[self.task_key(task_id), self.worker_key("")], args=[worker, repr(time.time())]
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    async def start(self, task_id: str, worker: str, pid: int, heartbeat_timeout: float) -> str:
        """Mark a claimed task ``running`` in process ``pid`` and start its heartbeat key."""
        result = await self._start(
            keys=[self.task_key(task_id), self.heartbeat_key(task_id)],
            args=[worker, repr(time.time()), pid, int(heartbeat_timeout * 1000)],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    async def finish(self, task_id: str, status: str, state: str = DONE) -> None:
        """Mark a task finished (``done`` or ``revoked``), drop its heartbeat, start its expiry."""
        wake_prefix = self.run_wake_key("")
        await self._finish(
            keys=[self.task_key(task_id), self.heartbeat_key(task_id), self.inflight_key],
            args=[
                task_id,
                repr(time.time()),
                status,
                self.result_ttl,
                state,
                wake_prefix,
                self.run_index_key(""),
            ],
        )

    async def wake_run(self, run_id: str) -> None:
        """Wake the run's orchestrator now (a step's outcome is in the event log)."""
        key = self.run_wake_key(run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(key, "1")
            pipe.ltrim(key, 0, 15)
            pipe.expire(key, 3600)
            await pipe.execute()

    async def wait_run_wake(self, run_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a step task of ``run_id`` to finish; True if one did.

        All pending wake-ups are consumed at once: whoever is woken reads everything that
        happened since (the finished steps' events are written before their task finishes).
        """
        key = self.run_wake_key(run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.blpop([key], timeout=timeout)
            pipe.delete(key)
            popped, _ = await pipe.execute()
        return popped is not None

    async def revoke(self, task_id: str) -> str:
        """Revoke a task. Returns the state it was in (``unknown`` if there is no record).

        A queued or claimed task becomes ``revoked`` and will never start; a running one becomes
        ``revoking`` and its worker kills the process on its next heartbeat.
        """
        result = await self._revoke(
            keys=[self.task_key(task_id), self.inflight_key],
            args=[task_id, repr(time.time())],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    async def mark_lost(self, task_id: str) -> bool:
        """Mark a running task whose heartbeat key has expired as ``lost``."""
        result = await self._mark_lost(
            keys=[self.task_key(task_id), self.heartbeat_key(task_id), self.inflight_key],
            args=[task_id, repr(time.time()), self.result_ttl],
        )
        return bool(result)

    async def release_orphan(self, task_id: str) -> bytes | None:
        """If ``task_id`` was claimed by a dead worker, put it back to ``queued``.

        Returns the original message to send again, or None when nothing was released.
        """
        result = await self._release(
            keys=[self.task_key(task_id), self.worker_key("")], args=[repr(time.time())]
        )
        return result if isinstance(result, bytes) else None

    async def unrelease(self, task_id: str) -> bool:
        """After a failed resend, leave the task as an orphan again for the next scan."""
        result = await self._unrelease(
            keys=[self.task_key(task_id)], args=["(resend failed)", repr(time.time())]
        )
        return bool(result)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record, or None if there is none (never submitted, or expired)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.task_key(task_id))
            pipe.exists(self.heartbeat_key(task_id))
            raw, alive = await pipe.execute()
        if not raw:
            return None
        return self._record(task_id, raw, bool(alive))

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """Records of several tasks (missing ones are left out)."""
        if not task_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.task_key(task_id))
                pipe.exists(self.heartbeat_key(task_id))
            raw = await pipe.execute()
        records = []
        for i, task_id in enumerate(task_ids):
            if raw[2 * i]:
                records.append(self._record(task_id, raw[2 * i], bool(raw[2 * i + 1])))
        return records

    async def message(self, task_id: str) -> bytes | None:
        """The original broker message of a task, as recorded at submit time."""
        value = await self.redis.hget(self.task_key(task_id), "message")
        return value if isinstance(value, bytes) else None

    def _record(self, task_id: str, raw: Mapping[bytes, bytes], alive: bool) -> TaskRecord:
        data = {k.decode(): v.decode(errors="replace") for k, v in raw.items() if k != b"message"}
        return TaskRecord(
            task_id=task_id,
            kind=data.get("kind", "?"),
            run_id=data.get("run_id", ""),
            step_key=data.get("step_key") or None,
            queue=data.get("queue", ""),
            priority=int(data.get("priority", "0")),
            state=data.get("state", "unknown"),
            worker=data.get("worker") or None,
            submitted_at=float(data.get("submitted_at", "0")),
            claimed_at=_opt_float(data.get("claimed_at")),
            started_at=_opt_float(data.get("started_at")),
            finished_at=_opt_float(data.get("finished_at")),
            last_heartbeat=_opt_float(data.get("heartbeat")),
            heartbeat_timeout=float(data.get("heartbeat_timeout", "30")),
            status=data.get("status") or None,
            pid=int(data["pid"]) if data.get("pid") else None,
            heartbeat_alive=alive,
        )

    async def run_tasks(self, run_id: str) -> dict[str, str]:
        """Latest task id per step key (``__run__`` for the run task) of a run."""
        raw = await self.redis.hgetall(self.run_index_key(run_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def step_task_id(self, run_id: str, step_key: str) -> str | None:
        """The latest task id submitted for a step of a run."""
        value = await self.redis.hget(self.run_index_key(run_id), step_key)
        return _text(value) if value else None

    async def inflight_ids(self, limit: int = 10_000) -> list[str]:
        """Ids of unfinished tasks, oldest first."""
        raw = await self.redis.zrange(self.inflight_key, 0, limit - 1)
        return [_text(v) for v in raw]

    # -- workers ---------------------------------------------------------------------------
    async def heartbeat(
        self, info: WorkerInfo, liveness_ttl: float, running: Mapping[str, float]
    ) -> dict[str, str]:
        """Refresh a worker's liveness and the heartbeat keys of its running tasks.

        ``running`` maps task id to that task's heartbeat timeout. Returns each running task's
        current state, so the worker can act on revocation.
        """
        now = repr(info.last_heartbeat)
        ids = list(running)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.worker_key(info.name), mapping=dict(info.as_mapping()))  # type: ignore[arg-type]
            pipe.pexpire(self.worker_key(info.name), int(liveness_ttl * 1000))
            pipe.sadd(self.workers_key, info.name)
            pipe.exists(self.shutdown_key(info.name))
            for task_id in ids:
                await self._beat(
                    keys=[self.task_key(task_id), self.heartbeat_key(task_id)],
                    args=[
                        info.name,
                        int(running[task_id] * 1000),
                        now,
                        self.run_index_key(""),
                        # Outlives a gap in heartbeats as long as the lease itself.
                        self.result_ttl + int(running[task_id]) + 1,
                    ],
                    client=pipe,
                )
            results = await pipe.execute()
        states = {"__shutdown__": "1" if results[3] else ""}
        for i, task_id in enumerate(ids):
            states[task_id] = _text(results[4 + i])
        return states

    async def remove_worker(self, name: str) -> None:
        """Delete a worker's liveness record (on clean shutdown)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.worker_key(name), self.shutdown_key(name))
            pipe.srem(self.workers_key, name)
            await pipe.execute()

    async def worker_alive(self, name: str) -> bool:
        """Whether worker ``name`` has a live liveness record."""
        return bool(await self.redis.exists(self.worker_key(name)))

    async def get_worker(self, name: str) -> WorkerInfo | None:
        """A live worker's record."""
        raw = await self.redis.hgetall(self.worker_key(name))
        if not raw:
            return None
        return WorkerInfo.from_mapping({_text(k): _text(v) for k, v in raw.items()})

    async def list_workers(self) -> list[WorkerInfo]:
        """Live workers, sorted by name; names of dead ones are pruned from the index."""
        names = sorted(_text(v) for v in await self.redis.smembers(self.workers_key))
        workers = []
        for name in names:
            info = await self.get_worker(name)
            if info is None:
                await self.redis.srem(self.workers_key, name)
            else:
                workers.append(info)
        return workers

    async def request_shutdown(self, names: Iterable[str], ttl: float = 300) -> None:
        """Ask workers to finish their tasks and exit."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.set(self.shutdown_key(name), "1", ex=int(ttl))
            await pipe.execute()

    # -- dead letters ----------------------------------------------------------------------
    async def dead_letter(self, reason: str, raw: bytes, worker: str, keep: int = 1000) -> None:
        """Keep a refused message aside, with why it was refused."""
        entry = json.dumps(
            {
                "reason": reason,
                "worker": worker,
                "at": time.time(),
                "message": raw[:65536].decode("utf-8", errors="backslashreplace"),
            }
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self.dead_letter_key, entry)
            pipe.ltrim(self.dead_letter_key, 0, keep - 1)
            await pipe.execute()

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent refused messages, newest first."""
        raw = await self.redis.lrange(self.dead_letter_key, 0, limit - 1)
        return [json.loads(v) for v in raw]

    async def dead_letter_count(self) -> int:
        """How many refused messages are kept."""
        return int(await self.redis.llen(self.dead_letter_key))
