"""Facts the Dagster UI shows: where a step started and how long it waited, and a warning when a
step waits on a queue that no live worker serves. Real workers, on Redis and on RabbitMQ."""

import logging
import socket
import time
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.lifecycle.records import TaskRecord, WorkerInfo
from dagster_taskiq.lifecycle.states import TaskKind, TaskState, WorkerState
from dagster_taskiq.queue_watch import (
    GRACE_FRACTION,
    UnservedQueueWatch,
    start_command,
    unserved_prefix,
)
from dagster_taskiq_tests.harness import WorkerPool, isolated_settings, wait_for
from dagster_taskiq_tests.scenario_support import (
    in_background,
    run_job,
    task_records,
    wait_heartbeats,
    wait_new_run,
)
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL
from dagster_taskiq_tests.ui_jobs import recon

HEARTBEAT_TIMEOUT = 6.0
UNSERVED_WARNING = "No live worker serves queue"


@pytest.fixture
def settings(broker_kind: str) -> TaskiqSettings:
    """Isolated settings with a short heartbeat timeout, so the no-worker check comes soon."""
    return isolated_settings(broker_kind, REDIS_URL, AMQP_URL, heartbeat_timeout=HEARTBEAT_TIMEOUT)


def _unserved_warnings(instance: DagsterInstance, run_id: str) -> list[Any]:
    return [
        entry
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if UNSERVED_WARNING in (entry.dagster_event.message or "")
    ]


def _metadata(entry: Any) -> dict[str, Any]:
    data = entry.dagster_event.event_specific_data
    return {key: value.value for key, value in data.metadata.items()}


def test_unserved_queue_warns_once_and_step_started_metadata(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    """Two steps wait on a queue nobody serves: the run gets one warning naming the queue and the
    command that starts a worker for it, within heartbeat_timeout. A worker started for it then
    runs them. Every step-started event names the worker, host, pid, queue, task and wait."""
    unserved = f"{settings.default_queue}.far"
    home_worker = workers.start()
    job = recon("served_and_unserved_job", unserved_queue=unserved)
    future = in_background(lambda: run_job(job, instance, settings))
    run = wait_new_run(instance, set(), future=future)
    sent = wait_for(
        lambda: (
            (records := task_records(settings, run.run_id)).keys() >= {"there_a", "there_b"}
            and records
        ),
        what="the unserved steps' tasks",
    )
    warnings = wait_for(
        lambda: _unserved_warnings(instance, run.run_id),
        timeout=HEARTBEAT_TIMEOUT + 5,
        what="the no-worker warning",
    )
    submitted = min(sent["there_a"].submitted_at, sent["there_b"].submitted_at)
    assert warnings[0].timestamp - submitted < HEARTBEAT_TIMEOUT
    # Keep both steps waiting through several more health checks before serving the queue.
    wait_heartbeats(settings, home_worker.name, after=time.time() + HEARTBEAT_TIMEOUT)
    far_worker = workers.start(queues=[unserved])
    summary = future.result(timeout=120)
    assert summary.success

    warnings = _unserved_warnings(instance, run.run_id)
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning.level == logging.WARNING
    message = warning.dagster_event.message
    assert f"'{unserved}'" in message and f"dagster-taskiq worker start -q {unserved}" in message
    assert f"'{settings.default_queue}'" in message  # what the live worker does serve
    assert _metadata(warning)["taskiq_queue"] == unserved

    records = task_records(settings, run.run_id)
    started = {
        entry.step_key: _metadata(entry)
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_WORKER_STARTED)
    }
    assert set(started) == {"here", "there_a", "there_b"}
    for step_key, facts in started.items():
        far = step_key != "here"
        assert facts["worker"] == (far_worker.name if far else home_worker.name)
        assert facts["host"] == socket.gethostname()
        assert facts["queue"] == (unserved if far else settings.default_queue)
        assert facts["task_id"] == records[step_key].task_id
        # The step's own process, forked by the worker (whose pid the task record holds).
        assert 0 < int(facts["pid"]) != records[step_key].pid
        wait = facts["queue_wait_seconds"]
        assert 0 <= wait < 120
        if far:  # these waited for their worker at least until the warning
            assert wait >= warning.timestamp - records[step_key].submitted_at - 1


def _queued(queue: str, run_id: str, submitted_at: float, task_id: str = "t1") -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        kind=TaskKind.STEP,
        run_id=run_id,
        step_key="s",
        queue=queue,
        priority=5,
        state=TaskState.QUEUED,
        worker=None,
        fence=0,
        submitted_at=submitted_at,
        sent_at=submitted_at,
        claimed_at=None,
        started_at=None,
        finished_at=None,
        last_heartbeat=None,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        status=None,
        pid=None,
        deliveries=0,
        requeued_at=None,
        lease_alive=False,
    )


def _worker(queues: tuple[str, ...], state: WorkerState) -> WorkerInfo:
    return WorkerInfo("w", "h", 1, queues, 1, (), 0.0, 0.0, state=state.value)


def test_queue_watch_rules() -> None:
    """The watch waits out its grace, ignores draining workers, and warns once per run and
    queue; the start command keeps passwords out and asks for a config file when needed."""
    settings = TaskiqSettings(heartbeat_timeout=HEARTBEAT_TIMEOUT)
    watch = UnservedQueueWatch(settings)
    now = 1000.0
    grace = HEARTBEAT_TIMEOUT * GRACE_FRACTION
    fresh = _queued("q", "r1", now - grace / 2)
    old = _queued("q", "r1", now - grace - 1)
    assert not watch.due(fresh, now) and watch.due(old, now)
    assert watch.needs_workers()
    watch.update_workers(
        [_worker(("q",), WorkerState.DRAINING), _worker(("p",), WorkerState.SERVING)]
    )
    assert not watch.needs_workers()
    warning = watch.check(old, now)
    assert warning is not None and warning.queue == "q" and warning.served_queues == ("p",)
    assert warning.message().startswith(unserved_prefix("q") + " step 's' (task t1)")
    assert watch.check(_queued("q", "r1", now - 100, "t2"), now) is None  # same run and queue
    assert watch.check(_queued("q", "r2", now - 100), now) is not None  # another run
    watch.update_workers([_worker(("x",), WorkerState.STARTING)])
    assert watch.check(_queued("x", "r1", now - 100), now) is None  # served (starting worker)

    plain = TaskiqSettings(broker_url="redis://:pw@h:6379/0", backend_url="redis://:pw@h:6379/0")
    assert (
        start_command("q", plain)
        == "dagster-taskiq worker start -q q --broker redis://:***@h:6379/0"
    )
    prefixed = TaskiqSettings(config_source={"key_prefix": "p"})
    assert "-q q -y CONFIG.yaml" in start_command("q", prefixed)
