"""The intake: validate a delivered message, claim its task, verify it, and hand it over.

A message is run only if it is the message registered for its task id: the claim compares the
delivered body's SHA-256 with the registered one, and, with a ``signing_key``, its HMAC must
verify too. Anything else is dead-lettered with a one-line reason and never touches the task.
A granted claim carries a fencing token; if the start transition refuses it (the claim was
taken over while this worker warmed up), the task is dropped without touching its record.
"""

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from taskiq import AckableMessage

from dagster_taskiq.brokers.delivery import Delivery
from dagster_taskiq.compat import DagsterRun
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.lifecycle.retry import retrying
from dagster_taskiq.lifecycle.states import ClaimResult
from dagster_taskiq.lifecycle.store import message_digest
from dagster_taskiq.metrics.recorder import UNKNOWN_LABEL, NullRecorder, TaskRecorder
from dagster_taskiq.payloads import (
    RunTaskPayload,
    StepTaskPayload,
)
from dagster_taskiq.tracing import TraceContext, extract
from dagster_taskiq.worker.deadletters import dead_letter
from dagster_taskiq.worker.options import WorkerOptions
from dagster_taskiq.worker.supervisor import Supervisor
from dagster_taskiq.worker.validation import labels_of, validate_message
from dagster_taskiq.worker.warm import WarmCache

logger = logging.getLogger("dagster_taskiq.worker")
T = TypeVar("T")


