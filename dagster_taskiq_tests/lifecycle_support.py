"""Helpers shared by the lifecycle tests: a ``TaskStore`` on a real Redis under a throwaway prefix.

Every test gets a fresh client and a random key prefix; all keys under it are deleted afterwards.
Nothing here starts a process or touches a Dagster instance.
"""

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from redis.asyncio import Redis

from dagster_taskiq.lifecycle.keys import KeySpace
from dagster_taskiq.lifecycle.records import WorkerInfo
from dagster_taskiq.lifecycle.states import TaskKind
from dagster_taskiq.lifecycle.store import TaskStore, message_digest

#: Heartbeat timeout of every test task: long enough that no lease lapses by itself in a test.
HEARTBEAT_TIMEOUT = 30.0
#: ``result_ttl`` of the test stores (records and results of finished tasks).
RESULT_TTL = 600
#: TTL of the test workers' liveness records.
WORKER_TTL = 120.0
QUEUE = "lifecycle-q"


class Worker(NamedTuple):
    """One worker process: its (reusable) name and its instance id."""

    name: str
    instance: str


def unique_prefix() -> str:
    """A key prefix no other test uses."""
    return f"dtq-lifecycle-test-{uuid.uuid4().hex[:12]}"


def new_task_id(run_id: str, step_key: str = "step") -> str:
    """A task id shaped like the step handler's: ``RUN.STEP.HEX``."""
    return f"{run_id}.{step_key}.{uuid.uuid4().hex[:12]}"


def message_for(task_id: str) -> bytes:
    """A broker message body unique to ``task_id``."""
    return f'{{"task_id": "{task_id}", "body": "payload"}}'.encode()


def text(value: Any) -> str:
    """``value`` decoded to text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def new_store(redis_url: str, prefix: str) -> TaskStore:
    """A store on a fresh client (close it with ``await store.redis.aclose()``)."""
    return TaskStore(Redis.from_url(redis_url), KeySpace(prefix), result_ttl=RESULT_TTL)


@contextlib.asynccontextmanager
async def redis_store(redis_url: str) -> AsyncIterator[TaskStore]:
    """A store under a fresh prefix; every key under it is deleted on exit."""
    store = new_store(redis_url, unique_prefix())
    try:
        yield store
    finally:
        try:
            await delete_prefix(store.redis, store.prefix)
        finally:
            await store.redis.aclose()


async def delete_prefix(client: Redis, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


async def keyspace_problems(client: Redis, prefix: str) -> list[str]:
    """Keys under ``prefix`` that would live forever: no TTL and not an ``:idx:`` index.

    Index keys must be sorted sets or sets (Redis deletes those when they empty).
    """
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if not keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        replies = await pipe.execute()
    problems = []
    for key, kind, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        name, kind = text(key), text(kind)
        if ":idx:" in name:
            if kind not in ("zset", "set", "none"):
                problems.append(f"{name}: index of type {kind}")
        elif ttl == -1:
            problems.append(f"{name}: no TTL")
    return problems


async def register_task(
    store: TaskStore,
    *,
    task_id: str | None = None,
    run_id: str = "run-a",
    now: float | None = None,
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
) -> tuple[str, bytes]:
    """Register a step task; returns its id and message."""
    task_id = task_id or new_task_id(run_id)
    message = message_for(task_id)
    await store.register(
        task_id=task_id,
        kind=TaskKind.STEP,
        run_id=task_id.split(".", 1)[0],
        step_key=task_id.split(".")[1],
        queue=QUEUE,
        priority=0,
        heartbeat_timeout=heartbeat_timeout,
        message=message,
        now=now,
    )
    return task_id, message


def digest_of(task_id: str) -> str:
    """The digest of ``task_id``'s registered message."""
    return message_digest(message_for(task_id))


def worker_info(name: str) -> WorkerInfo:
    """A liveness record for worker ``name``."""
    return WorkerInfo(
        name=name,
        host="test-host",
        pid=4242,
        queues=(QUEUE,),
        concurrency=2,
        running=(),
        started_at=1.0,
        last_heartbeat=2.0,
    )


async def beat(store: TaskStore, worker: Worker) -> bool:
    """Register (or refresh) ``worker``'s liveness record; False if another instance holds it."""
    result = await store.beat_worker(worker_info(worker.name), worker.instance, WORKER_TTL)
    return result.registered


async def snapshot(store: TaskStore, task_id: str) -> dict[str, Any]:
    """Everything the store keeps about one task: record, lease, index scores, result."""
    keys = store.keys
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.task(task_id))
        pipe.get(keys.lease(task_id))
        pipe.zscore(keys.due, task_id)
        pipe.zscore(keys.inflight, task_id)
        pipe.exists(keys.result(task_id))
        record, lease, due, inflight, result = await pipe.execute()
    return {
        "record": {text(k): v for k, v in record.items()},
        "lease": lease,
        "due": due,
        "inflight": inflight,
        "result": bool(result),
    }
