"""Whether a worker may open its own Dagster instance ahead of its first task.

Opening an instance creates its storage when it is missing. Two processes that create one SQLite
storage at once collide (``dagster dev`` starting next to its workers: one of them meets a
half-made schema and fails on ``alembic_version``). So a worker opens its instance early only
when that cannot create anything:

* storage on a database server (Postgres, MySQL), which Dagster creates safely from several
  processes at once; or
* the default SQLite storage under ``DAGSTER_HOME`` once it is complete: each database exists,
  holds its ``alembic_version`` stamp (Dagster stamps a database after creating its tables) and
  the run database its ``instance_info`` table (created right after the stamp). Until then the
  worker looks again every second (see :func:`dagster_taskiq.worker.service`), and its first
  task opens the instance if the storage is still being made.

The check opens the databases read-only, so it never creates or locks anything.
"""

import contextlib
import sqlite3
from pathlib import Path

import yaml

from dagster_taskiq.instance_yaml import find_instance_yaml

#: ``dagster.yaml`` sections that configure storage.
STORAGE_SECTIONS = ("storage", "run_storage", "event_log_storage", "schedule_storage")
#: Words that name a database-server storage in those sections.
SERVER_STORAGES = ("postgres", "mysql")
#: The default SQLite databases, relative to ``DAGSTER_HOME``, and a table each must have besides
#: ``alembic_version``.
SQLITE_DATABASES = (
    ("history/runs.db", "instance_info"),
    ("history/runs/index.db", None),
    ("schedules/schedules.db", None),
)


def _storage_config(home: Path) -> dict[str, object] | None:
    """The storage sections of ``home``'s ``dagster.yaml`` ({} without one); None if unreadable."""
    found = find_instance_yaml(home)
    if found is None:
        return {}
    try:
        config = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return {name: config[name] for name in STORAGE_SECTIONS if name in config}


def _sqlite_complete(path: Path, table: str | None) -> bool:
    """Whether the SQLite database at ``path`` is stamped (and has ``table``), read-only."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
        ) as db:
            if db.execute("SELECT version_num FROM alembic_version").fetchone() is None:
                return False
            if table is not None:
                found = db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
                ).fetchone()
                return found is not None
            return True
    except sqlite3.Error:
        return False


def instance_storage_ready(home: Path) -> bool:
    """Whether the instance at ``home`` can be opened without creating any of its storage."""
    sections = _storage_config(home)
    if sections is None:
        return False
    text = " ".join(str(value) for value in sections.values()).lower()
    if any(word in text for word in SERVER_STORAGES):
        return True
    if sections:
        # SQLite (or custom) storage somewhere else: not checked, so not opened early.
        return False
    return all(_sqlite_complete(home / name, table) for name, table in SQLITE_DATABASES)
