"""Jobs for the operator-command tests (importable by worker processes)."""

from dagster import JobDefinition, job

from dagster_taskiq import taskiq_executor
from dagster_taskiq_tests.scenario_jobs import _tags, hold, probe


@job(executor_def=taskiq_executor)
def held_step_job() -> None:
    """One step that runs until killed, ignoring SIGTERM."""
    hold.alias("held")()


def stranded_job(queue: str) -> JobDefinition:
    """Two steps routed to ``queue`` (the test starts no worker for it)."""

    @job(executor_def=taskiq_executor, name="stranded_job")
    def _job() -> None:
        probe.alias("waiting_a").tag(_tags(queue, 5))()
        probe.alias("waiting_b").tag(_tags(queue, 1))()

    return _job
