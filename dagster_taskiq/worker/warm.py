"""What a worker keeps warm in its parent process so that each forked child starts fast.

The parent imports the job's code and builds the Dagster instance once; children inherit both
through ``fork``. Database connection pools are not shared across the fork: the child drops its
inherited pool handles (without closing the parent's sockets) before it touches the database.

Per run, the parent also keeps what every step of that run would otherwise rebuild in its child:

* the run's **execution plan** (built once from the run's job, subset and config; a child only
  cuts its one-step subset from it, which costs O(1) instead of O(steps) — this turns a fan-out's
  plan building from quadratic into linear), and
* an opened **event-log shard**: Dagster's default sqlite storage keeps one database per run and
  checks its schema (alembic) the first time a process touches it; doing that once in the parent
  spares every child the check, and
* a **rehearsal** of what each step's process does first (see :mod:`.rehearsal`).

A plan whose known state carries dynamic mappings is not taken from the cache: those mappings
change the plan's shape, so such steps build their plan as before.
"""

import collections
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, JobDefinition

from dagster_taskiq.compat import (
    DagsterRun,
    ExecutionPlan,
    InstanceRef,
    JobPythonOrigin,
    KnownExecutionState,
    ReconstructableJob,
    RepositoryLoadData,
    ResolvedRunConfig,
    SqliteEventLogStorage,
    create_execution_plan,
    recon_job_from_origin,
)
from dagster_taskiq.storage_connections import (
    close_sqlite_connections,
    keep_sqlite_connections_open,
    pool_connections_in_task_process,
    reuse_sqlite_engines,
)
from dagster_taskiq.worker.logtail import use_thread_mirroring
from dagster_taskiq.worker.rehearsal import rehearse_step_process
from dagster_taskiq.worker.storage_ready import instance_storage_ready

logger = logging.getLogger("dagster_taskiq.worker")

