"""Warning-level engine events, written straight to a run's event log."""

import logging
from collections.abc import Mapping

from dagster import DagsterEventType, DagsterInstance, MetadataValue

from dagster_taskiq.compat import DagsterEvent, DagsterRun, EngineEventData


def report_warning(
    instance: DagsterInstance,
    dagster_run: DagsterRun,
    message: str,
    metadata: Mapping[str, MetadataValue],
    step_key: str | None = None,
) -> DagsterEvent:
    """Store an engine event at WARNING level in ``dagster_run``'s event log (the UI shows it
    with a warning marker); return it."""
    event = DagsterEvent(
        event_type_value=DagsterEventType.ENGINE_EVENT.value,
        job_name=dagster_run.job_name,
        message=message,
        event_specific_data=EngineEventData(metadata=dict(metadata)),
        step_key=step_key,
    )
    instance.report_dagster_event(event, run_id=dagster_run.run_id, log_level=logging.WARNING)
    return event
