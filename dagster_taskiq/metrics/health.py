"""The worker's health probe: a background task on the worker's loop that keeps proving the
key store and the broker answer.

``/healthz`` (served from another thread) only reads :meth:`HealthProbe.healthy`, so it never
touches the worker's loop. If the loop stalls, or Redis or the broker stop answering, the last
successful round trip grows old and the worker reports unhealthy.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from dagster_taskiq.connection import TaskiqConnection

logger = logging.getLogger("dagster_taskiq.worker")

#: Seconds between two probes.
PROBE_INTERVAL = 1.0
#: A worker whose last successful probe is older than this is unhealthy.
STALE_AFTER = 5.0


async def broker_answers(conn: TaskiqConnection, timeout: float) -> None:
    """Raise unless the key store and the broker answer within ``timeout`` seconds.

    Redis (key store, Redis broker) gets a PING; a RabbitMQ broker must hold open connections.
    """
    await asyncio.wait_for(conn.backend_redis.ping(), timeout)
    if conn.broker_redis is not None:
        if conn.broker_redis is not conn.backend_redis:
            await asyncio.wait_for(conn.broker_redis.ping(), timeout)
        return
    for name in ("write_conn", "read_conn"):
        connection = getattr(conn.broker, name, None)
        if connection is not None and not connection.connected.is_set():
            raise ConnectionError(f"the broker's {name} is not connected")


class HealthProbe:
    """Records when the key store and the broker last answered."""

    def __init__(
        self,
        interval: float = PROBE_INTERVAL,
        stale_after: float = STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.stale_after = stale_after
        self.clock = clock
        #: ``clock()`` at the last successful round trip (None before the first one).
        self.last_ok: float | None = None

    def healthy(self) -> bool:
        """Whether the last successful round trip is recent. Safe to call from any thread."""
        last = self.last_ok
        return last is not None and self.clock() - last < self.stale_after

    async def run(self, conn: TaskiqConnection) -> None:
        """Probe every ``interval`` seconds until cancelled."""
        failing = False
        while True:
            try:
                await broker_answers(conn, self.stale_after)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning("Health probe failed (%s); /healthz reports 503.", exc)
                failing = True
            else:
                self.last_ok = self.clock()
                if failing:
                    logger.info("Health probe succeeds again; /healthz reports 200.")
                failing = False
            await asyncio.sleep(self.interval)
