"""``taskiq_executor``: a ``StepDelegatingExecutor`` whose steps run on taskiq workers."""

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

from dagster import DagsterInstance, Field, executor

from dagster_taskiq.compat import (
    DagsterEvent,
    Executor,
    InitExecutorContext,
    RetryMode,
    StepDelegatingExecutor,
    get_retries_config,
    get_tag_concurrency_limits_config,
    multiple_process_executor_requirements,
)
from dagster_taskiq.config import (
    TaskiqSettings,
    executor_only_schema,
    resolve_settings,
    shared_config_schema,
)
from dagster_taskiq.connection import TaskiqClient
from dagster_taskiq.literal_secrets import warn_literal_secrets
from dagster_taskiq.step_handler import TaskiqStepHandler
from dagster_taskiq.storage_connections import sqlite_event_log_kept_open


def executor_config_schema() -> dict[str, Field]:
    """The executor's config schema (also used to validate the CLI's ``--config-yaml``)."""
    return {
        **shared_config_schema(),
        **executor_only_schema(),
        "retries": get_retries_config(),
        "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    }


#: Longest one orchestrator tick waits for a worker's "step finished" wake-up. A wake-up ends the
#: wait at once, so this bounds only how soon the loop notices what sends none: a termination
#: request, a pool slot freed by another run, a retry delay running out. Each wait is one Redis
#: command, so a shorter wait costs every waiting run more commands per second.
WAKE_WAIT_SECONDS = 1.0
#: The event log is read at least this often even without a wake-up: for events the orchestrator
#: logs itself (a failed health check) and for workers that send no wake-ups.
FULL_POLL_SECONDS = 1.0


class TaskiqExecutor(StepDelegatingExecutor):
    """Dagster's step-delegating loop, plus connection set-up and tear-down around a run.

    The broker is contacted before the first step is launched, so an unreachable broker fails the
    run at once with a clear message, and the bridge thread and connections are closed when the
    run's orchestration ends.

    Instead of querying the event log on every tick, the loop blocks on a Redis list that workers
    push to when a step task of this run finishes (its events are in the log by then), and reads
    the log only then, or at least every ``FULL_POLL_SECONDS``. A hop costs one wake-up instead of
    a poll interval, and an orchestrator waiting on long steps uses almost no CPU.

    With SQLite storage, the run's event database is used through one connection held open while
    the run is orchestrated (see :mod:`dagster_taskiq.storage_connections`).
    """

    def __init__(self, step_handler: TaskiqStepHandler, **kwargs: Any) -> None:
        super().__init__(step_handler, **kwargs)
        self._taskiq_client = step_handler.client
        self._last_full_pop = 0.0

    def _pop_events(
        self, instance: DagsterInstance, run_id: str, seen_storage_ids: set[int]
    ) -> Sequence[DagsterEvent]:
        if time.monotonic() - self._last_full_pop < FULL_POLL_SECONDS:
            try:
                woke = self._taskiq_client.run(
                    lambda conn: asyncio.wait_for(
                        conn.keystore.wait_run_wake(run_id, WAKE_WAIT_SECONDS),
                        WAKE_WAIT_SECONDS + 1.0,
                    )
                )
            except Exception:
                woke = True  # cannot wait on Redis: read the event log instead
            if not woke and time.monotonic() - self._last_full_pop < FULL_POLL_SECONDS:
                return []
        self._last_full_pop = time.monotonic()
        return super()._pop_events(instance, run_id, seen_storage_ids)

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        """Connect, run Dagster's orchestration loop, then close the connection."""
        self._taskiq_client.connect()
        warn_literal_secrets(plan_context.instance, plan_context.dagster_run)
        try:
            with sqlite_event_log_kept_open(plan_context.instance):
                yield from super().execute(plan_context, execution_plan)
        finally:
            self._taskiq_client.close()


def launcher_settings(init_context: InitExecutorContext) -> TaskiqSettings | None:
    """The run launcher's settings when the instance uses :class:`TaskiqRunLauncher`."""
    from dagster_taskiq.launcher import TaskiqRunLauncher

    launcher = getattr(init_context.instance, "_run_launcher", None)
    if launcher is None:
        try:
            launcher = init_context.instance.run_launcher
        except Exception:
            return None
    return launcher.settings if isinstance(launcher, TaskiqRunLauncher) else None


def health_check_interval(settings: TaskiqSettings) -> int:
    """How often (whole seconds, as Dagster wants) the orchestrator checks running steps."""
    return max(1, min(5, int(settings.heartbeat_timeout // 4)))


@executor(
    name="taskiq",
    config_schema=executor_config_schema(),
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context: InitExecutorContext) -> Executor:
    """Run each step of a job on taskiq workers, routed by queue tag and ordered by priority.

    Start workers with ``dagster-taskiq worker start -q dagster``. Example:

    .. code-block:: python

        from dagster import job
        from dagster_taskiq import taskiq_executor

        @job(executor_def=taskiq_executor)
        def my_job(): ...

    Config keys: ``broker``, ``backend``, ``default_queue``, ``retries``, ``max_concurrent``,
    ``tag_concurrency_limits``, ``heartbeat_timeout``, ``config_source`` and ``poll_interval``.
    """
    config: dict[str, Any] = dict(init_context.executor_config)
    settings = resolve_settings(config, launcher_settings(init_context))
    return TaskiqExecutor(
        TaskiqStepHandler(TaskiqClient(settings)),
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        sleep_seconds=float(config.get("poll_interval", 0.02)),
        check_step_health_interval_seconds=health_check_interval(settings),
        should_verify_step=True,
    )
