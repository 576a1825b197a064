"""Every task transition against a real Redis, plus ``assess`` and ``sweep``.

* ``test_transition``: a table of starting state × event → (return value, resulting state).
  Each starting state is built through the ``TaskStore`` API itself; after each event the test
  also checks that refusals change nothing, that no key lives without a TTL (``:idx:`` sets
  aside), and that final tasks are out of the indexes while active ones are in them.
* ``test_assess``: the verdict of :func:`assess` per state (pure, on hand-built records).
* ``test_sweep_*``: :func:`sweep` with a fake broker.

Redis tests skip locally when Redis is down and fail under ``CI=true`` (``redis_url`` fixture).
"""

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dagster_taskiq.lifecycle.health import Action, Health, assess
from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.recovery import recover, sweep
from dagster_taskiq.lifecycle.states import FINAL_STATES, Outcome, TaskKind, TaskState
from dagster_taskiq.lifecycle.store import TaskStore, Transition, Verdict
from dagster_taskiq.payloads import TaskOutcome, encode
from dagster_taskiq_tests.lifecycle_support import (
    HEARTBEAT_TIMEOUT,
    RESULT_TTL,
    WORKER_TTL,
    Worker,
    beat,
    digest_of,
    keyspace_problems,
    new_store,
    new_task_id,
    redis_store,
    register_task,
    snapshot,
    text,
    worker_info,
)

HB = HEARTBEAT_TIMEOUT
POLICY = LeasePolicy(HB)

#: Claims a task and is never registered: its claims always have a dead holder.
ZOMBIE = Worker("w-zombie", "zombie-1")
#: Never registered either (a worker that died and whose record expired).
GONE = Worker("w-gone", "gone-1")
#: A live worker (registered in the starting states that use it).
LIVE = Worker("w-live", "live-1")
#: ``LIVE``'s name taken over by a new process (the old instance's claims are dead).
REBORN = Worker("w-live", "live-2")
#: The live worker every ``claim`` event claims for.
OTHER = Worker("w-other", "other-1")


# -- starting states -------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One task under test, and what the starting state did to it."""

    store: TaskStore
    task_id: str
    #: Whether the test deleted the task's lease key (a lapsed lease).
    lapsed: bool = False


async def _claim(case: Case, worker: Worker, digest: str | None = None) -> int:
    claim = await case.store.claim(
        case.task_id, worker.name, worker.instance, digest or digest_of(case.task_id), HB
    )
    assert claim.granted, claim
    return claim.fence


async def _current_fence(case: Case) -> int:
    record = await case.store.get(case.task_id)
    return record.fence if record else 1


async def _lapse(case: Case) -> None:
    assert await case.store.redis.delete(case.store.keys.lease(case.task_id)) == 1
    case.lapsed = True


async def _none(case: Case) -> None:
    """No record at all."""


async def _queued_unsent(case: Case) -> None:
    await register_task(case.store, task_id=case.task_id)


async def _queued_sent(case: Case) -> None:
    await _queued_unsent(case)
    assert await case.store.mark_sent(case.task_id, HB, fence=0)


async def _claimed_live(case: Case) -> None:
    # A zombie claims first (fence 1) so that the stale fence is a real, superseded claim.
    await _queued_sent(case)
    assert await _claim(case, ZOMBIE) == 1
    assert await beat(case.store, LIVE)
    assert await _claim(case, LIVE) == 2


async def _claimed_dead_no_record(case: Case) -> None:
    await _queued_sent(case)
    assert await _claim(case, ZOMBIE) == 1
    assert await _claim(case, GONE) == 2


async def _claimed_dead_other_instance(case: Case) -> None:
    await _claimed_live(case)
    await case.store.remove_worker(LIVE.name, LIVE.instance)
    assert await beat(case.store, REBORN)


async def _running(case: Case) -> None:
    await _claimed_live(case)
    assert (await case.store.start(case.task_id, 2, 777, HB)).ok


async def _running_lapsed(case: Case) -> None:
    await _running(case)
    await _lapse(case)


async def _revoking(case: Case) -> None:
    await _running(case)
    assert await case.store.revoke(case.task_id) == "running"


async def _revoking_lapsed(case: Case) -> None:
    await _revoking(case)
    await _lapse(case)


async def _done(case: Case) -> None:
    await _running(case)
    assert (await _finish(case, 2, Outcome.SUCCESS)).ok


async def _revoked(case: Case) -> None:
    await _queued_sent(case)
    assert await case.store.revoke(case.task_id) == "queued"


async def _lost(case: Case) -> None:
    await _running_lapsed(case)
    assert await case.store.mark_lost(case.task_id)


