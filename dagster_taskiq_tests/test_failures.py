"""Failure and revocation on real workers, on Redis and on RabbitMQ.

Run termination, ``kill -9`` of a worker, a worker dying between claim and start, a clean
SIGTERM of a busy worker, and a long healthy step that a broker redelivers.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.records import WorkerInfo
from dagster_taskiq.lifecycle.store import message_digest
from dagster_taskiq_tests import jobs, scenario_jobs
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerPool,
    executor_config,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.scenario_jobs import LOG_ENV, MARKER_ENV, read_notes
from dagster_taskiq_tests.scenario_support import (
    in_background,
    pid_alive,
    run_job,
    start_workers,
    task_records,
    wait_new_run,
    wait_states,
)

#: The orchestrating process of the termination test: ``execute_job`` in its own main thread,
#: so that SIGINT reaches Dagster's interrupt handling as it does in a real run worker.
ORCHESTRATOR = """
import json, sys
from dagster import DagsterInstance, execute_job, reconstructable
from dagster_taskiq_tests.scenario_jobs import revocable_job
with DagsterInstance.get() as instance:
    with execute_job(reconstructable(revocable_job), instance=instance,
                     run_config=json.loads(sys.argv[1])) as result:
        print("run", result.run_id, "success", result.success, flush=True)
"""


@pytest.fixture
def order_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the test ops append to (set before any worker starts)."""
    path = tmp_path / "order.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file whose creation lets the ``slow`` op finish."""
    path = tmp_path / "release-slow"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


def _started(order_log: Path, run_id: str) -> dict[str, int]:
    """Step name -> pid of every ``start <step>`` note of a run."""
    return {
        what.split(" ", 1)[1]: pid
        for _, pid, rid, what in read_notes(order_log)
        if rid == run_id and what.startswith("start ")
    }


def test_termination_kills_running_steps_and_revokes_queued_ones(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
    dagster_home: Path,
) -> None:
    """SIGINT to the run's process: running steps die within 5 s even though they ignore
    SIGTERM, and the queued one never starts."""
    worker = workers.start(concurrency=2, wait=False)  # boots while the orchestrator does
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(dagster_home / "orchestrator.log", "wb") as log:
        orchestrator = subprocess.Popen(
            [sys.executable, "-c", ORCHESTRATOR, json.dumps(executor_config(settings))],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
        )
    held = ("held_a", "held_b", "held_c")
    try:
        worker.wait_registered()
        run = wait_new_run(instance, set(), timeout=60)

        def _two_running_one_queued() -> tuple[dict[str, int], str] | None:
            states = {k: r.state for k, r in task_records(settings, run.run_id).items()}
            running = [k for k in held if states.get(k) == "running"]
            queued = [k for k in held if states.get(k) == "queued"]
            pids = _started(order_log, run.run_id)
            if len(running) == 2 and len(queued) == 1 and set(running) <= set(pids):
                return {k: pids[k] for k in running}, queued[0]
            return None

        # Two held steps fill the worker's two slots; the third waits in the queue.
        pids, waiting = wait_for(
            _two_running_one_queued, 60, interval=0.1, what="two running steps and a queued one"
        )
        started = time.monotonic()
        orchestrator.send_signal(signal.SIGINT)
        wait_for(
            lambda: not any(pid_alive(pid) for pid in pids.values()),
            timeout=5.0,
            what="the running steps' processes to be killed",
        )
        killed_after = time.monotonic() - started
        assert orchestrator.wait(60) is not None
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
            orchestrator.wait()
    assert killed_after < 5.0, f"the running steps were killed {killed_after:.1f} s after SIGINT"

    # The queued step reaches the worker once its slots are free, and is skipped there.
    task_id = task_records(settings, run.run_id)[waiting].task_id
    wait_for(
        lambda: f"Not running task {task_id}: it is revoked" in worker.log(),
        what="the worker to skip the revoked step",
    )
    records = task_records(settings, run.run_id)
    assert {k: records[k].state for k in held} == dict.fromkeys(held, "revoked")
    assert set(_started(order_log, run.run_id)) == set(pids)

    final = instance.get_run_by_id(run.run_id)
    assert final is not None and final.is_finished and not final.is_success
    messages = [e.message or "" for e in instance.all_logs(run.run_id)]
    for step in held:
        assert any(m.startswith(f"Revoked step {step} ") for m in messages), step
    starts = [
        e.step_key for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
    ]
    assert sorted(starts) == sorted(pids)


