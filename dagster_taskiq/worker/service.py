"""The worker: pull tasks only when a slot is free, claim them, fork a child, supervise it.

One asyncio loop owns the broker connection, the heartbeat and signal handling; each task runs in
a child process forked from this warm parent (see :mod:`dagster_taskiq.worker.child`).
"""

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dagster._core.storage.dagster_run import DagsterRun
from taskiq import AckableMessage, TaskiqMessage

from dagster_taskiq import keystore as ks
from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TRANSIENT_ERRORS, TaskiqConnection
from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.launcher import cancel_unfinished_run
from dagster_taskiq.payloads import (
    KNOWN_TASK_NAMES,
    STEP_TASK_NAME,
    RunTaskPayload,
    StepTaskPayload,
    TaskOutcome,
    decode_run,
    decode_step,
)
from dagster_taskiq.worker.bodies import BAD_MESSAGE, run_step, run_whole_run
from dagster_taskiq.worker.child import ChildProcess, fork_child
from dagster_taskiq.worker.warm import WarmCache

logger = logging.getLogger("dagster_taskiq.worker")

#: Seconds between SIGTERM and SIGKILL when a running task is revoked.
REVOKE_GRACE_SECONDS = 3.0
#: Longest wait between two heartbeat attempts while the backend is unreachable: short, so that
#: heartbeats resume within seconds of an outage's end, long before ``heartbeat_timeout``.
HEARTBEAT_RETRY_CAP = 2.0
#: Longest wait between two attempts to reach the broker or backend from the consume loop.
RECONNECT_CAP = 5.0
#: Longest wait for one clean-up step (closing the listener, the connections) at shutdown.
SHUTDOWN_STEP_TIMEOUT = 5.0
T = TypeVar("T")


def default_worker_name() -> str:
    """``<host>-<pid>``: unique per process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker serves: its name, queues, slots and timings."""

    name: str
    queues: tuple[str, ...] = ("dagster",)
    concurrency: int = 1
    heartbeat_interval: float = 1.0
    liveness_ttl: float = 10.0
    shutdown_timeout: float | None = None
    includes: tuple[str, ...] = ()


@dataclasses.dataclass
class _Running:
    task_id: str
    kind: str
    run_id: str
    step_key: str | None
    queue: str
    heartbeat_timeout: float
    child: ChildProcess
    started: float
    kill_at: float | None = None
    revoked: bool = False
    interrupted: bool = False
    lost: bool = False


