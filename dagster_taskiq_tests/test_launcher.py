"""TaskiqRunLauncher on Redis and on RabbitMQ: launch, routing, priority, termination.

Each broker gets one Dagster instance (sqlite, ``run_launcher: TaskiqRunLauncher``) and one
long-lived worker for its default queue; tests that need other workers start them on queues of
their own, so tests never take each other's tasks.
"""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from dagster import DagsterEventType, DagsterInstance
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRunStatus

from dagster_taskiq.cli import main as cli
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.errors import BrokerUnavailableError, TaskiqConfigError
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.lifecycle.states import TaskState
from dagster_taskiq.tags import QUEUE_TAG, RUN_PRIORITY_TAG, TASK_ID_TAG
from dagster_taskiq_tests.harness import (
    WorkerProcess,
    executor_config,
    isolated_settings,
    wait_for,
)
from dagster_taskiq_tests.launcher_harness import (
    LauncherEnv,
    dagster_yaml,
    launcher_env,
    sqlite_storage,
    write_home,
)
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require

TERMINATE_DEADLINE = 10.0
#: The interface's promise: an unreachable broker gives a clear error within 10 s.
UNREACHABLE_DEADLINE = 10.0


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LauncherEnv]:
    """One launcher instance per broker, shared by this module's tests."""
    require(REDIS_URL, "Redis")
    if request.param == "rabbitmq":
        require(AMQP_URL, "RabbitMQ")
    settings = isolated_settings(request.param, REDIS_URL, AMQP_URL, heartbeat_timeout=5.0)
    with launcher_env(request.param, tmp_path_factory, settings) as launcher_env_:
        yield launcher_env_


@pytest.fixture(scope="module")
def main_worker(env: LauncherEnv) -> WorkerProcess:
    """The worker serving the launcher's default queue."""
    return env.workers.start(concurrency=2)


def _cli(env: LauncherEnv, *args: str) -> Any:
    path = env.home / "cli.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(executor_config(env.settings)))
    result = CliRunner().invoke(cli, [*args, "-y", str(path)])
    assert result.exit_code == 0, result.output
    return result


def _status(env: LauncherEnv) -> dict[str, Any]:
    return json.loads(_cli(env, "status", "--json").output)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _started_pid(path: Path) -> int:
    line = wait_for(lambda: path.exists() and path.read_text(), 60, what=f"an op to write {path}")
    return int(line.split()[1])


def test_noop_run_succeeds(env: LauncherEnv, main_worker: WorkerProcess) -> None:
    run_id = env.launch("noop_job")
    run = env.wait_status(run_id)
    assert run.status == DagsterRunStatus.SUCCESS, env.describe(run_id)

    task_id = run.tags[TASK_ID_TAG]
    assert task_id.startswith(f"{run_id}.run.")
    sent = env.wait_event(run_id, "Sent run to taskiq queue")
    assert f"'{env.settings.default_queue}'" in sent.message and task_id in sent.message
    started = env.wait_event(run_id, f"Started run on taskiq worker {main_worker.name} (pid: ")
    run_pid = int(started.message.split("(pid: ")[1].rstrip(").").strip())
    assert run_pid != main_worker.pid  # the run executed in a child process of the worker

    record = wait_for(lambda: (r := env.record(task_id)).state == TaskState.DONE and r)
    assert record.kind == "run" and record.worker == main_worker.name
    health = env.launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.SUCCESS, health.msg
    info = env.launcher.get_run_worker_debug_info(run)
    assert info is not None
    for part in (task_id, f"queue '{env.settings.default_queue}'", "state done", main_worker.name):
        assert part in info, info
    assert "Last heartbeat:" in info and "Outcome: success" in info

    assert env.launcher.terminate(run_id) is False  # finished
    assert env.launcher.terminate("no-such-run") is False  # unknown


def test_terminate_looping_run(
    env: LauncherEnv, main_worker: WorkerProcess, tmp_path: Path
) -> None:
    started = tmp_path / "started.txt"
    run_id = env.launch(
        "looping_job", {"ops": {"loop_forever": {"config": {"path": str(started)}}}}
    )
    pid = _started_pid(started)
    run = env.run(run_id)
    health = env.launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.RUNNING, health.msg
    assert main_worker.name in health.msg and "last heartbeat" in health.msg
    info = env.launcher.get_run_worker_debug_info(run)
    assert info is not None and "state running" in info and main_worker.name in info

    begin = time.monotonic()
    assert env.launcher.terminate(run_id) is True
    run = env.wait_status(run_id, timeout=TERMINATE_DEADLINE)
    elapsed = time.monotonic() - begin
    assert run.status == DagsterRunStatus.CANCELED, env.describe(run_id)
    assert elapsed < TERMINATE_DEADLINE
    types = env.event_types(run_id)
    assert DagsterEventType.RUN_CANCELING in types and DagsterEventType.RUN_CANCELED in types
    wait_for(lambda: not _pid_alive(pid), 10, what=f"the run's process {pid} to exit")
    task_id = run.tags[TASK_ID_TAG]
    wait_for(
        lambda: env.record(task_id).state == TaskState.REVOKED, 10, what="the run task revoked"
    )
    assert env.launcher.terminate(run_id) is False


