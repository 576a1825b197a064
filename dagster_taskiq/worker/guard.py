"""The lease guard: stops a task process before its lease can lapse.

For every task process a worker runs, the guard keeps the claim's fencing token, the send time
of the last lease renewal that succeeded, and the :class:`~.fence.LeaseClock` it shares with the
process. A lease that could not be renewed in time (Redis cut off, the lease expired, the claim
taken over) stops the process before anyone else may start the task; a revocation stops it too.
The timings are in :class:`~dagster_taskiq.lifecycle.lease.LeasePolicy`.
"""

import asyncio
import dataclasses
import logging
import signal
import time

from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import TaskState
from dagster_taskiq.lifecycle.store import Transition, Verdict
from dagster_taskiq.worker.child import ChildProcess
from dagster_taskiq.worker.fence import LeaseClock

logger = logging.getLogger("dagster_taskiq.worker")

#: Seconds between SIGTERM and SIGKILL when a running task is revoked or the worker stops.
REVOKE_GRACE_SECONDS = 3.0
#: How often the guard checks its processes' deadlines.
FENCE_CHECK_INTERVAL = 0.1


@dataclasses.dataclass
class Held:
    """A task whose process this worker runs."""

    record: TaskRecord
    fence: int
    policy: LeasePolicy
    child: ChildProcess
    clock: LeaseClock
    started: float
    #: ``time.monotonic()`` at which the last successful renewal (or the start) was sent.
    renewed_at: float
    kill_at: float | None = None
    revoked: bool = False
    interrupted: bool = False
    #: Set when the lease could not be kept: the process is stopped, the task ends ``lost``.
    lost: bool = False
    termed: bool = False
    #: Set once the guard has sent SIGKILL (and said why).
    killed: bool = False

    def move_deadlines(self, renewed_at: float) -> None:
        """A renewal sent at ``renewed_at`` succeeded: push the fencing deadlines."""
        self.renewed_at = max(self.renewed_at, renewed_at)
        self.clock.set(
            self.renewed_at + self.policy.term_after, self.renewed_at + self.policy.kill_after
        )


class LeaseGuard:
    """The task processes a worker runs, keyed by task id, and the enforcement of their leases."""

    def __init__(self) -> None:
        self.running: dict[str, Held] = {}

    def hold(self, held: Held) -> None:
        """Start guarding ``held``; its deadlines count from its ``renewed_at``."""
        held.move_deadlines(held.renewed_at)
        self.running[held.record.task_id] = held

    def release(self, held: Held) -> None:
        """Stop guarding ``held`` (its process has exited)."""
        self.running.pop(held.record.task_id, None)
        held.clock.close()

    def leases(self) -> dict[str, tuple[int, float]]:
        """Task id to (fence, heartbeat_timeout) of every lease this worker must renew."""
        return {
            task_id: (held.fence, held.policy.heartbeat_timeout)
            for task_id, held in self.running.items()
            if not held.lost
        }

    def renewed(self, task_id: str, transition: Transition, sent_at: float) -> None:
        """Act on a renewal's result: push the deadlines, or stop a revoked or lost task."""
        held = self.running.get(task_id)
        if held is None:
            return
        if transition.ok and transition.state is TaskState.RUNNING:
            held.move_deadlines(sent_at)
        elif transition.ok and transition.state is TaskState.REVOKING:
            held.move_deadlines(sent_at)
            if not held.revoked:
                logger.info(
                    "Task %s (%s) was revoked; stopping its process %d.",
                    task_id,
                    held.record.what,
                    held.child.pid,
                )
                held.revoked = True
                self._interrupt(held)
        elif not held.lost:
            why = (
                "its lease expired"
                if transition.verdict is Verdict.EXPIRED
                else (f"its claim is gone (the task is {transition.state or 'unknown'})")
            )
            logger.warning(
                "Task %s (%s): %s; stopping its process %d so that it cannot run twice.",
                task_id,
                held.record.what,
                why,
                held.child.pid,
            )
            held.lost = True
            self._interrupt(held)

    async def enforce(self) -> None:
        """Stop processes whose lease could not be renewed in time, and kill overdue ones."""
        while True:
            now = time.monotonic()
            for held in list(self.running.values()):
                if held.kill_at is not None and now >= held.kill_at:
                    self._kill(held, "it did not stop within the grace after SIGTERM")
                if now >= held.renewed_at + held.policy.kill_after:
                    self._kill(
                        held, f"its lease was last renewed {now - held.renewed_at:.1f} s ago"
                    )
                elif now >= held.renewed_at + held.policy.term_after and not held.termed:
                    logger.warning(
                        "Could not renew the lease of task %s (%s) for %.1f s; stopping its "
                        "process %d before the lease can lapse (heartbeat_timeout %g s).",
                        held.record.task_id,
                        held.record.what,
                        now - held.renewed_at,
                        held.child.pid,
                        held.policy.heartbeat_timeout,
                    )
                    held.lost = True
                    self._interrupt(held)
            await asyncio.sleep(FENCE_CHECK_INTERVAL)

    @staticmethod
    def _kill(held: Held, why: str) -> None:
        """SIGKILL the process (once it is logged, every 0.1 s until it is gone)."""
        if held.child.exit_code is None and not held.killed:
            held.killed = True
            logger.warning(
                "Killing the process %d of task %s (%s): %s.",
                held.child.pid,
                held.record.task_id,
                held.record.what,
                why,
            )
        held.child.signal(signal.SIGKILL)

    def _interrupt(self, held: Held) -> None:
        """SIGTERM the process now (Dagster's interrupt) and SIGKILL it after the grace."""
        if held.termed:
            return
        held.termed = True
        held.child.signal(signal.SIGTERM)
        grace = min(REVOKE_GRACE_SECONDS, held.policy.kill_after - held.policy.term_after)
        held.kill_at = time.monotonic() + grace

    def interrupt_all(self) -> None:
        """Interrupt every running task (the worker is shutting down)."""
        for held in list(self.running.values()):
            logger.warning(
                "Interrupting task %s (%s) because the worker is shutting down.",
                held.record.task_id,
                held.record.what,
            )
            held.interrupted = True
            self._interrupt(held)

    def kill_all(self) -> None:
        """SIGKILL every task process still running."""
        for held in list(self.running.values()):
            held.child.signal(signal.SIGKILL)