class Worker:
    """A dagster-taskiq worker process. Use :meth:`serve` as its main coroutine."""

    def __init__(
        self, settings: TaskiqSettings, options: WorkerOptions, cache: WarmCache | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.cache = cache or WarmCache()
        self.host = socket.gethostname()
        self.started_at = time.time()
        self._running: dict[str, _Running] = {}
        self._supervisors: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._slots = asyncio.Semaphore(options.concurrency)
        # Held while a thread reads the database (warm-up) and while forking: a child must not
        # inherit a database connection that another thread of the parent has open.
        self._fork_guard = threading.Lock()
        self._conn: TaskiqConnection | None = None
        self._last_orphan_scan = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop taking tasks; a second request also interrupts running tasks."""
        if self._stopping.is_set():
            if not self._force.is_set():
                logger.warning("Second stop request (%s): interrupting running tasks.", reason)
                self._force.set()
            return
        logger.info(
            "Worker %s stopping (%s): taking no new tasks, %d running.",
            self.options.name,
            reason,
            len(self._running),
        )
        self._stopping.set()

    async def serve(self) -> int:
        """Run until stopped. Returns the process exit code."""
        for module in self.options.includes:
            importlib.import_module(module)
        conn = TaskiqConnection(
            self.settings, listen_queues=self.options.queues, consumer=self.options.name
        )
        self._conn = conn
        await conn.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        await self._heartbeat_once()
        logger.info(
            "Worker %s ready: queues %s, concurrency %d, %s.",
            self.options.name,
            ",".join(self.options.queues),
            self.options.concurrency,
            self.settings.describe(),
        )
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._consume()
            await self._drain()
        finally:
            heartbeat.cancel()
            # Bounded: a cancellation that redis-py swallows mid-command must not hang exit.
            await asyncio.wait({heartbeat}, timeout=SHUTDOWN_STEP_TIMEOUT)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            # Each clean-up step is bounded: with the broker or backend down they would wait
            # for a reconnection that may never come, and SIGTERM must still end the worker.
            with contextlib.suppress(Exception):
                await _bounded(
                    conn.keystore.remove_worker(self.options.name), SHUTDOWN_STEP_TIMEOUT
                )
            try:
                await _bounded(conn.close(), 2 * SHUTDOWN_STEP_TIMEOUT)
            except Exception as exc:
                logger.warning(
                    "Could not close the broker connections cleanly (%s); exiting anyway.",
                    type(exc).__name__,
                )
        logger.info("Worker %s stopped.", self.options.name)
        return 0

    async def _drain(self) -> None:
        if not self._supervisors:
            return
        logger.info("Waiting for %d running task(s) to finish.", len(self._running))
        timeout = self.options.shutdown_timeout
        force = asyncio.ensure_future(self._force.wait())
        pending = asyncio.ensure_future(asyncio.wait(set(self._supervisors)))
        done, _ = await asyncio.wait(
            {force, pending}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        if pending not in done:
            for running in list(self._running.values()):
                logger.warning(
                    "Interrupting task %s (%s) because the worker is shutting down.",
                    running.task_id,
                    _what(running.step_key, running.run_id),
                )
                running.interrupted = True
                running.child.signal(signal.SIGTERM)
                running.kill_at = time.monotonic() + REVOKE_GRACE_SECONDS
            await asyncio.wait({pending}, timeout=REVOKE_GRACE_SECONDS + 2)
            for running in list(self._running.values()):
                running.child.signal(signal.SIGKILL)
            await pending
        force.cancel()

    # -- consuming -------------------------------------------------------------------------
    async def _consume(self) -> None:
        assert self._conn is not None
        backoff = 0.5
        listener = self._conn.broker.listen()
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                acquire: asyncio.Future[Any] = asyncio.ensure_future(self._slots.acquire())
                done, _ = await asyncio.wait({acquire, stop_wait}, return_when="FIRST_COMPLETED")
                if acquire not in done:
                    acquire.cancel()
                    break
                pull: asyncio.Future[Any] = asyncio.ensure_future(listener.__anext__())
                done, _ = await asyncio.wait({pull, stop_wait}, return_when="FIRST_COMPLETED")
                if pull not in done:
                    pull.cancel()
                    # Bounded: with the broker down, the pull's clean-up may wait for a
                    # reconnection that never comes.
                    await asyncio.wait({pull}, timeout=SHUTDOWN_STEP_TIMEOUT)
                    self._slots.release()
                    break
                try:
                    message = pull.result()
                except Exception as exc:  # broker connection trouble
                    self._slots.release()
                    logger.warning(
                        "Lost the broker connection (%s: %s); retrying in %.1f s.",
                        type(exc).__name__,
                        exc,
                        backoff,
                    )
                    with contextlib.suppress(BaseException):
                        await _bounded(listener.aclose(), SHUTDOWN_STEP_TIMEOUT)
                    if await self._stopped_within(backoff):
                        break
                    backoff = min(backoff * 2, RECONNECT_CAP)
                    listener = self._conn.broker.listen()
                    continue
                backoff = 0.5
                try:
                    started = await self._take(message)
                except Exception:
                    logger.exception("Failed to take a message; it stays with the broker.")
                    started = False
                if not started:
                    self._slots.release()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(BaseException):
                await _bounded(listener.aclose(), SHUTDOWN_STEP_TIMEOUT)

    async def _take(self, message: AckableMessage | bytes) -> bool:
        """Claim and start one message. Returns True if a child now runs it."""
        assert self._conn is not None
        conn = self._conn
        data = message.data if isinstance(message, AckableMessage) else message
        ack = message.ack if isinstance(message, AckableMessage) else None

        async def _ack() -> None:
            # A lost ack only means the broker may deliver the message again; the claim in the
            # key store lets no second copy run, so it is logged, not retried.
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

        try:
            taskiq_message = conn.broker.formatter.loads(data)
            payload = self._decode(taskiq_message)
        except BadMessageError as exc:
            await self._reject(str(exc), data)
            await _ack()
            return False
        except Exception as exc:
            await self._reject(
                f"Undecodable message ({type(exc).__name__}); expected taskiq JSON.", data
            )
            await _ack()
            return False

        task_id = taskiq_message.task_id
        name = self.options.name
        # Claim, read and start are safe to repeat for the same worker, so an outage between
        # them is waited out instead of leaving the task claimed by a live worker that dropped it.
        claim = await self._persist(
            f"claiming task {task_id}", lambda: conn.keystore.claim(task_id, name)
        )
        if claim != "claimed":
            await _ack()
            if claim == "unknown":
                await self._reject(
                    f"Task {task_id} has no record in the key store (never submitted through "
                    "dagster-taskiq, or expired).",
                    data,
                )
            elif claim == "revoked":
                logger.info("Skipping revoked task %s.", task_id)
                revoked = TaskOutcome(status="revoked", worker=name, message="revoked")
                await self._persist(
                    f"recording revoked task {task_id}",
                    lambda: conn.store_outcome(task_id, revoked, 0.0),
                )
                await self._persist(
                    f"recording revoked task {task_id}",
                    lambda: conn.keystore.finish(task_id, "revoked", state=ks.REVOKED),
                )
            else:
                logger.info("Ignoring duplicate delivery of task %s (%s).", task_id, claim)
            return False
        await _ack()
        record = await self._persist(f"reading task {task_id}", lambda: conn.keystore.get(task_id))
        if record is None:  # pragma: no cover - expired between claim and read
            return False
        # Import the job code and open the instance before forking, in a thread: the loop keeps
        # heartbeating (the claim stays ours) however long the code takes to import.
        dagster_run = await asyncio.to_thread(self._warm_up, payload)
        timeout = record.heartbeat_timeout
        state = await self._persist(
            f"starting task {task_id}",
            lambda: conn.keystore.start(task_id, name, os.getpid(), timeout),
        )
        if state != ks.RUNNING:
            logger.info("Task %s was %s before it started; not running it.", task_id, state)
            await self._persist(
                f"recording revoked task {task_id}",
                lambda: conn.keystore.finish(task_id, "revoked", state=ks.REVOKED),
            )
            return False
        async with self._holding_fork_guard():
            self._start_child(record, payload, dagster_run)
        return True

    @contextlib.asynccontextmanager
    async def _holding_fork_guard(self) -> AsyncIterator[None]:
        guard = self._fork_guard
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

    def _decode(self, message: TaskiqMessage) -> StepTaskPayload | RunTaskPayload:
        if message.task_name not in KNOWN_TASK_NAMES:
            raise BadMessageError(
                f"Task {message.task_id} names '{message.task_name}', which is not a "
                "dagster-taskiq task; workers run only " + ", ".join(sorted(KNOWN_TASK_NAMES)) + "."
            )
        if len(message.args) != 1 or message.kwargs:
            raise BadMessageError(
                f"Task {message.task_id} ({message.task_name}) must carry exactly one argument."
            )
        if message.task_name == STEP_TASK_NAME:
            return decode_step(message.args[0], message.task_id)
        return decode_run(message.args[0], message.task_id)

    async def _reject(self, reason: str, data: bytes) -> None:
        assert self._conn is not None
        logger.warning("Rejected a message to the dead-letter list: %s", reason)
        keep = int(self.settings.option("dead_letter_max", 1000))
        keystore = self._conn.keystore
        with contextlib.suppress(Exception):
            await self._persist(
                "keeping a dead letter",
                lambda: keystore.dead_letter(reason, data, self.options.name, keep),
            )

    def _warm_up(self, payload: StepTaskPayload | RunTaskPayload) -> DagsterRun | None:
        """Load what the task's child will need into this (parent) process, before the fork.

        For a step, returns its run as stored now, for the child to use.
        """
        with self._fork_guard:
            return self._warm_up_unguarded(payload)

    def _warm_up_unguarded(self, payload: StepTaskPayload | RunTaskPayload) -> DagsterRun | None:
        if isinstance(payload, StepTaskPayload):
            args = payload.execute_step_args
            return self.cache.warm_up(args.job_origin, args.instance_ref, args.run_id)
        self.cache.warm_up_run(payload.run_id, payload.instance_ref)
        return None

    def _start_child(
        self,
        record: ks.TaskRecord,
        payload: StepTaskPayload | RunTaskPayload,
        dagster_run: DagsterRun | None = None,
    ) -> None:
        name = self.options.name
        if isinstance(payload, StepTaskPayload):

            def body(step_done: Callable[[], None]) -> TaskOutcome:
                return run_step(payload, name, self.cache, step_done, dagster_run)

        else:

            def body(step_done: Callable[[], None]) -> TaskOutcome:
                return run_whole_run(payload, name, self.cache)

        child = fork_child(body, self.cache.after_fork, self.cache.before_exit)
        running = _Running(
            task_id=record.task_id,
            kind=record.kind,
            run_id=record.run_id,
            step_key=record.step_key,
            queue=record.queue,
            heartbeat_timeout=record.heartbeat_timeout,
            child=child,
            started=time.monotonic(),
        )
        self._running[record.task_id] = running
        logger.info(
            "Took task %s (%s) from queue '%s' at priority %d; pid %d.",
            record.task_id,
            _what(record.step_key, record.run_id),
            record.queue,
            record.priority,
            child.pid,
        )
        supervisor = asyncio.create_task(self._supervise(running, payload))
        self._supervisors.add(supervisor)
        supervisor.add_done_callback(self._supervisors.discard)
        if record.kind == "run":
            # A run process only orchestrates: it gives its slot back at once, so the steps of
            # the runs a worker holds can always take its slots (no run/step deadlock).
            self._slots.release()

    async def _supervise(self, running: _Running, payload: Any) -> None:
        assert self._conn is not None
        conn = self._conn
        holds_slot = running.kind != "run"
        try:
            with contextlib.suppress(Exception):
                await conn.backend_redis.hset(
                    conn.keystore.task_key(running.task_id), "pid", running.child.pid
                )
            # A step's orchestrator is woken as soon as its outcome is in the event log.
            exit_code = await running.child.wait(
                (lambda: conn.keystore.wake_run(running.run_id)) if running.kind == "step" else None
            )
            elapsed = time.monotonic() - running.started
            if holds_slot:
                # The process is gone: its slot can take the next task while this one's
                # outcome is being recorded.
                holds_slot = False
                self._slots.release()
            outcome = running.child.outcome()
            if outcome is None:
                outcome = TaskOutcome(
                    status="failure",
                    worker=self.options.name,
                    exit_code=exit_code,
                    message=f"The process of task {running.task_id} "
                    f"({_what(running.step_key, running.run_id)}) on worker {self.options.name} "
                    f"{_describe_exit(exit_code)} before reporting an outcome.",
                )
            if running.lost:
                outcome = outcome._replace(
                    status="lost",
                    message=f"Stopped on worker {self.options.name} after it was declared lost.",
                )
            elif running.revoked:
                outcome = outcome._replace(
                    status="revoked", message=f"Revoked while running; {outcome.message}".strip()
                )
            elif running.interrupted:
                outcome = outcome._replace(
                    status="failure",
                    message=f"Interrupted because worker {self.options.name} shut down.",
                )
            if outcome.status == BAD_MESSAGE:
                await self._reject(
                    outcome.message, await conn.keystore.message(running.task_id) or b""
                )
                outcome = outcome._replace(status="failure")
            if running.revoked and not running.lost and isinstance(payload, RunTaskPayload):
                cancel_unfinished_run(
                    self.cache.run_instance(payload.instance_ref), payload.run_id, self.options.name
                )
            await self._store(running, outcome, elapsed)
            logger.info(
                "Finished task %s (%s): %s in %.2f s.",
                running.task_id,
                _what(running.step_key, running.run_id),
                outcome.status,
                elapsed,
            )
        finally:
            self._running.pop(running.task_id, None)
            if holds_slot:
                self._slots.release()

    async def _store(self, running: _Running, outcome: TaskOutcome, elapsed: float) -> None:
        assert self._conn is not None
        state = {"revoked": ks.REVOKED, "lost": ks.LOST}.get(outcome.status, ks.DONE)
        for attempt in range(30):
            try:
                await self._conn.store_outcome(running.task_id, outcome, elapsed)
                await self._conn.keystore.finish(running.task_id, outcome.status, state=state)
                return
            except Exception as exc:
                delay = min(0.2 * 2**attempt, 5.0)
                logger.warning(
                    "Could not record the outcome of task %s (%s); retrying in %.1f s.",
                    running.task_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        logger.error("Gave up recording the outcome of task %s.", running.task_id)

    async def _stopped_within(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) if the worker is asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def _persist(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a broker/backend operation, retrying with backoff while it is unreachable.

        A worker can do nothing useful without its backend, so it waits for it (0.2 s doubling
        to 5 s, one warning per attempt). A stop request gives up: what was half taken is then
        recovered like a dead worker's (its claim is released, its message restored).
        """
        delay = 0.2
        while True:
            try:
                return await operation()
            except TRANSIENT_ERRORS as exc:
                if self._stopping.is_set():
                    raise
                logger.warning(
                    "Broker or backend unreachable while %s (%s: %s); retrying in %.1f s.",
                    what,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._stopped_within(delay)
                delay = min(delay * 2, RECONNECT_CAP)

    # -- heartbeat -------------------------------------------------------------------------
    def info(self) -> ks.WorkerInfo:
        """This worker's liveness record as of now."""
        return ks.WorkerInfo(
            name=self.options.name,
            host=self.host,
            pid=os.getpid(),
            queues=tuple(self.options.queues),
            concurrency=self.options.concurrency,
            running=tuple(self._running),
            started_at=self.started_at,
            last_heartbeat=time.time(),
        )

    async def _heartbeat_once(self) -> None:
        assert self._conn is not None
        conn = self._conn
        running = {tid: r.heartbeat_timeout for tid, r in self._running.items()}
        states = await conn.keystore.heartbeat(self.info(), self.options.liveness_ttl, running)
        if states.pop("__shutdown__", "") and not self._stopping.is_set():
            self.request_stop("terminate requested through the CLI")
        now = time.monotonic()
        for task_id, state in states.items():
            current = self._running.get(task_id)
            if current is None:
                continue
            if state == ks.LOST and not current.revoked:
                # Declared lost (no heartbeat for heartbeat_timeout, e.g. a long outage): the
                # orchestrator retries or fails it elsewhere, so this copy must not go on.
                logger.warning(
                    "Task %s (%s) was declared lost while its heartbeat could not be written; "
                    "stopping its process %d so that it does not run twice.",
                    task_id,
                    _what(current.step_key, current.run_id),
                    current.child.pid,
                )
                current.lost = current.revoked = True
                _interrupt(current, now)
            if state in (ks.REVOKING, ks.REVOKED) and not current.revoked:
                logger.info(
                    "Task %s (%s) was revoked; stopping its process %d.",
                    task_id,
                    _what(current.step_key, current.run_id),
                    current.child.pid,
                )
                current.revoked = True
                _interrupt(current, now)
        for current in self._running.values():
            if current.kill_at is not None and now >= current.kill_at:
                current.child.signal(signal.SIGKILL)
        broker = conn.broker
        if isinstance(broker, RedisPriorityBroker):
            await broker.keep_alive()
            await broker.recover_dead_consumers(min_interval=5.0)
        if now - self._last_orphan_scan > 5.0:
            self._last_orphan_scan = now
            await self._release_orphans()

    async def _release_orphans(self) -> None:
        assert self._conn is not None
        ids = await self._conn.keystore.inflight_ids()
        for start in range(0, len(ids), 500):
            records = await self._conn.keystore.get_many(ids[start : start + 500])
            for record in records:
                if record.state == ks.CLAIMED and record.worker != self.options.name:
                    await self._conn.release_if_orphaned(record.task_id)

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while not _cancel_requested():
            await asyncio.sleep(
                self.options.heartbeat_interval
                if not failures
                else min(self.options.heartbeat_interval * 2**failures, HEARTBEAT_RETRY_CAP)
            )
            try:
                await self._heartbeat_once()
                if failures:
                    logger.warning("Heartbeat recovered after %d failed attempt(s).", failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                logger.warning(
                    "Heartbeat failed (%s: %s); the backend may be unreachable. Retrying.",
                    type(exc).__name__,
                    exc,
                )


def _cancel_requested() -> bool:
    """Whether the current task was asked to stop, even if a library swallowed the cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _bounded(awaitable: Awaitable[Any], timeout: float) -> None:
    """Await ``awaitable`` for at most ``timeout`` seconds, then give up on it.

    Unlike ``asyncio.wait_for`` (Python 3.11), this does not wait for the cancelled operation to
    finish cancelling, so an operation that ignores cancellation cannot hang shutdown.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise TimeoutError(f"gave up after {timeout} s")
    task.result()


def _interrupt(running: _Running, now: float) -> None:
    """SIGTERM a task's process now and SIGKILL it when the grace period ends.

    The SIGKILL is timed on the loop, not on the next heartbeat, so a revoked step is gone within
    the heartbeat interval plus REVOKE_GRACE_SECONDS; the heartbeat's own check is a backstop.
    """
    running.child.signal(signal.SIGTERM)
    running.kill_at = now + REVOKE_GRACE_SECONDS
    asyncio.get_running_loop().call_later(
        REVOKE_GRACE_SECONDS, running.child.signal, signal.SIGKILL
    )


def _what(step_key: str | None, run_id: str) -> str:
    return f"step '{step_key}' of run {run_id}" if step_key else f"run {run_id}"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


def run_worker(settings: TaskiqSettings, options: WorkerOptions) -> int:
    """Run a worker in this process until it is stopped; returns the exit code."""
    return asyncio.run(Worker(settings, options).serve())


def parse_queues(queues: Sequence[str], default: str) -> tuple[str, ...]:
    """Split comma-separated ``-q`` values; default to ``default``."""
    names: list[str] = []
    for value in queues:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(dict.fromkeys(names)) or (default,)
