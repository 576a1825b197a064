"""``task show/revoke`` and ``queue purge`` against real workers and runs, on both brokers."""

import json
import time
import uuid
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob, build_reconstructable_job

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests.harness import WorkerPool, wait_for
from dagster_taskiq_tests.scenario_jobs import LOG_ENV, read_notes
from dagster_taskiq_tests.scenario_support import (
    RunSummary,
    in_background,
    pid_alive,
    run_job,
    task_records,
    wait_new_run,
    wait_states,
)
from dagster_taskiq_tests.test_ops_dead_letters import cli


@pytest.fixture
def order_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the test ops append to (set before any worker starts)."""
    path = tmp_path / "order.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


def ops_job(name: str, **kwargs: str) -> ReconstructableJob:
    """A job from :mod:`dagster_taskiq_tests.ops_jobs`, reconstructable by workers."""
    if kwargs:
        return build_reconstructable_job(
            "dagster_taskiq_tests.ops_jobs", name, reconstructable_kwargs=kwargs
        )
    from dagster import reconstructable

    from dagster_taskiq_tests import ops_jobs

    return reconstructable(getattr(ops_jobs, name))


def failure_messages(instance: DagsterInstance, run_id: str) -> str:
    """The error message of every step failure in the run's event log, one per line."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    return "\n".join(
        r.event_log_entry.dagster_event.step_failure_data.error.message
        for r in records
        if r.event_log_entry.dagster_event is not None
        and r.event_log_entry.dagster_event.step_failure_data.error is not None
    )


def test_task_revoke_stops_a_running_step_and_the_run_says_why(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
    tmp_path: Path,
) -> None:
    workers.start()
    known = {r.run_id for r in instance.get_runs()}
    future = in_background(lambda: run_job(ops_job("held_step_job"), instance, settings))
    run = wait_new_run(instance, known, timeout=60)
    records = wait_states(settings, run.run_id, {"held": "running"}, timeout=60)
    task_id = records["held"].task_id
    pid = wait_for(
        lambda: next((p for _, p, rid, what in read_notes(order_log)
                      if rid == run.run_id and what == "start held"), None),
        30,
        what="the held step's process to start",
    )  # fmt: skip

    shown = cli(settings, tmp_path, "task", "show", task_id, "--json")
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["task_id"] == task_id and document["run_id"] == run.run_id
    assert document["kind"] == "step" and document["step_key"] == "held"
    assert document["queue"] == settings.default_queue and document["state"] == "running"
    assert document["worker"] and document["attempt"] == 1 and document["started_at"]
    plain = cli(settings, tmp_path, "task", "show", task_id)
    assert plain.exit_code == 0 and "state:" in plain.output and "running" in plain.output

    started = time.monotonic()
    revoked = cli(settings, tmp_path, "task", "revoke", task_id)
    assert revoked.exit_code == 0, revoked.output
    assert f"Revoked task {task_id} (was running)" in revoked.output
    wait_for(lambda: not pid_alive(pid), 5.0, what="the revoked step's process to stop")
    assert time.monotonic() - started < 5.0

    summary: RunSummary = future.result(timeout=120)
    assert not summary.success
    failures = [e for e in summary.events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert [e.step_key for e in failures] == ["held"], summary.events
    log = failure_messages(instance, run.run_id)
    assert "by an operator with 'dagster-taskiq task revoke'" in log, log

    again = cli(settings, tmp_path, "task", "revoke", task_id)
    assert again.exit_code == 0 and "nothing to revoke" in again.output
    unknown = cli(settings, tmp_path, "task", "show", "no-such-task")
    assert unknown.exit_code == 1 and "No task no-such-task" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1


def test_queue_purge_ends_the_waiting_run_with_the_reason(
    instance: DagsterInstance, settings: TaskiqSettings, tmp_path: Path
) -> None:
    queue = f"unserved-{uuid.uuid4().hex[:8]}"
    known = {r.run_id for r in instance.get_runs()}
    future = in_background(
        lambda: run_job(ops_job("stranded_job", queue=queue), instance, settings)
    )
    run = wait_new_run(instance, known, timeout=60)

    def _both_sent() -> bool:
        records = task_records(settings, run.run_id)
        waiting = [records.get(k) for k in ("waiting_a", "waiting_b")]
        return all(r is not None and r.state == "queued" and r.sent_at for r in waiting)

    wait_for(_both_sent, 60, what="both steps to wait on the unserved queue")
    status = cli(settings, tmp_path, "status", "--json")
    assert status.exit_code == 0, status.output
    depth = {q["name"]: q["in_broker"] for q in json.loads(status.stdout)["queues"]}
    assert depth.get(queue) == 2, status.output

    declined = cli(settings, tmp_path, "queue", "purge", queue, stdin="n\n")
    assert declined.exit_code == 1
    assert {r.state for r in task_records(settings, run.run_id).values()} == {"queued"}

    purged = cli(settings, tmp_path, "queue", "purge", queue, "--yes")
    assert purged.exit_code == 0, purged.output
    assert "revoked 2 waiting task(s), removed 2 message(s)" in purged.output

    summary: RunSummary = future.result(timeout=120)
    assert not summary.success
    failed = {e.step_key for e in summary.events if e.event_type == DagsterEventType.STEP_FAILURE}
    assert failed == {"waiting_a", "waiting_b"}, summary.events
    log = failure_messages(instance, run.run_id)
    assert f"queue '{queue}' was purged by an operator" in log, log
    after = cli(settings, tmp_path, "status", "--json")
    depth = {q["name"]: q["in_broker"] for q in json.loads(after.stdout)["queues"]}
    assert not depth.get(queue), after.output
