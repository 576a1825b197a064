"""A heartbeat that renews a task as a claim while the worker starts it (no network needed).

The heartbeat takes its snapshot of claims and leases, then awaits the renewals; meanwhile the
intake's start transition succeeds and the task's process is held. The renewal's reply
("claimed", as the task was when it was renewed) must not read as a lost lease: the process of a
healthy step would be stopped and its run would fail.
"""

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import TaskKind, TaskState
from dagster_taskiq.lifecycle.store import Transition, Verdict
from dagster_taskiq.worker.fence import LeaseClock
from dagster_taskiq.worker.guard import Held, LeaseGuard
from dagster_taskiq.worker.heartbeat import Heartbeat

TASK_ID = "run1.step.abc"
HB = 30.0


def _record() -> TaskRecord:
    return TaskRecord(
        task_id=TASK_ID, kind=TaskKind.STEP, run_id="run1", step_key="step", queue="q",
        priority=0, state=TaskState.RUNNING, worker="w", fence=2, submitted_at=1.0,
        sent_at=1.0, claimed_at=1.0, started_at=1.0, finished_at=None, last_heartbeat=1.0,
        heartbeat_timeout=HB, status=None, pid=1, deliveries=1, requeued_at=None,
        lease_alive=True, holder_alive=None, outcome_json=None,
    )  # fmt: skip


class _Child:
    pid = 12345
    exit_code = None

    def __init__(self) -> None:
        self.signals: list[int] = []

    def signal(self, signum: int) -> None:
        self.signals.append(signum)


@dataclasses.dataclass
class _Store:
    """Starts the task (moves it from claim to held) while the renewals are in flight."""

    guard: LeaseGuard
    intake: Any
    held: Held
    renewed: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    async def beat_worker(self, *_: Any, **__: Any) -> Any:
        return SimpleNamespace(registered=True, shutdown_requested=False, revoked=())

    async def renew(self, leases: dict[str, Any]) -> dict[str, Transition]:
        self.renewed.append(dict(leases))
        await asyncio.sleep(0)
        if TASK_ID in self.intake.claims:  # the start lands while the renewal is in flight
            self.intake.claims.pop(TASK_ID)
            self.guard.hold(self.held)
            return {TASK_ID: Transition(Verdict.OK, TaskState.CLAIMED)}
        return {TASK_ID: Transition(Verdict.OK, TaskState.RUNNING)}


def test_a_claim_renewed_during_the_start_does_not_stop_the_step() -> None:
    guard = LeaseGuard()
    child = _Child()
    clock = LeaseClock()
    now = time.monotonic()
    held = Held(_record(), 2, LeasePolicy(HB), child, clock, now, now)  # type: ignore[arg-type]
    intake = SimpleNamespace(claims={TASK_ID: (2, HB)})
    store = _Store(guard, intake, held)
    conn = SimpleNamespace(keystore=store, broker=object())
    beat_times = iter([now, now + LeasePolicy(HB).renew_every()])
    heartbeat = Heartbeat(
        conn,  # type: ignore[arg-type]
        SimpleNamespace(liveness_ttl=10, heartbeat_interval=1.0),  # type: ignore[arg-type]
        "i",
        lambda: None,  # type: ignore[arg-type,return-value]
        guard,
        intake,  # type: ignore[arg-type]
        lambda _: None,
        clock=lambda: next(beat_times),
    )
    try:
        asyncio.run(heartbeat.beat_once())  # renews the claim; the task is held meanwhile
        assert not held.lost and child.signals == []
        asyncio.run(heartbeat.beat_once())  # renews the lease: still running
        assert len(store.renewed) == 2
        assert store.renewed[-1] == {TASK_ID: (2, HB)}
        assert not held.lost and child.signals == []
    finally:
        guard.release(held)


def test_the_guard_says_why_it_kills_a_process(caplog: pytest.LogCaptureFixture) -> None:
    """A SIGKILL from the guard is never silent: one warning names the task and the reason."""
    guard = LeaseGuard()
    child = _Child()
    long_ago = time.monotonic() - 2 * HB  # its lease was last renewed well past kill_after
    held = Held(_record(), 2, LeasePolicy(HB), child, LeaseClock(), long_ago, long_ago)  # type: ignore[arg-type]
    guard.running[TASK_ID] = held

    async def one_pass() -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(guard.enforce(), 0.05)  # the first pass runs at once

    try:
        with caplog.at_level(logging.WARNING, logger="dagster_taskiq.worker"):
            asyncio.run(one_pass())
            asyncio.run(one_pass())
        assert signal.SIGKILL in child.signals
        kills = [r for r in caplog.records if "Killing the process" in r.getMessage()]
        assert len(kills) == 1  # said once, however many passes send the signal
        assert TASK_ID in kills[0].getMessage() and "last renewed" in kills[0].getMessage()
    finally:
        guard.release(held)
