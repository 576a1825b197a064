"""RabbitMQ publishes are persistent, mandatory and confirmed, so no task is silently lost.

Against the real RabbitMQ (skipped locally when it is down, failing under CI=true): a kick to a
queue nobody has declared yet still reaches a worker started later; a message RabbitMQ cannot
route (its queue deleted or unbound after the broker declared it) is re-declared and delivered,
and one it still cannot route raises :class:`TaskSubmissionError`; ``kick`` returns only once
RabbitMQ confirmed the message, and a refused (nacked) or unconfirmed publish raises an error
that :meth:`TaskiqConnection.retrying` retries.

Every test uses its own exchange and queues and deletes them at the end.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity
from taskiq import BrokerMessage

from dagster_taskiq.brokers.rabbitmq import RoutedAioPikaBroker
from dagster_taskiq.connection import TRANSIENT_ERRORS
from dagster_taskiq.errors import TaskSubmissionError

#: Queues expire on their own after 10 minutes unused, should a test's cleanup not run.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-expires": 600_000}
#: Upper bound on one test's RabbitMQ work.
TEST_DEADLINE = 60.0


class Rig:
    """One test's exchange, queue names and brokers, plus a side connection to inspect and
    interfere with RabbitMQ; :meth:`close` deletes everything."""

    def __init__(self, url: str) -> None:
        self.url = url
        uid = uuid.uuid4().hex[:10]
        self.exchange = f"dt-confirm-{uid}"
        self._prefix = f"dt-confirm-{uid}"
        self._queues: set[str] = set()
        self._brokers: list[RoutedAioPikaBroker] = []
        self._conn: AbstractRobustConnection | None = None

    def queue(self, name: str) -> str:
        """A queue name unique to this test (deleted at the end)."""
        queue = f"{self._prefix}-{name}"
        self._queues.add(queue)
        return queue

    async def broker(
        self, *, listen: tuple[str, ...] = (), default: str = "default", **kwargs: Any
    ) -> RoutedAioPikaBroker:
        """A started broker on this test's exchange; a worker if it ``listen``s."""
        kwargs.setdefault("queue_arguments", QUEUE_ARGUMENTS)
        broker = RoutedAioPikaBroker(
            self.url,
            default_queue=self.queue(default),
            listen_queues=list(listen),
            exchange=self.exchange,
            timeout=10,
            **kwargs,
        )
        broker.is_worker_process = bool(listen)
        self._brokers.append(broker)
        await broker.startup()
        return broker

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[AbstractChannel]:
        """A fresh side channel (a failed passive declare closes its channel)."""
        if self._conn is None:
            self._conn = await aio_pika.connect_robust(self.url, timeout=10)
        channel = await self._conn.channel()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def exists(self, queue: str) -> bool:
        """Whether ``queue`` exists on the node."""
        try:
            async with self.channel() as channel:
                await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
        return True

    async def get(self, queue: str) -> AbstractIncomingMessage:
        """Take the next message of ``queue`` (acknowledged), failing if there is none."""
        async with self.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            message = await declared.get(no_ack=True, fail=False, timeout=5)
        assert message is not None, f"queue {queue} is empty"
        return message

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` behind the brokers' backs."""
        async with self.channel() as channel:
            await channel.queue_delete(queue)

    async def unbind(self, queue: str) -> None:
        """Remove ``queue``'s binding to this test's exchange."""
        async with self.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            await declared.unbind(self.exchange, routing_key=queue)

    async def close(self) -> None:
        """Stop the brokers, delete this test's queues and exchange."""
        for broker in self._brokers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broker.shutdown(), 10)
        with contextlib.suppress(Exception):
            async with self.channel() as channel:
                for queue in sorted(self._queues):
                    await channel.queue_delete(queue)
                await channel.exchange_delete(self.exchange)
        if self._conn is not None:
            await self._conn.close()


def message(queue: str, *, priority: int = 0, body: bytes = b"payload") -> BrokerMessage:
    """A task message for ``queue`` with a fresh task id."""
    return BrokerMessage(
        task_id=f"task-{uuid.uuid4().hex[:12]}",
        task_name="dagster_taskiq.execute_step",
        message=body,
        labels={"queue_name": queue, "priority": priority},
    )


def run(amqp_url: str, body: Callable[[Rig], Awaitable[None]]) -> None:
    """Run ``body(rig)`` on a fresh event loop, then clean up the rig."""

    async def main() -> None:
        rig = Rig(amqp_url)
        try:
            await asyncio.wait_for(body(rig), TEST_DEADLINE)
        finally:
            await rig.close()

    asyncio.run(main())


def test_kick_to_undeclared_queue_waits_for_a_later_worker(amqp_url: str) -> None:
    """(a) The queue does not exist when the task is sent; a worker started afterwards gets it."""

    async def body(rig: Rig) -> None:
        client = await rig.broker()
        queue = rig.queue("unserved")
        assert not await rig.exists(queue)
        sent = message(queue, priority=3, body=b"step payload")
        await client.kick(sent)
        assert await client.waiting(queue) == 1

        worker = await rig.broker(listen=(queue,))
        pulls = worker.listen()
        try:
            received = await asyncio.wait_for(pulls.__anext__(), 10)
            assert received.data == b"step payload"
            acked = received.ack()
            if acked is not None:
                await acked
        finally:
            await pulls.aclose()
        assert await client.waiting(queue) == 0

    run(amqp_url, body)


@pytest.mark.parametrize("breakage", ["queue deleted", "binding removed"])
def test_unroutable_publish_redeclares_and_delivers(
    amqp_url: str, breakage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """(b) The queue the broker declared (and cached) is deleted or unbound before the next kick:
    RabbitMQ returns that publish, the broker declares the queue again and the task arrives."""

    async def body(rig: Rig) -> None:
        client = await rig.broker()
        queue = rig.queue("steps")
        first = message(queue)
        await client.kick(first)
        assert (await rig.get(queue)).headers["task_id"] == first.task_id
        if breakage == "queue deleted":
            await rig.delete_queue(queue)
        else:
            await rig.unbind(queue)

        second = message(queue)
        with caplog.at_level(logging.WARNING, logger="dagster_taskiq"):
            await client.kick(second)
        assert (await rig.get(queue)).headers["task_id"] == second.task_id
        assert await client.waiting(queue) == 0
        assert f"RabbitMQ returned task {second.task_id} as unroutable" in caplog.text

    run(amqp_url, body)


def test_still_unroutable_after_redeclare_raises_submission_error(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) Something deletes the queue as soon as it is declared: the kick raises a permanent
    :class:`TaskSubmissionError` naming the task and the queue; once that stops, kicks work."""

    async def body(rig: Rig) -> None:
        client = await rig.broker()
        queue = rig.queue("vanishing")
        declare = client._declare_one
        declares: list[str] = []

        async def declare_then_vanish(channel: AbstractChannel, name: str) -> Any:
            declares.append(name)
            declared = await declare(channel, name)
            await rig.delete_queue(name)
            return declared

        monkeypatch.setattr(client, "_declare_one", declare_then_vanish)
        lost = message(queue)
        with pytest.raises(TaskSubmissionError) as info:
            await client.kick(lost)
        text = str(info.value)
        assert lost.task_id in text and f"queue '{queue}'" in text and "re-execute" in text
        assert not isinstance(info.value, TRANSIENT_ERRORS)  # retrying() gives up at once
        assert declares == [queue, queue]  # declared once more after the first return
        assert not await rig.exists(queue)

        monkeypatch.setattr(client, "_declare_one", declare)
        kept = message(queue)
        await client.kick(kept)  # not cached as declared: declared again, delivered
        assert (await rig.get(queue)).headers["task_id"] == kept.task_id

    run(amqp_url, body)


def test_publish_is_confirmed_persistent_and_mandatory(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(c) The publish channel has publisher confirms on; kick sends persistent, mandatory
    messages, does not return before RabbitMQ's Basic.Ack arrives, and declares a queue once."""

    async def body(rig: Rig) -> None:
        client = await rig.broker()
        assert client.write_channel is not None
        assert client.write_channel.publisher_confirms is True
        underlay = cast(aiormq.Channel, await client.write_channel.get_underlay_channel())
        assert underlay.publisher_confirms is True

        publishes: list[dict[str, Any]] = []
        basic_publish = underlay.basic_publish

        async def spy(*args: Any, **kwargs: Any) -> Any:
            publishes.append(kwargs)
            return await basic_publish(*args, **kwargs)

        monkeypatch.setattr(underlay, "basic_publish", spy)
        declare = client._declare_one
        declares: list[str] = []

        async def counting(channel: AbstractChannel, name: str) -> Any:
            declares.append(name)
            return await declare(channel, name)

        monkeypatch.setattr(client, "_declare_one", counting)

        queue = rig.queue("confirmed")
        for _ in range(5):
            await client.kick(message(queue, priority=4))
        assert declares == [queue]  # one declaration per queue, none on later publishes
        assert len(publishes) == 5
        for kwargs in publishes:
            assert kwargs["mandatory"] is True and kwargs["routing_key"] == queue
            assert kwargs["properties"].delivery_mode == aio_pika.DeliveryMode.PERSISTENT.value
        stored = await rig.get(queue)
        assert stored.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert stored.priority == 4

        # Hold back RabbitMQ's confirmations: the message is in the queue, yet kick waits.
        on_confirm = underlay._on_confirm_frame
        held: list[Any] = []

        async def hold(frame: Any) -> None:
            held.append(frame)

        monkeypatch.setattr(underlay, "_on_confirm_frame", hold)
        pending = asyncio.ensure_future(client.kick(message(queue)))
        deadline = time.monotonic() + 5
        while await client.waiting(queue) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await client.waiting(queue) == 5  # 4 left from above + the new one
        await asyncio.sleep(0.3)
        assert held and not pending.done()
        monkeypatch.setattr(underlay, "_on_confirm_frame", on_confirm)
        for frame in held:
            await on_confirm(frame)
        await asyncio.wait_for(pending, 5)

    run(amqp_url, body)


def test_unconfirmed_publish_times_out_as_transient(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(c) No confirmation within ``confirm_timeout``: kick raises a TimeoutError naming the task
    and queue, which TaskiqConnection.retrying treats as transient; the channel stays usable."""

    async def body(rig: Rig) -> None:
        client = await rig.broker(confirm_timeout=0.5)
        queue = rig.queue("silent")
        await client.kick(message(queue))  # declared, confirmed
        assert client.write_channel is not None
        underlay = await client.write_channel.get_underlay_channel()

        async def swallow(frame: Any) -> None:
            return None

        monkeypatch.setattr(underlay, "_on_confirm_frame", swallow)
        unconfirmed = message(queue)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            await client.kick(unconfirmed)
        assert 0.4 < time.monotonic() - started < 3.0
        assert isinstance(info.value, TRANSIENT_ERRORS)
        assert unconfirmed.task_id in str(info.value) and f"queue '{queue}'" in str(info.value)

        monkeypatch.undo()
        await client.kick(message(queue))
        # Unconfirmed is not unstored: a retry may deliver twice (the worker's claim dedups).
        assert await client.waiting(queue) == 3

    run(amqp_url, body)


def test_nacked_publish_raises_transient_error(amqp_url: str) -> None:
    """A publish RabbitMQ refuses (a full queue with ``x-overflow: reject-publish``) raises a
    ConnectionError naming the task and queue, so the caller retries; once there is room again,
    the same kick succeeds."""

    async def body(rig: Rig) -> None:
        client = await rig.broker(
            queue_arguments={**QUEUE_ARGUMENTS, "x-max-length": 1, "x-overflow": "reject-publish"}
        )
        queue = rig.queue("full")
        await client.kick(message(queue))
        refused = message(queue)
        with pytest.raises(ConnectionError) as info:
            await client.kick(refused)
        assert isinstance(info.value, TRANSIENT_ERRORS)
        assert not isinstance(info.value, TaskSubmissionError)
        text = str(info.value)
        assert refused.task_id in text and f"queue '{queue}'" in text and "Basic.Nack" in text

        await rig.get(queue)  # a worker takes the queued task: room for one more
        await client.kick(refused)
        assert (await rig.get(queue)).headers["task_id"] == refused.task_id

    run(amqp_url, body)
