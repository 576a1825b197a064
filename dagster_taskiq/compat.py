"""The one place dagster-taskiq touches Dagster's internals (``dagster._...``, ``dagster_shared``).

Dagster's public API does not cover everything an executor, a run launcher and a worker need
(step handlers, execution plans, serdes, the sqlite storages, ...), so the package uses some
internals. Every such import lives here and the rest of the package imports the names from
``dagster_taskiq.compat``. When a new Dagster minor line moves or renames an internal, this is
the only file to edit (add a ``try``/``except ImportError`` or a version switch next to the
affected import).

Most names are imported eagerly: their modules are already loaded by ``import dagster_taskiq``
(the executor and launcher need them), so this costs nothing. The names in
``_LAZY_IMPORTS`` come from modules that are heavy and are only needed by the worker's task
bodies or on first use of a sqlite run storage; they are imported on first attribute access
(PEP 562 module ``__getattr__``), so ``import dagster_taskiq.cli`` does not pay for them.
``from dagster_taskiq.compat import verify_step`` works as usual and triggers that import.
"""

import importlib
from typing import TYPE_CHECKING, Any

# -- dagster (private submodule exposed on the top-level package) ---------------------------------
# Argument/invariant checks (``check.inst_param`` etc.).
from dagster import _check as check

# -- dagster._config ------------------------------------------------------------------------------
# Validating a config dict against a schema outside a run (the CLI's ``-y`` files).
from dagster._config import process_config
from dagster._config.field import Field

# -- dagster._core.definitions --------------------------------------------------------------------
# Executor requirements, and reconstructing jobs/repositories in another process.
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.definitions.repository_definition import RepositoryLoadData

# -- dagster._core.events -------------------------------------------------------------------------
# Events the executor, step handler, launcher and worker report.
from dagster._core.events import DagsterEvent, EngineEventData

# -- dagster._core.execution ----------------------------------------------------------------------
# Building and running execution plans; retries and concurrency-limit config; step stats;
# ``compute_logs`` (the module itself: the worker patches its ``execute_posix_tail``).
from dagster._core.execution import compute_logs
from dagster._core.execution.api import create_execution_plan, execute_plan_iterator
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.stats import RunStepKeyStatsSnapshot, StepEventStatus
from dagster._core.execution.tags import get_tag_concurrency_limits_config

# -- dagster._core.executor -----------------------------------------------------------------------
# The step-delegating executor and the step-handler interface it drives.
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster._core.executor.step_delegating.step_handler.base import (
    CheckStepHealthResult,
    StepHandler,
    StepHandlerContext,
)

# -- dagster._core.instance -----------------------------------------------------------------------
# Serializable reference to a Dagster instance (sent to workers).
from dagster._core.instance.ref import InstanceRef

# -- dagster._core.launcher -----------------------------------------------------------------------
# The run-launcher interface.
from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
    WorkerStatus,
)

# -- dagster._core.origin -------------------------------------------------------------------------
# Where a job's code lives (sent to workers).
from dagster._core.origin import JobPythonOrigin

# -- dagster._core.storage ------------------------------------------------------------------------
# Runs, and the sqlite event log (``sqlite_event_log`` is the module, for its busy timeout).
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

# -- dagster._core.system_config ------------------------------------------------------------------
# Resolved run config (cached by warm workers).
from dagster._core.system_config.objects import ResolvedRunConfig

# -- dagster._grpc --------------------------------------------------------------------------------
# The step-execution arguments Dagster's own step workers receive.
from dagster._grpc.types import ExecuteStepArgs

# -- dagster._serdes ------------------------------------------------------------------------------
# Serialization of payloads and of the launcher's config.
from dagster._serdes import (
    ConfigurableClass,
    ConfigurableClassData,
    deserialize_value,
    serialize_value,
    whitelist_for_serdes,
)

# -- dagster._utils -------------------------------------------------------------------------------
# Turning an exception into Dagster's serializable error info.
from dagster._utils.error import serializable_error_info_from_exc_info

# -- dagster_shared (Dagster's internal support package) ------------------------------------------
# The error record that step failures and task outcomes carry (serdes).
from dagster_shared.error import SerializableErrorInfo

if TYPE_CHECKING:
    # Imported lazily at run time (see ``_LAZY_IMPORTS``); here for type checkers only.
    # -- dagster._cli: checking a step may run (worker task bodies).
    from dagster._cli.api import verify_step

    # -- dagster._core.storage.runs: the sqlite run storage (engine reuse).
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    # -- dagster._grpc: running a whole run in the worker.
    from dagster._grpc.impl import core_execute_run

    # -- dagster._utils: loading a job from its origin in the worker.
    from dagster._utils.hosted_user_process import recon_job_from_origin

#: Names imported on first access: name -> Dagster module it comes from. These modules are not
#: loaded by ``import dagster_taskiq`` (``dagster._cli.api`` and the sqlite run storage alone add
#: ~80 ms), so importing them eagerly here would slow the CLI and worker start-up.
_LAZY_IMPORTS: dict[str, str] = {
    "verify_step": "dagster._cli.api",
    "SqliteRunStorage": "dagster._core.storage.runs.sqlite.sqlite_run_storage",
    "core_execute_run": "dagster._grpc.impl",
    "recon_job_from_origin": "dagster._utils.hosted_user_process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_IMPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CheckRunHealthResult",
    "CheckStepHealthResult",
    "ConfigurableClass",
    "ConfigurableClassData",
    "DagsterEvent",
    "DagsterRun",
    "EngineEventData",
    "ExecuteStepArgs",
    "ExecutionPlan",
    "Executor",
    "Field",
    "InitExecutorContext",
    "InstanceRef",
    "JobPythonOrigin",
    "KnownExecutionState",
    "LaunchRunContext",
    "ReconstructableJob",
    "ReconstructableRepository",
    "RepositoryLoadData",
    "ResolvedRunConfig",
    "ResumeRunContext",
    "RetryMode",
    "RunLauncher",
    "RunStepKeyStatsSnapshot",
    "SerializableErrorInfo",
    "SqliteEventLogStorage",
    "SqliteRunStorage",
    "StepDelegatingExecutor",
    "StepEventStatus",
    "StepHandler",
    "StepHandlerContext",
    "WorkerStatus",
    "check",
    "compute_logs",
    "core_execute_run",
    "create_context_free_log_manager",
    "create_execution_plan",
    "deserialize_value",
    "execute_plan_iterator",
    "get_retries_config",
    "get_tag_concurrency_limits_config",
    "multiple_process_executor_requirements",
    "process_config",
    "recon_job_from_origin",
    "serializable_error_info_from_exc_info",
    "serialize_value",
    "sqlite_event_log",
    "verify_step",
    "whitelist_for_serdes",
]
