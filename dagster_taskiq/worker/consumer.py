"""The consumer: pull a message from the broker only when a slot is free, and hand it over.

Pulling only with a free slot means a worker never holds a message it cannot start, so a busy
worker leaves waiting tasks to its idle siblings. Broker trouble is waited out with backoff.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.retry import Backoff, short_error
from dagster_taskiq.worker.intake import Intake

logger = logging.getLogger("dagster_taskiq.worker")

#: Waits between two attempts to reach the broker from the consume loop.
RECONNECT_BACKOFF = Backoff(initial=0.5, cap=5.0)
#: Longest wait for one clean-up step (closing the listener) at shutdown.
SHUTDOWN_STEP_TIMEOUT = 5.0


class Consumer:
    """Pulls messages for the worker's queues while slots are free, until asked to stop."""

    def __init__(
        self,
        conn: TaskiqConnection,
        intake: Intake,
        slots: asyncio.Semaphore,
        stopping: asyncio.Event,
    ) -> None:
        self.conn = conn
        self.intake = intake
        self.slots = slots
        self.stopping = stopping
        #: Set once the first pull has been asked of the broker (the worker consumes).
        self.consuming = asyncio.Event()

    async def run(self) -> None:
        """Consume until the worker is asked to stop."""
        failures = 0
        listener = self.conn.broker.listen()
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                acquire: asyncio.Future[Any] = asyncio.ensure_future(self.slots.acquire())
                done, _ = await asyncio.wait({acquire, stop_wait}, return_when="FIRST_COMPLETED")
                if acquire not in done:
                    acquire.cancel()
                    break
                pull: asyncio.Future[Any] = asyncio.ensure_future(listener.__anext__())
                self.consuming.set()
                done, _ = await asyncio.wait({pull, stop_wait}, return_when="FIRST_COMPLETED")
                if pull not in done:
                    pull.cancel()
                    # Bounded: with the broker down, the pull's clean-up may wait for a
                    # reconnection that never comes.
                    await asyncio.wait({pull}, timeout=SHUTDOWN_STEP_TIMEOUT)
                    self.slots.release()
                    break
                try:
                    message = pull.result()
                except Exception as exc:  # broker connection trouble
                    self.slots.release()
                    failures += 1
                    delay = RECONNECT_BACKOFF.delay(failures)
                    logger.warning(
                        "Lost the broker connection (%s); retrying in %.1f s.",
                        short_error(exc),
                        delay,
                    )
                    with contextlib.suppress(BaseException):
                        await bounded(listener.aclose(), SHUTDOWN_STEP_TIMEOUT)
                    if await self._stopped_within(delay):
                        break
                    listener = self.conn.broker.listen()
                    continue
                failures = 0
                try:
                    started = await self.intake.take(message)
                except Exception:
                    logger.exception("Failed to take a message; it stays with the broker.")
                    started = False
                if not started:
                    self.slots.release()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(BaseException):
                await bounded(listener.aclose(), SHUTDOWN_STEP_TIMEOUT)

    async def _stopped_within(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) if the worker is asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True


async def bounded(awaitable: Awaitable[Any], timeout: float) -> None:
    """Await ``awaitable`` for at most ``timeout`` seconds, then give up on it.

    Unlike ``asyncio.wait_for`` (Python 3.11), this does not wait for the cancelled operation to
    finish cancelling, so an operation that ignores cancellation cannot hang shutdown.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise TimeoutError(f"gave up after {timeout} s")
    task.result()
