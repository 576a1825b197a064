"""The heartbeat (liveness and lease renewals) and the sweeper (recovery of stranded tasks).

They run as separate tasks so that neither can hold up the other: a sweep that waits on a broker
outage (re-sending a task) never delays a renewal, and every call is bounded by a deadline. The
lease guard's fencing does not depend on either: it stops a process whose lease was not renewed
in time, whatever the reason.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.records import WorkerInfo
from dagster_taskiq.lifecycle.recovery import sweep
from dagster_taskiq.lifecycle.retry import Backoff, short_error
from dagster_taskiq.worker.guard import LeaseGuard
from dagster_taskiq.worker.intake import Intake
from dagster_taskiq.worker.options import WorkerOptions

logger = logging.getLogger("dagster_taskiq.worker")

#: Seconds between two sweeps of due tasks (and of dead broker consumers).
SWEEP_INTERVAL = 2.0
#: Longest a sweep may take before it is abandoned (the next one picks up where it left off).
SWEEP_DEADLINE = 10.0
#: Waits between failed heartbeats: short, so renewals resume within a second or two of an
#: outage's end, long before any lease lapses.
HEARTBEAT_BACKOFF = Backoff(initial=0.5, cap=2.0)


class WorkerNameTaken(Exception):
    """Another live worker instance holds this worker's name."""


class Heartbeat:
    """Keeps the worker's liveness record and its tasks' leases (and claims) fresh."""

    def __init__(
        self,
        conn: TaskiqConnection,
        options: WorkerOptions,
        instance: str,
        info: Callable[[], WorkerInfo],
        guard: LeaseGuard,
        intake: Intake,
        request_stop: Callable[[str], None],
    ) -> None:
        self.conn = conn
        self.options = options
        self.instance = instance
        self.info = info
        self.guard = guard
        self.intake = intake
        self.request_stop = request_stop

    async def register(self) -> None:
        """Register the worker; :class:`WorkerNameTaken` if a live worker has its name."""
        beat = await self.conn.keystore.beat_worker(
            self.info(), self.instance, self.options.liveness_ttl
        )
        if not beat.registered:
            raise WorkerNameTaken(self.options.name)

    async def beat_once(self) -> None:
        """One heartbeat: liveness, shutdown requests, and every lease and claim renewed."""
        conn = self.conn
        sent_at = time.monotonic()
        beat = await conn.keystore.beat_worker(
            self.info(), self.instance, self.options.liveness_ttl
        )
        if not beat.registered:
            self.request_stop(
                f"another live worker named {self.options.name} took over its liveness record"
            )
        if beat.shutdown_requested:
            self.request_stop("terminate requested through the CLI")
        held = self.guard.leases()
        leases = {**self.intake.claims, **held}
        for task_id, transition in (await conn.keystore.renew(leases)).items():
            # Only a renewal of a task held when it was sent says anything about its process:
            # a claim renewed while its task was being started reads "claimed", not "lost".
            if task_id in held:
                self.guard.renewed(task_id, transition, sent_at)
        if isinstance(conn.broker, RedisPriorityBroker):
            await conn.broker.keep_alive()

    async def run(self) -> None:
        """Beat every ``heartbeat_interval`` until cancelled; back off (briefly) on failures."""
        failures = 0
        interval = self.options.heartbeat_interval
        deadline = max(2.0, 3 * interval)
        while True:
            await asyncio.sleep(HEARTBEAT_BACKOFF.delay(failures) if failures else interval)
            try:
                await asyncio.wait_for(self.beat_once(), deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                logger.warning(
                    "Heartbeat failed (%s); the key store may be unreachable. Retrying.",
                    short_error(exc),
                )
                continue
            if failures:
                logger.warning("Heartbeat recovered after %d failed attempt(s).", failures)
            failures = 0


class Sweeper:
    """Recovers stranded tasks (unsent, lost pop replies, dead holders, lapsed leases)."""

    def __init__(self, conn: TaskiqConnection) -> None:
        self.conn = conn

    async def sweep_once(self) -> None:
        """One sweep: due tasks, then this broker's dead consumers and stray pops."""
        conn = self.conn
        report = await sweep(conn.keystore, conn)
        if report.sent or report.released or report.lost:
            logger.info(
                "Sweep: %d task(s) sent again, %d released from dead workers, %d lost.",
                report.sent,
                report.released,
                report.lost,
            )
        broker = conn.broker
        if isinstance(broker, RedisPriorityBroker):
            await broker.recover_dead_consumers()
            await broker.restore_strays()

    async def run(self) -> None:
        """Sweep every ``SWEEP_INTERVAL`` seconds until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await asyncio.wait_for(self.sweep_once(), SWEEP_DEADLINE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("Sweep failed (%s); trying again shortly.", short_error(exc))
