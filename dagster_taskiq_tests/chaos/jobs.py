"""The chaos job, the code a forged message names, and the orchestrator entry point.

``chaos_job``: ``fan_0 .. fan_3`` (no inputs, all start at once) feed ``join``. Every op body is
recorded in the ledger (:mod:`.ledger`), sleeps ``sleep`` seconds (``join_sleep`` for the join)
and, when ``hold_file`` is set, a fan step then also waits until that file exists (at most
``hold_timeout`` s): a test breaks something while steps certainly run, then lets them finish.
Every op has ``RetryPolicy(max_retries=3)``, so a step lost to a fault is retried by Dagster.

Config goes through the ``chaos`` resource::

    {"resources": {"chaos": {"config": {"ledger": PATH, "sleep": 1.0, "hold_file": PATH}}}}

(``ledger`` falls back to ``$DAGSTER_TASKIQ_CHAOS_LEDGER``.)

The forged-message gadgets below are never named by a real run. Each creates a marker file
when it runs, so a test can prove that a forged message's code never ran:

* :func:`forged_task` — what a message naming a different task function would run;
* :func:`forged_job_factory` — a zero-argument function a forged ``job_origin`` can name
  (Dagster calls such a function to load the job); marker in ``$DAGSTER_TASKIQ_CHAOS_MARKERS``;
* :class:`MarkerArtifactStorage` — a class a forged ``instance_ref`` can name as its local
  artifact storage (Dagster builds it when it opens the instance); marker path in its config.

``python -m dagster_taskiq_tests.chaos.jobs orchestrate SPEC.json`` runs ``chaos_job`` in this
process (``execute_job`` with the spec's ``run_config`` and ``tags``) and exits 0 on success.
"""

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import (
    Definitions,
    Field,
    In,
    InitResourceContext,
    Nothing,
    OpExecutionContext,
    RetryPolicy,
    StringSource,
    job,
    op,
    resource,
)
from dagster._core.storage.root import LocalArtifactStorage
from dagster._serdes import ConfigurableClassData

from dagster_taskiq import taskiq_executor
from dagster_taskiq_tests.chaos.ledger import LEDGER_ENV, record_execution

#: Where the forged-code gadgets without config put their markers (set on every chaos worker).
MARKERS_ENV = "DAGSTER_TASKIQ_CHAOS_MARKERS"
FAN_WIDTH = 4
FAN_STEPS = tuple(f"fan_{i}" for i in range(FAN_WIDTH))
STEP_KEYS = (*FAN_STEPS, "join")
RETRY_POLICY = RetryPolicy(max_retries=3, delay=0.2)


@resource(
    config_schema={
        "ledger": Field(StringSource, is_required=False),
        "sleep": Field(float, default_value=1.0),
        "join_sleep": Field(float, default_value=0.2),
        "hold_file": Field(str, is_required=False),
        "hold_timeout": Field(float, default_value=120.0),
    }
)
def chaos(init_context: InitResourceContext) -> dict[str, Any]:
    """The chaos ops' settings (see the module docstring)."""
    return dict(init_context.resource_config)


def _step_key(context: OpExecutionContext) -> str:
    try:
        return context.get_step_execution_context().step.key
    except Exception:
        return str(context.op_handle)


def _run_body(context: OpExecutionContext, *, seconds: float, hold: bool) -> None:
    settings: dict[str, Any] = context.resources.chaos
    path = settings.get("ledger") or os.environ.get(LEDGER_ENV)
    if not path:
        raise RuntimeError(f"chaos ops need a ledger: resource config 'ledger' or ${LEDGER_ENV}")
    with record_execution(
        path, run_id=context.run_id, step_key=_step_key(context), attempt=context.retry_number
    ):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # short sleeps: a SIGTERM interrupts promptly
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        hold_file = settings.get("hold_file")
        if hold and hold_file:
            give_up = time.monotonic() + float(settings["hold_timeout"])
            while not Path(hold_file).exists() and time.monotonic() < give_up:
                time.sleep(0.05)


