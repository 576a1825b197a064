"""Helpers for the reliability tests: background runs, start counts, key-store waits, and a real
worker process that stops dead between claiming a task and starting it.

``python -m dagster_taskiq_tests.reliability_support stall CONFIG NAME QUEUE MARKER`` runs the
real :class:`~dagster_taskiq.worker.service.Worker`, except that after its first successful claim
it writes ``MARKER`` and never goes on to start the task (its heartbeat keeps running). The test
then ``kill -9``\\ s it: exactly the state a worker that dies between claim and start leaves.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from dagster import (
    DagsterEventType,
    DagsterInstance,
    JobExecutionResult,
    execute_job,
    reconstructable,
)
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.store import Claim, TaskStore
from dagster_taskiq_tests import reliability_jobs
from dagster_taskiq_tests.harness import REPO_ROOT, executor_config, run_async, wait_for
from dagster_taskiq_tests.launcher_harness import sqlite_storage, write_home

T = TypeVar("T")
START_EVENTS = (DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED)


def in_background(call: Callable[[], T]) -> "Future[T]":
    """Run ``call`` in a daemon thread; the test keeps breaking things meanwhile."""
    future: Future[T] = Future()

    def _target() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=_target, name="background-run", daemon=True).start()
    return future


def hold_chain_in_background(
    instance: DagsterInstance, settings: TaskiqSettings
) -> "Future[JobExecutionResult]":
    """Execute ``hold_chain_job`` (its ``held`` op waits for the release file) on
    ``taskiq_executor`` with ``settings``, in a background thread."""
    return in_background(
        lambda: execute_job(
            reconstructable(reliability_jobs.hold_chain_job),
            instance=instance,
            run_config=executor_config(settings),
        )
    )


def starts(instance: DagsterInstance, run_id: str) -> Counter[str]:
    """How often each step of a run started: STEP_START plus STEP_RESTARTED events."""
    counts: Counter[str] = Counter()
    for event_type in START_EVENTS:
        for entry in instance.all_logs(run_id, of_type=event_type):
            counts[entry.step_key or "?"] += 1
    return counts


def successes(instance: DagsterInstance, run_id: str) -> Counter[str]:
    """How often each step of a run succeeded."""
    return Counter(
        entry.step_key or "?"
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_SUCCESS)
    )


def backend_only(settings: TaskiqSettings) -> TaskiqSettings:
    """The same key store and result backend without touching the broker (which may be down)."""
    return dataclasses.replace(settings, broker_url=settings.backend_url)


def task_records(settings: TaskiqSettings, run_id: str) -> dict[str, TaskRecord]:
    """Step key (``__run__`` for a run task) to the key-store record of its latest task."""

    async def _read(conn: Any) -> dict[str, TaskRecord]:
        index = await conn.keystore.run_tasks(run_id)
        records = await conn.keystore.get_many(list(index.values()))
        by_id = {r.task_id: r for r in records}
        return {key: by_id[tid] for key, tid in index.items() if tid in by_id}

    return dict(run_async(backend_only(settings), _read))


def wait_state(
    settings: TaskiqSettings,
    run_id: str,
    step_key: str,
    states: set[str],
    timeout: float = 60.0,
) -> TaskRecord:
    """Wait until the latest task of ``step_key`` is in one of ``states``."""

    def _check() -> TaskRecord | None:
        record = task_records(settings, run_id).get(step_key)
        return record if record is not None and record.state in states else None

    return wait_for(_check, timeout, interval=0.1, what=f"{step_key} to be {sorted(states)}")


def newest_run_id(instance: DagsterInstance, known: set[str], timeout: float = 60.0) -> str:
    """Wait for a run that is not in ``known`` and return its id."""

    def _new() -> str | None:
        for run in instance.get_runs():
            if run.run_id not in known:
                return run.run_id
        return None

    return wait_for(_new, timeout, interval=0.1, what="a new run")


def key_summary(settings: TaskiqSettings) -> dict[str, int]:
    """How many keys of each kind the settings' prefix holds, and the sizes of shared ones."""

    async def _scan(conn: Any) -> dict[str, int]:
        redis = conn.backend_redis
        counts: Counter[str] = Counter()
        prefix = settings.key_prefix
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            name = key.decode() if isinstance(key, bytes) else str(key)
            counts[name[len(prefix) + 1 :].split(":", 1)[0]] += 1
        summary = dict(counts)
        summary["inflight_size"] = int(await redis.zcard(conn.keys.inflight))
        unacked = 0
        async for key in redis.scan_iter(match=f"{prefix}:unacked:*", count=1000):
            unacked += int(await redis.hlen(key))
        summary["unacked_entries"] = unacked
        return summary

    return dict(run_async(backend_only(settings), _scan))


