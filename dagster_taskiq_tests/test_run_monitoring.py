"""Run outcomes, worker loss and resume through Dagster's own run-monitoring iteration.

These exercise the launcher's health checks, which read only the Redis key store and result
backend, so they run on the Redis broker; ``test_launcher.py`` covers both brokers.
"""

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._daemon.monitoring.run_monitoring import RESUME_RUN_LOG_MESSAGE

from dagster_taskiq.lifecycle.states import TaskState
from dagster_taskiq.tags import QUEUE_TAG, TASK_ID_TAG
from dagster_taskiq_tests.harness import WorkerProcess, isolated_settings, wait_for
from dagster_taskiq_tests.launcher_harness import (
    LauncherEnv,
    launcher_env,
    sqlite_storage,
    workspace_context,
    write_home,
)
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, dagster_minor_version, require

#: Short, so that a killed worker's run is declared lost quickly.
HEARTBEAT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LauncherEnv]:
    """One launcher instance on Redis, shared by this module's tests."""
    require(REDIS_URL, "Redis")
    settings = isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    with launcher_env("redis", tmp_path_factory, settings) as launcher_env_:
        yield launcher_env_


@pytest.fixture(scope="module")
def main_worker(env: LauncherEnv) -> WorkerProcess:
    """The worker serving the launcher's default queue."""
    return env.workers.start(concurrency=2)


def _started(path: Path, env: LauncherEnv | None = None, run_id: str | None = None) -> int:
    """The pid an op wrote to ``path`` once it started (on a timeout, with the run's events)."""
    try:
        text = wait_for(
            lambda: path.exists() and path.read_text(), 60, what=f"{path} to be written"
        )
    except AssertionError as exc:
        if env is None or run_id is None:
            raise
        raise AssertionError(f"{exc}; run {run_id}:\n{env.describe(run_id)}") from None
    return int(text.split()[-1])


def _resume_through_run_monitoring(env: LauncherEnv, tmp_path: Path, run_id: str) -> None:
    """Run monitoring passes of an instance with ``max_resume_run_attempts`` set (same storage),
    as its daemon would, until it resumes the run."""
    home = write_home(
        tmp_path / "resume_home",
        env.settings,
        sqlite_storage(env.home / "storage"),
        max_resume_run_attempts=1,
    )
    with ExitStack() as stack:
        instance = stack.enter_context(DagsterInstance.from_config(str(home)))
        context = stack.enter_context(workspace_context(instance))

        def _resumed() -> bool:
            env.monitor_once(context)
            return any(RESUME_RUN_LOG_MESSAGE in e.message for e in env.events(run_id))

        wait_for(_resumed, 30, interval=0.25, what="run monitoring to resume the run")


def _monitor_until(
    env: LauncherEnv, run_id: str, *statuses: DagsterRunStatus, context: object = None
) -> None:
    """Run monitoring passes until the run reaches one of ``statuses``."""

    def _pass() -> bool:
        env.monitor_once(context)  # type: ignore[arg-type]
        return env.run(run_id).status in statuses

    wait_for(_pass, 30, interval=0.25, what=f"run monitoring to move run {run_id} to {statuses}")


def test_os_exit_run_is_failed_by_run_monitoring(
    env: LauncherEnv, main_worker: WorkerProcess
) -> None:
    run_id = env.launch("os_exit_job")
    task_id = env.task_id(run_id)
    wait_for(
        lambda: env.record(task_id).state == TaskState.DONE, 60, what="the run process to exit"
    )
    run = env.run(run_id)
    assert run.status == DagsterRunStatus.STARTED  # nothing recorded the end of the run...
    health = env.launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.FAILED
    assert "exited with code 1 before reporting an outcome" in health.msg, health.msg

    env.monitor_once()  # ...until Dagster's run monitoring asks the launcher
    run = env.run(run_id)
    assert run.status == DagsterRunStatus.FAILURE, env.describe(run_id)
    failure = next(
        e for e in env.events(run_id) if e.dagster_event_type == DagsterEventType.RUN_FAILURE
    )
    assert "exited with code 1" in failure.message and task_id in failure.message


