"""``dagster-taskiq dev``: the Dagster UI, taskiq workers and a broker, all on loopback.

It starts the embedded Redis (unless a broker URL is given), N workers on the chosen queues, and
``dagster dev`` for a workspace, with a generated ``dagster.yaml`` in a temporary ``DAGSTER_HOME``
that sets :class:`~dagster_taskiq.TaskiqRunLauncher` and run monitoring. Runs launched from the UI
go to the workers; their steps too, when the job uses ``taskiq_executor``. Ctrl-C (or SIGTERM)
stops the UI first, then the workers, then the broker.
"""

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType

import click

from dagster_taskiq.config import redact_url
from dagster_taskiq.errors import DagsterTaskiqError
from dagster_taskiq.local.cwd_instance import (
    current_folder,
    overriding_flags,
    read_cwd_instance,
)
from dagster_taskiq.local.processes import ManagedProcess, become_subreaper, stop_leftovers
from dagster_taskiq.local.stack import LocalStack, decide_broker, read_config_yaml


@dataclasses.dataclass(frozen=True)
class DevOptions:
    """What the ``dev`` command was asked to start."""

    code_args: tuple[str, ...] = ()
    config_yaml: str | None = None
    broker: str | None = None
    backend: str | None = None
    workers: int = 2
    queues: tuple[str, ...] = ()
    concurrency: int = 2
    host: str = "127.0.0.1"
    port: int = 3000
    startup_timeout: float = 180.0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) != 0


def webserver_answers(url: str) -> bool:
    """Whether the Dagster webserver at ``url`` answers ``/server_info`` with 200."""
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_dev(options: DevOptions) -> int:
    """Start everything, wait for Ctrl-C, stop everything. Returns the exit code."""
    from dagster_taskiq.worker.service import parse_queues

    if importlib.util.find_spec("dagster_webserver") is None:
        raise click.ClickException(
            "dagster-taskiq dev runs 'dagster dev', which needs the Dagster webserver: "
            "pip install dagster-webserver"
        )
    if not port_is_free(options.host, options.port):
        raise click.ClickException(
            f"Port {options.port} on {options.host} is already in use; pass -p/--port."
        )
    become_subreaper()
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
    stack = LocalStack("dev")
    try:
        overridden = overriding_flags(options.config_yaml, options.broker, options.backend)
        cwd_instance = read_cwd_instance(current_folder(), os.environ, overridden)
        if cwd_instance.note:
            _echo(cwd_instance.note)
        config = read_config_yaml(options.config_yaml) or cwd_instance.config
        decision = decide_broker(
            broker=options.broker,
            backend=options.backend,
            config=config,
            env=os.environ,
            force_embedded=False,
            probe_url=None,
            config_origin="the -y config file" if options.config_yaml else cwd_instance.origin,
        )
        settings = stack.open_broker(decision, config)
        stack.write_instance(
            {
                "run_monitoring": {"enabled": True, "poll_interval_seconds": 5},
                "run_queue": {"dequeue_interval_seconds": 1},
            }
        )
        if options.queues:
            queues, queues_from = list(parse_queues(options.queues, settings.default_queue)), "-q"
        else:
            queues, queues_from = _code_queues(stack, options, settings.default_queue)
        prefix = "dev" if stack.embedded is not None else f"dev-{os.getpid()}"
        for index in range(1, options.workers + 1):
            stack.start_worker(
                f"{prefix}-{index}",
                queues,
                options.concurrency,
                log_to_file=False,
                extra_args=["--shutdown-timeout", "10"],
            )
        ui = stack.spawn(
            "dagster dev",
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                *options.code_args,
                "-h",
                options.host,
                "-p",
                str(options.port),
            ],
            log_to_file=False,
            extra_env={"PYTHONWARNINGS": _quiet_warnings()},
            keep_line=_not_noise,
        )
        url = f"http://{options.host}:{options.port}"
        live = stack.wait_for_workers(timeout=options.startup_timeout)
        _wait_for_webserver(ui, url, options.startup_timeout)
        broker_line = stack.describe_broker()
        _echo("")
        _echo("dagster-taskiq dev is up:")
        _echo(f"  Dagster UI    {url}")
        _echo(f"  broker        {broker_line}")
        _echo(
            f"  workers       {', '.join(w.name for w in live)} on queue(s) {', '.join(queues)}, "
            f"{options.concurrency} slot(s) each ({queues_from})"
        )
        _echo(
            f"  DAGSTER_HOME  {stack.dagster_home} (temporary; TaskiqRunLauncher, run monitoring)"
        )
        _echo(f"  inspect       dagster-taskiq status --broker {redact_url(settings.broker_url)}")
        _echo("Press Ctrl-C to stop everything.")
        return _supervise(stack.processes)
    except KeyboardInterrupt:
        _echo("Stopping dagster dev, the workers and the broker...")
        return 0
    except DagsterTaskiqError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.close(worker_timeout=20.0)
            stop_leftovers()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous_term)
        _echo("Stopped.")


