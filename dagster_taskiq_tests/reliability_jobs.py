"""Jobs for the reliability and load tests, and the ``defs`` a launcher workspace loads.

The ops note what they do in ``$DAGSTER_TASKIQ_REL_LOG`` (one line per event, with the pid), and
the ``held`` op waits until the file named by ``$DAGSTER_TASKIQ_REL_RELEASE`` exists, so a test
can break things while a step is certainly running and then let it finish.
"""

import os
import time
from pathlib import Path

from dagster import Definitions, In, Nothing, OpExecutionContext, RetryPolicy, job, op

from dagster_taskiq import taskiq_executor

LOG_ENV = "DAGSTER_TASKIQ_REL_LOG"
RELEASE_ENV = "DAGSTER_TASKIQ_REL_RELEASE"


def note(context: OpExecutionContext, what: str) -> None:
    """Append ``<time> <pid> <run_id> <what>`` to the file named by ``$DAGSTER_TASKIQ_REL_LOG``."""
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.time():.6f} {os.getpid()} {context.run_id} {what}\n")


def notes(path: Path, run_id: str | None = None) -> list[tuple[int, str]]:
    """``(pid, what)`` of every note (of ``run_id`` when given), in order."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        _, pid, rid, what = line.split(" ", 3)
        if run_id is None or rid == run_id:
            found.append((int(pid), what))
    return found


@op
def first(context: OpExecutionContext) -> int:
    note(context, "start first")
    return 1


def _hold(context: OpExecutionContext, value: int) -> int:
    note(context, f"start {context.op.name}")
    release = os.environ.get(RELEASE_ENV)
    deadline = time.monotonic() + 120
    while release and not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    note(context, f"end {context.op.name}")
    return value + 1


@op
def held(context: OpExecutionContext, value: int) -> int:
    """Runs until the release file exists (at most two minutes)."""
    return _hold(context, value)


@op
def last(context: OpExecutionContext, value: int) -> int:
    note(context, "start last")
    return value + 1


@job(executor_def=taskiq_executor)
def hold_chain_job() -> None:
    """``first -> held -> last``: the test breaks something while ``held`` runs."""
    last(held(first()))


@op(retry_policy=RetryPolicy(max_retries=2, delay=0.2))
def held_with_retry(context: OpExecutionContext, value: int) -> int:
    """``held`` with a retry policy, for faults that kill the step."""
    return _hold(context, value)


@job(executor_def=taskiq_executor)
def hold_chain_retry_job() -> None:
    """``first -> held_with_retry -> last``."""
    last(held_with_retry(first()))


@op
def tiny(context: OpExecutionContext) -> int:
    return 1


@op(ins={"start": In(Nothing)})
def tiny_after(context: OpExecutionContext) -> int:
    return 1


def _wide_job(width: int, name: str):  # type: ignore[no-untyped-def]
    @job(executor_def=taskiq_executor, name=name)
    def _job() -> None:
        root = tiny.alias("root")()
        for i in range(width - 1):
            tiny_after.alias(f"leaf_{i}")(start=root)

    return _job


#: One root step, then the rest fanned out after it: ``width`` steps in all.
load_job_20 = _wide_job(20, "load_job_20")
load_job_10 = _wide_job(10, "load_job_10")

defs = Definitions(
    jobs=[hold_chain_job, hold_chain_retry_job, load_job_20, load_job_10],
)
