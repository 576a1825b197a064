"""``TaskStore``: the async API over the task and worker transitions in Redis.

Every method that changes a task's state runs one Lua script from :mod:`.scripts`; reads are
pipelined. The store owns no timers: callers (the step handler, the launcher, the worker) decide
when to call it, and :func:`dagster_taskiq.lifecycle.health.assess` decides what a record means.
"""

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from dagster_taskiq.lifecycle import scripts
from dagster_taskiq.lifecycle.deadletters import DeadLetter, DeadLetterBook
from dagster_taskiq.lifecycle.keys import RUN_TASK_INDEX_FIELD, KeySpace
from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord, WorkerInfo
from dagster_taskiq.lifecycle.states import ClaimResult, Outcome, TaskKind, TaskState, TextEnum

#: Seconds a worker's run index and wake list outlive ``result_ttl`` while a step runs.
_WAKE_TTL = 3600


def message_digest(message: bytes) -> str:
    """SHA-256 of a broker message body, as hex: what a claim checks the delivered body against."""
    return hashlib.sha256(message).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Verdict(TextEnum):
    """What a fenced transition (start, renew, finish) did."""

    #: It applied: the caller holds the current fence.
    OK = "ok"
    #: Refused: the caller's claim is gone (taken over, revoked, finished or lost).
    FENCED = "fenced"
    #: Refused: the lease lapsed before this renewal arrived; the task is as good as lost.
    EXPIRED = "expired"


@dataclasses.dataclass(frozen=True)
class Transition:
    """The result of a fenced transition, with the task's state as the script saw it."""

    verdict: Verdict
    state: TaskState | None

    @property
    def ok(self) -> bool:
        """Whether the transition applied."""
        return self.verdict is Verdict.OK

    @classmethod
    def parse(cls, raw: Any) -> "Transition":
        """Parse a script's reply: a state, ``expired`` or ``fenced:<state>``."""
        text = _text(raw)
        if text == "expired":
            return cls(Verdict.EXPIRED, None)
        verdict = Verdict.OK
        if text.startswith("fenced:"):
            verdict, text = Verdict.FENCED, text[len("fenced:") :]
        try:
            return cls(verdict, TaskState(text))
        except ValueError:
            return cls(verdict, None)


@dataclasses.dataclass(frozen=True)
class Claim:
    """The result of a claim: what it found and, when it was granted, its fencing token."""

    result: ClaimResult
    fence: int = 0

    @property
    def granted(self) -> bool:
        """Whether the caller now holds the task."""
        return self.result is ClaimResult.CLAIMED


@dataclasses.dataclass(frozen=True)
class WorkerBeat:
    """What a worker's liveness refresh found."""

    #: False when another live instance holds the worker's name.
    registered: bool
    #: Whether ``worker terminate`` asked this worker to shut down.
    shutdown_requested: bool
    #: Ids of this worker's tasks revoked since its last beat (renew them now).
    revoked: tuple[str, ...] = ()


