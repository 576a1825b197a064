"""Worker faults on real processes: ``kill -9`` between claim and start, and of a run's worker.

Every test counts the starts (``STEP_START`` + ``STEP_RESTARTED``) of every step: nothing may be
lost and nothing may run twice. (``test_failures.py`` covers ``kill -9`` mid-step under the
executor, SIGTERM of a busy worker and redelivery of a long step.)
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.tags import QUEUE_TAG
from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerPool,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.reliability_jobs import notes
from dagster_taskiq_tests.reliability_support import (
    create_runs,
    hold_chain_in_background,
    launcher_instance,
    starts,
    successes,
    task_records,
    wait_state,
)
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require


@pytest.fixture
def note_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ops' note file; set before any worker starts so that workers inherit it."""
    path = tmp_path / "notes.log"
    monkeypatch.setenv(rj.LOG_ENV, str(path))
    return path


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Creating this file lets the ``held`` op finish."""
    path = tmp_path / "release"
    monkeypatch.setenv(rj.RELEASE_ENV, str(path))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- kill -9 between claim and start ---------------------------------------------------------
def test_worker_killed_between_claim_and_start_loses_nothing(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    dagster_home: Path,
    note_log: Path,
    release: Path,
) -> None:
    """A real worker process claims the first step, stalls, and is SIGKILLed before starting it.

    The claim is released once the dead worker's liveness record expires, another worker runs
    the step, and every step of the run starts exactly once.
    """
    release.touch()
    name = f"stall-{uuid.uuid4().hex[:6]}"
    claimed = dagster_home / f"{name}.claimed"
    config = dagster_home / f"{name}.yaml"
    config.write_text(yaml.safe_dump(executor_config(settings)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DAGSTER_HOME": str(dagster_home)}
    with open(dagster_home / f"{name}.log", "wb") as log:
        staller = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_tests.reliability_support", "stall",
             str(config), name, settings.default_queue, str(claimed)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT),
        )  # fmt: skip
    try:
        wait_for(
            lambda: run_async(settings, lambda c: c.keystore.worker_alive(name)),
            30,
            interval=0.1,
            what="the stalling worker to register",
        )
        future = hold_chain_in_background(instance, settings)
        wait_for(claimed.exists, 60, what="the stalling worker to claim a task")
        task_id = json.loads(claimed.read_text())["task_id"]
        healthy = workers.start()
        killed_at = time.monotonic()
        staller.kill()
        staller.wait()

        def _taken_over() -> bool:
            record = run_async(settings, lambda c: c.keystore.get(task_id))
            return record is not None and record.worker == healthy.name

        wait_for(_taken_over, 30, interval=0.1, what="another worker to take the claimed task")
        took_over_after = time.monotonic() - killed_at
        result = future.result(timeout=90)
        with result:
            assert result.success
            run_id = result.run_id
    finally:
        if staller.poll() is None:
            staller.kill()
            staller.wait()
    assert took_over_after < settings.heartbeat_timeout + 2.0, took_over_after
    assert starts(instance, run_id) == {"first": 1, "held": 1, "last": 1}
    assert successes(instance, run_id) == {"first": 1, "held": 1, "last": 1}
    records = task_records(settings, run_id)
    assert records["first"].task_id == task_id
    assert {r.worker for r in records.values()} == {healthy.name}
    assert [what for _, what in notes(note_log, run_id)] == [
        "start first", "start held", "end held", "start last",
    ]  # fmt: skip


# -- kill -9 of the worker that runs a whole run (launcher) ----------------------------------
def _monitor_until(
    instance: DagsterInstance,
    context: WorkspaceProcessContext,
    condition: Any,
    timeout: float,
    what: str,
) -> Any:
    """Run Dagster's run-monitoring iteration (as the daemon does) until ``condition()``."""
    logger = __import__("logging").getLogger("dagster_taskiq_tests.monitoring")

    def _tick() -> Any:
        errors = [e for e in execute_run_monitoring_iteration(context, logger) if e]
        assert not errors, errors
        return condition()

    return wait_for(_tick, timeout, interval=0.5, what=what)


@pytest.fixture
def launcher_settings() -> TaskiqSettings:
    """Redis settings with a short heartbeat timeout, for the launcher tests."""
    require(REDIS_URL, "Redis")
    return isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=5.0)


