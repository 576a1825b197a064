"""Rehearse, once per run in the worker's parent, what each step's process would do first.

A step's process is forked from the warm worker, so whatever the parent has done once, every
child inherits for free. Several costs of a step are paid on *first use in a process* and were
therefore paid again by every child:

* SQLAlchemy compiles each statement the first time an engine runs it (the event insert, the
  step-statistics query behind Dagster's ``verify_step``);
* Dagster's record types compile their checked constructors on first instantiation, and
  serdes builds its (de)serializers on first use;
* the console logger of a step's log manager compiles its format regular expressions.

The rehearsal does each of these once in the parent, while the run's plan is prepared, without
changing anything: the step-statistics query is a read, and the event insert runs inside a
transaction that is rolled back (SQLite storage, whose per-run engines children inherit). On a
loaded two-core machine this took about a third off the time from a step's fork to its first
event. A failed rehearsal only means the child pays those costs itself.
"""

import logging
import time

from dagster import DagsterEventType, DagsterInstance, EventLogEntry, MetadataValue

from dagster_taskiq.compat import (
    DagsterEvent,
    DagsterRun,
    EngineEventData,
    ExecutionPlan,
    create_context_free_log_manager,
)
from dagster_taskiq.storage_connections import rehearse_event_insert

logger = logging.getLogger("dagster_taskiq.worker")


def rehearse_step_process(
    instance: DagsterInstance, dagster_run: DagsterRun, plan: ExecutionPlan
) -> None:
    """Warm this process's first-use caches for the steps of ``dagster_run`` (see module)."""
    try:
        create_context_free_log_manager(instance, dagster_run)
        step_keys = [step.key for step in plan.steps][:1]
        instance.get_run_step_stats(dagster_run.run_id, step_keys=step_keys)
        rehearse_event_insert(instance, rehearsal_event(dagster_run, step_keys))
    except Exception:
        logger.debug("Rehearsal of run %s failed.", dagster_run.run_id, exc_info=True)


def rehearsal_event(dagster_run: DagsterRun, step_keys: list[str]) -> EventLogEntry:
    """An event shaped like the step-worker-started event a step's process writes first."""
    step_key = step_keys[0] if step_keys else None
    return EventLogEntry(
        error_info=None,
        level=logging.DEBUG,
        user_message="",
        run_id=dagster_run.run_id,
        timestamp=time.time(),
        step_key=step_key,
        job_name=dagster_run.job_name,
        dagster_event=DagsterEvent(
            event_type_value=DagsterEventType.STEP_WORKER_STARTED.value,
            job_name=dagster_run.job_name,
            message="rehearsal (never stored)",
            event_specific_data=EngineEventData(
                metadata={
                    "worker": MetadataValue.text("rehearsal"),
                    "queue_wait_seconds": MetadataValue.float(0.0),
                }
            ),
            step_key=step_key,
        ),
    )
