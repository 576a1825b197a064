"""The worker process: wires the consumer, intake, supervisor, heartbeat and sweeper together.

One asyncio loop owns the broker connection, signal handling and these parts:

* :class:`~.consumer.Consumer` pulls a message whenever a slot is free;
* :class:`~.intake.Intake` validates it, claims its task (fencing token) and starts it;
* :class:`~.supervisor.Supervisor` forks the task's process and finishes the task;
* :class:`~.guard.LeaseGuard` stops a process before its lease can lapse;
* :class:`~.heartbeat.Heartbeat` keeps the worker's liveness and its leases fresh;
* :class:`~.heartbeat.Sweeper` recovers stranded tasks of the whole deployment.
"""

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import socket
import time
from typing import TYPE_CHECKING

from dagster_taskiq.config import TaskiqSettings, redact_url
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.errors import DagsterTaskiqError
from dagster_taskiq.lifecycle.records import WorkerInfo
from dagster_taskiq.lifecycle.states import WorkerState
from dagster_taskiq.metrics.recorder import NullRecorder, TaskRecorder, held_slots
from dagster_taskiq.worker.consumer import SHUTDOWN_STEP_TIMEOUT, Consumer, bounded
from dagster_taskiq.worker.guard import REVOKE_GRACE_SECONDS, LeaseGuard
from dagster_taskiq.worker.heartbeat import Heartbeat, Sweeper, WorkerNameTaken
from dagster_taskiq.worker.intake import Intake
from dagster_taskiq.worker.options import (
    WorkerOptions,
    default_worker_name,
    describe_exit,
    parse_queues,
)
from dagster_taskiq.worker.supervisor import Supervisor
from dagster_taskiq.worker.warm import WarmCache

if TYPE_CHECKING:
    from dagster_taskiq.metrics.endpoint import WorkerEndpoint

__all__ = [
    "Worker",
    "WorkerNameInUseError",
    "WorkerOptions",
    "default_worker_name",
    "describe_exit",
    "parse_queues",
    "run_worker",
]

logger = logging.getLogger("dagster_taskiq.worker")