#: Runs whose plans a worker keeps (least recently used ones are dropped).
MAX_CACHED_RUNS = 8


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's job and full execution plan, built once in the worker's parent process."""

    recon_job: ReconstructableJob
    job_def: JobDefinition
    resolved_run_config: ResolvedRunConfig
    plan: ExecutionPlan

    def step_plan(
        self, step_keys: Sequence[str], known_state: KnownExecutionState | None
    ) -> ExecutionPlan:
        """The plan for ``step_keys`` alone, as ``create_execution_plan`` would build it."""
        full = self.plan._replace(known_state=known_state or KnownExecutionState())
        return full.build_subset_plan(step_keys, self.job_def, self.resolved_run_config)


class WarmCache:
    """Per-worker cache of Dagster instances and loaded job code, shared with children by fork."""

    def __init__(self) -> None:
        self._instances: dict[str, DagsterInstance] = {}
        self._jobs: dict[str, ReconstructableJob] = {}
        self._own_instance: DagsterInstance | None = None
        self._runs: collections.OrderedDict[str, RunPlan] = collections.OrderedDict()

    def instance(self, ref: InstanceRef | None) -> DagsterInstance:
        """The instance for ``ref`` (the worker's own instance when ``ref`` is None)."""
        if ref is None:
            return self.own_instance()
        key = repr(ref)  # a plain value (strings, dicts, tuples): its repr is its identity
        if key not in self._instances:
            self._instances[key] = _opened(DagsterInstance.from_ref(ref))
        return self._instances[key]

    def own_instance(self) -> DagsterInstance:
        """The instance the worker is configured with (``DAGSTER_HOME``)."""
        if self._own_instance is None:
            self._own_instance = _opened(DagsterInstance.get())
        return self._own_instance

    def preload_own_instance(self) -> bool:
        """Open the worker's own instance (``DAGSTER_HOME``) ahead of the first task.

        It is filed under its own ref as well, so a task whose ref is the same (workers and
        orchestrators sharing one ``dagster.yaml``) finds it open. Done only when that cannot
        create storage (see :func:`instance_storage_ready`): SQLite storage opened while the
        webserver or an orchestrator creates it could meet a half-made schema. Returns whether
        it is now open.
        """
        home = os.environ.get("DAGSTER_HOME")
        if self._own_instance is None and (not home or not instance_storage_ready(Path(home))):
            return False
        instance = self.own_instance()
        self._instances.setdefault(repr(instance.get_ref()), instance)
        return True

    def run_instance(self, ref: InstanceRef | None) -> DagsterInstance:
        """Instance for a run task: the worker's own if DAGSTER_HOME is set, else ``ref``."""
        if os.environ.get("DAGSTER_HOME") or ref is None:
            return self.own_instance()
        return self.instance(ref)

    def recon_job(self, origin: JobPythonOrigin) -> ReconstructableJob:
        """The reconstructable job for ``origin``, with its code imported once per worker."""
        key = repr(origin)
        if key not in self._jobs:
            job = recon_job_from_origin(origin)
            job.get_definition()
            self._jobs[key] = job
        return self._jobs[key]

    def job_for_run(
        self, instance: DagsterInstance, dagster_run: DagsterRun
    ) -> tuple[ReconstructableJob, RepositoryLoadData | None]:
        """The run's (subsetted) job and repository load data, as the run itself resolved them."""
        repository_load_data = None
        if dagster_run.has_repository_load_data and dagster_run.execution_plan_snapshot_id:
            repository_load_data = instance.get_execution_plan_snapshot(
                dagster_run.execution_plan_snapshot_id
            ).repository_load_data
        origin = dagster_run.job_code_origin
        if origin is None:
            raise ValueError(f"Run {dagster_run.run_id} has no job code origin.")
        recon_job = (
            self.recon_job(origin)
            .with_repository_load_data(repository_load_data)
            .get_subset(
                op_selection=dagster_run.resolved_op_selection,
                asset_selection=dagster_run.asset_selection,
                asset_check_selection=dagster_run.asset_check_selection,
            )
        )
        return recon_job, repository_load_data

    def warm_up(
        self,
        origin: JobPythonOrigin | None,
        ref: InstanceRef | None,
        run_id: str | None = None,
    ) -> DagsterRun | None:
        """Import the job code, open the instance and prepare the run, before forking children.

        Returns the run as stored now (None if it cannot be read here): the child runs with it
        instead of reading it again through a freshly forked connection.
        """
        try:
            instance = self.instance(ref)
            if origin is not None:
                self.recon_job(origin)
            if run_id is None:
                return None
            dagster_run = instance.get_run_by_id(run_id)
            if dagster_run is not None:
                self.prepare_run(instance, run_id, dagster_run)
            return dagster_run
        except Exception:
            logger.warning(
                "Could not pre-load job code, instance or plan; the task will retry it.",
                exc_info=True,
            )
            return None

    def warm_up_run(self, run_id: str, ref: InstanceRef | None) -> None:
        """For a whole-run task: open the run's instance, import its job code and touch its
        event-log shard in the parent, so the forked run process starts warm."""
        try:
            instance = self.run_instance(ref)
            dagster_run = instance.get_run_by_id(run_id)
            if dagster_run is not None and dagster_run.job_code_origin is not None:
                self.recon_job(dagster_run.job_code_origin)
                _open_event_shard(instance, run_id)
        except Exception:
            logger.warning(
                "Could not pre-load the instance or job code of run %s; its process will.",
                run_id,
                exc_info=True,
            )

    def prepare_run(
        self, instance: DagsterInstance, run_id: str, dagster_run: DagsterRun | None = None
    ) -> RunPlan | None:
        """Build (once) what every step of ``run_id`` shares; None if the run does not exist."""
        cached = self._runs.get(run_id)
        if cached is not None:
            self._runs.move_to_end(run_id)
            return cached
        began = time.perf_counter()
        if dagster_run is None:
            dagster_run = instance.get_run_by_id(run_id)
        if dagster_run is None:
            return None
        _open_event_shard(instance, run_id)
        recon_job, repository_load_data = self.job_for_run(instance, dagster_run)
        job_def = recon_job.get_definition()
        resolved_run_config = ResolvedRunConfig.build(job_def, dagster_run.run_config)
        plan = ExecutionPlan.build(
            job_def,
            resolved_run_config,
            known_state=KnownExecutionState(),
            repository_load_data=repository_load_data,
        )
        run_plan = RunPlan(recon_job, job_def, resolved_run_config, plan)
        planned = time.perf_counter()
        rehearse_step_process(instance, dagster_run, plan)
        done = time.perf_counter()
        logger.debug(
            "Prepared run %s for its steps in %.1f ms (plan %.1f ms, rehearsal %.1f ms).",
            run_id,
            (done - began) * 1000,
            (planned - began) * 1000,
            (done - planned) * 1000,
        )
        self._runs[run_id] = run_plan
        while len(self._runs) > MAX_CACHED_RUNS:
            self._runs.popitem(last=False)
        return run_plan

    def step_plan(
        self,
        instance: DagsterInstance,
        dagster_run: DagsterRun,
        step_keys: Sequence[str] | None,
        known_state: KnownExecutionState | None,
    ) -> tuple[ReconstructableJob, ExecutionPlan]:
        """The job and the plan to execute ``step_keys`` of ``dagster_run`` in this process.

        Cut from the run's cached plan when the parent prepared it; built from scratch otherwise,
        and always for a known state with dynamic mappings (they change the plan's shape).
        """
        cached = self._runs.get(dagster_run.run_id)
        dynamic = known_state is not None and bool(known_state.dynamic_mappings)
        if cached is not None and step_keys and not dynamic:
            return cached.recon_job, cached.step_plan(step_keys, known_state)
        recon_job, repository_load_data = self.job_for_run(instance, dagster_run)
        plan = create_execution_plan(
            recon_job,
            run_config=dagster_run.run_config,
            step_keys_to_execute=step_keys,
            known_state=known_state,
            repository_load_data=repository_load_data,
        )
        return recon_job, plan

    def after_fork(self) -> None:
        """In a child: leave the inherited heap to the parent, forget inherited database pool
        connections (the parent keeps them), keep one connection per storage (and per SQLite
        database) for the task's life, and mirror captured logs with a thread.

        ``gc.freeze()`` moves every inherited object out of the collector's reach (in constant
        time), so the child's collections do not write to, and so copy, the parent's pages.
        """
        gc.freeze()
        for instance in self._all_instances():
            _dispose_engines(instance)
            pool_connections_in_task_process(instance)
            keep_sqlite_connections_open(instance)
        use_thread_mirroring()

    def before_exit(self) -> None:
        """In a child, once its task is done: close the database connections it kept open."""
        for instance in self._all_instances():
            close_sqlite_connections(instance)

    def _all_instances(self) -> list[DagsterInstance]:
        own = [self._own_instance] if self._own_instance is not None else []
        return [*self._instances.values(), *own]


def _opened(instance: DagsterInstance) -> DagsterInstance:
    """``instance`` with its lazily built parts that every step uses built now (in the parent).

    The compute log manager is created (and its modules imported) on first use; without this,
    every step's process would do it again. SQLite run databases get engines built once.
    """
    reuse_sqlite_engines(instance)
    try:
        instance.compute_log_manager  # noqa: B018
    except Exception:
        logger.debug("Could not set up the compute log manager early.", exc_info=True)
    return instance


def _open_event_shard(instance: DagsterInstance, run_id: str) -> None:
    """Touch the run's sqlite event-log shard so its one-time schema check happens here."""
    storage = instance.event_log_storage
    if isinstance(storage, SqliteEventLogStorage):
        storage.get_records_for_run(run_id, limit=1)


def _dispose_engines(instance: DagsterInstance) -> None:
    seen: set[int] = set()
    stack: list[Any] = [instance.run_storage, instance.event_log_storage, instance.schedule_storage]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        engine = getattr(obj, "_engine", None)
        if engine is not None and hasattr(engine, "dispose"):
            engine.dispose(close=False)
        for attr in ("_storage", "_run_storage", "_event_log_storage", "_schedule_storage"):
            stack.append(getattr(obj, attr, None))
