"""Operator commands (dead letters, tasks, queues), registered onto the ``dagster-taskiq`` group.

They reuse the conventions of :mod:`dagster_taskiq.cli`: ``-y/--broker/--backend``, one-line
errors with exit code 1, usage errors with exit code 2, ``--json`` for scripts, and a
confirmation before anything destructive unless ``--yes``.
"""

import click


def register(main: click.Group) -> None:
    """Add the operator command groups to ``main``."""
    from dagster_taskiq.commands.deadletters import dead_letters
    from dagster_taskiq.commands.queues import queue_group
    from dagster_taskiq.commands.tasks import task

    main.add_command(dead_letters)
    main.add_command(task)
    main.add_command(queue_group)
