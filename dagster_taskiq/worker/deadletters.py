"""Keep a message the worker will not run aside, with a one-line reason."""

import contextlib
import logging

from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.retry import retrying

logger = logging.getLogger("dagster_taskiq.worker")


async def dead_letter(
    conn: TaskiqConnection,
    worker: str,
    reason: str,
    data: bytes,
    task_id: str | None = None,
    queue: str | None = None,
) -> None:
    """Log ``reason`` and keep ``data``, with the ``queue`` it came from, in the capped dead
    letters (``dead_letter_max``).

    Errors are logged, never raised: a refused message must not stop the worker.
    """
    where = f" (from queue '{queue}')" if queue else ""
    logger.warning("Rejected a message to the dead-letter list%s: %s", where, reason)
    keep = int(conn.settings.option("dead_letter_max", 1000))
    with contextlib.suppress(Exception):
        await retrying(
            "keeping a dead letter",
            lambda: conn.keystore.dead_letter(reason, data, worker, keep, task_id, queue),
            timeout=conn.reconnect_timeout,
        )
