"""Jobs that the run-launcher tests launch through ``TaskiqRunLauncher`` onto real workers.

Most run with Dagster's in-process executor (the whole run executes in the worker's run
process); the ``stepped_*`` jobs use ``taskiq_executor``, so their steps go out to workers too.
Files the ops watch or write are passed through op config, never through globals.
"""

import os
import signal
import sys
import time
from pathlib import Path

from dagster import (
    Config,
    Definitions,
    In,
    Nothing,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from dagster_taskiq import taskiq_executor


class FileConfig(Config):
    """A file an op watches or appends to."""

    path: str = ""


def _append(path: str, line: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{line}\n")


@op
def do_nothing() -> None:
    """Succeed at once."""


@job(executor_def=in_process_executor)
def noop_job() -> None:
    do_nothing()


@op
def hard_exit() -> None:
    """Kill the run process without any cleanup, as a segfault or OOM kill would."""
    os._exit(1)


@job(executor_def=in_process_executor)
def os_exit_job() -> None:
    hard_exit()


@op
def soft_exit() -> None:
    """Raise SystemExit inside the op."""
    sys.exit(1)


@job(executor_def=in_process_executor)
def sys_exit_job() -> None:
    soft_exit()


@op
def loop_forever(context: OpExecutionContext, config: FileConfig) -> None:
    """Write a line once started, then loop until the process is interrupted."""
    _append(config.path, f"started {os.getpid()}")
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.05)


@job(executor_def=in_process_executor)
def looping_job() -> None:
    loop_forever()


@op
def ignore_interrupts(config: FileConfig) -> None:
    """Ignore SIGTERM and SIGINT (as a stuck C extension would), then loop: only SIGKILL stops
    this run process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _append(config.path, f"started {os.getpid()}")
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.05)


@job(executor_def=in_process_executor)
def stubborn_job() -> None:
    ignore_interrupts()


@op
def hang_first_time(config: FileConfig) -> str:
    """On the first attempt create ``path`` and hang (the test kills the worker); then succeed."""
    marker = Path(config.path)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.05)
    return "resumed"


@job(executor_def=in_process_executor)
def resumable_job() -> None:
    hang_first_time()


@job(executor_def=taskiq_executor)
def stepped_resumable_job() -> None:
    hang_first_time()


@op
def first_step() -> int:
    return 1


@op
def second_step(value: int) -> int:
    return value + 1


@job(executor_def=taskiq_executor)
def stepped_job() -> None:
    second_step(first_step())


@op(ins={"start": In(Nothing)})
def step_loops(config: FileConfig) -> None:
    """A step that loops until it is revoked."""
    _append(config.path, f"started {os.getpid()}")
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.05)


@job(executor_def=taskiq_executor)
def stepped_looping_job() -> None:
    step_loops(start=first_step())


defs = Definitions(
    jobs=[
        noop_job,
        os_exit_job,
        sys_exit_job,
        looping_job,
        stubborn_job,
        resumable_job,
        stepped_resumable_job,
        stepped_job,
        stepped_looping_job,
    ]
)
