"""A taskiq-aio-pika broker that routes every message by its queue label.

taskiq-aio-pika ignores the routing label unless the broker was built with two or more queues, and
its default quorum queues reject priorities. This subclass declares each destination queue (a
durable classic queue with ``x-max-priority``) before it publishes to it, so a message for a queue
that no worker serves yet waits there instead of being dropped, and publishes with the message
priority clamped to the queue's range.

Workers take one message per pull and hold none in between (see :meth:`RoutedAioPikaBroker.listen`):
a busy worker never sits on a prefetched step that an idle worker could run.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from aio_pika import DeliveryMode, ExchangeType, Message
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from taskiq import AckableMessage, BrokerMessage
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exceptions import NoStartupError
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue, QueueType

from dagster_taskiq.errors import InvalidTagError, TaskiqConfigError, TaskSubmissionError

#: Seconds to wait for RabbitMQ to confirm a consumer cancellation or a message rejection.
_CANCEL_TIMEOUT = 5.0
#: What AMQP 0-9-1 clients (pamqp) accept as a queue name; RabbitMQ allows 255 bytes.
_AMQP_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:@#,/+ \-]{1,255}")


def check_amqp_queue_name(name: str, where: str, error: type[Exception] = InvalidTagError) -> str:
    """Return ``name`` if RabbitMQ can use it as a queue name, else raise ``error`` saying why."""
    if not _AMQP_QUEUE_NAME.fullmatch(name):
        raise error(
            f"Queue name {name!r} on {where} cannot be used with RabbitMQ: AMQP queue names may "
            "contain only ASCII letters, digits, spaces and - _ . : @ # , / + (at most 255). "
            "Rename the queue, or use a Redis broker, which accepts any printable name."
        )
    return name


class RoutedAioPikaBroker(AioPikaBroker):
    """RabbitMQ broker with label routing to any queue and per-message priority.

    :param url: AMQP URL.
    :param default_queue: queue for messages without a ``queue_name`` label.
    :param listen_queues: queues this broker consumes (workers only).
    :param exchange: name of the direct exchange all queues are bound to.
    :param max_priority: ``x-max-priority`` of every declared queue; priorities are clamped to
        ``0..max_priority``.
    :param qos: prefetch per consumer; keep it at 1 so priority order holds.
    :param queue_arguments: extra ``x-`` arguments for every declared queue (e.g. ``x-expires``).
    """

    def __init__(
        self,
        url: str,
        *,
        default_queue: str,
        listen_queues: list[str] | None = None,
        exchange: str = "dagster_taskiq",
        max_priority: int = 10,
        qos: int = 1,
        queue_arguments: dict[str, Any] | None = None,
        **connection_kwargs: Any,
    ) -> None:
        for name in [default_queue, *(listen_queues or [])]:
            check_amqp_queue_name(name, "this RabbitMQ broker", TaskiqConfigError)
        self.default_queue = default_queue
        self.max_priority = max_priority
        self.queue_arguments = dict(queue_arguments or {})
        super().__init__(
            url=url,
            qos=qos,
            exchange=Exchange(name=exchange, type=ExchangeType.DIRECT),
            task_queues=[self._queue_spec(q) for q in (listen_queues or [])],
            **connection_kwargs,
        )
        self._declared: set[str] = set()
        self._cancelling: set[asyncio.Task[None]] = set()

    def _queue_spec(self, name: str) -> Queue:
        return Queue(
            name=name,
            type=QueueType.CLASSIC,
            durable=True,
            max_priority=self.max_priority,
            routing_key=name,
        )

    async def _declare_queues(
        self, channel: AbstractChannel
    ) -> list[tuple[AbstractQueue, dict[str, Any]]]:
        declared = []
        for spec in self._task_queues:
            queue = await self._declare_one(channel, spec.name)
            declared.append((queue, dict(spec.consumer_arguments)))
        return declared

    async def _declare_one(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        queue = await channel.declare_queue(
            name=name,
            durable=True,
            arguments={
                **self.queue_arguments,
                "x-max-priority": self.max_priority,
                "x-queue-type": "classic",
            },
        )
        await queue.bind(exchange=self._exchange.name, routing_key=name)
        self._declared.add(name)
        return queue

    async def startup(self) -> None:
        """Connect and declare; if that fails (or is cancelled), close what it opened."""
        try:
            await super().startup()
        except BaseException:
            await self._abandon_startup()
            raise

    async def _abandon_startup(self) -> None:
        """Close the connections a failed :meth:`startup` opened, so none reconnects forever.

        A robust connection that got through its first attempt keeps reconnecting in the
        background until it is closed, even though the start-up that opened it failed.
        """
        for channel in (self.write_channel, self.read_channel):
            if channel is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), _CANCEL_TIMEOUT)
        for connection in (self.write_conn, self.read_conn):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), _CANCEL_TIMEOUT)
        self.write_channel = self.read_channel = None
        self.write_conn = self.read_conn = None
        self._declared.clear()

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield one message per pull; between pulls this worker holds no message.

        taskiq-aio-pika keeps its consumers open, so RabbitMQ pushes up to ``qos`` messages per
        queue to a worker even when all its slots are busy; they then wait there, unseen by idle
        workers, until a slot frees or the worker exits. Here the consumers exist only while the
        worker waits for its next task: the first delivery is taken, the consumers are cancelled,
        and anything delivered in the meantime goes straight back to its queue.
        """
        if self.read_channel is None:
            raise NoStartupError("Call startup() before listen().")
        await self.read_channel.set_qos(prefetch_count=self._qos)
        queues = await self._declare_queues(self.read_channel)
        try:
            while True:
                message = await self._take_one(queues)
                yield AckableMessage(data=message.body, ack=message.ack)
        finally:
            await self._finish_cancelling()

    async def _take_one(
        self, queues: Sequence[tuple[AbstractQueue, dict[str, Any]]]
    ) -> AbstractIncomingMessage:
        taken: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if taken.done():  # a second delivery, or the pull was cancelled: hand it back
                with contextlib.suppress(Exception):
                    await message.reject(requeue=True)
            else:
                taken.set_result(message)

        consumers: list[tuple[AbstractQueue, str]] = []
        leftover: AbstractIncomingMessage | None = None
        try:
            for queue, arguments in queues:
                tag = await queue.consume(on_message, arguments=arguments or None)
                consumers.append((queue, tag))
            message = await taken
        except BaseException:
            if not taken.done():
                taken.cancel()
            elif not taken.cancelled():  # delivered just as the pull was cancelled
                leftover = taken.result()
            raise
        finally:
            # Cancel in the background: the caller gets its message now, and on_message returns
            # whatever arrives before RabbitMQ confirms the cancellation.
            task = asyncio.ensure_future(self._cancel_consumers(consumers, leftover))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)
        return message

    @staticmethod
    async def _cancel_consumers(
        consumers: Sequence[tuple[AbstractQueue, str]], leftover: AbstractIncomingMessage | None
    ) -> None:
        # Bounded: on a connection that is down, these would wait for it to come back.
        for queue, tag in consumers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), _CANCEL_TIMEOUT)
        if leftover is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(leftover.reject(requeue=True), _CANCEL_TIMEOUT)

    async def _finish_cancelling(self) -> None:
        if self._cancelling:
            await asyncio.gather(*self._cancelling, return_exceptions=True)

    async def kick(self, message: BrokerMessage) -> None:
        """Publish ``message`` to the queue named by its ``queue_name`` label."""
        if self.write_channel is None:
            raise TaskSubmissionError(
                f"Task {message.task_id}: the RabbitMQ broker is not started; call startup() first."
            )
        queue = str(message.labels.get("queue_name") or self.default_queue)
        if queue not in self._declared:
            check_amqp_queue_name(queue, f"task {message.task_id}")
            await self._declare_one(self.write_channel, queue)
        priority = int(message.labels.get("priority") or 0)
        rmq_message = Message(
            body=message.message,
            headers={"task_id": message.task_id, "task_name": message.task_name},
            delivery_mode=DeliveryMode.PERSISTENT,
            priority=max(0, min(self.max_priority, priority)),
        )
        exchange = await self.write_channel.get_exchange(self._exchange.name, ensure=False)
        await exchange.publish(rmq_message, routing_key=queue)

    async def waiting(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 if it was never declared)."""
        if self.write_conn is None:
            return 0
        channel = await self.write_conn.channel()
        try:
            declared = await channel.declare_queue(name=queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        except Exception:
            return 0
        finally:
            if not channel.is_closed:
                await channel.close()
