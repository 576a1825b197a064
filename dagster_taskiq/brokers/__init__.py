"""taskiq brokers used by dagster-taskiq, chosen by the broker URL's scheme."""

from dagster_taskiq.brokers.factory import PRIORITY_LABEL, QUEUE_LABEL, make_broker, make_redis

__all__ = ["PRIORITY_LABEL", "QUEUE_LABEL", "make_broker", "make_redis"]
