"""Find secrets written literally in the instance config (``dagster.yaml``).

Every task message carries the instance reference, with the config of each storage, launcher
and so on as written in ``dagster.yaml``: a password written there in clear travels in every
task payload (and sits in Redis or RabbitMQ while the task waits). Written as ``{env: VAR}``,
only the variable's name travels, and each process reads the value from its own environment.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml
from dagster import DagsterEventType, DagsterInstance, MetadataValue

from dagster_taskiq.compat import DagsterRun, InstanceRef
from dagster_taskiq.engine_events import report_warning

#: Key names whose literal string value is a secret (compared in lower case).
SECRET_KEY_NAMES = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "secret_key", "signing_key", "private_key"}
)
#: Suffixes of key names whose literal string value is a secret.
SECRET_KEY_SUFFIXES = ("_password", "_secret", "_token", "_api_key", "_secret_key")

#: ``InstanceRef`` fields and the ``dagster.yaml`` sections they come from, in the order they are
#: reported (``storage`` first: the run, event and schedule storages repeat its config).
SECTIONS = (
    ("storage_data", "storage"),
    ("run_storage_data", "run_storage"),
    ("event_storage_data", "event_log_storage"),
    ("schedule_storage_data", "schedule_storage"),
    ("run_launcher_data", "run_launcher"),
    ("run_coordinator_data", "run_coordinator"),
    ("compute_logs_data", "compute_logs"),
    ("local_artifact_storage_data", "local_artifact_storage"),
    ("scheduler_data", "scheduler"),
    ("secrets_loader_data", "secrets"),
    ("defs_state_storage_data", "defs_state_storage"),
    ("custom_instance_class_data", "instance_class"),
)


#: How the warning starts (so a resumed run's orchestrator can tell it was already given).
LITERAL_SECRETS_PREFIX = "The instance config (dagster.yaml) holds"


@dataclasses.dataclass(frozen=True)
class LiteralSecret:
    """One secret written in clear in ``dagster.yaml``: where, and what kind."""

    section: str
    path: str
    #: ``"value"`` (a password-like key) or ``"url"`` (a URL with a password in it).
    kind: str

    @property
    def key(self) -> str:
        """The dotted key in ``dagster.yaml``, e.g. ``storage.postgres_db.password``."""
        return f"{self.section}.{self.path}"


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_KEY_NAMES or lowered.endswith(SECRET_KEY_SUFFIXES)


def _has_url_password(value: str) -> bool:
    if "://" not in value or "@" not in value:
        return False
    try:
        return bool(urlsplit(value.strip()).password)
    except ValueError:
        return False


def find_in_config(config: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted path, kind)`` of each literal secret in a config tree.

    ``{env: VAR}`` values are dicts and never match; a password-like key with a literal string
    matches as ``"value"``, any string holding a URL with a password as ``"url"``.
    """
    if isinstance(config, Mapping):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and value and _is_secret_name(str(key)):
                yield where, "value"
            else:
                yield from find_in_config(value, where)
    elif isinstance(config, list):
        for index, item in enumerate(config):
            yield from find_in_config(item, f"{path}[{index}]")
    elif isinstance(config, str) and _has_url_password(config):
        yield path, "url"


def literal_secrets(instance_ref: InstanceRef) -> list[LiteralSecret]:
    """Every literal secret in the instance config, each key once (the run, event and schedule
    storages that repeat the ``storage`` section's config are not reported again)."""
    found: list[LiteralSecret] = []
    seen: set[tuple[str, str]] = set()
    for field, section in SECTIONS:
        data = getattr(instance_ref, field, None)
        config_yaml = getattr(data, "config_yaml", None)
        if not config_yaml:
            continue
        try:
            config = yaml.safe_load(config_yaml)
        except yaml.YAMLError:
            continue
        for path, kind in find_in_config(config):
            if (config_yaml, path) in seen:
                continue
            seen.add((config_yaml, path))
            found.append(LiteralSecret(section, path, kind))
    found.extend(
        LiteralSecret("settings", path, kind)
        for path, kind in find_in_config(dict(instance_ref.settings or {}))
    )
    return found


def literal_secrets_warning(secrets: list[LiteralSecret]) -> str:
    """The warning for a run whose instance config holds ``secrets`` (not empty)."""
    keys = ", ".join(secret.key for secret in secrets)
    return (
        f"{LITERAL_SECRETS_PREFIX} {len(secrets)} literal secret"
        f"{'s' if len(secrets) > 1 else ''}: {keys}. It travels in every task message of this "
        "run (and waits in the broker with it). Write each as {env: VAR} (for a URL, the whole "
        "URL: postgres_url: {env: DAGSTER_PG_URL}, or the password field: "
        "password: {env: DAGSTER_PG_PASSWORD}) and set the variable on every process."
    )


def warn_literal_secrets(instance: DagsterInstance, dagster_run: DagsterRun) -> None:
    """Warn ``dagster_run`` (once) if the instance config holds secrets written in clear: they
    travel in every task message. Instances without a ``dagster.yaml`` have nothing to check.

    Called by the run launcher when it sends a run and by ``taskiq_executor`` when it starts
    orchestrating one; whichever comes second finds the first one's warning and stays quiet.
    """
    try:
        instance_ref = instance.get_ref()
    except Exception:
        return
    secrets = literal_secrets(instance_ref)
    if not secrets:
        return
    earlier = instance.get_records_for_run(
        dagster_run.run_id, of_type=DagsterEventType.ENGINE_EVENT
    ).records
    if any(
        (record.event_log_entry.dagster_event.message or "").startswith(LITERAL_SECRETS_PREFIX)
        for record in earlier
        if record.event_log_entry.dagster_event is not None
    ):
        return  # already warned (by the launcher, or before a resume)
    report_warning(
        instance,
        dagster_run,
        literal_secrets_warning(secrets),
        {"literal_secret_keys": MetadataValue.text(", ".join(s.key for s in secrets))},
    )
