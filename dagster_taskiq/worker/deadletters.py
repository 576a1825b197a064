"""Keep a message the worker will not run aside, with a one-line reason."""

import contextlib
import logging

from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.retry import retrying

logger = logging.getLogger("dagster_taskiq.worker")


async def dead_letter(
    conn: TaskiqConnection, worker: str, reason: str, data: bytes, task_id: str | None = None
) -> None:
    """Log ``reason`` and keep ``data`` in the capped dead-letter list (``dead_letter_max``).

    Errors are logged, never raised: a refused message must not stop the worker.
    """
    logger.warning("Rejected a message to the dead-letter list: %s", reason)
    keep = int(conn.settings.option("dead_letter_max", 1000))
    with contextlib.suppress(Exception):
        await retrying(
            "keeping a dead letter",
            lambda: conn.keystore.dead_letter(reason, data, worker, keep, task_id),
            timeout=conn.reconnect_timeout,
        )