#: Lines of ``dagster dev`` output that do not apply here: ``dev`` sets a temporary DAGSTER_HOME
#: on purpose (and says itself what it does with a ``dagster.yaml`` in the current folder).
NOISE_LINES = (b"Found a dagster instance configuration value",)
#: Python warnings ``dagster dev`` prints that do not apply here (``PYTHONWARNINGS`` entries).
QUIET_WARNINGS = ("ignore:Function `dev_command` is superseded",)


def _not_noise(line: bytes) -> bool:
    return not any(noise in line for noise in NOISE_LINES)


def _quiet_warnings() -> str:
    return ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *QUIET_WARNINGS]))


def _code_queues(
    stack: LocalStack, options: DevOptions, default_queue: str
) -> tuple[list[str], str]:
    """The queues the code's jobs and ops name (read in a subprocess that imports the code),
    and where they came from; the default queue alone, with a note, if the code cannot be read."""
    argv = [sys.executable, "-m", "dagster_taskiq.local.code_queues"]
    argv += ["--default-queue", default_queue, "--", *options.code_args]
    try:
        done = subprocess.run(
            argv,
            env=stack.child_env(),
            capture_output=True,
            timeout=options.startup_timeout,
            check=False,
        )
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        document = json.loads(lines[-1]) if lines else {"error": f"exit code {done.returncode}"}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        document = {"error": str(exc)}
    if "queues" in document:
        return [str(q) for q in document["queues"]], "queues named by the code's jobs and ops"
    _echo(
        f"Could not read the queues the code names ({document.get('error')}); serving "
        f"'{default_queue}' only. Pass -q QUEUE for each queue your ops and jobs use."
    )
    return [default_queue], "default queue"


def _wait_for_webserver(ui: ManagedProcess, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not webserver_answers(url):
        if not ui.running:
            raise click.ClickException(f"dagster dev exited with code {ui.returncode}.")
        if time.monotonic() > deadline:
            raise click.ClickException(f"The Dagster webserver did not answer at {url} in time.")
        time.sleep(0.25)


def _supervise(processes: Sequence[ManagedProcess]) -> int:
    """Wait until interrupted; if a child exits on its own, report it and return 1."""
    while True:
        for process in processes:
            if not process.running:
                _echo(f"{process.name} exited with code {process.returncode}; stopping the rest.")
                return 1
        time.sleep(0.5)


def _echo(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.command("dev")
@click.option(
    "-w",
    "--workspace",
    "workspaces",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Workspace file, as for 'dagster dev' (repeatable).",
)
@click.option(
    "-f",
    "--python-file",
    "python_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Python file with Dagster definitions (repeatable).",
)
@click.option(
    "-m", "--module-name", "modules", multiple=True, help="Module with Dagster definitions."
)
@click.option(
    "-d", "--working-directory", default=None, help="Working directory for -f and -m code."
)
@click.option(
    "-y",
    "--config-yaml",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file shaped like the executor config: execution: {config: {...}}.",
)
@click.option("--broker", default=None, help="Broker URL (default: start the embedded Redis).")
@click.option("--backend", default=None, help="Redis backend URL (default: the broker).")
@click.option(
    "--workers",
    "worker_count",
    type=click.IntRange(min=1, max=32),
    default=2,
    show_default=True,
    help="Worker processes to start.",
)
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    help="Queue every worker serves (repeatable, or comma-separated). Default: dagster.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Slots per worker.",
)
@click.option("-h", "--host", default="127.0.0.1", show_default=True, help="Webserver host.")
@click.option("-p", "--port", type=int, default=3000, show_default=True, help="Webserver port.")
@click.option(
    "--startup-timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Seconds to wait for the workers and the webserver to come up.",
)
def dev(
    workspaces: Sequence[str],
    python_files: Sequence[str],
    modules: Sequence[str],
    working_directory: str | None,
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    worker_count: int,
    queues: Sequence[str],
    concurrency: int,
    host: str,
    port: int,
    startup_timeout: float,
) -> None:
    """Start a broker, taskiq workers and 'dagster dev' with TaskiqRunLauncher; Ctrl-C stops all.

    Code options (-w, -f, -m, -d) are passed to 'dagster dev'; without them it looks for a
    workspace.yaml or pyproject.toml in the current directory, as 'dagster dev' does.
    """
    code_args: list[str] = []
    for path in workspaces:
        code_args += ["-w", path]
    for path in python_files:
        code_args += ["-f", path]
    for module in modules:
        code_args += ["-m", module]
    if working_directory:
        code_args += ["-d", working_directory]
    sys.exit(
        run_dev(
            DevOptions(
                code_args=tuple(code_args),
                config_yaml=config_yaml,
                broker=broker,
                backend=backend,
                workers=worker_count,
                queues=tuple(queues),
                concurrency=concurrency,
                host=host,
                port=port,
                startup_timeout=startup_timeout,
            )
        )
    )
