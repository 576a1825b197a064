"""``dagster-taskiq demo``: run the example job end to end on two local worker processes.

The demo starts (or finds) a broker, writes a private ``DAGSTER_HOME`` whose run launcher is
:class:`~dagster_taskiq.TaskiqRunLauncher`, starts two real workers (one per queue of the example),
launches the example's ``daily_sales`` run through the launcher (its steps go out through
``taskiq_executor``), shows progress, prints a summary table and exits 0 only if the run
succeeded. Every process it started is stopped before it returns, also on Ctrl-C or SIGTERM.
"""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click

from dagster_taskiq.errors import DagsterTaskiqError
from dagster_taskiq.local.processes import become_subreaper, stop_leftovers
from dagster_taskiq.local.progress import RunWatcher
from dagster_taskiq.local.stack import (
    LOCAL_REDIS_URL,
    LocalStack,
    decide_broker,
    read_config_yaml,
)

EXAMPLE_MODULE = "sales_pipeline"
EXAMPLE_ATTRIBUTE = "defs"
EXAMPLE_JOB = "daily_sales"
#: (name, queues, slots) of the demo's workers: one per queue the example uses.
DEMO_WORKERS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("demo-default", ("dagster",), 2),
    ("demo-compute", ("compute",), 2),
)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What the ``demo`` command was asked to do."""

    config_yaml: str | None = None
    broker: str | None = None
    backend: str | None = None
    embedded: bool = False
    fail: bool = False
    timeout: float = 180.0
    keep: bool = False
    example_dir: Path | None = None


def find_example_dir(explicit: Path | None) -> Path:
    """The ``example/`` directory of this checkout (or ``explicit``)."""
    candidate = explicit or Path(__file__).resolve().parents[2] / "example"
    if not (candidate / EXAMPLE_MODULE / "__init__.py").is_file():
        raise click.ClickException(
            f"The demo runs the example job in example/{EXAMPLE_MODULE} of a dagster-taskiq "
            f"checkout, and {candidate} has none. Install from a checkout (pip install -e .) "
            "or pass --example-dir."
        )
    return candidate


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> int:
    """Run the demo; return the process exit code (0 only when the run succeeded)."""
    echo = _echo
    example_dir = find_example_dir(options.example_dir)
    become_subreaper()
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
    stack = LocalStack("demo", keep=options.keep)
    instance: Any = None
    run_id: str | None = None
    succeeded = False
    try:
        config = read_config_yaml(options.config_yaml)
        decision = decide_broker(
            broker=options.broker,
            backend=options.backend,
            config=config,
            env=os.environ,
            force_embedded=options.embedded,
            probe_url=LOCAL_REDIS_URL,
        )
        settings = stack.open_broker(decision, config, isolate=True)
        stack.write_instance({"run_monitoring": {"enabled": True}})
        echo("dagster-taskiq demo: the example job on two local workers")
        echo(f"  broker     {stack.describe_broker()}")
        echo(f"  instance   {stack.dagster_home} (run launcher: TaskiqRunLauncher)")
        started = time.monotonic()
        for name, queues, slots in DEMO_WORKERS:
            stack.start_worker(name, queues, slots, extra_args=["--shutdown-timeout", "5"])
        echo(
            "  workers    "
            + ", ".join(
                f"{name} (queue {','.join(queues)}, {slots} slots)"
                for name, queues, slots in DEMO_WORKERS
            )
            + " starting..."
        )
        instance, recon_job, run_config = _load(stack, example_dir, options.fail)
        launcher = instance.run_launcher
        stack.use_client(launcher.client)
        stack.wait_for_workers(timeout=90.0)
        echo(f"  workers    ready in {time.monotonic() - started:.1f} s")
        run, step_keys = _create_run(instance, recon_job, run_config)
        run_id = run.run_id
        watcher = RunWatcher(instance, launcher.client, run.run_id, step_keys, echo)
        launched = time.monotonic()
        instance.launch_run(run.run_id, workspace=None)
        echo(
            f"Launched run {run.run_id} of job {EXAMPLE_JOB} ({len(step_keys)} steps) through "
            f"TaskiqRunLauncher on queue '{settings.default_queue}'."
        )
        final = watcher.wait(launcher, timeout=options.timeout)
        elapsed = time.monotonic() - launched
        echo("")
        echo(watcher.table())
        echo("")
        succeeded = final.status.value == "SUCCESS"
        workers = sorted({r.worker for r in watcher.rows() if r.worker != "-"})
        echo(
            f"Run {final.run_id} {final.status.value} in {elapsed:.1f} s: {watcher.done} of "
            f"{len(step_keys)} steps ended, on {len(workers)} worker(s) ({', '.join(workers)})."
        )
        if succeeded:
            report = watcher.output_metadata("build_report")
            if "total_revenue" in report:
                echo(f"Report: total revenue {float(report['total_revenue']):,.2f}.")
            if options.keep:
                echo(f"Logs and the instance are kept in {stack.root}.")
        else:
            for line in watcher.failures():
                echo(f"  failed: {line}")
            stack.keep = True
            echo(f"Logs and the instance are kept in {stack.root}.")
        run_id = None
        return 0 if succeeded else 1
    except KeyboardInterrupt:
        echo("Interrupted: stopping the run and every process the demo started.")
        return 130
    except DagsterTaskiqError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if run_id is not None and instance is not None:
                _terminate_quietly(instance, run_id)
            stack.close(worker_timeout=15.0)
            if instance is not None:
                instance.dispose()
            stop_leftovers()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous_term)


def _load(stack: LocalStack, example_dir: Path, fail: bool) -> tuple[Any, Any, dict[str, Any]]:
    from dagster import DagsterInstance

    from dagster_taskiq.compat import InstanceRef, ReconstructableRepository

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(stack.dagster_home)))
    repository = ReconstructableRepository.for_module(
        EXAMPLE_MODULE, EXAMPLE_ATTRIBUTE, working_directory=str(example_dir)
    )
    recon_job = repository.get_reconstructable_job(EXAMPLE_JOB)
    recon_job.get_definition()
    run_config: dict[str, Any] = {}
    if fail:
        # A stricter data-quality threshold than the data meets: validate_orders fails.
        run_config = {"ops": {"validate_orders": {"config": {"max_invalid_ratio": 0.001}}}}
    return instance, recon_job, run_config


def _create_run(instance: Any, recon_job: Any, run_config: dict[str, Any]) -> tuple[Any, list[str]]:
    from dagster_taskiq.compat import create_execution_plan

    job_def = recon_job.get_definition()
    plan = create_execution_plan(recon_job, run_config=run_config, instance_ref=instance.get_ref())
    run = instance.create_run_for_job(
        job_def=job_def,
        execution_plan=plan,
        run_config=run_config,
        job_code_origin=recon_job.get_python_origin(),
        tags=dict(job_def.tags),
    )
    ordered = [step.key for step in plan.get_steps_to_execute_in_topo_order()]
    return run, ordered


def _terminate_quietly(instance: Any, run_id: str) -> None:
    try:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.run_launcher.terminate(run_id)
    except Exception as exc:  # the broker may already be unreachable
        _echo(f"  Could not terminate run {run_id}: {exc}")


def _echo(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.command("demo")
@click.option(
    "-y",
    "--config-yaml",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file shaped like the executor config: execution: {config: {...}}.",
)
@click.option("--broker", default=None, help="Broker URL (default: see --embedded).")
@click.option("--backend", default=None, help="Redis backend URL (default: the broker).")
@click.option(
    "--embedded",
    is_flag=True,
    help="Always start a private embedded Redis. Without it the demo uses --broker, the -y file "
    "or DAGSTER_TASKIQ_BROKER_URL, else a Redis answering on 127.0.0.1:6379, else the embedded "
    "Redis.",
)
@click.option(
    "--fail",
    is_flag=True,
    help="Run with a data-quality threshold the data does not meet, to see a failed run.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Seconds to wait for the run before terminating it.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary instance and logs afterwards.")
@click.option(
    "--example-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="The example/ directory (default: the one in this checkout).",
)
def demo(
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    embedded: bool,
    fail: bool,
    timeout: float,
    keep: bool,
    example_dir: Path | None,
) -> None:
    """Run the example job end to end on two local workers and print a summary.

    Exits 0 when the run succeeds, 1 when it fails, 130 when interrupted.
    """
    sys.exit(
        run_demo(
            DemoOptions(
                config_yaml=config_yaml,
                broker=broker,
                backend=backend,
                embedded=embedded,
                fail=fail,
                timeout=timeout,
                keep=keep,
                example_dir=example_dir,
            )
        )
    )
