"""What a task's child process runs: one Dagster step, or one whole run.

These functions run inside the forked child. They write every Dagster event straight to the
instance's event log (so the UI sees a step's events while it runs) and return a
:class:`~dagster_taskiq.payloads.TaskOutcome` for the worker to store.
"""

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import cast

from dagster import DagsterInstance, DagsterRunStatus, MetadataValue

from dagster_taskiq.compat import (
    DagsterEvent,
    DagsterRun,
    EngineEventData,
    ExecuteStepArgs,
    JobPythonOrigin,
    KnownExecutionState,
    core_execute_run,
    create_context_free_log_manager,
    execute_plan_iterator,
    serializable_error_info_from_exc_info,
    verify_step,
)
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import Outcome
from dagster_taskiq.payloads import RunTaskPayload, StepTaskPayload, TaskOutcome
from dagster_taskiq.worker.warm import WarmCache


def run_step(
    payload: StepTaskPayload,
    worker: str,
    cache: WarmCache,
    step_done: Callable[[], None] | None = None,
    dagster_run: DagsterRun | None = None,
    record: TaskRecord | None = None,
) -> TaskOutcome:
    """Execute one step of a run in this process and report how the process ended.

    ``step_done`` is called as soon as the step's success, failure or retry request is stored
    in the event log, before the process tears down its log capture and resources.
    ``dagster_run`` is the run as the worker read it just before forking this process; without
    it, the run is read here. ``record`` is the task as the worker read it before starting it:
    its queue, id and send time go into the step-started event's metadata.
    """
    args = payload.execute_step_args
    instance = cache.instance(args.instance_ref)
    if dagster_run is None or dagster_run.run_id != args.run_id:
        dagster_run = instance.get_run_by_id(args.run_id)
    if dagster_run is None:
        return TaskOutcome(
            status=Outcome.BAD_MESSAGE.value,
            worker=worker,
            exit_code=None,
            message=f"Run {args.run_id} does not exist in the worker's Dagster instance; step "
            f"'{payload.step_key}' was not run. Check that workers share the instance storage.",
        )
    ended = False
    failed = False
    try:
        for event in _step_events(
            args,
            instance,
            dagster_run,
            payload.step_key,
            cache,
            worker_started_metadata(worker, record),
        ):
            if (
                event.is_step_success
                or event.is_step_failure
                or event.is_step_up_for_retry
                or event.is_step_skipped
            ):
                ended = True
                failed = event.is_step_failure or event.is_step_up_for_retry
                if step_done is not None:
                    step_done()
    except BaseException:
        error = serializable_error_info_from_exc_info(sys.exc_info())
        return TaskOutcome(
            status=Outcome.FAILURE.value,
            worker=worker,
            exit_code=1,
            message=f"Step '{payload.step_key}' of run {args.run_id} raised a framework error on "
            f"worker {worker}: {error.message.strip()}",
            error=error,
        )
    if not ended:
        # Dagster refused to start the step (say, a resumed run sent a step whose earlier attempt
        # had already started), or the run was canceled: the step has no outcome event, so the
        # task must not read as a success, or the run would wait for that event forever.
        return TaskOutcome(
            status=Outcome.FAILURE.value,
            worker=worker,
            exit_code=0,
            message=f"Step '{payload.step_key}' of run {args.run_id} did not run on worker "
            f"{worker}: Dagster refused to start it (an earlier attempt of it had already "
            "started, or the run is ending). See the run's engine events for the reason.",
        )
    return TaskOutcome(status=Outcome.SUCCESS.value, worker=worker, exit_code=0, step_failed=failed)


