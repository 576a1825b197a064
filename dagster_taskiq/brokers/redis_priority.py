"""A taskiq broker on Redis with per-queue priority and at-least-once hand-over.

taskiq-redis has no priority, and its stream broker redelivers long healthy tasks. This broker
keeps each queue as a sorted set scored by ``(-priority, submission order)``, so the highest
priority is taken first and ties go in submission order. One Lua script pops the best message
across all the queues a worker serves and parks it in that consumer's *unacked* hash; the message
leaves the hash when the worker acknowledges it (right after it has claimed the task). If the
consumer dies before that, any other consumer puts the message back where it was.
"""

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from redis.asyncio import Redis
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

logger = logging.getLogger("dagster_taskiq.broker")

_SCORE_SCALE = 4294967296  # 2**32: submission order lives below it, priority above it.

# KEYS[1] queue zset, KEYS[2] queue notify list, KEYS[3] sequence counter.
# ARGV: priority, member.
_PUSH = """
local seq = redis.call('INCR', KEYS[3]) % 4294967296
local score = -tonumber(ARGV[1]) * 4294967296 + seq
redis.call('ZADD', KEYS[1], string.format('%.0f', score), ARGV[2])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 63)
return seq
"""

# KEYS[1] unacked hash, KEYS[2] consumer liveness key, KEYS[3..] queue zsets.
# ARGV: token, liveness ttl ms.
_POP = """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
local best_key, best_score, best_text, best_member = nil, nil, nil, nil
for i = 3, #KEYS do
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if head[1] then
    local score = tonumber(head[2])
    if best_score == nil or score < best_score then
      best_key, best_score, best_text, best_member = KEYS[i], score, head[2], head[1]
    end
  end
end
if not best_key then return false end
redis.call('ZREM', best_key, best_member)
redis.call('HSET', KEYS[1], ARGV[1] .. ':q', best_key, ARGV[1] .. ':s', best_text,
           ARGV[1] .. ':m', best_member)
local more = 0
for i = 3, #KEYS do more = more + redis.call('ZCARD', KEYS[i]) end
return {best_member, more}
"""

# KEYS[1] unacked hash. ARGV: token.
_ACK = """
redis.call('HDEL', KEYS[1], ARGV[1] .. ':q', ARGV[1] .. ':s', ARGV[1] .. ':m')
return 1
"""

# KEYS[1] unacked hash of a dead consumer. Put every parked message back in its queue.
_RESTORE = """
local entries = redis.call('HGETALL', KEYS[1])
local parked = {}
for i = 1, #entries, 2 do
  local field, value = entries[i], entries[i + 1]
  local token, kind = string.match(field, '^(.*):(%a)$')
  if token then
    parked[token] = parked[token] or {}
    parked[token][kind] = value
  end
end
local restored = 0
for token, item in pairs(parked) do
  if item.q and item.s and item.m then
    redis.call('ZADD', item.q, item.s, item.m)
    redis.call('LPUSH', item.q .. ':notify', '1')
    restored = restored + 1
  end
end
redis.call('DEL', KEYS[1])
return restored
"""


