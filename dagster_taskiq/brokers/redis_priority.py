"""A taskiq broker on Redis with per-queue priority and at-least-once hand-over.

taskiq-redis has no priority, and its stream broker redelivers long healthy tasks. This broker
keeps each queue as a sorted set scored by ``(-priority, submission order)``, so the highest
priority is taken first and ties go in submission order. One Lua script pops the best message
across all the queues a worker serves and parks it in that consumer's *unacked* hash under a fresh
token; the message leaves the hash when the worker acknowledges it (right after it has claimed the
task). Every key name comes from :class:`~dagster_taskiq.lifecycle.keys.KeySpace`.

What puts a parked message back in its queue (same score, so it keeps its place):

* another consumer's :meth:`RedisPriorityBroker.recover_dead_consumers`, once the owner's liveness
  key has expired. Consumers are found through the consumer registry set, never by scanning the
  keyspace, so the periodic work costs O(number of consumers) whatever else the database holds;
* the owner's own :meth:`RedisPriorityBroker.restore_strays`, for tokens it no longer holds in
  memory: a pop whose reply was lost (socket timeout, cancellation) and a message that was yielded
  by :meth:`RedisPriorityBroker.listen` and then dropped without being acknowledged;
* the owner's :meth:`RedisPriorityBroker.shutdown`.
"""

import asyncio
import logging
import secrets
import weakref
from collections.abc import AsyncGenerator, Sequence

from redis.asyncio import Redis
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from dagster_taskiq.brokers.delivery import Delivery
from dagster_taskiq.lifecycle.keys import INDEX_TTL_SECONDS, KeySpace

logger = logging.getLogger("dagster_taskiq.broker")

_SCORE_SCALE = 4294967296  # 2**32: submission order lives below it, priority above it.
#: Shortest time between two :meth:`RedisPriorityBroker.restore_strays` runs from ``keep_alive``.
STRAY_CHECK_INTERVAL = 2.0
#: Seconds between two refreshes of the consumer registry's TTL by one consumer (the TTL lasts
#: days; it is also set whenever a consumer joins the registry).
REGISTRY_REFRESH_INTERVAL = 60.0

# A parked message is four fields of the unacked hash, all named TOKEN:<letter>:
#   q  the queue's zset key   s  its score there   m  the message   n  the queue's notify list
# (entries parked by older versions have no ``n``; they are put back without a wake-up).
_FIELD_SUFFIXES = ("q", "s", "m", "n")

# Wake one consumer blocked on a queue's notify list. The list is capped at 64 entries, and it
# gets its TTL when it is created: it is drained by the consumers' pops, so it rarely lives long.
_NOTIFY = (
    """
local function notify(n)
  local length = redis.call('LPUSH', n, '1')
  if length == 1 then
    redis.call('EXPIRE', n, """
    + str(INDEX_TTL_SECONDS)
    + """)
  elseif length > 64 then
    redis.call('LTRIM', n, 0, 63)
  end
end
"""
)

# Shared Lua helpers: put one parked message back, and put back or drop a whole hash.
_LUA_HELPERS = (
    _NOTIFY
    + """
local function put_back(q, s, m, n)
  redis.call('ZADD', q, s, m)
  if n then notify(n) end
end

local function drop_fields(hash, token)
  redis.call('HDEL', hash, token .. ':q', token .. ':s', token .. ':m', token .. ':n')
end

-- Put back every complete entry of ``hash`` except the tokens in ``drop`` (a set), then delete
-- the hash. Returns how many messages went back.
local function put_back_all(hash, drop)
  local entries = redis.call('HGETALL', hash)
  local parked = {}
  for i = 1, #entries, 2 do
    local token, kind = string.match(entries[i], '^(.*):(%a)$')
    if token then
      parked[token] = parked[token] or {}
      parked[token][kind] = entries[i + 1]
    end
  end
  local restored = 0
  for token, item in pairs(parked) do
    if not drop[token] and item.q and item.s and item.m then
      put_back(item.q, item.s, item.m, item.n)
      restored = restored + 1
    end
  end
  redis.call('DEL', hash)
  return restored
end
"""
)

