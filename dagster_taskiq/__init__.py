"""dagster-taskiq: run Dagster steps and runs on taskiq workers over Redis or RabbitMQ."""

from dagster_taskiq.executor import taskiq_executor
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.version import __version__

__all__ = ["TaskiqRunLauncher", "__version__", "taskiq_executor"]
