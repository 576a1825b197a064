"""A job whose step prints, and reports the processes its own step process has started."""

import os
import sys

import psutil
from dagster import job, op

from dagster_taskiq import taskiq_executor

STDOUT_TEXT = "log-capture-probe stdout line"
STDERR_TEXT = "log-capture-probe stderr line"


@op
def chatty() -> list[str]:
    """Print to both streams; return the command lines of this process's children (the log
    capture's helpers)."""
    print(STDOUT_TEXT, flush=True)
    print(STDERR_TEXT, file=sys.stderr, flush=True)
    me = psutil.Process(os.getpid())
    return [" ".join(child.cmdline()) for child in me.children()]


@job(executor_def=taskiq_executor)
def chatty_job() -> None:
    chatty()