STARTING_STATES: dict[str, Callable[[Case], Awaitable[None]]] = {
    "none": _none,
    "queued_unsent": _queued_unsent,
    "queued_sent": _queued_sent,
    "claimed_live": _claimed_live,
    "claimed_dead_no_record": _claimed_dead_no_record,
    "claimed_dead_other_instance": _claimed_dead_other_instance,
    "running": _running,
    "running_lapsed": _running_lapsed,
    "revoking": _revoking,
    "revoking_lapsed": _revoking_lapsed,
    "done": _done,
    "revoked": _revoked,
    "lost": _lost,
}


# -- events ----------------------------------------------------------------------------------
def _transition(result: Transition) -> str:
    if result.verdict.value == "expired":
        return "expired"
    return f"{result.verdict.value}:{result.state.value if result.state else 'unknown'}"


def _stale(fence: int) -> int:
    return fence - 1 if fence > 0 else fence + 1


async def _finish(case: Case, fence: int, outcome: Outcome) -> Transition:
    task_outcome = TaskOutcome(status=outcome.value, worker=LIVE.name, exit_code=0)
    return await case.store.finish(
        case.task_id,
        fence,
        outcome,
        outcome_json=encode(task_outcome),
        result_json='{"is_err": false}',
    )


async def _ev_mark_sent(case: Case) -> Any:
    return await case.store.mark_sent(case.task_id, HB, fence=await _current_fence(case))


async def _ev_claim(case: Case) -> Any:
    claim = await case.store.claim(
        case.task_id, OTHER.name, OTHER.instance, digest_of(case.task_id), HB
    )
    return claim.result.value


async def _ev_claim_bad_digest(case: Case) -> Any:
    claim = await case.store.claim(case.task_id, OTHER.name, OTHER.instance, "0" * 64, HB)
    assert claim.fence == 0
    return claim.result.value


async def _ev_start(case: Case) -> Any:
    return _transition(await case.store.start(case.task_id, await _current_fence(case), 99, HB))


async def _ev_start_stale(case: Case) -> Any:
    fence = _stale(await _current_fence(case))
    return _transition(await case.store.start(case.task_id, fence, 99, HB))


async def _ev_renew(case: Case) -> Any:
    result = await case.store.renew({case.task_id: (await _current_fence(case), HB)})
    return _transition(result[case.task_id])


async def _ev_renew_stale(case: Case) -> Any:
    result = await case.store.renew({case.task_id: (_stale(await _current_fence(case)), HB)})
    return _transition(result[case.task_id])


async def _ev_finish(case: Case) -> Any:
    return _transition(await _finish(case, await _current_fence(case), Outcome.SUCCESS))


async def _ev_finish_stale(case: Case) -> Any:
    return _transition(await _finish(case, _stale(await _current_fence(case)), Outcome.SUCCESS))


async def _ev_revoke(case: Case) -> Any:
    return await case.store.revoke(case.task_id)


async def _ev_release(case: Case) -> Any:
    return await case.store.release(case.task_id, HB)


async def _ev_mark_lost(case: Case) -> Any:
    return await case.store.mark_lost(case.task_id)


EVENTS: dict[str, Callable[[Case], Awaitable[Any]]] = {
    "mark_sent": _ev_mark_sent,
    "claim": _ev_claim,
    "claim_bad_digest": _ev_claim_bad_digest,
    "start": _ev_start,
    "start_stale": _ev_start_stale,
    "renew": _ev_renew,
    "renew_stale": _ev_renew_stale,
    "finish": _ev_finish,
    "finish_stale": _ev_finish_stale,
    "revoke": _ev_revoke,
    "release": _ev_release,
    "mark_lost": _ev_mark_lost,
}