# KEYS[1] queue zset, KEYS[2] queue notify list, KEYS[3] sequence, KEYS[4] queue registry set.
# ARGV: priority, member, queue name, index ttl (s). Returns 1 if added, 0 if these exact bytes
# already waited (their place in line is kept and nobody is woken).
# The sequence and the registry get their TTL when they are created and every 1024th push (so
# they expire about ``index ttl`` after the last use, as before, for a fraction of the commands).
_PUSH = (
    _NOTIFY
    + """
local counter = redis.call('INCR', KEYS[3])
local refresh = counter % 1024 == 1
if redis.call('SADD', KEYS[4], ARGV[3]) == 1 or refresh then
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
if refresh then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
local seq = counter % 4294967296
local score = -tonumber(ARGV[1]) * 4294967296 + seq
local added = redis.call('ZADD', KEYS[1], 'NX', string.format('%.0f', score), ARGV[2])
if added == 1 then notify(KEYS[2]) end
return added
"""
)

# KEYS[1] unacked hash, KEYS[2] consumer liveness key, KEYS[3] consumer registry set,
# KEYS[4 .. 3+n] queue zsets, KEYS[4+n .. 3+2n] their notify lists (same order).
# ARGV: token, liveness ttl ms, consumer name, index ttl (s). Returns {message, queue zset key}, or
# false if all are empty.
# When messages remain, one notify list of a non-empty queue is pushed to wake a sibling.
# Idempotent per token: if a message is already parked under the token (the client retried a pop
# whose reply was lost), that message is returned again and nothing else is popped; otherwise
# the retry would overwrite the entry and lose the first message.
_POP = (
    _NOTIFY
    + """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if redis.call('SADD', KEYS[3], ARGV[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
local already = redis.call('HGET', KEYS[1], ARGV[1] .. ':m')
if already then return {already, redis.call('HGET', KEYS[1], ARGV[1] .. ':q')} end
local n = (#KEYS - 3) / 2
local best, best_score, best_text, best_member = nil, nil, nil, nil
for i = 4, 3 + n do
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if head[1] then
    local score = tonumber(head[2])
    if best_score == nil or score < best_score then
      best, best_score, best_text, best_member = i, score, head[2], head[1]
    end
  end
end
if not best then return false end
redis.call('ZREM', KEYS[best], best_member)
local t = ARGV[1]
redis.call('HSET', KEYS[1], t .. ':q', KEYS[best], t .. ':s', best_text, t .. ':m', best_member,
           t .. ':n', KEYS[best + n])
for i = 4, 3 + n do
  if redis.call('ZCARD', KEYS[i]) > 0 then
    notify(KEYS[i + n])
    break
  end
end
return {best_member, KEYS[best]}
"""
)

# KEYS[1] unacked hash. ARGV: token.
_ACK = (
    _LUA_HELPERS
    + """
drop_fields(KEYS[1], ARGV[1])
return 1
"""
)

# KEYS[1] this consumer's unacked hash. ARGV[1] = r, then r tokens to put back, then tokens to
# drop (acknowledgements whose reply was lost). A token whose entry is gone or incomplete (acked
# or recovered meanwhile) is skipped. Returns how many messages went back.
_RESOLVE = (
    _LUA_HELPERS
    + """
local r = tonumber(ARGV[1])
local restored = 0
for i = 2, #ARGV do
  local t = ARGV[i]
  if i <= r + 1 then
    local v = redis.call('HMGET', KEYS[1], t .. ':q', t .. ':s', t .. ':m', t .. ':n')
    if v[1] and v[2] and v[3] then
      put_back(v[1], v[2], v[3], v[4])
      restored = restored + 1
    end
  end
  drop_fields(KEYS[1], t)
end
return restored
"""
)

# KEYS[1] a consumer's unacked hash, KEYS[2] its liveness key, KEYS[3] consumer registry set.
# ARGV[1] consumer name, ARGV[2] '1' to act only if the consumer is dead (liveness key absent),
# ARGV[3..] tokens to drop instead of putting back. Puts back every other parked message, deletes
# the hash and the liveness key, and removes the consumer from the registry. Returns how many
# messages went back, or -1 if the consumer was alive and nothing was done.
_RETIRE = (
    _LUA_HELPERS
    + """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
local restored = put_back_all(KEYS[1], drop)
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return restored
"""
)

# KEYS[1] queue zset, KEYS[2] consumer registry set. ARGV: member, unacked key prefix, liveness
# key prefix (a consumer's keys are prefix .. name). Returns 1 if the member waits in the queue or
# is parked by a live registered consumer.
# The per-consumer keys are built here instead of declared in KEYS; on a Redis Cluster this is
# safe only because all of a deployment's keys share one hash tag (TaskiqSettings.key_prefix).
_HOLDS = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[3] .. name) == 1 then
    local entries = redis.call('HGETALL', ARGV[2] .. name)
    for i = 1, #entries, 2 do
      if entries[i + 1] == ARGV[1] and string.sub(entries[i], -2) == ':m' then return 1 end
    end
  end
