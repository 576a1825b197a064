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
from dagster_taskiq.lifecycle.lease import LeasePolicy
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
#: The longest a sleeping heartbeat goes without looking whether a lease taken meanwhile needs
#: an earlier beat (a worker with a long ``--heartbeat-interval`` that claims a short lease).
PAUSE_SLICE = 0.25
#: Seconds between two refreshes of the workers index's TTL (it lasts days; see ``KeySpace``).
INDEX_REFRESH_INTERVAL = 60.0


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.options = options
        self.instance = instance
        self.info = info
        self.guard = guard
        self.intake = intake
        self.request_stop = request_stop
        #: Task id -> monotonic send time of its last renewal (of any outcome).
        self._renewal_sent: dict[str, float] = {}
        self._index_refreshed_at = float("-inf")

    async def register(self) -> None:
        """Register the worker; :class:`WorkerNameTaken` if a live worker has its name."""
        beat = await self.conn.keystore.beat_worker(
            self.info(), self.instance, self.options.liveness_ttl
        )
        if not beat.registered:
            raise WorkerNameTaken(self.options.name)

    def _renewable(self) -> dict[str, tuple[int, float]]:
        """Task id to (fence, heartbeat_timeout) of every claim and lease this worker keeps."""
        return {**self.intake.claims, **self.guard.leases()}

    def next_beat_in(self, failures: int = 0) -> float:
        """Seconds until the next beat: the heartbeat interval (after a failure, the back-off),
        or sooner when a kept lease's renewal period (:meth:`LeasePolicy.renew_every`) is
        shorter. A worker started with a long ``--heartbeat-interval`` still renews a short lease
        in time."""
        pause = HEARTBEAT_BACKOFF.delay(failures) if failures else self.options.heartbeat_interval
        periods = [LeasePolicy(lease[1]).renew_every() for lease in self._renewable().values()]
        return min([pause, *periods])

    def _due_for_renewal(
        self, leases: dict[str, tuple[int, float]], revoked: tuple[str, ...], now: float
    ) -> dict[str, tuple[int, float]]:
        """The leases to renew in this beat: those whose renewal period has passed (see
        :meth:`LeasePolicy.renew_every`), new ones, and revoked ones (so that their process is
        stopped now, not at their next renewal)."""
        interval = self.options.heartbeat_interval
        due = {}
        for task_id, lease in leases.items():
            period = LeasePolicy(lease[1]).renew_every()
            # Half a beat of slack, so that a lease due "about now" is not put off by a beat.
            slack = min(interval, period) / 2
            if task_id in revoked or (
                now - self._renewal_sent.get(task_id, float("-inf")) >= period - slack
            ):
                due[task_id] = lease
        for task_id in list(self._renewal_sent):
            if task_id not in leases:
                del self._renewal_sent[task_id]
        for task_id in due:
            self._renewal_sent[task_id] = now
        return due

    async def beat_once(self) -> None:
        """One heartbeat: liveness, shutdown requests and revocations, and the leases and
        claims whose renewal is due renewed."""
        conn = self.conn
        sent_at = self.clock()
        refresh_index = sent_at - self._index_refreshed_at >= INDEX_REFRESH_INTERVAL
        beat = await conn.keystore.beat_worker(
            self.info(), self.instance, self.options.liveness_ttl, refresh_index=refresh_index
        )
        if refresh_index:
            self._index_refreshed_at = sent_at
        if not beat.registered:
            self.request_stop(
                f"another live worker named {self.options.name} took over its liveness record"
            )
        if beat.shutdown_requested:
            self.request_stop("terminate requested through the CLI")
        held = self.guard.leases()
        leases = self._due_for_renewal({**self.intake.claims, **held}, beat.revoked, sent_at)
        try:
            transitions = await conn.keystore.renew(leases)
        except BaseException:
            # Not renewed: try these again on the next beat, not a whole interval later.
            for task_id in leases:
                self._renewal_sent.pop(task_id, None)
            raise
        for task_id, transition in transitions.items():
            # Only a renewal of a task held when it was sent says anything about its process:
            # a claim renewed while its task was being started reads "claimed", not "lost".
            if task_id in held:
                self.guard.renewed(task_id, transition, sent_at)
        if isinstance(conn.broker, RedisPriorityBroker):
            # An idle consumer's polls refresh its liveness already; a busy one's do not. The
            # skip stays well inside the consumer's liveness TTL whatever the beat interval.
            skip_within = min(
                2 * self.options.heartbeat_interval, conn.broker.liveness_ttl / 4
            )
            await conn.broker.keep_alive(min_interval=skip_within)

    async def run(self) -> None:
        """Beat every ``heartbeat_interval`` (sooner while a held lease needs it, see
        :meth:`next_beat_in`) until cancelled; back off (briefly) on failures."""
        failures = 0
        interval = self.options.heartbeat_interval
        deadline = max(2.0, 3 * interval)
        while True:
            await self._pause(failures)
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

    async def _pause(self, failures: int) -> None:
        """Sleep until the next beat is due. A lease or claim taken meanwhile can bring the beat
        forward, so the pause is taken in slices of at most :data:`PAUSE_SLICE`."""
        began = self.clock()
        while True:
            left = began + self.next_beat_in(failures) - self.clock()
            if left <= 0:
                return
            await asyncio.sleep(min(left, PAUSE_SLICE))


class Sweeper:
    """Recovers stranded tasks (unsent, lost pop replies, dead holders, lapsed leases)."""

    def __init__(self, conn: TaskiqConnection) -> None:
        self.conn = conn

    async def sweep_once(self) -> None:
        """One sweep: due tasks, then (when it is this worker's turn) dead broker consumers.
        Stray pops are put back by the heartbeat's ``keep_alive``."""
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