# -- the table -------------------------------------------------------------------------------
# starting state -> event -> (return value, resulting state); "absent" means no record.
# start/renew/finish return "ok:<state>", "fenced:<state>" or "expired"; claims return the
# ClaimResult; revoke returns the state it found; mark_sent, release and mark_lost a bool.
_QUEUED_ROW = {
    "mark_sent": (True, "queued"),
    "claim": ("claimed", "claimed"),
    "claim_bad_digest": ("mismatch", "queued"),
    "start": ("fenced:queued", "queued"),
    "start_stale": ("fenced:queued", "queued"),
    "renew": ("fenced:queued", "queued"),
    "renew_stale": ("fenced:queued", "queued"),
    "finish": ("fenced:queued", "queued"),
    "finish_stale": ("fenced:queued", "queued"),
    "revoke": ("queued", "revoked"),
    "release": (False, "queued"),
    "mark_lost": (False, "queued"),
}
_CLAIMED_LIVE_ROW = {
    "mark_sent": (False, "claimed"),
    "claim": ("duplicate", "claimed"),
    "claim_bad_digest": ("mismatch", "claimed"),
    "start": ("ok:running", "running"),
    "start_stale": ("fenced:claimed", "claimed"),
    "renew": ("ok:claimed", "claimed"),
    "renew_stale": ("fenced:claimed", "claimed"),
    "finish": ("ok:done", "done"),
    "finish_stale": ("fenced:claimed", "claimed"),
    "revoke": ("claimed", "revoked"),
    "release": (False, "claimed"),
    "mark_lost": (False, "claimed"),
}
# A dead holder's claim can be taken over and released; its own fence still works until then.
_CLAIMED_DEAD_ROW = {
    **_CLAIMED_LIVE_ROW,
    "claim": ("claimed", "claimed"),
    "release": (True, "queued"),
}
_RUNNING_ROW = {
    "mark_sent": (False, "running"),
    "claim": ("duplicate", "running"),
    "claim_bad_digest": ("mismatch", "running"),
    "start": ("fenced:running", "running"),
    "start_stale": ("fenced:running", "running"),
    "renew": ("ok:running", "running"),
    "renew_stale": ("fenced:running", "running"),
    "finish": ("ok:done", "done"),
    "finish_stale": ("fenced:running", "running"),
    "revoke": ("running", "revoking"),
    "release": (False, "running"),
    "mark_lost": (False, "running"),
}
_REVOKING_ROW = {
    "mark_sent": (False, "revoking"),
    "claim": ("revoked", "revoking"),
    "claim_bad_digest": ("mismatch", "revoking"),
    "start": ("fenced:revoking", "revoking"),
    "start_stale": ("fenced:revoking", "revoking"),
    "renew": ("ok:revoking", "revoking"),
    "renew_stale": ("fenced:revoking", "revoking"),
    # A revoking task always ends revoked, whatever its worker reports.
    "finish": ("ok:revoked", "revoked"),
    "finish_stale": ("fenced:revoking", "revoking"),
    "revoke": ("revoking", "revoking"),
    "release": (False, "revoking"),
    "mark_lost": (False, "revoking"),
}


def _final_row(state: str, claim: str) -> dict[str, tuple[Any, str]]:
    """A final state: every event is refused and nothing changes."""
    return {
        "mark_sent": (False, state),
        "claim": (claim, state),
        "claim_bad_digest": ("mismatch", state),
        "start": (f"fenced:{state}", state),
        "start_stale": (f"fenced:{state}", state),
        "renew": (f"fenced:{state}", state),
        "renew_stale": (f"fenced:{state}", state),
        "finish": (f"fenced:{state}", state),
        "finish_stale": (f"fenced:{state}", state),
        "revoke": (state, state),
        "release": (False, state),
        "mark_lost": (False, state),
    }


EXPECTED: dict[str, dict[str, tuple[Any, str]]] = {
    "none": {
        "mark_sent": (False, "absent"),
        "claim": ("unknown", "absent"),
        "claim_bad_digest": ("unknown", "absent"),
        "start": ("fenced:unknown", "absent"),
        "start_stale": ("fenced:unknown", "absent"),
        "renew": ("fenced:unknown", "absent"),
        "renew_stale": ("fenced:unknown", "absent"),
        "finish": ("fenced:unknown", "absent"),
        "finish_stale": ("fenced:unknown", "absent"),
        "revoke": ("unknown", "absent"),
        "release": (False, "absent"),
        "mark_lost": (False, "absent"),
    },
    "queued_unsent": _QUEUED_ROW,
    "queued_sent": _QUEUED_ROW,
    "claimed_live": _CLAIMED_LIVE_ROW,
    "claimed_dead_no_record": _CLAIMED_DEAD_ROW,
    "claimed_dead_other_instance": _CLAIMED_DEAD_ROW,
    "running": _RUNNING_ROW,
    # A lapsed lease is never renewed; the task is lost once mark_lost runs. Its holder may
    # still finish it first (nobody else can have claimed it: a running task is not claimable).
    "running_lapsed": {
        **_RUNNING_ROW,
        "renew": ("expired", "running"),
        "mark_lost": (True, "lost"),
    },
    "revoking": _REVOKING_ROW,
    "revoking_lapsed": {
        **_REVOKING_ROW,
        "renew": ("expired", "revoking"),
        "mark_lost": (True, "lost"),
    },
    "done": _final_row("done", "duplicate"),
    "revoked": _final_row("revoked", "revoked"),
    "lost": _final_row("lost", "duplicate"),
}


