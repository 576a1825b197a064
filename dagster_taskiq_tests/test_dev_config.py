"""What ``dagster-taskiq dev`` reads before it starts anything: the queues the code names (read
by a real subprocess that imports the code) and the ``dagster.yaml`` of the current folder."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from dagster_taskiq.local.cwd_instance import overriding_flags, read_cwd_instance
from dagster_taskiq_tests.local_commands import command_env, new_marker

CODE = textwrap.dedent(
    """
    from dagster import Definitions, graph, job, op
    from dagster_taskiq import taskiq_executor

    @op(tags={"dagster-taskiq/queue": "gpu"})
    def on_gpu():
        return 1

    @op(tags={"dagster-celery/queue": "legacy"})
    def on_legacy(value):
        return value

    @op
    def untagged():
        return 2

    @graph
    def inner():
        return on_legacy(on_gpu())

    @job(executor_def=taskiq_executor, tags={"dagster-taskiq/queue": "runs"})
    def taskiq_job():
        inner()

    @job(executor_def=taskiq_executor.configured({"default_queue": "fixed"}))
    def configured_job():
        untagged()

    @op(tags={"dagster-taskiq/queue": "never"})
    def in_process_op():
        return 3

    @job
    def in_process_job():
        in_process_op()

    defs = Definitions(jobs=[taskiq_job, configured_job, in_process_job])
    """
)


def _scan(folder: Path, *code_args: str) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster_taskiq.local.code_queues",
            "--default-queue",
            "dq",
            "--",
            *code_args,
        ],
        cwd=folder,
        env=command_env(new_marker()),
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_code_queues_are_read_from_jobs_ops_and_the_executor(tmp_path: Path) -> None:
    (tmp_path / "defs.py").write_text(CODE)
    expected = ["dq", "fixed", "gpu", "legacy", "runs"]  # not 'never': that job runs in process
    assert _scan(tmp_path, "-f", "defs.py") == {"queues": expected}
    (tmp_path / "workspace.yaml").write_text(
        yaml.safe_dump({"load_from": [{"python_file": "defs.py"}]})
    )
    assert _scan(tmp_path) == {"queues": expected}  # finds workspace.yaml, as dagster dev does
    broken = _scan(tmp_path, "-f", "missing.py")
    assert "error" in broken and "missing.py" in str(broken["error"])


def _write(folder: Path, document: dict[str, object]) -> Path:
    (folder / "dagster.yaml").write_text(yaml.safe_dump(document))
    return folder


LAUNCHER = {
    "run_launcher": {
        "module": "dagster_taskiq",
        "class": "TaskiqRunLauncher",
        "config": {
            "broker": {"env": "MY_BROKER"},
            "default_queue": "main",
            "config_source": {"key_prefix": "mine"},
            "signing_key": {"env": "MY_KEY"},
        },
    }
}


def test_a_taskiq_launcher_in_the_current_folder_is_used_or_declined_in_one_line(
    tmp_path: Path,
) -> None:
    assert read_cwd_instance(tmp_path, {}).note is None  # no dagster.yaml: nothing to say
    folder = _write(tmp_path, LAUNCHER)
    used = read_cwd_instance(folder, {"MY_BROKER": "redis://127.0.0.1:6379/3"})
    assert used.config == {
        "broker": "redis://127.0.0.1:6379/3",
        "default_queue": "main",
        "config_source": {"key_prefix": "mine"},
    }
    assert used.note is not None and used.note.startswith("Using the TaskiqRunLauncher settings")
    assert used.origin == "./dagster.yaml"

    unset = read_cwd_instance(folder, {})
    assert unset.config == {}
    assert unset.note == (
        "./dagster.yaml names TaskiqRunLauncher; its settings are not used: its broker reads "
        "MY_BROKER, which is not set."
    )
    flags = overriding_flags(None, "redis://127.0.0.1:6379/0", None)
    overridden = read_cwd_instance(folder, {"MY_BROKER": "redis://h/0"}, flags)
    assert overridden.config == {} and overridden.note is not None
    assert overridden.note.endswith("not used: --broker given.")

    bad = dict(LAUNCHER)
    bad["run_launcher"] = {**LAUNCHER["run_launcher"], "config": {"config_source": {"typo": 1}}}
    invalid = read_cwd_instance(_write(tmp_path, bad), {})
    assert invalid.config == {} and invalid.note is not None and "typo" in invalid.note

    other = read_cwd_instance(_write(tmp_path, {"telemetry": {"enabled": False}}), {})
    assert other.config == {} and other.note is not None
    assert other.note.startswith("./dagster.yaml is not used: it does not name TaskiqRunLauncher")