class Intake:
    """Turns delivered messages into running tasks. One per worker."""

    def __init__(
        self,
        conn: TaskiqConnection,
        options: WorkerOptions,
        instance: str,
        cache: WarmCache,
        supervisor: Supervisor,
        stopping: Callable[[], bool],
        recorder: TaskRecorder | None = None,
    ) -> None:
        self.conn = conn
        self.recorder: TaskRecorder = recorder or NullRecorder()
        self.options = options
        self.instance = instance
        self.cache = cache
        self.supervisor = supervisor
        self.stopping = stopping
        #: Claims taken but not yet started: task id to (fence, heartbeat_timeout).
        self.claims: dict[str, tuple[int, float]] = {}
        # Held while a thread reads the database (warm-up) and while forking: a child must not
        # inherit a database connection that another thread of the parent has open.
        self.fork_guard = threading.Lock()

    async def take(self, message: AckableMessage | bytes) -> bool:
        """Claim and start one message. Returns True if a task process now runs it."""
        data = message.data if isinstance(message, AckableMessage) else message
        queue = message.queue if isinstance(message, Delivery) else None
        ack = message.ack if isinstance(message, AckableMessage) else None
        if isinstance(message, Delivery) and message.dead_letter_reason is not None:
            await self._refuse(message.dead_letter_reason, data, queue, _task_id_of(self, data))
            await _acknowledge(ack)
            return False
        try:
            taskiq_message = self.conn.broker.formatter.loads(data)
        except Exception as exc:
            await self._refuse(
                f"Undecodable message ({type(exc).__name__}); expected taskiq JSON.", data, queue
            )
            await _acknowledge(ack)
            return False
        task_id = taskiq_message.task_id
        labels = labels_of(taskiq_message)
        try:
            payload = validate_message(taskiq_message, self.conn.settings.signing_key)
        except BadMessageError as exc:
            await self._refuse(str(exc), data, queue, task_id, labels)
            await _acknowledge(ack)
            return False
        conn = self.conn
        timeout = conn.settings.heartbeat_timeout
        claim = await self._persist(
            f"claiming task {task_id}",
            lambda: conn.keystore.claim(
                task_id, self.options.name, self.instance, message_digest(data), timeout
            ),
        )
        await _acknowledge(ack)
        if claim.result is ClaimResult.UNKNOWN:
            await self._refuse(
                f"Task {task_id} has no record in the key store (never submitted through "
                "dagster-taskiq, or expired).",
                data,
                queue,
                task_id,
                labels,
            )
            return False
        if claim.result is ClaimResult.MISMATCH:
            await self._refuse(
                f"Task {task_id}: the message body does not match the payload registered for "
                "this task id; refusing to run it (forged or corrupted message).",
                data,
                queue,
                task_id,
                labels,
            )
            return False
        if claim.result is ClaimResult.REVOKED:
            logger.info("Not running task %s: it is revoked.", task_id)
            return False
        if not claim.granted:
            logger.info(
                "Ignoring duplicate delivery of task %s (it is claimed, running or finished).",
                task_id,
            )
            return False
        self.claims[task_id] = (claim.fence, timeout)
        try:
            return await self._start(task_id, claim.fence, payload, extract(taskiq_message.labels))
        finally:
            self.claims.pop(task_id, None)

    async def _start(
        self,
        task_id: str,
        fence: int,
        payload: StepTaskPayload | RunTaskPayload,
        trace_parent: TraceContext | None,
    ) -> bool:
        conn = self.conn
        record = await self._persist(f"reading task {task_id}", lambda: conn.keystore.get(task_id))
        if record is None:  # expired between claim and read
            return False
        # Import the job code and open the instance before forking, in a thread: the loop keeps
        # renewing the claim however long the code takes to import.
        dagster_run = await asyncio.to_thread(self._warm_up, payload)
        sent_at = time.monotonic()
        started = await self._persist(
            f"starting task {task_id}",
            lambda: conn.keystore.start(task_id, fence, os.getpid(), record.heartbeat_timeout),
        )
        if not started.ok:
            logger.warning(
                "Task %s (%s) was taken from this worker before it started (it is now %s); "
                "dropping it without touching its record.",
                task_id,
                record.what,
                started.state or "gone",
            )
            return False
        async with self._holding_fork_guard():
            self.supervisor.launch(record, fence, payload, dagster_run, sent_at, trace_parent)
        return True

    async def _refuse(
        self,
        reason: str,
        data: bytes,
        queue: str | None,
        task_id: str | None = None,
        labels: tuple[str, str] = (UNKNOWN_LABEL, UNKNOWN_LABEL),
    ) -> None:
        await dead_letter(self.conn, self.options.name, reason, data, task_id, queue)
        self.recorder.refused(*labels)

    async def _persist(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Retry while the key store is unreachable; a stop request gives up (what was half
        taken is then recovered like a dead worker's: its claim released, its message sent)."""
        return await retrying(what, operation, give_up=self.stopping)

    def _warm_up(self, payload: StepTaskPayload | RunTaskPayload) -> DagsterRun | None:
        """Load what the task process will need into this process, before the fork.

        For a step, returns its run as stored now. A failure here is left to the task process,
        which meets it again and reports it as the step's or run's failure.
        """
        with self.fork_guard:
            try:
                if isinstance(payload, StepTaskPayload):
                    args = payload.execute_step_args
                    return self.cache.warm_up(args.job_origin, args.instance_ref, args.run_id)
                self.cache.warm_up_run(payload.run_id, payload.instance_ref)
            except Exception as exc:
                logger.warning("Warm-up failed (%s); the task process will retry it.", exc)
        return None

    def preload(self) -> bool:
        """Open the worker's own Dagster instance before any task asks for it (blocking: call it
        in a thread). Holds the fork guard, so no task process forks while it connects."""
        with self.fork_guard:
            try:
                return self.cache.preload_own_instance()
            except Exception as exc:
                logger.warning("Could not open the Dagster instance ahead of time (%s).", exc)
                return False

    @contextlib.asynccontextmanager
    async def _holding_fork_guard(self) -> AsyncIterator[None]:
        guard = self.fork_guard
        if not guard.acquire(blocking=False):
            acquiring = asyncio.ensure_future(asyncio.to_thread(guard.acquire))
            try:
                await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                acquiring.add_done_callback(lambda _: guard.release())
                raise
        try:
            yield
        finally:
            guard.release()


async def _acknowledge(ack: Callable[[], Any] | None) -> None:
    """Acknowledge a message. A lost ack only means a redelivery, which the claim ignores."""
    if ack is None:
        return
    try:
        result = ack()
        if asyncio.iscoroutine(result):
            await result
    except Exception as exc:
        logger.warning(
            "Could not acknowledge a message (%s: %s); a redelivery will be ignored.",
            type(exc).__name__,
            exc,
        )


def _task_id_of(intake: Intake, data: bytes) -> str | None:
    """The task id of a taskiq message body, or None if it does not decode."""
    try:
        return str(intake.conn.broker.formatter.loads(data).task_id)
    except Exception:
        return None