def test_table_is_complete() -> None:
    assert set(EXPECTED) == set(STARTING_STATES)
    for state, row in EXPECTED.items():
        assert set(row) == set(EVENTS), state


def _is_refusal(event: str, result: Any) -> bool:
    """Whether ``result`` says the event did nothing."""
    if event in ("mark_sent", "release", "mark_lost"):
        return result is False
    if event.startswith("claim"):
        return result != "claimed"
    if event == "revoke":
        return result not in ("queued", "claimed", "running")
    return not str(result).startswith("ok:")


CASES = [
    pytest.param(state, event, *EXPECTED[state][event], id=f"{state}-{event}")
    for state in STARTING_STATES
    for event in EVENTS
]


@pytest.mark.parametrize(("start_state", "event", "expected_result", "expected_state"), CASES)
def test_transition(
    redis_url: str, start_state: str, event: str, expected_result: Any, expected_state: str
) -> None:
    asyncio.run(_check_transition(redis_url, start_state, event, expected_result, expected_state))


async def _check_transition(
    redis_url: str, start_state: str, event: str, expected_result: Any, expected_state: str
) -> None:
    async with redis_store(redis_url) as store:
        case = Case(store, new_task_id("run-t"))
        assert await beat(store, OTHER)
        await STARTING_STATES[start_state](case)
        assert await keyspace_problems(store.redis, store.prefix) == [], start_state
        before = await snapshot(store, case.task_id)
        fence_before = await _current_fence(case)

        result = await EVENTS[event](case)

        after = await snapshot(store, case.task_id)
        record = await store.get(case.task_id)
        state = record.state.value if record else "absent"
        assert (result, state) == (expected_result, expected_state)

        # Refusals change nothing at all: record, lease, index scores, result.
        if _is_refusal(event, result):
            assert after == before
        # No key without a TTL (indexes aside), whatever happened.
        assert await keyspace_problems(store.redis, store.prefix) == []
        if record is None:
            return
        # Fences move only on a granted claim, by one.
        if event == "claim" and result == "claimed":
            assert record.fence == fence_before + 1
            assert (record.worker, text(after["record"]["instance"])) == OTHER
            assert record.deliveries == int(before["record"].get("deliveries", b"0")) + 1
        else:
            assert record.fence == fence_before
        if record.state in FINAL_STATES:
            assert after["due"] is None and after["inflight"] is None
            assert after["lease"] is None
            assert 0 < await store.redis.ttl(store.keys.task(case.task_id)) <= RESULT_TTL
        else:
            # An active task is always watched: it is in the due index (and in flight).
            assert after["due"] is not None and after["inflight"] is not None
        if record.state.holds_lease and not case.lapsed:
            assert after["lease"] == str(record.fence).encode()
        if record.state.holds_lease and case.lapsed:
            assert after["lease"] is None
        if event == "finish" and record.state is TaskState.DONE:
            assert after["result"] and record.status == "success"
            assert record.outcome_json
        if event == "release" and result is True:
            assert record.worker is None and record.sent_at is None
            assert record.requeued_at is not None and record.claimed_at is None
            assert "instance" not in after["record"]
        if event == "mark_sent" and result is True:
            assert record.sent_at is not None
        if event == "start" and result == "ok:running":
            assert record.pid == 99
            due = after["due"]
            assert due is not None and due >= time.time() + POLICY.lease_check_after - 5


# -- assess ----------------------------------------------------------------------------------
NOW = 1_700_000_000.0


def _outcome_json(status: str, message: str = "") -> str:
    return encode(TaskOutcome(status=status, worker="w1", exit_code=0, message=message))


def _record(state: TaskState, **overrides: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "task_id": "run1.step.abc",
        "kind": TaskKind.STEP,
        "run_id": "run1",
        "step_key": "step",
        "queue": "q",
        "priority": 0,
        "state": state,
        "worker": None,
        "fence": 0,
        "submitted_at": NOW - 1,
        "sent_at": None,
        "claimed_at": None,
        "started_at": None,
        "finished_at": None,
        "last_heartbeat": None,
        "heartbeat_timeout": HB,
        "status": None,
        "pid": None,
        "deliveries": 0,
        "requeued_at": None,
        "lease_alive": False,
        "holder_alive": None,
        "outcome_json": None,
    }
    fields.update(overrides)
    return TaskRecord(**fields)