class TaskStore:
    """Async access to task records, leases and worker records. One per event loop."""

    def __init__(self, redis: Redis, keys: KeySpace, result_ttl: int = 86400) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl = result_ttl
        self._register = redis.register_script(scripts.REGISTER)
        self._mark_sent = redis.register_script(scripts.MARK_SENT)
        self._claim = redis.register_script(scripts.CLAIM)
        self._start = redis.register_script(scripts.START)
        self._renew = redis.register_script(scripts.RENEW)
        self._finish = redis.register_script(scripts.FINISH)
        self._revoke = redis.register_script(scripts.REVOKE)
        self._release = redis.register_script(scripts.RELEASE)
        self._mark_lost = redis.register_script(scripts.MARK_LOST)
        self._take_due = redis.register_script(scripts.TAKE_DUE)
        self._register_worker = redis.register_script(scripts.REGISTER_WORKER)
        self._remove_worker = redis.register_script(scripts.REMOVE_WORKER)
        #: The dead letters: list, show, take (replay, purge) and add.
        self.dead_letter_book = DeadLetterBook(redis, keys, result_ttl)

    @property
    def prefix(self) -> str:
        """The key prefix."""
        return self.keys.prefix

    async def _queue_script(
        self, pipe: Pipeline, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        """Queue ``script`` in ``pipe``. A plain pipeline loads missing scripts itself before it
        runs; a Redis Cluster pipeline does not, so there the script's text goes as EVAL."""
        if isinstance(self.redis, RedisCluster):
            pipe.eval(script.script, len(keys), *keys, *args)
        else:
            await script(keys=list(keys), args=list(args), client=pipe)

    @property
    def _record_ttl(self) -> int:
        # An unfinished record lives as long as a result would, refreshed by every renewal.
        return self.result_ttl + _WAKE_TTL

    # -- orchestrator side -------------------------------------------------------------------
    async def register(
        self,
        *,
        task_id: str,
        kind: TaskKind | str,
        run_id: str,
        step_key: str | None,
        queue: str,
        priority: int,
        heartbeat_timeout: float,
        message: bytes,
        now: float | None = None,
    ) -> None:
        """Record a task as ``queued`` (not yet sent) and index it by run, step and due time."""
        now = time.time() if now is None else now
        policy = LeasePolicy(heartbeat_timeout)
        fields: list[Any] = [
            "task_id", task_id,
            "kind", str(TaskKind(kind)),
            "run_id", run_id,
            "step_key", step_key or "",
            "index_field", step_key or RUN_TASK_INDEX_FIELD,
            "queue", queue,
            "priority", priority,
            "heartbeat_timeout", repr(heartbeat_timeout),
            "message", message,
            "digest", message_digest(message),
        ]  # fmt: skip
        await self._register(
            keys=[self.keys.task(task_id), self.keys.inflight, self.keys.due,
                  self.keys.run_index(run_id)],
            args=[repr(now), repr(now + policy.unsent_grace), self._record_ttl, task_id,
                  step_key or RUN_TASK_INDEX_FIELD, *fields],
        )  # fmt: skip

    async def mark_sent(
        self, task_id: str, heartbeat_timeout: float, fence: int = 0, now: float | None = None
    ) -> bool:
        """Record that the broker accepted the task's message (if it is still queued at
        ``fence``); it is looked for on its queue again after a while."""
        now = time.time() if now is None else now
        due_at = now + LeasePolicy(heartbeat_timeout).recheck_after
        result = await self._mark_sent(
            keys=[self.keys.task(task_id), self.keys.due], args=[repr(now), repr(due_at), fence]
        )
        return bool(result)

    async def revoke(
        self, task_id: str, now: float | None = None, reason: str | None = None
    ) -> str:
        """Revoke a task; returns the state it was in (``unknown`` if there is no record).

        A queued or claimed task becomes ``revoked`` and never starts; a running one becomes
        ``revoking`` and its worker stops the process on its next renewal. ``reason`` (say, who
        revoked it) is kept on the record, and the step's health check reports it.
        """
        now = time.time() if now is None else now
        record = self.keys.task(task_id)
        run_id = await self.redis.hget(record, "run_id")
        wake = self.keys.run_wake(_text(run_id) if run_id else "")
        result = await self._revoke(
            keys=[record, self.keys.inflight, self.keys.due, wake],
            args=[repr(now), self.result_ttl, reason or "", self.keys.revocations("")],
        )
        return _text(result)

    async def release(
        self, task_id: str, heartbeat_timeout: float, now: float | None = None
    ) -> bool:
        """Put a task claimed by a worker instance that is gone back to ``queued`` (unsent)."""
        now = time.time() if now is None else now
        due_at = now + LeasePolicy(heartbeat_timeout).unsent_grace
        result = await self._release(
            keys=[self.keys.task(task_id), self.keys.due],
            args=[repr(now), repr(due_at), self.keys.worker("")],
        )
        return bool(result)

    async def mark_lost(self, task_id: str, now: float | None = None) -> bool:
        """Mark a running task whose lease lapsed as ``lost``; True if it was marked now."""
        now = time.time() if now is None else now
        record = self.keys.task(task_id)
        run_id = await self.redis.hget(record, "run_id")
        wake = self.keys.run_wake(_text(run_id) if run_id else "")
        result = await self._mark_lost(
            keys=[record, self.keys.lease(task_id), self.keys.inflight, self.keys.due, wake],
            args=[repr(now), self.result_ttl],
        )
        return bool(result)

    async def take_due(
        self, limit: int = 100, look_again_after: float = 5.0, now: float | None = None
    ) -> list[str]:
        """Ids of up to ``limit`` tasks due for a look, pushed back by ``look_again_after``."""
        now = time.time() if now is None else now
        raw = await self._take_due(
            keys=[self.keys.due], args=[repr(now), limit, repr(look_again_after)]
        )
        return [_text(v) for v in raw]

    # -- worker side -------------------------------------------------------------------------
    async def claim(
        self,
        task_id: str,
        worker: str,
        instance: str,
        digest: str,
        heartbeat_timeout: float = 30.0,
        now: float | None = None,
    ) -> Claim:
        """Claim a task for ``worker`` if ``digest`` matches its registered message.

        Granted claims carry a fresh fencing token that start, renew and finish require.
        """
        now = time.time() if now is None else now
        due_at = now + LeasePolicy(heartbeat_timeout).claim_check_after
        result, fence = await self._claim(
            keys=[self.keys.task(task_id), self.keys.due],
            args=[worker, instance, repr(now), digest, repr(due_at), self.keys.worker("")],
        )
        return Claim(ClaimResult(_text(result)), int(fence))

    async def start(
        self, task_id: str, fence: int, pid: int, heartbeat_timeout: float, now: float | None = None
    ) -> Transition:
        """Mark a claimed task ``running`` in process ``pid`` and take its lease."""
        now = time.time() if now is None else now
        policy = LeasePolicy(heartbeat_timeout)
        result = await self._start(
            keys=[self.keys.task(task_id), self.keys.lease(task_id), self.keys.due],
            args=[fence, repr(now), pid, policy.lease_ms, repr(now + policy.lease_check_after)],
        )
        return Transition.parse(result)

    async def renew(
        self, leases: Mapping[str, tuple[int, float]], now: float | None = None
    ) -> dict[str, Transition]:
        """Renew the leases (or claims) of several tasks in one round trip.

        ``leases`` maps task id to (fence, heartbeat_timeout). Returns each task's transition:
        OK with its state (``running``, ``revoking`` or ``claimed``), FENCED, or EXPIRED.
        """
        if not leases:
            return {}
        now = time.time() if now is None else now
        ids = list(leases)
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                fence, timeout = leases[task_id]
                policy = LeasePolicy(timeout)
                run_id = task_id.split(".", 1)[0]
                await self._queue_script(
                    pipe,
                    self._renew,
                    keys=[self.keys.task(task_id), self.keys.lease(task_id), self.keys.due,
                          self.keys.run_index(run_id)],
                    args=[fence, repr(now), policy.lease_ms,
                          repr(now + policy.lease_check_after),
                          self._record_ttl + int(timeout) + 1],
                )  # fmt: skip
            raw = await pipe.execute()
        return {task_id: Transition.parse(value) for task_id, value in zip(ids, raw, strict=True)}

    async def finish(
        self,
        task_id: str,
        fence: int,
        outcome: Outcome,
        *,
        outcome_json: str,
        result_json: str,
        now: float | None = None,
    ) -> Transition:
        """Finish a task held at ``fence``: record its outcome and result, drop its lease, wake
        its run. A ``revoking`` task always ends ``revoked``."""
        now = time.time() if now is None else now
        run_id = task_id.split(".", 1)[0]
        result = await self._finish(
            keys=[self.keys.task(task_id), self.keys.lease(task_id), self.keys.inflight,
                  self.keys.due, self.keys.run_index(run_id), self.keys.run_wake(run_id),
                  self.keys.result(task_id)],
            args=[fence, repr(now), outcome.value, outcome.final_state.value, self.result_ttl,
                  outcome_json, result_json],
        )  # fmt: skip
        return Transition.parse(result)

    # -- reads -------------------------------------------------------------------------------
    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record, or None (never submitted, or expired)."""
        records = await self.get_many([task_id])
        return records[0] if records else None

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """Records of several tasks (missing ones left out), with lease and holder liveness."""
        if not task_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.keys.task(task_id))
                pipe.exists(self.keys.lease(task_id))
            raw = await pipe.execute()
        parsed: list[tuple[str, dict[str, str], bool]] = []
        for i, task_id in enumerate(task_ids):
            if raw[2 * i]:
                data = {
                    _text(k): v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                    for k, v in raw[2 * i].items()
                    if k not in (b"message", "message")
                }
                parsed.append((task_id, data, bool(raw[2 * i + 1])))
        holders = [data.get("worker") for _, data, _ in parsed if data.get("state") == "claimed"]
        live: dict[str, str | None] = {}
        if holders:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in holders:
                    pipe.hget(self.keys.worker(name or ""), "instance")
                for name, value in zip(holders, await pipe.execute(), strict=True):
                    live[name or ""] = _text(value) if value else None
        records = []
        for task_id, data, lease in parsed:
            holder_alive = None
            if data.get("state") == "claimed":
                holder_alive = live.get(data.get("worker", "")) == data.get("instance")
            records.append(
                TaskRecord.from_hash(task_id, data, lease_alive=lease, holder_alive=holder_alive)
            )
        return records

    async def message(self, task_id: str) -> bytes | None:
        """The task's registered broker message."""
        value = await self.redis.hget(self.keys.task(task_id), "message")
        return value if isinstance(value, bytes) else None

    async def run_tasks(self, run_id: str) -> dict[str, str]:
        """Latest task id per step key (``__run__`` for the run task) of a run."""
        raw = await self.redis.hgetall(self.keys.run_index(run_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def step_task_id(self, run_id: str, step_key: str) -> str | None:
        """The latest task id submitted for a step of a run."""
        value = await self.redis.hget(self.keys.run_index(run_id), step_key)
        return _text(value) if value else None

    async def inflight_ids(self, limit: int = 10_000) -> list[str]:
        """Ids of unfinished tasks, oldest first."""
        return [_text(v) for v in await self.redis.zrange(self.keys.inflight, 0, limit - 1)]

    async def forget(self, task_id: str) -> None:
        """Drop a task id whose record is gone from the indexes."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.inflight, task_id)
            pipe.zrem(self.keys.due, task_id)
            await pipe.execute()

    # -- run wake-ups ------------------------------------------------------------------------
    async def wake_run(self, run_id: str) -> None:
        """Wake the run's orchestrator now (a step's outcome is in the event log)."""
        key = self.keys.run_wake(run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(key, "1")
            pipe.ltrim(key, 0, 15)
            pipe.expire(key, _WAKE_TTL)
            await pipe.execute()

    async def wait_run_wake(self, run_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a step task of ``run_id`` to change; True if one did.

        All pending wake-ups are consumed at once: whoever is woken reads everything that
        happened since.
        """
        key = self.keys.run_wake(run_id)
        popped = await self.redis.blpop([key], timeout=timeout)
        if popped is None:
            return False  # timed out: the list is empty, nothing to drain
        await self.redis.delete(key)
        return True

    # -- workers -----------------------------------------------------------------------------
    async def beat_worker(
        self, info: WorkerInfo, instance: str, ttl: float, refresh_index: bool = True
    ) -> WorkerBeat:
        """Register or refresh a worker's liveness record, unless another live instance holds
        the name; also reports whether the worker was asked to shut down and which of its tasks
        were revoked since its last beat. One script call.

        ``refresh_index`` renews the workers index's TTL (it is also set whenever a name joins
        the index); a heartbeat asks for it about once a minute.
        """
        fields: list[str] = []
        for key, value in info.as_mapping().items():
            fields += [key, value]
        registered, shutdown, revoked = await self._register_worker(
            keys=[self.keys.worker(info.name), self.keys.workers, self.keys.shutdown(info.name),
                  self.keys.revocations(info.name)],
            args=[info.name, instance, int(ttl * 1000), "1" if refresh_index else "0", *fields],
        )  # fmt: skip
        return WorkerBeat(bool(registered), bool(shutdown), tuple(map(_text, revoked)))

    async def remove_worker(self, name: str, instance: str) -> None:
        """Delete a worker's liveness record (on clean shutdown) if it is still ``instance``'s."""
        await self._remove_worker(
            keys=[self.keys.worker(name), self.keys.workers, self.keys.shutdown(name),
                  self.keys.revocations(name)],
            args=[name, instance],
        )

    async def worker_alive(self, name: str) -> bool:
        """Whether worker ``name`` has a live liveness record."""
        return bool(await self.redis.exists(self.keys.worker(name)))

    async def get_worker(self, name: str) -> WorkerInfo | None:
        """A live worker's record."""
        raw = await self.redis.hgetall(self.keys.worker(name))
        if not raw or (b"name" not in raw and "name" not in raw):
            return None
        return WorkerInfo.from_mapping({_text(k): _text(v) for k, v in raw.items()})

    async def list_workers(self) -> list[WorkerInfo]:
        """Live workers, sorted by name; names of dead ones are pruned from the index."""
        names = sorted(_text(v) for v in await self.redis.smembers(self.keys.workers))
        workers = []
        for name in names:
            info = await self.get_worker(name)
            if info is None:
                await self.redis.srem(self.keys.workers, name)
            else:
                workers.append(info)
        return workers

    async def request_shutdown(self, names: Iterable[str], ttl: float = 300) -> None:
        """Ask workers to finish their tasks and exit."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.set(self.keys.shutdown(name), "1", ex=int(ttl))
            await pipe.execute()

    # -- dead letters ------------------------------------------------------------------------
    async def dead_letter(
        self,
        reason: str,
        raw: bytes,
        worker: str,
        keep: int = 1000,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> DeadLetter:
        """Keep a refused message aside with why it was refused and the queue it came from
        (capped at ``keep`` entries, kept ``result_ttl``); returns the entry with its id."""
        return await self.dead_letter_book.add(
            reason=reason, raw=raw, worker=worker, keep=keep, queue=queue, task_id=task_id
        )

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent refused messages, newest first (without their bodies)."""
        return [letter.summary() for letter in await self.dead_letter_book.entries(limit)]

    async def dead_letter_count(self) -> int:
        """How many refused messages are kept."""
        return await self.dead_letter_book.count()
