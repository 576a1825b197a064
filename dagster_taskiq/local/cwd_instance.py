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

import yaml

from dagster_taskiq.compat import Field, process_config
from dagster_taskiq.config import shared_config_schema

#: The ``TaskiqRunLauncher`` keys that ``dev`` takes over (all but ``signing_key``, which stays
#: with the launcher it was written for).
TAKEN_KEYS = ("broker", "backend", "default_queue", "heartbeat_timeout", "config_source")


@dataclasses.dataclass(frozen=True)
class CwdInstance:
    """The executor-shaped config taken from ``./dagster.yaml`` (empty when none), and the one
    line that tells the user what happened (None when there is no ``dagster.yaml``)."""

    config: dict[str, Any]
    note: str | None
    origin: str = "./dagster.yaml"


def _resolve_env(value: Any, env: Mapping[str, str], key: str) -> Any:
    """``value`` with ``{env: VAR}`` replaced; raises ``LookupError`` naming an unset variable."""
    if isinstance(value, dict) and set(value) == {"env"}:
        name = str(value["env"])
        if not env.get(name):
            raise LookupError(f"its {key} reads {name}, which is not set")
        return env[name]
    if isinstance(value, dict):
        return {k: _resolve_env(v, env, f"{key}.{k}") for k, v in value.items()}
    return value


def read_cwd_instance(
    folder: Path, env: Mapping[str, str], overridden_by: str | None = None
) -> CwdInstance:
    """Read ``dagster.yaml`` (or ``dagster.yml``) in ``folder``.

    ``overridden_by`` names the flags (``-y``, ``--broker``...) that take precedence, if any.
    """
    path = next(
        (folder / n for n in ("dagster.yaml", "dagster.yml") if (folder / n).exists()), None
    )
    if path is None:
        return CwdInstance({}, None)
    where = f"./{path.name}"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        return CwdInstance(
            {}, f"{where} is not used: it cannot be read ({exc}).".replace("\n", " ")
        )
    launcher = document.get("run_launcher") if isinstance(document, dict) else None
    if not isinstance(launcher, dict) or launcher.get("class") != "TaskiqRunLauncher":
        return CwdInstance(
            {},
            f"{where} is not used: it does not name TaskiqRunLauncher, and dev runs Dagster on a "
            "temporary instance with TaskiqRunLauncher.",
        )
    not_used = f"{where} names TaskiqRunLauncher; its settings are not used:"
    if overridden_by:
        return CwdInstance({}, f"{not_used} {overridden_by} given.")
    raw = launcher.get("config") or {}
    try:
        taken = {k: _resolve_env(raw[k], env, k) for k in TAKEN_KEYS if k in raw}
    except LookupError as exc:
        return CwdInstance({}, f"{not_used} {exc}.")
    result = process_config(Field(shared_config_schema()).config_type, taken)
    if not result.success:
        errors = "; ".join(error.message for error in result.errors or [])
        return CwdInstance({}, f"{not_used} {errors}")
    return CwdInstance(
        taken,
        f"Using the TaskiqRunLauncher settings of {where} "
        f"({', '.join(sorted(taken)) or 'all defaults'}); the Dagster instance itself is "
        "temporary.",
        origin=where,
    )


def overriding_flags(
    config_yaml: str | None, broker: str | None, backend: str | None
) -> str | None:
    """The flags given that take precedence over ``./dagster.yaml``, as text, or None."""
    given = [
        flag
        for flag, value in (("-y", config_yaml), ("--broker", broker), ("--backend", backend))
        if value
    ]
    return " and ".join(given) if given else None


def current_folder() -> Path:
    """The folder ``dev`` was started from."""
    return Path(os.getcwd())