GRACE = POLICY.unsent_grace
RECHECK = POLICY.recheck_after
Q, C, R = TaskState.QUEUED, TaskState.CLAIMED, TaskState.RUNNING

ASSESS_CASES = [
    # queued, never sent: sent once it waited unsent_grace (since submit or requeue)
    ("queued-unsent-fresh", _record(Q), Health.WAITING, Action.NONE),
    ("queued-unsent-just-before-grace", _record(Q, submitted_at=NOW - GRACE + 0.1),
     Health.WAITING, Action.NONE),
    ("queued-unsent-at-grace", _record(Q, submitted_at=NOW - GRACE), Health.WAITING, Action.SEND),
    ("queued-unsent-long-ago", _record(Q, submitted_at=NOW - 1000), Health.WAITING, Action.SEND),
    ("queued-requeued-recently", _record(Q, submitted_at=NOW - 1000, requeued_at=NOW - 1),
     Health.WAITING, Action.NONE),
    ("queued-requeued-past-grace", _record(Q, submitted_at=NOW - 1000, requeued_at=NOW - GRACE),
     Health.WAITING, Action.SEND),
    # queued and sent: looked for on its queue once it waited recheck_after since sent
    ("queued-sent-recently", _record(Q, submitted_at=NOW - 1000, sent_at=NOW - 1),
     Health.WAITING, Action.NONE),
    ("queued-sent-at-recheck", _record(Q, sent_at=NOW - RECHECK), Health.WAITING,
     Action.CHECK_PRESENCE),
    ("claimed-holder-alive", _record(C, worker="w1", holder_alive=True), Health.STARTING,
     Action.NONE),
    ("claimed-holder-unknown", _record(C, worker="w1", holder_alive=None), Health.STARTING,
     Action.NONE),
    ("claimed-holder-dead", _record(C, worker="w1", holder_alive=False), Health.WAITING,
     Action.RELEASE),
    ("running-lease-alive", _record(R, worker="w1", lease_alive=True), Health.RUNNING,
     Action.NONE),
    ("running-lease-lapsed", _record(R, worker="w1", lease_alive=False), Health.LOST,
     Action.MARK_LOST),
    ("revoking-lease-alive", _record(TaskState.REVOKING, lease_alive=True), Health.RUNNING,
     Action.NONE),
    ("revoking-lease-lapsed", _record(TaskState.REVOKING, lease_alive=False), Health.LOST,
     Action.MARK_LOST),
    ("lost", _record(TaskState.LOST, worker="w1"), Health.LOST, Action.FORGET),
    ("revoked", _record(TaskState.REVOKED), Health.REVOKED, Action.FORGET),
    ("done-success", _record(TaskState.DONE, outcome_json=_outcome_json("success", "ok!")),
     Health.SUCCEEDED, Action.FORGET),
    ("done-skipped", _record(TaskState.DONE, outcome_json=_outcome_json("skipped")),
     Health.SUCCEEDED, Action.FORGET),
    ("done-failure", _record(TaskState.DONE, outcome_json=_outcome_json("failure", "boom")),
     Health.FAILED, Action.FORGET),
    ("done-dead-letter", _record(TaskState.DONE, outcome_json=_outcome_json("dead_letter")),
     Health.FAILED, Action.FORGET),
    ("done-unknown-status", _record(TaskState.DONE, outcome_json=_outcome_json("weird")),
     Health.FAILED, Action.FORGET),
    ("done-no-outcome", _record(TaskState.DONE, status="success"), Health.FAILED, Action.FORGET),
    ("done-garbled-outcome", _record(TaskState.DONE, outcome_json="{not json"), Health.FAILED,
     Action.FORGET),
]  # fmt: skip


@pytest.mark.parametrize(
    ("record", "health", "action"),
    [pytest.param(r, h, a, id=name) for name, r, h, a in ASSESS_CASES],
)
def test_assess(record: TaskRecord, health: Health, action: Action) -> None:
    verdict = assess(record, now=NOW)
    assert (verdict.health, verdict.action) == (health, action)
    assert verdict.healthy is health.is_healthy
    assert record.task_id in verdict.message or (verdict.outcome and verdict.outcome.message)
    if health is Health.SUCCEEDED:
        assert verdict.outcome is not None and verdict.outcome.worker == "w1"


def test_assess_covers_every_state() -> None:
    assert {r.state for _, r, _, _ in ASSESS_CASES} == set(TaskState)


def test_assess_lost_message_names_the_worker() -> None:
    record = _record(R, worker="w7", pid=123, last_heartbeat=NOW - 40, lease_alive=False)
    message = assess(record, now=NOW).message
    assert "w7" in message and "123" in message and "40.0 s ago" in message


