"""``TaskiqRunLauncher``: send whole runs to taskiq workers, and supervise them."""

import datetime
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from dagster import MetadataValue
from typing_extensions import Self

from dagster_taskiq.cancellation import cancel_unfinished_run
from dagster_taskiq.compat import (
    CheckRunHealthResult,
    ConfigurableClass,
    ConfigurableClassData,
    DagsterRun,
    EngineEventData,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
    WorkerStatus,
    check,
)
from dagster_taskiq.config import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_QUEUE,
    TaskiqSettings,
    redact_url,
    resolve_settings,
    shared_config_schema,
)
from dagster_taskiq.connection import TaskiqClient, TaskiqConnection, seconds_ago
from dagster_taskiq.lifecycle.health import Health
from dagster_taskiq.lifecycle.keys import RUN_TASK_INDEX_FIELD
from dagster_taskiq.lifecycle.records import TaskRecord, WorkerInfo
from dagster_taskiq.lifecycle.recovery import recover
from dagster_taskiq.lifecycle.states import TaskKind, TaskState
from dagster_taskiq.literal_secrets import warn_literal_secrets
from dagster_taskiq.payloads import RUN_TASK_NAME, RunTaskPayload, TaskOutcome, encode
from dagster_taskiq.tags import TASK_ID_TAG, run_routing
from dagster_taskiq.tracing import current_context

logger = logging.getLogger("dagster_taskiq.launcher")

#: Key of the run task in a run's task index (steps are indexed by their step key).
RUN_INDEX_KEY = RUN_TASK_INDEX_FIELD
#: What run monitoring hears for each task health.
_WORKER_STATUS = {
    Health.WAITING: WorkerStatus.RUNNING,
    Health.STARTING: WorkerStatus.RUNNING,
    Health.RUNNING: WorkerStatus.RUNNING,
    Health.SUCCEEDED: WorkerStatus.SUCCESS,
    Health.FAILED: WorkerStatus.FAILED,
    Health.REVOKED: WorkerStatus.FAILED,
    Health.LOST: WorkerStatus.FAILED,
}


