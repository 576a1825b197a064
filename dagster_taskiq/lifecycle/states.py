"""Task states, worker states and task outcomes, as enums.

A task moves ``QUEUED → CLAIMED → RUNNING → DONE``. On the way it can be ``REVOKED`` (queued or
claimed when revoked), ``REVOKING`` (revoked while running: its worker stops the process and then
finishes it as ``REVOKED``) or ``LOST`` (its lease lapsed: no heartbeat for ``heartbeat_timeout``).
A claim whose holder died goes back to ``QUEUED`` (release). ``DONE``, ``REVOKED`` and ``LOST``
are final: nothing moves a task out of them.
"""

import enum


class TextEnum(str, enum.Enum):
    """An enum whose members are their stored text: ``str(member)`` is the value.

    (``enum.StrEnum`` does this from Python 3.11; this package supports 3.10.)
    """

    def __str__(self) -> str:
        return str(self.value)


class TaskState(TextEnum):
    """Where a task is in its lifecycle (stored in the task record's ``state`` field)."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    RUNNING = "running"
    REVOKING = "revoking"
    DONE = "done"
    REVOKED = "revoked"
    LOST = "lost"

    @property
    def is_final(self) -> bool:
        """Whether nothing can move the task out of this state."""
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        """Whether the task still waits for, or is held by, a worker."""
        return not self.is_final

    @property
    def holds_lease(self) -> bool:
        """Whether a worker holds the task's lease (its process runs, or is being stopped)."""
        return self in (TaskState.RUNNING, TaskState.REVOKING)


FINAL_STATES = frozenset({TaskState.DONE, TaskState.REVOKED, TaskState.LOST})


class TaskKind(TextEnum):
    """What a task runs: one step of a run, or a whole run (the run launcher's tasks)."""

    STEP = "step"
    RUN = "run"


class Outcome(TextEnum):
    """How a task ended, as its worker reports it (the ``status`` of a finished task)."""

    SUCCESS = "success"
    SKIPPED = "skipped"
    FAILURE = "failure"
    REVOKED = "revoked"
    LOST = "lost"
    DEAD_LETTER = "dead_letter"
    #: Reported by a task process that could not decode its payload; its worker dead-letters
    #: the message and records the task as a ``FAILURE`` (this status is never stored).
    BAD_MESSAGE = "bad_message"

    @property
    def is_success(self) -> bool:
        """Whether the task did what it was sent to do."""
        return self in (Outcome.SUCCESS, Outcome.SKIPPED)

    @property
    def final_state(self) -> TaskState:
        """The task state a finish with this outcome leaves."""
        if self is Outcome.REVOKED:
            return TaskState.REVOKED
        if self is Outcome.LOST:
            return TaskState.LOST
        return TaskState.DONE


class WorkerState(TextEnum):
    """What a worker is doing, as it reports in its liveness record."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class ClaimResult(TextEnum):
    """What a claim attempt found."""

    CLAIMED = "claimed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    DUPLICATE = "duplicate"
    MISMATCH = "mismatch"