def test_sys_exit_fails_the_run_naming_the_step(
    env: LauncherEnv, main_worker: WorkerProcess
) -> None:
    run_id = env.launch("sys_exit_job")
    run = env.wait_status(run_id)
    assert run.status == DagsterRunStatus.FAILURE, env.describe(run_id)
    events = env.events(run_id)
    step_failures = [e for e in events if e.dagster_event_type == DagsterEventType.STEP_FAILURE]
    assert [e.step_key for e in step_failures] == ["soft_exit"]
    failure = next(e for e in events if e.dagster_event_type == DagsterEventType.RUN_FAILURE)
    assert "soft_exit" in failure.message
    # Once the run process has exited, its outcome is in the result backend too.
    wait_for(lambda: env.record(env.task_id(run_id)).state == TaskState.DONE, 30)
    health = env.launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.FAILED and run_id in health.msg


def test_terminated_run_that_ignores_sigterm_is_killed_and_canceled(
    env: LauncherEnv, main_worker: WorkerProcess, tmp_path: Path
) -> None:
    started = tmp_path / "started.txt"
    run_id = env.launch(
        "stubborn_job", {"ops": {"ignore_interrupts": {"config": {"path": str(started)}}}}
    )
    pid = _started(started)
    begin = time.monotonic()
    assert env.launcher.terminate(run_id) is True
    run = env.wait_status(run_id, timeout=10)
    assert time.monotonic() - begin < 10
    assert run.status == DagsterRunStatus.CANCELED, env.describe(run_id)
    assert not _alive(pid)
    canceled = next(
        e for e in env.events(run_id) if e.dagster_event_type == DagsterEventType.RUN_CANCELED
    )
    assert f"taskiq worker {main_worker.name}" in canceled.message, canceled.message
    wait_for(lambda: env.record(env.task_id(run_id)).state == TaskState.REVOKED, 10)


def test_killed_worker_fails_the_run_with_the_reason(env: LauncherEnv, tmp_path: Path) -> None:
    queue = f"{env.settings.default_queue}-doomed"
    doomed = env.workers.start(queues=[queue])
    started = tmp_path / "started.txt"
    run_id = env.launch(
        "looping_job",
        {"ops": {"loop_forever": {"config": {"path": str(started)}}}},
        tags={QUEUE_TAG: queue},
    )
    op_pid = _started(started)
    env.monitor_once()
    assert env.run(run_id).status == DagsterRunStatus.STARTED  # healthy: monitoring leaves it

    doomed.kill()  # kill -9: no goodbye, no outcome
    wait_for(lambda: not _alive(op_pid), 10, what="the run process to die with its worker")
    _monitor_until(env, run_id, DagsterRunStatus.FAILURE)
    failure = next(
        e for e in env.events(run_id) if e.dagster_event_type == DagsterEventType.RUN_FAILURE
    )
    message = failure.message
    assert f"Worker {doomed.name} stopped heartbeating" in message, message
    assert "s ago" in message and f"heartbeat_timeout is {HEARTBEAT_TIMEOUT:g} s" in message
    assert env.task_id(run_id) in message
    if dagster_minor_version() >= 13:  # Dagster 1.13 appends the launcher's debug info
        assert "Last heartbeat:" in message, message
    assert env.record(env.task_id(run_id)).state == TaskState.LOST


