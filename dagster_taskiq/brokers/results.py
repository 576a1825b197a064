"""The taskiq result backend: taskiq's JSON result format, kept in the key store's Redis.

It shares the key store's client (plain or Sentinel, see :mod:`dagster_taskiq.redis_clients`)
instead of opening a pool of its own, so it follows a failover with the rest. Values are JSON
(:class:`~taskiq.serializers.JSONSerializer`), never pickle, and a read never rebuilds the
``error`` field into an exception object.
"""

import json
from typing import Any

from redis.asyncio import Redis
from taskiq import AsyncResultBackend, TaskiqResult
from taskiq.exceptions import ResultGetError
from taskiq.serializers import JSONSerializer

from dagster_taskiq.lifecycle.keys import KeySpace


class KeyStoreResultBackend(AsyncResultBackend[Any]):
    """Results under ``KeySpace.result(task_id)``, expiring after ``ttl`` seconds.

    The client belongs to the caller (:class:`~dagster_taskiq.connection.TaskiqConnection`),
    which closes it; :meth:`shutdown` leaves it open.
    """

    def __init__(self, client: Redis, keys: KeySpace, ttl: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self.serializer = JSONSerializer()

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        """Store ``result`` as JSON for ``ttl`` seconds."""
        value = self.serializer.dumpb(result.model_dump(mode="json"))
        await self.client.set(self.keys.result(task_id), value, ex=self.ttl)

    async def is_result_ready(self, task_id: str) -> bool:
        """Whether a result is stored for ``task_id``."""
        return bool(await self.client.exists(self.keys.result(task_id)))

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        """The stored result, read as plain JSON; the ``error`` field is left out."""
        raw = await self.client.get(self.keys.result(task_id))
        if raw is None:
            # taskiq's contract for a missing result (it expired, or was never written).
            raise ResultGetError()
        value = json.loads(raw)
        value.pop("error", None)
        if not with_logs:
            value["log"] = None
        return TaskiqResult.model_validate(value)
