"""A stateful property test of the task lifecycle against a reference model in Python.

Hypothesis drives a few tasks and a few worker processes (some share a name: a restarted worker
is a new instance of the same name; old processes linger as zombies that still hold their fences)
through the ``TaskStore`` API on a real Redis, in random order: register, mark_sent, claim,
start, renew, finish, revoke, expire a lease, mark_lost, release, kill/restart/remove workers.
After every step the Redis state must equal the model, and:

* only the latest claim's fence is accepted: a stale fence never changes anything;
* at most one worker process holds a task's current fence;
* a final state (done, revoked, lost) never changes again;
* a running (or revoking) task has a lease unless the test expired it;
* a task's fence only ever grows, by one per granted claim;
* no key lives without a TTL (``:idx:`` sets aside); active tasks are indexed, final ones not.
"""

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from dagster_taskiq.lifecycle.states import FINAL_STATES, ClaimResult, Outcome, TaskState
from dagster_taskiq.lifecycle.store import TaskStore, Transition, Verdict
from dagster_taskiq_tests.lifecycle_support import (
    HEARTBEAT_TIMEOUT,
    Worker,
    beat,
    delete_prefix,
    digest_of,
    keyspace_problems,
    new_store,
    new_task_id,
    register_task,
    snapshot,
    text,
    unique_prefix,
)

T = TypeVar("T")
HB = HEARTBEAT_TIMEOUT
N_TASKS = 2
NAMES = ("wa", "wb")
ACTIVE_WITH_HOLDER = (TaskState.CLAIMED, TaskState.RUNNING, TaskState.REVOKING)

tasks = st.integers(0, N_TASKS - 1)
#: Index into the processes started so far (taken modulo their number).
procs = st.integers(0, 7)
#: Who acts on a task: the process holding its current fence, the one holding the fence before
#: it (a zombie whose claim was taken over), or any process.
actors = st.one_of(st.sampled_from(["holder", "stale"]), procs)
names = st.sampled_from(NAMES)
outcomes = st.sampled_from(list(Outcome))


#: What ``progress`` may do to a task in each situation (``move:actor``; actor ``holder`` is the
#: process holding the current fence, ``stale`` the one whose claim it superseded). Moves that
#: must be refused (a release of a live claim, mark_lost with a live lease...) probe the guards.
MOVES: dict[str, tuple[str, ...]] = {
    "none": ("register",) * 8,
    "queued": (
        "mark_sent", "claim", "claim", "release", "claim", "mark_lost", "claim", "mark_sent",
    ),
    # The holder is gone: a sweeper releases the claim, a redelivery takes it over, or the
    # zombie (or its predecessor) goes on as if nothing happened.
    "claimed_dead": (
        "release", "claim", "start:holder", "start:stale", "finish:stale", "renew:holder",
        "release", "claim",
    ),
    # The holder lives: a duplicate delivery must not take the claim over.
    "claimed_live": (
        "kill_holder", "start:stale", "release", "start:holder", "renew:stale", "start:holder",
        "claim", "start:holder",
    ),
    "leased": (
        "renew:holder", "finish:holder", "expire_lease", "revoke", "finish:stale", "mark_lost",
        "revoke", "renew:holder",
    ),
    # Revoked while running: its worker stops the process and finishes it (ends revoked).
    "revoking": (
        "finish:holder", "renew:holder", "finish:holder", "expire_lease", "finish:stale",
        "revoke", "finish:holder", "claim",
    ),
    # The lease lapsed: the holder's renewals must fail, and a sweeper marks it lost.
    "lapsed": (
        "renew:holder", "renew:holder", "mark_lost", "renew:holder", "finish:holder",
        "renew:stale", "mark_lost", "start:holder",
    ),
    "final": (
        "start:holder", "renew:holder", "finish:holder", "revoke", "claim", "mark_lost",
        "release", "mark_sent",
    ),
}  # fmt: skip
N_MOVES = 8
moves = st.integers(0, N_MOVES - 1)


@dataclasses.dataclass
class TaskModel:
    """What the model says about one task."""

    task_id: str
    registered: bool = False
    state: TaskState | None = None
    fence: int = 0
    sent: bool = False
    holder: Worker | None = None
    lease: bool = False
    expired_by_test: bool = False
    deliveries: int = 0
    requeued: bool = False


@dataclasses.dataclass
class Proc:
    """One worker process (an instance of a worker name) and the fences it was granted."""

    worker: Worker
    fences: dict[str, int] = dataclasses.field(default_factory=dict)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _progress_rule() -> Callable[..., None]:
    """One more rule that runs ``progress`` (to weight it among the rules)."""

    @rule(t=tasks, who=procs, choice=moves, outcome=outcomes)
    def progress_again(
        self: "LifecycleMachine", t: int, who: int, choice: int, outcome: Outcome
    ) -> None:
        self.progress(t, who, choice, outcome)

    return progress_again