def _step_events(
    args: ExecuteStepArgs,
    instance: DagsterInstance,
    dagster_run: DagsterRun,
    step_key: str,
    cache: WarmCache,
    started_metadata: dict[str, MetadataValue],
) -> Iterator[DagsterEvent]:
    log_manager = create_context_free_log_manager(instance, dagster_run)
    where = started_metadata.get("worker")
    yield DagsterEvent.step_worker_started(
        log_manager,
        dagster_run.job_name,
        message=f'Step worker started for "{step_key}"'
        + (f" on taskiq worker {where.value}." if where is not None else "."),
        metadata=started_metadata,
        step_key=step_key,
    )
    if dagster_run.is_finished or dagster_run.status == DagsterRunStatus.CANCELING:
        yield instance.report_engine_event(
            f"Skipping step {step_key}: run {dagster_run.run_id} is {dagster_run.status.value}.",
            dagster_run,
            step_key=step_key,
        )
        return
    if args.should_verify_step and args.known_state is not None:
        if not verify_step(instance, dagster_run, args.known_state.get_retry_state(), [step_key]):
            return
    known_state: KnownExecutionState | None = args.known_state
    recon_job, execution_plan = cache.step_plan(
        instance, dagster_run, args.step_keys_to_execute, known_state
    )
    try:
        yield from execute_plan_iterator(
            execution_plan,
            recon_job,
            dagster_run,
            instance,
            run_config=dagster_run.run_config,
            retry_mode=args.retry_mode,
        )
    except KeyboardInterrupt:
        yield instance.report_engine_event(
            f"Step {step_key} was interrupted (revoked or worker shutting down).",
            dagster_run,
            step_key=step_key,
        )
        raise


def worker_started_metadata(
    worker: str, record: TaskRecord | None, now: float | None = None
) -> dict[str, MetadataValue]:
    """Metadata of the step-started event: where the step runs and how long it waited.

    ``worker``, ``host`` and ``pid`` (of the step's process) always; with the task's ``record``,
    also ``queue``, ``task_id`` and ``queue_wait_seconds``: from the moment the orchestrator
    submitted the task (or put it back on its queue after its worker went away) until now.
    """
    metadata: dict[str, MetadataValue] = {
        "worker": MetadataValue.text(worker),
        "host": MetadataValue.text(socket.gethostname()),
        "pid": MetadataValue.text(str(os.getpid())),
    }
    if record is not None:
        now = time.time() if now is None else now
        since = record.requeued_at if record.requeued_at is not None else record.submitted_at
        metadata["queue"] = MetadataValue.text(record.queue)
        metadata["task_id"] = MetadataValue.text(record.task_id)
        metadata["queue_wait_seconds"] = MetadataValue.float(round(max(0.0, now - since), 3))
    return metadata


def run_whole_run(payload: RunTaskPayload, worker: str, cache: WarmCache) -> TaskOutcome:
    """Execute (or resume) a whole run in this process, as ``dagster api execute_run`` would."""
    instance = cache.run_instance(payload.instance_ref)
    dagster_run = instance.get_run_by_id(payload.run_id)
    if dagster_run is None:
        return TaskOutcome(
            status=Outcome.BAD_MESSAGE.value,
            worker=worker,
            message=f"Run {payload.run_id} does not exist in the worker's Dagster instance. "
            "Point the worker's DAGSTER_HOME at the same instance as the webserver and daemon.",
        )
    if dagster_run.is_finished:
        return TaskOutcome(
            status=Outcome.SKIPPED.value,
            worker=worker,
            message=f"Run {payload.run_id} already ended ({dagster_run.status.value}).",
        )
    if not payload.resume and dagster_run.status not in (
        DagsterRunStatus.STARTING,
        DagsterRunStatus.NOT_STARTED,
        DagsterRunStatus.QUEUED,
    ):
        return TaskOutcome(
            status=Outcome.SKIPPED.value,
            worker=worker,
            message=f"Run {payload.run_id} is {dagster_run.status.value}; not starting it again.",
        )
    origin = cast(JobPythonOrigin, dagster_run.job_code_origin)
    recon_job = cache.recon_job(origin)
    instance.report_engine_event(
        f"{'Resuming' if payload.resume else 'Started'} run on taskiq worker {worker} "
        f"(pid: {os.getpid()}).",
        dagster_run,
        EngineEventData.in_process(os.getpid()),
    )
    failed = False
    try:
        for event in core_execute_run(
            recon_job,
            dagster_run,
            instance,
            inject_env_vars=True,
            resume_from_failure=payload.resume,
        ):
            if event.is_run_failure:
                failed = True
    except BaseException:
        error = serializable_error_info_from_exc_info(sys.exc_info())
        return TaskOutcome(
            status=Outcome.FAILURE.value,
            worker=worker,
            exit_code=1,
            message=f"Run {payload.run_id} raised on worker {worker}: {error.message.strip()}",
            error=error,
        )
    return TaskOutcome(
        status=(Outcome.FAILURE if failed else Outcome.SUCCESS).value,
        worker=worker,
        exit_code=1 if failed else 0,
        message=f"Run {payload.run_id} {'failed' if failed else 'succeeded'}.",
    )
