"""Priority lanes and declare arguments of RabbitMQ classic and quorum queues (no network)."""

import pytest

from dagster_taskiq.brokers.lanes import (
    QueueLayout,
    dead_letter_reason,
    lane_of,
    lane_queue,
    origin_queue,
)
from dagster_taskiq.config import TaskiqSettings, check_config_source
from dagster_taskiq.errors import TaskiqConfigError


def test_lanes_split_the_priority_range_into_equal_bands() -> None:
    assert [lane_of(p, 10, 3) for p in range(11)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert [lane_of(p, 10, 1) for p in range(11)] == [0] * 11
    assert [lane_of(p, 3, 4) for p in range(4)] == [0, 1, 2, 3]
    # Out-of-range priorities are clamped first.
    assert lane_of(-5, 10, 3) == 0
    assert lane_of(99, 10, 3) == 2
    assert lane_queue("steps", 2) == "steps.p2"


def test_quorum_layout_maps_a_queue_to_its_lanes() -> None:
    layout = QueueLayout(exchange="ex", queue_type="quorum", lanes=3)
    assert layout.lane_count == 3
    assert layout.physical_queues("steps") == ["steps.p0", "steps.p1", "steps.p2"]
    assert layout.queue_for("steps", 9) == "steps.p2"
    assert layout.queue_for("steps", 0) == "steps.p0"
    assert layout.logical("steps.p1") == "steps"
    assert layout.logical("a.p9.b.p0") == "a.p9.b"


def test_classic_layout_is_one_queue_per_name() -> None:
    layout = QueueLayout(exchange="ex")
    assert layout.lane_count == 1
    assert layout.physical_queues("steps") == ["steps"]
    assert layout.queue_for("steps", 9) == "steps"
    assert layout.logical("steps.p1") == "steps.p1"


def test_declare_arguments() -> None:
    classic = QueueLayout(exchange="ex", max_priority=7)
    assert classic.arguments({"x-expires": 1000}) == {
        "x-expires": 1000,
        "x-max-priority": 7,
        "x-queue-type": "classic",
    }
    quorum = QueueLayout(exchange="ex", queue_type="quorum", delivery_limit=4)
    arguments = quorum.arguments({"x-expires": 1000})
    assert arguments == {
        "x-expires": 1000,
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": "ex.dlx",
    }
    assert "x-max-priority" not in arguments
    assert quorum.dead_letter_queue == "ex.dead-letters"
    assert quorum.dead_letter_queue_arguments() == {"x-queue-type": "quorum"}


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"queue_type": "stream"}, "queue_type"),
        ({"queue_type": "quorum", "lanes": 0}, "priority_lanes"),
        ({"queue_type": "quorum", "lanes": 12}, "priority_lanes"),
        ({"delivery_limit": 0}, "delivery_limit"),
    ],
)
def test_bad_layouts_are_config_errors(options: dict[str, object], word: str) -> None:
    with pytest.raises(TaskiqConfigError, match=word):
        QueueLayout(exchange="ex", **options)  # type: ignore[arg-type]


def test_new_options_are_known_config_source_keys() -> None:
    check_config_source({"queue_type": "quorum", "priority_lanes": 2, "delivery_limit": 3})


def test_factory_builds_a_quorum_broker_from_config_source() -> None:
    from dagster_taskiq.brokers.factory import make_broker
    from dagster_taskiq.brokers.rabbitmq import RoutedAioPikaBroker
    from dagster_taskiq.redis_clients import make_redis

    settings = TaskiqSettings(
        broker_url="amqp://guest:guest@127.0.0.1:5672/",
        backend_url="redis://127.0.0.1:6379/0",
        config_source={"queue_type": "quorum", "priority_lanes": 2, "delivery_limit": 3},
    )
    backend = make_redis(settings.backend_url, settings)  # a client object; nothing connects
    broker = make_broker(settings, broker_redis=None, backend_redis=backend)
    assert isinstance(broker, RoutedAioPikaBroker)
    assert broker.layout.queue_type == "quorum"
    assert broker.layout.lanes == 2 and broker.layout.delivery_limit == 3


def test_dead_letter_headers_name_the_origin_and_reason() -> None:
    headers = {
        "x-death": [{"queue": b"steps.p2", "reason": b"delivery_limit", "count": 1}],
        "x-delivery-count": 5,
    }
    assert origin_queue(headers) == "steps"
    reason = dead_letter_reason(headers, 5)
    assert "steps.p2" in reason and "delivery_limit" in reason and "replay" in reason
    assert origin_queue({}) is None
    assert "unknown" in dead_letter_reason(None, 5)