def test_kill_9_of_a_worker_is_detected_and_retried(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
) -> None:
    """The step of a SIGKILLed worker fails its health check and its retry runs elsewhere."""
    first, second = start_workers(workers, 2)
    future = in_background(
        lambda: run_job(
            reconstructable(jobs.crash_job), instance, settings, {"heartbeat_timeout": 3.0}
        )
    )
    run = wait_new_run(instance, set(), future=future)
    records = wait_states(settings, run.run_id, {"crash_once": "running"})
    wait_for(
        lambda: "attempt 0 crash_once" in order_log.read_text() if order_log.exists() else False,
        what="the first attempt to start",
    )
    victim, survivor = (
        (first, second)
        if records["crash_once"].worker == first.name
        else (
            second,
            first,
        )
    )
    child = int(order_log.read_text().split()[1])
    killed_at = time.time()
    victim.kill()

    summary = future.result(timeout=90)
    assert summary.success
    retry = next(
        e
        for e in summary.events
        if e.step_key == "crash_once" and e.event_type == DagsterEventType.STEP_UP_FOR_RETRY
    )
    message = retry.step_retry_data.error.message  # type: ignore[union-attr]
    assert "failed health check" in message
    assert f"Worker {victim.name} " in message and "last heartbeat" in message
    detected = next(
        r.timestamp
        for r in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
    )
    assert detected - killed_at < 3.0 + 5.0
    assert not pid_alive(child)
    assert task_records(settings, run.run_id)["crash_once"].worker == survivor.name
    assert summary.starts("crash_once") == 2


