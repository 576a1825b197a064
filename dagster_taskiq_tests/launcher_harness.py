"""Harness for run-launcher tests: a real Dagster instance whose run launcher is
``TaskiqRunLauncher``, an in-process workspace for ``launcher_jobs``, real workers, and Dagster's
own run-monitoring iteration."""

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance
from dagster._core.events.log import EventLogEntry
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from dagster_taskiq.config import TaskiqSettings, settings_to_config
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.tags import TASK_ID_TAG
from dagster_taskiq_tests import launcher_jobs
from dagster_taskiq_tests.harness import REPO_ROOT, WorkerPool, run_async, wait_for

JOBS_MODULE = "dagster_taskiq_tests.launcher_jobs"
REPOSITORY = "__repository__"


def sqlite_storage(base_dir: Path) -> dict[str, Any]:
    """``storage`` config for a sqlite instance in ``base_dir``."""
    return {"sqlite": {"base_dir": str(base_dir)}}


def dagster_yaml(
    settings: TaskiqSettings, storage: Mapping[str, Any], *, max_resume_run_attempts: int = 0
) -> dict[str, Any]:
    """The ``dagster.yaml`` of a launcher test instance."""
    return {
        "telemetry": {"enabled": False},
        "storage": dict(storage),
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "DefaultRunCoordinator",
        },
        "run_launcher": {
            "module": "dagster_taskiq",
            "class": "TaskiqRunLauncher",
            "config": settings_to_config(settings),
        },
        "run_monitoring": {
            "enabled": True,
            "max_resume_run_attempts": max_resume_run_attempts,
            "poll_interval_seconds": 1,
        },
    }