def test_run_worker_killed_mid_run_is_resumed_without_rerunning_steps(
    launcher_settings: TaskiqSettings,
    dagster_home: Path,
    note_log: Path,
    release: Path,
) -> None:
    """``kill -9`` of the worker that runs the run process, while a step runs elsewhere.

    Run monitoring sees the run's heartbeat stop within the heartbeat timeout and resumes the run
    on another worker. The resumed orchestrator finds the in-flight step still healthy on its own
    worker and waits for it instead of launching it again: every step starts exactly once.
    """
    settings = launcher_settings
    runs_queue = f"{settings.default_queue}-runs"
    pool = WorkerPool(settings, dagster_home)
    try:
        with launcher_instance(dagster_home, settings, max_resume_run_attempts=1) as (
            instance,
            context,
        ):
            run_worker = pool.start(wait=False, queues=[runs_queue], name="run-worker-a")
            step_worker = pool.start(wait=False, name="step-worker")
            spare = pool.start(wait=False, queues=[runs_queue], name="run-worker-b")
            for worker in (run_worker, step_worker, spare):
                worker.wait_registered(60)
            # Both run workers serve the run queue; the test kills whichever takes the run.
            (run_id,) = create_runs(
                instance, context, "hold_chain_job", settings, {QUEUE_TAG: runs_queue}
            )
            instance.submit_run(run_id, context.create_request_context())
            wait_state(settings, run_id, "held", {"running"})
            run_record = task_records(settings, run_id)["__run__"]
            assert run_record.pid is not None
            run_pid = run_record.pid
            if run_record.worker == spare.name:
                run_worker, spare = spare, run_worker
            assert run_record.worker == run_worker.name
            killed_at = time.monotonic()
            run_worker.kill()
            wait_for(lambda: not _pid_alive(run_pid), 10, what="the run process to die with it")

            def _resumed() -> bool:
                record = task_records(settings, run_id).get("__run__")
                return record is not None and record.worker == spare.name

            _monitor_until(instance, context, _resumed, 60, "the run to be resumed")
            detected_after = time.monotonic() - killed_at
            assert task_records(settings, run_id)["held"].state == "running"
            release.touch()
            final = _monitor_until(
                instance,
                context,
                lambda: (r := instance.get_run_by_id(run_id)) is not None and r.is_finished and r,
                90,
                "the resumed run to finish",
            )
            messages = [e.message for e in instance.all_logs(run_id)]
            assert final.status == DagsterRunStatus.SUCCESS, "\n".join(messages)
            assert starts(instance, run_id) == {"first": 1, "held": 1, "last": 1}
            assert successes(instance, run_id) == {"first": 1, "held": 1, "last": 1}
            records = task_records(settings, run_id)
            assert records["held"].worker == step_worker.name
            assert records["last"].worker == step_worker.name
            lost = [m for m in messages if f"Worker {run_worker.name} stopped heartbeating" in m]
            assert lost, "\n".join(messages)
    finally:
        pool.stop_all()
    # Detection: heartbeat_timeout after the kill, plus one monitoring pass and the resume.
    assert detected_after < settings.heartbeat_timeout + 6.0, detected_after


def test_run_worker_killed_without_resume_fails_naming_the_worker(
    launcher_settings: TaskiqSettings,
    dagster_home: Path,
    note_log: Path,
    release: Path,
) -> None:
    """Without resume the run fails, with a message that names the lost worker, and the step
    processes that worker ran die with it (nothing keeps running unsupervised)."""
    settings = launcher_settings
    pool = WorkerPool(settings, dagster_home)
    try:
        with launcher_instance(dagster_home, settings) as (instance, context):
            victim = pool.start(name="lone-worker")
            (run_id,) = create_runs(instance, context, "hold_chain_job", settings)
            instance.submit_run(run_id, context.create_request_context())
            wait_state(settings, run_id, "held", {"running"})
            wait_for(lambda: "start held" in [w for _, w in notes(note_log, run_id)], 30)
            step_pid = next(pid for pid, what in notes(note_log, run_id) if what == "start held")
            killed_at = time.monotonic()
            victim.kill()
            final = _monitor_until(
                instance,
                context,
                lambda: (r := instance.get_run_by_id(run_id)) is not None and r.is_finished and r,
                60,
                "run monitoring to fail the run",
            )
            detected_after = time.monotonic() - killed_at
            messages = "\n".join(e.message for e in instance.all_logs(run_id))
            assert final.status == DagsterRunStatus.FAILURE
            assert f"Worker {victim.name} stopped heartbeating" in messages, messages
            assert not _pid_alive(step_pid)
            assert starts(instance, run_id) == {"first": 1, "held": 1}
    finally:
        pool.stop_all()
    assert detected_after < settings.heartbeat_timeout + 6.0, detected_after


# -- a step that outlives result_ttl ---------------------------------------------------------
def test_step_running_longer_than_result_ttl_stays_supervised(
    instance: DagsterInstance,
    dagster_home: Path,
    note_log: Path,
    release: Path,
) -> None:
    """The run's task index expires ``result_ttl`` after its last change; the heartbeat keeps it
    alive while a step runs, so a long step is not reported as 'never submitted'."""
    require(REDIS_URL, "Redis")
    settings = isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=8.0, result_ttl=4)
    pool = WorkerPool(settings, dagster_home)
    try:
        pool.start()
        future = hold_chain_in_background(instance, settings)
        run_id = wait_for(lambda: next((r.run_id for r in instance.get_runs()), None), 60)
        started = wait_state(settings, run_id, "held", {"running"}).started_at
        assert started is not None
        wait_for(
            lambda: time.time() - started > 2 * 4 + 2,  # two result_ttls and a health check
            30,
            interval=0.2,
            what="the step to outlive result_ttl",
        )
        release.touch()
        with future.result(timeout=60) as result:
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            assert starts(instance, result.run_id) == {"first": 1, "held": 1, "last": 1}
    finally:
        pool.stop_all()
