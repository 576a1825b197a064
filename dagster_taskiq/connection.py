"""The async core shared by the step handler, the run launcher, the worker and the CLI.

A :class:`TaskiqConnection` owns one broker, its result backend and the key store, all bound to
the event loop it was started on. Sync callers reach it through :class:`TaskiqClient`, which runs
it on an :class:`~dagster_taskiq.bridge.AsyncBridge`.
"""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage, TaskiqResult

from dagster_taskiq.bridge import AsyncBridge
from dagster_taskiq.brokers.factory import PRIORITY_LABEL, QUEUE_LABEL, make_broker, make_redis
from dagster_taskiq.config import TaskiqSettings, redact_url
from dagster_taskiq.errors import BadMessageError, BrokerUnavailableError, TaskSubmissionError
from dagster_taskiq.lifecycle.health import outcome_of
from dagster_taskiq.lifecycle.keys import KeySpace
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.retry import TRANSIENT_ERRORS, retrying, short_error
from dagster_taskiq.lifecycle.states import Outcome, TaskKind
from dagster_taskiq.lifecycle.store import TaskStore
from dagster_taskiq.payloads import TaskOutcome, decode_outcome, encode
from dagster_taskiq.signing import SIGNATURE_LABEL, sign
from dagster_taskiq.tracing import TraceContext, enqueue_span

logger = logging.getLogger("dagster_taskiq")
T = TypeVar("T")

__all__ = ["TRANSIENT_ERRORS", "TaskiqClient", "TaskiqConnection", "seconds_ago"]

#: Default of ``config_source.reconnect_timeout``: how long a submit keeps retrying while the
#: broker or the backend is unreachable before the step (or run) fails.
DEFAULT_RECONNECT_TIMEOUT = 60.0
#: Extra seconds the broker's start-up gets beyond ``connect_timeout``, so that the broker's own
#: connect timeout fires first and it stops retrying in the background.
_STARTUP_GRACE = 1.0


