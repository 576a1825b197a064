"""What a worker tells its metrics when a task starts or ends.

The worker's parts call a :class:`TaskRecorder`. Without ``--metrics-port`` it is a
:class:`NullRecorder` whose methods do nothing, so metrics cost nothing when they are off.
"""

import time
from collections.abc import Mapping
from typing import Any, Protocol

from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import Outcome, TaskKind

#: The ``outcome`` label values of ``tasks_finished_total``.
METRIC_OUTCOMES = (
    Outcome.SUCCESS,
    Outcome.FAILURE,
    Outcome.REVOKED,
    Outcome.LOST,
    Outcome.DEAD_LETTER,
)

#: ``queue``/``kind`` label value of a refused message whose queue or kind is unknown.
UNKNOWN_LABEL = "unknown"


def metric_outcome(status: str, step_failed: bool = False) -> Outcome:
    """The ``outcome`` label for a task outcome status (see :data:`METRIC_OUTCOMES`).

    A step task that ran to its end but whose step failed counts as a failure; a skipped task
    counts as a success (it did what it was asked); a message refused as bad counts as a dead
    letter; anything unrecognised counts as a failure.
    """
    if step_failed and status == Outcome.SUCCESS:
        return Outcome.FAILURE
    try:
        outcome = Outcome(status)
    except ValueError:
        return Outcome.FAILURE
    if outcome is Outcome.SKIPPED:
        return Outcome.SUCCESS
    if outcome is Outcome.BAD_MESSAGE:
        return Outcome.DEAD_LETTER
    return outcome if outcome in METRIC_OUTCOMES else Outcome.FAILURE


class TaskRecorder(Protocol):
    """Receives a worker's task events; implementations must not block or raise."""

    def started(self, record: TaskRecord) -> None:
        """A task's process was started (``record`` is its record as claimed)."""

    def finished(self, record: TaskRecord, outcome: Outcome, duration: float) -> None:
        """A started task ended with ``outcome`` (see :func:`metric_outcome`) after
        ``duration`` seconds."""

    def refused(self, queue: str, kind: str) -> None:
        """A message was dead-lettered without running (its queue/kind may be unknown)."""


class NullRecorder:
    """The recorder of a worker without metrics: every call is a no-op."""

    def started(self, record: TaskRecord) -> None:
        """Do nothing."""

    def finished(self, record: TaskRecord, outcome: Outcome, duration: float) -> None:
        """Do nothing."""

    def refused(self, queue: str, kind: str) -> None:
        """Do nothing."""


def queue_wait(record: TaskRecord, now: float | None = None) -> float:
    """Seconds between a task's submission and now (never negative)."""
    return max(0.0, (time.time() if now is None else now) - record.submitted_at)


def held_slots(claims: Mapping[str, Any], running: Mapping[str, Any]) -> int:
    """Slots a worker holds: claims not yet started, plus running tasks other than runs (a
    run's process gives its slot back). ``running`` maps task ids to objects with a ``record``.
    Safe to call from another thread (the mappings are copied in one step)."""
    tasks = list(running.values())
    return len(claims) + sum(1 for held in tasks if held.record.kind is not TaskKind.RUN)
