"""Load: many runs launched at once through ``TaskiqRunLauncher``, on two real workers.

Every run must succeed, every step must start exactly once, nothing may stay in a queue, and
the key store must shrink back to keys that expire. The test prints the wall time and the peak
memory of the workers, the run (orchestrator) processes and the step processes.

The suite runs a small variant. The full one from the issue (50 runs of 20 steps) runs with::

    DAGSTER_TASKIQ_LOAD_RUNS=50 DAGSTER_TASKIQ_LOAD_STEPS=20 \\
        pytest dagster_taskiq_tests/test_load.py -s

``DAGSTER_TASKIQ_LOAD_BROKER=rabbitmq`` runs it on RabbitMQ instead of Redis.
"""

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.workspace.context import WorkspaceProcessContext

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import (
    WorkerPool,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.reliability_support import (
    create_runs,
    key_summary,
    launcher_instance,
    starts,
    task_records,
)
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require

RUNS = int(os.environ.get("DAGSTER_TASKIQ_LOAD_RUNS", "6"))
STEPS = int(os.environ.get("DAGSTER_TASKIQ_LOAD_STEPS", "10"))
BROKER = os.environ.get("DAGSTER_TASKIQ_LOAD_BROKER", "redis")
WORKER_CONCURRENCY = 2
RESULT_TTL = 600
#: Keys that never expire, each bounded in size: the priority sequence counter, per-queue
#: wake-up lists (trimmed to 64), the set of worker names, the dead-letter list (trimmed).
PERMANENT_KINDS = {"seq", "q", "workers", "dead_letter"}


class MemorySampler:
    """Samples the RSS of worker processes and all their descendants every ``interval`` s."""

    def __init__(self, roots: list[int], interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss: dict[int, int] = {}
        self.peak_total = 0
        self.min_available = psutil.virtual_memory().available
        self.baseline_available = self.min_available
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            total = 0
            for root in self.roots:
                try:
                    parent = psutil.Process(root)
                    processes = [parent, *parent.children(recursive=True)]
                except psutil.Error:
                    continue
                for process in processes:
                    try:
                        rss = process.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    self.peak_rss[process.pid] = max(rss, self.peak_rss.get(process.pid, 0))
            self.peak_total = max(self.peak_total, total)
            self.min_available = min(self.min_available, psutil.virtual_memory().available)


def _mib(value: float) -> float:
    return round(value / 1048576, 1)


@pytest.fixture
def load_settings() -> TaskiqSettings:
    """Isolated settings on the chosen broker, with results kept ``RESULT_TTL`` seconds."""
    require(REDIS_URL, "Redis")
    if BROKER == "rabbitmq":
        require(AMQP_URL, "RabbitMQ")
    return isolated_settings(
        BROKER, REDIS_URL, AMQP_URL, heartbeat_timeout=30.0, result_ttl=RESULT_TTL
    )


@pytest.fixture
def launcher(
    dagster_home: Path, load_settings: TaskiqSettings
) -> Iterator[tuple[DagsterInstance, WorkspaceProcessContext]]:
    """The launcher instance in DAGSTER_HOME and a workspace holding ``reliability_jobs``."""
    with launcher_instance(dagster_home, load_settings) as pair:
        yield pair


def test_many_runs_at_once_on_two_workers(
    launcher: tuple[DagsterInstance, WorkspaceProcessContext],
    dagster_home: Path,
    load_settings: TaskiqSettings,
    record_property: Any,
) -> None:
    instance, context = launcher
    settings = load_settings
    job_name = f"load_job_{STEPS}"
    job_def = rj.defs.resolve_job_def(job_name)
    step_keys = {node.name for node in job_def.nodes}
    assert len(step_keys) == STEPS

    pool = WorkerPool(settings, dagster_home)
    try:
        workers = [
            pool.start(wait=False, concurrency=WORKER_CONCURRENCY, name=f"load-{i}")
            for i in range(2)
        ]
        for worker in workers:
            worker.wait_registered(60)
        run_ids = create_runs(instance, context, job_name, settings, count=RUNS)
        request = context.create_request_context()

        with MemorySampler([w.pid for w in workers]) as memory:
            started = time.monotonic()
            for run_id in run_ids:
                instance.submit_run(run_id, request)
            submitted = time.monotonic() - started

            def _finished() -> bool:
                return all(
                    (r := instance.get_run_by_id(run_id)) is not None and r.is_finished
                    for run_id in run_ids
                )

            wait_for(
                _finished,
                timeout=max(120.0, RUNS * STEPS * 0.6),
                interval=0.5,
                what=f"{RUNS} runs of {STEPS} steps to finish",
            )
            elapsed = time.monotonic() - started

        statuses = Counter(instance.get_run_by_id(run_id).status for run_id in run_ids)  # type: ignore[union-attr]
        assert statuses == {DagsterRunStatus.SUCCESS: RUNS}, statuses
        duplicates = {}
        orchestrator_pids: set[int] = set()
        for run_id in run_ids:
            counts = starts(instance, run_id)
            if counts != dict.fromkeys(step_keys, 1):
                duplicates[run_id] = counts
            run_record = task_records(settings, run_id)["__run__"]
            if run_record.pid:
                orchestrator_pids.add(run_record.pid)
        assert not duplicates, duplicates

        # Nothing left behind: no queued message, nothing in flight or parked unacknowledged,
        # no heartbeat; every other key expires with the results.
        async def _leftovers(conn: Any) -> dict[str, Any]:
            waiting: Any
            if BROKER == "redis":
                waiting = await conn.broker.waiting_by_priority(settings.default_queue)
            else:
                waiting = await conn.broker.waiting(settings.default_queue)
            persistent = []
            async for key in conn.backend_redis.scan_iter(match=f"{settings.key_prefix}:*"):
                name = key.decode()
                kind = name[len(settings.key_prefix) + 1 :].split(":", 1)[0]
                if kind not in PERMANENT_KINDS | {"worker", "consumer"}:
                    if await conn.backend_redis.ttl(key) == -1:  # no expiry set
                        persistent.append(name)
            return {"waiting": waiting, "persistent": persistent}

        leftovers = run_async(settings, _leftovers)
        assert leftovers["waiting"] in ({}, 0), leftovers
        assert leftovers["persistent"] == [], leftovers
        summary = key_summary(settings)
        assert summary["inflight_size"] == 0, summary
        assert summary["unacked_entries"] == 0, summary
        assert summary.get("hb", 0) == 0, summary
        tasks = RUNS * (STEPS + 1)
        assert summary.get("task", 0) <= tasks and summary.get("result", 0) <= tasks, summary
    finally:
        pool.stop_all()

    worker_pids = {w.pid for w in workers}
    step_peaks = [
        rss
        for pid, rss in memory.peak_rss.items()
        if pid not in worker_pids and pid not in orchestrator_pids
    ]
    report = {
        "broker": BROKER,
        "runs": RUNS,
        "steps_per_run": STEPS,
        "workers": 2,
        "worker_concurrency": WORKER_CONCURRENCY,
        "submit_s": round(submitted, 2),
        "wall_s": round(elapsed, 1),
        "steps_per_s": round(RUNS * STEPS / elapsed, 2),
        "peak_rss_worker_mib": _mib(max(memory.peak_rss.get(pid, 0) for pid in worker_pids)),
        "peak_rss_orchestrator_mib": _mib(
            max((memory.peak_rss.get(pid, 0) for pid in orchestrator_pids), default=0)
        ),
        "peak_rss_step_process_mib": _mib(max(step_peaks, default=0)),
        "peak_rss_sum_all_processes_mib": _mib(memory.peak_total),
        "peak_memory_in_use_mib": _mib(memory.baseline_available - memory.min_available),
        "keys_after": summary,
    }
    for key, value in report.items():
        record_property(key, value)
    print("\nLOAD", json.dumps(report, sort_keys=True))