class LifecycleMachine(RuleBasedStateMachine):
    """Tasks and worker processes against a reference model."""

    def __init__(self, redis_url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: TaskStore = new_store(redis_url, unique_prefix())
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.tasks = [TaskModel(new_task_id(run_id, f"s{i}")) for i in range(N_TASKS)]
        #: Worker name -> instance of its liveness record in Redis (None: no record).
        self.records: dict[str, str | None] = {name: None for name in NAMES}
        self.current: dict[str, Proc] = {}
        self.procs: list[Proc] = []
        self.generation = 0
        #: Per task: the highest fence ever granted, and the first final state seen.
        self.max_fence = [0] * N_TASKS
        self.seen_final: list[TaskState | None] = [None] * N_TASKS
        self.turns = [0] * N_TASKS
        for name in NAMES:
            self._start_process(name)

    # -- plumbing ----------------------------------------------------------------------------
    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(_awaited(awaitable))

    def teardown(self) -> None:
        try:
            self.run(delete_prefix(self.store.redis, self.store.prefix))
            self.run(self.store.redis.aclose())
        finally:
            self.loop.close()

    def _proc(self, index: int) -> Proc:
        return self.procs[index % len(self.procs)]

    def _actor(self, task: TaskModel, who: str | int) -> Proc:
        if isinstance(who, int):
            return self._proc(who)
        fences = {proc.fences.get(task.task_id, 0): proc for proc in self.procs}
        wanted = (
            task.fence
            if who == "holder"
            else max((f for f in fences if 0 < f < task.fence), default=-1)
        )
        return fences.get(wanted, self.procs[-1])

    def _alive(self, worker: Worker | None) -> bool:
        return worker is not None and self.records[worker.name] == worker.instance

    def _start_process(self, name: str) -> None:
        self.generation += 1
        proc = Proc(Worker(name, f"{name}-{self.generation}"))
        self.procs.append(proc)
        self.current[name] = proc
        self._beat(proc.worker)

    def _beat(self, worker: Worker) -> None:
        expected = self.records[worker.name] in (None, worker.instance)
        assert self.run(beat(self.store, worker)) is expected
        if expected:
            self.records[worker.name] = worker.instance

    def _snapshot(self, task: TaskModel) -> dict[str, Any]:
        return self.run(snapshot(self.store, task.task_id))

    def _check_fenced(
        self, task: TaskModel, result: Transition, before: dict[str, Any], expired: bool = False
    ) -> None:
        """A refused start/renew/finish: the right verdict, and nothing changed."""
        if expired:
            assert result.verdict is Verdict.EXPIRED, result
        else:
            assert result == Transition(Verdict.FENCED, task.state), (result, task)
        assert self._snapshot(task) == before

    # -- orchestrator side ---------------------------------------------------------------------
    @initialize()
    def register_some(self) -> None:
        """Start with all tasks but the last registered (the last waits for ``register``)."""
        for t in range(N_TASKS - 1):
            self.register(t)

    @rule(t=tasks)
    def register(self, t: int) -> None:
        task = self.tasks[t]
        if task.registered:  # task ids are never reused
            return
        self.run(register_task(self.store, task_id=task.task_id))
        task.registered, task.state = True, TaskState.QUEUED

    @rule(t=tasks, stale=st.booleans())
    def mark_sent(self, t: int, stale: bool) -> None:
        task = self.tasks[t]
        # A stale view: the fence before the last claim (or a wrong one when there was none).
        fence = (task.fence - 1 if task.fence else 1) if stale else task.fence
        expected = task.state is TaskState.QUEUED and not stale
        assert self.run(self.store.mark_sent(task.task_id, HB, fence=fence)) is expected
        if expected:
            task.sent = True

    @rule(t=tasks)
    def revoke(self, t: int) -> None:
        task = self.tasks[t]
        found = self.run(self.store.revoke(task.task_id))
        assert found == (task.state.value if task.state else "unknown")
        if task.state in (TaskState.QUEUED, TaskState.CLAIMED):
            task.state = TaskState.REVOKED
        elif task.state is TaskState.RUNNING:
            task.state = TaskState.REVOKING

    @rule(t=tasks)
    def release(self, t: int) -> None:
        task = self.tasks[t]
        expected = task.state is TaskState.CLAIMED and not self._alive(task.holder)
        assert self.run(self.store.release(task.task_id, HB)) is expected
        if expected:
            task.state, task.holder, task.sent, task.requeued = TaskState.QUEUED, None, False, True

    @rule(t=tasks)
    def expire_lease(self, t: int) -> None:
        task = self.tasks[t]
        deleted = self.run(self.store.redis.delete(self.store.keys.lease(task.task_id)))
        assert deleted == int(task.lease)
        if task.lease:
            task.lease, task.expired_by_test = False, True

    @rule(t=tasks)
    def mark_lost(self, t: int) -> None:
        task = self.tasks[t]
        expected = task.state in (TaskState.RUNNING, TaskState.REVOKING) and not task.lease
        assert self.run(self.store.mark_lost(task.task_id)) is expected
        if expected:
            task.state = TaskState.LOST

    # -- worker side ---------------------------------------------------------------------------
    @rule(t=tasks, who=actors, good_digest=st.sampled_from([True, True, False]))
    def claim(self, t: int, who: str | int, good_digest: bool) -> None:
        task, proc = self.tasks[t], self._actor(self.tasks[t], who)
        digest = digest_of(task.task_id) if good_digest else "f" * 64
        before = self._snapshot(task)
        claim = self.run(
            self.store.claim(task.task_id, proc.worker.name, proc.worker.instance, digest, HB)
        )
        if task.state is None:
            expected = ClaimResult.UNKNOWN
        elif not good_digest:
            expected = ClaimResult.MISMATCH
        elif task.state is TaskState.QUEUED or (
            task.state is TaskState.CLAIMED and not self._alive(task.holder)
        ):
            expected = ClaimResult.CLAIMED
        elif task.state in (TaskState.REVOKED, TaskState.REVOKING):
            expected = ClaimResult.REVOKED
        else:
            expected = ClaimResult.DUPLICATE
        assert claim.result is expected, (claim, task)
        if not claim.granted:
            assert claim.fence == 0
            assert self._snapshot(task) == before
            return
        # Fences strictly increase: one more than the task's previous one, above any seen.
        assert claim.fence == task.fence + 1
        assert claim.fence > self.max_fence[t]
        self.max_fence[t] = claim.fence
        task.fence, task.state, task.holder = claim.fence, TaskState.CLAIMED, proc.worker
        task.deliveries += 1
        proc.fences[task.task_id] = claim.fence

    @rule(t=tasks, who=actors)
    def start(self, t: int, who: str | int) -> None:
        task, proc = self.tasks[t], self._actor(self.tasks[t], who)
        fence = proc.fences.get(task.task_id, 0)
        before = self._snapshot(task)
        result = self.run(self.store.start(task.task_id, fence, 4242, HB))
        if task.state is TaskState.CLAIMED and fence == task.fence:
            assert result == Transition(Verdict.OK, TaskState.RUNNING)
            task.state, task.lease, task.expired_by_test = TaskState.RUNNING, True, False
        else:
            self._check_fenced(task, result, before)

    @rule(t=tasks, who=actors)
    def renew(self, t: int, who: str | int) -> None:
        task, proc = self.tasks[t], self._actor(self.tasks[t], who)
        fence = proc.fences.get(task.task_id, 0)
        before = self._snapshot(task)
        result = self.run(self.store.renew({task.task_id: (fence, HB)}))[task.task_id]
        current = fence == task.fence and task.state is not None
        if current and task.state is TaskState.CLAIMED:
            assert result == Transition(Verdict.OK, TaskState.CLAIMED)
        elif current and task.state in (TaskState.RUNNING, TaskState.REVOKING):
            if task.lease:
                assert result == Transition(Verdict.OK, task.state)
            else:  # a lapsed lease is never revived
                self._check_fenced(task, result, before, expired=True)
        else:
            self._check_fenced(task, result, before)

    @rule(t=tasks, who=actors, outcome=outcomes)
    def finish(self, t: int, who: str | int, outcome: Outcome) -> None:
        task, proc = self.tasks[t], self._actor(self.tasks[t], who)
        fence = proc.fences.get(task.task_id, 0)
        before = self._snapshot(task)
        result = self.run(
            self.store.finish(
                task.task_id,
                fence,
                outcome,
                outcome_json=f'{{"status": "{outcome.value}"}}',
                result_json="{}",
            )
        )
        if fence == task.fence and task.state in ACTIVE_WITH_HOLDER:
            final = outcome.final_state
            if task.state is TaskState.REVOKING and final is TaskState.DONE:
                final = TaskState.REVOKED
            assert result == Transition(Verdict.OK, final)
            task.state, task.lease = final, False
            assert self._snapshot(task)["result"]
        else:
            self._check_fenced(task, result, before)

    @rule(t=tasks, who=procs, choice=moves, outcome=outcomes)
    def progress(self, t: int, who: int, choice: int, outcome: Outcome) -> None:
        """A likely next move for the task (see ``MOVES``): random rules seldom line up on one
        task, so this drives tasks deep into their lifecycle, faults and zombies included."""
        task = self.tasks[t]
        if task.state is None:
            situation = "none"
        elif task.state is TaskState.CLAIMED:
            situation = "claimed_live" if self._alive(task.holder) else "claimed_dead"
        elif task.state.holds_lease and not task.lease:
            situation = "lapsed"
        elif task.state is TaskState.REVOKING:
            situation = "revoking"
        elif task.state is TaskState.RUNNING:
            situation = "leased"
        elif task.state.is_final:
            situation = "final"
        else:
            situation = "queued"
        # Each task also turns through the moves by itself: Hypothesis's choices are skewed.
        self.turns[t] += 1
        name, _, actor = MOVES[situation][(choice + self.turns[t]) % N_MOVES].partition(":")
        if name == "kill_holder":
            assert task.holder is not None
            self.kill_worker(task.holder.name)
        elif name == "claim":
            self.claim(t, who, True)
        elif name == "mark_sent":
            self.mark_sent(t, False)
        elif name in ("start", "renew"):
            getattr(self, name)(t, actor)
        elif name == "finish":
            self.finish(t, actor, outcome)
        else:  # register, release, expire_lease, revoke, mark_lost
            getattr(self, name)(t)

    # Hypothesis has no rule weights: a rule's weight is how many rules run it.
    progress_2 = _progress_rule()
    progress_3 = _progress_rule()
    progress_4 = _progress_rule()
    progress_5 = _progress_rule()

    # -- workers -------------------------------------------------------------------------------
    @rule(name=names)
    def kill_worker(self, name: str) -> None:
        """The worker's record vanishes (it died, or its record expired); it may linger."""
        self.run(self.store.redis.delete(self.store.keys.worker(name)))
        self.records[name] = None

    @rule(name=names, new_instance=st.booleans())
    def restart_worker(self, name: str, new_instance: bool) -> None:
        """A new process takes the name, or the current one beats again (partition healed)."""
        if new_instance:
            self._start_process(name)
        else:
            self._beat(self.current[name].worker)

    @rule(p=procs)
    def remove_worker(self, p: int) -> None:
        """A clean shutdown: the record goes only if it is still this instance's."""
        worker = self._proc(p).worker
        self.run(self.store.remove_worker(worker.name, worker.instance))
        if self.records[worker.name] == worker.instance:
            self.records[worker.name] = None

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def redis_matches_model(self) -> None:
        ids = [task.task_id for task in self.tasks]
        records = {record.task_id: record for record in self.run(self.store.get_many(ids))}
        for t, task in enumerate(self.tasks):
            snap = self._snapshot(task)
            record = records.get(task.task_id)
            if not task.registered:
                assert record is None and snap["due"] is None and snap["inflight"] is None
                continue
            assert record is not None
            assert record.state is task.state, (record, task)
            assert record.fence == task.fence
            assert record.deliveries == task.deliveries
            assert (record.sent_at is not None) is task.sent
            assert (record.requeued_at is not None) is task.requeued
            assert record.lease_alive is task.lease
            if task.holder is None:
                assert record.worker is None and "instance" not in snap["record"]
            else:
                assert record.worker == task.holder.name
                assert text(snap["record"]["instance"]) == task.holder.instance
            if task.state is TaskState.CLAIMED:
                assert record.holder_alive is self._alive(task.holder)
            # Active tasks are watched (due and in flight); final ones are in no index.
            active = task.state not in FINAL_STATES
            assert (snap["due"] is not None) is active
            assert (snap["inflight"] is not None) is active
            # A running task always has its lease unless the test expired it.
            if task.state in (TaskState.RUNNING, TaskState.REVOKING):
                assert snap["lease"] is not None or task.expired_by_test
                if snap["lease"] is not None:
                    assert snap["lease"] == str(task.fence).encode()
            else:
                assert snap["lease"] is None
            # A final state never changes again.
            if self.seen_final[t] is not None:
                assert record.state is self.seen_final[t]
            elif record.state in FINAL_STATES:
                self.seen_final[t] = record.state
            # Fences never go back.
            assert record.fence == self.max_fence[t]

    @invariant()
    def one_holder_of_the_current_fence(self) -> None:
        for task in self.tasks:
            holders = [
                p for p in self.procs if task.fence and p.fences.get(task.task_id) == task.fence
            ]
            assert len(holders) <= (1 if task.fence else 0)
            if task.state in ACTIVE_WITH_HOLDER:
                assert [p.worker for p in holders] == [task.holder]
            for proc in self.procs:
                assert proc.fences.get(task.task_id, 0) <= task.fence

    @invariant()
    def every_key_expires(self) -> None:
        assert self.run(keyspace_problems(self.store.redis, self.store.prefix)) == []


MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_lifecycle_model(redis_url: str) -> None:
    class Machine(LifecycleMachine):
        def __init__(self) -> None:
            super().__init__(redis_url)

    run_state_machine_as_test(Machine, settings=MODEL_SETTINGS)