def write_home(
    home: Path, settings: TaskiqSettings, storage: Mapping[str, Any], **options: Any
) -> Path:
    """Create ``home`` with a ``dagster.yaml`` that uses the taskiq launcher."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(dagster_yaml(settings, storage, **options)))
    return home


def workspace_context(instance: DagsterInstance) -> WorkspaceProcessContext:
    """An in-process workspace holding ``launcher_jobs.defs`` (also what the daemon sees)."""
    origin = LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name=JOBS_MODULE,
        attribute="defs",
        working_directory=str(REPO_ROOT),
    )
    return WorkspaceProcessContext(
        instance, InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))
    )


class LauncherEnv:
    """One Dagster instance using TaskiqRunLauncher, its workspace, and a pool of workers."""

    def __init__(self, settings: TaskiqSettings, home: Path, stack: ExitStack) -> None:
        self.settings = settings
        self.home = home
        self.instance: DagsterInstance = stack.enter_context(DagsterInstance.from_config(str(home)))
        self.context: WorkspaceProcessContext = stack.enter_context(
            workspace_context(self.instance)
        )
        self.workers = WorkerPool(settings, home)
        stack.callback(self.workers.stop_all)
        self.logger = logging.getLogger("dagster_taskiq_tests.monitoring")

    @property
    def launcher(self) -> TaskiqRunLauncher:
        """The instance's run launcher."""
        launcher = self.instance.run_launcher
        assert isinstance(launcher, TaskiqRunLauncher)
        return launcher

    @property
    def location_name(self) -> str:
        """Name of the workspace's one code location."""
        return next(iter(self.context.create_request_context().get_code_location_entries()))

    def create_run(
        self,
        job_name: str,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        instance: DagsterInstance | None = None,
    ) -> DagsterRun:
        """Create a NOT_STARTED run of ``job_name`` with both origins set, as the UI would."""
        workspace = self.context.create_request_context()
        location = workspace.get_code_location(self.location_name)
        remote_job = location.get_repository(REPOSITORY).get_full_job(job_name)
        return (instance or self.instance).create_run_for_job(
            job_def=launcher_jobs.defs.resolve_job_def(job_name),
            run_config=dict(run_config or {}),
            tags=dict(tags or {}),
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
        )

    def launch(
        self,
        job_name: str,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create and submit a run (the default coordinator launches it at once)."""
        run = self.create_run(job_name, run_config, tags)
        self.instance.submit_run(run.run_id, self.context.create_request_context())
        return run.run_id

    def run(self, run_id: str) -> DagsterRun:
        """The run as stored now."""
        run = self.instance.get_run_by_id(run_id)
        assert run is not None, f"run {run_id} is missing"
        return run

    def wait_status(
        self, run_id: str, *statuses: DagsterRunStatus, timeout: float = 60.0
    ) -> DagsterRun:
        """Wait until the run reaches one of ``statuses`` (default: any finished status)."""
        wanted = set(statuses) or {
            DagsterRunStatus.SUCCESS,
            DagsterRunStatus.FAILURE,
            DagsterRunStatus.CANCELED,
        }
        return wait_for(
            lambda: (run := self.run(run_id)).status in wanted and run,
            timeout,
            interval=0.1,
            what=f"run {run_id} to reach {sorted(s.value for s in wanted)} "
            f"(it is {self.run(run_id).status.value}); events:\n{self.describe(run_id)}",
        )

    def wait_event(self, run_id: str, text: str, timeout: float = 60.0) -> EventLogEntry:
        """Wait for an event of the run whose message contains ``text``."""
        return wait_for(
            lambda: next((e for e in self.events(run_id) if text in e.message), None),
            timeout,
            interval=0.1,
            what=f"an event containing {text!r} in run {run_id}",
        )

    def events(self, run_id: str) -> list[EventLogEntry]:
        """Every event log entry of the run."""
        return list(self.instance.all_logs(run_id))

    def event_types(self, run_id: str) -> list[DagsterEventType]:
        """The Dagster event types of the run, in order."""
        return [e.dagster_event_type for e in self.events(run_id) if e.dagster_event_type]

    def describe(self, run_id: str) -> str:
        """The run's event log, one line per event, for assertion messages."""
        return "\n".join(
            f"  {e.dagster_event_type.value if e.dagster_event_type else 'log'}: {e.message[:300]}"
            for e in self.events(run_id)
        )

    def task_id(self, run_id: str) -> str:
        """The run's ``dagster-taskiq/task_id`` tag."""
        task_id = self.run(run_id).tags.get(TASK_ID_TAG)
        assert task_id, f"run {run_id} has no {TASK_ID_TAG} tag"
        return task_id

    def record(self, task_id: str) -> TaskRecord:
        """A task's key-store record."""
        record = run_async(self.settings, lambda c: c.keystore.get(task_id))
        assert record is not None, f"no key-store record for task {task_id}"
        return record

    def run_tasks(self, run_id: str) -> dict[str, str]:
        """The run's task index: step key (``__run__`` for the run) to task id."""
        return dict(run_async(self.settings, lambda c: c.keystore.run_tasks(run_id)))

    def monitor_once(self, context: WorkspaceProcessContext | None = None) -> None:
        """One pass of Dagster's run-monitoring daemon, as ``dagster-daemon`` runs it."""
        errors = [
            e for e in execute_run_monitoring_iteration(context or self.context, self.logger) if e
        ]
        assert not errors, f"run monitoring raised: {errors}"


@contextmanager
def launcher_env(
    kind: str,
    tmp_path_factory: pytest.TempPathFactory,
    settings: TaskiqSettings,
    storage: Mapping[str, Any] | None = None,
) -> Iterator[LauncherEnv]:
    """A :class:`LauncherEnv` in a fresh DAGSTER_HOME (sqlite storage in it unless ``storage``
    is given); workers are stopped on exit."""
    home = tmp_path_factory.mktemp(f"launcher-{kind}")
    write_home(home, settings, storage or sqlite_storage(home / "storage"))
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        patch.setenv("DAGSTER_HOME", str(home))
        yield LauncherEnv(settings, home, stack)
