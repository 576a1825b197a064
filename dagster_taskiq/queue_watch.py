"""Notice steps that wait on a queue no live worker serves, and say how to start one.

The step handler asks :class:`UnservedQueueWatch` about each queued step it checks. Once a step
has waited ``grace`` seconds (a third of its ``heartbeat_timeout``), the watch reads the live
workers from the key store's worker registry (at most once per ``grace``) and, if none of them
serves the step's queue, returns a warning for the run: once per run and queue.
"""

import dataclasses
import time
from collections.abc import Iterable

from dagster_taskiq.config import TaskiqSettings, redact_url
from dagster_taskiq.lifecycle.records import TaskRecord, WorkerInfo
from dagster_taskiq.lifecycle.states import TaskState, WorkerState

#: Fraction of ``heartbeat_timeout`` a step waits before its queue is checked for workers.
GRACE_FRACTION = 1 / 3
#: Worker states that serve their queues (a starting worker is about to).
SERVING_STATES = frozenset({WorkerState.STARTING.value, WorkerState.SERVING.value})


@dataclasses.dataclass(frozen=True)
class UnservedQueue:
    """A queue a run's step waits on while no live worker serves it."""

    queue: str
    run_id: str
    step_key: str | None
    task_id: str
    waited: float
    served_queues: tuple[str, ...]
    start_command: str

    @property
    def prefix(self) -> str:
        """How the warning starts: the same for every warning about this queue."""
        return unserved_prefix(self.queue)

    def message(self) -> str:
        """The warning shown in the run's event log."""
        served = (
            "Live workers serve " + ", ".join(f"'{q}'" for q in self.served_queues) + "."
            if self.served_queues
            else "No worker is live."
        )
        what = f"step '{self.step_key}'" if self.step_key else "the run"
        return (
            f"{self.prefix} {what} (task {self.task_id}) has waited "
            f"{self.waited:.0f} s for one. {served} Start a worker for it: {self.start_command}"
        )


def unserved_prefix(queue: str) -> str:
    """How the warning about ``queue`` starts (a resumed orchestrator looks for it)."""
    return f"No live worker serves queue '{queue}':"


def start_command(queue: str, settings: TaskiqSettings) -> str:
    """The command that starts a worker for ``queue`` with ``settings`` (passwords redacted).

    With a non-empty ``config_source`` (key prefix, exchange...) the worker needs the same
    options, so the command reads them from a ``-y`` file instead of taking URL flags.
    """
    if settings.config_source:
        return (
            f"dagster-taskiq worker start -q {queue} -y CONFIG.yaml (CONFIG.yaml: this run's "
            "executor config, with the same broker, backend and config_source)"
        )
    command = f"dagster-taskiq worker start -q {queue} --broker {redact_url(settings.broker_url)}"
    if settings.backend_url != settings.broker_url:
        command += f" --backend {redact_url(settings.backend_url)}"
    return command


def served_queues(workers: Iterable[WorkerInfo]) -> frozenset[str]:
    """The queues that the live, serving (or starting) workers among ``workers`` consume."""
    return frozenset(
        queue for worker in workers if worker.state in SERVING_STATES for queue in worker.queues
    )


class UnservedQueueWatch:
    """Per orchestrator: which run/queue pairs were already warned about, and a short-lived
    cache of the queues live workers serve."""

    def __init__(self, settings: TaskiqSettings) -> None:
        self._settings = settings
        self._warned: set[tuple[str, str]] = set()
        self._served: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    @property
    def grace(self) -> float:
        """Seconds a step waits before its queue is checked for live workers."""
        return self._settings.heartbeat_timeout * GRACE_FRACTION

    def due(self, record: TaskRecord, now: float | None = None) -> bool:
        """Whether ``record`` is a queued task that has waited long enough to check its queue,
        and its run was not yet warned about that queue."""
        now = time.time() if now is None else now
        return (
            record.state is TaskState.QUEUED
            and (record.run_id, record.queue) not in self._warned
            and now - record.submitted_at >= self.grace
        )

    def needs_workers(self) -> bool:
        """Whether the cached list of served queues is too old to decide on."""
        return time.monotonic() - self._read_at >= self.grace

    def update_workers(self, workers: Iterable[WorkerInfo]) -> None:
        """Cache what ``workers`` (the live workers just read) serve."""
        self._served = served_queues(workers)
        self._read_at = time.monotonic()

    def check(self, record: TaskRecord, now: float | None = None) -> UnservedQueue | None:
        """The warning for ``record``'s run if its queue is unserved (at most once per run and
        queue), else None. Call :meth:`update_workers` first when :meth:`needs_workers`."""
        now = time.time() if now is None else now
        if not self.due(record, now) or record.queue in self._served:
            return None
        self._warned.add((record.run_id, record.queue))
        return UnservedQueue(
            queue=record.queue,
            run_id=record.run_id,
            step_key=record.step_key,
            task_id=record.task_id,
            waited=max(0.0, now - record.submitted_at),
            served_queues=tuple(sorted(self._served)),
            start_command=start_command(record.queue, self._settings),
        )
