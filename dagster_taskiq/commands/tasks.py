"""``dagster-taskiq task show|revoke``: one task's record, and stopping it."""

import json
from typing import Any

import click

from dagster_taskiq.commands.common import (
    UserError,
    connection_options,
    format_time,
    load_settings,
    user_errors,
    with_connection,
)
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import TaskState

#: Kept on a task revoked from the command line; the run's step health check reports it.
REVOKE_REASON = "by an operator with 'dagster-taskiq task revoke'"


@click.group("task")
def task() -> None:
    """Show or revoke one task."""


def _when(timestamp: float | None) -> str | None:
    return format_time(timestamp) if timestamp else None


def task_document(record: TaskRecord) -> dict[str, Any]:
    """What ``task show --json`` prints for ``record``."""
    return {
        "task_id": record.task_id,
        "kind": str(record.kind),
        "run_id": record.run_id,
        "step_key": record.step_key,
        "queue": record.queue,
        "priority": record.priority,
        "state": str(record.state),
        "worker": record.worker,
        "pid": record.pid,
        "attempt": record.deliveries,
        "status": record.status,
        "revoke_reason": record.revoke_reason,
        "submitted_at": _when(record.submitted_at),
        "sent_at": _when(record.sent_at),
        "claimed_at": _when(record.claimed_at),
        "started_at": _when(record.started_at),
        "finished_at": _when(record.finished_at),
        "last_heartbeat": _when(record.last_heartbeat),
        "heartbeat_timeout": record.heartbeat_timeout,
    }


def _unknown(task_id: str) -> UserError:
    return UserError(
        f"No task {task_id} in the key store (never submitted, or its record expired after "
        "config_source.result_ttl). See 'dagster-taskiq status' for the tasks in flight."
    )


@task.command("show")
@connection_options
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
@user_errors
def show_task(
    config_yaml: str | None, broker: str | None, backend: str | None, task_id: str, as_json: bool
) -> None:
    """Show a task: kind, run, step, queue, priority, state, worker, attempt and times."""
    settings = load_settings(config_yaml, broker, backend)
    record = with_connection(settings, lambda conn: conn.keystore.get(task_id))
    if record is None:
        raise _unknown(task_id)
    document = task_document(record)
    if as_json:
        click.echo(json.dumps(document))
        return
    width = max(len(key) for key in document) + 1
    for key, value in document.items():
        click.echo(f"{(key + ':').ljust(width)} {'-' if value is None else value}")


@task.command("revoke")
@connection_options
@click.argument("task_id")
@user_errors
def revoke_task(
    config_yaml: str | None, broker: str | None, backend: str | None, task_id: str
) -> None:
    """Revoke a task: a queued one never starts, a running one has its process stopped.

    Its run reports the step as revoked by an operator.
    """
    settings = load_settings(config_yaml, broker, backend)
    previous = with_connection(
        settings, lambda conn: conn.keystore.revoke(task_id, reason=REVOKE_REASON)
    )
    if previous == "unknown":
        raise _unknown(task_id)
    state = TaskState(previous)
    if state in (TaskState.QUEUED, TaskState.CLAIMED):
        click.echo(f"Revoked task {task_id} (was {state}); it will not start.")
    elif state is TaskState.RUNNING:
        click.echo(f"Revoked task {task_id} (was running); its worker stops its process.")
    else:
        click.echo(f"Task {task_id} is already {state}; nothing to revoke.")
