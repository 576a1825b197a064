"""What the key store knows about a task and about a worker, as plain values."""

import dataclasses
import json
from collections.abc import Mapping

from dagster_taskiq.lifecycle.states import TaskKind, TaskState


def _opt_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """A task as the key store sees it, with the liveness facts read alongside it."""

    task_id: str
    kind: TaskKind
    run_id: str
    step_key: str | None
    queue: str
    priority: int
    state: TaskState
    worker: str | None
    fence: int
    submitted_at: float
    sent_at: float | None
    claimed_at: float | None
    started_at: float | None
    finished_at: float | None
    last_heartbeat: float | None
    heartbeat_timeout: float
    status: str | None
    pid: int | None
    deliveries: int
    requeued_at: float | None
    #: Whether the task's lease key exists (only meaningful while running or revoking).
    lease_alive: bool
    #: Whether the worker instance holding the claim is alive (None when nobody holds it).
    holder_alive: bool | None = None
    #: The outcome its worker recorded (serdes JSON), once finished.
    outcome_json: str | None = None
    #: Why it was revoked, when whoever revoked it said so (``dagster-taskiq task revoke``).
    revoke_reason: str | None = None

    @property
    def is_active(self) -> bool:
        """Whether the task still waits for, or is held by, a worker."""
        return self.state.is_active

    @property
    def what(self) -> str:
        """``step 'x' of run R`` or ``run R``."""
        if self.step_key:
            return f"step '{self.step_key}' of run {self.run_id}"
        return f"run {self.run_id}"

    def describe(self) -> str:
        """One line naming the task, its run and step, queue and state."""
        holder = f" on worker {self.worker}" if self.worker else ""
        return (
            f"task {self.task_id} ({self.what}, queue '{self.queue}') is {self.state.value}{holder}"
        )

    @classmethod
    def from_hash(
        cls,
        task_id: str,
        data: Mapping[str, str],
        *,
        lease_alive: bool,
        holder_alive: bool | None = None,
    ) -> "TaskRecord":
        """Parse a task hash (decoded to text, without its ``message``)."""
        try:
            state = TaskState(data.get("state", ""))
        except ValueError:
            state = TaskState.LOST
        try:
            kind = TaskKind(data.get("kind", "step"))
        except ValueError:
            kind = TaskKind.STEP
        return cls(
            task_id=task_id,
            kind=kind,
            run_id=data.get("run_id", ""),
            step_key=data.get("step_key") or None,
            queue=data.get("queue", ""),
            priority=int(data.get("priority", "0") or 0),
            state=state,
            worker=data.get("worker") or None,
            fence=int(data.get("fence", "0") or 0),
            submitted_at=float(data.get("submitted_at", "0") or 0),
            sent_at=_opt_float(data.get("sent_at")),
            claimed_at=_opt_float(data.get("claimed_at")),
            started_at=_opt_float(data.get("started_at")),
            finished_at=_opt_float(data.get("finished_at")),
            last_heartbeat=_opt_float(data.get("heartbeat")),
            heartbeat_timeout=float(data.get("heartbeat_timeout", "30") or 30),
            status=data.get("status") or None,
            pid=int(data["pid"]) if data.get("pid") else None,
            deliveries=int(data.get("deliveries", "0") or 0),
            requeued_at=_opt_float(data.get("requeued_at")),
            lease_alive=lease_alive,
            holder_alive=holder_alive,
            outcome_json=data.get("outcome") or None,
            revoke_reason=data.get("revoke_reason") or None,
        )


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker's liveness record."""

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    running: tuple[str, ...]
    started_at: float
    last_heartbeat: float
    instance: str = ""
    state: str = "serving"
    #: The broker the worker consumes from, credentials redacted ("" from older workers).
    broker: str = ""

    def as_mapping(self) -> dict[str, str]:
        """The record as Redis hash fields (the instance is written by the store itself)."""
        return {
            "name": self.name,
            "host": self.host,
            "pid": str(self.pid),
            "queues": json.dumps(list(self.queues)),
            "concurrency": str(self.concurrency),
            "running": json.dumps(list(self.running)),
            "started_at": repr(self.started_at),
            "last_heartbeat": repr(self.last_heartbeat),
            "state": self.state,
            "broker": self.broker,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, str]) -> "WorkerInfo":
        """Parse the Redis hash written by :meth:`as_mapping`."""
        return cls(
            name=data["name"],
            host=data.get("host", "?"),
            pid=int(data.get("pid", "0")),
            queues=tuple(json.loads(data.get("queues", "[]"))),
            concurrency=int(data.get("concurrency", "0")),
            running=tuple(json.loads(data.get("running", "[]"))),
            started_at=float(data.get("started_at", "0")),
            last_heartbeat=float(data.get("last_heartbeat", "0")),
            instance=data.get("instance", ""),
            state=data.get("state", "serving"),
            broker=data.get("broker", ""),
        )
