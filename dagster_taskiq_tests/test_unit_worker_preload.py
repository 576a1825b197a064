"""A worker opens its own Dagster instance ahead of the first task only when that cannot create
any of its storage, so it never races ``dagster dev`` creating it (no network needed)."""

import sqlite3
from pathlib import Path

from dagster import DagsterInstance

from dagster_taskiq.worker.storage_ready import instance_storage_ready
from dagster_taskiq.worker.warm import WarmCache


def test_sqlite_storage_is_opened_early_only_once_it_is_complete(dagster_home: Path) -> None:
    """A fresh home is left alone (opening it would create it); once another process created
    the storage, the worker opens it ahead of its first task."""
    cache = WarmCache()
    assert not cache.preload_own_instance()
    assert not (dagster_home / "history" / "runs.db").exists()  # nothing created
    with DagsterInstance.get():  # as dagster dev would: the storage now exists
        pass
    assert instance_storage_ready(dagster_home)
    assert cache.preload_own_instance()
    assert cache.preload_own_instance()  # idempotent


def test_a_half_made_sqlite_storage_is_not_ready(tmp_path: Path) -> None:
    """Tables without the alembic stamp are what another process leaves mid-creation."""
    home = tmp_path / "home"
    (home / "history" / "runs").mkdir(parents=True)
    (home / "schedules").mkdir()
    for name in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        with sqlite3.connect(home / name) as db:
            db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    assert not instance_storage_ready(home)  # no stamps yet
    for name in ("history/runs/index.db", "schedules/schedules.db", "history/runs.db"):
        with sqlite3.connect(home / name) as db:
            db.execute("INSERT INTO alembic_version VALUES ('abc')")
    assert not instance_storage_ready(home)  # stamped, but instance_info not made yet
    with sqlite3.connect(home / "history/runs.db") as db:
        db.execute("CREATE TABLE instance_info (run_storage_id TEXT)")
    assert instance_storage_ready(home)
    (home / "schedules/schedules.db").unlink()
    assert not instance_storage_ready(home)


def test_server_storage_counts_and_sqlite_elsewhere_does_not(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: postgresql://postgres@127.0.0.1:5432/x\n"
    )
    assert instance_storage_ready(home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert not instance_storage_ready(home)  # default SQLite, not created
    (home / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: /tmp/x\n")
    assert not instance_storage_ready(home)  # SQLite elsewhere: not checked, not opened
    (home / "dagster.yaml").write_text(": not yaml [")
    assert not instance_storage_ready(home)