class TaskiqRunLauncher(RunLauncher, ConfigurableClass):
    """Launch each run as a taskiq task; a worker runs it in its own child process.

    Configure it in ``dagster.yaml``, with run monitoring so that lost workers are noticed::

        run_launcher:
          module: dagster_taskiq
          class: TaskiqRunLauncher
          config:
            broker: {env: DAGSTER_TASKIQ_BROKER_URL}
        run_monitoring:
          enabled: true

    **Routing.** A run goes to the queue in its ``dagster-taskiq/queue`` tag (else
    ``default_queue``) at its ``dagster-taskiq/run_priority`` (default 0); the task id is written
    to the ``dagster-taskiq/task_id`` run tag. A worker serving that queue runs the run in its own
    child process, with the Dagster instance the worker is configured with (``DAGSTER_HOME``).
    A run waits in its queue until a worker for that queue starts; with run monitoring, Dagster
    fails it once it has waited ``run_monitoring.start_timeout_seconds`` (default 180).

    **Runs and steps share workers without deadlock.** A run process does not hold one of the
    worker's slots: a worker gives the slot back as soon as the run's process has started, so its
    ``--concurrency`` slots stay free for steps, and a worker with one slot can run a run *and*
    that run's ``taskiq_executor`` steps. Limit how many runs execute at once with Dagster's run
    queue (``run_coordinator: QueuedRunCoordinator`` with ``max_concurrent_runs``), or send runs
    to a queue of their own with the ``dagster-taskiq/queue`` run tag. A job that uses
    ``taskiq_executor`` takes its ``broker`` and ``backend`` from this launcher unless its run
    config sets them.

    **Termination.** :meth:`terminate` revokes the run's task and every step task the run has in
    flight. A run still waiting in its queue never starts; a running run's process gets SIGTERM
    (Dagster's interrupt), so it records its own cancellation; if it does not exit within the
    grace period it is killed and the worker records the cancellation. Either way the run ends
    CANCELED.

    **Health and resume.** :meth:`check_run_worker_health` reads the heartbeat key store and the
    result backend, so it works from any process (the daemon's run monitoring included). A run
    whose worker stopped heartbeating for ``heartbeat_timeout`` seconds is reported FAILED with
    the worker's name and last heartbeat; with ``run_monitoring.max_resume_run_attempts`` set,
    Dagster then resumes it through :meth:`resume_run` on another worker.
    """

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        broker: str | None = None,
        backend: str | None = None,
        default_queue: str = DEFAULT_QUEUE,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        config_source: Mapping[str, Any] | None = None,
        signing_key: str | None = None,
    ) -> None:
        self._inst_data = inst_data
        self.settings: TaskiqSettings = resolve_settings(
            {
                "broker": broker,
                "backend": backend,
                "default_queue": default_queue,
                "heartbeat_timeout": heartbeat_timeout,
                "config_source": dict(config_source or {}),
                "signing_key": signing_key,
            }
        )
        self._client: TaskiqClient | None = None
        self._client_lock = threading.Lock()
        super().__init__()

    # -- ConfigurableClass -----------------------------------------------------------------
    @property
    def inst_data(self) -> ConfigurableClassData | None:
        """The ``dagster.yaml`` data this launcher was built from."""
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        """The launcher's config schema (the keys it shares with the executor)."""
        return shared_config_schema()

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        """Build the launcher from validated ``dagster.yaml`` config."""
        return cls(inst_data=inst_data, **config_value)

    @property
    def client(self) -> TaskiqClient:
        """The launcher's taskiq client, created on first use in this process."""
        with self._client_lock:
            if self._client is None:
                self._client = TaskiqClient(self.settings)
            return self._client

    # -- launching -------------------------------------------------------------------------
    def launch_run(self, context: LaunchRunContext) -> None:
        """Send the run to its queue at its run priority and tag it with the task id."""
        warn_literal_secrets(self._instance, context.dagster_run)
        self._submit(context.dagster_run, resume=False, attempt=0)

    @property
    def supports_resume_run(self) -> bool:
        """Runs whose worker died can be resumed on another worker."""
        return True

    def resume_run(self, context: ResumeRunContext) -> None:
        """Send the run again; a worker resumes it from where its steps got to."""
        self._submit(context.dagster_run, resume=True, attempt=context.resume_attempt_number or 1)

    def _submit(self, run: DagsterRun, *, resume: bool, attempt: int) -> None:
        routing = run_routing(run.tags, self.settings.default_queue, f"run {run.run_id}")
        task_id = f"{run.run_id}.run.{uuid.uuid4().hex[:12]}"
        try:
            instance_ref = self._instance.get_ref()
        except Exception:  # an ephemeral instance has no ref; the worker uses its own
            instance_ref = None
        payload = encode(
            RunTaskPayload(run_id=run.run_id, instance_ref=instance_ref, resume=resume)
        )
        # Tag first: once the task is on the broker a worker may start the run at once.
        self._instance.add_run_tags(run.run_id, {TASK_ID_TAG: task_id})

        # The bridge runs the coroutine on its own thread: hand it this thread's trace context.
        trace_parent = current_context()

        async def _send(conn: TaskiqConnection) -> None:
            await conn.submit(
                task_id=task_id,
                task_name=RUN_TASK_NAME,
                payload=payload,
                kind=TaskKind.RUN,
                run_id=run.run_id,
                step_key=None,
                queue=routing.queue,
                priority=routing.priority,
                heartbeat_timeout=self.settings.heartbeat_timeout,
                trace_parent=trace_parent,
            )

        self.client.run(_send)
        what = f"Resuming run (attempt {attempt})" if resume else "Sent run"
        self._instance.report_engine_event(
            f"{what} to taskiq queue '{routing.queue}' as task {task_id} "
            f"(priority {routing.priority}).",
            run,
            EngineEventData(
                metadata={
                    "taskiq_task_id": MetadataValue.text(task_id),
                    "taskiq_queue": MetadataValue.text(routing.queue),
                    "taskiq_priority": MetadataValue.int(routing.priority),
                    "broker": MetadataValue.text(redact_url(self.settings.broker_url)),
                }
            ),
            cls=self.__class__,
        )

    # -- termination -----------------------------------------------------------------------
    def terminate(self, run_id: str) -> bool:
        """Stop a run: revoke its task and its steps' tasks; the run ends CANCELED.

        Returns False for an unknown run, a finished run, or a run this launcher never sent.
        """
        check.str_param(run_id, "run_id")
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        task_id = run.tags.get(TASK_ID_TAG)
        if not task_id:
            return False
        self._instance.report_run_canceling(run)

        async def _revoke(conn: TaskiqConnection) -> tuple[TaskRecord | None, str, list[str]]:
            record = await conn.keystore.get(task_id)
            previous = await conn.keystore.revoke(task_id)
            steps = []
            for key, other in (await conn.keystore.run_tasks(run_id)).items():
                if key == RUN_INDEX_KEY or other == task_id:
                    continue
                if await conn.keystore.revoke(other) in (
                    TaskState.QUEUED,
                    TaskState.CLAIMED,
                    TaskState.RUNNING,
                ):
                    steps.append(key)
            if previous in (TaskState.RUNNING, TaskState.REVOKING) and record is not None:
                if not record.lease_alive and await conn.keystore.mark_lost(task_id):
                    previous = TaskState.LOST.value
            return record, previous, steps

        record, previous, steps = self.client.run(_revoke)
        worker = record.worker if record is not None and record.worker else None
        self._instance.report_engine_event(
            f"Revoked taskiq task {task_id} (it was {previous}"
            + (f" on worker {worker}" if worker else "")
            + f") and {len(steps)} step task(s) in flight"
            + (f": {', '.join(sorted(steps))}." if steps else "."),
            run,
            EngineEventData(
                metadata={
                    "taskiq_task_id": MetadataValue.text(task_id),
                    "previous_state": MetadataValue.text(previous),
                    "revoked_steps": MetadataValue.text(", ".join(sorted(steps)) or "-"),
                }
            ),
            cls=self.__class__,
        )
        if previous not in (TaskState.RUNNING, TaskState.REVOKING):
            # No process runs the run any more, so nobody else will record the cancellation.
            cancel_unfinished_run(
                self._instance,
                run_id,
                None,
                f"Run {run_id} was canceled; its taskiq task {task_id} was {previous}, so no "
                "worker process had to be stopped.",
            )
        return True

    # -- health ----------------------------------------------------------------------------
    @property
    def supports_check_run_worker_health(self) -> bool:
        """Run monitoring can ask this launcher whether a run's worker is alive."""
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """RUNNING, SUCCESS, FAILED or UNKNOWN for the run's task, with the reason.

        Reads the key store and the result backend, so any process can call it. If the key store
        cannot be reached this raises rather than guessing, so that a Redis outage does not fail
        runs that are in fact healthy.
        """
        task_id = run.tags.get(TASK_ID_TAG)
        if not task_id:
            return CheckRunHealthResult(
                WorkerStatus.UNKNOWN,
                f"Run {run.run_id} has no {TASK_ID_TAG} tag: it was not launched by "
                "TaskiqRunLauncher.",
            )

        async def _check(conn: TaskiqConnection) -> CheckRunHealthResult:
            record = await conn.keystore.get(task_id)
            if record is None:
                return CheckRunHealthResult(
                    WorkerStatus.UNKNOWN,
                    f"The key store has no record of task {task_id} (run {run.run_id}): it "
                    "expired (config_source.result_ttl) or Redis lost its data.",
                    run_worker_id=task_id,
                )
            verdict = await recover(conn.keystore, conn, record)
            return CheckRunHealthResult(
                _WORKER_STATUS[verdict.health], verdict.message, run_worker_id=task_id
            )

        return self.client.run(_check)

    def get_run_worker_debug_info(
        self, run: DagsterRun, include_container_logs: bool | None = True
    ) -> str | None:
        """Task id, queue, state, worker (host, pid, alive) and last heartbeat of the run's task."""
        task_id = run.tags.get(TASK_ID_TAG)
        if not task_id:
            return None

        async def _info(
            conn: TaskiqConnection,
        ) -> tuple[TaskRecord | None, WorkerInfo | None, TaskOutcome | None]:
            record = await conn.keystore.get(task_id)
            worker = None
            if record is not None and record.worker:
                worker = await conn.keystore.get_worker(record.worker)
            outcome = None
            if record is not None and not record.is_active:
                outcome = await conn.outcome(task_id)
            return record, worker, outcome

        record, worker, outcome = self.client.run(_info)
        return debug_info(task_id, record, worker, outcome)

    def dispose(self) -> None:
        """Close the broker connection and the bridge thread."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def debug_info(
    task_id: str,
    record: TaskRecord | None,
    worker: WorkerInfo | None,
    outcome: TaskOutcome | None,
) -> str:
    """A few lines describing a run's task for Dagster's run monitoring and the UI."""
    if record is None:
        return f"taskiq task {task_id}: no record in the key store (expired or never submitted)."
    lines = [
        f"taskiq task {task_id}: queue '{record.queue}', priority {record.priority}, "
        f"state {record.state}.",
    ]
    if record.worker:
        if worker is not None:
            alive = (
                f"alive (host {worker.host}, pid {worker.pid}, last seen "
                f"{seconds_ago(worker.last_heartbeat)})"
            )
        else:
            alive = "no longer alive"
        lines.append(f"Worker {record.worker}: {alive}; run process pid {record.pid or '-'}.")
    else:
        lines.append("Worker: none has claimed it yet.")
    lines.append(
        f"Last heartbeat: {_ago(record.last_heartbeat)}"
        + (f" ({format_time(record.last_heartbeat)})" if record.last_heartbeat else "")
        + f"; heartbeat_timeout {record.heartbeat_timeout:g} s."
    )
    if outcome is not None:
        lines.append(
            f"Outcome: {outcome.status}"
            + (f", exit code {outcome.exit_code}" if outcome.exit_code is not None else "")
            + (f": {outcome.message}" if outcome.message else ".")
        )
    return "\n".join(lines)


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return f"{max(0.0, time.time() - timestamp):.0f} s ago"


def format_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
