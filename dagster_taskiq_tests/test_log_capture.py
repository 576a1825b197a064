"""A step's stdout and stderr are captured (and mirrored to the worker) without a watcher
interpreter per stream, and the mirroring ``tail`` never outlives a step process."""

import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.worker.logtail import gnu_tail_available
from dagster_taskiq_tests import log_capture_jobs as jobs
from dagster_taskiq_tests.harness import WorkerPool, executor_config, wait_for

needs_gnu_tail = pytest.mark.skipif(not gnu_tail_available(), reason="needs GNU coreutils tail")


@needs_gnu_tail
@pytest.mark.parametrize("broker_kind", ["redis"], indirect=True)
def test_step_output_is_captured_and_mirrored_by_one_tail_per_stream(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    worker = workers.start()
    run_config = executor_config(settings)
    with execute_job(reconstructable(jobs.chatty_job), instance, run_config=run_config) as result:
        assert result.success
        helpers = result.output_for_node("chatty")
        run_id = result.run_id
    # The capture's helpers: one `tail --pid=<step process>` per stream, no watcher interpreter.
    assert len(helpers) == 2, helpers
    assert all(h.startswith("tail -F -c +0 --pid=") for h in helpers), helpers
    assert not any("watch_orphans" in h for h in helpers), helpers

    captured = [
        e
        for e in instance.all_logs(run_id, of_type=DagsterEventType.LOGS_CAPTURED)
        if e.dagster_event is not None
    ]
    assert len(captured) == 1
    file_key = captured[0].dagster_event.logs_captured_data.file_key  # type: ignore[union-attr]
    manager = instance.compute_log_manager
    log_key = manager.build_log_key_for_run(run_id, file_key)
    data = manager.get_log_data(log_key)
    assert data.stdout is not None and jobs.STDOUT_TEXT in data.stdout.decode()
    assert data.stderr is not None and jobs.STDERR_TEXT in data.stderr.decode()
    # Mirrored to the worker's own output, as Dagster's capture does.
    wait_for(
        lambda: jobs.STDOUT_TEXT in worker.log() and jobs.STDERR_TEXT in worker.log(),
        timeout=10,
        what="the step's output in the worker log",
    )
    assert manager.is_capture_complete(log_key)


@needs_gnu_tail
def test_tail_exits_when_its_process_dies_abruptly(tmp_path: Path) -> None:
    """No orphan: a process killed mid-capture leaves no ``tail`` behind."""
    path = tmp_path / "out.log"
    script = f"""
import os, sys
from dagster._core.execution import compute_logs
from dagster_taskiq.worker.logtail import use_pid_watching_tail
assert use_pid_watching_tail()
with compute_logs.mirror_stream_to_file(sys.stdout, {str(path)!r}) as pids:
    print(pids[0], file=sys.stderr, flush=True)
    os._exit(9)  # no clean-up, like a SIGKILL
"""
    # Files, not pipes, for the outputs: the orphaned tail inherits them.
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        code = subprocess.call([sys.executable, "-c", script], stdout=stdout, stderr=stderr)
    assert code == 9, err.read_text()
    tail_pid = int(err.read_text().strip().splitlines()[-1])

    def gone() -> bool:
        try:
            return psutil.Process(tail_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, timeout=10, what=f"tail {tail_pid} to exit")
