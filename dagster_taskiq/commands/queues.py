"""``dagster-taskiq queue purge``: empty a queue, revoking the tasks that waited in it."""

from typing import Any

import click

from dagster_taskiq.commands.common import (
    connection_options,
    load_settings,
    user_errors,
    with_connection,
)
from dagster_taskiq.lifecycle.states import TaskState


def purge_reason(queue: str) -> str:
    """Kept on each task a purge revokes; the run's step health check reports it."""
    return f"queue '{queue}' was purged by an operator with 'dagster-taskiq queue purge'"


@click.group("queue")
def queue_group() -> None:
    """Manage queues."""


async def purge_queue(conn: Any, queue: str) -> tuple[list[str], int]:
    """Revoke every task of ``queue`` that waits for a worker, then empty the queue in the
    broker. Returns the revoked task ids and how many messages the broker dropped.

    Revoking first means a worker that takes one of the messages meanwhile skips it.
    """
    keystore = conn.keystore
    records = await keystore.get_many(await keystore.inflight_ids())
    revoked = []
    for record in records:
        if record.queue == queue and record.state is TaskState.QUEUED:
            previous = await keystore.revoke(record.task_id, reason=purge_reason(queue))
            if previous == TaskState.QUEUED:
                revoked.append(record.task_id)
    dropped = await conn.broker.purge(queue)
    return revoked, int(dropped)


@queue_group.command("purge")
@connection_options
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def purge(
    config_yaml: str | None, broker: str | None, backend: str | None, queue: str, yes: bool
) -> None:
    """Remove every waiting task of QUEUE; their steps are revoked, so their runs fail with
    the reason instead of waiting. Tasks already running are left alone."""
    settings = load_settings(config_yaml, broker, backend)
    if not yes:
        click.confirm(
            f"Remove every waiting task of queue '{queue}' and revoke their steps?", abort=True
        )
    revoked, dropped = with_connection(settings, lambda conn: purge_queue(conn, queue))
    click.echo(
        f"Purged queue '{queue}': revoked {len(revoked)} waiting task(s), removed {dropped} "
        "message(s) from the broker."
    )