def test_queued_runs_status_priority_and_termination(env: LauncherEnv) -> None:
    queue = f"{env.settings.default_queue}-solo"
    priorities = {"low": 1, "doomed": 3, "mid": 5, "high": 9}
    runs = {
        label: env.launch("noop_job", tags={QUEUE_TAG: queue, RUN_PRIORITY_TAG: str(priority)})
        for label, priority in priorities.items()
    }
    tasks = {label: env.task_id(run_id) for label, run_id in runs.items()}

    # No worker serves the queue: every run waits, and `status` shows them by priority.
    document = _status(env)
    (entry,) = [q for q in document["queues"] if q["name"] == queue]
    assert entry["waiting"] == 4
    assert entry["by_priority"] == {"9": 1, "5": 1, "3": 1, "1": 1}
    assert list(entry["by_priority"]) == ["9", "5", "3", "1"]
    queued = {t["task_id"]: t for t in document["in_flight"] if t["queue"] == queue}
    assert set(queued) == set(tasks.values())
    for label, task_id in tasks.items():
        item = queued[task_id]
        assert item["run_id"] == runs[label] and item["kind"] == "run"
        assert item["state"] == "queued" and item["worker"] is None
        assert item["priority"] == priorities[label] and item["elapsed_s"] >= 0
    table = _cli(env, "status").output
    assert queue in table and "p9:1 p5:1 p3:1 p1:1" in table
    for label in priorities:
        assert env.record(tasks[label]).state == TaskState.QUEUED
        health = env.launcher.check_run_worker_health(env.run(runs[label]))
        assert health.status == WorkerStatus.RUNNING and f"queue '{queue}'" in health.msg

    # Terminating a queued run cancels it at once; it never starts.
    assert env.launcher.terminate(runs["doomed"]) is True
    assert env.run(runs["doomed"]).status == DagsterRunStatus.CANCELED
    entry = next(q for q in _status(env)["queues"] if q["name"] == queue)
    assert entry["waiting"] == 3 and "3" not in entry["by_priority"]

    # One single-slot worker for the queue takes the highest run priority first.
    solo = env.workers.start(queues=[queue], concurrency=1)
    for label in ("low", "mid", "high"):
        run = env.wait_status(runs[label])
        assert run.status == DagsterRunStatus.SUCCESS, env.describe(runs[label])
    started = {label: env.record(tasks[label]).started_at for label in ("low", "mid", "high")}
    assert all(started.values())
    assert sorted(started, key=lambda label: started[label]) == ["high", "mid", "low"], started
    assert {env.record(tasks[label]).worker for label in started} == {solo.name}

    assert env.run(runs["doomed"]).status == DagsterRunStatus.CANCELED
    assert DagsterEventType.RUN_START not in env.event_types(runs["doomed"])
    doomed_task = tasks["doomed"]
    wait_for(
        lambda: f"Not running task {doomed_task}: it is revoked" in solo.log(),
        10,
        what="the revoked run skipped",
    )
    assert env.record(tasks["doomed"]).state == TaskState.REVOKED


def test_steps_of_launched_run_share_one_single_slot_worker(env: LauncherEnv) -> None:
    """A launched run using taskiq_executor sends its steps out with the launcher's broker and
    backend; one worker with one slot runs the run *and* its steps (no run/step deadlock)."""
    queue = f"{env.settings.default_queue}-shared"
    solo = env.workers.start(queues=[queue], concurrency=1)
    run_config = {"execution": {"config": {"default_queue": queue}}}
    run_id = env.launch("stepped_job", run_config, tags={QUEUE_TAG: queue})
    run = env.wait_status(run_id, timeout=60)
    assert run.status == DagsterRunStatus.SUCCESS, env.describe(run_id)

    index = env.run_tasks(run_id)
    assert set(index) == {"__run__", "first_step", "second_step"}
    for key in index:
        record = env.record(index[key])
        assert record.worker == solo.name and record.queue == queue, record
        assert record.kind == ("run" if key == "__run__" else "step")
    env.wait_event(run_id, f"Sent step first_step to taskiq queue '{queue}'")


