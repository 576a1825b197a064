"""Carry out what :func:`~dagster_taskiq.lifecycle.health.assess` asks for, and sweep due tasks.

Nothing here waits on a timer of its own: the step handler and the launcher recover the tasks they
check, and every worker runs :func:`sweep` every few seconds in a task of its own (never in its
heartbeat). A sweep reads only the tasks that are due (a sorted set scored by when each task next
needs a look), so its cost does not grow with the keyspace or with the number of tasks in flight.
"""

import dataclasses
import logging
import time
from typing import Protocol

from dagster_taskiq.lifecycle.health import Action, Assessment, Health, assess
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.retry import TRANSIENT_ERRORS, short_error
from dagster_taskiq.lifecycle.store import TaskStore

logger = logging.getLogger("dagster_taskiq")

#: How many due tasks one sweep takes at most.
SWEEP_BATCH = 100
#: How long a task a sweeper took is hidden from other sweepers (it is due again after that).
SWEEP_LOOK_AGAIN_AFTER = 5.0


class MessageSender(Protocol):
    """What recovery needs from the broker: send a registered message, and look for it."""

    async def send_registered(self, record: TaskRecord, message: bytes) -> None:
        """Send ``message`` (the task's registered body) to the task's queue and priority."""

    async def holds(self, record: TaskRecord, message: bytes) -> bool | None:
        """Whether the broker still holds the message (waiting, or with a live consumer).

        None when the broker cannot tell (RabbitMQ: publisher confirms are the guarantee).
        """


@dataclasses.dataclass
class SweepReport:
    """What one sweep did."""

    looked_at: int = 0
    sent: int = 0
    released: int = 0
    lost: int = 0
    forgotten: int = 0


async def send_again(store: TaskStore, sender: MessageSender, record: TaskRecord) -> bool:
    """Send a queued task's registered message and mark it sent; False if that failed.

    Duplicates are harmless: a claim lets one copy run, and the rest are dropped.
    """
    message = await store.message(record.task_id)
    if message is None:
        return False
    try:
        await sender.send_registered(record, message)
    except TRANSIENT_ERRORS as exc:
        logger.warning(
            "Could not send task %s (%s) to queue '%s' again (%s); it stays queued and is sent "
            "again on a later sweep.",
            record.task_id,
            record.what,
            record.queue,
            short_error(exc),
        )
        return False
    await store.mark_sent(record.task_id, record.heartbeat_timeout, fence=record.fence)
    return True


async def recover(
    store: TaskStore,
    sender: MessageSender,
    record: TaskRecord,
    now: float | None = None,
    report: SweepReport | None = None,
    recheck: bool = True,
) -> Assessment:
    """Assess ``record`` and carry out its action (send, release, look for it, mark it lost).

    A verdict of "lost" stands only if the mark-lost transition took effect: a record read while
    its worker finished it (or renewed its lease) can look lost without being so. Then the task
    is read and judged again once (``recheck``).
    """
    now = time.time() if now is None else now
    report = report if report is not None else SweepReport()
    verdict = assess(record, now)
    action = verdict.action
    if action is Action.SEND:
        logger.warning(
            "Task %s (%s) was registered but never reached queue '%s'; sending it again.",
            record.task_id,
            record.what,
            record.queue,
        )
        report.sent += await send_again(store, sender, record)
    elif action is Action.CHECK_PRESENCE:
        message = await store.message(record.task_id)
        held = None if message is None else await sender.holds(record, message)
        if held is False:
            logger.warning(
                "Task %s (%s) is queued but its message is on no queue and with no live "
                "consumer; sending it again to queue '%s'.",
                record.task_id,
                record.what,
                record.queue,
            )
            report.sent += await send_again(store, sender, record)
        else:
            await store.mark_sent(record.task_id, record.heartbeat_timeout, fence=record.fence)
    elif action is Action.RELEASE:
        if await store.release(record.task_id, record.heartbeat_timeout, now=now):
            report.released += 1
            logger.warning(
                "Task %s (%s) was claimed by worker %s, which went away before starting it; "
                "sending it to queue '%s' again.",
                record.task_id,
                record.what,
                record.worker,
                record.queue,
            )
            released = dataclasses.replace(record, sent_at=None, worker=None)
            report.sent += await send_again(store, sender, released)
            return dataclasses.replace(verdict, health=Health.WAITING, action=Action.RELEASE)
    elif action is Action.MARK_LOST:
        if await store.mark_lost(record.task_id, now=now):
            report.lost += 1
            logger.warning("%s", verdict.message)
        elif recheck:
            # The script refused: between the read and it, the lease was renewed or the task
            # moved on (its worker finished it, it was revoked or already marked). A task is
            # lost only when the script says so; judge it again from a fresh read.
            fresh = await store.get(record.task_id)
            if fresh is not None:
                return await recover(store, sender, fresh, report=report, recheck=False)
        else:
            return Assessment(
                Health.RUNNING,
                Action.NONE,
                f"The lease of {record.task_id} ({record.what}) changed while it was checked; "
                "it is checked again on the next round.",
            )
    return verdict


async def sweep(
    store: TaskStore,
    sender: MessageSender,
    now: float | None = None,
    limit: int = SWEEP_BATCH,
) -> SweepReport:
    """Look at the tasks that are due and recover each; finished ones leave the due index."""
    now = time.time() if now is None else now
    report = SweepReport()
    ids = await store.take_due(limit, SWEEP_LOOK_AGAIN_AFTER, now=now)
    if not ids:
        return report
    records = await store.get_many(ids)
    found = {record.task_id for record in records}
    for task_id in ids:
        if task_id not in found:
            await store.forget(task_id)
            report.forgotten += 1
    for record in records:
        report.looked_at += 1
        verdict = await recover(store, sender, record, now, report)
        if verdict.action is Action.FORGET:
            await store.forget(record.task_id)
            report.forgotten += 1
    return report
