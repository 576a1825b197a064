"""Jobs for the routing, priority, failure and revocation tests.

Queue names are per test (so parallel tests never share a RabbitMQ queue), which is why most jobs
here are built by factories and made reconstructable with :func:`recon`: a worker rebuilds the job
by calling the factory with the same JSON arguments.
"""

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import In, JobDefinition, Nothing, OpExecutionContext, job, op
from dagster._core.definitions.reconstruct import ReconstructableJob, build_reconstructable_job

from dagster_taskiq import taskiq_executor

QUEUE_TAG = "dagster-taskiq/queue"
PRIORITY_TAG = "dagster-taskiq/priority"
LOG_ENV = "DAGSTER_TASKIQ_TEST_LOG"
MARKER_ENV = "DAGSTER_TASKIQ_TEST_MARKER"


def note(context: OpExecutionContext, what: str) -> None:
    """Append ``<time> <pid> <run id> <what>`` to $DAGSTER_TASKIQ_TEST_LOG."""
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.time():.6f} {os.getpid()} {context.run_id} {what}\n")


def read_notes(path: Path) -> list[tuple[float, int, str, str]]:
    """The lines written by :func:`note`, as ``(time, pid, run id, what)``."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stamp, pid, run_id, what = line.split(" ", 3)
        rows.append((float(stamp), int(pid), run_id, what))
    return rows


def recon(factory: str, **kwargs: Any) -> ReconstructableJob:
    """A reconstructable job built by calling ``factory(**kwargs)`` from this module."""
    return build_reconstructable_job(__name__, factory, reconstructable_kwargs=kwargs)


@op(ins={"start": In(Nothing)})
def probe(context: OpExecutionContext) -> str:
    """Record that this step ran (its order is what the priority tests check)."""
    note(context, context.op.name)
    return context.op.name


@op
def gate(context: OpExecutionContext) -> None:
    """The first step: when it ends, every probe becomes ready at once."""
    note(context, "gate")


@op(ins={"start": In(Nothing)})
def finale(context: OpExecutionContext) -> None:
    """The last step, on its own queue."""
    note(context, "finale")


def _tags(queue: str | None, priority: int | None = None) -> dict[str, str]:
    tags = {QUEUE_TAG: queue} if queue else {}
    if priority is not None:
        tags[PRIORITY_TAG] = str(priority)
    return tags


def routed_priority_job(
    gate_queue: str, probe_queue: str, final_queue: str, priorities: Mapping[str, int]
) -> JobDefinition:
    """``gate`` (on ``gate_queue``) releases the prioritised probes (on ``probe_queue``), and
    ``finale`` (on ``final_queue``) runs after all of them."""

    @job(executor_def=taskiq_executor, name="routed_priority_job")
    def _job() -> None:
        done = gate.tag(_tags(gate_queue))()
        outs = [
            probe.alias(name).tag(_tags(probe_queue, priority))(start=done)
            for name, priority in priorities.items()
        ]
        finale.tag(_tags(final_queue))(start=outs)

    return _job


def ranked_job(queue: str, priorities: Mapping[str, int]) -> JobDefinition:
    """Independent probes on ``queue``; all are submitted at once when the run starts."""

    @job(executor_def=taskiq_executor, name="ranked_job")
    def _job() -> None:
        for name, priority in priorities.items():
            probe.alias(name).tag(_tags(queue, priority))()

    return _job


def held_back_job(queue: str, priorities: Mapping[str, int]) -> JobDefinition:
    """Independent probes that carry Dagster's ``dagster/priority`` as well as ours."""

    @job(executor_def=taskiq_executor, name="held_back_job")
    def _job() -> None:
        for name, priority in priorities.items():
            tags = {**_tags(queue, priority), "dagster/priority": str(priority)}
            probe.alias(name).tag(tags)()

    return _job


@op
def hold(context: OpExecutionContext) -> None:
    """Run until killed, ignoring SIGTERM like a step stuck in C code (records start and pid)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    note(context, f"start {context.op.name}")
    time.sleep(300)
    note(context, f"end {context.op.name}")


@op(ins={"start": In(Nothing)})
def after_hold(context: OpExecutionContext) -> None:
    """Downstream of a held step: must never run when the run is terminated."""
    note(context, f"start {context.op.name}")


@job(executor_def=taskiq_executor)
def revocable_job() -> None:
    """Three steps that run until killed: on a two-slot worker one of them waits in the queue."""
    hold.alias("held_a").tag({PRIORITY_TAG: "9"})()
    after_hold(start=hold.alias("held_b").tag({PRIORITY_TAG: "9"})())
    hold.alias("held_c").tag({PRIORITY_TAG: "1"})()


@op
def slow(context: OpExecutionContext) -> int:
    """Run until the marker file ($DAGSTER_TASKIQ_TEST_MARKER) exists."""
    note(context, f"start {context.op.name}")
    marker = Path(os.environ[MARKER_ENV])
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    note(context, f"end {context.op.name}")
    return 1


@op(ins={"start": In(Nothing)})
def quick(context: OpExecutionContext) -> int:
    """A short step that records where it ran."""
    note(context, f"start {context.op.name}")
    return 2


@job(executor_def=taskiq_executor)
def busy_shutdown_job() -> None:
    """``slow`` is taken first (higher priority); the quick steps wait behind it."""
    slow.tag({PRIORITY_TAG: "9"})()
    quick.alias("quick_1").tag({PRIORITY_TAG: "1"})()
    quick.alias("quick_2").tag({PRIORITY_TAG: "1"})()


@job(executor_def=taskiq_executor)
def long_step_job() -> None:
    """One step that runs as long as the test wants, then a downstream step."""
    quick.alias("after_slow")(start=slow())
