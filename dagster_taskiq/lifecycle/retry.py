"""The one retry and backoff policy: which errors are worth retrying, and how long to wait.

Everything that talks to the broker or the key store retries through :func:`retrying`: the
orchestrator's submits (bounded by ``reconnect_timeout``), the worker's claims and finishes
(until the worker is asked to stop), and the heartbeat (its pace is its own, see
:class:`Backoff`).
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dagster_taskiq.errors import BrokerUnavailableError

T = TypeVar("T")
logger = logging.getLogger("dagster_taskiq")

try:  # RabbitMQ support is an extra
    from aiormq.exceptions import ChannelInvalidStateError as _AmqpChannelGone

    _AMQP_TRANSIENT: tuple[type[BaseException], ...] = (_AmqpChannelGone,)
except ImportError:  # pragma: no cover - without the rabbitmq extra
    _AMQP_TRANSIENT = ()

#: Errors that mean "the broker or the key store cannot be reached right now": worth retrying
#: with backoff, as opposed to errors in what we send, which fail at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # includes aiormq's AMQPConnectionError and ConnectionClosed
    OSError,
    TimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    *_AMQP_TRANSIENT,
)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial`` seconds, times ``factor`` per attempt, at most ``cap``."""

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 5.0

    def delays(self) -> Iterator[float]:
        """The waits between attempts, forever."""
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.cap)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failures (0 means no failure: no wait)."""
        if failures <= 0:
            return 0.0
        return min(self.initial * self.factor ** (failures - 1), self.cap)


DEFAULT_BACKOFF = Backoff()


def short_error(exc: BaseException) -> str:
    """``Type: message``, cut to 200 characters."""
    text = str(exc) or exc.__class__.__name__
    text = text if len(text) < 200 else text[:200] + "…"
    return f"{type(exc).__name__}: {text}"


async def retrying(
    what: str,
    operation: Callable[[], Awaitable[T]],
    *,
    timeout: float | None = None,
    give_up: Callable[[], bool] | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    advice: str = "",
) -> T:
    """Run ``operation``, retrying transient errors with ``backoff``.

    Gives up with :class:`BrokerUnavailableError` once ``timeout`` seconds have passed (None:
    never), or re-raises the transient error at once when ``give_up()`` turns true (say, the
    worker was asked to stop). Each failed attempt logs one warning naming ``what``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    attempts = 0
    for delay in backoff.delays():
        try:
            result = await operation()
        except TRANSIENT_ERRORS as exc:
            attempts += 1
            if give_up is not None and give_up():
                raise
            if deadline is not None and time.monotonic() + delay > deadline:
                raise BrokerUnavailableError(
                    f"Gave up {what} after {attempts} attempt(s) in {timeout:.0f} s: the broker "
                    f"or key store stayed unreachable ({short_error(exc)}).{advice}"
                ) from None
            logger.warning(
                "Broker or key store unreachable while %s (%s); retrying in %.1f s.",
                what,
                short_error(exc),
                delay,
            )
            await asyncio.sleep(delay)
            continue
        if attempts:
            logger.warning("Reconnected: done %s after %d retry(ies).", what, attempts)
        return result
    raise AssertionError("unreachable")  # pragma: no cover
