"""A real client: ``dagster-webserver`` on loopback with ``TaskiqRunLauncher``, driven through
its GraphQL API by the ``dagster-graphql`` Python client."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.tags import TASK_ID_TAG
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerPool,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.launcher_harness import JOBS_MODULE, sqlite_storage, write_home
from dagster_taskiq_tests.services import AMQP_URL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Webserver:
    """A ``dagster-webserver`` process on 127.0.0.1 and a GraphQL client for it."""

    def __init__(self, home: Path, workspace: Path, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(home)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "dagster_webserver"),
                    *("-h", "127.0.0.1", "-p", str(self.port), "-w", str(workspace)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(home),
                start_new_session=True,
            )
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=30)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the server answers HTTP on its port."""

        def _ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"dagster-webserver exited:\n{self.log.read_text()}")
            return _answers(f"http://127.0.0.1:{self.port}/server_info")

        wait_for(_ready, timeout, interval=0.2, what="dagster-webserver to answer")

    def submit(self, job_name: str, run_config: dict[str, object], timeout: float = 60.0) -> str:
        """Submit a job through GraphQL, retrying while the code location is still loading."""
        last: list[Exception] = []

        def _submit() -> str | None:
            try:
                return self.client.submit_job_execution(job_name, run_config=run_config)
            except DagsterGraphQLClientError as exc:
                last[:] = [exc]
                return None

        try:
            return wait_for(_submit, timeout, interval=0.5, what=f"GraphQL to launch {job_name}")
        except AssertionError:
            raise AssertionError(f"{last}\n{self.log.read_text()}") from None

    def status(self, run_id: str) -> DagsterRunStatus:
        """The run's status, as the GraphQL API reports it."""
        return self.client.get_run_status(run_id)

    def stop(self) -> None:
        """SIGTERM the server's process group (the server and its code-server child)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def settings(redis_url: str) -> TaskiqSettings:
    """Isolated Redis settings for the launcher and the worker."""
    return isolated_settings("redis", redis_url, AMQP_URL, heartbeat_timeout=10.0)


@pytest.fixture
def home(tmp_path: Path, settings: TaskiqSettings) -> Path:
    """DAGSTER_HOME with a dagster.yaml whose run launcher is TaskiqRunLauncher."""
    return write_home(tmp_path / "home", settings, sqlite_storage(tmp_path / "home" / "storage"))


@pytest.fixture
def webserver(home: Path, tmp_path: Path) -> Iterator[Webserver]:
    """A running ``dagster-webserver`` whose workspace holds the launcher test jobs."""
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_module": {
                            "module_name": JOBS_MODULE,
                            "attribute": "defs",
                            "working_directory": str(REPO_ROOT),
                            "location_name": "taskiq_test_jobs",
                        }
                    }
                ]
            }
        )
    )
    server = Webserver(home, workspace, tmp_path / "webserver.log")
    try:
        yield server
    finally:
        server.stop()


def test_graphql_launch_runs_on_a_taskiq_worker_and_terminates(
    settings: TaskiqSettings, home: Path, webserver: Webserver, tmp_path: Path
) -> None:
    workers = WorkerPool(settings, home)
    try:
        worker = workers.start(concurrency=1, wait=False)
        webserver.wait_ready()
        worker.wait_registered()

        # A job using taskiq_executor: the run and both its steps run on the taskiq worker.
        run_config = {"execution": {"config": {"default_queue": settings.default_queue}}}
        run_id = webserver.submit("stepped_job", run_config)
        wait_for(
            lambda: webserver.status(run_id) == DagsterRunStatus.SUCCESS,
            90,
            interval=0.25,
            what=f"run {run_id} to succeed (it is {webserver.status(run_id)})",
        )
        with DagsterInstance.from_config(str(home)) as instance:
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.tags[TASK_ID_TAG].startswith(f"{run_id}.run.")
        index = run_async(settings, lambda c: c.keystore.run_tasks(run_id))
        assert set(index) == {"__run__", "first_step", "second_step"}
        records = run_async(settings, lambda c: c.keystore.get_many(list(index.values())))
        assert {r.worker for r in records} == {worker.name}

        # Terminate through GraphQL: the webserver's launcher revokes it; it ends CANCELED.
        started = tmp_path / "started.txt"
        looping = webserver.submit(
            "looping_job", {"ops": {"loop_forever": {"config": {"path": str(started)}}}}
        )
        wait_for(started.exists, 60, what="the looping op to start")
        begin = time.monotonic()
        webserver.client.terminate_run(looping)
        wait_for(
            lambda: webserver.status(looping) == DagsterRunStatus.CANCELED,
            10,
            interval=0.2,
            what=f"run {looping} to be canceled",
        )
        assert time.monotonic() - begin < 10
    finally:
        workers.stop_all()
