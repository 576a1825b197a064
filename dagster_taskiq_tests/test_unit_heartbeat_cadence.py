"""How often the heartbeat renews each lease (no network needed).

Liveness is refreshed on every beat; a lease or claim only every ``T/10`` (at least every beat),
so that the Redis work of a busy worker does not grow with the length of its steps more than it
must. A revoked task is renewed on the very next beat (that renewal is what stops its process),
and a renewal that failed is tried again on the next beat.
"""

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.states import TaskState
from dagster_taskiq.lifecycle.store import Transition, Verdict
from dagster_taskiq.worker.heartbeat import Heartbeat

LONG = "run1.long.a"  # heartbeat_timeout 30 s: renewed every 3 s
SHORT = "run1.short.b"  # heartbeat_timeout 4 s: renewed on every beat
INTERVAL = 1.0


class _Guard:
    def __init__(self, leases: dict[str, tuple[int, float]]) -> None:
        self._leases = leases
        self.renewals: list[str] = []

    def leases(self) -> dict[str, tuple[int, float]]:
        return dict(self._leases)

    def renewed(self, task_id: str, transition: Transition, sent_at: float) -> None:
        self.renewals.append(task_id)


class _Store:
    def __init__(self) -> None:
        self.revoked: tuple[str, ...] = ()
        self.fail_next = False
        self.renewed: list[set[str]] = []

    async def beat_worker(self, *_: Any, **__: Any) -> Any:
        revoked, self.revoked = self.revoked, ()
        return SimpleNamespace(registered=True, shutdown_requested=False, revoked=revoked)

    async def renew(self, leases: dict[str, Any]) -> dict[str, Transition]:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("Redis went away")
        self.renewed.append(set(leases))
        return {task_id: Transition(Verdict.OK, TaskState.RUNNING) for task_id in leases}


def _heartbeat(store: _Store, clock: Iterator[float]) -> Heartbeat:
    guard = _Guard({LONG: (1, 30.0), SHORT: (1, 4.0)})
    return Heartbeat(
        SimpleNamespace(keystore=store, broker=object()),  # type: ignore[arg-type]
        SimpleNamespace(liveness_ttl=10, heartbeat_interval=INTERVAL),  # type: ignore[arg-type]
        "i",
        lambda: None,  # type: ignore[arg-type,return-value]
        guard,  # type: ignore[arg-type]
        SimpleNamespace(claims={}),  # type: ignore[arg-type]
        lambda _: None,
        clock=lambda: next(clock),
    )


def test_renew_every_is_a_tenth_of_the_timeout_and_at_least_a_beat() -> None:
    assert LeasePolicy(30.0).renew_every(INTERVAL) == 3.0
    assert LeasePolicy(4.0).renew_every(INTERVAL) == INTERVAL
    # Five renewals can fail before the process is stopped at T/2.
    policy = LeasePolicy(30.0)
    assert policy.term_after / policy.renew_every(INTERVAL) == 5


def test_long_leases_are_renewed_every_tenth_of_their_timeout() -> None:
    store = _Store()
    heartbeat = _heartbeat(store, iter(float(t) for t in range(10)))
    for _ in range(7):
        asyncio.run(heartbeat.beat_once())
    renewed_long = [beat for beat, ids in enumerate(store.renewed) if LONG in ids]
    renewed_short = [beat for beat, ids in enumerate(store.renewed) if SHORT in ids]
    assert renewed_long == [0, 3, 6]
    assert renewed_short == list(range(7))


def test_a_revoked_task_is_renewed_on_the_next_beat() -> None:
    store = _Store()
    heartbeat = _heartbeat(store, iter(float(t) for t in range(10)))
    asyncio.run(heartbeat.beat_once())  # t=0: both renewed
    store.revoked = (LONG,)
    asyncio.run(heartbeat.beat_once())  # t=1: LONG is not due, but it was revoked
    assert LONG in store.renewed[-1]


def test_a_failed_renewal_is_tried_again_on_the_next_beat() -> None:
    store = _Store()
    heartbeat = _heartbeat(store, iter(float(t) for t in range(10)))
    store.fail_next = True
    with pytest.raises(ConnectionError):
        asyncio.run(heartbeat.beat_once())  # t=0: the renewal fails
    asyncio.run(heartbeat.beat_once())  # t=1: renewed now, not at t=3
    assert store.renewed == [{LONG, SHORT}]
