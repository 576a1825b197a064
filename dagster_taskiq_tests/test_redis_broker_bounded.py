"""The Redis priority broker against a real Redis: key layout, registries instead of SCAN, lost
pop replies, idempotent re-sends and the presence check a sweeper relies on.

Most tests share the Redis on 127.0.0.1:6379 under a random key prefix of their own (deleted at
teardown). Tests that pause the server or count its commands start a private ``redis-server``.
"""

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, BrokerMessage

from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker
from dagster_taskiq_tests.private_brokers import PrivateRedis

PULL_TIMEOUT = 10.0


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted at teardown."""
    value = f"dt-bounded-{uuid.uuid4().hex[:12]}"
    yield value
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{value}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[Redis]:
    """An asyncio client for ``url``, closed on exit."""
    client = Redis.from_url(url, **options)
    try:
        yield client
    finally:
        await client.aclose()


def make_broker(
    client: Redis,
    prefix: str,
    queues: tuple[str, ...] = ("q",),
    consumer: str | None = None,
    liveness_ttl: float = 30.0,
) -> RedisPriorityBroker:
    """A broker consuming ``queues`` (none: a producer/sweeper) with a short poll timeout."""
    return RedisPriorityBroker(
        client,
        prefix=prefix,
        default_queue="q",
        listen_queues=queues,
        consumer=consumer or f"c-{uuid.uuid4().hex[:8]}",
        liveness_ttl=liveness_ttl,
        poll_timeout=0.2,
    )


async def kick(
    broker: RedisPriorityBroker, data: bytes, queue: str = "q", priority: int = 0
) -> None:
    """Send ``data`` as a message to ``queue`` at ``priority``."""
    await broker.kick(
        BrokerMessage(
            task_id=uuid.uuid4().hex,
            task_name="test",
            message=data,
            labels={"queue_name": queue, "priority": priority},
        )
    )


async def pull(listener: AsyncIterator[AckableMessage]) -> AckableMessage:
    """The next message of ``listener``; fails if none comes within PULL_TIMEOUT."""
    return await asyncio.wait_for(listener.__anext__(), PULL_TIMEOUT)


async def ack(message: AckableMessage) -> None:
    """Acknowledge ``message``."""
    result = message.ack()
    if result is not None:
        await result


async def until(condition: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0) -> Any:
    """Poll the async ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what} (last value: {last!r})")


def pop_keys(broker: RedisPriorityBroker, queue: str = "q") -> list[str]:
    """The KEYS of the broker's pop script for one queue."""
    keys = broker.keys
    return [
        keys.unacked(broker.consumer),
        keys.consumer_alive(broker.consumer),
        keys.consumers,
        keys.queue(queue),
        keys.queue_notify(queue),
    ]


