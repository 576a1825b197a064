"""Build the broker, result backend and Redis clients for a :class:`TaskiqSettings`."""

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from taskiq import AsyncBroker
from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisAsyncResultBackend

from dagster_taskiq.config import REDIS_CONNECTION_OPTIONS, TaskiqSettings
from dagster_taskiq.errors import TaskiqConfigError

#: Seconds a Redis command may wait for its reply before it fails.
SOCKET_TIMEOUT = 5.0
QUEUE_LABEL = "queue_name"
PRIORITY_LABEL = "priority"

_REDIS_OPTION_NAMES = frozenset(REDIS_CONNECTION_OPTIONS)


def _redis_kwargs(settings: TaskiqSettings, url: str) -> dict[str, Any]:
    passthrough = settings.passthrough_options
    extra = {k: v for k, v in passthrough.items() if k in _REDIS_OPTION_NAMES}
    # TCP keepalive is a TCP option: redis-py's unix socket connections reject it.
    keepalive = {} if url.lower().startswith("unix:") else {"socket_keepalive": True}
    return {
        "socket_connect_timeout": min(settings.connect_timeout, 5.0),
        # A server that stops answering (paused, partitioned) must fail commands instead of
        # hanging them; our callers retry with backoff and log. Longer than any blocking pull.
        "socket_timeout": SOCKET_TIMEOUT,
        **keepalive,
        "health_check_interval": 15,
        # Refused or reset connections are retried at once, a few times; a timed-out command is
        # not (each retry would wait another socket_timeout): it goes to the caller's backoff.
        "retry": Retry(
            ExponentialBackoff(cap=2.0, base=0.1),
            retries=3,
            supported_errors=(RedisConnectionError,),  # redis-py's default adds timeouts
        ),
        "retry_on_error": [RedisConnectionError],
        **extra,
    }


def make_redis(url: str, settings: TaskiqSettings) -> Redis:
    """A redis-py asyncio client for ``url`` with our timeouts, retries and TLS options."""
    return Redis.from_url(url, **_redis_kwargs(settings, url))


def make_result_backend(settings: TaskiqSettings) -> RedisAsyncResultBackend:  # type: ignore[type-arg]
    """taskiq-redis result backend with a JSON serializer and expiring results."""
    return RedisAsyncResultBackend(
        redis_url=settings.backend_url,
        result_ex_time=settings.result_ttl,
        serializer=JSONSerializer(),
        prefix_str=f"{settings.key_prefix}:result",
        **{
            k: v
            for k, v in _redis_kwargs(settings, settings.backend_url).items()
            if k != "retry_on_error"
        },
    )


def make_broker(
    settings: TaskiqSettings,
    *,
    broker_redis: Redis | None,
    listen_queues: Sequence[str] = (),
    consumer: str | None = None,
) -> AsyncBroker:
    """The broker for ``settings.broker_url``, with the result backend attached.

    ``broker_redis`` is the client a Redis broker uses (ignored for RabbitMQ). ``listen_queues``
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
            exchange=str(settings.option("exchange", "dagster_taskiq")),
            max_priority=int(settings.option("max_priority", 10)),
            qos=int(settings.option("qos", 1)),
            queue_arguments=dict(settings.option("queue_arguments", {}) or {}),
            confirm_timeout=float(settings.option("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT)),
            **passthrough,
        )
    broker.result_backend = make_result_backend(settings)
    return broker