def test_task_claimed_by_a_dead_worker_runs_on_another(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    """A worker that took and claimed a task, then died before starting it, loses nothing."""
    ghost = f"ghost-{settings.key_prefix}"
    future = in_background(lambda: run_job(reconstructable(jobs.single_op_job), instance, settings))
    run = wait_new_run(instance, set(), future=future)
    wait_states(settings, run.run_id, {"emit_one": "queued"})

    async def _take_and_claim(conn: TaskiqConnection) -> str:
        # Exactly what a worker does before it forks the step: pull, claim, ack. Then "die".
        listener = conn.broker.listen()
        try:
            message = await listener.__anext__()
            task_id = conn.broker.formatter.loads(message.data).task_id
            claim = await conn.keystore.claim(
                task_id, ghost, "ghost-instance", message_digest(message.data)
            )
            assert claim.granted
            await message.ack()  # type: ignore[misc]
            return task_id
        finally:
            await listener.aclose()

    async def _as_ghost() -> str:
        conn = TaskiqConnection(settings, listen_queues=[settings.default_queue], consumer=ghost)
        try:
            await conn.start()
            # Alive, as a real worker is when it claims: no health check may release the task yet.
            now = time.time()
            info = WorkerInfo(
                name=ghost,
                host="ghost-host",
                pid=1,
                queues=(settings.default_queue,),
                concurrency=1,
                running=(),
                started_at=now,
                last_heartbeat=now,
            )
            await conn.keystore.beat_worker(info, "ghost-instance", 600.0)
            return await _take_and_claim(conn)
        finally:
            await conn.close()

    async def _ghost_dies() -> None:
        conn = TaskiqConnection(settings)
        try:
            await conn.keystore.remove_worker(
                ghost, "ghost-instance"
            )  # as when its liveness record expires
        finally:
            await conn.close()

    task_id = asyncio.run(_as_ghost())
    record = task_records(settings, run.run_id)["emit_one"]
    assert (record.task_id, record.state, record.worker) == (task_id, "claimed", ghost)
    asyncio.run(_ghost_dies())

    worker = workers.start()
    summary = future.result(timeout=60)
    assert summary.success and summary.starts("emit_one") == 1
    # The run ends once the step's success is in the event log; the worker marks the task
    # done a moment later, when the step's child process has exited.
    record = wait_states(settings, run.run_id, {"emit_one": "done"})["emit_one"]
    assert record.worker == worker.name


def test_sigterm_of_a_busy_worker_loses_nothing(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
    marker: Path,
) -> None:
    """SIGTERM while busy: the step finishes, exit 0, queued steps run on another worker."""
    future = in_background(
        lambda: run_job(reconstructable(scenario_jobs.busy_shutdown_job), instance, settings)
    )
    run = wait_new_run(instance, set(), future=future)
    wait_states(settings, run.run_id, dict.fromkeys(("slow", "quick_1", "quick_2"), "queued"))
    # Started after all three are queued, the single-slot worker takes ``slow`` (priority 9).
    busy = workers.start(concurrency=1)
    wait_states(settings, run.run_id, {"slow": "running", "quick_1": "queued", "quick_2": "queued"})
    wait_for(lambda: "slow" in _started(order_log, run.run_id), what="slow to start")

    assert busy.process is not None
    busy.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping (SIGTERM)" in busy.log(), what="the busy worker to stop taking")
    spare = workers.start(concurrency=1)
    # The queued steps run on the spare worker while the busy one still runs its step.
    wait_states(settings, run.run_id, {"quick_1": "done", "quick_2": "done"})
    assert busy.process.poll() is None
    assert task_records(settings, run.run_id)["slow"].state == "running"

    marker.touch()
    assert busy.process.wait(30) == 0
    summary = future.result(timeout=60)
    assert summary.success
    records = task_records(settings, run.run_id)
    assert records["slow"].worker == busy.name
    assert records["quick_1"].worker == records["quick_2"].worker == spare.name
    assert all(summary.starts(s) == 1 for s in ("slow", "quick_1", "quick_2"))

    # An idle worker exits 0 within 10 s.
    assert spare.process is not None
    stop_at = time.monotonic()
    spare.process.send_signal(signal.SIGTERM)
    assert spare.process.wait(10) == 0
    assert time.monotonic() - stop_at < 10.0


def test_long_healthy_step_is_never_run_twice(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
    marker: Path,
) -> None:
    """A step outliving its heartbeat timeout several times, and redelivered, runs once."""
    # Short enough to outlive twice quickly, long enough that a loaded 2-core CI machine does not
    # starve the worker's 0.5 s heartbeat past it.
    heartbeat_timeout = 4.0
    first, second = start_workers(workers, 2)
    future = in_background(
        lambda: run_job(
            reconstructable(scenario_jobs.long_step_job),
            instance,
            settings,
            {"heartbeat_timeout": heartbeat_timeout},
        )
    )
    run = wait_new_run(instance, set(), future=future)
    record = wait_states(settings, run.run_id, {"slow": "running"})["slow"]

    # Deliver the message again, as a broker does when it thinks the consumer is gone
    # (taskiq-redis' idle_timeout, RabbitMQ's consumer_timeout).
    async def _redeliver(conn: TaskiqConnection) -> None:
        raw = await conn.keystore.message(record.task_id)
        assert raw is not None
        await conn.send_registered(record, raw)

    run_async(settings, _redeliver)
    wait_for(
        lambda: any(
            f"Ignoring duplicate delivery of task {record.task_id}" in w.log()
            for w in (first, second)
        ),
        what="the duplicate delivery to be refused",
    )
    assert record.started_at is not None
    wait_for(
        lambda: (
            lambda r: (
                r.last_heartbeat is not None
                and r.last_heartbeat > record.started_at + 2 * heartbeat_timeout
            )
        )(task_records(settings, run.run_id)["slow"]),
        timeout=30,
        interval=0.2,
        what="the step to outlive two heartbeat timeouts",
    )
    assert task_records(settings, run.run_id)["slow"].state == "running"
    marker.touch()
    summary = future.result(timeout=60)
    assert summary.success
    assert summary.starts("slow") == 1
    assert list(_started(order_log, run.run_id)) == ["slow", "after_slow"]
    assert sum(1 for *_, what in read_notes(order_log) if what == "start slow") == 1