# -- ordering and key layout -----------------------------------------------------------------
def test_priority_first_then_submission_order_across_queues(redis_url: str, prefix: str) -> None:
    """The best priority across all listened queues comes first; ties in submission order."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix, queues=("lo", "hi"))
            sent = [
                (b"a1", "lo", 0),
                (b"b1", "hi", 5),
                (b"a2", "hi", 0),
                (b"b2", "lo", 5),
                (b"c", "lo", 9),
                (b"a3", "lo", 0),
            ]
            for data, queue, priority in sent:
                await kick(broker, data, queue, priority)
            assert await broker.waiting_by_priority("lo") == {0: 2, 5: 1, 9: 1}
            assert await broker.waiting_by_priority("hi") == {0: 1, 5: 1}
            listener = broker.listen()
            got = []
            for _ in sent:
                message = await pull(listener)
                got.append(message.data)
                await ack(message)
            await listener.aclose()
            assert got == [b"c", b"b1", b"b2", b"a1", b"a2", b"a3"]
            assert await client.exists(broker.keys.unacked(broker.consumer)) == 0
            assert await broker.known_queues() == ["hi", "lo"]

    asyncio.run(body())


def test_queue_named_like_a_notify_key_does_not_interfere(redis_url: str, prefix: str) -> None:
    """Queues ``a`` and ``a:notify`` have separate zsets and notify lists."""

    async def body() -> None:
        async with connect(redis_url) as client:
            on_a = make_broker(client, prefix, queues=("a",))
            on_notify = make_broker(client, prefix, queues=("a:notify",))
            keys = on_a.keys
            await kick(on_a, b"for a:notify", queue="a:notify")
            await kick(on_a, b"for a", queue="a")
            for name in ("a", "a:notify"):
                assert await client.type(keys.queue(name)) == b"zset"
                assert await client.type(keys.queue_notify(name)) == b"list"
                assert await client.llen(keys.queue_notify(name)) == 1

            listener = on_a.listen()
            message = await pull(listener)
            assert message.data == b"for a"
            await ack(message)
            assert await client.zcard(keys.queue("a")) == 0
            assert await client.zcard(keys.queue("a:notify")) == 1
            await listener.aclose()

            listener = on_notify.listen()
            message = await pull(listener)
            assert message.data == b"for a:notify"
            await ack(message)
            await listener.aclose()
            assert await on_a.known_queues() == ["a", "a:notify"]

    asyncio.run(body())


# -- recovery --------------------------------------------------------------------------------
def test_dead_consumer_message_is_restored_by_another_consumer(redis_url: str, prefix: str) -> None:
    """A consumer whose liveness key is gone loses its parked message to another's recovery;
    the message keeps its place in line."""

    async def body() -> None:
        async with connect(redis_url) as client:
            dead = make_broker(client, prefix, consumer="dead-1")
            live = make_broker(client, prefix, consumer="live-1")
            keys = live.keys
            await kick(live, b"m1")
            await kick(live, b"m2")
            dead_listener = dead.listen()
            taken = await pull(dead_listener)  # never acknowledged
            assert taken.data == b"m1"
            assert await client.sismember(keys.consumers, "dead-1")

            assert await live.recover_dead_consumers(min_interval=0) == 0  # still alive
            assert await client.hlen(keys.unacked("dead-1")) > 0

            await client.delete(keys.consumer_alive("dead-1"))  # as if its TTL ran out
            assert await live.recover_dead_consumers(min_interval=0) == 1
            assert await client.exists(keys.unacked("dead-1")) == 0
            assert not await client.sismember(keys.consumers, "dead-1")

            listener = live.listen()
            first = await pull(listener)
            assert first.data == b"m1"  # back at its old score, ahead of m2
            await ack(first)
            second = await pull(listener)
            assert second.data == b"m2"
            await ack(second)
            await listener.aclose()
            await dead_listener.aclose()

    asyncio.run(body())


def test_lost_pop_reply_is_put_back_by_restore_strays(redis_url: str, prefix: str) -> None:
    """A message parked under a token the consumer does not hold goes back, with its old score;
    messages the consumer holds stay parked."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix)
            keys = broker.keys
            unacked = keys.unacked(broker.consumer)

            # Through keep_alive (its first call always looks for strays).
            await kick(broker, b"first")
            assert await broker._pop(
                keys=pop_keys(broker), args=["ghost-1", 30000, broker.consumer, 60]
            )
            assert await client.zcard(keys.queue("q")) == 0
            await broker.keep_alive()
            assert await client.zcard(keys.queue("q")) == 1
            assert await client.hlen(unacked) == 0

            # Directly, checking the score is kept.
            await kick(broker, b"second")
            score = await client.zscore(keys.queue("q"), b"second")
            popped = await broker._pop(keys=pop_keys(broker), args=["ghost-2", 30000, "x", 60])
            assert popped == [b"first", broker.keys.queue("q").encode()]
            popped = await broker._pop(keys=pop_keys(broker), args=["ghost-3", 30000, "x", 60])
            assert popped == [b"second", broker.keys.queue("q").encode()]
            assert await broker.holds("q", b"second")  # parked by a live consumer
            assert await broker.restore_strays() == 2
            assert await client.zscore(keys.queue("q"), b"second") == score
            assert await client.hlen(unacked) == 0

            listener = broker.listen()
            got = await pull(listener)
            assert got.data == b"first"
            assert await broker.restore_strays() == 0  # held: stays parked
            assert await client.hlen(unacked) == 4
            await ack(got)
            got = await pull(listener)
            assert got.data == b"second"
            await ack(got)
            assert await broker.restore_strays() == 0
            assert await client.exists(unacked) == 0
            await listener.aclose()

    asyncio.run(body())


