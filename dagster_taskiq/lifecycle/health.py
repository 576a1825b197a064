"""``assess``: the one verdict on what a task record means, and what should be done about it.

The step handler (``check_step_health``), the run launcher (``check_run_worker_health``) and the
workers' sweeper all call :func:`assess`; :mod:`.recovery` carries out the action it names.
"""

import dataclasses
import time

from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.lifecycle.lease import LeasePolicy
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import Outcome, TaskState, TextEnum
from dagster_taskiq.payloads import TaskOutcome, decode_outcome


class Health(TextEnum):
    """What a task's record says about the work it stands for."""

    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REVOKED = "revoked"
    LOST = "lost"

    @property
    def is_healthy(self) -> bool:
        """Whether the task is on course: waiting, starting, running or succeeded."""
        return self in (Health.WAITING, Health.STARTING, Health.RUNNING, Health.SUCCEEDED)


class Action(TextEnum):
    """What must be done to keep a task from being stranded."""

    NONE = "none"
    #: Queued but its message was never accepted by the broker: send it.
    SEND = "send"
    #: Queued and sent a while ago: make sure its message is still somewhere, else send it.
    CHECK_PRESENCE = "check_presence"
    #: Claimed by a worker instance that is gone: put it back to queued and send it.
    RELEASE = "release"
    #: Running, but its lease lapsed: declare it lost.
    MARK_LOST = "mark_lost"
    #: Finished: nothing to watch any more.
    FORGET = "forget"


@dataclasses.dataclass(frozen=True)
class Assessment:
    """The verdict on one task: its health, what to do about it, and a message for users."""

    health: Health
    action: Action
    message: str
    outcome: TaskOutcome | None = None

    @property
    def healthy(self) -> bool:
        """Whether the task is on course."""
        return self.health.is_healthy


def outcome_of(record: TaskRecord) -> TaskOutcome | None:
    """The outcome a finished task's worker recorded, or None (none, or unreadable)."""
    if not record.outcome_json:
        return None
    try:
        return decode_outcome(record.outcome_json, record.task_id)
    except BadMessageError:
        return None


def assess(record: TaskRecord, now: float | None = None) -> Assessment:
    """What ``record`` means at time ``now`` (seconds since the epoch), and what to do."""
    now = time.time() if now is None else now
    policy = LeasePolicy(record.heartbeat_timeout)
    state = record.state
    task_ = f"task {record.task_id} ({record.what}, queue '{record.queue}')"
    task = "T" + task_[1:]
    if state is TaskState.QUEUED:
        waited = max(0.0, now - record.submitted_at)
        message = f"{task} has waited {waited:.0f} s at priority {record.priority} for a worker."
        if record.sent_at is None:
            since = record.requeued_at or record.submitted_at
            action = Action.SEND if now - since >= policy.unsent_grace else Action.NONE
        else:
            due = now - record.sent_at >= policy.recheck_after
            action = Action.CHECK_PRESENCE if due else Action.NONE
        return Assessment(Health.WAITING, action, message)
    if state is TaskState.CLAIMED:
        if record.holder_alive is False:
            return Assessment(
                Health.WAITING,
                Action.RELEASE,
                f"Worker {record.worker} took {task_} and then went away before starting "
                "it; it goes back to its queue.",
            )
        return Assessment(
            Health.STARTING, Action.NONE, f"Worker {record.worker} is starting {task_}."
        )
    if state.holds_lease:
        if record.lease_alive:
            return Assessment(
                Health.RUNNING,
                Action.NONE,
                f"Worker {record.worker} is running {task_}; last heartbeat "
                f"{_ago(record.last_heartbeat, now)}.",
            )
        return Assessment(Health.LOST, Action.MARK_LOST, lost_message(record, now))
    if state is TaskState.LOST:
        return Assessment(Health.LOST, Action.FORGET, lost_message(record, now))
    if state is TaskState.REVOKED:
        why = record.revoke_reason or "its run was terminated"
        return Assessment(Health.REVOKED, Action.FORGET, f"{task} was revoked ({why}).")
    outcome = outcome_of(record)
    if outcome is None:
        return Assessment(
            Health.FAILED,
            Action.FORGET,
            f"{task} finished ({record.status or 'no status'}) on worker {record.worker}, but "
            "its outcome is missing from the key store.",
        )
    try:
        success = Outcome(outcome.status).is_success
    except ValueError:
        success = False
    if success:
        return Assessment(
            Health.SUCCEEDED,
            Action.FORGET,
            outcome.message or f"Worker {outcome.worker} finished {task_}.",
            outcome,
        )
    message = outcome.message or (
        f"{task} ended with status {outcome.status} on worker {outcome.worker}."
    )
    if record.revoke_reason:
        message = f"{message} Revoked: {record.revoke_reason}."
    return Assessment(Health.FAILED, Action.FORGET, message, outcome)


def lost_message(record: TaskRecord, now: float | None = None) -> str:
    """Why a task counts as lost: which worker stopped renewing its lease, and when."""
    now = time.time() if now is None else now
    return (
        f"Worker {record.worker} stopped heartbeating for task {record.task_id} "
        f"({record.what}, queue '{record.queue}', process pid {record.pid or '-'}); last "
        f"heartbeat {_ago(record.last_heartbeat, now)}; heartbeat_timeout is "
        f"{record.heartbeat_timeout:g} s. The worker probably died or was cut off from Redis "
        "(killed, out of memory, or its host went away); check its logs."
    )


def _ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    return f"{max(0.0, now - timestamp):.1f} s ago"
