"""The ``dagster-taskiq`` command line: start and manage workers, and show queue status.

Every command takes ``-y/--config-yaml FILE`` (shaped like the executor config,
``execution: {config: {...}}``, and validated against the same schema) plus ``--broker`` and
``--backend`` overrides. A user error (bad config, unreachable broker, unknown worker) prints one
line and exits 1; usage errors exit 2 (click's default).
"""

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import click

from dagster_taskiq.commands.common import (
    BACKGROUND_START_TIMEOUT,
    UserError,
    connection_options,
    format_table,
    format_time,
    load_settings,
    user_errors,
    with_connection,
)
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.errors import UnknownWorkerError
from dagster_taskiq.local.demo import demo
from dagster_taskiq.local.dev import dev
from dagster_taskiq.metrics.exporter_command import exporter_command
from dagster_taskiq.version import __version__
from dagster_taskiq.worker.options import worker_name_for


@click.group()
@click.version_option(__version__, prog_name="dagster-taskiq")
def main() -> None:
    """Run Dagster steps and runs on taskiq workers (Redis or RabbitMQ)."""


@main.group()
def worker() -> None:
    """Start, list and stop workers."""


@worker.command("start")
@connection_options
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    help="Queue to serve (repeatable, or comma-separated). Default: the default queue.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Steps run at once, each in its own process. A run's process does not take a slot.",
)
@click.option("-n", "--name", default=None, help="Worker name (default: <host>-<pid>).")
@click.option("-d", "--background", is_flag=True, help="Detach and run in the background.")
@click.option(
    "-l",
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "-i",
    "--include",
    "includes",
    multiple=True,
    help="Module to import at start (your job code), repeatable.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between heartbeats. While the worker holds a task's lease it beats at least "
    "every heartbeat_timeout/10, whatever this says.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="On SIGTERM or 'worker terminate', seconds to let running tasks finish before "
    "interrupting them (default: wait for them).",
)
@click.option(
    "--logfile",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --background: where the worker logs (default: a file in the temp directory).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve /metrics, /healthz and /readyz on this port (default: no metrics server).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics server binds (0.0.0.0 to be scraped from other hosts).",
)
@user_errors
def worker_start(
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    queues: Sequence[str],
    concurrency: int,
    name: str | None,
    background: bool,
    loglevel: str,
    includes: Sequence[str],
    heartbeat_interval: float,
    shutdown_timeout: float | None,
    logfile: str | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Start a worker serving the given queues."""
    from dagster_taskiq.config_sources import worker_config
    from dagster_taskiq.lifecycle.keys import validate_worker_name
    from dagster_taskiq.tracing import configure_from_environment
    from dagster_taskiq.worker.service import (
        WorkerOptions,
        default_worker_name,
        parse_queues,
        run_worker,
    )

    chosen = worker_config(config_yaml, broker, backend, os.environ, load_settings)
    settings = chosen.settings
    queue_names = parse_queues(queues, settings.default_queue)
    if name:
        validate_worker_name(name)

    async def _name_free(conn: Any) -> None:
        if name and await conn.keystore.worker_alive(name):
            raise UserError(
                f"A live worker named '{name}' already exists ({settings.describe()}). Pick "
                f"another name with -n, or stop it first (dagster-taskiq worker terminate {name})."
            )

    # Fail fast, with one line, if the broker is unreachable or the name is taken. (The worker
    # claims its name atomically when it registers; this only gives the common case a quick no.)
    with_connection(settings, _name_free)
    if background:
        args = [
            "-c",
            str(concurrency),
            "-l",
            loglevel,
            "--heartbeat-interval",
            str(heartbeat_interval),
        ]
        if config_yaml:
            args += ["-y", os.path.abspath(config_yaml)]
        if broker:
            args += ["--broker", broker]
        if backend:
            args += ["--backend", backend]
        for queue in queue_names:
            args += ["-q", queue]
        if name:
            args += ["-n", name]
        for module in includes:
            args += ["-i", module]
        if shutdown_timeout is not None:
            args += ["--shutdown-timeout", str(shutdown_timeout)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port), "--metrics-host", metrics_host]
        _start_in_background(settings, args, name, logfile)
        return
    logging.basicConfig(
        level=loglevel.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    worker_logger = logging.getLogger("dagster_taskiq.worker")
    worker_logger.info("%s", chosen.source)
    tracing = configure_from_environment()
    if tracing:
        worker_logger.info("%s.", tracing)
    options = WorkerOptions(
        name=name or default_worker_name(),
        queues=queue_names,
        concurrency=concurrency,
        heartbeat_interval=heartbeat_interval,
        liveness_ttl=max(5.0, heartbeat_interval * 5),
        shutdown_timeout=shutdown_timeout,
        includes=tuple(includes),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    sys.exit(run_worker(settings, options))


def _start_in_background(
    settings: TaskiqSettings, args: list[str], name: str | None, logfile: str | None
) -> None:
    path = os.path.abspath(
        logfile
        or os.path.join(
            tempfile.gettempdir(), f"dagster-taskiq-worker-{int(time.time() * 1000)}.log"
        )
    )
    with open(path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq.cli", "worker", "start", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    worker_name = name or worker_name_for(process.pid)

    async def _registered(conn: Any) -> bool:
        deadline = time.monotonic() + BACKGROUND_START_TIMEOUT
        while time.monotonic() < deadline:
            if await conn.keystore.worker_alive(worker_name):
                return True
            if process.poll() is not None:
                return False
            await asyncio.sleep(0.1)
        return False

    # The readiness wait runs its full BACKGROUND_START_TIMEOUT (plus a margin to give up).
    if not with_connection(settings, _registered, operation_timeout=BACKGROUND_START_TIMEOUT + 5.0):
        code = process.poll()
        state = f"exited with code {code}" if code is not None else "did not register in time"
        raise UserError(
            f"The background worker {worker_name} (pid {process.pid}) {state}; see its log {path}: "
            f"{_last_line(path)}"
        )
    click.echo(f"Started worker {worker_name} in the background: pid {process.pid}, log {path}")


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"




WORKER_HEADERS = ("NAME", "HOST", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "LAST HEARTBEAT")


def _worker_rows(workers: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            w["name"],
            w["host"],
            w["pid"],
            ",".join(w["queues"]),
            w["concurrency"],
            w["running"],
            w["last_heartbeat"],
        )
        for w in workers
    ]


def _worker_document(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "host": info.host,
        "pid": info.pid,
        "queues": list(info.queues),
        "broker": info.broker,
        "concurrency": info.concurrency,
        "running": len(info.running),
        "running_tasks": list(info.running),
        "last_heartbeat": format_time(info.last_heartbeat),
    }


@worker.command("list")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of worker records.")
@user_errors
def worker_list(
    config_yaml: str | None, broker: str | None, backend: str | None, as_json: bool
) -> None:
    """List live workers: name, host, pid, queues, concurrency, running tasks, last heartbeat."""
    settings = load_settings(config_yaml, broker, backend)

    async def _list(conn: Any) -> list[dict[str, Any]]:
        return [_worker_document(w) for w in await conn.keystore.list_workers()]

    workers = with_connection(settings, _list)
    if as_json:
        click.echo(json.dumps(workers))
        return
    if not workers:
        click.echo("No live workers.")
        return
    click.echo(format_table(WORKER_HEADERS, _worker_rows(workers)))


@worker.command("terminate")
@connection_options
@click.argument("name", required=False)
@click.option("-a", "--all", "all_workers", is_flag=True, help="Terminate every live worker.")
@user_errors
def worker_terminate(
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    name: str | None,
    all_workers: bool,
) -> None:
    """Ask worker NAME, or every worker (-a), to finish its tasks and exit (exit code 0)."""
    if bool(name) == all_workers:
        raise click.UsageError("Name one worker, or pass -a/--all (not both).")
    settings = load_settings(config_yaml, broker, backend)

    async def _terminate(conn: Any) -> list[str]:
        live = [w.name for w in await conn.keystore.list_workers()]
        if all_workers:
            targets = live
        elif name not in live:
            raise UnknownWorkerError(
                f"No live worker named '{name}'. Live workers: {', '.join(live) or 'none'}. "
                "See 'dagster-taskiq worker list'."
            )
        else:
            targets = [name]
        await conn.keystore.request_shutdown(targets)
        return targets

    targets = with_connection(settings, _terminate)
    if not targets:
        click.echo("No live workers.")
    for target in targets:
        click.echo(f"Asked worker {target} to shut down.")


async def collect_status(conn: Any) -> dict[str, Any]:
    """The ``status --json`` document: queues, workers and in-flight tasks.

    ``waiting``/``by_priority`` count the tasks the key store holds as queued (revoked ones are
    left out); ``in_broker`` is the raw number of messages the broker holds for the queue.
    """
    from dagster_taskiq.lifecycle.states import TaskState

    workers = await conn.keystore.list_workers()
    records = await conn.keystore.get_many(await conn.keystore.inflight_ids())
    now = time.time()
    names = {q for w in workers for q in w.queues} | {r.queue for r in records}
    names |= set(await _broker_queues(conn.broker))
    queues = []
    for queue in sorted(names):
        by_priority: dict[int, int] = {}
        for record in records:
            if record.queue == queue and record.state == TaskState.QUEUED:
                by_priority[record.priority] = by_priority.get(record.priority, 0) + 1
        queues.append(
            {
                "name": queue,
                "waiting": sum(by_priority.values()),
                "by_priority": {str(p): n for p, n in sorted(by_priority.items(), reverse=True)},
                "in_broker": await _broker_depth(conn.broker, queue),
            }
        )
    in_flight = [
        {
            "task_id": r.task_id,
            "kind": r.kind,
            "run_id": r.run_id,
            "step_key": r.step_key,
            "queue": r.queue,
            "priority": r.priority,
            "worker": r.worker,
            "state": r.state,
            "elapsed_s": round(max(0.0, now - (r.started_at or r.claimed_at or r.submitted_at)), 3),
        }
        for r in records
    ]
    return {
        "queues": queues,
        "workers": [_worker_document(w) for w in workers],
        "in_flight": in_flight,
        "dead_letters": await conn.keystore.dead_letter_count(),
    }


async def _broker_queues(broker: Any) -> list[str]:
    from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker

    if isinstance(broker, RedisPriorityBroker):
        return list(await broker.known_queues())
    return []


async def _broker_depth(broker: Any, queue: str) -> int | None:
    from dagster_taskiq.brokers.redis_priority import RedisPriorityBroker

    if isinstance(broker, RedisPriorityBroker):
        return int(await broker.redis.zcard(broker.queue_key(queue)))
    waiting = getattr(broker, "waiting", None)
    if waiting is not None:
        return int(await waiting(queue))
    return None


@main.command("status")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Redraw every SECONDS (default 2) until interrupted (Ctrl-C).",
)
@user_errors
def status(
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    as_json: bool,
    watch: float | None,
) -> None:
    """Show queues (waiting tasks by priority), workers and in-flight tasks."""
    settings = load_settings(config_yaml, broker, backend)
    if watch is not None:
        from dagster_taskiq.commands.watch import watch_status

        with contextlib.suppress(KeyboardInterrupt):
            with_connection(
                settings,
                lambda conn: watch_status(conn, watch, collect_status, render_status, as_json),
                operation_timeout=float("inf"),
            )
        return
    document = with_connection(settings, collect_status)
    document["warnings"] = _launcher_mismatches(settings)
    if as_json:
        click.echo(json.dumps(document))
        return
    click.echo(render_status(document))


def _launcher_mismatches(settings: TaskiqSettings) -> list[str]:
    """``status`` warnings: live workers that do not match ``$DAGSTER_HOME``'s launcher."""
    from dagster_taskiq.config_sources import launcher_mismatches

    async def _workers(conn: Any) -> list[Any]:
        return list(await conn.keystore.list_workers())

    return launcher_mismatches(os.environ, with_connection(settings, _workers))


def render_status(document: dict[str, Any]) -> str:
    """The ``status`` tables for a :func:`collect_status` document."""
    queue_rows = [
        (
            q["name"],
            q["waiting"],
            " ".join(f"p{p}:{n}" for p, n in q["by_priority"].items()) or "-",
            "-" if q["in_broker"] is None else q["in_broker"],
        )
        for q in document["queues"]
    ]
    task_rows = [
        (
            t["run_id"],
            t["kind"],
            t["step_key"] or "-",
            t["queue"],
            t["priority"],
            t["worker"] or "-",
            t["state"],
            f"{t['elapsed_s']:.1f}s",
            t["task_id"],
        )
        for t in document["in_flight"]
    ]
    parts = [
        "QUEUES",
        format_table(("NAME", "WAITING", "BY PRIORITY", "IN BROKER"), queue_rows)
        if queue_rows
        else "  (none)",
        "",
        "WORKERS",
        format_table(WORKER_HEADERS, _worker_rows(document["workers"]))
        if document["workers"]
        else "  (none)",
        "",
        "IN FLIGHT",
        format_table(
            ("RUN", "KIND", "STEP", "QUEUE", "PRIORITY", "WORKER", "STATE", "ELAPSED", "TASK"),
            task_rows,
        )
        if task_rows
        else "  (none)",
    ]
    if document.get("warnings"):
        parts += ["", "WARNINGS", *(f"  {warning}" for warning in document["warnings"])]
    if document["dead_letters"]:
        parts += [
            "",
            f"DEAD LETTERS: {document['dead_letters']} rejected message(s) kept "
            "(see 'dagster-taskiq dead-letters list').",
        ]
    return "\n".join(parts)


main.add_command(demo)
main.add_command(dev)
main.add_command(exporter_command(connection_options, user_errors, load_settings, collect_status))

if __name__ == "__main__":
    # Run the imported module's group: it registers the operator commands, whose modules import
    # this one (doing that from __main__ would import this file a second time, mid-way).
    from dagster_taskiq.cli import main as registered_main

    registered_main()
else:
    from dagster_taskiq.commands import register as register_operator_commands

    register_operator_commands(main)
