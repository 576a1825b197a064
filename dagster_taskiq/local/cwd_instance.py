"""What ``dagster-taskiq dev`` makes of a ``dagster.yaml`` in the folder it is started from.

``dev`` always runs Dagster on a temporary instance. When the folder's ``dagster.yaml`` names
:class:`~dagster_taskiq.TaskiqRunLauncher`, its broker, backend, default queue, heartbeat timeout
and ``config_source`` are used (unless ``-y``, ``--broker`` or ``--backend`` were given); in every
other case one line says why the file is not used.
"""

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster_taskiq.instance_yaml import (
    CONNECTION_KEYS,
    find_instance_yaml,
    overriding_flags,
    read_launcher_yaml,
)

__all__ = ["TAKEN_KEYS", "CwdInstance", "current_folder", "overriding_flags", "read_cwd_instance"]

#: The ``TaskiqRunLauncher`` keys that ``dev`` takes over (all but ``signing_key``, which stays
#: with the launcher it was written for).
TAKEN_KEYS = CONNECTION_KEYS


@dataclasses.dataclass(frozen=True)
class CwdInstance:
    """The executor-shaped config taken from ``./dagster.yaml`` (empty when none), and the one
    line that tells the user what happened (None when there is no ``dagster.yaml``)."""

    config: dict[str, Any]
    note: str | None
    origin: str = "./dagster.yaml"


def read_cwd_instance(
    folder: Path, env: Mapping[str, str], overridden_by: str | None = None
) -> CwdInstance:
    """Read ``dagster.yaml`` (or ``dagster.yml``) in ``folder``.

    ``overridden_by`` names the flags (``-y``, ``--broker``...) that take precedence, if any.
    """
    path = find_instance_yaml(folder)
    if path is None:
        return CwdInstance({}, None)
    where = f"./{path.name}"
    found = read_launcher_yaml(path, env, TAKEN_KEYS)
    if found.unreadable:
        return CwdInstance({}, f"{where} is not used: {found.problem}.")
    if not found.names_launcher:
        return CwdInstance(
            {},
            f"{where} is not used: {found.problem}, and dev runs Dagster on a temporary "
            "instance with TaskiqRunLauncher.",
        )
    not_used = f"{where} names TaskiqRunLauncher; its settings are not used:"
    if overridden_by:
        return CwdInstance({}, f"{not_used} {overridden_by} given.")
    if found.config is None:
        return CwdInstance({}, f"{not_used} {found.problem}")
    return CwdInstance(
        found.config,
        f"Using the TaskiqRunLauncher settings of {where} "
        f"({', '.join(sorted(found.config)) or 'all defaults'}); the Dagster instance itself is "
        "temporary.",
        origin=where,
    )


def current_folder() -> Path:
    """The folder ``dev`` was started from."""
    return Path(os.getcwd())
