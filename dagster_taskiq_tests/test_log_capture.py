"""A step's stdout and stderr are captured, and mirrored to the worker by a thread in the step
process: no helper process per stream, nothing left behind when a step process dies, and no
output lost at the end of a capture."""

import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests import log_capture_jobs as jobs
from dagster_taskiq_tests.harness import WorkerPool, executor_config, wait_for


@pytest.mark.parametrize("broker_kind", ["redis"], indirect=True)
def test_step_output_is_captured_and_mirrored_without_helper_processes(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    worker = workers.start()
    run_config = executor_config(settings)
    with execute_job(reconstructable(jobs.chatty_job), instance, run_config=run_config) as result:
        assert result.success
        helpers = result.output_for_node("chatty")
        run_id = result.run_id
    # No `tail` and no watcher interpreter: the step process started no helper at all.
    assert helpers == [], helpers

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


def test_mirror_copies_the_last_lines_and_needs_no_clean_up(tmp_path: Path) -> None:
    """Lines written just before a capture ends reach the mirror, and an abrupt exit mid-capture
    keeps what was captured."""
    path = tmp_path / "out.log"
    script = f"""
import os, sys
from dagster._core.execution import compute_logs
from dagster_taskiq.worker.logtail import use_thread_mirroring
assert use_thread_mirroring()
with compute_logs.mirror_stream_to_file(sys.stdout, {str(path)!r}):
    for n in range(3):
        print("line", n)
print("after capture", flush=True)
with compute_logs.mirror_stream_to_file(sys.stdout, {str(path)!r}):
    print("last words", flush=True)
    os._exit(9)  # no clean-up, like a SIGKILL
"""
    out = tmp_path / "stdout"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=stdout)
        code = proc.wait(60)
    assert code == 9
    mirrored = out.read_text().splitlines()
    # The first capture was mirrored completely, even its last line, and before the capture
    # ended (so before "after capture" was printed).
    assert mirrored[:4] == ["line 0", "line 1", "line 2", "after capture"], mirrored
    captured = path.read_text().splitlines()
    assert captured == ["line 0", "line 1", "line 2", "last words"], captured