# -- sweep -----------------------------------------------------------------------------------
class FakeSender:
    """A broker that records what it was asked to send; ``holds`` answers ``held``."""

    def __init__(self, held: bool | None = None) -> None:
        self.held = held
        self.sent: list[tuple[str, bytes]] = []
        self.asked: list[str] = []

    async def send_registered(self, record: TaskRecord, message: bytes) -> None:
        self.sent.append((record.task_id, message))

    async def holds(self, record: TaskRecord, message: bytes) -> bool | None:
        self.asked.append(record.task_id)
        return self.held


def _run(redis_url: str, body: Callable[[TaskStore], Awaitable[None]]) -> None:
    async def main() -> None:
        async with redis_store(redis_url) as store:
            await body(store)
            assert await keyspace_problems(store.redis, store.prefix) == []

    asyncio.run(main())


def test_sweep_sends_an_unsent_task_past_its_grace_once(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - GRACE - 1
        task_id, message = await register_task(store, now=past)
        sender = FakeSender()
        report = await sweep(store, sender)
        assert sender.sent == [(task_id, message)]
        assert (report.looked_at, report.sent) == (1, 1)
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.QUEUED
        assert record.sent_at is not None and record.sent_at > past
        # Marked sent: the next sweeps leave it alone (not due again before recheck_after).
        for _ in range(2):
            assert (await sweep(store, sender)).looked_at == 0
        assert len(sender.sent) == 1

    _run(redis_url, body)


def test_sweep_leaves_a_task_that_is_not_due(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        task_id, _ = await register_task(store)
        before = await snapshot(store, task_id)
        sender = FakeSender()
        report = await sweep(store, sender)
        assert report == type(report)()
        assert sender.sent == [] and sender.asked == []
        assert await snapshot(store, task_id) == before

    _run(redis_url, body)


@pytest.mark.parametrize("held", [False, True, None], ids=["gone", "held", "cannot-tell"])
def test_sweep_checks_a_sent_task_on_its_queue(redis_url: str, held: bool | None) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - RECHECK - 1
        task_id, message = await register_task(store, now=past)
        assert await store.mark_sent(task_id, HB, now=past)
        sender = FakeSender(held)
        report = await sweep(store, sender)
        assert sender.asked == [task_id]
        assert sender.sent == ([(task_id, message)] if held is False else [])
        assert report.sent == (1 if held is False else 0)
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.QUEUED
        # Either way it counts as sent now, and is looked for again only after recheck_after.
        assert record.sent_at is not None and record.sent_at > past
        assert (await snapshot(store, task_id))["due"] > time.time() + RECHECK - 5

    _run(redis_url, body)


def test_sweep_releases_and_sends_a_task_whose_holder_died(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - POLICY.claim_check_after - 1
        task_id, message = await register_task(store, now=past)
        assert await store.mark_sent(task_id, HB, now=past)
        claim = await store.claim(
            task_id, GONE.name, GONE.instance, digest_of(task_id), HB, now=past
        )
        assert claim.granted
        sender = FakeSender()
        report = await sweep(store, sender)
        assert (report.released, report.sent) == (1, 1)
        assert sender.sent == [(task_id, message)]
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.QUEUED
        assert record.worker is None and record.sent_at is not None
        assert record.fence == claim.fence
        # The dead holder's fence is refused; a new claim gets a higher one.
        assert not (await store.start(task_id, claim.fence, 1, HB)).ok
        again = await store.claim(task_id, OTHER.name, OTHER.instance, digest_of(task_id), HB)
        assert again.granted and again.fence == claim.fence + 1

    _run(redis_url, body)


def test_sweep_leaves_a_task_whose_holder_lives(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - POLICY.claim_check_after - 1
        task_id, _ = await register_task(store, now=past)
        assert await beat(store, LIVE)
        claim = await store.claim(
            task_id, LIVE.name, LIVE.instance, digest_of(task_id), HB, now=past
        )
        assert claim.granted
        sender = FakeSender()
        report = await sweep(store, sender)
        assert (report.looked_at, report.released, report.sent) == (1, 0, 0)
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.CLAIMED
        assert record.worker == LIVE.name

    _run(redis_url, body)


@pytest.mark.parametrize("state", ["running", "revoking"])
def test_sweep_marks_a_task_with_a_lapsed_lease_lost(redis_url: str, state: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - POLICY.lease_check_after - 1
        task_id, _ = await register_task(store, now=past)
        claim = await store.claim(task_id, LIVE.name, LIVE.instance, digest_of(task_id), HB)
        assert (await store.start(task_id, claim.fence, 5, HB, now=past)).ok
        if state == "revoking":
            assert await store.revoke(task_id) == "running"
        await store.redis.delete(store.keys.lease(task_id))
        sender = FakeSender()
        report = await sweep(store, sender)
        assert (report.lost, report.sent) == (1, 0)
        after = await snapshot(store, task_id)
        assert text(after["record"]["state"]) == "lost"
        assert after["due"] is None and after["inflight"] is None
        # The holder can no longer renew or finish it.
        assert (await store.renew({task_id: (claim.fence, HB)}))[task_id].state is TaskState.LOST
        late = await store.finish(
            task_id, claim.fence, Outcome.SUCCESS, outcome_json="", result_json=""
        )
        assert late == Transition(Verdict.FENCED, TaskState.LOST)

    _run(redis_url, body)


def test_sweep_leaves_a_running_task_with_a_live_lease(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - POLICY.lease_check_after - 1
        task_id, _ = await register_task(store, now=past)
        claim = await store.claim(task_id, LIVE.name, LIVE.instance, digest_of(task_id), HB)
        assert (await store.start(task_id, claim.fence, 5, HB, now=past)).ok
        report = await sweep(store, FakeSender())
        assert (report.looked_at, report.lost) == (1, 0)
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.RUNNING and record.lease_alive

    _run(redis_url, body)


def test_sweep_drops_finished_and_missing_tasks_from_the_due_index(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        task_id, _ = await register_task(store)
        claim = await store.claim(task_id, LIVE.name, LIVE.instance, digest_of(task_id), HB)
        assert (
            await store.finish(
                task_id,
                claim.fence,
                Outcome.SUCCESS,
                outcome_json=_outcome_json("success"),
                result_json="{}",
            )
        ).ok
        # A stale index entry for the finished task, and one for a task whose record is gone.
        missing = new_task_id("run-gone")
        await store.redis.zadd(store.keys.due, {task_id: 1.0, missing: 1.0})
        await store.redis.zadd(store.keys.inflight, {missing: 1.0})
        sender = FakeSender()
        report = await sweep(store, sender)
        assert (report.looked_at, report.forgotten, report.sent) == (1, 2, 0)
        assert await store.redis.zscore(store.keys.due, task_id) is None
        assert await store.redis.zscore(store.keys.due, missing) is None
        assert await store.redis.zscore(store.keys.inflight, missing) is None
        assert await store.redis.exists(store.keys.due) == 0
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.DONE

    _run(redis_url, body)


def test_concurrent_sweeps_never_take_the_same_task(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - GRACE - 1
        ids = [(await register_task(store, now=past))[0] for _ in range(30)]
        other = new_store(redis_url, store.prefix)
        try:
            sender = FakeSender()
            reports = await asyncio.gather(
                sweep(store, sender, limit=7),
                sweep(other, sender, limit=7),
                sweep(store, sender, limit=7),
                sweep(other, sender, limit=7),
            )
        finally:
            await other.redis.aclose()
        counts = collections.Counter(task_id for task_id, _ in sender.sent)
        assert all(n == 1 for n in counts.values()), counts
        assert sum(r.looked_at for r in reports) == len(counts) == 28
        assert set(counts) <= set(ids)

    _run(redis_url, body)


def test_take_due_hides_a_task_from_the_next_taker(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        past = time.time() - GRACE - 1
        task_id, _ = await register_task(store, now=past)
        other = new_store(redis_url, store.prefix)
        try:
            first, second = await asyncio.gather(store.take_due(), other.take_due())
        finally:
            await other.redis.aclose()
        assert sorted([first, second]) == [[], [task_id]]
        # It is due again once look_again_after has passed.
        assert await store.take_due(now=time.time() + 6) == [task_id]

    _run(redis_url, body)


def test_keyspace_check_catches_a_key_without_ttl(redis_url: str) -> None:
    async def main() -> None:
        async with redis_store(redis_url) as store:
            await register_task(store)
            assert await keyspace_problems(store.redis, store.prefix) == []
            await store.redis.set(f"{store.prefix}:stray", "1")
            await store.redis.set(f"{store.prefix}:idx:bad", "1")
            assert sorted(await keyspace_problems(store.redis, store.prefix)) == [
                f"{store.prefix}:idx:bad: index of type string",
                f"{store.prefix}:stray: no TTL",
            ]

    asyncio.run(main())


# -- TTLs ------------------------------------------------------------------------------------
def test_finishing_a_step_keeps_the_run_index_while_a_sibling_waits(redis_url: str) -> None:
    async def body(store: TaskStore) -> None:
        waiting, _ = await register_task(store, task_id=new_task_id("run-i", "waiting"))
        done, _ = await register_task(store, task_id=new_task_id("run-i", "done"))
        claim = await store.claim(done, LIVE.name, LIVE.instance, digest_of(done), HB)
        assert (await _finish(Case(store, done), claim.fence, Outcome.SUCCESS)).ok
        # The step handler finds a step's task through the run index only: while the waiting
        # task's record lives, the index entry pointing at it must live too.
        record_ttl = await store.redis.ttl(store.keys.task(waiting))
        index_ttl = await store.redis.ttl(store.keys.run_index("run-i"))
        assert await store.step_task_id("run-i", "waiting") == waiting
        assert index_ttl >= record_ttl, (index_ttl, record_ttl)

    _run(redis_url, body)


@pytest.mark.parametrize("moved_on", ["finished", "renewed"])
def test_a_record_read_mid_transition_is_not_declared_lost(redis_url: str, moved_on: str) -> None:
    """A record read between its worker's finish (or renewal) steps can show ``running``
    without a lease. Only the mark-lost script decides: it refuses, and the task is judged from
    a fresh read, so a step that just succeeded (or still runs) never fails as lost."""

    async def body(store: TaskStore) -> None:
        task_id, _ = await register_task(store)
        case = Case(store, task_id)
        await _running(case)
        read = await store.get(task_id)
        assert read is not None and read.lease_alive
        looks_lost = dataclasses.replace(read, lease_alive=False)
        assert assess(looks_lost).action is Action.MARK_LOST
        if moved_on == "finished":
            assert (await _finish(case, await _current_fence(case), Outcome.SUCCESS)).ok
        else:
            result = await store.renew({task_id: (await _current_fence(case), HB)})
            assert result[task_id].ok

        verdict = await recover(store, FakeSender(), looks_lost)

        expected = Health.SUCCEEDED if moved_on == "finished" else Health.RUNNING
        assert verdict.health is expected and verdict.healthy
        record = await store.get(task_id)
        assert record is not None and record.state is not TaskState.LOST

    _run(redis_url, body)


def test_revoking_a_running_task_tells_its_worker_on_its_next_beat(redis_url: str) -> None:
    """The worker learns of a revocation from its heartbeat, not from the task's next renewal
    (renewals come only every T/10): the revoked id comes back once, with the beat after it."""

    async def body(store: TaskStore) -> None:
        assert await beat(store, LIVE)
        running = Case(store, (await register_task(store, run_id="run-r"))[0])
        await _running(running)
        queued, _ = await register_task(store, task_id=new_task_id("run-r", "queued"))
        assert await store.revoke(queued) == "queued"  # never started: nobody to tell
        assert await store.revoke(running.task_id) == "running"
        info = worker_info(LIVE.name)
        first = await store.beat_worker(info, LIVE.instance, WORKER_TTL)
        assert first.revoked == (running.task_id,)
        assert (await store.beat_worker(info, LIVE.instance, WORKER_TTL)).revoked == ()
        # The renewal still reports it as revoking, whatever the beat said.
        renewed = await store.renew({running.task_id: (2, HB)})
        assert renewed[running.task_id].state is TaskState.REVOKING
        # A clean shutdown leaves no revocation list behind.
        assert await store.revoke(running.task_id) == "revoking"
        await store.remove_worker(LIVE.name, LIVE.instance)
        assert not await store.redis.exists(store.keys.revocations(LIVE.name))

    _run(redis_url, body)


def test_a_renewal_refreshes_the_record_ttl_only_once_half_of_it_is_gone(redis_url: str) -> None:
    """Renewals are frequent; the record's (and run index's) TTL is renewed only when needed."""

    async def body(store: TaskStore) -> None:
        assert await beat(store, LIVE)
        case = Case(store, (await register_task(store, run_id="run-t"))[0])
        await _running(case)
        record, index = store.keys.task(case.task_id), store.keys.run_index("run-t")
        full = await store.redis.ttl(record)
        assert (await store.renew({case.task_id: (2, HB)}))[case.task_id].ok
        assert full - 2 <= await store.redis.ttl(record) <= full + int(HB) + 1
        await store.redis.expire(record, 60)  # as if it had run for most of a day
        await store.redis.expire(index, 30)
        assert (await store.renew({case.task_id: (2, HB)}))[case.task_id].ok
        assert await store.redis.ttl(record) > full - 5
        assert await store.redis.ttl(index) >= await store.redis.ttl(record)

    _run(redis_url, body)
