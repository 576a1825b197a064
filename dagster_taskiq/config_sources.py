"""Where a worker's config comes from, and whether the workers match the run launcher.

Precedence, highest first: the flags ``--broker`` / ``--backend``, the ``-y`` file, the
``TaskiqRunLauncher`` section of ``$DAGSTER_HOME/dagster.yaml``, the ``DAGSTER_TASKIQ_*``
environment variables, the defaults. The instance's ``dagster.yaml`` is read only when neither
flags nor ``-y`` are given; whichever source is chosen, the environment variables and then the
defaults fill the keys it leaves out.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dagster_taskiq.config import (
    BACKEND_ENV,
    BROKER_ENV,
    SIGNING_KEY_ENV,
    TaskiqSettings,
    redact_url,
)
from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.instance_yaml import (
    CONNECTION_KEYS,
    LAUNCHER_CLASS,
    dagster_home_yaml,
    overriding_flags,
    read_launcher_yaml,
)
from dagster_taskiq.lifecycle.records import WorkerInfo

#: The launcher keys a worker takes from ``dagster.yaml``: the connection, and the signing key
#: so that the worker verifies what the launcher signs.
WORKER_KEYS = (*CONNECTION_KEYS, "signing_key")

#: Loads settings from ``-y``, ``--broker`` and ``--backend`` (the CLI's ``load_settings``).
SettingsLoader = Callable[[str | None, str | None, str | None], TaskiqSettings]


@dataclasses.dataclass(frozen=True)
class ChosenConfig:
    """A worker's settings and the one line that says where they came from."""

    settings: TaskiqSettings
    source: str


def worker_config(
    config_yaml: str | None,
    broker: str | None,
    backend: str | None,
    env: Mapping[str, str],
    load: SettingsLoader,
) -> ChosenConfig:
    """The settings ``worker start`` runs with (see the module docstring for the precedence).

    A ``dagster.yaml`` that names ``TaskiqRunLauncher`` but cannot be used (an unset ``{env:
    VAR}``, an invalid value) is an error: silently serving the defaults instead would drift
    from the launcher.
    """
    flags = overriding_flags(config_yaml, broker, backend)
    if flags:
        settings = load(config_yaml, broker, backend)
        return ChosenConfig(settings, f"Config from {flags}: {settings.describe()}.")
    path = dagster_home_yaml(env)
    if path is not None:
        found = read_launcher_yaml(path, env, WORKER_KEYS)
        if found.names_launcher:
            if found.config is None:
                raise TaskiqConfigError(
                    f"{path} names {LAUNCHER_CLASS}, but a worker cannot use its settings: "
                    f"{found.problem} Fix the file (or the environment), or give the worker "
                    "its own -y, --broker or --backend."
                )
            settings = found.settings()
            keys = ", ".join(sorted(found.config)) or "no keys: all defaults"
            return ChosenConfig(
                settings,
                f"Config from the {LAUNCHER_CLASS} in {path} ({keys}): {settings.describe()}.",
            )
    settings = load(None, None, None)
    variables = [name for name in (BROKER_ENV, BACKEND_ENV, SIGNING_KEY_ENV) if env.get(name)]
    if variables:
        return ChosenConfig(
            settings,
            f"Config from the environment ({', '.join(variables)}): {settings.describe()}.",
        )
    return ChosenConfig(
        settings,
        "Config from the defaults (no -y, --broker, --backend, launcher in "
        f"$DAGSTER_HOME/dagster.yaml or {BROKER_ENV}): {settings.describe()}.",
    )


def launcher_mismatches(env: Mapping[str, str], workers: Sequence[WorkerInfo]) -> list[str]:
    """Warnings for workers that do not match the ``TaskiqRunLauncher`` of ``$DAGSTER_HOME``.

    A worker whose recorded broker differs from the launcher's never receives its tasks; and
    when no worker on the launcher's broker serves its default queue, launched runs wait.
    Nothing is said when ``$DAGSTER_HOME`` has no launcher config.
    """
    path = dagster_home_yaml(env)
    if path is None:
        return []
    found = read_launcher_yaml(path, env)
    if not found.names_launcher:
        return []
    if found.config is None:
        return [
            f"{path} names {LAUNCHER_CLASS}, but its settings cannot be read to check the "
            f"workers against: {found.problem}"
        ]
    launcher = found.settings()
    return _mismatches(launcher, workers, path)


def _mismatches(launcher: TaskiqSettings, workers: Sequence[WorkerInfo], path: Path) -> list[str]:
    broker = redact_url(launcher.broker_url)
    queue = launcher.default_queue
    fix = (
        f"restart it with DAGSTER_HOME={path.parent} and no -y, --broker or --backend, "
        "so that it takes the launcher's config"
    )
    warnings = [
        f"Worker {w.name} on {w.host} uses broker {w.broker}, but the launcher in {path} sends "
        f"to {broker}: it never receives the launcher's tasks; {fix}."
        for w in workers
        if w.broker and w.broker != broker
    ]
    serving = [w for w in workers if w.broker in ("", broker) and queue in w.queues]
    if workers and not serving:
        warnings.append(
            f"No live worker serves the launcher's default queue '{queue}' on broker {broker} "
            f"(the workers serve {', '.join(sorted({q for w in workers for q in w.queues}))}): "
            f"launched runs wait. Start one with DAGSTER_HOME={path.parent} dagster-taskiq "
            f"worker start -q {queue}."
        )
    return warnings