end
return 0
"""

# KEYS[1] queue zset. Empties it at once; returns how many messages it held.
_PURGE = """
local count = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1])
return count
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Acker:
    """The ``ack`` of one yielded message; releases the token if dropped without being called."""

    def __init__(self, broker: "RedisPriorityBroker", token: str) -> None:
        self._broker = broker
        self._token = token
        # No reference back to self: called when this object is collected (a no-op after ack).
        weakref.finalize(self, broker._held.discard, token)

    async def __call__(self) -> None:
        await self._broker._acknowledge(self._token)


class RedisPriorityBroker(AsyncBroker):
    """Redis broker with priority lanes per queue and crash-safe hand-over to workers.

    A consumer keeps in memory the tokens of the messages it has popped and not yet resolved
    (*held* tokens). A token is held from just before its pop is sent until the message is
    acknowledged. It is released earlier if the pop fails (its reply, and so the message, is lost
    to this process), if the pull is cancelled before the message is yielded, or if the yielded
    :class:`~taskiq.AckableMessage` is garbage-collected without its ``ack`` having been called
    (the caller dropped it). Parked messages whose token is not held are put back by
    :meth:`restore_strays`, which :meth:`keep_alive` runs at most every
    :data:`STRAY_CHECK_INTERVAL` seconds. A caller that keeps a message and never acknowledges
    it keeps it parked until :meth:`shutdown` or until this consumer stops refreshing its liveness.

    :param redis: a client bound to the loop this broker runs on.
    :param prefix: prefix of every key this broker writes (see :class:`KeySpace`).
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
        self.keys = KeySpace(prefix)
        self.default_queue = default_queue
        self.listen_queues = list(listen_queues)
        self.consumer = consumer or secrets.token_hex(8)
        self.liveness_ttl = liveness_ttl
        self.poll_timeout = poll_timeout
        self._push = redis.register_script(_PUSH)
        self._pop = redis.register_script(_POP)
        self._ack = redis.register_script(_ACK)
        self._resolve = redis.register_script(_RESOLVE)
        self._retire = redis.register_script(_RETIRE)
        self._holds = redis.register_script(_HOLDS)
        self._purge = redis.register_script(_PURGE)
        self._last_recovery = float("-inf")
        self._last_stray_check = float("-inf")
        #: Loop time of the last liveness refresh (by a pop or by :meth:`_register`).
        self._liveness_refreshed_at = float("-inf")
        self._registry_refreshed_at = float("-inf")
        #: Tokens of popped messages not yet resolved; their parked entries must stay parked.
        self._held: set[str] = set()
        #: Tokens whose acknowledgement failed (it may or may not have reached Redis); their
        #: parked entries are dropped, not put back, by the next :meth:`restore_strays`.
        self._unconfirmed_acks: set[str] = set()

    def queue_key(self, queue: str) -> str:
        """Sorted set that holds the messages waiting in ``queue``."""
        return self.keys.queue(queue)

    @property
    def _unacked_key(self) -> str:
        return self.keys.unacked(self.consumer)

    @property
    def _alive_key(self) -> str:
        return self.keys.consumer_alive(self.consumer)

    @property
    def _liveness_ms(self) -> int:
        return max(1, int(self.liveness_ttl * 1000))

    async def kick(self, message: BrokerMessage) -> None:
        """Add ``message`` to its queue at its priority.

        Idempotent while the message waits: if exactly these bytes are already in the queue, the
        waiting copy keeps its place and no second copy is added.
        """
        queue = str(message.labels.get("queue_name") or self.default_queue)
        priority = int(message.labels.get("priority") or 0)
        await self._push(
            keys=[
                self.keys.queue(queue),
                self.keys.queue_notify(queue),
                self.keys.sequence,
                self.keys.queues,
            ],
            args=[priority, message.message, queue, INDEX_TTL_SECONDS],
        )

    async def _register(self) -> None:
        """Refresh this consumer's liveness key and make sure it is in the consumer registry
        (whose TTL is renewed when the consumer joins it, and at most once a minute)."""
        now = asyncio.get_running_loop().time()
        refresh_registry = now - self._registry_refreshed_at >= REGISTRY_REFRESH_INTERVAL
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._alive_key, "1", px=self._liveness_ms)
            pipe.sadd(self.keys.consumers, self.consumer)
            if refresh_registry:
                pipe.expire(self.keys.consumers, INDEX_TTL_SECONDS)
            results = await pipe.execute()
        if results[1] and not refresh_registry:
            await self.redis.expire(self.keys.consumers, INDEX_TTL_SECONDS)
        if refresh_registry:
            self._registry_refreshed_at = now
        self._liveness_refreshed_at = now

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield messages, best priority first across all listened queues, one per pull.

        Each is a :class:`~dagster_taskiq.brokers.delivery.Delivery` naming its queue.

        Each message stays parked under this consumer until its ``ack`` is awaited; see the class
        docstring for what happens to messages that are never acknowledged.
        """
        if not self.listen_queues:
            raise RuntimeError("RedisPriorityBroker.listen() needs listen_queues")
        queue_keys = [self.keys.queue(q) for q in self.listen_queues]
        queue_names = {key: name for key, name in zip(queue_keys, self.listen_queues, strict=True)}
        notify_keys = [self.keys.queue_notify(q) for q in self.listen_queues]
        pop_keys = [
            self._unacked_key,
            self._alive_key,
            self.keys.consumers,
            *queue_keys,
            *notify_keys,
        ]
        await self._register()
        while True:
            _honour_swallowed_cancel()
            await self.recover_dead_consumers()
            token = secrets.token_hex(8)
            # Held before the pop is sent, so restore_strays never takes a message in flight.
            self._held.add(token)
            try:
                pop_sent_at = asyncio.get_running_loop().time()
                popped = await self._pop(
                    keys=pop_keys,
                    args=[token, self._liveness_ms, self.consumer, INDEX_TTL_SECONDS],
                )
                self._liveness_refreshed_at = pop_sent_at
                # A message popped for a cancelled pull is never yielded: release its token so
                # restore_strays puts it back.
                _honour_swallowed_cancel()
            except BaseException:
                # The pop may have run without its reply reaching us: the token is released and
                # restore_strays puts any message parked under it back in line.
                self._held.discard(token)
                raise
            if popped is None:
                self._held.discard(token)
                await self.redis.blpop(notify_keys, timeout=self.poll_timeout)
                continue
            member, queue_key = popped
            yield Delivery(
                data=member,
                ack=_Acker(self, token),
                queue=queue_names.get(_text(queue_key or b"")),
            )

    async def _acknowledge(self, token: str) -> None:
        """Drop the parked entry of ``token``; release the token only once Redis confirmed it."""
        try:
            await self._ack(keys=[self._unacked_key], args=[token])
        except BaseException:
            # The ack may or may not have run: remember to drop the entry, never to put it back.
            self._unconfirmed_acks.add(token)
            self._held.discard(token)
            raise
        self._held.discard(token)

    async def keep_alive(self, min_interval: float = 0.0) -> None:
        """Refresh this consumer's liveness and registration (call it from the heartbeat),
        unless a pop or a refresh did within the last ``min_interval`` seconds: an idle consumer
        polls, and each poll refreshes its liveness already.

        At most every :data:`STRAY_CHECK_INTERVAL` seconds it also runs :meth:`restore_strays`.
        """
        now = asyncio.get_running_loop().time()
        if (
            now - self._liveness_refreshed_at >= min_interval
            or now - self._registry_refreshed_at >= REGISTRY_REFRESH_INTERVAL
        ):
            await self._register()
        if now - self._last_stray_check >= STRAY_CHECK_INTERVAL:
            self._last_stray_check = now
            await self.restore_strays()

    async def restore_strays(self) -> int:
        """Put back the messages parked under this consumer whose token it no longer holds.

        These are messages whose pop reply was lost, whose pull was cancelled, or that the caller
        of :meth:`listen` dropped without acknowledging. Each goes back to its queue with its old
        score and wakes the queue's consumers. Entries whose acknowledgement failed are dropped
        instead. Costs one ``HGETALL`` of this consumer's (small) unacked hash, plus one script
        call when something is to be done. Returns how many messages went back.
        """
        unconfirmed_before = set(self._unconfirmed_acks)
        fields = await self.redis.hgetall(self._unacked_key)
        # Every token in this snapshot was popped, and so held, before the snapshot was taken:
        # if it is not held now it has been resolved one way or the other.
        tokens = {_text(field).rsplit(":", 1)[0] for field in fields}
        self._unconfirmed_acks -= unconfirmed_before - tokens
        drop = sorted(tokens & self._unconfirmed_acks)
        strays = sorted(tokens - self._held - self._unconfirmed_acks)
        if not strays and not drop:
            return 0
        restored = int(
            await self._resolve(keys=[self._unacked_key], args=[len(strays), *strays, *drop])
        )
        self._unconfirmed_acks -= set(drop)
        if restored:
            logger.warning(
                "Put back %d message(s) this consumer popped but no longer holds (lost reply, "
                "cancelled pull or dropped message).",
                restored,
            )
        return restored

    async def recover_dead_consumers(self, min_interval: float = 2.0) -> int:
        """Put messages parked by consumers that stopped refreshing their liveness back in line.

        Reads the consumer registry and checks each other consumer's liveness key; for each dead
        one a script puts its parked messages back and removes it from the registry, atomically
        and only if its liveness key is still absent. Costs O(number of registered consumers).

        Does nothing if it last ran less than ``min_interval`` seconds ago. With a positive
        ``min_interval`` the consumers also take turns: one look per ``min_interval`` for the
        whole deployment (whoever first sets the turn key), so the deployment's cost stays
        O(consumers) per interval instead of O(consumers²). Returns how many messages went back.
        """
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_recovery < min_interval:
            return 0
        self._last_recovery = loop_time
        if min_interval > 0 and not await self.redis.set(
            self.keys.recovery_turn, self.consumer, nx=True, px=max(1, int(min_interval * 1000))
        ):
            return 0
        others = sorted(
            name
            for name in map(_text, await self.redis.smembers(self.keys.consumers))
            if name != self.consumer
        )
        if not others:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in others:
                pipe.exists(self.keys.consumer_alive(name))
            alive = await pipe.execute()
        restored = 0
        for name, is_alive in zip(others, alive, strict=True):
            if is_alive:
                continue
            count = int(
                await self._retire(
                    keys=[
                        self.keys.unacked(name),
                        self.keys.consumer_alive(name),
                        self.keys.consumers,
                    ],
                    args=[name, "1"],
                )
            )
            if count > 0:
                logger.warning(
                    "Restored %d message(s) that consumer %s took but never acknowledged.",
                    count,
                    name,
                )
                restored += count
        return restored

    async def holds(self, queue: str, message: bytes) -> bool:
        """Whether exactly ``message`` waits in ``queue`` or is parked by a live consumer.

        Parked means in the unacked hash of a registered consumer whose liveness key exists. A
        message parked by a dead consumer counts as absent (its recovery may still put it back;
        a re-send then merges with it, since a queue never holds the same bytes twice).
        """
        found = await self._holds(
            keys=[self.keys.queue(queue), self.keys.consumers],
            # KeySpace builds a consumer's keys as prefix + name; the script appends the names.
            args=[message, self.keys.unacked(""), self.keys.consumer_alive("")],
        )
        return bool(found)

    async def waiting_by_priority(self, queue: str) -> dict[int, int]:
        """How many messages wait in ``queue``, by priority."""
        counts: dict[int, int] = {}
        async for _member, score in self.redis.zscan_iter(self.keys.queue(queue)):
            priority = -int(score // _SCORE_SCALE)
            counts[priority] = counts.get(priority, 0) + 1
        return counts

    async def purge(self, queue: str) -> int:
        """Remove every message waiting in ``queue`` (not those a consumer already took);
        returns how many."""
        return int(await self._purge(keys=[self.keys.queue(queue)]))

    async def known_queues(self) -> list[str]:
        """Names of queues that have had messages (from the queue registry), sorted."""
        return sorted(_text(name) for name in await self.redis.smembers(self.keys.queues))

    async def shutdown(self) -> None:
        """Hand back everything parked by this consumer, unregister it, then close.

        Messages yielded but not yet acknowledged go back too; entries whose acknowledgement
        failed are dropped. The liveness key is deleted and the name leaves the registry.
        """
        if self.listen_queues:
            await self._retire(
                keys=[self._unacked_key, self._alive_key, self.keys.consumers],
                args=[self.consumer, "0", *sorted(self._unconfirmed_acks)],
            )
            self._held.clear()
            self._unconfirmed_acks.clear()
        await super().shutdown()
