"""The one error hierarchy of dagster-taskiq.

Every error this package raises on purpose derives from :class:`DagsterTaskiqError`, and every
message names what it is about (run, step, queue, task, worker) and what the user can do next.
"""

from dagster import DagsterError


class DagsterTaskiqError(DagsterError):
    """Base class for every error raised by dagster-taskiq."""


class TaskiqConfigError(DagsterTaskiqError):
    """The executor, launcher or CLI configuration is invalid (e.g. an unknown URL scheme)."""


class BrokerUnavailableError(DagsterTaskiqError):
    """The broker or the Redis backend could not be reached within the connect deadline."""


class InvalidTagError(DagsterTaskiqError):
    """A ``dagster-taskiq/*`` tag on an op, job or run has a value we cannot use."""


class TaskSubmissionError(DagsterTaskiqError):
    """A task could not be sent to the broker (too large, or the broker refused it)."""


class UnknownWorkerError(DagsterTaskiqError):
    """A CLI command named a worker that is not alive."""


class BadMessageError(DagsterTaskiqError):
    """A worker received a message it will not run (undecodable, unknown task, bad arguments)."""