def test_pop_reply_lost_to_a_socket_timeout_is_put_back(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real thing: the server stalls past the socket timeout while the pop is in flight, runs
    it once it wakes up, and the reply goes nowhere. restore_strays puts the message back."""

    async def body() -> None:
        options = {"socket_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}
        async with connect(private_redis.url(), **options) as client:
            broker = make_broker(client, "lost", consumer="c1", liveness_ttl=120)
            unacked = broker.keys.unacked("c1")

            async def no_recovery(min_interval: float = 2.0) -> int:
                return 0

            # Nothing but the pop may talk to the server between the pause and the timeout.
            monkeypatch.setattr(broker, "recover_dead_consumers", no_recovery)
            await kick(broker, b"warm-up")
            await kick(broker, b"stalled")
            listener = broker.listen()
            message = await pull(listener)
            assert message.data == b"warm-up"
            await ack(message)

            private_redis.pause()
            try:
                with pytest.raises((RedisTimeoutError, RedisConnectionError)):
                    await listener.__anext__()
            finally:
                private_redis.resume()
            assert not broker._held

            # The server ran the pop when it woke up; nobody got its reply.
            await until(lambda: client.hlen(unacked), "the stalled pop to run")
            assert await client.zcard(broker.keys.queue("q")) == 0
            assert await broker.restore_strays() == 1
            listener = broker.listen()
            message = await pull(listener)
            assert message.data == b"stalled"
            await ack(message)
            await listener.aclose()

    asyncio.run(body())


def test_retried_pop_with_the_same_token_returns_the_same_message(
    redis_url: str, prefix: str
) -> None:
    """A client-side retry of a pop whose reply was lost must not overwrite (lose) the first
    message: the same token gets the same message, and the next one stays queued."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix)
            await kick(broker, b"one")
            await kick(broker, b"two")
            args = ["tok", 30000, broker.consumer, 60]
            first = [b"one", broker.keys.queue("q").encode()]
            assert await broker._pop(keys=pop_keys(broker), args=args) == first
            assert await broker._pop(keys=pop_keys(broker), args=args) == first
            assert await client.zrange(broker.keys.queue("q"), 0, -1) == [b"two"]
            assert await broker.restore_strays() == 1
            assert await client.zrange(broker.keys.queue("q"), 0, -1) == [b"one", b"two"]

    asyncio.run(body())


def test_dropped_message_is_put_back(redis_url: str, prefix: str) -> None:
    """A message yielded by listen() and dropped without ack goes back on the next check."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix)
            await kick(broker, b"dropped")
            listener = broker.listen()
            message = await listener.__anext__()
            assert message.data == b"dropped"
            assert await broker.restore_strays() == 0  # still held by the caller
            del message
            gc.collect()
            assert await broker.restore_strays() == 1
            again = await pull(listener)
            assert again.data == b"dropped"
            await ack(again)
            assert await client.exists(broker.keys.unacked(broker.consumer)) == 0
            await listener.aclose()

    asyncio.run(body())


def test_failed_ack_is_completed_not_redelivered(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ack that raised may have been lost: the entry is dropped later, never put back."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix)
            await kick(broker, b"acked")
            listener = broker.listen()
            message = await pull(listener)

            async def lost_ack(*args: Any, **kwargs: Any) -> None:
                raise RedisConnectionError("connection lost")

            monkeypatch.setattr(broker, "_ack", lost_ack)
            with pytest.raises(RedisConnectionError):
                await ack(message)
            assert await client.hlen(broker.keys.unacked(broker.consumer)) == 4
            assert await broker.restore_strays() == 0
            assert await client.exists(broker.keys.unacked(broker.consumer)) == 0
            assert await client.zcard(broker.keys.queue("q")) == 0
            await listener.aclose()

    asyncio.run(body())


def test_shutdown_hands_back_and_unregisters(redis_url: str, prefix: str) -> None:
    """shutdown() restores the consumer's parked messages, deletes its liveness key and takes
    its name out of the consumer registry."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix, consumer="leaving")
            keys = broker.keys
            await kick(broker, b"m1")
            await kick(broker, b"m2")
            listener = broker.listen()
            message = await pull(listener)
            assert message.data == b"m1"
            await listener.aclose()
            await broker.shutdown()
            assert await client.zrange(keys.queue("q"), 0, -1) == [b"m1", b"m2"]
            assert await client.exists(keys.unacked("leaving"), keys.consumer_alive("leaving")) == 0
            assert not await client.sismember(keys.consumers, "leaving")

    asyncio.run(body())


# -- re-sends and presence -------------------------------------------------------------------
def test_kick_of_identical_bytes_adds_one_entry(redis_url: str, prefix: str) -> None:
    """Re-sending the exact bytes that already wait adds nothing and wakes nobody."""

    async def body() -> None:
        async with connect(redis_url) as client:
            broker = make_broker(client, prefix, queues=())
            keys = broker.keys
            await kick(broker, b"same")
            score = await client.zscore(keys.queue("q"), b"same")
            await kick(broker, b"same")
            await kick(broker, b"same", priority=9)  # a re-send does not move it either
            assert await client.zcard(keys.queue("q")) == 1
            assert await client.zscore(keys.queue("q"), b"same") == score
            assert await client.llen(keys.queue_notify("q")) == 1
            await kick(broker, b"other")
            assert await client.zcard(keys.queue("q")) == 2
            assert await client.llen(keys.queue_notify("q")) == 2

    asyncio.run(body())


def test_holds_waiting_parked_acked_and_dead(redis_url: str, prefix: str) -> None:
    """holds(): true while waiting or parked by a live consumer; false once acknowledged or when
    the consumer that parked it is dead."""

    async def body() -> None:
        async with connect(redis_url) as client:
            sweeper = make_broker(client, prefix, queues=())
            worker = make_broker(client, prefix, consumer="w1")
            assert not await sweeper.holds("q", b"m1")
            await kick(sweeper, b"m1")
            assert await sweeper.holds("q", b"m1")
            assert not await sweeper.holds("elsewhere", b"m1")
            assert not await sweeper.holds("q", b"m1-but-longer")

            listener = worker.listen()
            message = await pull(listener)
            assert await client.zcard(sweeper.keys.queue("q")) == 0
            assert await sweeper.holds("q", b"m1")  # parked, consumer alive
            await ack(message)
            assert not await sweeper.holds("q", b"m1")

            await kick(sweeper, b"m2")
            message = await pull(listener)
            assert await sweeper.holds("q", b"m2")
            await client.delete(sweeper.keys.consumer_alive("w1"))
            assert not await sweeper.holds("q", b"m2")  # its consumer is dead
            await listener.aclose()

    asyncio.run(body())


# -- bounded cost ----------------------------------------------------------------------------
def test_periodic_work_never_scans_the_keyspace(private_redis: PrivateRedis) -> None:
    """With 100k unrelated keys, recovery, keep_alive, restore_strays and a pull use no SCAN or
    KEYS, and a handful of commands in all."""
    noise = redis.Redis.from_url(private_redis.url())
    try:
        with noise.pipeline(transaction=False) as pipe:
            for start in range(0, 100_000, 1000):
                pipe.mset({f"noise:{i}": "x" for i in range(start, start + 1000)})
            pipe.mset({f"other:unacked:{i}": "x" for i in range(100)})
            pipe.mset({f"other:q:{i}": "x" for i in range(100)})
            pipe.execute()
        assert noise.dbsize() >= 100_000
    finally:
        noise.close()

    async def body() -> dict[str, Any]:
        async with connect(private_redis.url()) as client:
            worker = make_broker(client, "cost", consumer="alive-1")
            dead = make_broker(client, "cost", consumer="dead-1")
            await kick(worker, b"m1")
            await kick(worker, b"m2")
            dead_listener = dead.listen()
            assert (await pull(dead_listener)).data == b"m1"
            await dead_listener.aclose()
            # As if its liveness had lapsed (and with it its turn to look for dead consumers).
            await client.delete(dead.keys.consumer_alive("dead-1"), dead.keys.recovery_turn)

            await client.config_resetstat()
            listener = worker.listen()
            for _ in range(2):
                message = await pull(listener)
                await ack(message)
            await listener.aclose()
            for _ in range(5):
                await worker.recover_dead_consumers(min_interval=0)
                await worker.keep_alive()
                await worker.restore_strays()
                await worker.known_queues()
            assert not await client.sismember(worker.keys.consumers, "dead-1")
            return dict(await client.info("commandstats"))

    stats = asyncio.run(body())
    assert stats.get("cmdstat_scan", {"calls": 0})["calls"] == 0, stats
    assert "cmdstat_keys" not in stats, stats
    total = sum(int(entry["calls"]) for entry in stats.values())
    assert total < 100, stats