def test_terminate_revokes_steps_on_other_workers(
    env: LauncherEnv, main_worker: WorkerProcess, tmp_path: Path
) -> None:
    """The run executes on the main worker, its looping step on another one."""
    runner = main_worker
    step_queue = f"{env.settings.default_queue}-steps"
    stepper = env.workers.start(queues=[step_queue], concurrency=1)
    started = tmp_path / "step.txt"
    run_config = {
        "execution": {"config": {"default_queue": step_queue}},
        "ops": {"step_loops": {"config": {"path": str(started)}}},
    }
    run_id = env.launch("stepped_looping_job", run_config)
    step_pid = _started_pid(started)
    step_task = env.run_tasks(run_id)["step_loops"]
    assert env.record(step_task).worker == stepper.name

    # `status` shows both tasks in flight: run, step, worker and elapsed time.
    in_flight = {t["task_id"]: t for t in _status(env)["in_flight"]}
    step = in_flight[step_task]
    assert (step["run_id"], step["step_key"], step["worker"]) == (
        run_id,
        "step_loops",
        stepper.name,
    )
    assert step["kind"] == "step" and step["state"] == "running" and step["elapsed_s"] > 0
    run_task = in_flight[env.task_id(run_id)]
    assert run_task["kind"] == "run" and run_task["worker"] == runner.name
    table = _cli(env, "status").output
    assert "step_loops" in table and stepper.name in table and run_id in table

    begin = time.monotonic()
    assert env.launcher.terminate(run_id) is True
    run = env.wait_status(run_id, timeout=TERMINATE_DEADLINE)
    assert run.status == DagsterRunStatus.CANCELED, env.describe(run_id)
    assert time.monotonic() - begin < TERMINATE_DEADLINE
    revoked = env.wait_event(run_id, "step task(s) in flight")
    assert "1 step task(s) in flight: step_loops" in revoked.message
    wait_for(lambda: not _pid_alive(step_pid), 10, what=f"the step process {step_pid} to exit")
    wait_for(lambda: env.record(step_task).state == TaskState.REVOKED, 10, what="the step revoked")


def test_launcher_config_is_validated(tmp_path: Path) -> None:
    launcher = TaskiqRunLauncher(
        broker="amqp://guest:secret@127.0.0.1:5672/",
        backend="redis://127.0.0.1:6379/2",
        default_queue="runs",
        heartbeat_timeout=7.5,
        config_source={"key_prefix": "p"},
    )
    settings = launcher.settings
    assert (settings.broker_kind, settings.default_queue, settings.heartbeat_timeout) == (
        "rabbitmq",
        "runs",
        7.5,
    )
    assert settings.key_prefix == "p"
    assert launcher.supports_resume_run and launcher.supports_check_run_worker_health
    with pytest.raises(TaskiqConfigError, match="kafka://"):
        TaskiqRunLauncher(broker="kafka://127.0.0.1:9092")
    with pytest.raises(TaskiqConfigError, match="must be Redis"):
        TaskiqRunLauncher(broker="redis://127.0.0.1:6379/0", backend="amqp://127.0.0.1/")

    # Through dagster.yaml, Dagster's own config error names the unknown key.
    home = tmp_path / "home"
    home.mkdir()
    config = dagster_yaml(TaskiqSettings(), sqlite_storage(home / "storage"))
    config["run_launcher"]["config"]["brokr"] = "redis://127.0.0.1:6379/0"
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DagsterInvalidConfigError, match="brokr"):
        with DagsterInstance.from_config(str(home)) as instance:
            _ = instance.run_launcher  # loading the launcher validates its config


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker_fails_the_launch_quickly(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, scheme: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = (
        f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://u:pw@127.0.0.1:{port}/"
    )
    settings = isolated_settings("redis", redis_url, AMQP_URL)
    settings = TaskiqSettings(
        broker_url=broker,
        backend_url=redis_url,
        default_queue=settings.default_queue,
        config_source=settings.config_source,
    )
    home = tmp_path_factory.mktemp("unreachable")
    write_home(home, settings, sqlite_storage(home / "storage"))
    with ExitStack() as stack:
        env = LauncherEnv(settings, home, stack)
        run = env.create_run("noop_job")
        begin = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}"):
            env.instance.submit_run(run.run_id, env.context.create_request_context())
        assert time.monotonic() - begin < UNREACHABLE_DEADLINE
        assert env.run(run.run_id).status == DagsterRunStatus.FAILURE
        error = env.wait_event(run.run_id, "Could not reach the broker")
        assert "pw@" not in error.message
