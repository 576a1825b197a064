"""Dagster ``StepHandler`` that sends each step to a taskiq queue and supervises it."""

import logging
import time
import uuid
from collections.abc import Iterator

from dagster import DagsterEventType, MetadataValue

from dagster_taskiq.compat import (
    CheckStepHealthResult,
    DagsterEvent,
    EngineEventData,
    StepHandler,
    StepHandlerContext,
)
from dagster_taskiq.connection import TaskiqClient, TaskiqConnection
from dagster_taskiq.engine_events import report_warning
from dagster_taskiq.lifecycle.health import Health, assess
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.recovery import recover
from dagster_taskiq.lifecycle.states import TaskKind
from dagster_taskiq.payloads import STEP_TASK_NAME, StepTaskPayload, encode
from dagster_taskiq.queue_watch import UnservedQueueWatch
from dagster_taskiq.tags import step_routing
from dagster_taskiq.tracing import current_context

logger = logging.getLogger("dagster_taskiq")

#: Dagster checks every running step in one go; a check reuses the records read for the run's
#: other steps within this many seconds, so one Redis pipeline serves the whole round.
HEALTH_SNAPSHOT_SECONDS = 0.5


class TaskiqStepHandler(StepHandler):
    """Launches each step as a taskiq task and checks it through the heartbeat key store."""

    def __init__(self, client: TaskiqClient) -> None:
        self._client = client
        # (run id, step key) -> the task this handler last launched for it.
        self._task_ids: dict[tuple[str, str], str] = {}
        self._ended: set[str] = set()
        self._snapshot: dict[str, TaskRecord] = {}
        self._snapshot_at = float("-inf")
        self._queue_watch = UnservedQueueWatch(client.settings)

    @property
    def name(self) -> str:
        """Shown in the run's first engine event."""
        return "TaskiqStepHandler"

    @property
    def client(self) -> TaskiqClient:
        """The client this handler submits through."""
        return self._client

    @staticmethod
    def _step_key(context: StepHandlerContext) -> str:
        keys = context.execute_step_args.step_keys_to_execute
        assert keys is not None and len(keys) == 1, "TaskiqStepHandler launches one step at a time"
        return keys[0]

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        """Submit the step to its queue at its priority."""
        step_key = self._step_key(step_handler_context)
        run = step_handler_context.dagster_run
        settings = self._client.settings
        routing = step_routing(
            step_handler_context.step_tags[step_key],
            run.tags,
            settings.default_queue,
            f"step '{step_key}' of run {run.run_id}",
        )
        task_id = f"{run.run_id}.{step_key}.{uuid.uuid4().hex[:12]}"
        payload = encode(
            StepTaskPayload(
                execute_step_args=step_handler_context.execute_step_args, step_key=step_key
            )
        )

        # The bridge runs the coroutine on its own thread: hand it this thread's trace context.
        trace_parent = current_context()

        async def _submit(conn: TaskiqConnection) -> None:
            await conn.submit(
                task_id=task_id,
                task_name=STEP_TASK_NAME,
                payload=payload,
                kind=TaskKind.STEP,
                run_id=run.run_id,
                step_key=step_key,
                queue=routing.queue,
                priority=routing.priority,
                heartbeat_timeout=settings.heartbeat_timeout,
                trace_parent=trace_parent,
            )

        self._client.run(_submit)
        self._task_ids[(run.run_id, step_key)] = task_id
        yield DagsterEvent.step_worker_starting(
            step_handler_context.get_step_context(step_key),
            message=f"Sent step {step_key} to taskiq queue '{routing.queue}' as task {task_id} "
            f"(priority {routing.priority}).",
            metadata={
                "taskiq_task_id": MetadataValue.text(task_id),
                "taskiq_queue": MetadataValue.text(routing.queue),
                "taskiq_priority": MetadataValue.int(routing.priority),
            },
        )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        """Healthy while queued, claimed by a live worker, or heartbeating; else say why not."""
        step_key = self._step_key(step_handler_context)
        run_id = step_handler_context.execute_step_args.run_id
        launched = self._task_ids.get((run_id, step_key))
        if launched is not None:
            record = self._recent_record(run_id, launched)
            if record is not None and assess(record).health in (Health.WAITING, Health.RUNNING):
                self._warn_if_queue_unserved(step_handler_context, record)
                return CheckStepHealthResult.healthy()

        async def _check(conn: TaskiqConnection) -> CheckStepHealthResult:
            task_id = await conn.keystore.step_task_id(run_id, step_key)
            if task_id is None:
                return CheckStepHealthResult.unhealthy(
                    f"No taskiq task is recorded for step {step_key} of run {run_id}; it was never "
                    "submitted or its record expired (config_source.result_ttl)."
                )
            record = await conn.keystore.get(task_id)
            if record is None:
                return CheckStepHealthResult.unhealthy(
                    f"The record of task {task_id} (step {step_key}, run {run_id}) is gone; it "
                    "expired or Redis lost its data."
                )
            verdict = await recover(conn.keystore, conn, record)
            if verdict.healthy:
                return CheckStepHealthResult.healthy()
            return CheckStepHealthResult.unhealthy(verdict.message)

        result = self._client.run(_check)
        if not result.is_healthy and _attempt_ended_in_event_log(step_handler_context, step_key):
            # The step's own process recorded how this attempt ended (say, it was stopped when
            # its worker lost the lease, and asked for a retry): Dagster reads that event on its
            # next poll. Reporting the task's failure as well would end the attempt twice.
            return CheckStepHealthResult.healthy()
        return result

    def _warn_if_queue_unserved(self, context: StepHandlerContext, record: TaskRecord) -> None:
        """Warn the run, once per queue, that ``record`` waits on a queue no live worker serves.

        Best effort: a failure to read the worker registry or to write the event is logged and
        never affects the step.
        """
        watch = self._queue_watch
        if not watch.due(record):
            return
        try:
            if watch.needs_workers():
                watch.update_workers(self._client.run(lambda conn: conn.keystore.list_workers()))
            unserved = watch.check(record)
            if unserved is None or _already_in_event_log(context, unserved.prefix):
                return  # served, or warned by an earlier orchestrator of this run (a resume)
            report_warning(
                context.instance,
                context.dagster_run,
                unserved.message(),
                {
                    "taskiq_queue": MetadataValue.text(unserved.queue),
                    "taskiq_task_id": MetadataValue.text(unserved.task_id),
                    "start_worker": MetadataValue.text(unserved.start_command),
                },
                step_key=record.step_key,
            )
        except Exception as exc:
            logger.warning(
                "Could not check whether queue '%s' has live workers: %s", record.queue, exc
            )

    def _recent_record(self, run_id: str, task_id: str) -> TaskRecord | None:
        """``task_id``'s record from a snapshot of all this run's unfinished tasks (one pipeline,
        refreshed when older than ``HEALTH_SNAPSHOT_SECONDS``). Anything but plainly healthy is
        checked again, fresh, by the caller."""
        now = time.monotonic()
        if now - self._snapshot_at > HEALTH_SNAPSHOT_SECONDS or task_id not in self._snapshot:
            ids = [
                tid
                for (rid, _), tid in self._task_ids.items()
                if rid == run_id and tid not in self._ended
            ]
            records = self._client.run(lambda conn: conn.keystore.get_many(ids))
            self._snapshot = {record.task_id: record for record in records}
            self._ended.update(r.task_id for r in records if not r.is_active)
            self._snapshot_at = now
        return self._snapshot.get(task_id)

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        """Revoke the step's task: a queued one never starts, a running one is killed."""
        step_key = self._step_key(step_handler_context)
        run_id = step_handler_context.execute_step_args.run_id

        async def _revoke(conn: TaskiqConnection) -> tuple[str | None, str]:
            task_id = await conn.keystore.step_task_id(run_id, step_key)
            if task_id is None:
                return None, "unknown"
            return task_id, await conn.keystore.revoke(task_id)

        task_id, previous = self._client.run(_revoke)
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            message=f"Revoked step {step_key} (taskiq task {task_id}, was {previous}).",
            event_specific_data=EngineEventData(
                metadata={
                    "taskiq_task_id": MetadataValue.text(str(task_id)),
                    "previous_state": MetadataValue.text(previous),
                }
            ),
        )


