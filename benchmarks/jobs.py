"""The benchmark jobs: trivial ops in chains, fan-outs and sleeps, one job per executor family.

Jobs are built on first access (module ``__getattr__``) so that a worker that imports this module
pays only for the jobs it actually runs. A job's attribute name is ``<shape>__<family>``, for
example ``fanout_100__taskiq``; :func:`job_name` builds it and :func:`recon` returns the
reconstructable job that every process (orchestrator, workers, forkserver) loads by module path.
"""

import functools
import time
from typing import Any

from dagster import (
    ExecutorDefinition,
    GraphDefinition,
    In,
    JobDefinition,
    in_process_executor,
    multiprocess_executor,
    op,
)
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq import taskiq_executor

MODULE = __name__

#: Executor families. Two benchmark executors may share a family (Redis and RabbitMQ taskiq).
FAMILIES = ("taskiq", "in_process", "multiprocess", "celery")


@op
def start() -> int:
    """The first op of every chain and fan-out."""
    return 1


@op
def hop(value: int) -> int:
    """One link of a chain: pass a small value on."""
    return value + 1


@op
def leaf(value: int) -> int:
    """One branch of a fan-out."""
    return value * 2


@op(ins={"values": In(list[int])})
def collect(values: list[int]) -> int:
    """Fan-in of a fan-out."""
    return sum(values)


@op
def nap() -> float:
    """Sleep one second (the sleepy scenario's parallelism probe)."""
    time.sleep(1.0)
    return 1.0


def _graph(name: str, compose: Any) -> GraphDefinition:
    from dagster import graph

    compose.__name__ = name
    return graph(name=name)(compose)


def chain_graph(length: int) -> GraphDefinition:
    """``start`` followed by ``length - 1`` hops, each depending on the previous one."""

    def compose() -> None:
        value = start()
        for index in range(1, length):
            value = hop.alias(f"hop_{index}")(value)

    return _graph(f"chain_{length}", compose)


def fanout_graph(width: int) -> GraphDefinition:
    """``start`` → ``width`` independent leaves → ``collect``: ``width + 2`` steps."""

    def compose() -> None:
        root = start()
        collect([leaf.alias(f"leaf_{index}")(root) for index in range(width)])

    return _graph(f"fanout_{width}", compose)


def sleepy_graph(count: int = 8) -> GraphDefinition:
    """``count`` independent ops that each sleep one second."""

    def compose() -> None:
        for index in range(count):
            nap.alias(f"nap_{index}")()

    return _graph(f"sleepy_{count}" if count != 8 else "sleepy", compose)


def tiny_graph() -> GraphDefinition:
    """Two ops: the small run of the ``runs_50`` scenario."""

    def compose() -> None:
        hop(start())

    return _graph("tiny", compose)


def nap_graph() -> GraphDefinition:
    """One op that sleeps one second: a step child that stays alive long enough to be measured."""

    def compose() -> None:
        nap()

    return _graph("nap", compose)


def _executor(family: str) -> ExecutorDefinition:
    if family == "taskiq":
        return taskiq_executor
    if family == "in_process":
        return in_process_executor
    if family == "multiprocess":
        return multiprocess_executor
    if family == "celery":
        from dagster_celery import celery_executor  # optional extra "bench"

        return celery_executor
    raise ValueError(f"Unknown executor family {family!r}; expected one of {FAMILIES}.")


def shape_graph(shape: str) -> GraphDefinition:
    """The graph for a shape: ``chain_<n>``, ``fanout_<n>``, ``sleepy[_<n>]``, ``tiny``, ``nap``."""
    if shape.startswith("chain_"):
        return chain_graph(int(shape.split("_", 1)[1]))
    if shape.startswith("fanout_"):
        return fanout_graph(int(shape.split("_", 1)[1]))
    if shape == "sleepy":
        return sleepy_graph()
    if shape.startswith("sleepy_"):
        return sleepy_graph(int(shape.split("_", 1)[1]))
    if shape == "tiny":
        return tiny_graph()
    if shape == "nap":
        return nap_graph()
    raise ValueError(f"Unknown job shape {shape!r}.")


def job_name(shape: str, family: str) -> str:
    """Attribute (and Dagster job) name of ``shape`` run on ``family``."""
    return f"{shape}__{family}"


@functools.cache
def build_job(name: str) -> JobDefinition:
    """Build the job called ``name`` (``<shape>__<family>``)."""
    shape, _, family = name.partition("__")
    return shape_graph(shape).to_job(name=name, executor_def=_executor(family))


def recon(shape: str, family: str) -> ReconstructableJob:
    """The reconstructable job that every process loads as ``benchmarks.jobs.<name>``."""
    return ReconstructableJob.for_module(MODULE, job_name(shape, family))


def __getattr__(name: str) -> JobDefinition:
    if "__" in name and not name.startswith("_"):
        try:
            return build_job(name)
        except ValueError:
            pass
    raise AttributeError(f"module {MODULE!r} has no attribute {name!r}")