class WorkerNameInUseError(DagsterTaskiqError):
    """``worker start -n NAME`` while a live worker named NAME exists on the same key store."""


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
        #: Tells this process apart from an earlier worker that had the same name.
        self.instance = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.state = WorkerState.STARTING
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._guard = LeaseGuard()

    def request_stop(self, reason: str) -> None:
        """Stop taking tasks; a second request also interrupts running tasks."""
        if self._stopping.is_set():
            if not self._force.is_set():
                logger.warning("Second stop request (%s): interrupting running tasks.", reason)
                self._force.set()
            return
        logger.info("Worker %s stopping (%s): taking no new tasks.", self.options.name, reason)
        self.state = WorkerState.DRAINING
        self._stopping.set()

    def info(self) -> WorkerInfo:
        """This worker's liveness record as of now."""
        running = tuple(self._guard.running)
        return WorkerInfo(
            name=self.options.name,
            host=self.host,
            pid=os.getpid(),
            queues=tuple(self.options.queues),
            concurrency=self.options.concurrency,
            running=running,
            started_at=self.started_at,
            last_heartbeat=time.time(),
            state=self.state.value,
            broker=redact_url(self.settings.broker_url),
        )

    async def serve(self) -> int:
        """Run until stopped. Returns the process exit code."""
        for module in self.options.includes:
            importlib.import_module(module)
        conn = TaskiqConnection(
            self.settings, listen_queues=self.options.queues, consumer=self.options.name
        )
        slots = asyncio.Semaphore(self.options.concurrency)
        stopping = self._stopping.is_set
        guard = self._guard
        endpoint = self._metrics_endpoint()
        recorder: TaskRecorder = endpoint.recorder if endpoint else NullRecorder()
        supervisor = Supervisor(conn, self.options, self.cache, slots, stopping, guard, recorder)
        intake = Intake(
            conn, self.options, self.instance, self.cache, supervisor, stopping, recorder
        )
        heartbeat = Heartbeat(
            conn, self.options, self.instance, self.info, guard, intake, self.request_stop
        )
        try:
            await conn.start()
        except BaseException:
            if endpoint:
                endpoint.close()
            raise
        try:
            await heartbeat.register()
        except WorkerNameTaken:
            await bounded(conn.close(), 2 * SHUTDOWN_STEP_TIMEOUT)
            if endpoint:
                endpoint.close()
            raise WorkerNameInUseError(
                f"A live worker named '{self.options.name}' already exists on this key store "
                f"({self.settings.describe()}). Pick another name with -n, or stop it first "
                f"(dagster-taskiq worker terminate {self.options.name})."
            ) from None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        consumer = Consumer(conn, intake, slots, self._stopping)
        if endpoint:
            endpoint.watch(
                lambda: held_slots(intake.claims, guard.running),
                lambda: consumer.consuming.is_set() and self.state is WorkerState.SERVING,
            )
        self.state = WorkerState.SERVING
        background = [
            asyncio.create_task(heartbeat.run()),
            asyncio.create_task(Sweeper(conn).run()),
            asyncio.create_task(guard.enforce()),
        ]
        if endpoint:
            background.append(asyncio.create_task(endpoint.probe.run(conn)))
        # Optional work comes after the worker consumes: a task that arrives meanwhile waits for
        # the instance to open (as it would open it itself) and no longer.
        background.append(asyncio.create_task(_open_instance_early(intake)))
        logger.info(
            "Worker %s ready: queues %s, concurrency %d, %s.",
            self.options.name,
            ",".join(self.options.queues),
            self.options.concurrency,
            self.settings.describe(),
        )
        try:
            await consumer.run()
            await self._drain(supervisor)
        finally:
            for task in background:
                task.cancel()
            # Bounded: a cancellation that redis-py swallows mid-command must not hang exit.
            await asyncio.wait(set(background), timeout=SHUTDOWN_STEP_TIMEOUT)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self.state = WorkerState.STOPPED
            if endpoint:
                endpoint.close()
            # Each clean-up step is bounded: with the broker or backend down they would wait
            # for a reconnection that may never come, and SIGTERM must still end the worker.
            with contextlib.suppress(Exception):
                await bounded(
                    conn.keystore.remove_worker(self.options.name, self.instance),
                    SHUTDOWN_STEP_TIMEOUT,
                )
            try:
                await bounded(conn.close(), 2 * SHUTDOWN_STEP_TIMEOUT)
            except Exception as exc:
                logger.warning(
                    "Could not close the broker connections cleanly (%s); exiting anyway.",
                    type(exc).__name__,
                )
        logger.info("Worker %s stopped.", self.options.name)
        return 0

    def _metrics_endpoint(self) -> "WorkerEndpoint | None":
        """With ``--metrics-port``, the started metrics endpoint; else None."""
        options = self.options
        if options.metrics_port is None:
            return None
        from dagster_taskiq.metrics.endpoint import WorkerEndpoint

        endpoint = WorkerEndpoint(options.metrics_host, options.metrics_port, options.concurrency)
        endpoint.start()
        return endpoint

    async def _drain(self, supervisor: Supervisor) -> None:
        if not supervisor.tasks:
            return
        logger.info("Waiting for %d running task(s) to finish.", len(self._guard.running))
        force = asyncio.ensure_future(self._force.wait())
        pending = asyncio.ensure_future(asyncio.wait(set(supervisor.tasks)))
        done, _ = await asyncio.wait(
            {force, pending}, timeout=self.options.shutdown_timeout, return_when="FIRST_COMPLETED"
        )
        if pending not in done:
            self._guard.interrupt_all()
            await asyncio.wait({pending}, timeout=REVOKE_GRACE_SECONDS + 2)
            self._guard.kill_all()
            await pending
        force.cancel()


def run_worker(settings: TaskiqSettings, options: WorkerOptions) -> int:
    """Run a worker in this process until it is stopped; returns the exit code."""
    return asyncio.run(Worker(settings, options).serve())


#: How long a worker keeps looking for its instance's storage to be complete, so that it can open
#: the instance before its first task (see :mod:`.storage_ready`), and how often it looks.
PRELOAD_WAIT = 120.0
PRELOAD_RETRY = 1.0


async def _open_instance_early(intake: Intake) -> None:
    """Open the worker's own Dagster instance in a thread (see :meth:`Intake.preload`) once its
    storage is complete; look again every second for a while if it is still being made."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + PRELOAD_WAIT
    while not await asyncio.to_thread(intake.preload) and loop.time() < give_up_at:
        await asyncio.sleep(PRELOAD_RETRY)