def _honour_swallowed_cancel() -> None:
    """Raise CancelledError if this task was cancelled while redis-py finished a command.

    redis-py completes a command that a cancellation interrupts right after it was sent, and
    returns normally; without this check the listen loop would never see the cancellation.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class RedisPriorityBroker(AsyncBroker):
    """Redis broker with priority lanes per queue and crash-safe hand-over to workers.

    :param redis: a client bound to the loop this broker runs on.
    :param prefix: prefix of every key this broker writes.
    :param default_queue: queue for messages without a ``queue_name`` label.
    :param listen_queues: queues this broker consumes from (workers only).
    :param consumer: unique name of this consumer (workers only).
    :param liveness_ttl: seconds after which a silent consumer's parked messages are restored.
    :param poll_timeout: longest blocking wait for new messages, in seconds.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        default_queue: str,
        listen_queues: Sequence[str] = (),
        consumer: str | None = None,
        liveness_ttl: float = 10.0,
        poll_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.redis = redis
        self.prefix = prefix
        self.default_queue = default_queue
        self.listen_queues = list(listen_queues)
        self.consumer = consumer or secrets.token_hex(8)
        self.liveness_ttl = liveness_ttl
        self.poll_timeout = poll_timeout
        self._push = redis.register_script(_PUSH)
        self._pop = redis.register_script(_POP)
        self._ack = redis.register_script(_ACK)
        self._restore = redis.register_script(_RESTORE)
        self._last_recovery = 0.0

    def queue_key(self, queue: str) -> str:
        """Sorted set that holds the messages waiting in ``queue``."""
        return f"{self.prefix}:q:{queue}"

    @property
    def _unacked_key(self) -> str:
        return f"{self.prefix}:unacked:{self.consumer}"

    def _consumer_key(self, consumer: str) -> str:
        return f"{self.prefix}:consumer:{consumer}"

    async def kick(self, message: BrokerMessage) -> None:
        """Add ``message`` to its queue at its priority."""
        queue = str(message.labels.get("queue_name") or self.default_queue)
        priority = int(message.labels.get("priority") or 0)
        key = self.queue_key(queue)
        await self._push(
            keys=[key, f"{key}:notify", f"{self.prefix}:seq"], args=[priority, message.message]
        )

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield messages, best priority first across all listened queues, one per pull."""
        if not self.listen_queues:
            raise RuntimeError("RedisPriorityBroker.listen() needs listen_queues")
        queue_keys = [self.queue_key(q) for q in self.listen_queues]
        notify_keys = [f"{k}:notify" for k in queue_keys]
        while True:
            _honour_swallowed_cancel()
            await self.recover_dead_consumers()
            token = secrets.token_hex(8)
            popped = await self._pop(
                keys=[self._unacked_key, self._consumer_key(self.consumer), *queue_keys],
                args=[token, int(self.liveness_ttl * 1000)],
            )
            if popped:
                member, remaining = popped
                if remaining:
                    # Wake a sibling consumer so it does not wait out its poll timeout.
                    await self.redis.lpush(notify_keys[0], "1")
                # A message popped for a cancelled pull stays parked; shutdown() restores it.
                _honour_swallowed_cancel()
                yield AckableMessage(data=member, ack=self._acker(token))
                continue
            await self.redis.blpop(notify_keys, timeout=self.poll_timeout)

    def _acker(self, token: str) -> Any:
        async def ack() -> None:
            await self._ack(keys=[self._unacked_key], args=[token])

        return ack

    async def keep_alive(self) -> None:
        """Refresh this consumer's liveness key (call it from the worker's heartbeat)."""
        await self.redis.set(
            self._consumer_key(self.consumer), "1", px=int(self.liveness_ttl * 1000)
        )

    async def recover_dead_consumers(self, min_interval: float = 2.0) -> int:
        """Put messages parked by consumers that stopped refreshing their liveness back in line."""
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_recovery < min_interval:
            return 0
        self._last_recovery = loop_time
        restored = 0
        async for key in self.redis.scan_iter(match=f"{self.prefix}:unacked:*", count=200):
            name = key.decode() if isinstance(key, bytes) else str(key)
            consumer = name.rsplit(":", 1)[-1]
            if consumer == self.consumer or await self.redis.exists(self._consumer_key(consumer)):
                continue
            count = int(await self._restore(keys=[name]))
            if count:
                logger.warning(
                    "Restored %d message(s) that consumer %s took but never acknowledged.",
                    count,
                    consumer,
                )
            restored += count
        return restored

    async def waiting_by_priority(self, queue: str) -> dict[int, int]:
        """How many messages wait in ``queue``, by priority."""
        counts: dict[int, int] = {}
        async for _member, score in self.redis.zscan_iter(self.queue_key(queue)):
            priority = -int(score // _SCORE_SCALE)
            counts[priority] = counts.get(priority, 0) + 1
        return counts

    async def known_queues(self) -> list[str]:
        """Names of queues that have, or had, waiting messages."""
        names = set()
        pattern = f"{self.prefix}:q:*"
        async for key in self.redis.scan_iter(match=pattern, count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            if name.endswith(":notify"):
                continue
            names.add(name[len(self.prefix) + 3 :])
        return sorted(names)

    async def shutdown(self) -> None:
        """Hand back anything parked by this consumer, then close."""
        if self.listen_queues:
            await self._restore(keys=[self._unacked_key])
            await self.redis.delete(self._consumer_key(self.consumer))
        await super().shutdown()