@op(required_resource_keys={"chaos"}, retry_policy=RETRY_POLICY)
def fan(context: OpExecutionContext) -> int:
    """One branch of the fan-out: ledger, sleep, maybe hold."""
    _run_body(context, seconds=float(context.resources.chaos["sleep"]), hold=True)
    return 1


@op(
    required_resource_keys={"chaos"},
    retry_policy=RETRY_POLICY,
    ins={f"in_{i}": In(Nothing) for i in range(FAN_WIDTH)},
)
def join(context: OpExecutionContext) -> int:
    """Runs after every branch: ledger and a short sleep."""
    _run_body(context, seconds=float(context.resources.chaos["join_sleep"]), hold=False)
    return FAN_WIDTH


@job(executor_def=taskiq_executor, resource_defs={"chaos": chaos})
def chaos_job() -> None:
    """``fan_0 .. fan_3`` -> ``join``."""
    branches = {f"in_{i}": fan.alias(name)() for i, name in enumerate(FAN_STEPS)}
    join(**branches)


defs = Definitions(jobs=[chaos_job])


def run_config(
    executor: Mapping[str, Any],
    *,
    ledger: str | os.PathLike[str],
    sleep: float = 1.0,
    join_sleep: float = 0.2,
    hold_file: str | os.PathLike[str] | None = None,
    hold_timeout: float = 120.0,
) -> dict[str, Any]:
    """``run_config`` for ``chaos_job``: ``executor`` is ``harness.executor_config(...)``."""
    chaos_config: dict[str, Any] = {
        "ledger": os.fspath(ledger),
        "sleep": float(sleep),
        "join_sleep": float(join_sleep),
        "hold_timeout": float(hold_timeout),
    }
    if hold_file is not None:
        chaos_config["hold_file"] = os.fspath(hold_file)
    return {**executor, "resources": {"chaos": {"config": chaos_config}}}


# -- what forged messages name (never part of a real run) ------------------------------------
def _touch(marker: str | os.PathLike[str], what: str) -> None:
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "a", encoding="utf-8") as handle:
        handle.write(f"{time.time():.6f} pid {os.getpid()} ran {what}\n")


def marker_path(kind: str) -> Path:
    """The marker a config-less gadget of ``kind`` creates (under ``$DAGSTER_TASKIQ_CHAOS_MARKERS``,
    else the temp directory)."""
    base = os.environ.get(MARKERS_ENV) or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "dagster-taskiq-chaos-markers"
    )
    return Path(base) / f"forged-{kind}.marker"


def forged_task(marker: str) -> None:
    """A task function a forged message names instead of a dagster-taskiq task."""
    _touch(marker, "forged_task")


def forged_job_factory() -> Any:
    """A zero-argument function that a forged ``job_origin`` names; Dagster calls it to load the
    job, so merely loading that origin runs it."""
    _touch(marker_path("job_origin"), "forged_job_factory")
    return chaos_job


class MarkerArtifactStorage(LocalArtifactStorage):
    """A local artifact storage a forged ``instance_ref`` names; building it runs forged code."""

    @classmethod
    def config_type(cls) -> Any:
        return {"base_dir": StringSource, "marker": str}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> "MarkerArtifactStorage":
        _touch(config_value["marker"], "MarkerArtifactStorage")
        return cls(base_dir=config_value["base_dir"], inst_data=inst_data)


# -- the orchestrator process ---------------------------------------------------------------
def orchestrate(spec_path: str) -> int:
    """Run ``chaos_job`` with the spec's ``run_config`` and ``tags`` on the instance in
    ``$DAGSTER_HOME``; print the run id and status."""
    import logging

    from dagster import DagsterInstance, execute_job, reconstructable

    # Under ``python -m`` this module is ``__main__``: load the job from its importable name, so
    # that its code origin names a module the workers can import.
    from dagster_taskiq_tests.chaos import jobs as importable

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    with DagsterInstance.get() as instance:
        with execute_job(
            reconstructable(importable.chaos_job),
            instance=instance,
            run_config=spec["run_config"],
            tags=spec.get("tags", {}),
            raise_on_error=False,
        ) as result:
            print(f"run {result.run_id} success={result.success}", flush=True)
            return 0 if result.success else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "orchestrate":
        sys.exit(orchestrate(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} orchestrate SPEC.json")
