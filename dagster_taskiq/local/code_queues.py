"""The queues a workspace's code sends work to, read from its jobs and ops.

``dagster-taskiq dev`` without ``-q`` runs this module in a subprocess, with the same code options
and working directory as ``dagster dev``, so that the user's code is imported there and not in the
command itself. It prints one JSON object: ``{"queues": [...]}``, or ``{"error": "..."}``.

A queue counts when it is named by:

* a job's ``dagster-taskiq/queue`` tag (where ``TaskiqRunLauncher`` sends its runs);
* an op's ``dagster-taskiq/queue`` tag, in a job that runs on ``taskiq_executor``;
* the ``default_queue`` of a ``taskiq_executor.configured(...)`` executor.

The ``dagster-celery/queue`` twins count too, as they do at run time. The caller adds the default
queue (runs and steps without a tag go there).
"""

import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import click
from dagster import OpDefinition

from dagster_taskiq.tags import queue_from_tags

#: Name of ``taskiq_executor``'s executor definition.
TASKIQ_EXECUTOR_NAME = "taskiq"


def executor_default_queue(executor_def: Any) -> str | None:
    """The ``default_queue`` a ``configured`` taskiq executor fixes, if any."""
    schema = getattr(executor_def, "config_schema", None)
    resolve = getattr(schema, "resolve_config", None)
    if resolve is None:
        return None
    try:
        result = resolve({})
    except Exception:
        return None
    value = getattr(result, "value", None)
    if getattr(result, "success", False) and isinstance(value, dict):
        config = value.get("config", value)
        queue = config.get("default_queue") if isinstance(config, dict) else None
        return str(queue) if queue else None
    return None


def job_queues(job: Any, default_queue: str) -> set[str]:
    """The queues one job definition names (see the module docstring)."""
    where = f"job '{job.name}'"
    queues = {queue_from_tags(job.tags, default_queue, where)}
    if job.executor_def.name != TASKIQ_EXECUTOR_NAME:
        return queues
    step_default = executor_default_queue(job.executor_def) or default_queue
    queues.add(step_default)
    for handle in job.graph.iterate_node_handles():
        node = job.graph.get_node(handle)
        if not isinstance(node.definition, OpDefinition):
            continue  # a graph: its ops come as their own handles
        queues.add(queue_from_tags(node.tags, step_default, f"op '{handle}' of {where}"))
    return queues


def repositories(code_args: Sequence[str]) -> Iterable[Any]:
    """The repository definitions of the code that ``dagster dev CODE_ARGS`` would load."""
    from dagster._cli.workspace.cli_target import _get_workspace_load_target_from_cli_opts
    from dagster._core.definitions.reconstruct import repository_def_from_target_def
    from dagster._grpc.utils import get_loadable_targets
    from dagster_shared.cli import WorkspaceOpts

    options: dict[str, list[str]] = {"-w": [], "-f": [], "-m": []}
    working_directory: str | None = None
    pairs = list(zip(code_args[::2], code_args[1::2], strict=True))
    for flag, value in pairs:
        if flag == "-d":
            working_directory = value
        else:
            options[flag].append(value)
    opts = WorkspaceOpts(
        workspace=options["-w"] or None,
        python_file=options["-f"] or None,
        module_name=options["-m"] or None,
        working_directory=working_directory,
    )
    for origin in _get_workspace_load_target_from_cli_opts(opts).create_origins():
        target_origin = origin.loadable_target_origin
        for target in get_loadable_targets(
            python_file=target_origin.python_file,
            module_name=target_origin.module_name,
            package_name=target_origin.package_name,
            autoload_defs_module_name=target_origin.autoload_defs_module_name,
            working_directory=target_origin.working_directory or os.getcwd(),
            attribute=target_origin.attribute,
            resolve_lazy_defs=True,
        ):
            yield repository_def_from_target_def(target.target_definition)


def code_queues(code_args: Sequence[str], default_queue: str) -> list[str]:
    """Every queue named by the jobs of the code ``code_args`` point at, plus ``default_queue``."""
    queues = {default_queue}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a celery-tag notice is not for this listing
        for repository in repositories(code_args):
            for job in repository.get_all_jobs():
                queues |= job_queues(job, default_queue)
    return sorted(queues)


@click.command()
@click.option("--default-queue", required=True)
@click.argument("code_args", nargs=-1)
def main(default_queue: str, code_args: tuple[str, ...]) -> None:
    """Print ``{"queues": [...]}`` for the code that ``dagster dev CODE_ARGS`` loads."""
    try:
        document: dict[str, Any] = {"queues": code_queues(code_args, default_queue)}
    except Exception as exc:
        document = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
    sys.stdout.write(json.dumps(document) + "\n")


if __name__ == "__main__":
    main()