class TaskiqConnection:
    """Broker, result backend and key store for one event loop."""

    def __init__(
        self,
        settings: TaskiqSettings,
        *,
        listen_queues: Sequence[str] = (),
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.backend_redis: Redis = make_redis(settings.backend_url, settings)
        broker_redis = (
            self.backend_redis
            if settings.broker_url == settings.backend_url
            else (
                make_redis(settings.broker_url, settings)
                if settings.broker_kind == "redis"
                else None
            )
        )
        self.broker_redis = broker_redis
        self.broker: AsyncBroker = make_broker(
            settings,
            broker_redis=broker_redis,
            backend_redis=self.backend_redis,
            listen_queues=listen_queues,
            consumer=consumer,
        )
        self.broker.is_worker_process = bool(listen_queues)
        self.keys = KeySpace(settings.key_prefix)
        #: The task lifecycle store (records, leases, workers) in the backend Redis.
        self.keystore = TaskStore(self.backend_redis, self.keys, settings.result_ttl)
        self._started = False

    async def start(self) -> None:
        """Connect to the backend and the broker, failing within ``connect_timeout`` seconds."""
        if self._started:
            return
        deadline = self.settings.connect_timeout
        try:
            await asyncio.wait_for(self.backend_redis.ping(), deadline)
        except Exception as exc:
            raise BrokerUnavailableError(
                f"Could not reach the Redis backend at {redact_url(self.settings.backend_url)} "
                f"({_why(exc, deadline)}). Start Redis or fix 'backend' (or "
                "DAGSTER_TASKIQ_BACKEND_URL)."
            ) from None
        try:
            if self.broker_redis is not None and self.broker_redis is not self.backend_redis:
                await asyncio.wait_for(self.broker_redis.ping(), deadline)
            # The broker times its own connection attempts out at ``deadline`` (see
            # make_broker); the grace lets it do so, and so stop retrying, before this gives up.
            await asyncio.wait_for(self.broker.startup(), deadline + _STARTUP_GRACE)
        except Exception as exc:
            raise BrokerUnavailableError(
                f"Could not reach the broker at {redact_url(self.settings.broker_url)} "
                f"({_why(exc, deadline)}). Start the broker or fix 'broker' (or "
                "DAGSTER_TASKIQ_BROKER_URL)."
            ) from None
        self._started = True

    async def close(self) -> None:
        """Close the broker and Redis connections."""
        if self._started:
            try:
                await self.broker.shutdown()
            except Exception:
                logger.debug("broker shutdown failed", exc_info=True)
        if self.broker_redis is not None and self.broker_redis is not self.backend_redis:
            await self.broker_redis.aclose()
        await self.backend_redis.aclose()
        self._started = False

    # -- submitting --------------------------------------------------------------------------
    def build_message(
        self,
        *,
        task_id: str,
        task_name: str,
        payload: str,
        queue: str,
        priority: int,
        trace_labels: dict[str, str] | None = None,
    ) -> BrokerMessage:
        """The taskiq broker message for one task: one serdes JSON argument, routing labels,
        and the trace context (``trace_labels``) when tracing is on."""
        labels: dict[str, Any] = {
            **(trace_labels or {}),
            QUEUE_LABEL: queue,
            PRIORITY_LABEL: priority,
            "ack_type": "when_received",
        }
        if self.settings.signing_key:
            labels[SIGNATURE_LABEL] = sign(self.settings.signing_key, task_id, task_name, payload)
        message = TaskiqMessage(
            task_id=task_id, task_name=task_name, labels=labels, args=[payload], kwargs={}
        )
        return self.broker.formatter.dumps(message)

    async def submit(
        self,
        *,
        task_id: str,
        task_name: str,
        payload: str,
        kind: TaskKind | str,
        run_id: str,
        step_key: str | None,
        queue: str,
        priority: int,
        heartbeat_timeout: float,
        trace_parent: TraceContext | None = None,
    ) -> None:
        """Register the task (queued, unsent), send it, then mark it sent.

        A crash or a failed send between the steps leaves the task registered and unsent: any
        worker's sweep sends it within ``heartbeat_timeout``. All of it is the task's
        ``enqueue`` span (a child of ``trace_parent``, the sender's trace context).
        """
        with enqueue_span(
            parent=trace_parent,
            kind=TaskKind(kind).value,
            run_id=run_id,
            step_key=step_key,
            queue=queue,
            task_id=task_id,
        ) as trace_labels:
            await self._submit(
                task_id=task_id,
                task_name=task_name,
                payload=payload,
                kind=kind,
                run_id=run_id,
                step_key=step_key,
                queue=queue,
                priority=priority,
                heartbeat_timeout=heartbeat_timeout,
                trace_labels=trace_labels,
            )

    async def _submit(
        self,
        *,
        task_id: str,
        task_name: str,
        payload: str,
        kind: TaskKind | str,
        run_id: str,
        step_key: str | None,
        queue: str,
        priority: int,
        heartbeat_timeout: float,
        trace_labels: dict[str, str],
    ) -> None:
        await self.start()
        message = self.build_message(
            task_id=task_id,
            task_name=task_name,
            payload=payload,
            queue=queue,
            priority=priority,
            trace_labels=trace_labels,
        )
        size = len(message.message)
        if size > self.settings.max_message_bytes:
            what = f"step '{step_key}'" if step_key else "the run"
            raise TaskSubmissionError(
                f"Task {task_id} for {what} of run {run_id} is {size} bytes, more than "
                f"max_message_bytes ({self.settings.max_message_bytes}) allows for queue '{queue}'."
                " Pass large data through IO managers, or raise config_source.max_message_bytes."
            )
        what = f"submitting task {task_id} ({_what(step_key, run_id)}) to queue '{queue}'"
        await self.retrying(
            what,
            lambda: self.keystore.register(
                task_id=task_id,
                kind=kind,
                run_id=run_id,
                step_key=step_key,
                queue=queue,
                priority=priority,
                heartbeat_timeout=heartbeat_timeout,
                message=message.message,
            ),
        )
        # A retried kick may deliver the message twice; the claim lets only one copy run.
        await self.retrying(what, lambda: self.broker.kick(message))
        await self.retrying(
            what, lambda: self.keystore.mark_sent(task_id, heartbeat_timeout, fence=0)
        )

    @property
    def reconnect_timeout(self) -> float:
        """Seconds a submit keeps retrying while the broker or backend is unreachable."""
        return float(self.settings.option("reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT))

    async def retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` under the retry policy for up to ``reconnect_timeout`` seconds."""
        return await retrying(
            what,
            operation,
            timeout=self.reconnect_timeout,
            advice=f" Broker and backend: {self.settings.describe()}. Raise "
            "config_source.reconnect_timeout to ride out longer outages.",
        )

    # -- recovery (lifecycle.recovery.MessageSender) -----------------------------------------
    async def send_registered(self, record: TaskRecord, message: bytes) -> None:
        """Send a task's registered message to its queue at its priority (once, no retries)."""
        await self.start()
        await self.broker.kick(
            BrokerMessage(
                task_id=record.task_id,
                task_name="",
                message=message,
                labels={QUEUE_LABEL: record.queue, PRIORITY_LABEL: record.priority},
            )
        )

    async def holds(self, record: TaskRecord, message: bytes) -> bool | None:
        """Whether the broker still holds the message; None when it cannot tell (RabbitMQ)."""
        holds = getattr(self.broker, "holds", None)
        if holds is None:
            return None
        return bool(await holds(record.queue, message))

    # -- results -----------------------------------------------------------------------------
    @staticmethod
    def result_value(outcome: TaskOutcome, elapsed: float) -> str:
        """A task's outcome in the taskiq result backend's JSON format."""
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=not _is_success(outcome.status),
            return_value=encode(outcome),
            execution_time=round(elapsed, 3),
            log=None,
        )
        return json.dumps(result.model_dump(mode="json"))

    def result_key(self, task_id: str) -> str:
        """The Redis key under which the taskiq result backend keeps ``task_id``'s result."""
        return self.keys.result(task_id)

    async def outcome(self, task_id: str) -> TaskOutcome | None:
        """The task's outcome (from its record, else the result backend), or None if none yet.

        The stored value is parsed as plain JSON and only its ``return_value`` string is decoded,
        with Dagster serdes, into a :class:`TaskOutcome`. Nothing else in it is interpreted (taskiq
        would rebuild an ``error`` field into an exception object), and nothing is unpickled.
        """
        record = await self.keystore.get(task_id)
        if record is not None and record.outcome_json:
            return outcome_of(record)
        raw = await self.backend_redis.get(self.result_key(task_id))
        if raw is None:
            return None
        try:
            value = json.loads(raw)["return_value"]
        except (ValueError, TypeError, KeyError) as exc:
            raise BadMessageError(
                f"Task {task_id}: the result backend holds a value that is not a dagster-taskiq "
                f"outcome (JSON with a return_value); refusing to read it ({type(exc).__name__})."
            ) from None
        return decode_outcome(value, task_id)


def _what(step_key: str | None, run_id: str) -> str:
    return f"step '{step_key}' of run {run_id}" if step_key else f"run {run_id}"


def _why(exc: BaseException, deadline: float) -> str:
    """Why a connection attempt failed: no answer within the deadline, or the error it got."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {deadline:.0f} s"
    return short_error(exc)


def _is_success(status: str) -> bool:
    try:
        return Outcome(status).is_success
    except ValueError:
        return False


class TaskiqClient:
    """Synchronous facade over a :class:`TaskiqConnection` for Dagster's sync code paths.

    All calls run on one private event loop thread (:class:`AsyncBridge`); every call is bounded
    by a deadline so nothing in Dagster's loop can hang on the broker.
    """

    def __init__(self, settings: TaskiqSettings, bridge: AsyncBridge | None = None) -> None:
        self.settings = settings
        self.bridge = bridge or AsyncBridge()
        self._connection: TaskiqConnection | None = None
        self.bridge.on_reset(self._forget_connection)

    def _forget_connection(self) -> None:
        self._connection = None

    @property
    def timeout(self) -> float:
        """Deadline of one call: connecting, plus riding out an outage (``reconnect_timeout``),
        plus a margin. Connecting alone still fails within ``connect_timeout``."""
        reconnect = float(self.settings.option("reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT))
        return self.settings.connect_timeout + reconnect + 5.0

    def run(self, factory: "Any") -> Any:
        """Run ``factory(connection)`` (a coroutine function) on the bridge loop."""

        async def _call() -> Any:
            if self._connection is None:
                self._connection = TaskiqConnection(self.settings)
            await self._connection.start()
            return await factory(self._connection)

        return self.bridge.run(_call(), timeout=self.timeout)

    def connect(self) -> None:
        """Connect now, raising :class:`BrokerUnavailableError` within the deadline."""

        async def _noop(_: TaskiqConnection) -> None:
            return None

        try:
            self.run(_noop)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"Could not reach the broker or backend ({self.settings.describe()}) within "
                f"{self.timeout:.0f} s. Start them or fix the URLs."
            ) from None

    def close(self) -> None:
        """Close connections and stop the bridge loop."""
        if self._connection is not None:
            connection = self._connection
            self._connection = None
            try:
                self.bridge.run(connection.close(), timeout=5)
            except Exception:
                logger.debug("closing the taskiq connection failed", exc_info=True)
        self.bridge.close()

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run an arbitrary coroutine on the bridge loop within the deadline."""
        return self.bridge.run(coro, timeout=self.timeout)

    # Convenience wrappers ------------------------------------------------------------------
    def get_task(self, task_id: str) -> TaskRecord | None:
        """The key store's record of a task."""
        return self.run(lambda c: c.keystore.get(task_id))

    def revoke(self, task_id: str) -> str:
        """Revoke a task; returns the state it was in."""
        return self.run(lambda c: c.keystore.revoke(task_id))

    def outcome(self, task_id: str) -> TaskOutcome | None:
        """A task's outcome from the result backend."""
        return self.run(lambda c: c.outcome(task_id))


def seconds_ago(timestamp: float | None) -> str:
    """``"41.2 s ago"`` for a UNIX timestamp (``"never"`` for None)."""
    if timestamp is None:
        return "never"
    return f"{max(0.0, time.time() - timestamp):.1f} s ago"
