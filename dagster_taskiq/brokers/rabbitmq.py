"""A taskiq-aio-pika broker that routes every message by its queue label.

taskiq-aio-pika ignores the routing label unless the broker was built with two or more queues, and
its default quorum queues reject priorities. This subclass declares each destination queue before
it publishes to it, so a message for a queue that no worker serves yet waits there instead of being
dropped, and publishes with the message priority clamped to the queue's range.

With ``queue_type="classic"`` (the default) each queue is one durable classic queue with
``x-max-priority``. With ``queue_type="quorum"`` each queue is a set of replicated quorum queues,
one per priority lane (see :mod:`dagster_taskiq.brokers.lanes`), with a ``x-delivery-limit`` whose
overflow RabbitMQ dead-letters to the exchange's dead-letter queue; workers drain that queue into
the key store's dead letters.

Every publish is persistent, ``mandatory`` and confirmed (see :meth:`RoutedAioPikaBroker.kick`):
``kick`` returns only once RabbitMQ has taken the message, and a message it could not route or
store raises instead of vanishing.

Workers take one message per pull and hold none in between (see :meth:`RoutedAioPikaBroker.listen`):
a busy worker never sits on a prefetched step that an idle worker could run.
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aio_pika import DeliveryMode, ExchangeType, Message, connect_robust
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelPreconditionFailed, DeliveryError, PublishError
from pamqp.commands import Basic
from taskiq import AckableMessage, BrokerMessage
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exceptions import NoStartupError
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue, QueueType

from dagster_taskiq.brokers.delivery import Delivery
from dagster_taskiq.brokers.lanes import (
    QUORUM,
    QueueLayout,
    dead_letter_reason,
    origin_queue,
)
from dagster_taskiq.errors import InvalidTagError, TaskiqConfigError, TaskSubmissionError

logger = logging.getLogger("dagster_taskiq")
T = TypeVar("T")

#: Seconds to wait for RabbitMQ to confirm a consumer cancellation or a message rejection.
_CANCEL_TIMEOUT = 5.0
#: Default seconds :meth:`RoutedAioPikaBroker.kick` waits for RabbitMQ to confirm a publish (and
#: for each queue declaration it makes first) before it raises :class:`TimeoutError`.
DEFAULT_CONFIRM_TIMEOUT = 10.0
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
    :param confirm_timeout: seconds :meth:`kick` waits for RabbitMQ to confirm a publish (and for
        each queue declaration it makes first) before it raises :class:`TimeoutError`.
    :param layout: classic or quorum queues, lanes and delivery limit (default: classic).
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
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        layout: QueueLayout | None = None,
        **connection_kwargs: Any,
    ) -> None:
        for name in [default_queue, *(listen_queues or [])]:
            check_amqp_queue_name(name, "this RabbitMQ broker", TaskiqConfigError)
        self.default_queue = default_queue
        self.max_priority = max_priority
        self.layout = layout or QueueLayout(exchange=exchange, max_priority=max_priority)
        self.queue_arguments = dict(queue_arguments or {})
        self.confirm_timeout = float(confirm_timeout)
        if self.confirm_timeout <= 0:
            raise TaskiqConfigError(
                f"confirm_timeout must be a positive number of seconds, not {confirm_timeout!r}."
            )
        super().__init__(
            url=url,
            qos=qos,
            exchange=Exchange(name=exchange, type=ExchangeType.DIRECT),
            task_queues=[self._queue_spec(q) for q in (listen_queues or [])],
            **connection_kwargs,
        )
        #: Queues declared and bound through this broker: :meth:`kick` declares each one once.
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
        """Declare this worker's queues; returns them in the order a pull tries them: every
        queue's highest lane first, then the next lanes, and the dead-letter queue last."""
        by_lane: list[list[tuple[AbstractQueue, dict[str, Any]]]] = [
            [] for _ in range(self.layout.lane_count)
        ]
        for spec in self._task_queues:
            lanes = await self._declare_one(channel, spec.name)
            for lane, queue in enumerate(lanes):
                by_lane[lane].append((queue, dict(spec.consumer_arguments)))
        declared = [entry for lane in reversed(by_lane) for entry in lane]
        if self._task_queues and self.layout.queue_type == QUORUM:
            declared.append((await self._declare_poison_queue(channel), {}))
        return declared

    async def _declare_one(self, channel: AbstractChannel, name: str) -> list[AbstractQueue]:
        """Declare and bind the RabbitMQ queue(s) behind ``name``: one per lane, lowest first.

        For quorum queues the dead-letter exchange and queue are declared first: RabbitMQ drops
        a message it dead-letters to an exchange that does not exist."""
        if self.layout.queue_type == QUORUM:
            await self._declare_poison_queue(channel)
        queues = []
        for physical in self.layout.physical_queues(name):
            queue = await self._declare_checked(
                channel, physical, self.layout.arguments(self.queue_arguments)
            )
            await queue.bind(exchange=self._exchange.name, routing_key=physical)
            queues.append(queue)
        self._declared.add(name)
        return queues

    async def _declare_poison_queue(self, channel: AbstractChannel) -> AbstractQueue:
        """Declare the exchange RabbitMQ dead-letters quorum queues' poison messages to, and the
        queue behind it that workers drain into the key store's dead letters."""
        layout = self.layout
        exchange = await channel.declare_exchange(
            layout.dead_letter_exchange, ExchangeType.FANOUT, durable=True
        )
        queue = await self._declare_checked(
            channel, layout.dead_letter_queue, layout.dead_letter_queue_arguments()
        )
        await queue.bind(exchange=exchange)
        return queue

    async def _declare_checked(
        self, channel: AbstractChannel, name: str, arguments: dict[str, Any]
    ) -> AbstractQueue:
        """Declare ``name`` durable with ``arguments``; a queue that already exists with other
        arguments raises :class:`TaskiqConfigError` saying what to do."""
        try:
            return await channel.declare_queue(name=name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            other = "classic" if self.layout.queue_type == QUORUM else "quorum"
            raise TaskiqConfigError(
                f"RabbitMQ refused to declare queue '{name}' as a {self.layout.queue_type} queue "
                f"with arguments {arguments}: it already exists with different arguments ({exc}). "
                f"Delete it (`rabbitmqctl delete_queue '{name}'`, after draining it) or set "
                f"config_source queue_type back to what it was declared with (probably "
                f"'{other}')."
            ) from exc

    async def startup(self) -> None:
        """Connect, open a confirming publish channel and declare the exchange and this worker's
        queues; if that fails (or is cancelled), close what it opened.

        The connections are opened here rather than by ``AioPikaBroker.startup`` so that the
        publishing channel's settings are explicit instead of aio-pika's defaults: publisher
        confirms on, and a returned (unroutable) message handed back as the publish result.
        """
        try:
            await super(AioPikaBroker, self).startup()  # taskiq's own: result backend, middlewares
            self.write_conn = await connect_robust(self.url, loop=self._loop, **self._conn_kwargs)
            self.write_channel = await self.write_conn.channel(
                publisher_confirms=True, on_return_raises=False
            )
            if self.is_worker_process:
                self.read_conn = await connect_robust(
                    self.url, loop=self._loop, **self._conn_kwargs
                )
                self.read_channel = await self.read_conn.channel()
            await self._declare_exchanges()
            await self._declare_queues(self.write_channel)
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
        and anything delivered in the meantime goes straight back to its queue. Each message is a
        :class:`~dagster_taskiq.brokers.delivery.Delivery` naming the queue it came from.

        With priority lanes, a pull first asks each lane for a waiting message, highest lane
        first (``basic.get``), and only if all are empty waits on consumers on all of them.
        """
        if self.read_channel is None:
            raise NoStartupError("Call startup() before listen().")
        await self.read_channel.set_qos(prefetch_count=self._qos)
        queues = await self._declare_queues(self.read_channel)
        try:
            while True:
                message, queue_name = await self._take_one(queues)
                if queue_name == self.layout.dead_letter_queue:
                    yield Delivery(
                        data=message.body,
                        ack=message.ack,
                        queue=origin_queue(message.headers),
                        dead_letter_reason=dead_letter_reason(
                            message.headers, self.layout.delivery_limit
                        ),
                    )
                else:
                    yield Delivery(
                        data=message.body, ack=message.ack, queue=self.layout.logical(queue_name)
                    )
        finally:
            await self._finish_cancelling()

    async def _take_one(
        self, queues: Sequence[tuple[AbstractQueue, dict[str, Any]]]
    ) -> tuple[AbstractIncomingMessage, str]:
        taken: asyncio.Future[tuple[AbstractIncomingMessage, str]] = (
            asyncio.get_running_loop().create_future()
        )

        def on_message_from(name: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
            async def on_message(message: AbstractIncomingMessage) -> None:
                if taken.done():  # a second delivery, or the pull was cancelled: hand it back
                    with contextlib.suppress(Exception):
                        await message.reject(requeue=True)
                else:
                    taken.set_result((message, name))

            return on_message

        if self.layout.lane_count > 1:
            for queue, _ in queues:
                waiting = await queue.get(no_ack=False, fail=False)
                if waiting is not None:
                    return waiting, queue.name
        consumers: list[tuple[AbstractQueue, str]] = []
        leftover: AbstractIncomingMessage | None = None
        try:
            for queue, arguments in queues:
                tag = await queue.consume(on_message_from(queue.name), arguments=arguments or None)
                consumers.append((queue, tag))
            message = await taken
        except BaseException:
            if not taken.done():
                taken.cancel()
            elif not taken.cancelled():  # delivered just as the pull was cancelled
                leftover = taken.result()[0]
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
        """Publish ``message`` to the queue named by its ``queue_name`` label; return once
        RabbitMQ has confirmed it.

        The first publish to a queue declares it (as workers do) and binds it; later ones do not.
        Each publish is persistent and ``mandatory``, and waits for RabbitMQ's confirmation. A
        message RabbitMQ returns as unroutable (the queue or its binding went away since: an
        ``x-expires``, an operator) was stored nowhere, so the queue is declared again and the
        message published once more.

        :raises TaskSubmissionError: the broker is not started, the queue name is unusable, or
            the message is still unroutable after the queue was declared again.
        :raises ConnectionError: RabbitMQ refused the message (``Basic.Nack``: the queue is full
            with ``x-overflow: reject-publish``, or the node could not store it); worth retrying.
        :raises TimeoutError: no confirmation (or declaration) within ``confirm_timeout``; worth
            retrying, though the message may have been stored (a retry may then deliver it twice).
        """
        channel = self.write_channel
        if channel is None:
            raise TaskSubmissionError(
                f"Task {message.task_id}: the RabbitMQ broker is not started; call startup() first."
            )
        queue = str(message.labels.get("queue_name") or self.default_queue)
        if queue not in self._declared:
            check_amqp_queue_name(queue, f"task {message.task_id}")
            await self._declare_for(channel, queue, message.task_id)
        priority = int(message.labels.get("priority") or 0)
        target = self.layout.queue_for(queue, priority)
        rmq_message = Message(
            body=message.message,
            headers={"task_id": message.task_id, "task_name": message.task_name},
            delivery_mode=DeliveryMode.PERSISTENT,
            priority=max(0, min(self.max_priority, priority)),
        )
        if await self._publish(channel, rmq_message, target, message.task_id):
            return
        logger.warning(
            "RabbitMQ returned task %s as unroutable: queue '%s' or its binding to exchange '%s' "
            "is gone. Declaring the queue again and re-publishing.",
            message.task_id,
            queue,
            self._exchange.name,
        )
        self._declared.discard(queue)
        await self._declare_for(channel, queue, message.task_id)
        if await self._publish(channel, rmq_message, target, message.task_id):
            return
        self._declared.discard(queue)
        raise TaskSubmissionError(
            f"Task {message.task_id} could not be routed to queue '{queue}': RabbitMQ returned it "
            f"as unroutable (NO_ROUTE) twice, the second time right after the queue was declared "
            f"and bound to exchange '{self._exchange.name}' again, so the task was not queued. "
            "Something removes that queue or its binding as soon as it exists (a very short "
            "x-expires in queue_arguments, a policy, or an operator): check with `rabbitmqctl "
            "list_queues` / `list_bindings`, fix it, then re-execute the run."
        )

    async def _declare_for(self, channel: AbstractChannel, queue: str, task_id: str) -> None:
        """Declare ``queue`` for a publish, within ``confirm_timeout``."""
        await self._bounded(
            self._declare_one(channel, queue),
            f"RabbitMQ did not answer declaring queue '{queue}' for task {task_id}",
        )

    async def _publish(
        self, channel: AbstractChannel, message: Message, queue: str, task_id: str
    ) -> bool:
        """Publish mandatory and wait for the confirmation: True once RabbitMQ took the message,
        False if it returned it unroutable. Raises as :meth:`kick` documents."""

        async def publish() -> object:
            exchange = await channel.get_exchange(self._exchange.name, ensure=False)
            return await exchange.publish(message, routing_key=queue, mandatory=True)

        try:
            result = await self._bounded(
                publish(), f"RabbitMQ did not confirm task {task_id} on queue '{queue}'"
            )
        except PublishError:  # a channel opened with on_return_raises=True
            return False
        except DeliveryError as exc:
            raise ConnectionError(
                f"RabbitMQ refused task {task_id} for queue '{queue}' ({_frame_name(exc)}): the "
                "queue is full (x-max-length with x-overflow: reject-publish) or the node could "
                "not store the message."
            ) from exc
        if isinstance(result, Basic.Ack):
            return True
        if isinstance(result, DeliveredMessage) and isinstance(result.delivery, Basic.Return):
            return False
        raise TaskSubmissionError(
            f"Task {task_id} for queue '{queue}': RabbitMQ's answer to the publish was "
            f"{type(result).__name__}, not a confirmation; the publishing channel must have "
            "publisher confirms on."
        )

    async def _bounded(self, operation: Awaitable[T], what: str) -> T:
        """Await ``operation`` for at most ``confirm_timeout`` seconds, else raise the builtin
        :class:`TimeoutError` (asyncio's is a different class before Python 3.11)."""
        try:
            return await asyncio.wait_for(operation, self.confirm_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what} within {self.confirm_timeout:g} s.") from None

    async def purge(self, queue: str) -> int:
        """Remove every message waiting in ``queue`` (in all its lanes; not those delivered and
        unacknowledged); returns how many (0 if the queue was never declared)."""
        if self.write_conn is None:
            raise TaskSubmissionError("The RabbitMQ broker is not started; call startup() first.")
        total = 0
        for physical in self.layout.physical_queues(queue):
            total += await self._purge_one(physical)
        return total

    async def _purge_one(self, queue: str) -> int:
        if self.write_conn is None:
            return 0
        channel = await self.write_conn.channel()
        try:
            try:
                declared = await channel.declare_queue(name=queue, passive=True)
            except Exception:
                return 0
            result = await self._bounded(declared.purge(), f"RabbitMQ did not purge '{queue}'")
            return int(getattr(result, "message_count", 0) or 0)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def waiting(self, queue: str) -> int:
        """Messages waiting in ``queue``, all lanes together (0 if it was never declared)."""
        total = 0
        for physical in self.layout.physical_queues(queue):
            total += await self._waiting_one(physical)
        return total

    async def _waiting_one(self, queue: str) -> int:
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


def _frame_name(exc: DeliveryError) -> str:
    frame = getattr(exc, "frame", None)
    return f"Basic.{type(frame).__name__}" if frame is not None else type(exc).__name__