def redis_ttls(settings: TaskiqSettings, kinds: Mapping[str, str]) -> dict[str, int]:
    """For each kind (``task``, ``result``, ...), the smallest TTL among its keys (-1: none)."""

    async def _scan(conn: Any) -> dict[str, int]:
        redis = conn.backend_redis
        found: dict[str, int] = {}
        for kind, pattern in kinds.items():
            ttls = []
            async for key in redis.scan_iter(match=f"{settings.key_prefix}:{pattern}", count=1000):
                ttls.append(int(await redis.ttl(key)))
            found[kind] = min(ttls) if ttls else -2
        return found

    return dict(run_async(backend_only(settings), _scan))


# -- a Dagster instance that launches runs with TaskiqRunLauncher -----------------------------
@contextlib.contextmanager
def launcher_instance(
    home: Path, settings: TaskiqSettings, *, max_resume_run_attempts: int = 0
) -> Iterator[tuple[DagsterInstance, WorkspaceProcessContext]]:
    """An instance in ``home`` using ``TaskiqRunLauncher`` (sqlite storage, run monitoring on),
    and an in-process workspace holding ``reliability_jobs.defs``."""
    write_home(
        home,
        settings,
        sqlite_storage(home / "storage"),
        max_resume_run_attempts=max_resume_run_attempts,
    )
    origin = LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name="dagster_taskiq_tests.reliability_jobs",
        attribute="defs",
        working_directory=str(REPO_ROOT),
    )
    with DagsterInstance.from_config(str(home)) as instance:
        target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))
        with WorkspaceProcessContext(instance, target) as context:
            yield instance, context


def create_runs(
    instance: DagsterInstance,
    context: WorkspaceProcessContext,
    job_name: str,
    settings: TaskiqSettings,
    tags: Mapping[str, str] | None = None,
    count: int = 1,
) -> list[str]:
    """Create ``count`` NOT_STARTED runs of ``job_name`` as the UI would (both origins set)."""
    request = context.create_request_context()
    location = request.get_code_location(next(iter(request.get_code_location_entries())))
    remote_job = location.get_repository("__repository__").get_full_job(job_name)
    return [
        instance.create_run_for_job(
            job_def=reliability_jobs.defs.resolve_job_def(job_name),
            run_config=executor_config(settings),
            tags=dict(tags or {}),
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
        ).run_id
        for _ in range(count)
    ]


# -- the stalling worker -----------------------------------------------------------------------
def _stall(config: str, name: str, queue: str, marker: str) -> int:
    from dagster_taskiq.cli import load_settings
    from dagster_taskiq.worker.service import Worker, WorkerOptions

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(config, None, None)
    real_claim = TaskStore.claim

    async def claim_then_stall(self: TaskStore, task_id: str, worker: str, *args: Any) -> Claim:
        result = await real_claim(self, task_id, worker, *args)
        if result.granted:
            Path(marker).write_text(json.dumps({"task_id": task_id, "worker": worker}))
            await asyncio.Event().wait()  # never returns: the test kills us here
        return result

    TaskStore.claim = claim_then_stall  # type: ignore[method-assign]
    options = WorkerOptions(
        name=name, queues=(queue,), concurrency=1, heartbeat_interval=0.5, liveness_ttl=5.0
    )
    return asyncio.run(Worker(settings, options).serve())


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "stall":
        sys.exit(_stall(*sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} stall CONFIG NAME QUEUE MARKER")