#: Events that end a step attempt.
_ATTEMPT_END_EVENTS = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
    DagsterEventType.STEP_SKIPPED,
}


def _already_in_event_log(context: StepHandlerContext, prefix: str) -> bool:
    """Whether the run's event log holds an engine event whose message starts with ``prefix``."""
    connection = context.instance.get_records_for_run(
        context.execute_step_args.run_id, of_type=DagsterEventType.ENGINE_EVENT
    )
    return any(
        (record.event_log_entry.dagster_event.message or "").startswith(prefix)
        for record in connection.records
        if record.event_log_entry.dagster_event is not None
    )


def _attempt_ended_in_event_log(context: StepHandlerContext, step_key: str) -> bool:
    """Whether the event log already holds the end of the step attempt being checked.

    Each earlier attempt of a step ended with exactly one of :data:`_ATTEMPT_END_EVENTS`; one
    more than that means the current attempt has ended too.
    """
    known_state = context.execute_step_args.known_state
    earlier = known_state.get_retry_state().get_attempt_count(step_key) if known_state else 0
    connection = context.instance.get_records_for_run(
        context.execute_step_args.run_id, of_type=_ATTEMPT_END_EVENTS
    )
    ends = sum(
        1
        for record in connection.records
        if record.event_log_entry.dagster_event is not None
        and record.event_log_entry.dagster_event.step_key == step_key
    )
    return ends > earlier
