"""How often the heartbeat renews each lease (no network needed).

Liveness is refreshed on every beat; a lease or claim only every ``T/10``, so that the Redis work
of a busy worker does not grow with the length of its steps more than it must. The worker beats
at least that often while it keeps a lease, whatever its ``--heartbeat-interval`` (a beat slower
than ``T/2`` would stop every step while it is healthy). A revoked task is renewed on the very
next beat (that renewal is what stops its process), and a renewal that failed is tried again on
the next beat.
"""

import asyncio
import itertools
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.states import TaskState
from dagster_taskiq.lifecycle.store import Transition, Verdict
from dagster_taskiq.worker.heartbeat import PAUSE_SLICE, Heartbeat

LONG = "run1.long.a"  # heartbeat_timeout 30 s: renewed every 3 s
SHORT = "run1.short.b"  # heartbeat_timeout 4 s: renewed every 0.4 s, so on every beat here
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


def _heartbeat(
    store: _Store,
    clock: Iterator[float],
    leases: dict[str, tuple[int, float]] | None = None,
    interval: float = INTERVAL,
) -> Heartbeat:
    guard = _Guard({LONG: (1, 30.0), SHORT: (1, 4.0)} if leases is None else leases)
    return Heartbeat(
        SimpleNamespace(keystore=store, broker=object()),  # type: ignore[arg-type]
        SimpleNamespace(liveness_ttl=10, heartbeat_interval=interval),  # type: ignore[arg-type]
        "i",
        lambda: None,  # type: ignore[arg-type,return-value]
        guard,  # type: ignore[arg-type]
        SimpleNamespace(claims={}),  # type: ignore[arg-type]
        lambda _: None,
        clock=lambda: next(clock),
    )


def test_renew_every_is_a_tenth_of_the_timeout() -> None:
    assert LeasePolicy(30.0).renew_every() == 3.0
    assert LeasePolicy(4.0).renew_every() == pytest.approx(0.4)
    assert LeasePolicy(0.01).renew_every() == 0.05  # a floor for absurdly short timeouts
    # Five renewals can fail before the process is stopped at T/2.
    policy = LeasePolicy(30.0)
    assert policy.term_after / policy.renew_every() == 5


def test_the_worker_beats_as_often_as_its_shortest_lease_needs() -> None:
    """With ``--heartbeat-interval 20`` and the default 30 s timeout, a renewal every 20 s would
    come after the step was stopped at 15 s: the beat comes every 3 s while the lease is held."""
    slow = _heartbeat(_Store(), iter([]), leases={LONG: (1, 30.0)}, interval=20.0)
    assert slow.next_beat_in() == 3.0
    assert _heartbeat(_Store(), iter([]), leases={}, interval=20.0).next_beat_in() == 20.0
    assert _heartbeat(_Store(), iter([])).next_beat_in() == pytest.approx(0.4)
    # After a failed beat: the back-off, but never longer than a lease's renewal period.
    assert _heartbeat(_Store(), iter([]), leases={}).next_beat_in(failures=3) == 2.0
    assert slow.next_beat_in(failures=3) == 2.0
    assert _heartbeat(_Store(), iter([])).next_beat_in(failures=3) == pytest.approx(0.4)


def test_a_slow_beat_still_renews_a_lease_before_its_process_is_stopped() -> None:
    """Beats as :meth:`Heartbeat.run` times them, with a 20 s interval: each renewal of a 30 s
    lease is sent well before the guard's SIGTERM deadline of the previous one."""
    store = _Store()
    times = [0.0]
    heartbeat = _heartbeat(store, iter([]), leases={LONG: (1, 30.0)}, interval=20.0)
    sent: list[float] = []
    for _ in range(8):
        heartbeat.clock = lambda: times[-1]
        asyncio.run(heartbeat.beat_once())
        if LONG in store.renewed[-1]:
            sent.append(times[-1])
        times.append(times[-1] + heartbeat.next_beat_in())
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps and max(gaps) <= LeasePolicy(30.0).renew_every()
    assert max(gaps) < LeasePolicy(30.0).term_after


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


def test_a_lease_taken_during_a_long_pause_brings_the_next_beat_forward() -> None:
    """A worker beating every 20 s that claims a task with a 4 s timeout mid-pause must renew it
    within 2 s (its SIGTERM deadline), not at the end of the pause."""
    leases: dict[str, tuple[int, float]] = {}
    heartbeat = _heartbeat(_Store(), iter([]), leases=leases, interval=20.0)
    heartbeat.clock = time.monotonic

    async def _scenario() -> None:
        pause = asyncio.create_task(heartbeat._pause(0))
        await asyncio.sleep(0.3)
        assert not pause.done()  # no lease yet: it would sleep the whole 20 s
        leases[SHORT] = (1, 4.0)  # claimed now
        await asyncio.wait_for(pause, 10.0)  # ends within half the interval, not after 20 s

    asyncio.run(_scenario())
    # Once the claim is seen (within a slice), the beat is due at once: the first renewal comes
    # within a slice of the claim, far inside its SIGTERM deadline.
    assert PAUSE_SLICE + LeasePolicy(4.0).renew_every() < LeasePolicy(4.0).term_after
