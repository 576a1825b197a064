"""``dagster-taskiq dev``: UI, workers and embedded broker up on loopback; Ctrl-C stops them all."""

import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient

from dagster_taskiq.local.dev import webserver_answers
from dagster_taskiq.tags import TASK_ID_TAG
from dagster_taskiq_tests.harness import REPO_ROOT, wait_for
from dagster_taskiq_tests.local_commands import (
    cli,
    command_env,
    describe,
    kill_marked,
    marked_processes,
    new_marker,
)

EXAMPLE_DIR = REPO_ROOT / "example"
_RUN_TAGS = """
query RunTags($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { tags { key value } } }
}
"""


@pytest.fixture
def marker() -> Iterator[str]:
    """A marker every process of the command inherits."""
    value = new_marker()
    yield value
    kill_marked(value)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _launch_and_wait(port: int, timeout: float) -> tuple[str, str, dict[str, str]]:
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution("daily_sales", repository_location_name="sales_pipeline")
    deadline = time.monotonic() + timeout
    status = client.get_run_status(run_id)
    while status.value not in ("SUCCESS", "FAILURE", "CANCELED") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_run_status(run_id)
    tags = client._execute(_RUN_TAGS, {"runId": run_id})["runOrError"]["tags"]
    return run_id, status.value, {t["key"]: t["value"] for t in tags}


def test_dev_serves_the_ui_runs_on_workers_and_stops_on_ctrl_c(marker: str, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "dev.log"
    with open(log, "w") as out:
        dev = subprocess.Popen(
            cli("dev", "-q", "dagster", "-q", "compute", "--workers", "2", "-p", str(port)),
            env=command_env(marker),
            cwd=EXAMPLE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "Press Ctrl-C" in log.read_text() or dev.poll() is not None,
            timeout=150,
            interval=0.25,
            what="dagster-taskiq dev to come up",
        )
        output = log.read_text()
        assert dev.poll() is None, output
        assert webserver_answers(f"http://127.0.0.1:{port}")
        broker = re.search(r"dagster-taskiq status --broker (\S+)", output)
        assert broker is not None and broker.group(1).startswith("unix://"), output
        listed = subprocess.run(
            cli("worker", "list", "--broker", broker.group(1)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"^dev-1\s.*dagster,compute\s+2\s", listed.stdout, re.M), listed.stdout
        assert re.search(r"^dev-2\s", listed.stdout, re.M), listed.stdout

        run_id, status, tags = _launch_and_wait(port, timeout=120)
        assert status == "SUCCESS", log.read_text()[-3000:]
        assert tags.get(TASK_ID_TAG, "").startswith(run_id)  # launched by TaskiqRunLauncher

        started = marked_processes(marker)
        assert len(started) >= 6, describe(started)  # redis, 2 workers, dagster dev and its servers
        dev.send_signal(signal.SIGINT)
        assert dev.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    output = log.read_text()
    assert "Stopped." in output
    try:
        wait_for(lambda: not marked_processes(marker), timeout=10, what="no leftover processes")
    except AssertionError:
        raise AssertionError(f"left behind:\n{describe(marked_processes(marker))}") from None
    for directory in re.findall(r"(/\S+/dagster-taskiq-(?:redis|dev)-[^/\s]+)", output):
        assert not Path(directory).exists(), f"{directory} was not removed"


def test_dev_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        from click.testing import CliRunner

        from dagster_taskiq.cli import main

        result = CliRunner().invoke(main, ["dev", "-p", str(port)])
    assert result.exit_code == 1
    assert f"Port {port} on 127.0.0.1 is already in use" in result.output


def test_dev_without_queues_serves_what_the_code_names_quietly(marker: str, tmp_path: Path) -> None:
    """No -q: the workers serve every queue the example's jobs and ops name (so its 'compute'
    steps run), the output says so, and Dagster's irrelevant warnings are gone."""
    port = _free_port()
    log = tmp_path / "dev.log"
    with open(log, "w") as out:
        dev = subprocess.Popen(
            cli("dev", "--workers", "1", "-p", str(port)),
            env=command_env(marker),
            cwd=EXAMPLE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "Press Ctrl-C" in log.read_text() or dev.poll() is not None,
            timeout=150,
            interval=0.25,
            what="dagster-taskiq dev to come up",
        )
        output = log.read_text()
        assert dev.poll() is None, output
        assert re.search(
            r"workers\s+dev-1 on queue\(s\) compute, dagster, .*named by the code's jobs", output
        ), output
        assert (
            "./dagster.yaml names TaskiqRunLauncher; its settings are not used: its broker reads "
            "DAGSTER_TASKIQ_BROKER_URL, which is not set." in output
        ), output
        _, status, _ = _launch_and_wait(port, timeout=120)
        assert status == "SUCCESS", log.read_text()[-3000:]
        dev.send_signal(signal.SIGINT)
        assert dev.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    output = log.read_text()
    assert "SupersessionWarning" not in output and "dev_command" not in output, output
    assert "Found a dagster instance configuration" not in output, output
    wait_for(lambda: not marked_processes(marker), timeout=10, what="no leftover processes")
