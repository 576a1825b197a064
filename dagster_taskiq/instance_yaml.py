"""The ``TaskiqRunLauncher`` settings written in a Dagster instance's ``dagster.yaml``.

``dagster-taskiq dev`` reads them from the folder it starts in; ``worker start`` and ``status``
read them from ``$DAGSTER_HOME``, so that workers and the launcher share one source of config.
Only the YAML is read (no Dagster instance is opened); ``{env: VAR}`` values are resolved from the
given environment, and an unset variable is reported by name.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dagster_taskiq.compat import Field, process_config
from dagster_taskiq.config import TaskiqSettings, resolve_settings, shared_config_schema

#: The launcher keys that configure the connection a worker or ``dev`` shares with the launcher.
CONNECTION_KEYS = ("broker", "backend", "default_queue", "heartbeat_timeout", "config_source")
#: The class name a ``run_launcher`` section must give to be read.
LAUNCHER_CLASS = "TaskiqRunLauncher"
#: The file names Dagster reads an instance's config from, in order.
INSTANCE_FILE_NAMES = ("dagster.yaml", "dagster.yml")


@dataclasses.dataclass(frozen=True)
class LauncherYaml:
    """What one ``dagster.yaml`` says about ``TaskiqRunLauncher``.

    ``config`` holds the launcher keys that were asked for, validated and with ``{env: VAR}``
    resolved; it is None when the file cannot be used, and ``problem`` then says why (in words
    that follow "it" or "its settings are not used:").
    """

    path: Path
    names_launcher: bool
    config: dict[str, Any] | None
    problem: str | None = None
    unreadable: bool = False

    def settings(self) -> TaskiqSettings:
        """The settings the launcher config gives (environment and defaults fill the rest)."""
        assert self.config is not None, "only a usable launcher config has settings"
        return resolve_settings(self.config)


def find_instance_yaml(folder: Path) -> Path | None:
    """The ``dagster.yaml`` (or ``dagster.yml``) in ``folder``, if there is one."""
    return next((folder / n for n in INSTANCE_FILE_NAMES if (folder / n).is_file()), None)


def dagster_home_yaml(env: Mapping[str, str]) -> Path | None:
    """The ``dagster.yaml`` of the instance ``$DAGSTER_HOME`` names, if there is one."""
    home = env.get("DAGSTER_HOME")
    return find_instance_yaml(Path(os.path.expanduser(home))) if home else None


def resolve_env(value: Any, env: Mapping[str, str], key: str) -> Any:
    """``value`` with ``{env: VAR}`` replaced; raises ``LookupError`` naming an unset variable."""
    if isinstance(value, dict) and set(value) == {"env"}:
        name = str(value["env"])
        if not env.get(name):
            raise LookupError(f"its {key} reads {name}, which is not set")
        return env[name]
    if isinstance(value, dict):
        return {k: resolve_env(v, env, f"{key}.{k}") for k, v in value.items()}
    return value


def read_launcher_yaml(
    path: Path, env: Mapping[str, str], keys: Sequence[str] = CONNECTION_KEYS
) -> LauncherYaml:
    """Read the ``TaskiqRunLauncher`` section of the instance config at ``path``."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        reason = f"it cannot be read ({exc})".replace("\n", " ")
        return LauncherYaml(path, False, None, reason, unreadable=True)
    launcher = document.get("run_launcher") if isinstance(document, dict) else None
    if not isinstance(launcher, dict) or launcher.get("class") != LAUNCHER_CLASS:
        return LauncherYaml(path, False, None, f"it does not name {LAUNCHER_CLASS}")
    raw = launcher.get("config") or {}
    if not isinstance(raw, dict):
        return LauncherYaml(path, True, None, "its run_launcher config is not a mapping.")
    try:
        taken = {k: resolve_env(raw[k], env, k) for k in keys if k in raw}
    except LookupError as exc:
        return LauncherYaml(path, True, None, f"{exc}.")
    result = process_config(Field(shared_config_schema()).config_type, taken)
    if not result.success:
        errors = "; ".join(error.message for error in result.errors or [])
        return LauncherYaml(path, True, None, errors)
    return LauncherYaml(path, True, taken)


def overriding_flags(
    config_yaml: str | None, broker: str | None, backend: str | None
) -> str | None:
    """The flags given that take precedence over ``dagster.yaml``, as text, or None."""
    given = [
        flag
        for flag, value in (("-y", config_yaml), ("--broker", broker), ("--backend", backend))
        if value
    ]
    return " and ".join(given) if given else None
