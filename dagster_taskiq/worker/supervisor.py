"""The supervisor: forks each task's process, hands it to the lease guard, and finishes the task.

While the process runs, the :class:`~.guard.LeaseGuard` keeps it inside its lease. When the
process exits, the task is finished with its fence: a worker that lost its claim cannot
overwrite what happened since.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from dagster_taskiq.cancellation import cancel_unfinished_run
from dagster_taskiq.compat import DagsterRun
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.retry import retrying
from dagster_taskiq.lifecycle.states import Outcome, TaskKind
from dagster_taskiq.metrics.recorder import NullRecorder, TaskRecorder, metric_outcome
from dagster_taskiq.payloads import RunTaskPayload, StepTaskPayload, TaskOutcome, encode
from dagster_taskiq.tracing import ExecuteSpan, TraceContext, activated, flush, start_execute_span
from dagster_taskiq.worker.bodies import run_step, run_whole_run
from dagster_taskiq.worker.child import fork_child
from dagster_taskiq.worker.deadletters import dead_letter
from dagster_taskiq.worker.fence import LeaseClock
from dagster_taskiq.worker.guard import Held, LeaseGuard
from dagster_taskiq.worker.options import WorkerOptions, describe_exit
from dagster_taskiq.worker.warm import WarmCache

logger = logging.getLogger("dagster_taskiq.worker")


class Supervisor:
    """Runs task processes and finishes their tasks. One per worker."""

    def __init__(
        self,
        conn: TaskiqConnection,
        options: WorkerOptions,
        cache: WarmCache,
        slots: asyncio.Semaphore,
        stopping: Callable[[], bool],
        guard: LeaseGuard,
        recorder: TaskRecorder | None = None,
    ) -> None:
        self.conn = conn
        self.recorder: TaskRecorder = recorder or NullRecorder()
        self.options = options
        self.cache = cache
        self.slots = slots
        self.stopping = stopping
        self.guard = guard
        self.tasks: set[asyncio.Task[None]] = set()

    # -- starting ----------------------------------------------------------------------------
    def launch(
        self,
        record: TaskRecord,
        fence: int,
        payload: StepTaskPayload | RunTaskPayload,
        dagster_run: DagsterRun | None,
        started_at: float,
        trace_parent: TraceContext | None = None,
    ) -> None:
        """Fork the task's process (the caller holds the fork guard) and supervise it.

        ``started_at`` is when the start transition (which took the lease) was sent;
        ``trace_parent`` is the sender's trace context from the message labels. The task's
        ``execute`` span covers its process and is current inside it.
        """
        name = self.options.name
        cache = self.cache
        span = start_execute_span(
            trace_parent,
            kind=record.kind.value,
            run_id=record.run_id,
            step_key=record.step_key,
            queue=record.queue,
            task_id=record.task_id,
            worker=name,
        )
        span_context = span.context()
        if isinstance(payload, StepTaskPayload):

            def body(step_done: Callable[[], None]) -> TaskOutcome:
                with activated(span_context):
                    return run_step(payload, name, cache, step_done, dagster_run, record)

        else:

            def body(step_done: Callable[[], None]) -> TaskOutcome:
                with activated(span_context):
                    return run_whole_run(payload, name, cache)

        def before_exit() -> None:
            cache.before_exit()
            flush()

        policy = LeasePolicy(record.heartbeat_timeout)
        clock = LeaseClock(started_at + policy.term_after, started_at + policy.kill_after)
        try:
            child = fork_child(body, cache.after_fork, before_exit, clock)
        except BaseException as exc:
            span.end("failure", f"Could not fork the task's process: {exc}")
            raise
        held = Held(record, fence, policy, child, clock, time.monotonic(), started_at)
        self.guard.hold(held)
        self.recorder.started(record)
        logger.info(
            "Took task %s (%s) from queue '%s' at priority %d; pid %d.",
            record.task_id,
            record.what,
            record.queue,
            record.priority,
            child.pid,
        )
        task = asyncio.create_task(self._supervise(held, payload, span))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if record.kind is TaskKind.RUN:
            # A run process only orchestrates: it gives its slot back at once, so the steps of
            # the runs a worker holds can always take its slots (no run/step deadlock).
            self.slots.release()

    # -- finishing ---------------------------------------------------------------------------
    async def _supervise(
        self, held: Held, payload: StepTaskPayload | RunTaskPayload, span: ExecuteSpan
    ) -> None:
        record = held.record
        holds_slot = record.kind is not TaskKind.RUN
        keystore = self.conn.keystore
        traced: tuple[str, str | None] = ("failure", "The worker stopped supervising the task.")
        try:
            exit_code = await held.child.wait(
                (lambda: keystore.wake_run(record.run_id)) if record.kind is TaskKind.STEP else None
            )
            elapsed = time.monotonic() - held.started
            if holds_slot:
                # The process is gone: its slot can take the next task meanwhile.
                holds_slot = False
                self.slots.release()
            outcome = self._outcome(held, exit_code)
            counted_as = metric_outcome(outcome.status, outcome.step_failed)
            traced = (counted_as.value, outcome.message or None)
            if outcome.status == Outcome.BAD_MESSAGE:
                message = await keystore.message(record.task_id) or b""
                await dead_letter(
                    self.conn,
                    self.options.name,
                    outcome.message,
                    message,
                    record.task_id,
                    record.queue,
                )
                outcome = outcome._replace(status=Outcome.FAILURE.value)
            if held.revoked and not held.lost and isinstance(payload, RunTaskPayload):
                # Dagster storage calls block: they run in a thread, never on the loop.
                instance_ref, run_id, name = payload.instance_ref, payload.run_id, self.options.name
                await asyncio.to_thread(
                    lambda: cancel_unfinished_run(
                        self.cache.run_instance(instance_ref), run_id, name
                    )
                )
            # A lost task counts as lost even though its record is no longer this worker's.
            if await self._finish(held, outcome, elapsed) or held.lost:
                self.recorder.finished(record, counted_as, elapsed)
        finally:
            span.end(*traced)
            self.guard.release(held)
            if holds_slot:
                self.slots.release()

    def _outcome(self, held: Held, exit_code: int) -> TaskOutcome:
        name = self.options.name
        outcome = held.child.outcome()
        if outcome is None:
            outcome = TaskOutcome(
                status=Outcome.FAILURE.value,
                worker=name,
                exit_code=exit_code,
                message=f"The process of task {held.record.task_id} ({held.record.what}) on "
                f"worker {name} {describe_exit(exit_code)} before reporting an outcome.",
            )
        if held.lost:
            return outcome._replace(
                status=Outcome.LOST.value,
                message=f"Stopped on worker {name}: it could not keep the task's lease.",
            )
        if held.revoked:
            return outcome._replace(
                status=Outcome.REVOKED.value,
                message=f"Revoked while running; {outcome.message}".strip(),
            )
        if held.interrupted:
            return outcome._replace(
                status=Outcome.FAILURE.value,
                message=f"Interrupted because worker {name} shut down.",
            )
        return outcome

    async def _finish(self, held: Held, outcome: TaskOutcome, elapsed: float) -> bool:
        """Record the outcome; False if the task is no longer this worker's."""
        record = held.record
        try:
            status = Outcome(outcome.status)
        except ValueError:
            status = Outcome.FAILURE
        transition = await retrying(
            f"recording the outcome of task {record.task_id} ({record.what})",
            lambda: self.conn.keystore.finish(
                record.task_id,
                held.fence,
                status,
                outcome_json=encode(outcome),
                result_json=self.conn.result_value(outcome, elapsed),
            ),
            timeout=None if not self.stopping() else 30.0,
        )
        if not transition.ok:
            logger.warning(
                "Task %s (%s) is %s and no longer this worker's; its outcome (%s) is dropped.",
                record.task_id,
                record.what,
                transition.state or "gone",
                outcome.status,
            )
            return False
        logger.info(
            "Finished task %s (%s): %s in %.2f s.",
            record.task_id,
            record.what,
            transition.state or outcome.status,
            elapsed,
        )
        return True
