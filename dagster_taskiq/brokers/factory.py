"""Build the broker, result backend and Redis clients for a :class:`TaskiqSettings`."""

from collections.abc import Sequence

from redis.asyncio import Redis
from taskiq import AsyncBroker

from dagster_taskiq.brokers.results import KeyStoreResultBackend
from dagster_taskiq.config import REDIS_CONNECTION_OPTIONS, TaskiqSettings
from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.lifecycle.keys import KeySpace
from dagster_taskiq.redis_clients import make_redis as make_redis

QUEUE_LABEL = "queue_name"
PRIORITY_LABEL = "priority"

_REDIS_OPTION_NAMES = frozenset(REDIS_CONNECTION_OPTIONS)


def make_result_backend(settings: TaskiqSettings, backend_redis: Redis) -> KeyStoreResultBackend:
    """The result backend: JSON results that expire, on the key store's client."""
    return KeyStoreResultBackend(backend_redis, KeySpace(settings.key_prefix), settings.result_ttl)


def make_broker(
    settings: TaskiqSettings,
    *,
    broker_redis: Redis | None,
    backend_redis: Redis,
    listen_queues: Sequence[str] = (),
    consumer: str | None = None,
) -> AsyncBroker:
    """The broker for ``settings.broker_url``, with the result backend attached.

    ``broker_redis`` is the client a Redis broker uses (ignored for RabbitMQ), ``backend_redis``
    the key store's (the result backend shares it). ``listen_queues``
    and ``consumer`` are for workers only.
    """
    broker: AsyncBroker
    if settings.broker_kind == "redis":
        from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker

        if broker_redis is None:
            raise TaskiqConfigError("A Redis broker needs a Redis client.")
        broker = RedisPriorityBroker(
            broker_redis,
            prefix=settings.key_prefix,
            default_queue=settings.default_queue,
            listen_queues=listen_queues,
            consumer=consumer,
        )
    else:
        from dagster_taskiq.brokers.lanes import (
            CLASSIC,
            DEFAULT_DELIVERY_LIMIT,
            DEFAULT_LANES,
            QueueLayout,
        )

        exchange = str(settings.option("exchange", "dagster_taskiq"))
        max_priority = int(settings.option("max_priority", 10))
        layout = QueueLayout(
            exchange=exchange,
            max_priority=max_priority,
            queue_type=str(settings.option("queue_type", CLASSIC)),
            lanes=int(settings.option("priority_lanes", DEFAULT_LANES)),
            delivery_limit=int(settings.option("delivery_limit", DEFAULT_DELIVERY_LIMIT)),
        )
        try:
            from dagster_taskiq.brokers.rabbitmq import (
                DEFAULT_CONFIRM_TIMEOUT,
                RoutedAioPikaBroker,
            )
        except ImportError as exc:
            raise TaskiqConfigError(
                "The broker URL is amqp:// but taskiq-aio-pika is not installed. Run "
                "pip install 'dagster-taskiq[rabbitmq]'."
            ) from exc
        passthrough = {
            k: v for k, v in settings.passthrough_options.items() if k not in _REDIS_OPTION_NAMES
        }
        # aio-pika must give up on its own: a robust connection whose first attempt is cancelled
        # from outside keeps reconnecting in the background for as long as the loop runs.
        passthrough.setdefault("timeout", settings.connect_timeout)
        broker = RoutedAioPikaBroker(
            settings.broker_url,
            default_queue=settings.default_queue,
            listen_queues=list(listen_queues),
            exchange=exchange,
            max_priority=max_priority,
            qos=int(settings.option("qos", 1)),
            queue_arguments=dict(settings.option("queue_arguments", {}) or {}),
            confirm_timeout=float(settings.option("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT)),
            layout=layout,
            **passthrough,
        )
    broker.result_backend = make_result_backend(settings, backend_redis)
    return broker
