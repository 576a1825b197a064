"""Record a run's cancellation when no run process is left to record it itself."""

import logging

from dagster import DagsterInstance

logger = logging.getLogger("dagster_taskiq")


def cancel_unfinished_run(
    instance: DagsterInstance, run_id: str, worker: str | None, message: str | None = None
) -> bool:
    """Mark a run CANCELED if it has not finished; returns whether it did.

    Used when no run process is left to record its own cancellation: the run was revoked while
    queued, its worker is gone, or its process had to be killed after the grace period.
    """
    try:
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        instance.report_run_canceled(
            run,
            message=message
            or (
                f"Run {run_id} was terminated; its process on taskiq worker {worker} stopped "
                "before it could record the cancellation."
            ),
        )
        return True
    except Exception:
        logger.exception("Could not mark run %s as canceled.", run_id)
        return False
