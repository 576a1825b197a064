"""How a RabbitMQ queue name maps to RabbitMQ queues: classic, or quorum with priority lanes.

Quorum queues on RabbitMQ 3.x have no ``x-max-priority``. With ``queue_type: quorum`` each
queue ``Q`` is therefore ``lanes`` quorum queues ``Q.p0`` (lowest) .. ``Q.p<lanes-1>``
(highest); a message goes to the lane of its priority, and a worker takes from the highest
non-empty lane first. Within a lane, messages keep their publish order. Every lane has a
``x-delivery-limit``; a message delivered more often than that (a worker died with it each time)
is dead-lettered by RabbitMQ to the exchange ``<exchange>.dlx`` and its queue
``<exchange>.dead-letters``, which workers drain into the key store's dead letters.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from dagster_taskiq.errors import TaskiqConfigError

CLASSIC = "classic"
QUORUM = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)
#: Default number of priority lanes of a quorum queue.
DEFAULT_LANES = 3
#: Default ``x-delivery-limit`` of quorum queues.
DEFAULT_DELIVERY_LIMIT = 5

_LANE_SUFFIX = re.compile(r"\.p\d+$")


def lane_of(priority: int, max_priority: int, lanes: int) -> int:
    """The lane (``0`` lowest .. ``lanes - 1`` highest) for ``priority``, clamped to
    ``0..max_priority`` and split into ``lanes`` equal bands."""
    clamped = max(0, min(max_priority, int(priority)))
    return min(lanes - 1, clamped * lanes // (max_priority + 1))


def lane_queue(queue: str, lane: int) -> str:
    """The RabbitMQ queue that holds ``queue``'s messages of ``lane``."""
    return f"{queue}.p{lane}"


@dataclasses.dataclass(frozen=True)
class QueueLayout:
    """Queue type, lanes and delivery limit of a RabbitMQ broker (``config_source`` options
    ``queue_type``, ``priority_lanes``, ``delivery_limit``)."""

    exchange: str
    max_priority: int = 10
    queue_type: str = CLASSIC
    lanes: int = DEFAULT_LANES
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise TaskiqConfigError(
                f"config_source queue_type must be 'classic' or 'quorum', not {self.queue_type!r}."
            )
        if self.queue_type == QUORUM and not 1 <= self.lanes <= self.max_priority + 1:
            raise TaskiqConfigError(
                f"config_source priority_lanes must be between 1 and max_priority + 1 "
                f"({self.max_priority + 1}), not {self.lanes!r}."
            )
        if self.delivery_limit < 1:
            raise TaskiqConfigError(
                f"config_source delivery_limit must be at least 1, not {self.delivery_limit!r}."
            )

    @property
    def lane_count(self) -> int:
        """Lanes per queue (1 for classic queues, which order by priority themselves)."""
        return self.lanes if self.queue_type == QUORUM else 1

    def physical_queues(self, queue: str) -> list[str]:
        """The RabbitMQ queues behind ``queue``, lowest lane first."""
        if self.queue_type != QUORUM:
            return [queue]
        return [lane_queue(queue, lane) for lane in range(self.lanes)]

    def queue_for(self, queue: str, priority: int) -> str:
        """The RabbitMQ queue a message of ``priority`` for ``queue`` is published to."""
        if self.queue_type != QUORUM:
            return queue
        return lane_queue(queue, lane_of(priority, self.max_priority, self.lanes))

    def logical(self, physical: str) -> str:
        """The queue name a RabbitMQ queue serves (a lane's suffix removed)."""
        if self.queue_type != QUORUM:
            return physical
        return _LANE_SUFFIX.sub("", physical)

    def arguments(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The ``x-`` arguments every task queue is declared with."""
        if self.queue_type != QUORUM:
            return {**extra, "x-max-priority": self.max_priority, "x-queue-type": CLASSIC}
        return {
            **extra,
            "x-queue-type": QUORUM,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    @property
    def dead_letter_exchange(self) -> str:
        """The fanout exchange quorum queues dead-letter poison messages to."""
        return f"{self.exchange}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """The queue behind :attr:`dead_letter_exchange` that workers drain."""
        return f"{self.exchange}.dead-letters"

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        """The dead-letter queue's arguments: a quorum queue itself, so it survives a node."""
        return {"x-queue-type": QUORUM} if self.queue_type == QUORUM else {}


def _first_death(headers: Mapping[str, Any] | None) -> Mapping[str, Any]:
    deaths = (headers or {}).get("x-death") or []
    first = deaths[0] if deaths else {}
    return first if isinstance(first, Mapping) else {}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def origin_queue(headers: Mapping[str, Any] | None) -> str | None:
    """The queue (lane suffix removed) a dead-lettered message came from, per its ``x-death``."""
    queue = _first_death(headers).get("queue")
    return _LANE_SUFFIX.sub("", _text(queue)) if queue else None


def dead_letter_reason(headers: Mapping[str, Any] | None, delivery_limit: int) -> str:
    """A one-line reason for a message RabbitMQ dead-lettered, from its ``x-death`` header."""
    death = _first_death(headers)
    queue = _text(death.get("queue", "?"))
    why = _text(death.get("reason", "unknown"))
    delivered = (headers or {}).get("x-delivery-count")
    count = f", x-delivery-count {_text(delivered)}" if delivered is not None else ""
    return (
        f"RabbitMQ dead-lettered it from queue '{queue}' ({why}{count}): it was delivered more "
        f"than delivery_limit ({delivery_limit}) times without being acknowledged (a worker died "
        "or was stopped with it each time). Check the workers' logs, then replay or purge it."
    )