def test_killed_worker_run_resumes_on_a_second_worker(env: LauncherEnv, tmp_path: Path) -> None:
    queue = f"{env.settings.default_queue}-resume"
    first = env.workers.start(queues=[queue])
    marker = tmp_path / "hung-once.txt"
    run_id = env.launch(
        "resumable_job",
        {"ops": {"hang_first_time": {"config": {"path": str(marker)}}}},
        tags={QUEUE_TAG: queue},
    )
    _started(marker)
    first_task = env.task_id(run_id)
    first.kill()
    second = env.workers.start(queues=[queue], wait=False)

    _resume_through_run_monitoring(env, tmp_path, run_id)
    second.wait_registered()
    run = env.wait_status(run_id, timeout=60)
    assert run.status == DagsterRunStatus.SUCCESS, env.describe(run_id)

    second_task = run.tags[TASK_ID_TAG]
    assert second_task != first_task
    assert env.record(first_task).state == TaskState.LOST
    assert env.record(second_task).worker == second.name
    env.wait_event(run_id, "Resuming run (attempt 1) to taskiq queue")
    env.wait_event(run_id, f"Resuming run on taskiq worker {second.name}")
    successes = [
        e.step_key
        for e in env.events(run_id)
        if e.dagster_event_type == DagsterEventType.STEP_SUCCESS
    ]
    assert successes == ["hang_first_time"]


def test_resumed_run_whose_step_died_with_the_worker_ends(
    env: LauncherEnv, tmp_path: Path
) -> None:
    """``kill -9`` of the one worker that runs both a run and its step (the default layout: one
    queue). The resumed run sends the step again; Dagster refuses to start an attempt whose
    STEP_START exists, and that must read as a failed step, so the run ends instead of staying
    STARTED forever."""
    queue = f"{env.settings.default_queue}-resume-steps"
    first = env.workers.start(queues=[queue], concurrency=2)
    marker = tmp_path / "step-hung-once.txt"
    run_config = {
        "execution": {"config": {"default_queue": queue, "heartbeat_timeout": HEARTBEAT_TIMEOUT}},
        "ops": {"hang_first_time": {"config": {"path": str(marker)}}},
    }
    run_id = env.launch("stepped_resumable_job", run_config, tags={QUEUE_TAG: queue})
    step_pid = _started(marker, env, run_id)
    first_step_task = env.run_tasks(run_id)["hang_first_time"]
    first.kill()
    wait_for(lambda: not _alive(step_pid), 10, what="the step process to die with its worker")
    second = env.workers.start(queues=[queue], concurrency=2, wait=False)

    _resume_through_run_monitoring(env, tmp_path, run_id)
    second.wait_registered()
    run = env.wait_status(run_id, timeout=90)
    # The step's first attempt started and never ended: with no retry policy the run fails,
    # naming the step, rather than reporting a success that never happened.
    assert run.status == DagsterRunStatus.FAILURE, env.describe(run_id)
    types = env.event_types(run_id)
    assert DagsterEventType.STEP_SUCCESS not in types, env.describe(run_id)
    failures = [
        e for e in env.events(run_id) if e.dagster_event_type == DagsterEventType.STEP_FAILURE
    ]
    assert [e.step_key for e in failures] == ["hang_first_time"], env.describe(run_id)
    # Nothing is left in flight: every task of the run, old and new, is in a final state.
    assert env.record(first_step_task).state.is_final
    for task_id in env.run_tasks(run_id).values():
        wait_for(lambda t=task_id: env.record(t).state.is_final, 30, what=f"task {task_id} final")


def test_twenty_runs_launched_at_once_all_succeed(
    env: LauncherEnv, main_worker: WorkerProcess
) -> None:
    runs = [env.create_run("noop_job") for _ in range(20)]
    workspace = env.context.create_request_context()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda run: env.instance.submit_run(run.run_id, workspace), runs))
    for run in runs:
        done = env.wait_status(run.run_id, timeout=90)
        assert done.status == DagsterRunStatus.SUCCESS, env.describe(run.run_id)
    records = [env.record(env.task_id(run.run_id)) for run in runs]
    assert {(r.worker, r.state) for r in records} == {(main_worker.name, TaskState.DONE)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
