"""Helpers for the routing, priority, failure and error tests: background runs, key store reads."""

import dataclasses
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from dagster import DagsterEvent, DagsterEventType, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.storage.dagster_run import DagsterRun

from dagster_taskiq.cli import collect_status
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.lifecycle.records import TaskRecord, WorkerInfo
from dagster_taskiq_tests.harness import (
    WorkerPool,
    WorkerProcess,
    executor_config,
    run_async,
    wait_for,
)


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a finished ``execute_job`` call left behind."""

    run_id: str
    success: bool
    events: list[DagsterEvent]

    def starts(self, step_key: str) -> int:
        """How many times ``step_key`` started (STEP_START or STEP_RESTARTED)."""
        kinds = (DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED)
        return sum(1 for e in self.events if e.step_key == step_key and e.event_type in kinds)


def run_job(
    job: ReconstructableJob,
    instance: DagsterInstance,
    settings: TaskiqSettings,
    executor: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Execute ``job`` on taskiq workers and summarise the result.

    ``executor`` adds executor config keys; ``run_config`` adds other run config (e.g. ``ops``).
    """
    run_config = {**executor_config(settings, **dict(executor or {})), **dict(run_config or {})}
    with execute_job(job, instance=instance, run_config=run_config, tags=tags) as result:
        return RunSummary(result.run_id, result.success, list(result.all_events))


def start_workers(pool: WorkerPool, count: int, **options: Any) -> list[WorkerProcess]:
    """Start ``count`` workers side by side and wait until all have registered."""
    started = [pool.start(wait=False, **options) for _ in range(count)]
    for worker in started:
        worker.wait_registered()
    return started


def in_background(call: Callable[[], RunSummary]) -> "Future[RunSummary]":
    """Run ``call`` in a daemon thread (the test keeps driving workers meanwhile)."""
    future: Future[RunSummary] = Future()

    def _target() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=_target, name="background-run", daemon=True).start()
    return future


def wait_new_run(
    instance: DagsterInstance,
    known: set[str],
    timeout: float = 30.0,
    future: "Future[RunSummary] | None" = None,
) -> DagsterRun:
    """The first run whose id is not in ``known`` (waits for it to be created).

    Pass the background run's ``future`` so that an error raised before the run exists fails the
    test at once, with its own message.
    """

    def _new() -> DagsterRun | None:
        if future is not None and future.done():
            future.result()
        return next((r for r in instance.get_runs() if r.run_id not in known), None)

    return wait_for(_new, timeout, interval=0.05, what="a new run")


def task_records(settings: TaskiqSettings, run_id: str) -> dict[str, TaskRecord]:
    """The key store's record of each step (latest task) of a run, by step key."""

    async def _read(conn: Any) -> dict[str, TaskRecord]:
        index = await conn.keystore.run_tasks(run_id)
        records = await conn.keystore.get_many(list(index.values()))
        return {r.step_key or "__run__": r for r in records}

    return run_async(settings, _read)


def wait_states(
    settings: TaskiqSettings,
    run_id: str,
    expected: Mapping[str, str],
    timeout: float = 30.0,
) -> dict[str, TaskRecord]:
    """Wait until each step in ``expected`` has a task in the given state."""

    def _check() -> dict[str, TaskRecord] | None:
        records = task_records(settings, run_id)
        ok = all(k in records and records[k].state == s for k, s in expected.items())
        return records if ok else None

    return wait_for(_check, timeout, interval=0.1, what=f"task states {dict(expected)}")


def status(settings: TaskiqSettings) -> dict[str, Any]:
    """The ``dagster-taskiq status --json`` document."""
    return run_async(settings, collect_status)


def worker_record(settings: TaskiqSettings, name: str) -> WorkerInfo | None:
    """A live worker's liveness record."""
    return run_async(settings, lambda conn: conn.keystore.get_worker(name))


def wait_heartbeats(
    settings: TaskiqSettings, name: str, after: float, timeout: float = 30.0
) -> None:
    """Wait until worker ``name`` has heartbeated at a time later than ``after`` (UNIX time)."""

    def _beat() -> bool:
        info = worker_record(settings, name)
        return info is not None and info.last_heartbeat > after

    wait_for(_beat, timeout, interval=0.1, what=f"a heartbeat of worker {name}")


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
