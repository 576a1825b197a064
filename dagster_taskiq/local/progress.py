"""Follow a run's steps as they move through taskiq workers, and summarise them in a table.

:class:`RunWatcher` combines two views of one run: Dagster's step stats (status and timing, from the
instance's event log) and dagster-taskiq's key store (queue, priority and the worker that took each
task). It prints one line when a step starts on a worker and one when it ends.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq.compat import (
    DagsterRun,
    RunStepKeyStatsSnapshot,
    StepEventStatus,
    WorkerStatus,
)
from dagster_taskiq.connection import TaskiqClient
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import TaskState

RUN_KEY = "__run__"
_VERBS = {
    StepEventStatus.SUCCESS: "succeeded",
    StepEventStatus.FAILURE: "FAILED",
    StepEventStatus.SKIPPED: "skipped",
}
_FINAL = set(_VERBS)


@dataclasses.dataclass
class StepRow:
    """What the summary table says about one step."""

    step_key: str
    queue: str = "-"
    priority: str = "-"
    worker: str = "-"
    duration: str = "-"
    status: str = "NOT RUN"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns, as the CLI prints them."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


class RunWatcher:
    """Polls one run until it finishes, printing progress with ``echo``.

    :param instance: the Dagster instance the run lives in.
    :param client: a taskiq client for the broker the run's tasks go through.
    :param run_id: the run to follow.
    :param step_keys: the steps the run will execute, in plan order (the total to count to).
    :param echo: where progress lines go.
    """

    def __init__(
        self,
        instance: DagsterInstance,
        client: TaskiqClient,
        run_id: str,
        step_keys: Sequence[str],
        echo: Callable[[str], None],
    ) -> None:
        self.instance = instance
        self.client = client
        self.run_id = run_id
        self.step_keys = list(step_keys)
        self.echo = echo
        self.records: dict[str, TaskRecord] = {}
        self.stats: dict[str, RunStepKeyStatsSnapshot] = {}
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._run_taken = False
        self._width = max((len(k) for k in self.step_keys), default=10)

    @property
    def done(self) -> int:
        """How many steps have ended (succeeded, failed or skipped)."""
        return len(self._finished)

    def _refresh(self) -> None:
        async def _records(conn: Any) -> dict[str, TaskRecord]:
            index = await conn.keystore.run_tasks(self.run_id)
            found = await conn.keystore.get_many(list(index.values()))
            by_id = {record.task_id: record for record in found}
            return {key: by_id[tid] for key, tid in index.items() if tid in by_id}

        self.records = self.client.run(_records)
        self.stats = {s.step_key: s for s in self.instance.get_run_step_stats(self.run_id)}

    def poll(self) -> None:
        """Read the run's state once and print what changed since the last poll."""
        self._refresh()
        run_task = self.records.get(RUN_KEY)
        if run_task is not None and run_task.worker and not self._run_taken:
            self._run_taken = True
            self.echo(
                f"  run        taken by worker {run_task.worker} from queue '{run_task.queue}'; "
                "it orchestrates the steps below"
            )
        total = len(self.step_keys)
        for key in self.step_keys:
            record = self.records.get(key)
            stat = self.stats.get(key)
            if (
                key not in self._started
                and record is not None
                and record.worker
                and record.state != TaskState.QUEUED
            ):
                self._started.add(key)
                self.echo(
                    f"  [{self.done}/{total}] {key:<{self._width}}  started on {record.worker} "
                    f"(queue {record.queue}, priority {record.priority})"
                )
            if key not in self._finished and stat is not None and stat.status in _FINAL:
                self._finished.add(key)
                where = f" on {record.worker}" if record is not None and record.worker else ""
                self.echo(
                    f"  [{self.done}/{total}] {key:<{self._width}}  {_VERBS[stat.status]}"
                    f"{where} in {_duration(stat)}"
                )

    def wait(
        self,
        launcher: TaskiqRunLauncher,
        timeout: float,
        interval: float = 0.2,
        health_every: float = 2.0,
    ) -> DagsterRun:
        """Poll until the run finishes or ``timeout`` seconds pass; return the run as it ends.

        Like Dagster's run monitoring, it asks the launcher about the run's worker every
        ``health_every`` seconds, and fails the run if the worker was lost.
        On timeout the run is terminated.
        """
        deadline = time.monotonic() + timeout
        next_health = time.monotonic() + health_every
        while True:
            self.poll()
            run = self.instance.get_run_by_id(self.run_id)
            assert run is not None
            if run.is_finished:
                self.poll()
                return run
            now = time.monotonic()
            if now >= deadline:
                self.echo(f"  Run {self.run_id} did not finish within {timeout:.0f} s; ending it.")
                launcher.terminate(self.run_id)
                return self._final_run(10.0)
            if now >= next_health:
                next_health = now + health_every
                health = launcher.check_run_worker_health(run)
                if health.status == WorkerStatus.FAILED:
                    latest = self.instance.get_run_by_id(self.run_id)
                    if latest is not None and not latest.is_finished:
                        self.echo(f"  The run's worker failed: {health.msg}")
                        self.instance.report_run_failed(latest, health.msg)
            time.sleep(interval)

    def _final_run(self, timeout: float) -> DagsterRun:
        deadline = time.monotonic() + timeout
        while True:
            run = self.instance.get_run_by_id(self.run_id)
            assert run is not None
            if run.is_finished or time.monotonic() >= deadline:
                self.poll()
                return run
            time.sleep(0.2)

    def rows(self) -> list[StepRow]:
        """One table row per step, in plan order."""
        rows = []
        for key in self.step_keys:
            row = StepRow(key)
            record = self.records.get(key)
            if record is not None:
                row.queue, row.priority = record.queue, str(record.priority)
                row.worker = record.worker or "-"
            stat = self.stats.get(key)
            if stat is not None:
                row.duration = _duration(stat)
                row.status = stat.status.value if stat.status else "STARTED"
            rows.append(row)
        return rows

    def table(self) -> str:
        """The summary table: step, queue, priority, worker, duration, status."""
        return render_table(
            ("STEP", "QUEUE", "PRIORITY", "WORKER", "DURATION", "STATUS"),
            [
                (r.step_key, r.queue, r.priority, r.worker, r.duration, r.status)
                for r in self.rows()
            ],
        )

    def failures(self) -> list[str]:
        """One line per failed step (or failed run), with the error Dagster recorded."""
        lines = []
        for entry in self.instance.all_logs(
            self.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
        ):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.STEP_FAILURE:
                data = event.step_failure_data
                error = data.error if data is not None else None
                detail = _error_text(error) if error is not None else event.message or ""
                lines.append(f"step {event.step_key}: {_first_line(detail)}")
            elif not lines:
                lines.append(f"run: {_first_line(event.message or entry.user_message)}")
        return lines

    def output_metadata(self, step_key: str) -> dict[str, Any]:
        """The metadata of a step's outputs (for example the report's totals)."""
        found: dict[str, Any] = {}
        for entry in self.instance.all_logs(self.run_id, of_type=DagsterEventType.STEP_OUTPUT):
            event = entry.dagster_event
            if event is not None and event.step_key == step_key and event.step_output_data:
                for name, value in event.step_output_data.metadata.items():
                    found[name] = getattr(value, "value", value)
        return found


def _duration(stat: RunStepKeyStatsSnapshot) -> str:
    if stat.start_time is None:
        return "-"
    end = stat.end_time if stat.end_time is not None else time.time()
    return f"{max(0.0, end - stat.start_time):.2f} s"


def _error_text(error: Any) -> str:
    """The error's message without the exception's module path (``Failure: ...``)."""
    message = str(error.message).strip()
    qualified = message.split(":", 1)[0]
    if "." in qualified and qualified.endswith(str(error.cls_name)):
        return f"{error.cls_name}:{message.split(':', 1)[1]}"
    return message


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
