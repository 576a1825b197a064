"""Jobs for the Dagster UI facts tests: steps on a served queue and on a queue nobody serves.

The queue is per test (so parallel tests never share a RabbitMQ queue): jobs are built by a
factory and made reconstructable with :func:`recon`.
"""

from typing import Any

from dagster import JobDefinition, job, op
from dagster._core.definitions.reconstruct import ReconstructableJob, build_reconstructable_job

from dagster_taskiq import taskiq_executor
from dagster_taskiq.tags import QUEUE_TAG


def recon(factory: str, **kwargs: Any) -> ReconstructableJob:
    """A reconstructable job built by calling ``factory(**kwargs)`` from this module."""
    return build_reconstructable_job(__name__, factory, reconstructable_kwargs=kwargs)


def served_and_unserved_job(unserved_queue: str) -> JobDefinition:
    """``here`` on the default queue; ``there_a`` and ``there_b`` on ``unserved_queue``."""

    @op
    def here() -> int:
        return 1

    @op(tags={QUEUE_TAG: unserved_queue})
    def there_a() -> int:
        return 2

    @op(tags={QUEUE_TAG: unserved_queue})
    def there_b() -> int:
        return 3

    @job(executor_def=taskiq_executor)
    def served_and_unserved() -> None:
        here()
        there_a()
        there_b()

    return served_and_unserved
