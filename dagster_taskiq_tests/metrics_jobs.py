"""A job for the metrics tests: one step succeeds, one fails, one waits to be revoked."""

import time
from pathlib import Path

from dagster import Config, job, op

from dagster_taskiq import taskiq_executor


@op
def succeeds() -> int:
    """Returns at once."""
    return 1


@op
def fails() -> int:
    """Raises."""
    raise RuntimeError("this step fails on purpose")


class MarkerConfig(Config):
    """Where the waiting step marks that it has started."""

    marker: str


@op
def waits_for_revoke(config: MarkerConfig) -> int:
    """Marks that it started, then runs until its task is revoked (or two minutes pass)."""
    Path(config.marker).write_text("started")
    time.sleep(120)
    return 1


@job(executor_def=taskiq_executor)
def mixed_outcomes_job() -> None:
    """Three independent steps: a success, a failure and (once revoked) a revoked step."""
    succeeds()
    fails()
    waits_for_revoke()
